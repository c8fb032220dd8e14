"""ARCO's segmentation network: the fine-tuning `UNet` plus a pixel representation head.

forward(x) → (logits (B, K, *S), rep (B, rep_dim, *S)). The representation fuses every decoder block's output:
each is resized to full resolution (bilinear / trilinear, align_corners=False) and concatenated (2^(depth−1)F +
… + F channels, as the public 2D code's multi-scale feature extractor), then Conv1×1 → ReLU → Conv1×1.
Parameter names: unet.encoder.*, unet.decoder.*, unet.head.* (the `UNet` itself: `net.unet.state_dict()` loads
into a fine-tuning `UNet` as it is) and rep_head.*.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..settings.config import NetConfig
from ..nets.unet import UNet, conv_cls, he_init


class ArcoNet(nn.Module):
    """UNet + representation head (module docstring). in (B, C, *S) → (logits, rep)."""

    def __init__(self, net: NetConfig, num_classes: int, rep_dim: int = 64):
        super().__init__()
        if int(rep_dim) < 1:
            raise ValueError(f"rep_dim must be >= 1, got {rep_dim!r}")
        self.net_config, self.num_classes, self.rep_dim = net, int(num_classes), int(rep_dim)
        self.unet = UNet(net, num_classes)
        fused = sum(net.base_width * 2 ** (net.depth - 1 - j) for j in range(net.depth))
        conv = conv_cls(net.dims)
        self.rep_head = nn.Sequential(conv(fused, self.rep_dim, 1), nn.ReLU(inplace=True),
                                      conv(self.rep_dim, self.rep_dim, 1))
        self.rep_head.apply(he_init)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        bottleneck, skips = self.unet.encoder(x)
        outs = self.unet.decoder(bottleneck, skips)
        logits = self.unet.head(outs[-1])
        size = outs[-1].shape[2:]
        mode = "bilinear" if x.dim() == 4 else "trilinear"
        fused = torch.cat([o if o.shape[2:] == size else F.interpolate(o, size=size, mode=mode, align_corners=False)
                           for o in outs], dim=1)
        return logits, self.rep_head(fused)
