"""One way for the benchmark scripts to write their result rows as CSV."""
from __future__ import annotations

import csv
import os
from typing import Mapping, Sequence


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
    """Write `rows` (dicts with the same keys, in column order) to `path`, making its folder; no rows: no file."""
    if not rows:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
