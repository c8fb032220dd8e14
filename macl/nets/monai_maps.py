"""MONAI's U-Nets for MACL: build them from ``monai:<Name>`` and their arguments, and their built-in tap maps.

With k = `decoder_blocks` (MACL: 2), the decoder tap is the k-th up-sampling level above the bottleneck, whose
output is k ×2 steps finer than the bottleneck (r = 2^k per axis with the usual stride-2 levels):

- ``BasicUNet`` (conv_0, down_1 … down_4, upcat_4 … upcat_1, final_conv): bottleneck ``down_4`` (1/16),
  decoder ``upcat_{5−k}`` (k = 2: ``upcat_3``, 1/4). Not trained by MACL at k = 2: ``upcat_2``, ``upcat_1``,
  ``final_conv``.
- ``UNet`` (nested ``model.1.submodule…`` SkipConnections; m = len(channels)): bottleneck = the bottom layer
  ``model(.1.submodule)×(m−1)``, decoder = the up layer of level m−1−k, ``model(.1.submodule)×(m−1−k).2``
  (k ≤ m−2: the top up layer produces the logits). Not trained: the up layers of levels 0 … m−2−k.
- ``DynUNet`` (input_block, downsamples, bottleneck, upsamples, output_block): bottleneck ``bottleneck``,
  decoder ``upsamples.{k−1}`` (upsamples[0] is the deepest). Not trained: ``upsamples.k…``, ``output_block``,
  ``deep_supervision_heads`` (and their ``skip_layers.*`` aliases in the state dict).
- ``SwinUNETR``: bottleneck ``encoder10`` (1/32), decoder ``decoder5`` (k = 1) or ``decoder4`` (k = 2). It fits
  the scheme (the Swin encoder runs before ``encoder10``, the decoders after), but the MACL geometry needs
  crops divisible by 32·2^k with a dominant bottleneck ≥ 2: 256 per axis at k = 2 (docs/monai.md).

`build_monai(spec, dims, in_channels, out_channels, args)` constructs the network; `spatial_dims`,
`in_channels` and `out_channels` come from the data / the task and may not be in `args`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn

from .taps import TapError, Taps

SUPPORTED = ("BasicUNet", "UNet", "DynUNet", "SwinUNETR")
#: values for the arguments MONAI requires when --net-args leaves them out (UNet: channels / strides; DynUNet:
#: a 5-level nnU-Net-like layout); every other argument keeps MONAI's default
DEFAULT_ARGS = {
    "UNet": {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2]},
    "DynUNet": {"kernel_size": [3, 3, 3, 3, 3], "strides": [1, 2, 2, 2, 2], "upsample_kernel_size": [2, 2, 2, 2]},
}
OWN = ("spatial_dims", "in_channels", "out_channels")


def parse_arch(arch: str) -> Optional[str]:
    """"unet" → None (the built-in U-Net); "monai:Name" → "Name". TapError for anything else."""
    if arch == "unet":
        return None
    if arch.startswith("monai:") and arch[6:] in SUPPORTED:
        return arch[6:]
    if arch.startswith("monai:"):
        raise TapError(f"net {arch!r} has no MACL tap map (it is not one of MONAI's encoder–decoders "
                       f"{['monai:' + s for s in SUPPORTED]}); wrap it with macl.nets.adapt(model, taps=...)")
    raise TapError(f"net.arch must be 'unet' or one of {['monai:' + s for s in SUPPORTED]}, got {arch!r}")


def build_monai(name: str, dims: int, in_channels: int, out_channels: int, args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """monai.networks.nets.<name>(spatial_dims=dims, in_channels, out_channels, **(DEFAULT_ARGS | args)).

    Raises ValueError naming the argument when args set one of spatial_dims / in_channels / out_channels, or
    when MONAI rejects the arguments (its message kept, the network named).
    """
    import monai.networks.nets as mnets
    args = dict(args or {})
    clash = sorted(set(args) & set(OWN))
    if clash:
        raise ValueError(f"--net-args for monai:{name} may not set {clash}: spatial_dims comes from --dims, "
                         f"in_channels from the data, out_channels from the labels")
    kw = {**DEFAULT_ARGS.get(name, {}), **args}
    try:
        return getattr(mnets, name)(spatial_dims=int(dims), in_channels=int(in_channels),
                                    out_channels=int(out_channels), **kw)
    except (TypeError, ValueError, AssertionError) as e:
        raise ValueError(f"monai:{name}({', '.join(f'{k}={v!r}' for k, v in kw.items())}): "
                         f"{' '.join(str(e).split())}") from None


def _unet_levels(net: nn.Module) -> int:
    """m = len(channels) of a MONAI UNet (levels = the nested SkipConnections + the bottom layer)."""
    return len(net.channels)


def default_taps(net: nn.Module, decoder_blocks: int = 2) -> Taps:
    """The built-in tap map of a MONAI BasicUNet / UNet / DynUNet / SwinUNETR for k = decoder_blocks.

    Raises TapError for another class (named) or a k the network does not have.
    """
    name, k = type(net).__name__, int(decoder_blocks)
    if name == "BasicUNet":
        levels = 4
        if not 1 <= k <= levels:
            raise TapError(f"BasicUNet has {levels} decoder levels; decoder_blocks must be in [1, {levels}], got {k}")
        return Taps("down_4", f"upcat_{5 - k}")
    if name == "UNet":
        m = _unet_levels(net)
        if not 1 <= k <= m - 2:
            raise TapError(f"MONAI UNet with {m} channel levels: decoder_blocks must be in [1, {m - 2}] (its top up "
                           f"layer produces the logits), got {k}")
        return Taps("model" + ".1.submodule" * (m - 1), "model" + ".1.submodule" * (m - 1 - k) + ".2")
    if name == "DynUNet":
        n = len(net.upsamples)
        if not 1 <= k <= n:
            raise TapError(f"DynUNet has {n} up-sampling levels; decoder_blocks must be in [1, {n}], got {k}")
        return Taps("bottleneck", f"upsamples.{k - 1}")
    if name == "SwinUNETR":
        decoders = ["decoder5", "decoder4", "decoder3", "decoder2"]
        if not 1 <= k <= len(decoders):
            raise TapError(f"SwinUNETR: decoder_blocks must be in [1, {len(decoders)}], got {k}")
        return Taps("encoder10", decoders[k - 1])
    raise TapError(f"{name} has no built-in MACL tap map (built-in: {list(SUPPORTED)}); pass "
                   f"taps={{'bottleneck': PATH, 'decoder': PATH}} naming its modules")


__all__ = ["SUPPORTED", "DEFAULT_ARGS", "parse_arch", "build_monai", "default_taps"]
