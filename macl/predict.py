"""Segmentation masks out as NIfTI, and masks from any tool scored in.

- :func:`predict_run`: a fine-tuning run's final model segments every case of a data set (or the given cases);
  each mask is mapped back from the pre-processed grid (reoriented, maybe resampled) to the voxel grid of the
  case's own image file and written as ``OUT/<case_id>.nii.gz`` with that file's affine, spacing and header
  (nnU-Net's naming: one file per case id). The map is nearest-neighbour through the two affines, exact when
  pre-processing only reoriented (the default: no ``spacing``).
- :func:`evaluate_predictions`: masks from a folder (``<case_id>.nii.gz`` / ``.nii``, optionally with a
  ``_seg`` / ``_pred`` / ``_mask`` suffix: nnU-Net's and MONAI's output names) are scored against the data set's
  labels. Each mask must lie on its image's voxel grid (same shape and affine). A case without a mask is an
  error naming it, or with ``missing_as_empty`` scored as an empty mask (Dice 0) and listed in the summary's
  ``missing_predictions``. The summary has the same form as the run's (``macl.data.metrics.summarize``).

One resampling path: every score is computed in the voxel grid of the case's own label file, with its spacing.
A fine-tuning run's evaluation (:func:`macl.finetune.evaluate`) maps its prediction back to that grid with
:func:`macl.data.image_space.image_space_mask`, the function ``predict_run`` writes masks with, and scores
it with :func:`~macl.data.image_space.score_in_image_space`, the one ``evaluate_predictions`` uses; so scoring a run's own
``macl predict`` output reproduces the run's summary.json exactly, with or without ``--spacing``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from macl.data.channels import select_volumes
from macl.data.errors import DataError
from macl.data.image_space import (image_space_mask, image_space_reference, score_in_image_space,  # noqa: F401
                                   to_image_grid)
from macl.data.loading import RawCase, nib
from macl.data.metrics import summarize, write_json_atomic
from macl.data.preprocess import load_volume
from macl.data.readers import CaseRecord, DatasetIndex
from macl.data.split_files import open_with_split

logger = logging.getLogger(__name__)
Progress = Callable[[int, int, dict], None]
SUFFIXES = ("", "_seg", "_pred", "_mask")


def _run_files(run: Path) -> dict[str, Any]:
    from macl.finetune import FinetuneConfig
    from macl.workflow import RESOLVED
    for name in ("finetune_config.json", "split.json", "model_final.pt", RESOLVED):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} not found: is {run} a finished `macl finetune` run?")
    saved = json.loads((run / "finetune_config.json").read_text())
    return {"cfg": FinetuneConfig(**saved["config"]),
            "class_names": {int(k): v for k, v in saved["class_names"].items()},
            "net": json.loads((run / RESOLVED).read_text())["net"],
            "split": json.loads((run / "split.json").read_text())}


def _chosen(index: DatasetIndex, cases: Optional[Sequence[str]]) -> list[CaseRecord]:
    if cases is None:
        return list(index.cases)
    known = {c.case_id: c for c in index.cases}
    missing = sorted(set(cases) - set(known))
    if missing:
        raise ValueError(f"cases not in {index.root}: {missing[:10]}")
    return [known[c] for c in cases]


def predict_run(run_dir: str | Path, data: str | Path, out_dir: str | Path, cases: Optional[Sequence[str]] = None,
                progress: Optional[Progress] = None, skip_bad: bool = False) -> dict[str, Any]:
    """Write ``out_dir/<case_id>.nii.gz`` for each case of `data` (default: every case, labelled or not).

    Labels are not read (a case whose label is broken is still predicted). Each mask is written to a temporary
    file and renamed (:func:`macl.run.files.atomic_write`), so a failed case leaves no mask file, half or whole.
    ``skip_bad``: a case whose image cannot be read or checked (truncated, NaN, ...) is skipped with a warning
    instead of stopping the run.

    Returns:
        {"written": [paths], "skipped": [{"case_id", "error"}]}.

    Raises:
        FileNotFoundError (a run file missing, named), DataError (a bad case without ``skip_bad``, or no case
        left), ValueError (unknown case ids).
    """
    from macl.finetune import predict_volume
    from macl.run.files import require_writable
    from macl.workflow import model_factory
    run = Path(run_dir)
    saved = _run_files(run)
    cfg = saved["cfg"]
    index = open_with_split(data, cfg.split_fold)
    records = _chosen(index, cases)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    require_writable(out)
    model = None
    written: list[Path] = []
    skipped: list[dict[str, str]] = []
    for i, rec in enumerate(records):
        try:
            vol = load_volume(dataclasses.replace(rec, label=None), cfg.preprocess)  # the label is not used
            vol = select_volumes([vol], cfg.channels, str(index.root))[0]
        except DataError as e:
            if not skip_bad:
                if written:
                    logger.warning("%d mask(s) written before case %s failed; --skip-bad skips bad cases",
                                   len(written), rec.case_id)
                raise
            logger.warning("skipping case %s: %s", rec.case_id, e)
            skipped.append({"case_id": rec.case_id, "error": str(e)})
            continue
        if model is None:
            model = model_factory(saved["net"])(vol.image.shape[0], len(saved["class_names"])).to(cfg.device)
            model.load_state_dict(torch.load(run / "model_final.pt", map_location=cfg.device, weights_only=True))
        pred = predict_volume(model, np.asarray(vol.image), cfg)
        mask, ref = image_space_mask(pred, vol.affine, rec)
        path = out / f"{rec.case_id}.nii.gz"
        _save_mask(mask, ref, path)
        written.append(path)
        if progress is not None:
            progress(i + 1, len(records), {"case": rec.case_id})
    if not written:
        raise DataError(index.root, f"no case could be predicted ({len(skipped)} of {len(records)} skipped)")
    return {"written": written, "skipped": skipped}


def _save_mask(mask: np.ndarray, ref, path: Path) -> None:
    """`mask` as NIfTI with `ref`'s affine, qform / sform codes, zooms and header fields (a 3D integer image),
    written atomically (``path.tmpPID``, fsync, rename: never a half file under ``path``)."""
    import gzip
    from macl.run.files import atomic_write
    header = ref.header.copy()
    dtype = np.uint8 if mask.min() >= 0 and mask.max() < 256 else np.int16
    img = type(ref)(mask.astype(dtype), ref.affine, header)   # Nifti1Image or Nifti2Image, as the input
    img.set_data_dtype(dtype)
    img.header.set_zooms(tuple(float(z) for z in ref.header.get_zooms()[:3]))
    img.header["scl_slope"], img.header["scl_inter"] = 1.0, 0.0   # labels are stored unscaled
    img.header["intent_code"] = 1002                              # NIFTI_INTENT_LABEL
    if hasattr(ref, "get_qform"):
        img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
        img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    raw = img.to_bytes()
    atomic_write(path, gzip.compress(raw, compresslevel=6) if path.name.endswith(".gz") else raw)


def find_prediction(folder: Path, case_id: str) -> Optional[Path]:
    """The mask file of `case_id` in `folder` (see module docstring for the names accepted), or None."""
    for suffix in SUFFIXES:
        for ending in (".nii.gz", ".nii"):
            p = folder / f"{case_id}{suffix}{ending}"
            if p.is_file():
                return p
    return None


def evaluate_predictions(predictions: str | Path, data: str | Path, cases: Optional[Sequence[str]] = None,
                         run_dir: Optional[str | Path] = None, out: Optional[str | Path] = None,
                         progress: Optional[Progress] = None, missing_as_empty: bool = False) -> dict[str, Any]:
    """Score the masks in `predictions` against the labels of `data`; write the summary (default
    ``predictions/summary.json``) and return it.

    Cases: `cases`, else the test cases of `run_dir` when given, else every labelled case of `data`. A case
    without a mask is an error naming it; with ``missing_as_empty`` it is scored as an empty mask (Dice 0 for
    every class it holds) and listed in the summary's ``missing_predictions``. Class names: the run's when
    `run_dir` is given, else the data set's labels (dataset.json / datalist), else 0..max label. Scores are
    computed in each label's own voxel grid (:func:`score_in_image_space`).

    Raises:
        FileNotFoundError: the folder, a case's mask, or a run file is missing. PermissionError: the summary's
            folder is not writable (checked first). DataError: a mask that is not on its image's voxel grid, or
            bad data. ValueError: no case to score, unknown case ids.
    """
    from macl.run.files import require_writable
    folder = Path(predictions)
    if not folder.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {folder}")
    out_path = Path(out) if out is not None else folder / "summary.json"
    require_writable(out_path.parent)  # before anything is computed, naming the folder
    class_names, split_fold = None, 0
    if run_dir is not None:
        saved = _run_files(Path(run_dir))
        class_names, split_fold = saved["class_names"], saved["cfg"].split_fold
        if cases is None:
            cases = saved["split"]["test"]
    index = open_with_split(data, split_fold)
    labelled = {c.case_id: c for c in index.labelled()}
    cases = sorted(labelled) if cases is None else list(cases)
    unknown = sorted(set(cases) - set(labelled))
    if unknown:
        raise ValueError(f"cases not among the labelled cases of {index.root}: {unknown[:10]}")
    if not cases:
        raise ValueError(f"no labelled case to score in {index.root}")
    found = {cid: find_prediction(folder, cid) for cid in cases}
    missing = [cid for cid in cases if found[cid] is None]
    if len(missing) == len(cases):
        raise FileNotFoundError(f"no mask in {folder} matches a case to score of {index.root} "
                                f"(expected <case_id>.nii.gz, e.g. {cases[0]}.nii.gz)")
    if missing and not missing_as_empty:
        raise FileNotFoundError(
            f"{folder}: no mask for {len(missing)} of {len(cases)} case(s): {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''} (looked for <case_id>[_seg|_pred|_mask].nii[.gz]); score only "
            f"some cases with --cases FILE, or count a missing mask as empty (Dice 0) with --missing-as-empty")
    if missing:
        logger.warning("%d case(s) without a mask scored as empty masks (Dice 0): %s", len(missing),
                       ", ".join(missing[:10]))
    rows = []
    for i, cid in enumerate(cases):
        raw = image_space_reference(labelled[cid], index.allowed_label_values)
        path = found[cid]
        mask = _read_mask(path, raw) if path is not None else np.zeros(raw.label.shape, np.int16)
        rows.append((raw, mask, None if path is None else str(path)))
        if progress is not None:
            progress(i + 1, len(cases), {"case": cid})
    if class_names is None:
        top = max(int(np.max(raw.label)) for raw, _, _ in rows)
        class_names = (dict(sorted(index.labels.items())) if index.labels is not None else
                       {k: ("background" if k == 0 else f"class_{k}") for k in range(top + 1)})
    classes = [k for k in sorted(class_names) if k != 0]
    per_case = []
    for raw, mask, path in rows:
        row = score_in_image_space(mask, raw, classes, path)
        if path is None:
            row["missing"] = True
        per_case.append(row)
    summary = summarize(per_case, class_names)
    summary["missing_predictions"] = missing
    write_json_atomic(out_path, summary)
    return summary


def _read_mask(path: Path, raw: RawCase) -> np.ndarray:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    spatial = raw.image.shape[1:]
    if data.shape != spatial or not np.allclose(img.affine, raw.affine, atol=1e-4):
        raise DataError(path, f"is not on the voxel grid of its image {raw.image_paths[0].name} (shape "
                              f"{data.shape} vs {spatial}, or another affine): write masks in the image's own space "
                              f"(macl predict does)")
    if not np.allclose(data, np.round(data)):
        raise DataError(path, "holds non-integer values; a mask holds class indices")
    return np.round(data).astype(np.int16)
