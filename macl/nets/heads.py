"""Projection heads of MACL / PCL / SimCLR.

- `PixelHead` (MACL auxiliary pixel head g_p^a): 2×[Conv3, Norm, LeakyReLU], (B, C_in, *S) → (B, C_out, *S).
  Public code: 512 → 128 → 128 on the 32×32 auxiliary bottleneck of a 512² slice.
- `ImageHead` (image-level projection g_g): global average pool → Linear → ReLU → Linear,
  (B, C_in, *S) → (B, out). MACL: auxiliary 512 → 128 → 128, dominant 128 → 128 → 128; PCL: 512 → 512 → 512.
"""
from __future__ import annotations

import torch
from torch import nn

from .unet import ConvNormAct


class PixelHead(nn.Sequential):
    """2×[Conv3, Norm, LeakyReLU(0.01)]: (B, in_channels, *S) → (B, out_channels, *S)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__(ConvNormAct(dims, in_channels, out_channels, norm),
                         ConvNormAct(dims, out_channels, out_channels, norm))


class ImageHead(nn.Module):
    """GAP → Linear(in, hidden) [→ BatchNorm1d(hidden)] → ReLU → Linear(hidden, out): (B, in_channels, *S) → (B, out).

    norm: "none" (the public code) or "batch" (BatchNorm1d after the first layer, as the heads of SimCLR v2 and
    MoCo v3: it removes the component every input shares, which at initialisation dominates the pooled ReLU
    bottleneck and lets L_g collapse; see docs/macl_presets.md). "none" keeps the public code's tensor names.
    """

    def __init__(self, in_channels: int, hidden: int, out: int, norm: str = "none"):
        super().__init__()
        if norm not in ("none", "batch"):
            raise ValueError(f"image head norm must be 'none' or 'batch', got {norm!r}")
        self.fc1 = nn.Linear(in_channels, hidden)
        if norm == "batch":
            self.norm = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.flatten(2).mean(-1)  # global average pool over every spatial axis: (B, C)
        h = self.fc1(pooled)
        if hasattr(self, "norm"):
            h = self.norm(h)
        return self.fc2(self.act(h))
