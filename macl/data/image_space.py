"""One resampling path between a run's pre-processed grid and each case's own voxel grid, and scoring there.

Every Dice / HD95 of a fine-tuning run (:func:`macl.finetune.evaluate`) and of ``macl evaluate --predictions``
(:func:`macl.predict.evaluate_predictions`) is computed in the voxel grid of the case's label file, with that
grid's spacing: a prediction made on the pre-processed grid goes back with :func:`image_space_mask` (the function
``macl predict`` writes its masks with) and is scored with :func:`score_in_image_space`. So evaluating a run's own
``macl predict`` output reproduces the run's summary.json exactly, with or without ``--spacing``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from macl.data.loading import RawCase, load_case, nib
from macl.data.metrics import case_metrics
from macl.data.readers import CaseRecord


def to_image_grid(mask: np.ndarray, mask_affine: np.ndarray, shape: Sequence[int], affine: np.ndarray
                  ) -> np.ndarray:
    """Resample an integer mask from its voxel grid (`mask_affine`) onto another (`shape`, `affine`), nearest.

    A pure reorientation (the map between the grids is a signed permutation with an integer shift) is done
    by exact index arithmetic; anything else by nearest-neighbour lookup of each target voxel centre.
    """
    M = np.linalg.inv(mask_affine) @ affine          # target voxel -> mask voxel
    idx = np.indices(tuple(int(s) for s in shape), dtype=np.float64).reshape(3, -1)
    src = M[:3, :3] @ idx + M[:3, 3:4]
    src = np.rint(src).astype(np.int64)
    inside = np.all((src >= 0) & (src < np.array(mask.shape)[:, None]), axis=0)
    out = np.zeros(idx.shape[1], dtype=mask.dtype)
    out[inside] = mask[src[0, inside], src[1, inside], src[2, inside]]
    return out.reshape(tuple(int(s) for s in shape))


def image_space_mask(pred: np.ndarray, pred_affine: np.ndarray, rec: CaseRecord):
    """A prediction on the pre-processed grid (``pred_affine``) mapped to the voxel grid of the case's first image
    file (nearest, :func:`to_image_grid`). Returns (mask, the image's nibabel object)."""
    ref = nib.load(str(rec.images[0]))
    return to_image_grid(pred, pred_affine, ref.shape[:3], np.asarray(ref.affine, dtype=np.float64)), ref


def image_space_reference(rec: CaseRecord, allowed_labels=None) -> RawCase:
    """The case as stored (its label in its own voxel grid), checked like every label (:func:`load_case`)."""
    return load_case(rec, allowed_labels=allowed_labels, check_finite=False)


def score_in_image_space(mask: np.ndarray, raw: RawCase, classes: Sequence[int], prediction_file: Any = None) -> dict:
    """One ``metric_per_case`` row: ``mask`` (in the label's voxel grid) against ``raw.label`` with the label
    grid's spacing (mm); ``reference_file`` names the label file."""
    return {"case_id": raw.case_id, "reference_file": str(raw.label_path), "prediction_file": prediction_file,
            "spacing": list(raw.spacing), "metrics": case_metrics(mask, raw.label, classes, raw.spacing)}


__all__ = ["to_image_grid", "image_space_mask", "image_space_reference", "score_in_image_space"]
