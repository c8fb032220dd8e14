"""Per-sample meta-labels for GCL-style pre-training: volume index and per-volume attributes from a CSV.

`MetaLabelDataset` is a :class:`macl.data.pretrain.PretrainDataset` whose batches carry one more entry::

    "meta": (B, K) float32, column j = meta-label names[j] of the sample's volume

for the meta-label names other than "position" (the position is the batch's ``positions`` already):
"volume" is the volume's index in the data set; any other name is a column of the attributes CSV, whose
distinct values (strings, compared after stripping blanks) are coded 0, 1, … in sorted order. Such a batch
goes through :func:`macl.data.iterate_pretrain_batches` / :func:`macl.data.batches_from_step` unchanged.

The CSV has a header; the case id column is named ``case_id`` (or is the first column). Example::

    case_id,phase,vendor
    phantom_000,ED,A
    phantom_001,ES,B
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from macl.data.errors import DataError
from macl.data.preprocess import Volume
from macl.data.pretrain import PretrainDataConfig, PretrainDataset

POSITION = "position"
VOLUME = "volume"


def read_attributes_csv(path: str | Path) -> dict[str, dict[str, str]]:
    """{case_id: {column: value}} from a CSV with a header (case id column ``case_id`` or the first).

    Raises:
        DataError: unreadable file, no header, an empty or duplicated case id (named with its line).
    """
    p = Path(path)
    try:
        with open(p, newline="") as fh:
            rows = list(csv.reader(fh))
    except OSError as e:
        raise DataError(p, f"cannot read attributes CSV ({e.strerror})") from e
    if not rows or not rows[0]:
        raise DataError(p, "the attributes CSV has no header line")
    header = [h.strip() for h in rows[0]]
    id_col = header.index("case_id") if "case_id" in header else 0
    out: dict[str, dict[str, str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(p, f"line {line} has {len(row)} fields, the header has {len(header)}")
        case = row[id_col].strip()
        if not case:
            raise DataError(p, f"line {line} has an empty case id")
        if case in out:
            raise DataError(p, f"case {case!r} appears twice (line {line})")
        out[case] = {h: v.strip() for h, v in zip(header, row) if h != header[id_col]}
    return out


def volume_meta(volumes: Sequence[Volume], names: Sequence[str],
                attributes: Mapping[str, Mapping[str, str]] | None = None) -> np.ndarray:
    """(V, K) float32 codes of the meta-labels `names` (without "position") of each volume.

    Raises:
        ValueError: an attribute name with no attributes given, or a volume without that attribute
            (case id and column named).
    """
    cols = []
    for name in names:
        if name == POSITION:
            continue
        if name == VOLUME:
            cols.append(np.arange(len(volumes), dtype=np.float32))
            continue
        if attributes is None:
            raise ValueError(f"meta-label {name!r} is not 'position' or 'volume' and no attributes CSV was given")
        values = []
        for v in volumes:
            row = attributes.get(v.case_id)
            if row is None or name not in row or row[name] == "":
                raise ValueError(f"case {v.case_id!r} has no value for attribute {name!r} in the attributes CSV")
            values.append(row[name])
        codes = {value: i for i, value in enumerate(sorted(set(values)))}
        cols.append(np.asarray([codes[x] for x in values], dtype=np.float32))
    return np.stack(cols, axis=1) if cols else np.zeros((len(volumes), 0), dtype=np.float32)


class MetaLabelDataset(PretrainDataset):
    """`PretrainDataset` whose batches also hold "meta" (B, K) (see the module docstring).

    Args:
        volumes, cfg: as `PretrainDataset`.
        names: the meta-label names (`MethodConfig.meta_labels`); "position" is skipped.
        attributes: {case_id: {column: value}} (`read_attributes_csv`), needed for names other than
            "position" / "volume".
    """

    def __init__(self, volumes: Sequence[Volume], cfg: PretrainDataConfig, names: Sequence[str],
                 attributes: Mapping[str, Mapping[str, str]] | None = None) -> None:
        super().__init__(volumes, cfg)
        self.names = tuple(names)
        self.meta = volume_meta(self.volumes, self.names, attributes)

    def volume_of(self, index: int) -> int:
        """Index of the volume sample `index` comes from."""
        if self.cfg.dims == 2:
            return self.slices[index].volume
        return index % len(self.volumes)

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """As `PretrainDataset.get_batch`, plus "meta" (B, K) float32."""
        out = super().get_batch(indices)
        vols = [self.volume_of(int(i)) for i in indices]
        out["meta"] = torch.from_numpy(self.meta[vols])
        return out
