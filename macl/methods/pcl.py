"""PCL (Zeng et al., MICCAI 2021): positional contrastive learning on the encoder only.

Network: `EncoderProjector` (encoder + GAP → Linear(2^d·F, 2^d·F) → ReLU → Linear(2^d·F, 2^d·F); 512 for F = 32).
Loss: L_g = c · PosSupCon([z3, z4], pos; threshold, τ) with z3, z4 the projections of the two spatially
augmented views img3, img4 (B, D); positives = the other view and every view whose |Δpos| < threshold;
c = τ/0.07 when the base-temperature rescale is on. Computed by `macl_kernels.positional_sup_con`.
"""
from __future__ import annotations

from typing import Dict

import torch

from macl_kernels import positional_sup_con

from ..settings.config import MethodConfig, NetConfig
from ..nets.macl_model import EncoderProjector
from .base import Batch, Method, register_method


@register_method("pcl")
class PCL(Method):
    """PCL: forward(batch) → {"L_g"} from batch.img3, batch.img4 and the positions."""

    required_views = ("img3", "img4")

    def __init__(self, net: NetConfig, cfg: MethodConfig, model=None):
        super().__init__(net, cfg)
        # model: a `macl.nets.adapters.TappedEncoderProjector` (the user's network to its bottleneck tap)
        self.model = model if model is not None else EncoderProjector(net, proj_dim=cfg.proj_dim)
        self.weights = {"L_g": 1.0}

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self.check_batch(batch)
        features = torch.stack([self.model(batch.img3), self.model(batch.img4)], dim=1)  # (B, 2, D)
        self.probe_pair("L_g", features[:, 0], features[:, 1])
        loss = positional_sup_con(features, self.positions(batch), threshold=self.cfg.threshold,
                                  temperature=self.cfg.temperature, impl=self.cfg.impl,
                                  process_group=self.process_group)
        return {"L_g": loss * self.cfg.contrast_scale}
