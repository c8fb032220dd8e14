"""What the pre-training-value benchmark computes itself (no network): the intensity-lookup baseline, the area under
the validation curve, and the per-seed split of the anatomy slabs.

* **Intensity lookup**: a per-voxel classifier that sees only the voxel's own (pre-processed, z-scored) intensity
  *and is given the brain mask* (the reference's foreground, label > 0: inside it the classes are tissues,
  outside it scalp and skull share their intensities): the labelled foreground voxels' intensities are binned (``bins`` equal-width bins between their 0.5th and 99.5th percentile,
  outer bins open), each bin predicts its most frequent class (an empty bin: the nearest non-empty bin's), and the
  test volumes are scored like the networks (``macl.data.metrics``: Dice per class, foreground mean). It measures
  how far a task is decided by intensity alone: a network near it has learned little context.
* **AUC**: the mean of the validation Dice over the fine-tuning steps (trapezoid rule over the checked steps,
  from step 0 with Dice 0 to the last check, divided by the last step): 1 would be perfect Dice from the first
  step; a run that gets there faster has the larger area.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def lookup_fit(volumes: Sequence, num_classes: int, bins: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(bin edges (bins + 1,), foreground class per bin (bins,)) from the foreground voxels of labelled
    ``volumes`` (macl Volume: image (1, X, Y, Z), label (X, Y, Z))."""
    fg = [np.asarray(v.label).ravel() > 0 for v in volumes]
    x = np.concatenate([np.asarray(v.image)[0].ravel()[m] for v, m in zip(volumes, fg)]).astype(np.float64)
    y = np.concatenate([np.asarray(v.label).ravel()[m] for v, m in zip(volumes, fg)]).astype(np.int64)
    if x.size == 0:
        raise ValueError("the labelled volumes have no foreground voxel to fit the lookup table on")
    lo, hi = np.percentile(x, [0.5, 99.5])
    edges = np.linspace(lo, hi, bins + 1)
    b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, bins - 1)
    counts = np.zeros((bins, num_classes), np.int64)
    np.add.at(counts, (b, y), 1)
    table = counts.argmax(1)
    filled = np.flatnonzero(counts.sum(1) > 0)
    if filled.size == 0:
        raise ValueError("the lookup table has no labelled voxel to learn from")
    nearest = filled[np.abs(np.arange(bins)[:, None] - filled[None, :]).argmin(1)]
    return edges, table[nearest]


def lookup_predict(image: np.ndarray, mask: np.ndarray, edges: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int16 (X, Y, Z) labels of ``image`` (1, X, Y, Z) by the fitted table inside ``mask`` (X, Y, Z), 0 outside."""
    b = np.clip(np.searchsorted(edges, np.asarray(image)[0], side="right") - 1, 0, len(table) - 1)
    return np.where(np.asarray(mask), table[b], 0).astype(np.int16)


def lookup_dice(train: Sequence, test: Sequence, class_names: dict, bins: int = 64) -> tuple[float, dict]:
    """Foreground-mean Dice of the lookup baseline fitted on ``train`` and scored on ``test``, and the summary."""
    from macl.data.metrics import case_metrics, summarize
    edges, table = lookup_fit(train, len(class_names), bins)
    classes = [k for k in sorted(class_names) if k != 0]
    per_case = [{"case_id": v.case_id, "metrics": case_metrics(lookup_predict(v.image, np.asarray(v.label) > 0, edges, table),
                                                               np.asarray(v.label), classes, v.spacing)}
                for v in test]
    summary = summarize(per_case, class_names)
    return float(summary["foreground_mean"]["Dice"]), summary


def curve_auc(curve: Sequence[Sequence[float]]) -> float:
    """Normalised area under a validation curve [[step, dice], ...] (module docstring); NaN when empty."""
    pts = sorted((int(s), float(d)) for s, d in curve if np.isfinite(d))
    if not pts:
        return float("nan")
    steps = np.array([0] + [s for s, _ in pts], dtype=np.float64)
    dice = np.array([0.0] + [d for _, d in pts])
    area = float(np.sum((steps[1:] - steps[:-1]) * (dice[1:] + dice[:-1]) / 2))
    return area / steps[-1]


def slab_split(prov: dict, seed: int, min_brain: float = 0.1) -> dict:
    """Per-seed labelled / validation / full-budget slabs of the anatomy data (provenance of make_dataset).

    Training slabs whose brain-mask share is below ``min_brain`` (the nearly empty top / bottom) are used only for
    pre-training. The rest are split at the context task's level (``z_split_in_crop``, else the middle) into
    inferior and superior slabs; seed ``s`` labels the ``s``-th of each (cyclically), validates on the next of
    each, and the full budget is every usable slab but the validation ones. Both levels are in every set, so the
    context task's two grey-matter classes can be learned at every budget.

    Returns:
        {"few": [...], "val": [...], "full": [...]} sorted case ids.
    Raises:
        ValueError: fewer than 2 usable slabs on a level (named).
    """
    ids = prov["train"]
    half = prov.get("z_split_in_crop", (prov["crop_hi"][2] - prov["crop_lo"][2]) / 2.0)
    share = prov.get("brain_share", {})
    levels: dict = {"inferior": [], "superior": []}
    for i, (a, b) in enumerate(prov["slabs"]):
        cid = f"robex_slab{i:02d}"
        if cid not in ids or share.get(cid, 1.0) < min_brain:
            continue
        levels["inferior" if (a + b) / 2 < half else "superior"].append(cid)
    for name, cases in levels.items():
        if len(cases) < 2:
            raise ValueError(f"need >= 2 usable {name} training slabs for a labelled and a validation one, got {cases}")
    few = sorted(c[seed % len(c)] for c in levels.values())
    val = sorted(c[(seed + 1) % len(c)] for c in levels.values())
    full = sorted(c for cs in levels.values() for c in cs if c not in val)
    return {"few": few, "val": val, "full": full}
