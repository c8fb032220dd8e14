"""Read one case's NIfTI files with nibabel and check them.

Every check failure is a :class:`~macl.data.errors.DataError` naming the file:
unreadable / truncated / corrupt files, 2D images where 3D volumes are needed, channel files of
different shapes, image/label shape mismatch, non-integer labels, label values the data set's
metadata does not declare, non-finite intensities.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from macl.data.errors import DataError
from macl.data.nifti_check import check_nifti_size
from macl.data.value_checks import check_label_values
from macl.data.readers import CaseRecord
from macl.extras import import_module

nib = import_module("nibabel", "medical", "reading NIfTI")

logger = logging.getLogger(__name__)


@dataclass
class RawCase:
    """One case as stored on disk (before pre-processing).

    Attributes:
        case_id: the case's id.
        image: float32 array (C, X, Y, Z), voxel axes as in the file.
        label: int16 array (X, Y, Z) or None.
        affine: float64 (4, 4) voxel -> world (RAS mm) matrix of the first image file.
        image_paths / label_path: where it came from.
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    image_paths: tuple[Path, ...]
    label_path: Path | None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis, from the affine's column norms."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file fully into memory.

    Returns:
        (array, affine): the scaled data (dtype as stored after scaling) and the (4, 4) affine.

    Raises:
        DataError: the file is missing, not NIfTI, truncated or otherwise unreadable.
    """
    try:
        img = nib.load(str(path))  # lazy: the header only
        check_nifti_size(path, img)  # a header claiming more than the file holds fails before allocating
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except DataError:
        raise
    except MemoryError as e:
        raise DataError(path, "not enough memory to read this volume") from e
    except Exception as e:  # nibabel raises EOFError, zlib.error, ImageFileError, OSError...
        raise DataError(path, f"cannot read NIfTI ({type(e).__name__}: {e}); the file may be "
                              "truncated or corrupt") from e
    if not np.all(np.isfinite(affine)):
        raise DataError(path, "the NIfTI affine is not finite")
    return np.asarray(data), affine


def _as_channels(data: np.ndarray, path: Path, require_3d: bool) -> np.ndarray:
    """(X,Y,Z) / (X,Y,Z,C) / (X,Y,Z,1,C) / (X,Y) -> (C, X, Y, Z)."""
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 2 or (data.ndim == 3 and data.shape[2] == 1):
        if require_3d:
            raise DataError(path, f"2D image of shape {tuple(data.shape)}; a 3D volume is required")
        data = data.reshape(data.shape[0], data.shape[1], 1)
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return np.moveaxis(data, 3, 0)
    raise DataError(path, f"image has {data.ndim} dimensions (shape {tuple(data.shape)}); "
                          "expected 3 (X,Y,Z) or 4 (X,Y,Z,channels)")


def _check_label(label: np.ndarray, path: Path, shape: tuple[int, ...], image_path: Path,
                 allowed: Iterable[int] | None) -> np.ndarray:
    if label.ndim == 4 and label.shape[3] == 1:
        label = label[..., 0]
    if label.ndim == 2 and len(shape) == 3 and shape[2] == 1:
        label = label[..., None]
    if tuple(label.shape) != tuple(shape):
        raise DataError(path, f"label shape {tuple(label.shape)} does not match image shape "
                              f"{tuple(shape)} of {image_path}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise DataError(path, "label volume holds non-integer values")
    values = np.unique(label).astype(np.int64)
    check_label_values(values, path)
    if allowed is not None:
        allowed_set = set(int(v) for v in allowed)
        bad = [int(v) for v in values if int(v) not in allowed_set]
        if bad:
            raise DataError(path, f"label values {bad[:10]} are not in the data set's labels "
                                  f"{sorted(allowed_set)} (dataset.json)")
    if values.size and (values.min() < np.iinfo(np.int16).min or values.max() > np.iinfo(np.int16).max):
        raise DataError(path, f"label values range {values.min()}..{values.max()} does not fit int16")
    return label.astype(np.int16)


def load_case(record: CaseRecord, *, require_3d: bool = True,
              allowed_labels: Iterable[int] | None = None, check_finite: bool = True) -> RawCase:
    """Read and check one case.

    Args:
        record: the case's files.
        require_3d: raise for 2D images (shape (X, Y) or (X, Y, 1)); else they become (X, Y, 1).
        allowed_labels: label values the data set declares (dataset.json); None skips that check.
        check_finite: raise when the image holds NaN or infinity.

    Returns:
        RawCase with image (C, X, Y, Z) float32 and label (X, Y, Z) int16 or None.

    Raises:
        DataError: naming the file and the problem (see module docstring).
    """
    channels, affine = [], None
    for p in record.images:
        data, aff = read_nifti(p)
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
            raise DataError(p, f"unsupported voxel type {data.dtype}")
        ch = _as_channels(data, p, require_3d)
        if channels and ch.shape[1:] != channels[0].shape[1:]:
            raise DataError(p, f"channel shape {ch.shape[1:]} differs from {channels[0].shape[1:]} "
                               f"of {record.images[0]}")
        if affine is None:
            affine = aff
        channels.append(ch.astype(np.float32, copy=False))
    assert affine is not None
    image = np.concatenate(channels, axis=0) if len(channels) > 1 else channels[0]
    if check_finite and not np.all(np.isfinite(image)):
        n_bad = int(np.size(image) - np.count_nonzero(np.isfinite(image)))
        raise DataError(record.images[0], f"image holds {n_bad} NaN/infinite voxels")
    label = None
    if record.label is not None:
        lab, lab_aff = read_nifti(record.label)
        label = _check_label(lab, record.label, image.shape[1:], record.images[0], allowed_labels)
        if not np.allclose(lab_aff, affine, atol=1e-3, rtol=1e-3):
            logger.warning("%s: label affine differs from the image's (%s); using the image's",
                           record.label, record.images[0])
    return RawCase(record.case_id, np.ascontiguousarray(image), label, affine, record.images, record.label)
