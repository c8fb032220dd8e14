"""The strong augmentation of ARCO's unlabelled branch: CutMix, then intensity jitter and Gaussian blur.

All functions take a `torch.Generator` and are pure functions of it (exact resume), 2D (B, C, H, W) or
3D (B, C, D, H, W).

- `cutmix`: as the public code (ReCo's `generate_unsup_data(mode="cutmix")`): image b keeps its content
  outside a random box and receives image (b+1) mod B inside it, the box covering half of the image; the same
  box mixes the pseudo-labels and the teacher confidences.
- `strong_intensity`: per image, with probability p_jitter a brightness factor U(0.75, 1.25) and a contrast
  factor U(0.75, 1.25) about the image mean (the grey-level part of the public colour jitter); with
  probability p_blur a Gaussian blur, σ ~ U(0.15, 1.15) voxels, kernel radius ⌈3σ⌉, separable, replicate padding.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def cutmix_boxes(batch: int, spatial: Tuple[int, ...], g: torch.Generator, area: float = 0.5) -> torch.Tensor:
    """(B, *S) bool: True inside each image's box (covering `area` of the image, random aspect and place)."""
    masks = torch.zeros((batch,) + tuple(spatial), dtype=torch.bool)
    for b in range(batch):
        # side lengths: the first axes uniform in [size·area, size], the last fills the requested volume
        sides = []
        remaining = area
        for s in spatial[:-1]:
            frac = _uniform(g, remaining, 1.0)
            sides.append(max(1, min(s, round(frac * s))))
            remaining = remaining / frac
        sides.append(max(1, min(spatial[-1], round(min(1.0, remaining) * spatial[-1]))))
        box = tuple(slice(lo, lo + side) for lo, side in
                    ((int(torch.randint(0, s - side + 1, (), generator=g)), side) for s, side in zip(spatial, sides)))
        masks[(b,) + box] = True
    return masks


def cutmix(images: torch.Tensor, labels: torch.Tensor, confidence: torch.Tensor, g: torch.Generator,
           area: float = 0.5):
    """Mix every image with the next one of the batch inside a random box (module docstring).

    images (B, C, *S); labels, confidence (B, *S). Returns the mixed (images, labels, confidence).
    A batch of one image is returned unchanged.
    """
    B = images.shape[0]
    if B < 2:
        return images, labels, confidence
    box = cutmix_boxes(B, tuple(images.shape[2:]), g, area).to(images.device)
    nxt = torch.roll(torch.arange(B, device=images.device), -1)
    img = torch.where(box[:, None], images[nxt], images)
    return img, torch.where(box, labels[nxt], labels), torch.where(box, confidence[nxt], confidence)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, C, *S) over every spatial axis (replicate padding; radius ⌈3σ⌉)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    nd = x.dim() - 2
    C = x.shape[1]
    conv = F.conv2d if nd == 2 else F.conv3d
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = k.numel()
        w = k.reshape(1, 1, *shape).repeat(C, 1, *([1] * nd))
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = r
        x = conv(F.pad(x, pad, mode="replicate"), w, groups=C)
    return x


def strong_intensity(images: torch.Tensor, g: torch.Generator, p_jitter: float = 0.5, p_blur: float = 0.5,
                     sigma: Tuple[float, float] = (0.15, 1.15)) -> torch.Tensor:
    """Brightness/contrast jitter and Gaussian blur per image (module docstring). (B, C, *S) → same shape."""
    out = []
    for b in range(images.shape[0]):
        x = images[b:b + 1]
        if float(torch.rand((), generator=g)) < p_jitter:
            bright, contrast = _uniform(g, 0.75, 1.25), _uniform(g, 0.75, 1.25)
            mean = x.mean()
            x = (x - mean) * contrast + mean * bright
        if float(torch.rand((), generator=g)) < p_blur:
            x = gaussian_blur(x, _uniform(g, *sigma))
        out.append(x)
    return torch.cat(out)
