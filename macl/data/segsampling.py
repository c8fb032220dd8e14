"""Labelled training batches for segmentation fine-tuning: 2D slices or 3D patches.

Slices are drawn uniformly over all slices of the labelled volumes (as the public code), patches
uniformly over volumes; with probability ``foreground_prob`` the crop is instead centred on a
random foreground voxel (nnU-Net's oversampling). Augmentation: random mirroring of each spatial
axis, optionally the full spatial transform of :mod:`macl.data.views` (image bilinear, label
nearest, same transform), or MONAI's random affine (``spatial_aug="monai"``, :mod:`macl.data.seg_augment`).
Batch ``step`` is a pure function of (seed, step): resumable.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from macl.data.preprocess import Volume
from macl.data.sampling import crop_start, enumerate_slices, sample_patch_start, window
from macl.data.seg_augment import check_spatial_aug, monai_spatial
from macl.data.views import SpatialViewConfig, apply_spatial, sample_spatial_params


@dataclass
class SegSamplingConfig:
    """Settings of labelled sampling (see module docstring).

    Attributes:
        dims: 2 or 3; patch_size: (X, Y) for 2D, (X, Y, Z) for 3D.
        slice_axis: axis slices are taken along (2D).
        foreground_prob: probability of centring a crop on a foreground voxel.
        mirror: random mirroring of each spatial axis (p = 0.5).
        spatial: optional extra spatial augmentation (None: mirroring only).
        spatial_aug: ``"none"`` or ``"monai"`` (MONAI RandAffined rotation + scale, macl.data.seg_augment).
    """

    dims: int = 2
    patch_size: tuple[int, ...] = (64, 64)
    slice_axis: int = 2
    foreground_prob: float = 0.33
    mirror: bool = True
    spatial: SpatialViewConfig | None = None
    spatial_aug: str = "none"

    def __post_init__(self) -> None:
        self.patch_size = tuple(int(s) for s in self.patch_size)
        if self.dims not in (2, 3) or len(self.patch_size) != self.dims:
            raise ValueError(f"need dims in (2, 3) and {self.dims} patch sizes, got dims={self.dims}, "
                             f"patch_size={self.patch_size}")
        if not 0 <= self.foreground_prob <= 1:
            raise ValueError(f"foreground_prob must be in [0, 1], got {self.foreground_prob}")
        check_spatial_aug(self.spatial_aug)


class SegBatchSampler:
    """Draws (image, label) training batches from labelled volumes.

    Args:
        volumes: pre-processed volumes, each with a label.
        cfg: sampling settings; seed: base seed.

    Raises:
        ValueError: no volumes, or a volume without label (named).
    """

    def __init__(self, volumes: Sequence[Volume], cfg: SegSamplingConfig, seed: int = 0) -> None:
        if not volumes:
            raise ValueError("SegBatchSampler needs at least one labelled volume")
        for v in volumes:
            if v.label is None:
                raise ValueError(f"volume {v.case_id} ({v.source}) has no label")
        self.volumes, self.cfg, self.seed = list(volumes), cfg, int(seed)
        rng = np.random.default_rng([self.seed, 99])
        self.foreground = []
        for v in self.volumes:
            fg = np.argwhere(np.asarray(v.label) > 0)
            if len(fg) > 20000:
                fg = fg[rng.choice(len(fg), 20000, replace=False)]
            self.foreground.append(fg)
        if cfg.dims == 2:
            self.slices = enumerate_slices([v.shape for v in self.volumes], cfg.slice_axis)

    def _one(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        use_fg = rng.uniform() < cfg.foreground_prob
        if cfg.dims == 3:
            vi = int(rng.integers(len(self.volumes)))
            vol = self.volumes[vi]
            start = sample_patch_start(vol.shape, cfg.patch_size, rng, self.foreground[vi] if use_fg else None)
            return window(vol.image, start, cfg.patch_size), window(np.asarray(vol.label), start, cfg.patch_size)
        ax = cfg.slice_axis
        inplane = [a for a in range(3) if a != ax]
        vi = int(rng.integers(len(self.volumes)))
        if use_fg and len(self.foreground[vi]):
            voxel = self.foreground[vi][int(rng.integers(len(self.foreground[vi])))]
            index = int(voxel[ax])
        else:
            ref = self.slices[int(rng.integers(len(self.slices)))]
            vi, index, voxel = ref.volume, ref.index, None
        vol = self.volumes[vi]
        img = np.take(vol.image, index, axis=1 + ax)
        lab = np.take(np.asarray(vol.label), index, axis=ax)
        shape = img.shape[1:]
        if voxel is not None:
            start = sample_patch_start(shape, cfg.patch_size, rng, voxel[inplane][None])
        else:
            start = crop_start(shape, cfg.patch_size, "random", rng)
        return window(img, start, cfg.patch_size), window(lab, start, cfg.patch_size)

    def batch(self, step: int, batch_size: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training batch number ``step``; ``stream`` > 0 draws an independent batch for the same step (rank
        ``stream`` under torchrun).

        Returns:
            image float32 (B, C, *patch_size), label int64 (B, 1, *patch_size).
        """
        rng = np.random.default_rng([self.seed, int(step)] + ([int(stream)] if stream else []))
        pairs = [self._one(rng) for _ in range(batch_size)]
        img = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32))
        lab = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))[:, None]
        nd = self.cfg.dims
        if self.cfg.mirror:
            flips = rng.uniform(size=(batch_size, nd)) < 0.5
            for b in range(batch_size):
                dims = [2 + a for a in range(nd) if flips[b, a]]
                if dims:
                    img[b:b + 1] = img[b:b + 1].flip(dims)
                    lab[b:b + 1] = lab[b:b + 1].flip(dims)
        if self.cfg.spatial is not None:
            g = torch.Generator().manual_seed(int(rng.integers(2**62)))
            params = sample_spatial_params(self.cfg.spatial, batch_size, tuple(img.shape[2:]), g)
            img = apply_spatial(img, params, self.cfg.spatial.mode)
            lab = apply_spatial(lab.float(), params, "nearest").round().long()
        if self.cfg.spatial_aug == "monai":
            img, lab = monai_spatial(img, lab, rng)
        return img, lab
