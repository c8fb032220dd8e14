"""MACL (JCL): multi-level asymmetric contrastive learning, L = λ1·L_g + λ2·L_d + λ3·L_ER.

With the model outputs of `macl.nets.MACLModel` (z3, z4 image projections; p1, p2 pixel maps; a1, b2
bottlenecks), τ the temperature, pos the positional meta-labels, and c = τ/0.07 when the public code's
base-temperature rescale is on (else c = 1):

- L_g  (image level)  = c · PosSupCon([z3, z4], pos; threshold, τ), all 2B projections anchors, self excluded,
                         positives = the other view and every projection whose |Δpos| < threshold.
- L_d  (pixel level), mode "location" (the paper) = c · mean_s PosSupCon([p1[:, :, s], p2[:, :, s]], pos):
                         for every grid location s the 2B features at s form one group; computed by ONE grouped
                         call `dense_info_nce(..., negatives="location")`, no Python loop over s.
       mode "voxel" (beyond the paper) = c · dense InfoNCE of p1 against p2, every voxel against every voxel of
                         the same image (negatives "image") or of the batch ("batch"); positive = the same voxel.
- L_ER (feature level, equivariant regularisation) = mean |resize(a1 → size of b2) − b2| (L1, bilinear /
                         trilinear, align_corners=True).

Defaults: λ1 = 1.0, λ2 = 0.5, λ3 = 1.0, τ = 0.1, threshold 0.1. The logged terms are L_g, L_d, L_ER as above
(c included, λ not); a term whose λ is 0 is not computed.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from macl_kernels import dense_info_nce, positional_sup_con

from ..settings.config import MethodConfig, NetConfig
from ..nets.macl_model import MACLModel, resize
from .base import Batch, EmbeddingProbe, Method, register_method, world_size_of


def global_loss(z_aux: torch.Tensor, z_dom: torch.Tensor, positions: torch.Tensor, cfg: MethodConfig,
                process_group=None) -> torch.Tensor:
    """L_g: positional SupCon over the image projections [z_aux, z_dom] (each (B, D)); positions (B,). Scalar.
    process_group: None, or "world" to contrast against every rank's projections (torchrun)."""
    features = torch.stack([z_aux, z_dom], dim=1)  # (B, 2, D)
    loss = positional_sup_con(features, positions, threshold=cfg.threshold, temperature=cfg.temperature,
                              impl=cfg.impl, process_group=process_group)
    return loss * cfg.contrast_scale


def dense_loss(p_aux: torch.Tensor, p_dom: torch.Tensor, positions: torch.Tensor, cfg: MethodConfig,
               process_group=None) -> torch.Tensor:
    """L_d over aligned pixel maps p_aux, p_dom (B, C, *S'); positions (B,). Scalar. See the module docstring.
    process_group: None, or "world" (torchrun): "location" and "voxel" with negatives "batch" then take their
    keys from every rank's images; "image" keeps each image's keys to itself."""
    if p_aux.shape != p_dom.shape:
        raise ValueError(f"L_d needs aligned pixel maps, got {tuple(p_aux.shape)} and {tuple(p_dom.shape)}")
    if cfg.dense_mode == "location":
        loss = dense_info_nce(p_aux, p_dom, negatives="location", temperature=cfg.temperature,
                              positions=positions, threshold=cfg.threshold, impl=cfg.impl,
                              process_group=process_group)
    elif cfg.dense_mode == "voxel":
        loss = dense_info_nce(p_aux, p_dom, negatives=cfg.dense_negatives, temperature=cfg.temperature,
                              symmetric=cfg.dense_symmetric, impl=cfg.impl, process_group=process_group)
    else:
        raise ValueError(f"dense_mode must be location|voxel, got {cfg.dense_mode!r}")
    return loss * cfg.contrast_scale


def dense_probe(p_aux: torch.Tensor, p_dom: torch.Tensor, cfg: MethodConfig, world: int = 1,
                max_groups: int = 64) -> EmbeddingProbe:
    """L_d's `EmbeddingProbe` from the pixel maps (B, C, *S'), L = prod(S') locations.

    "location": G ≤ max_groups evenly spaced locations, each (2B, C), 2B·world − 1 keys per anchor.
    "voxel": keys per anchor L ("image") or B·L·world ("batch"); rows = up to max_groups images' 2L voxels.
    """
    a, d = p_aux.detach(), p_dom.detach()
    B, C = a.shape[:2]
    L = a[0, 0].numel()
    if cfg.dense_mode == "location":
        keys = 2 * B * world - 1
        step = max(1, L // max_groups)

        def rows() -> torch.Tensor:
            both = torch.cat([a.flatten(2)[:, :, ::step], d.flatten(2)[:, :, ::step]])  # (2B, C, G)
            return both.permute(2, 0, 1)
    else:
        keys = L if cfg.dense_negatives == "image" else B * L * world

        def rows() -> torch.Tensor:
            both = torch.cat([a.flatten(2), d.flatten(2)], dim=2)[:max_groups]  # (B', C, 2L)
            return both.transpose(1, 2)
    return EmbeddingProbe(rows, keys, cfg.contrast_scale)


def equivariance_loss(aux_bottleneck: torch.Tensor, dom_bottleneck: torch.Tensor) -> torch.Tensor:
    """L_ER = L1(resize(aux_bottleneck, dom_bottleneck's size), dom_bottleneck), mean over all elements.

    aux_bottleneck (B, C, *S/2^d) from the full-resolution img1, dom_bottleneck (B, C, *s·S/2^d) from ↓s img2.
    """
    small = resize(aux_bottleneck, dom_bottleneck.shape[2:])
    return F.l1_loss(small.float(), dom_bottleneck.float())


@register_method("macl")
class MACL(Method):
    """MACL on `MACLModel`: forward(batch) → {"L_g", "L_d", "L_ER"} (terms whose λ is 0 are skipped)."""

    required_views = ("img1", "img2", "img3", "img4")

    def __init__(self, net: NetConfig, cfg: MethodConfig, model=None):
        super().__init__(net, cfg)
        # model: a `macl.nets.adapters.TappedMACLModel` around the user's encoder–decoder (same outputs)
        self.model = model if model is not None else MACLModel(
            net, decoder_blocks=cfg.decoder_blocks, dominant_scale=cfg.dominant_scale, proj_dim=cfg.proj_dim or 128,
            dominant_image_source=cfg.dominant_image_source, head_norm=cfg.image_head_norm)
        self.weights = {"L_g": cfg.lambda_g, "L_d": cfg.lambda_d, "L_ER": cfg.lambda_er}
        if cfg.lambda_g == 0:
            self.required_views = ("img1", "img2")

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self.check_batch(batch)
        pos = self.positions(batch)
        want_g = self.cfg.lambda_g != 0
        out = self.model(batch.img1, batch.img2, batch.img3 if want_g else None, batch.img4 if want_g else None)
        terms: Dict[str, torch.Tensor] = {}
        if want_g:
            terms["L_g"] = global_loss(out.aux_image, out.dom_image, pos, self.cfg, self.process_group)
            self.probe_pair("L_g", out.aux_image, out.dom_image)
        if self.cfg.lambda_d != 0:
            terms["L_d"] = dense_loss(out.aux_pixel, out.dom_pixel, pos, self.cfg, self.process_group)
            self.probes["L_d"] = dense_probe(out.aux_pixel, out.dom_pixel, self.cfg, world_size_of(self.process_group))
        if self.cfg.lambda_er != 0:
            terms["L_ER"] = equivariance_loss(out.aux_bottleneck, out.dom_bottleneck)
        return terms
