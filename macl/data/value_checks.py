"""Value checks on loaded volumes: label values and intensities that would silently train the wrong thing.

- :func:`check_label_values`: negative label values are refused (they crash one-hot encoding later).
- :func:`classes_from_values`: with no dataset.json, the classes are 0..K: every value in between present,
  K ≤ 255 (a stray 255, often an "ignore" value, would otherwise create 256 classes).
- :func:`check_intensities`: warns about a constant channel (the z-score makes it all zeros) and about extreme
  intensities (|x| ≥ 1e18, e.g. ±3e38 fill values) that dominate the z-score statistics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

import numpy as np

from macl.data.errors import DataError

logger = logging.getLogger(__name__)
MAX_LABEL = 255
EXTREME = 1e18  # squares of larger float32 values overflow: statistics go to inf / NaN


def check_label_values(values: np.ndarray, path: str | Path) -> None:
    """Raise DataError naming ``path`` when the (unique) label ``values`` include negatives."""
    neg = [int(v) for v in np.asarray(values).ravel() if v < 0]
    if neg:
        raise DataError(path, f"negative label values {neg[:10]}; labels must be class indices 0..K")


def classes_from_values(values: Iterable[int], root: str | Path) -> dict[int, str]:
    """The class table ``{k: name}`` for labels without declared classes: values must be exactly 0..K.

    Raises:
        DataError: values above ``MAX_LABEL``, negatives, or gaps in 0..K (named, with the remedy).
    """
    vals = sorted({int(v) for v in values} | {0})
    if vals[0] < 0:
        raise DataError(root, f"negative label values {[v for v in vals if v < 0][:10]}")
    top = vals[-1]
    if top > MAX_LABEL:
        raise DataError(root, f"label value {top} is above {MAX_LABEL}: without a dataset.json 'labels' mapping "
                              f"the classes are 0..K with K <= {MAX_LABEL}")
    missing = sorted(set(range(top + 1)) - set(vals))
    if missing:
        raise DataError(root, f"label values {vals[:12]}{'...' if len(vals) > 12 else ''} skip {missing[:10]}"
                              f"{'...' if len(missing) > 10 else ''}: without a dataset.json 'labels' mapping the "
                              f"classes must be 0..K (an 'ignore' value such as 255 is not supported)")
    return {k: ("background" if k == 0 else f"class_{k}") for k in range(top + 1)}


def check_intensities(image: np.ndarray, source: str | Path) -> bool:
    """Warn about constant channels and extreme values of a (C, *spatial) image; True when extreme values
    were found (the z-score must then compute its statistics in float64)."""
    extreme = False
    for c in range(image.shape[0]):
        ch = image[c]
        lo, hi = float(ch.min()), float(ch.max())
        if lo == hi:
            logger.warning("%s: channel %d is constant (%g); its z-score is all zeros", source, c, lo)
        if max(abs(lo), abs(hi)) >= EXTREME:
            extreme = True
            logger.warning("%s: channel %d has extreme intensities (%g .. %g) that dominate its z-score; clip them "
                           "(--ct-window) or fix the file", source, c, lo, hi)
    return extreme
