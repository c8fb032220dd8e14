"""Procedural 3D phantoms for the demo and the tests: MR-like abdomen-ish volumes with labels.

Each subject (deterministic given ``seed`` and its index) has a body (elliptic cylinder with a
varying outline) holding four labelled structures whose shape, size, position and contrast vary
per subject:

====  ========  =====================================================================
1     organ     large lobulated ellipsoid, one side, upper half of the volume
2     kidneys   a pair of small ellipsoids, posterior, lower half
3     vessel    a tube running along Z with a wavy centre line
4     spine     posterior midline column with a vertebra-like periodic radius
====  ========  =====================================================================

plus per-tissue texture, a smooth multiplicative bias field, Rician noise and a random global
gain / offset. Written as NIfTI in the MSD / nnU-Net layout (``dataset.json``, ``imagesTr``,
``labelsTr``) so the ordinary readers load them. Positions of structures depend on Z, so slice
position carries anatomical meaning as in real scans.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from macl.extras import import_module

nib = import_module("nibabel", "medical", "writing NIfTI")

logger = logging.getLogger(__name__)

CLASS_NAMES = {0: "background", 1: "organ", 2: "kidneys", 3: "vessel", 4: "spine"}
# mean contrast above body tissue, per class and channel (channel 1 is a "T2-like" second contrast)
_CONTRAST = {1: (0.5, -0.3), 2: (1.0, 0.9), 3: (1.4, 1.2), 4: (1.8, -0.6)}


@dataclass
class PhantomConfig:
    """Settings of the phantom data set.

    Attributes:
        n_subjects: number of cases.
        shape: (X, Y, Z) voxels; spacing: mm per voxel.
        n_channels: 1 or 2 image channels (the second has different contrasts).
        seed: everything is a function of (seed, subject index).
        noise: Rician noise std, relative to body tissue intensity.
        bias: amplitude of the log bias field.
        texture: amplitude of per-tissue texture.
        contrast_jitter: relative per-subject variation of each structure's contrast.
        layout: ``"nnunet"`` (one ``_0000`` file per channel, nnU-Net v2 dataset.json) or
            ``"msd"`` (one 4D file per case when multi-channel, Decathlon dataset.json).
        prefix: case id prefix.
    """

    n_subjects: int = 12
    shape: tuple[int, int, int] = (64, 64, 32)
    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)
    n_channels: int = 1
    seed: int = 0
    noise: float = 0.08
    bias: float = 0.25
    texture: float = 0.08
    contrast_jitter: float = 0.3
    layout: str = "nnunet"
    prefix: str = "phantom"

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)  # type: ignore[assignment]
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        if self.n_subjects < 1:
            raise ValueError(f"n_subjects must be >= 1, got {self.n_subjects}")
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(f"shape must be 3 sizes >= 8, got {self.shape}")
        if self.n_channels not in (1, 2):
            raise ValueError(f"n_channels must be 1 or 2, got {self.n_channels}")
        if self.layout not in ("nnunet", "msd"):
            raise ValueError(f"layout must be 'nnunet' or 'msd', got {self.layout!r}")


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cell: int) -> np.ndarray:
    """Zero-mean, roughly unit-std smooth noise: coarse Gaussian noise upsampled (trilinear)."""
    coarse = tuple(max(2, int(math.ceil(n / cell)) + 1) for n in shape)
    z = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    up = F.interpolate(z, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return (up - up.mean()) / (up.std() + 1e-6)


def _ellipsoid(coords: np.ndarray, centre, radii, angle: float) -> np.ndarray:
    """Implicit ellipsoid value sum((R (x - c) / r)^2); coords (3, X, Y, Z) in mm."""
    d = coords - np.asarray(centre, dtype=np.float32).reshape(3, 1, 1, 1)
    ca, sa = math.cos(angle), math.sin(angle)
    u, v = ca * d[0] + sa * d[1], -sa * d[0] + ca * d[1]
    return (u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (d[2] / radii[2]) ** 2


def generate_subject(cfg: PhantomConfig, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One phantom subject.

    Returns:
        image float32 (C, X, Y, Z) (arbitrary MR-like units), label uint8 (X, Y, Z) in 0..4.
    """
    rng = np.random.default_rng([cfg.seed, index])
    shape = cfg.shape
    sp = np.asarray(cfg.spacing, dtype=np.float32)
    ext = (np.asarray(shape, dtype=np.float32) - 1) * sp  # mm extent
    axes = [np.linspace(-e / 2, e / 2, n, dtype=np.float32) for e, n in zip(ext, shape)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z) mm, centred
    hx, hy, hz = ext / 2
    zn = coords[2] / max(hz, 1e-6)  # -1 (inferior) .. 1 (superior)
    label = np.zeros(shape, dtype=np.uint8)

    # body: elliptic cylinder whose radii vary smoothly along Z
    a = hx * rng.uniform(0.78, 0.92) * (1 + 0.06 * np.sin(math.pi * zn * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3)))
    b = hy * rng.uniform(0.62, 0.78) * (1 + 0.05 * np.cos(math.pi * zn * rng.uniform(0.5, 1.5)))
    body = (coords[0] / a) ** 2 + (coords[1] / b) ** 2 + 0.08 * _smooth_field(rng, shape, 16) < 1
    a0, b0 = hx * 0.85, hy * 0.7

    # 1 organ: lobulated ellipsoid on one side, upper half
    side = rng.choice([-1.0, 1.0]) if rng.uniform() < 0.15 else -1.0
    c1 = (side * a0 * rng.uniform(0.25, 0.45), b0 * rng.uniform(-0.05, 0.3), hz * rng.uniform(0.1, 0.45))
    r1 = (a0 * rng.uniform(0.35, 0.55), b0 * rng.uniform(0.4, 0.6), hz * rng.uniform(0.35, 0.6))
    f1 = _ellipsoid(coords, c1, r1, rng.uniform(-0.6, 0.6)) + 0.35 * _smooth_field(rng, shape, 10)
    label[(f1 < 1) & body] = 1

    # 2 kidneys: a pair, posterior, lower half
    zk = hz * rng.uniform(-0.45, -0.1)
    for s in (-1.0, 1.0):
        ck = (s * a0 * rng.uniform(0.45, 0.6), -b0 * rng.uniform(0.3, 0.5), zk + hz * rng.uniform(-0.1, 0.1))
        rk = (a0 * rng.uniform(0.15, 0.22), b0 * rng.uniform(0.18, 0.28), hz * rng.uniform(0.3, 0.45))
        fk = _ellipsoid(coords, ck, rk, s * rng.uniform(0.2, 0.6))
        label[(fk < 1) & body] = 2

    # 3 vessel: tube along Z with a wavy centre line
    xv = a0 * rng.uniform(-0.05, 0.2) + a0 * rng.uniform(0.03, 0.1) * np.sin(
        math.pi * zn * rng.uniform(0.5, 1.5) + rng.uniform(0, 6.3))
    yv = -b0 * rng.uniform(0.05, 0.25)
    rv = min(hx, hy) * rng.uniform(0.09, 0.13)
    label[((coords[0] - xv) ** 2 + (coords[1] - yv) ** 2 < rv ** 2) & body] = 3

    # 4 spine: posterior midline column, radius modulated like vertebrae
    ys = -b0 * rng.uniform(0.72, 0.82)
    period = rng.uniform(0.35, 0.55)
    rs = min(hx, hy) * rng.uniform(0.1, 0.14) * (1 + 0.15 * np.cos(2 * math.pi * zn / period + rng.uniform(0, 6.3)))
    label[((coords[0]) ** 2 + (coords[1] - ys) ** 2 < rs ** 2) & body] = 4

    images = []
    tex_fine = _smooth_field(rng, shape, 3)
    tex_coarse = _smooth_field(rng, shape, 6)
    log_bias = _smooth_field(rng, shape, max(shape))  # very smooth
    for ch in range(cfg.n_channels):
        img = np.where(body, 1.0, 0.0).astype(np.float32)
        img += body * cfg.texture * tex_coarse
        for k, contrast in _CONTRAST.items():
            c = contrast[ch] * (1 + cfg.contrast_jitter * rng.uniform(-1, 1))
            tex = tex_fine if k in (1, 2) else tex_coarse
            img += (label == k) * (c + 0.5 * cfg.texture * tex)
        img = np.clip(img, 0, None) * np.exp(cfg.bias * log_bias)
        n1 = rng.standard_normal(shape).astype(np.float32) * cfg.noise
        n2 = rng.standard_normal(shape).astype(np.float32) * cfg.noise
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)  # Rician magnitude
        gain, offset = rng.uniform(300, 700), rng.uniform(0, 50)
        images.append((img * gain + offset).astype(np.float32))
    return np.stack(images), label


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def write_phantom_dataset(out_dir: str | Path, cfg: PhantomConfig | None = None,
                          progress: Callable[[int, int, dict], None] | None = None) -> Path:
    """Generate ``cfg.n_subjects`` phantoms into ``out_dir`` in the MSD / nnU-Net layout.

    ``dataset.json`` is written last (atomically) and records the config: if it already holds the
    same config the existing data set is reused and nothing is regenerated.

    Args:
        out_dir: target folder (created).
        cfg: phantom settings (default :class:`PhantomConfig`()).
        progress: called as ``progress(done, total, {"case": case_id})``.

    Returns:
        ``out_dir`` as a Path (open it with :func:`macl.data.readers.open_dataset`).
    """
    cfg = cfg or PhantomConfig()
    root = Path(out_dir)
    meta_path = root / "dataset.json"
    settings = dataclasses.asdict(cfg)
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as stored
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("phantom_config") == settings:
                logger.info("%s: phantom data set already present, reusing it", root)
                return root
        except (OSError, json.JSONDecodeError):
            pass
        meta_path.unlink()
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(cfg.spacing) + [1.0])
    affine[:3, 3] = -(np.asarray(cfg.shape) - 1) * np.asarray(cfg.spacing) / 2
    training = []
    for i in range(cfg.n_subjects):
        cid = f"{cfg.prefix}_{i:03d}"
        image, label = generate_subject(cfg, i)
        if cfg.layout == "nnunet":
            for ch in range(cfg.n_channels):
                nib.save(nib.Nifti1Image(image[ch], affine), str(root / "imagesTr" / f"{cid}_{ch:04d}.nii.gz"))
        else:
            data = image[0] if cfg.n_channels == 1 else np.moveaxis(image, 0, -1)
            nib.save(nib.Nifti1Image(data, affine), str(root / "imagesTr" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / f"{cid}.nii.gz"))
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        if progress is not None:
            progress(i + 1, cfg.n_subjects, {"case": cid})
    channels = {str(c): ("MR" if c == 0 else "T2") for c in range(cfg.n_channels)}
    if cfg.layout == "nnunet":
        meta = {"channel_names": channels, "labels": {v: k for k, v in CLASS_NAMES.items()},
                "numTraining": cfg.n_subjects, "file_ending": ".nii.gz"}
    else:
        meta = {"name": "MACL phantom", "modality": channels, "tensorImageSize": "4D" if cfg.n_channels > 1 else "3D",
                "labels": {str(k): v for k, v in CLASS_NAMES.items()}, "numTraining": cfg.n_subjects,
                "numTest": 0, "training": training, "test": []}
    meta["description"] = "procedural phantom generated by macl.data.phantom"
    meta["phantom_config"] = settings
    _atomic_write_json(meta_path, meta)
    return root
