"""GCL-style pre-training: meta-label contrast on an image head and a pixel head, with the Gradient
Mitigator and the Gradient Filter.

GCL (Wu et al., "Gradient-Guided Contrastive Learning for Medical Image Segmentation with Multi-Perspective
Meta Labels", ACM MM 2023) has no public code; only its abstract and figure caption are known. This module is
the package's documented interpretation ("GCL-style"), see docs/gcl.md:

Network (`GCLModel`): the shared U-Net encoder E; the image head g_g = GAP → Linear → ReLU → Linear on the
bottleneck; the pixel head g_p = 2×[Conv3, Norm, LeakyReLU] on the output of the first k decoder blocks D_k
(k = `decoder_blocks`, so the pixel map has resolution S/2^(depth−k)).

Meta-labels (`MethodConfig.meta_labels`): "position" (the slice/patch position of `Batch.positions`), "volume"
and any per-volume CSV attribute (columns of `Batch.meta`, in the order of `meta_labels` without "position").

Losses, one per meta-label m and branch (c = τ/0.07 when the base-temperature rescale is on, as MACL):
- image branch, L_img_m = c · SupCon over the 2B projections [g_g(E(img3)), g_g(E(img4))] (self excluded):
  positives = the other view and every projection whose meta-label agrees: |Δpos| < threshold for
  "position" (`positional_sup_con`), equality for categorical labels (`sup_con`).
- pixel branch, L_pix_m = c · filtered SupCon over the pixel features of the two voxel-aligned views
  [g_p(D_k(E(img1))), g_p(D_k(E(img2)))] (L locations per image, self excluded): positives of pixel (b, s) are
  the pixels (b', s) at the SAME location s of every image b' whose meta-label agrees (its own other view
  included); for "position" agreement means the same position bin ⌊pos/threshold⌋ (a label, exact, where the
  image branch uses the radius rule). Anchors and keys are sampled per meta-label bin (`gcl_pixel_anchors` ⊆
  `gcl_pixel_keys` locations per image, both views; `gcl_sampling.py`), which keeps every positive of a sampled
  anchor; "all" contrasts every pixel with every pixel. Negatives: every other key row. The Gradient Filter
  (`macl_kernels.filter.filtered.filtered_info_nce`) keeps, per anchor, all positives and the fraction ρ = `gcl_rho`
  of the negatives with the largest gradient magnitude |P_ij − Y_ij| (the hardest ones); ρ = 1 is plain SupCon.
- Gradient Mitigator (`gcl_mitigator`): the T per-label losses of a branch read T copies of the branch's
  features (the image projections (B, 2, D); the pixel maps (2B, C, *S')); the encoder (and decoder) below
  receive the PCGrad combination of the T per-label gradients (`gcl_mitigator.py`); the heads' own
  parameters sum their per-label gradients as usual.
Total: L = λ1·Σ_m L_img_m + λ2·Σ_m L_pix_m (λ1 = lambda_g, λ2 = lambda_d). Every term is logged.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from macl_kernels import positional_sup_con, sup_con
from macl_kernels.filter.filtered import filtered_info_nce

from ..settings.config import MethodConfig, NetConfig
from ..nets.heads import ImageHead, PixelHead
from ..nets.unet import UNetDecoder, UNetEncoder, he_init
from .base import Batch, Method, register_method
from .gcl_mitigator import mitigate
from .gcl_sampling import ALL, pixel_rows

POSITION = "position"


class GCLModel(nn.Module):
    """E + D_k + image head + pixel head (see the module docstring).

    image(x): (B, C, *S) → (B, proj_dim).  pixel(x): (B, C, *S) → (B, pixel_dim, *S/2^(depth−k)).
    """

    def __init__(self, net: NetConfig, decoder_blocks: int = 2, proj_dim: int = 128,
                 pixel_dim: Optional[int] = None):
        super().__init__()
        k = int(decoder_blocks)
        if not 1 <= k <= net.depth:
            raise ValueError(f"decoder_blocks must be in [1, depth={net.depth}], got {decoder_blocks!r}")
        self.net_config, self.decoder_blocks, self.proj_dim = net, k, int(proj_dim)
        width = net.base_width
        bottleneck = width * 2 ** net.depth
        dec_out = width * 2 ** (net.depth - k)
        self.pixel_dim = int(pixel_dim or dec_out)
        self.encoder = UNetEncoder(net.dims, net.in_channels, width, net.depth, net.norm)
        self.decoder = UNetDecoder(net.dims, width, net.depth, net.norm, num_blocks=k)
        self.image_head = ImageHead(bottleneck, dec_out, self.proj_dim)
        self.pixel_head = PixelHead(net.dims, dec_out, self.pixel_dim, net.norm)
        self.apply(he_init)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.encoder(x)[0])

    def pixel(self, x: torch.Tensor) -> torch.Tensor:
        b, skips = self.encoder(x)
        return self.pixel_head(self.decoder(b, skips)[-1])

    def pretrained_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder and decoder tensors under the fine-tuning `UNet`'s names (encoder.*, decoder.*)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k.startswith(("encoder.", "decoder."))}

    def describe(self) -> dict:
        """A JSON description of the architecture (stored in checkpoints)."""
        return {"model": "GCLModel", "net": dataclasses.asdict(self.net_config),
                "decoder_blocks": self.decoder_blocks, "proj_dim": self.proj_dim, "pixel_dim": self.pixel_dim}


def meta_values(batch: Batch, names: Tuple[str, ...], positions: torch.Tensor) -> List[torch.Tensor]:
    """One (B,) tensor per meta-label name: the positions for "position", else the next column of batch.meta.

    Raises ValueError when batch.meta is missing or has the wrong number of columns (names listed).
    """
    others = [n for n in names if n != POSITION]
    if others:
        meta = batch.meta
        if meta is None or meta.dim() != 2 or meta.shape != (batch.size, len(others)):
            got = None if meta is None else tuple(meta.shape)
            raise ValueError(f"meta-labels {others} need batch.meta of shape ({batch.size}, {len(others)}), got {got}; "
                             f"build the batches with macl.data.metalabels.MetaLabelDataset")
    out, col = [], 0
    for n in names:
        if n == POSITION:
            out.append(positions)
        else:
            out.append(batch.meta[:, col])
            col += 1
    return out


def pixel_labels(groups: torch.Tensor, locations: int, views: int = 2) -> torch.Tensor:
    """Labels of the views·B·L pixel rows (view-major, then image, then location): s + L·rank(group_b).

    groups (B,) int64 category per image. Two pixels share a label iff same location and same category.
    """
    _, codes = torch.unique(groups, return_inverse=True)
    s = torch.arange(locations, device=groups.device)
    lab = codes[:, None] * locations + s[None, :]          # (B, L)
    return lab.reshape(-1).repeat(views)


def pixel_loss(maps: torch.Tensor, groups: torch.Tensor, cfg: MethodConfig,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Filtered pixel SupCon (see the module docstring). maps (2B, C, *S') = [view 1 | view 2]; groups (B,) int64.

    With cfg.gcl_pixel_anchors / gcl_pixel_keys = "all" every pixel is an anchor and a key (the exact
    formula); with counts, `gcl_sampling.pixel_rows` draws per meta-label bin (anchors ⊆ keys, both views).
    """
    if cfg.gcl_pixel_anchors != ALL or cfg.gcl_pixel_keys != ALL:
        r = pixel_rows(maps, groups, cfg.gcl_pixel_anchors, cfg.gcl_pixel_keys, cfg.gcl_pixel_sampler,
                       generator=generator)
        res = filtered_info_nce(r.q, r.k, rho=float(cfg.gcl_rho), temperature=cfg.temperature,
                                q_labels=r.q_labels, k_labels=r.k_labels, exclude_self=True)
        return res.loss * cfg.contrast_scale
    n2, C = maps.shape[:2]
    L = maps[0, 0].numel()
    rows = F.normalize(maps.reshape(n2, C, L).transpose(1, 2).reshape(n2 * L, C), dim=1)
    labels = pixel_labels(groups, L, views=n2 // groups.shape[0])
    res = filtered_info_nce(rows, rho=float(cfg.gcl_rho), temperature=cfg.temperature, q_labels=labels,
                            exclude_self=True)
    return res.loss * cfg.contrast_scale


@register_method("gcl")
class GCL(Method):
    """GCL-style: forward(batch) → {"L_img_<label>", "L_pix_<label>"} for every meta-label (module docstring)."""

    required_views = ("img1", "img2", "img3", "img4")

    def __init__(self, net: NetConfig, cfg: MethodConfig, model=None):
        super().__init__(net, cfg)
        # model: a `macl.nets.adapters.TappedGCLModel` around the user's encoder–decoder (same interface)
        self.model = model if model is not None else GCLModel(net, decoder_blocks=cfg.decoder_blocks,
                                                              proj_dim=cfg.proj_dim or 128, pixel_dim=cfg.pixel_dim)
        self.labels = tuple(cfg.meta_labels)
        self.weights = {}
        for m in self.labels:
            if cfg.lambda_g != 0:
                self.weights[f"L_img_{m}"] = cfg.lambda_g
            if cfg.lambda_d != 0:
                self.weights[f"L_pix_{m}"] = cfg.lambda_d
        if not self.weights:
            raise ValueError("GCL needs lambda_g > 0 or lambda_d > 0 (both are 0)")
        views = (("img3", "img4") if cfg.lambda_g != 0 else ()) + (("img1", "img2") if cfg.lambda_d != 0 else ())
        self.required_views = views

    def forward(self, batch: Batch) -> Dict[str, torch.Tensor]:
        self.check_batch(batch)
        cfg = self.cfg
        values = meta_values(batch, self.labels, self.positions(batch))
        T = len(self.labels)
        terms: Dict[str, torch.Tensor] = {}
        if cfg.lambda_g != 0:
            z = torch.stack([self.model.image(batch.img3), self.model.image(batch.img4)], dim=1)  # (B, 2, D)
            for m, v, zc in zip(self.labels, values, mitigate(z, T, cfg.gcl_mitigator)):
                if m == POSITION:
                    loss = positional_sup_con(zc, v, threshold=cfg.threshold, temperature=cfg.temperature,
                                              impl=cfg.impl, process_group=self.process_group)
                else:
                    loss = sup_con(zc, v.round().long(), temperature=cfg.temperature, impl=cfg.impl,
                                   process_group=self.process_group)
                terms[f"L_img_{m}"] = loss * cfg.contrast_scale
        if cfg.lambda_d != 0:
            maps = self.model.pixel(torch.cat([batch.img1, batch.img2]))           # (2B, C, *S')
            for m, v, mc in zip(self.labels, values, mitigate(maps, T, cfg.gcl_mitigator)):
                groups = torch.floor(v.float() / cfg.threshold).long() if m == POSITION else v.round().long()
                terms[f"L_pix_{m}"] = pixel_loss(mc, groups, cfg)
        return terms
