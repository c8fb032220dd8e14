"""Pre-processing of whole volumes: canonical orientation, resampling, CT window, z-score; cached.

Order, per case: reorient to the canonical frame (closest to RAS by default; nibabel's
``io_orientation``) -> resample to ``spacing`` (trilinear for images, nearest for labels) ->
clip to the CT window -> z-score each channel with the volume's own mean and std (MACL.md
"Pre-processing"). The result, a :class:`Volume`, can be cached on disk as ``.npy`` files
(keyed by the source files' paths, sizes, mtimes and the config) and memory-mapped back.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from macl.settings.fields import coerce_fields
from macl.data.errors import DataError
from macl.data.value_checks import check_intensities
from macl.data.loading import RawCase, load_case
from macl.data.readers import CaseRecord, DatasetIndex
from macl.extras import import_module

nio = import_module("nibabel.orientations", "medical", "reorienting NIfTI")

logger = logging.getLogger(__name__)
CACHE_VERSION = 1
Progress = Callable[[int, int, dict], None]


@dataclass
class PreprocessConfig:
    """How volumes are prepared before sampling.

    Attributes:
        orientation: target axis codes (e.g. ``"RAS"``), or None to keep the file's voxel order.
        spacing: target voxel size in mm (x, y, z), or None to keep the native spacing.
        ct_window: (low, high) intensity window applied before the z-score (CT HU), or None.
        zscore: normalise each channel to zero mean, unit std over the volume.
        zscore_nonzero: compute the z-score statistics over non-zero voxels only (skull-stripped MR).
        require_3d: 2D images are an error (True) or become (X, Y, 1) volumes (False).
        check_finite: NaN / infinite intensities are an error.
        cache_dir: folder for the on-disk cache, or None for no cache.
    """

    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    ct_window: tuple[float, float] | None = None
    zscore: bool = True
    zscore_nonzero: bool = False
    require_3d: bool = True
    check_finite: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        coerce_fields(self, "preprocess.")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            if len(self.spacing) != 3 or min(self.spacing) <= 0:
                raise ValueError(f"spacing must be 3 positive numbers, got {self.spacing}")
        if self.ct_window is not None:
            lo, hi = (float(v) for v in self.ct_window)
            if not lo < hi:
                raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")
            self.ct_window = (lo, hi)
        if self.orientation is not None and (len(self.orientation) != 3 or set(self.orientation.upper())
                                             - set("RLAPSI")):
            raise ValueError(f"orientation must be 3 axis codes like 'RAS', got {self.orientation!r}")


@dataclass
class Volume:
    """A pre-processed case, ready for sampling.

    Attributes:
        case_id: the case's id.
        image: float32 (C, X, Y, Z) (may be a read-only memory map when loaded from the cache).
        label: int16 (X, Y, Z) or None.
        spacing: voxel size in mm along X, Y, Z after pre-processing.
        affine: (4, 4) voxel -> world matrix after pre-processing.
        source: the first image file (for messages).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (X, Y, Z)."""
        return tuple(self.image.shape[1:])  # type: ignore[return-value]


def reorient(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, axcodes: str = "RAS"
             ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Permute / flip voxel axes so that they point along ``axcodes`` (closest match).

    Args:
        image: (C, X, Y, Z); label: (X, Y, Z) or None; affine: (4, 4).

    Returns:
        (image, label, affine) in the new voxel order; no interpolation is done.
    """
    ornt = nio.io_orientation(affine)
    target = nio.axcodes2ornt(tuple(axcodes.upper()))
    tr = nio.ornt_transform(ornt, target)
    if np.array_equal(tr, [[0, 1], [1, 1], [2, 1]]):
        return image, label, affine
    spatial = image.shape[1:]
    new_img = np.stack([nio.apply_orientation(c, tr) for c in image])
    new_lab = None if label is None else nio.apply_orientation(label, tr)
    new_aff = affine @ nio.inv_ornt_aff(tr, spatial)
    return np.ascontiguousarray(new_img), None if new_lab is None else np.ascontiguousarray(new_lab), new_aff


