"""The Python entry for any encoder–decoder: `adapt(model, taps=...)` → a pre-training `Method`, and the
export of its weights under the model's own key names.

    import macl
    from macl.nets import adapt
    method = adapt(my_unet, taps={"bottleneck": "down_4", "decoder": "upcat_3"})        # MACL
    macl.train.pretrain(config, batches, "runs/x", method=method)                        # the package's loop
    my_unet.load_state_dict(method.pretrained_state_dict(), strict=False)                # or exported weights

`export_tapped(checkpoint, out_path)` is what `macl.train.export_weights` runs for a tapped model: the file is a
plain state dict of the user's network (`torch.load` → `net.load_state_dict(sd, strict=False)`), with the
description (network, taps, pre-trained and missing keys) beside it in ``<out_path minus .pt>.json``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Union

from torch import nn

from ..settings.config import MethodConfig, NetConfig
from .adapters import tapped_model
from .monai_maps import default_taps
from .taps import Taps, infer_dims_channels


def adapt(model: nn.Module, taps: Union[Taps, Mapping, None] = None, method: Union[str, MethodConfig] = "macl",
          dims: Optional[int] = None, in_channels: Optional[int] = None,
          probe_size: Optional[Sequence[int]] = None, pixel_norm: str = "batch"):
    """A pre-training `macl.methods.Method` (MACL, PCL, SimCLR or GCL-style) on the user's `model`.

    taps: module paths {"bottleneck", "decoder", "er"} (`macl.nets.taps`); None: the built-in map of a MONAI
        BasicUNet / UNet / DynUNet / SwinUNETR for k = decoder_blocks. Encoder-only methods use the bottleneck.
    method: a method name or a full `MethodConfig`.
    dims / in_channels: default from the first Conv2d / Conv3d; probe_size: an input size (spatial) at which the
        network runs, to read the tapped shapes (default: the first of 64, 128, 256, 512 per axis that runs).

    Raises TapError (one line) for a wrong tap name, a module that is not an encoder–decoder at its taps, or a
    class without a built-in map when taps is None.
    """
    from ..methods.base import build_method
    cfg = method if isinstance(method, MethodConfig) else MethodConfig(name=str(method))
    if taps is None:
        taps = default_taps(model, cfg.decoder_blocks)
    if dims is None or in_channels is None:
        d, c = infer_dims_channels(model)
        dims, in_channels = dims or d, in_channels or c
    wrapped = tapped_model(cfg.name, model, taps, cfg, pixel_norm=pixel_norm, dims=dims, in_channels=in_channels,
                           probe_size=probe_size)
    return build_method(NetConfig(dims=dims, in_channels=in_channels, norm=pixel_norm), cfg, model=wrapped)


def tapped_description(checkpoint: Mapping[str, Any]) -> Optional[dict]:
    """The tapped model's description in a pre-training checkpoint, or None for the built-in networks."""
    network = (checkpoint.get("network") or {}).get("network") or {}
    return network if "pretrained_keys" in network else None


def export_tapped(checkpoint: Mapping[str, Any], out_path: Optional[str] = None) -> Dict[str, Any]:
    """{"state_dict": the user's network's pre-trained tensors under its own names, "net", "network", "step",
    "missing_keys"}; out_path gets the state dict alone (atomic) and out_path's .json the rest."""
    from ..run import folder as runfolder
    desc = tapped_description(checkpoint)
    if desc is None:
        raise ValueError("checkpoint holds no tapped network (no 'pretrained_keys' in its description)")
    prefix = "model." + desc.get("state_prefix", "net.")
    model = checkpoint["model"]
    absent = [k for k in desc["pretrained_keys"] if prefix + k not in model]
    if absent:
        raise ValueError(f"checkpoint lacks pre-trained tensors {absent[:5]} (of {len(absent)})")
    state = {k: model[prefix + k] for k in desc["pretrained_keys"]}
    out = {"state_dict": state, "net": checkpoint["config"]["net"], "network": checkpoint["network"],
           "step": checkpoint["step"], "missing_keys": desc["missing_keys"]}
    if out_path is not None:
        runfolder.save_torch_atomic(state, out_path)
        side = {k: v for k, v in out.items() if k != "state_dict"}
        runfolder.atomic_write(sidecar(out_path), json.dumps(side, indent=1))
    return out


def sidecar(weights_path: Union[str, os.PathLike]) -> str:
    """``pretrained_weights.pt`` → ``pretrained_weights.json`` (the description of a plain state-dict file)."""
    return os.path.splitext(os.fspath(weights_path))[0] + ".json"


def sidecar_net(weights_path: Union[str, os.PathLike]) -> Optional[dict]:
    """The NetConfig dict stored beside a plain state-dict weights file, or None when there is no side file."""
    p = sidecar(weights_path)
    if not os.path.isfile(p):
        return None
    with open(p) as fh:
        return dict(json.load(fh).get("net") or {}) or None


__all__ = ["adapt", "export_tapped", "tapped_description", "sidecar", "sidecar_net"]
