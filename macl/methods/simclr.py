"""SimCLR baseline: the PCL network with identity positives only.

Loss: L_g = c · NT-Xent(z3, z4; τ), z3, z4 (B, D) the projections of img3, img4; each of the 2B projections
is an anchor whose only positive is the other view of the same sample, denominator = the other 2B − 1
(c = τ/0.07 when the base-temperature rescale is on, as the public code's SupConLoss without labels).
Computed by `macl_kernels.nt_xent`. Positions are ignored.
"""
from __future__ import annotations

from typing import Dict

import torch

from macl_kernels import nt_xent

from ..settings.config import MethodConfig, NetConfig
from ..nets.macl_model import EncoderProjector
from .base import Batch, Method, register_method


@register_method("simclr")
class SimCLR(Method):
    """SimCLR: forward(batch) → {"L_g"} from batch.img3, batch.img4."""

    required_views = ("img3", "img4")

    def __init__(self, net: NetConfig, cfg: MethodConfig, model=None):
        super().__init__(net, cfg)
        # model: a `macl.nets.adapters.TappedEncoderProjector` (the user's network to its bottleneck tap)
        self.model = model if model is not None else EncoderProjector(net, proj_dim=cfg.proj_dim)
        self.weights = {"L_g": 1.0}

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self.check_batch(batch)
        z3, z4 = self.model(batch.img3), self.model(batch.img4)
        self.probe_pair("L_g", z3, z4)
        loss = nt_xent(z3, z4, temperature=self.cfg.temperature, impl=self.cfg.impl, process_group=self.process_group)
        return {"L_g": loss * self.cfg.contrast_scale}
