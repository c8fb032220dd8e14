"""Splits a data set already declares: a MONAI datalist's ``validation`` list, nnU-Net's ``splits_final.json``.

Fine-tuning, evaluation and prediction call :func:`open_with_split`: the index gains the datalist's validation
cases (they are not in its ``training`` list) and ``index.extra["split"]`` holds the declared held-out cases:

- MONAI datalist with a non-empty ``validation`` list: those cases are the test cases.
- MSD / nnU-Net folder with ``splits_final.json`` (nnU-Net's list of folds ``[{"train": [...], "val": [...]}]``,
  copied into the data set folder from nnUNet_preprocessed/DatasetXXX/): fold ``fold``'s ``val`` cases.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from macl.data.errors import DataError
from macl.data.readers import DatasetIndex, open_dataset, read_datalist

SPLITS_FILE = "splits_final.json"


def open_with_split(path: str | Path, fold: int = 0) -> DatasetIndex:
    """`open_dataset(path)`, plus a datalist's validation cases, with ``extra["split"]`` = {"test": [...],
    "source": "..."} when the data set declares a split (else no "split" key).

    Raises:
        DataError: what `open_dataset` raises; a splits_final.json that is not nnU-Net's list of folds, has no
            fold `fold`, or names cases the data set does not have; validation cases that clash with training ids.
    """
    index = open_dataset(path)
    split = None
    if index.source == "datalist":
        split = _datalist_validation(index)
    elif index.source == "msd" and (Path(index.root) / SPLITS_FILE).is_file():
        split = _nnunet_split(index, Path(index.root) / SPLITS_FILE, fold)
    if split is not None:
        index.extra["split"] = split
    return index


def declared_test_cases(index: DatasetIndex) -> Optional[list[str]]:
    """The held-out case ids `open_with_split` found, or None."""
    split = index.extra.get("split")
    return list(split["test"]) if split else None


def _datalist_validation(index: DatasetIndex) -> Optional[dict[str, Any]]:
    data = json.loads(Path(index.root).read_text())
    if not isinstance(data, dict) or not data.get("validation"):
        return None
    val = read_datalist(index.root, key="validation")
    known = {c.case_id: c for c in index.cases}
    clash = sorted(c.case_id for c in val.cases if c.case_id in known and known[c.case_id] != c)
    if clash:
        raise DataError(index.root, f"validation case id(s) {clash[:5]} name other files than the training cases "
                                    f"of the same id")
    index.cases = sorted({**known, **{c.case_id: c for c in val.cases}}.values(), key=lambda c: c.case_id)
    return {"test": sorted(c.case_id for c in val.cases), "source": f"{index.root} 'validation'"}


def _nnunet_split(index: DatasetIndex, path: Path, fold: int) -> dict[str, Any]:
    try:
        folds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(path, f"cannot read nnU-Net splits ({e})") from e
    if not isinstance(folds, list) or not all(isinstance(f, dict) and "val" in f for f in folds):
        raise DataError(path, "expected nnU-Net's list of folds [{\"train\": [...], \"val\": [...]}, ...]")
    if not 0 <= fold < len(folds):
        raise DataError(path, f"has {len(folds)} fold(s); fold {fold} asked for")
    val = sorted(str(c) for c in folds[fold]["val"])
    ids = {c.case_id for c in index.cases}
    unknown = sorted(set(val) - ids)
    if unknown:
        raise DataError(path, f"fold {fold} names case(s) not in {index.root}: {unknown[:5]}")
    return {"test": val, "source": f"{path} fold {fold}"}
