"""Build the fine-tuning network and load pre-trained encoder/decoder weights into it, no renaming.

`export` side: every pre-training model has `pretrained_state_dict()` (encoder.* and, for MACL, the decoder
blocks it trained, decoder.blocks.0…k−1.*). `macl.train.export_weights` writes it to a file together with the
network description. `load_pretrained` copies those tensors into a `UNet`; every one of them must exist there
with the same shape (strict for every pre-trained tensor); the fine-tuning-only tensors (later decoder blocks,
the 1×1 head) keep their initialisation. A MONAI network (net.arch "monai:...") is built as itself with
out_channels = num_classes; its pre-trained tensors carry its own key names (`macl.nets.api.export_tapped`).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Union

import torch

from ..settings.config import NetConfig
from .unet import UNet


def build_finetune_net(net: Union[NetConfig, Mapping], num_classes: int) -> torch.nn.Module:
    """The segmentation U-Net (encoder + full decoder + 1×1 head, no bias) for a backbone description, or the
    MONAI network of net.arch "monai:..." with out_channels = num_classes (`macl.nets.from_config.build_net`).

    net: a `NetConfig`, or its dict form (as stored under "net" in checkpoints and exported weights).
    """
    from .from_config import build_net
    if not isinstance(net, NetConfig):
        net = NetConfig(**dict(net))
    return UNet(net, num_classes) if net.arch == "unet" else build_net(net, num_classes)


def load_pretrained(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    """Copy every tensor of `state` into `model` (same key names), strictly.

    Returns the sorted list of keys loaded.

    Raises:
        KeyError: a pre-trained key the model does not have (all of them are named).
        ValueError: a shape mismatch (key and both shapes named), or an empty `state`.
    """
    if not state:
        raise ValueError("pre-trained state dict is empty")
    own: Dict[str, torch.Tensor] = model.state_dict()
    unknown = sorted(k for k in state if k not in own)
    if unknown:
        raise KeyError(f"pre-trained tensors missing from the model: {unknown}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"shape mismatch for {key!r}: pre-trained {tuple(value.shape)}, model {tuple(own[key].shape)}")
    merged = dict(own)
    merged.update(state)
    model.load_state_dict(merged, strict=True)
    return sorted(state)
