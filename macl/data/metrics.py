"""Segmentation metrics on label volumes, and the nnU-Net-style summary they go into.

Per case and class, in the voxel grid of the reference with its spacing (mm):

- Dice ``2|P & G| / (|P| + |G|)``; NaN when both masks are empty (nnU-Net). A class predicted but
  absent from the reference scores 0 (MONAI's ``DiceMetric(ignore_empty=True)`` gives NaN there).
- HD95: surfaces are ``mask & ~binary_erosion(mask)`` (scipy's default cross structure); the
  distance from each surface voxel of one mask to the nearest surface voxel of the other is the
  Euclidean distance transform with ``spacing``; HD95 is the larger of the two directed 95th
  percentiles (linear interpolation). This is MONAI's ``compute_hausdorff_distance(
  percentile=95, spacing=...)``. NaN when either mask is empty (MONAI: inf / NaN).

Summaries keep nnU-Net's layout (``metric_per_case``, ``mean`` per class, ``foreground_mean``);
means skip NaN; JSON on disk writes NaN as null; ``not_evaluable`` lists the classes (id -> name) absent from
every case's reference (declared but never present: their Dice is undefined, or 0 from false positives).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON with NaN / inf written as null, via a temporary file and ``os.replace``."""
    def clean(o: Any) -> Any:
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o
    from macl.run import folder as runfolder
    runfolder.atomic_write(path, json.dumps(clean(obj), indent=2, allow_nan=False))


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when both are empty."""
    denom = int(pred.sum()) + int(ref.sum())
    return float("nan") if denom == 0 else 2.0 * int(np.logical_and(pred, ref).sum()) / denom


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance (mm) between two boolean masks.

    Surfaces are ``mask & ~binary_erosion(mask)``; distances from each surface voxel of one mask to
    the nearest surface voxel of the other (Euclidean distance transform with ``spacing``); the
    result is the larger of the two directed 95th percentiles. NaN when either mask is empty.
    """
    try:
        from scipy import ndimage
    except ImportError as e:  # pragma: no cover - scipy is a dependency of the package
        raise ImportError("HD95 needs scipy: pip install scipy") from e
    if not pred.any() or not ref.any():
        return float("nan")
    both = np.argwhere(pred | ref)
    lo, hi = np.maximum(both.min(0) - 1, 0), both.max(0) + 2
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    p, r = pred[box], ref[box]
    edge_p, edge_r = p & ~ndimage.binary_erosion(p), r & ~ndimage.binary_erosion(r)
    d_pr = ndimage.distance_transform_edt(~edge_r, sampling=spacing)[edge_p]
    d_rp = ndimage.distance_transform_edt(~edge_p, sampling=spacing)[edge_r]
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


def case_metrics(pred: np.ndarray, ref: np.ndarray, classes: Sequence[int], spacing: Sequence[float]
                 ) -> dict[str, dict[str, float]]:
    """Per-class Dice, HD95, IoU and voxel counts (nnU-Net names) for one case; keys are str(class)."""
    out = {}
    for k in classes:
        p, r = pred == k, ref == k
        tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
        out[str(k)] = {"Dice": dice_score(p, r), "HD95": hd95(p, r, spacing),
                       "IoU": tp / (tp + fp + fn) if tp + fp + fn else float("nan"),
                       "TP": tp, "FP": fp, "FN": fn, "TN": int(p.size - tp - fp - fn),
                       "n_pred": tp + fp, "n_ref": tp + fn}
    return out


def summarize(per_case: list[dict[str, Any]], class_names: Mapping[int, str]) -> dict[str, Any]:
    """nnU-Net-style summary: ``metric_per_case``, ``mean`` per class, ``foreground_mean``."""
    classes = [str(k) for k in sorted(class_names) if k != 0]
    mean: dict[str, dict[str, float]] = {}
    for k in classes:
        mean[k] = {}
        for m in ("Dice", "HD95", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref"):
            vals = [c["metrics"][k][m] for c in per_case if math.isfinite(c["metrics"][k][m])]
            mean[k][m] = float(np.mean(vals)) if vals else float("nan")
        mean[k]["n_defined_HD95"] = sum(math.isfinite(c["metrics"][k]["HD95"]) for c in per_case)
    fg = {}
    for m in ("Dice", "HD95", "IoU"):
        vals = [mean[k][m] for k in classes if math.isfinite(mean[k][m])]
        fg[m] = float(np.mean(vals)) if vals else float("nan")
    # a class absent from every case's reference (declared, never present): its Dice is undefined, or 0 from
    # false positives, and says nothing about how well it is segmented
    not_evaluable = {k: str(class_names.get(int(k), k)) for k in classes
                     if per_case and all(c["metrics"][k]["n_ref"] == 0 for c in per_case)}
    return {"metric_per_case": per_case, "mean": mean, "foreground_mean": fg,
            "class_names": {str(k): v for k, v in class_names.items()}, "n_cases": len(per_case),
            "not_evaluable": not_evaluable}
