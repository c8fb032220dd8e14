"""Spatial augmentation of labelled fine-tuning batches with MONAI transforms (``FinetuneConfig.spatial_aug``).

``"none"``: nothing (mirroring is separate: ``mirror``). ``"monai"``: per sample, with probability ``prob``
MONAI ``RandAffined`` — rotation U(-15°, 15°) in the (X, Y) plane (3D: also ±15° about X and Y, as nnU-Net's
default), isotropic scale U(0.85, 1.15) — applied to image (bilinear) and label (nearest) with the same draw,
zeros outside. The draw is seeded by the batch's own generator, so batch ``step`` stays a pure function of
(seed, step) and a resumed run sees the same batches.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SPATIAL_AUG = ("none", "monai")


def check_spatial_aug(value: str) -> str:
    """The setting, or ValueError naming the bad value."""
    if value not in SPATIAL_AUG:
        raise ValueError(f"spatial_aug must be one of {SPATIAL_AUG}, got {value!r}")
    return value


def _plain(x) -> torch.Tensor:
    """A plain tensor from MONAI's MetaTensor (or an array)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def monai_spatial(img: torch.Tensor, lab: torch.Tensor, rng: np.random.Generator, prob: float = 0.5,
                  rotate_deg: float = 15.0, scale: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch sample by sample.

    Args:
        img: float32 (B, C, *spatial); lab: int64 (B, 1, *spatial); rng: the batch's generator.
    Returns:
        (img, lab) of the same shapes and dtypes.
    """
    from monai.transforms import RandAffined
    nd = img.ndim - 2
    rot = math.radians(rotate_deg)
    rotate_range = (rot,) if nd == 2 else (rot, rot, rot)
    tf = RandAffined(keys=("image", "label"), mode=("bilinear", "nearest"), prob=prob, rotate_range=rotate_range,
                     scale_range=(scale,) * nd, padding_mode="zeros", spatial_size=None)
    out_i, out_l = [], []
    for b in range(img.shape[0]):
        tf.set_random_state(seed=int(rng.integers(2**31 - 1)))
        d = tf({"image": img[b], "label": lab[b].float()})
        out_i.append(_plain(d["image"]).float())
        out_l.append(_plain(d["label"]).round().long())
    return torch.stack(out_i), torch.stack(out_l)
