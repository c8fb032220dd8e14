"""Segmentation masks out as NIfTI, and masks from any tool scored in.

- :func:`predict_run`: a fine-tuning run's final model segments every case of a data set (or the given cases);
  each mask is mapped back from the pre-processed grid (reoriented, maybe resampled) to the voxel grid of the
  case's own image file and written as ``OUT/<case_id>.nii.gz`` with that file's affine, spacing and header
  (nnU-Net's naming: one file per case id). The map is nearest-neighbour through the two affines, exact when
  pre-processing only reoriented (the default: no ``spacing``).
- :func:`evaluate_predictions`: masks from a folder (``<case_id>.nii.gz`` / ``.nii``, optionally with a
  ``_seg`` / ``_pred`` / ``_mask`` suffix: nnU-Net's and MONAI's output names) are scored against the data set's
  labels. Each mask must lie on its image's voxel grid (same shape and affine); it is pre-processed exactly as
  the reference label (the run's settings with ``run=``, else the defaults), so a run's own predictions
  reproduce its summary.json. The summary has the same form as the run's (``macl.data.metrics.summarize``).
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
from macl.data.loading import RawCase, load_case, nib
from macl.data.metrics import case_metrics, summarize, write_json_atomic
from macl.data.preprocess import PreprocessConfig, load_volume, preprocess
from macl.data.readers import CaseRecord, DatasetIndex
from macl.data.split_files import open_with_split

logger = logging.getLogger(__name__)
Progress = Callable[[int, int, dict], None]
SUFFIXES = ("", "_seg", "_pred", "_mask")


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
                progress: Optional[Progress] = None) -> list[Path]:
    """Write ``out_dir/<case_id>.nii.gz`` for each case of `data` (default: every case, labelled or not).

    Returns the written paths. Raises FileNotFoundError (a run file missing, named), DataError (bad data),
    ValueError (unknown case ids).
    """
    from macl.finetune import predict_volume
    from macl.workflow import model_factory
    run = Path(run_dir)
    saved = _run_files(run)
    cfg = saved["cfg"]
    index = open_with_split(data, cfg.split_fold)
    records = _chosen(index, cases)
    out = Path(out_dir)
    model = None
    written = []
    for i, rec in enumerate(records):
        vol = select_volumes([load_volume(rec, cfg.preprocess)], cfg.channels, str(index.root))[0]
        if model is None:
            model = model_factory(saved["net"])(vol.image.shape[0], len(saved["class_names"])).to(cfg.device)
            model.load_state_dict(torch.load(run / "model_final.pt", map_location=cfg.device, weights_only=True))
        pred = predict_volume(model, np.asarray(vol.image), cfg)
        ref = nib.load(str(rec.images[0]))
        mask = to_image_grid(pred, vol.affine, ref.shape[:3], ref.affine)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{rec.case_id}.nii.gz"
        _save_mask(mask, ref, path)
        written.append(path)
        if progress is not None:
            progress(i + 1, len(records), {"case": rec.case_id})
    return written


def _save_mask(mask: np.ndarray, ref, path: Path) -> None:
    """`mask` as NIfTI with `ref`'s affine, qform / sform codes, zooms and header fields (a 3D integer image)."""
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
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


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
                         progress: Optional[Progress] = None) -> dict[str, Any]:
    """Score the masks in `predictions` against the labels of `data`; write the summary (default
    ``predictions/summary.json``) and return it.

    Cases: `cases`, else the test cases of `run_dir` when given, else every labelled case with a mask.
    Pre-processing and class names: the run's when `run_dir` is given, else the defaults and the data set's
    labels (dataset.json / datalist), else 0..max label.

    Raises:
        FileNotFoundError: the folder, a named case's mask, or a run file is missing. DataError: a mask that
            is not on its image's voxel grid, or bad data. ValueError: no case to score, unknown case ids.
    """
    folder = Path(predictions)
    if not folder.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {folder}")
    cfg_pre, class_names, split_fold = PreprocessConfig(), None, 0
    if run_dir is not None:
        saved = _run_files(Path(run_dir))
        cfg_pre, class_names, split_fold = saved["cfg"].preprocess, saved["class_names"], saved["cfg"].split_fold
        if cases is None:
            cases = saved["split"]["test"]
    index = open_with_split(data, split_fold)
    labelled = {c.case_id: c for c in index.labelled()}
    if cases is None:
        cases = [cid for cid in sorted(labelled) if find_prediction(folder, cid) is not None]
        if not cases:
            raise ValueError(f"no mask in {folder} matches a labelled case of {index.root} "
                             f"(expected <case_id>.nii.gz, e.g. {next(iter(sorted(labelled)), '?')}.nii.gz)")
    unknown = sorted(set(cases) - set(labelled))
    if unknown:
        raise ValueError(f"cases not among the labelled cases of {index.root}: {unknown[:10]}")
    pairs = []
    for cid in cases:
        path = find_prediction(folder, cid)
        if path is None:
            raise FileNotFoundError(f"no mask for case {cid!r} in {folder} (looked for {cid}.nii.gz / .nii)")
        pairs.append((labelled[cid], path))
    per_case, refs = [], []
    for i, (rec, path) in enumerate(pairs):
        raw = load_case(rec, allowed_labels=index.allowed_label_values, check_finite=False)
        ref_vol = preprocess(raw, cfg_pre)
        pred_vol = preprocess(dataclasses.replace(raw, label=_read_mask(path, raw)),
                              dataclasses.replace(cfg_pre, zscore=False, ct_window=None))
        refs.append(int(np.max(ref_vol.label)))
        per_case.append({"case_id": rec.case_id, "reference_file": ref_vol.source, "prediction_file": str(path),
                         "spacing": list(ref_vol.spacing), "metrics": None,
                         "_arrays": (pred_vol.label, ref_vol.label, ref_vol.spacing)})
        if progress is not None:
            progress(i + 1, len(pairs), {"case": rec.case_id})
    if class_names is None:
        class_names = (dict(sorted(index.labels.items())) if index.labels is not None else
                       {k: ("background" if k == 0 else f"class_{k}") for k in range(max(refs) + 1)})
    classes = [k for k in sorted(class_names) if k != 0]
    for row in per_case:
        pred, ref, spacing = row.pop("_arrays")
        row["metrics"] = case_metrics(pred, ref, classes, spacing)
    summary = summarize(per_case, class_names)
    write_json_atomic(Path(out) if out is not None else folder / "summary.json", summary)
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
