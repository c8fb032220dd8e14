"""Networks from a `NetConfig`: the built-in U-Net or a MONAI encoder–decoder, and the tapped pre-training model.

- `build_net(net, out_channels)`: `UNet(net, out_channels)` for net.arch "unet", else the MONAI network
  ``monai:<Name>`` with net.arch_args (`monai_maps.build_monai`): the fine-tuning network.
- `tapped_from_config(net, method_cfg)`: for a MONAI arch, that network (out_channels 2: its output layers are
  never run in pre-training) wrapped for the method (`adapters.tapped_model`) with net.taps or the built-in
  tap map for k = method.decoder_blocks.
"""
from __future__ import annotations

from typing import Mapping, Union

from torch import nn

from ..settings.config import MethodConfig, NetConfig
from .adapters import TappedBase, tapped_model
from .monai_maps import build_monai, default_taps, parse_arch
from .taps import Taps
from .unet import UNet

#: out_channels of a MONAI network built for pre-training (its output layers are not run nor exported)
PRETRAIN_OUT = 2


def as_net_config(net: Union[NetConfig, Mapping]) -> NetConfig:
    return net if isinstance(net, NetConfig) else NetConfig(**dict(net))


def build_net(net: Union[NetConfig, Mapping], out_channels: int) -> nn.Module:
    """The segmentation network of a backbone description: (B, in_channels, *S) → (B, out_channels, *S)."""
    net = as_net_config(net)
    name = parse_arch(net.arch)
    if name is None:
        return UNet(net, out_channels)
    return build_monai(name, net.dims, net.in_channels, out_channels, net.arch_args)


def config_taps(net: NetConfig, model: nn.Module, decoder_blocks: int) -> Taps:
    """net.taps when given, else the built-in map of the MONAI network for k = decoder_blocks."""
    return Taps.from_any(net.taps) if net.taps else default_taps(model, decoder_blocks)


def tapped_from_config(net: NetConfig, cfg: MethodConfig) -> TappedBase:
    """The method's tapped model around the MONAI network that `net` describes (module docstring)."""
    model = build_net(net, PRETRAIN_OUT)
    taps = config_taps(net, model, cfg.decoder_blocks)
    return tapped_model(cfg.name, model, taps, cfg, pixel_norm=net.norm, dims=net.dims, in_channels=net.in_channels)


__all__ = ["build_net", "config_taps", "tapped_from_config", "as_net_config", "PRETRAIN_OUT"]