def resample(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray,
             spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Resample to ``spacing`` mm along the voxel axes (trilinear image, nearest label).

    Voxel centres follow ``align_corners=False`` (the volume's extent is kept); the new shape is
    ``round(shape * old_spacing / spacing)`` (at least 1), and the affine is updated to match.

    Args:
        image: (C, X, Y, Z) float32; label: (X, Y, Z) int or None; affine: (4, 4).
    """
    old = np.linalg.norm(affine[:3, :3], axis=0)
    shape = np.array(image.shape[1:])
    new_shape = np.maximum(1, np.round(shape * old / np.asarray(spacing, dtype=np.float64))).astype(int)
    if np.array_equal(new_shape, shape):
        return image, label, affine
    size = tuple(int(s) for s in new_shape)
    with torch.no_grad():
        img = F.interpolate(torch.from_numpy(np.ascontiguousarray(image))[None].float(), size=size,
                            mode="trilinear", align_corners=False)[0].numpy()
        lab = None
        if label is not None:
            lab = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=size,
                                mode="nearest-exact")[0, 0].numpy().astype(label.dtype)
    factor = shape / new_shape  # input voxels per output voxel
    new_aff = affine.copy()
    new_aff[:3, :3] = affine[:3, :3] * factor[None, :]
    new_aff[:3, 3] = affine[:3, :3] @ (0.5 * factor - 0.5) + affine[:3, 3]
    return img, lab, new_aff


def zscore(image: np.ndarray, nonzero: bool = False, eps: float = 1e-8) -> np.ndarray:
    """Per-channel (x - mean) / std over the volume; (C, *spatial) float32 in and out."""
    out = np.empty_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        vals = image[c][image[c] != 0] if nonzero else image[c]
        if vals.size == 0:
            vals = image[c]
        # float64 statistics: float32 overflows for |x| >~ 1e19 and would turn the whole volume into zeros
        mean, std = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
        out[c] = (image[c] - mean) / max(std, eps)
    return out


def preprocess(raw: RawCase, cfg: PreprocessConfig) -> Volume:
    """Apply ``cfg`` to a raw case (see module docstring for the order)."""
    image, label, affine = raw.image, raw.label, raw.affine
    if cfg.orientation is not None:
        image, label, affine = reorient(image, label, affine, cfg.orientation)
    if cfg.spacing is not None:
        image, label, affine = resample(image, label, affine, cfg.spacing)
    image = image.astype(np.float32, copy=False)
    if cfg.ct_window is not None:
        image = np.clip(image, cfg.ct_window[0], cfg.ct_window[1])
    if cfg.zscore:
        check_intensities(image, raw.image_paths[0] if raw.image_paths else raw.case_id)
        image = zscore(image, cfg.zscore_nonzero)
    spacing = tuple(float(v) for v in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(raw.case_id, np.ascontiguousarray(image, dtype=np.float32), label,
                  spacing, affine, str(raw.image_paths[0]))  # type: ignore[arg-type]


class VolumeCache:
    """On-disk cache of pre-processed volumes: one folder per (case, files, config) key.

    Entries are written to a temporary folder and renamed into place, so a crash never leaves a
    half-written entry; a damaged entry is recomputed with a warning.
    """

    def __init__(self, folder: str | Path, mmap: bool = True) -> None:
        self.folder = Path(folder)
        self.mmap = mmap

    @staticmethod
    def key(record: CaseRecord, cfg: PreprocessConfig, allowed: Iterable[int] | None) -> str:
        """Hex digest of the files' identity (path, size, mtime) and every setting that matters."""
        def ident(p: Path) -> list:
            st = p.stat()
            return [str(p.resolve()), st.st_size, st.st_mtime_ns]
        try:
            files = [ident(p) for p in record.images] + ([ident(record.label)] if record.label else [])
        except OSError as e:
            raise DataError(e.filename or record.images[0], f"cannot stat ({e.strerror})") from e
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
        blob = json.dumps([CACHE_VERSION, files, settings, sorted(allowed) if allowed else None],
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def _dir(self, record: CaseRecord, key: str) -> Path:
        return self.folder / f"{record.case_id}-{key}"

    def get(self, record: CaseRecord, key: str) -> Volume | None:
        """The cached volume, or None when absent or unreadable."""
        d = self._dir(record, key)
        if not (d / "meta.json").is_file():
            return None
        try:
            meta = json.loads((d / "meta.json").read_text())
            mode = "r" if self.mmap else None
            image = np.load(d / "image.npy", mmap_mode=mode)
            label = np.load(d / "label.npy", mmap_mode=mode) if meta["has_label"] else None
            return Volume(meta["case_id"], image, label, tuple(meta["spacing"]),
                          np.asarray(meta["affine"]), meta["source"])
        except Exception as e:  # a damaged entry is not fatal: recompute it
            logger.warning("%s: damaged cache entry (%s); recomputing", d, e)
            shutil.rmtree(d, ignore_errors=True)
            return None

    def put(self, record: CaseRecord, key: str, vol: Volume) -> None:
        """Store ``vol`` atomically (temporary folder, then rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.folder))
        try:
            np.save(tmp / "image.npy", np.ascontiguousarray(vol.image))
            if vol.label is not None:
                np.save(tmp / "label.npy", np.ascontiguousarray(vol.label))
            meta = {"case_id": vol.case_id, "spacing": list(vol.spacing), "affine": vol.affine.tolist(),
                    "source": vol.source, "has_label": vol.label is not None}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                os.rename(tmp, self._dir(record, key))
            except OSError:  # another process stored it first
                pass
        except OSError as e:
            from macl.run.folder import DiskFullError, error_message
            if error_message(e):  # a full disk: one line naming the cache folder, nothing half-written kept
                raise DiskFullError(self.folder) from e
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def load_volume(record: CaseRecord, cfg: PreprocessConfig, allowed_labels: Iterable[int] | None = None,
                cache: VolumeCache | None = None) -> Volume:
    """Read, check and pre-process one case, through ``cache`` when given.

    Raises:
        DataError: naming the file and the problem (see :func:`macl.data.loading.load_case`).
    """
    key = None
    if cache is not None:
        key = VolumeCache.key(record, cfg, allowed_labels)
        hit = cache.get(record, key)
        if hit is not None:
            return hit
    raw = load_case(record, require_3d=cfg.require_3d, allowed_labels=allowed_labels,
                    check_finite=cfg.check_finite)
    vol = preprocess(raw, cfg)
    if cache is not None and key is not None:
        cache.put(record, key, vol)
    return vol


def load_volumes(index: DatasetIndex, cfg: PreprocessConfig | None = None, *,
                 cases: Sequence[CaseRecord] | None = None, labelled_only: bool = False,
                 skip_bad: bool = False, progress: Progress | None = None) -> list[Volume]:
    """Load and pre-process the cases of ``index``.

    Args:
        index: the data set; its dataset.json labels (if any) are enforced.
        cfg: pre-processing settings (default :class:`PreprocessConfig`()).
        cases: a subset of ``index.cases`` to load (default all).
        labelled_only: load only cases with a label file.
        skip_bad: log a warning and skip a case that raises DataError instead of raising.
        progress: called as ``progress(done, total, {"case": case_id})`` after each case.

    Returns:
        The volumes, in the order of ``cases``; all have the same number of channels.

    Raises:
        DataError: a bad case (unless ``skip_bad``), channel counts that differ between cases,
            or no readable volume at all.
    """
    cfg = cfg or PreprocessConfig()
    records = list(index.cases if cases is None else cases)
    if labelled_only:
        records = [r for r in records if r.label is not None]
        if not records:
            raise DataError(index.root, "no labelled cases found")
    cache = VolumeCache(cfg.cache_dir) if cfg.cache_dir else None
    out: list[Volume] = []
    skipped = 0
    for i, rec in enumerate(records):
        try:
            vol = load_volume(rec, cfg, index.allowed_label_values, cache)
            if out and vol.image.shape[0] != out[0].image.shape[0]:
                raise DataError(rec.images[0], f"has {vol.image.shape[0]} channel(s), but "
                                               f"{out[0].source} has {out[0].image.shape[0]}")
            out.append(vol)
        except DataError as e:
            if not skip_bad:
                raise
            skipped += 1
            logger.warning("skipping case %s: %s", rec.case_id, e)
        if progress is not None:
            progress(i + 1, len(records), {"case": rec.case_id})
    if not out:
        raise DataError(index.root, f"no readable volumes ({skipped} of {len(records)} skipped)")
    return out
