"""MACL's asymmetric encoder–decoder model: one shared encoder, two branches (no EMA, no second encoder).

With E the shared encoder, D_k the first k decoder blocks, ↓s down-sampling by s = 2^−k (bilinear or
trilinear, align_corners=True), g_p^a the auxiliary pixel head, g_g^a / g_g^d the image heads:

- auxiliary branch (full resolution, encoder only):
    a1 = E(img1)                   aux bottleneck   (B, 2^d·F, S/2^d)       [512×32×32 for 512², F=32, d=4]
    p1 = g_p^a(a1)                 aux pixel map    (B, 2^(d−k)·F, S/2^d)   [128×32×32]
    z3 = g_g^a(E(img3))            aux image proj.  (B, proj_dim)           [128]
- dominant branch (input ↓s, encoder + k decoder blocks):
    b2 = E(↓s img2)                dom bottleneck   (B, 2^d·F, s·S/2^d)     [512×8×8]
    p2 = D_k(b2, skips)            dom pixel map    (B, 2^(d−k)·F, S/2^d)   [128×32×32], aligned with p1
    z4 = g_g^d(D_k(E(↓s img4)))    dom image proj.  (B, proj_dim)           [128]
  (`dominant_image_source="encoder"`: z4 = g_g^d(E(↓s img4)), the paper's equation.)

The losses (`macl.methods.macl`) use z3/z4 for L_g, p1/p2 for L_d and a1/b2 for L_ER.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..settings.config import NetConfig
from .heads import ImageHead, PixelHead
from .unet import UNetDecoder, UNetEncoder, check_spatial, he_init


@dataclass
class MACLOutputs:
    """The six tensors of one MACL forward pass (see the module docstring for shapes and symbols).

    aux_image / dom_image are None when img3 / img4 were not given.
    """

    aux_bottleneck: torch.Tensor
    aux_pixel: torch.Tensor
    dom_bottleneck: torch.Tensor
    dom_pixel: torch.Tensor
    aux_image: Optional[torch.Tensor] = None
    dom_image: Optional[torch.Tensor] = None


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (2D) / trilinear (3D) resize with align_corners=True, as the public code. (B, C, *S) → (B, C, *size)."""
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=True)


