"""The U-Net of the MACL/PCL public code, for 2D slices and 3D patches.

Encoder: `depth` stages of 2×[Conv3, Norm, LeakyReLU(0.01)] each followed by MaxPool2, channels
F, 2F, …, 2^(depth−1)F; then the bottleneck ("center") 2×[Conv3, ReLU] with 2^depth·F channels at
1/2^depth resolution (F = 32, depth = 4: 512 channels at 1/16).
Decoder block j (j = 0 … depth−1): ConvTranspose2 up-sampling to 2^(depth−1−j)·F channels, concatenation
with the encoder skip of the same resolution, 2×[Conv3, Norm, LeakyReLU]. A decoder may be built with only
its first k blocks (MACL's dominant branch uses k = 2); its parameter names are then exactly those of the
first k blocks of the full decoder, so pre-trained weights load into `UNet` without renaming.
He (Kaiming normal, slope 1e-2) initialisation of every convolution, zero biases.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..settings.config import NetConfig


def conv_cls(dims: int) -> type:
    """nn.Conv2d or nn.Conv3d. Raises ValueError for other dims."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    return nn.Conv2d if dims == 2 else nn.Conv3d


def norm_layer(kind: str, dims: int, channels: int) -> nn.Module:
    """Normalisation layer: "batch" → BatchNorm, "instance" → affine InstanceNorm, "none" → Identity."""
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be batch|instance|none, got {kind!r}")


def he_init(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """The public code's InitWeights_He: Kaiming normal (a = neg_slope) for (transposed) convs, zero bias."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=neg_slope)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ConvNormAct(nn.Sequential):
    """Conv3 (padding 1) → Norm → LeakyReLU(0.01). (B, C_in, *S) → (B, C_out, *S)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__()
        self.conv = conv_cls(dims)(in_channels, out_channels, 3, padding=1)
        self.norm = norm_layer(norm, dims, out_channels)
        self.act = nn.LeakyReLU(0.01, inplace=True)


def double_conv(dims: int, in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """2×ConvNormAct: in → out → out."""
    return nn.Sequential(ConvNormAct(dims, in_channels, out_channels, norm),
                         ConvNormAct(dims, out_channels, out_channels, norm))


def check_spatial(x: torch.Tensor, dims: int, multiple: int, what: str = "input") -> None:
    """Raise ValueError unless x is (B, C, *S) with len(S) == dims and every S divisible by `multiple`."""
    if x.dim() != dims + 2:
        raise ValueError(f"{what} must be (B, C, {'D, ' if dims == 3 else ''}H, W) for dims={dims}, "
                         f"got shape {tuple(x.shape)}")
    spatial = tuple(x.shape[2:])
    if any(s % multiple for s in spatial):
        raise ValueError(f"{what} spatial size {spatial} must be divisible by {multiple}")


class UNetEncoder(nn.Module):
    """The shared encoder E. (B, C, *S) → bottleneck (B, 2^depth·F, *S/2^depth) and skips.

    Skips are returned finest first: skips[i] has 2^i·F channels at S/2^i (i = 0 … depth−1).
    """

    def __init__(self, dims: int = 2, in_channels: int = 1, base_width: int = 32, depth: int = 4,
                 norm: str = "batch"):
        super().__init__()
        self.dims, self.depth = dims, depth
        widths = [base_width * 2 ** i for i in range(depth)]
        ins = [in_channels] + widths[:-1]
        self.stages = nn.ModuleList(double_conv(dims, ci, co, norm) for ci, co in zip(ins, widths))
        self.pool = (nn.MaxPool2d if dims == 2 else nn.MaxPool3d)(2, stride=2)
        conv = conv_cls(dims)
        top = base_width * 2 ** depth
        self.center = nn.Sequential(conv(widths[-1], top, 3, padding=1), nn.ReLU(inplace=True),
                                    conv(top, top, 3, padding=1), nn.ReLU(inplace=True))
        self.out_channels = top

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        check_spatial(x, self.dims, 2 ** self.depth, "input (divisible by 2^depth)")
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
            x = self.pool(x)
        return self.center(x), skips


class UNetDecoder(nn.Module):
    """The decoder D, or its first `num_blocks` blocks.

    forward(bottleneck, skips) → list of block outputs; block j gives 2^(depth−1−j)·F channels at
    S/2^(depth−1−j). With num_blocks = depth the last output is at full resolution with F channels.
    """

    def __init__(self, dims: int = 2, base_width: int = 32, depth: int = 4, norm: str = "batch",
                 num_blocks: Optional[int] = None):
        super().__init__()
        num_blocks = depth if num_blocks is None else num_blocks
        if not 1 <= num_blocks <= depth:
            raise ValueError(f"num_blocks must be in [1, depth={depth}], got {num_blocks!r}")
        up_cls = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        self.depth = depth
        self.blocks = nn.ModuleList()
        for j in range(num_blocks):
            out = base_width * 2 ** (depth - 1 - j)
            block = nn.Module()
            block.up = up_cls(2 * out, out, kernel_size=2, stride=2)
            block.conv = double_conv(dims, 2 * out, out, norm)
            self.blocks.append(block)
        self.out_channels = base_width * 2 ** (depth - num_blocks)

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        outs = []
        for j, block in enumerate(self.blocks):
            x = block.up(x)
            x = block.conv(torch.cat([x, skips[self.depth - 1 - j]], dim=1))
            outs.append(x)
        return outs


class UNet(nn.Module):
    """The fine-tuning network: encoder + full decoder + 1×1 conv head (no bias).

    (B, C, *S) → logits (B, num_classes, *S). Parameter names: encoder.*, decoder.*, head.*; the encoder and
    decoder names are those that pre-training exports (`export_pretrained`), so they load without renaming.
    """

    def __init__(self, net: NetConfig, num_classes: int):
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.net_config = net
        self.encoder = UNetEncoder(net.dims, net.in_channels, net.base_width, net.depth, net.norm)
        self.decoder = UNetDecoder(net.dims, net.base_width, net.depth, net.norm)
        self.head = conv_cls(net.dims)(net.base_width, num_classes, 1, bias=False)
        self.apply(he_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bottleneck, skips = self.encoder(x)
        return self.head(self.decoder(bottleneck, skips)[-1])
