"""Which image channels a run uses, and how fine-tuning follows the pre-training run's choice.

A channel choice is None (every channel of the data: the default), an int, or a list of ints. Pre-training
records its choice in RUN/resolved_config.json (``data.channel``) and the network's ``in_channels`` in its
weights; fine-tuning from such a run uses the same channels, or stops with one line saying what to do.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

ChannelChoice = Union[None, int, Sequence[int]]


def as_channels(choice: ChannelChoice) -> Optional[list[int]]:
    """None -> None; 3 -> [3]; [0, 2] -> [0, 2]. Raises ValueError for anything else (negative, repeated)."""
    if choice is None:
        return None
    if isinstance(choice, bool):
        raise ValueError(f"channel must be an int, a list of ints or None, got {choice!r}")
    values = [choice] if isinstance(choice, (int, np.integer)) else list(choice)
    if not values or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in values) \
            or len(set(values)) != len(values):
        raise ValueError(f"channel must be an int >= 0 or a list of distinct ints >= 0, got {choice!r}")
    return [int(c) for c in values]


def count(choice: ChannelChoice, n_data: int) -> int:
    """Input channels of the network for `choice` on data with `n_data` channels."""
    chans = as_channels(choice)
    return n_data if chans is None else len(chans)


def check(choice: ChannelChoice, n_data: int, where: str = "the volumes") -> None:
    """ValueError naming the channel when `choice` asks for a channel the data do not have."""
    chans = as_channels(choice)
    bad = [c for c in chans or [] if c >= n_data]
    if bad:
        raise ValueError(f"channel {bad[0]} out of range: {where} have {n_data} channel(s) (0..{n_data - 1})")


def select(image: np.ndarray, choice: ChannelChoice) -> np.ndarray:
    """(C, *spatial) -> (C', *spatial) with the chosen channels (the array itself for None)."""
    chans = as_channels(choice)
    if chans is None:
        return image
    if chans == list(range(chans[0], chans[0] + len(chans))):   # a contiguous run: a view, no copy
        return image[chans[0]:chans[0] + len(chans)]
    return image[chans]


def select_volumes(volumes: Sequence[Any], choice: ChannelChoice, where: str = "the volumes") -> list:
    """`Volume`s with only the chosen channels (the same list for None)."""
    if as_channels(choice) is None or not volumes:
        return list(volumes)
    check(choice, volumes[0].image.shape[0], where)
    return [dataclasses.replace(v, image=select(v.image, choice)) for v in volumes]


@dataclasses.dataclass(frozen=True)
class PretrainedInput:
    """What a pre-trained network takes: its in_channels and, when known, the channel choice of its run."""
    in_channels: Optional[int]
    channels: Optional[list[int]]
    source: str


def pretrained_input(pretrained: Union[str, Path, Mapping[str, Any]]) -> PretrainedInput:
    """Read the input channels of a pre-training run folder, its weights / checkpoint file, or a state dict."""
    if isinstance(pretrained, Mapping):
        return PretrainedInput(_first_conv_in(pretrained), None, "<state dict>")
    p = Path(pretrained)
    run = p if p.is_dir() else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    chans, in_ch = None, None
    resolved = run / "resolved_config.json"
    if resolved.is_file():
        saved = json.loads(resolved.read_text())
        chans = as_channels(saved.get("data", {}).get("channel"))
        in_ch = saved.get("pretrain", {}).get("net", {}).get("in_channels")
    if in_ch is None:
        weights = p if p.is_file() else run / "pretrained_weights.pt"
        if weights.is_file():
            import torch
            obj = torch.load(weights, map_location="cpu", weights_only=True)
            net = obj.get("net") if isinstance(obj, Mapping) else None
            if isinstance(net, Mapping) and "in_channels" in net:
                in_ch = int(net["in_channels"])
            elif isinstance(obj, Mapping):
                in_ch = _first_conv_in(obj.get("state_dict", obj.get("model", obj)))
    return PretrainedInput(in_ch, chans, str(p))


def _first_conv_in(state: Mapping[str, Any]) -> Optional[int]:
    for key, t in state.items():
        if key.endswith("weight") and getattr(t, "dim", lambda: 0)() in (4, 5):
            return int(t.shape[1])
    return None


def finetune_channels(choice: ChannelChoice, n_data: int, pretrained: Optional[PretrainedInput],
                      data: str) -> Optional[list[int]]:
    """The channels fine-tuning uses: `choice` when given, else the pre-training run's, else all.

    Raises:
        ValueError (one line, saying what to do): the chosen / inherited channels do not exist in the data, or
            the pre-trained network takes another number of channels than fine-tuning would feed it.
    """
    chans = as_channels(choice)
    if chans is None and pretrained is not None and pretrained.channels is not None:
        chans = pretrained.channels   # follow the pre-training run's explicit choice
    check(chans, n_data, data)
    feed = count(chans, n_data)
    if pretrained is not None and pretrained.in_channels is not None and pretrained.in_channels != feed:
        what = f"channels {chans}" if chans is not None else f"all {n_data} channels"
        raise ValueError(
            f"the pre-trained network ({pretrained.source}) takes {pretrained.in_channels} input channel(s) but "
            f"fine-tuning would feed it {feed} ({what} of {data}): choose {pretrained.in_channels} channel(s) "
            f"with --channels (e.g. --channels {','.join(str(i) for i in range(pretrained.in_channels))}), or "
            f"pre-train on this data's {n_data} channel(s) (the default) and fine-tune from that run")
    return chans