class MACLModel(nn.Module):
    """The asymmetric model. forward(img1, img2, img3=None, img4=None) → `MACLOutputs`.

    All four images are (B, C, *S) at full resolution; the model down-samples img2/img4 itself.
    S must be divisible by 2^(depth+k) (so that ↓s img is divisible by 2^depth).

    Raises:
        ValueError: dominant_scale·2^k ≠ 1 (the two pixel maps would not be aligned), k > depth, or an
            unknown dominant_image_source.
    """

    def __init__(self, net: NetConfig, decoder_blocks: int = 2, dominant_scale: float = 0.25,
                 proj_dim: int = 128, dominant_image_source: str = "decoder", head_norm: str = "none"):
        super().__init__()
        k = int(decoder_blocks)
        if not 1 <= k <= net.depth:
            raise ValueError(f"decoder_blocks must be in [1, depth={net.depth}], got {decoder_blocks!r}")
        if abs(dominant_scale * 2 ** k - 1.0) > 1e-9:
            raise ValueError(f"dominant_scale must be 2^-decoder_blocks = {2.0 ** -k} so that the dominant pixel map "
                             f"aligns with the auxiliary bottleneck, got {dominant_scale!r}")
        if dominant_image_source not in ("decoder", "encoder"):
            raise ValueError(f"dominant_image_source must be decoder|encoder, got {dominant_image_source!r}")
        self.net_config, self.decoder_blocks = net, k
        self.dominant_scale, self.proj_dim = dominant_scale, int(proj_dim)
        self.dominant_image_source, self.head_norm = dominant_image_source, head_norm
        width = net.base_width
        bottleneck = width * 2 ** net.depth
        pixel = width * 2 ** (net.depth - k)  # = decoder output channels (128 for F=32, d=4, k=2)
        self.encoder = UNetEncoder(net.dims, net.in_channels, width, net.depth, net.norm)
        self.decoder = UNetDecoder(net.dims, width, net.depth, net.norm, num_blocks=k)
        self.aux_pixel_head = PixelHead(net.dims, bottleneck, pixel, net.norm)
        # Public code: target head Linear(16F, 4F) → ReLU → Linear(4F, 128); online head Linear(4F, 4F) → … .
        self.aux_image_head = ImageHead(bottleneck, pixel, self.proj_dim, head_norm)
        dom_in = pixel if dominant_image_source == "decoder" else bottleneck
        self.dom_image_head = ImageHead(dom_in, pixel, self.proj_dim, head_norm)
        self.apply(he_init)

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """↓s: (B, C, *S) → (B, C, *S·s), bilinear/trilinear with align_corners=True."""
        check_spatial(x, self.net_config.dims, 2 ** (self.net_config.depth + self.decoder_blocks),
                      what="MACL input (divisible by 2^(depth+decoder_blocks) so the down-sampled view fits the encoder)")
        return resize(x, [s >> self.decoder_blocks for s in x.shape[2:]])

    def dominant(self, x_small: torch.Tensor):
        """Dominant pass on an already down-sampled input: (bottleneck, decoder-block-k output)."""
        b, skips = self.encoder(x_small)
        return b, self.decoder(b, skips)[-1]

    def forward(self, img1: torch.Tensor, img2: torch.Tensor, img3: Optional[torch.Tensor] = None,
                img4: Optional[torch.Tensor] = None) -> MACLOutputs:
        a1, _ = self.encoder(img1)
        p1 = self.aux_pixel_head(a1)
        b2, p2 = self.dominant(self.downsample(img2))
        z3 = z4 = None
        if img3 is not None:
            z3 = self.aux_image_head(self.encoder(img3)[0])
        if img4 is not None:
            b4, d4 = self.dominant(self.downsample(img4))
            z4 = self.dom_image_head(d4 if self.dominant_image_source == "decoder" else b4)
        return MACLOutputs(a1, p1, b2, p2, z3, z4)

    def pretrained_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder and decoder tensors under the fine-tuning `UNet`'s names (encoder.*, decoder.*)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items()
                if k.startswith(("encoder.", "decoder."))}

    def describe(self) -> dict:
        """A JSON description of the architecture (stored in checkpoints)."""
        return {"model": "MACLModel", "net": dataclasses.asdict(self.net_config),
                "decoder_blocks": self.decoder_blocks, "dominant_scale": self.dominant_scale,
                "proj_dim": self.proj_dim, "dominant_image_source": self.dominant_image_source,
                "head_norm": self.head_norm}


class EncoderProjector(nn.Module):
    """Encoder + image head, the PCL / SimCLR network: (B, C, *S) → (B, proj_dim).

    PCL's head: GAP → Linear(2^d·F, hidden) → ReLU → Linear(hidden, proj_dim), hidden = proj_dim = 512 for F=32.
    """

    def __init__(self, net: NetConfig, proj_dim: Optional[int] = None, hidden: Optional[int] = None):
        super().__init__()
        self.net_config = net
        bottleneck = net.base_width * 2 ** net.depth
        self.proj_dim = int(proj_dim or bottleneck)
        hidden = int(hidden or bottleneck)
        self.encoder = UNetEncoder(net.dims, net.in_channels, net.base_width, net.depth, net.norm)
        self.image_head = ImageHead(bottleneck, hidden, self.proj_dim)
        self.apply(he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.encoder(x)[0])

    def pretrained_state_dict(self) -> Dict[str, torch.Tensor]:
        """The encoder tensors under the fine-tuning `UNet`'s names (encoder.*)."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith("encoder.")}

    def describe(self) -> dict:
        """A JSON description of the architecture (stored in checkpoints)."""
        return {"model": "EncoderProjector", "net": dataclasses.asdict(self.net_config), "proj_dim": self.proj_dim}
