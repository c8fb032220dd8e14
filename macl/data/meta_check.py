"""Shape checks of dataset.json / datalist fields, so a malformed field is one line naming the file and key.

:func:`check_msd_meta` and :func:`check_datalist_entries` run before the readers use the fields; each problem is
a :class:`~macl.data.errors.DataError` ``<file>: '<key>' ...`` (e.g. ``channel_names`` keyed by names instead of
channel numbers, or ``"label": 5`` where a file path belongs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from macl.data.errors import DataError


def _is_index(key: Any) -> bool:
    return str(key).strip().isdigit()


def _check_path(value: Any, where: Path, key: str, allow_list: bool = False) -> None:
    if isinstance(value, str) and value:
        return
    if allow_list and isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return
    want = "a file path (or a list of them)" if allow_list else "a file path"
    raise DataError(where, f"'{key}' must be {want}, got {value!r}")


def check_msd_meta(meta: Mapping[str, Any], where: Path) -> None:
    """Check the fields of an MSD / nnU-Net dataset.json the reader uses (labels, channel_names / modality,
    file_ending, training entries).

    Raises:
        DataError: naming ``where`` and the key.
    """
    for key in ("channel_names", "modality"):
        chan = meta.get(key)
        if chan is None:
            continue
        if not isinstance(chan, dict):
            raise DataError(where, f"'{key}' must map channel numbers to names, got {chan!r}")
        bad = [k for k in chan if not _is_index(k)]
        if bad:
            raise DataError(where, f"'{key}' keys must be channel numbers (\"0\", \"1\", ...), got {bad[0]!r}")
    if "file_ending" in meta and not isinstance(meta["file_ending"], str):
        raise DataError(where, f"'file_ending' must be a string such as \".nii.gz\", got {meta['file_ending']!r}")
    training = meta.get("training")
    if training is not None and not isinstance(training, list):
        raise DataError(where, f"'training' must be a list, got {type(training).__name__}")
    for i, entry in enumerate(training or []):
        if isinstance(entry, str):
            continue
        if not isinstance(entry, dict):
            raise DataError(where, f"'training[{i}]' must be an object with 'image' (and 'label'), got {entry!r}")
        if "image" in entry:
            _check_path(entry["image"], where, f"training[{i}].image", allow_list=True)
        if entry.get("label") is not None:
            _check_path(entry["label"], where, f"training[{i}].label")


def check_datalist_entries(entries: list, key: str, where: Path) -> None:
    """Check a MONAI datalist's ``key`` list: each entry a path or {"image": path(s), "label": path}.

    Raises:
        DataError: naming ``where`` and the entry's key.
    """
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            continue
        if not isinstance(entry, dict) or "image" not in entry:
            continue  # the reader reports a missing 'image' itself
        _check_path(entry["image"], where, f"{key}[{i}].image", allow_list=True)
        if entry.get("label") is not None:
            _check_path(entry["label"], where, f"{key}[{i}].label")
