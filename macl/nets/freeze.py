"""Frozen parts of a fine-tuning network (``FinetuneConfig.freeze``, docs/workflow.md "Fine-tuning recipes").

``"none"`` | ``"encoder"`` | ``"encoder+decoder"`` (the top-level ``encoder`` / ``decoder`` modules of the network).
Frozen tensors get ``requires_grad=False``, are left out of the optimiser, and their modules stay in eval mode
(BatchNorm running statistics untouched), so they are bit-identical after training. ``"encoder+decoder"`` leaves
only the 1x1 head: a linear probe. :func:`recalibrate_batchnorm` re-estimates the frozen BatchNorm statistics
first (``bn_recalibrate``): those stored by pre-training describe its own views, not the fine-tuning input.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

FREEZE = ("none", "encoder", "encoder+decoder")
_FROZEN_PREFIXES = {"none": (), "encoder": ("encoder.",), "encoder+decoder": ("encoder.", "decoder.")}


def check_freeze(value: str) -> str:
    """The freeze setting, or ValueError naming the bad value."""
    if value not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {value!r}")
    return value


def frozen_prefixes(freeze: str, model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes frozen by ``freeze``; ValueError when the network has no such module (named)."""
    prefixes = _FROZEN_PREFIXES[check_freeze(freeze)]
    names = {n for n, _ in model.named_children()}
    missing = [p.rstrip(".") for p in prefixes if p.rstrip(".") not in names]
    if missing:
        raise ValueError(f"freeze={freeze!r} needs a network with module(s) {missing}; "
                         f"{type(model).__name__} has {sorted(names)}")
    return prefixes


def frozen_modules(model: nn.Module, prefixes: Sequence[str]) -> list[nn.Module]:
    """The top-level submodules named by ``prefixes`` ("encoder.", "decoder.")."""
    return [getattr(model, p.rstrip(".")) for p in prefixes]


def apply_freeze(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on every parameter under ``prefixes``; returns their names (sorted)."""
    names = []
    for name, p in model.named_parameters():
        if name.startswith(tuple(prefixes)):
            p.requires_grad_(False)
            names.append(name)
    return sorted(names)


def set_train_mode(model: nn.Module, prefixes: Sequence[str]) -> None:
    """``model.train()`` with the frozen modules in eval mode (their BatchNorm statistics stay fixed)."""
    model.train()
    for m in frozen_modules(model, prefixes):
        m.eval()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, prefixes: Sequence[str], batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the running mean / variance of every BatchNorm under ``prefixes`` from ``batches``.

    The statistics are reset and replaced by the cumulative average over the batches (momentum None); no
    parameter changes. ``batches``: input tensors (B, C, *spatial). Returns the number of BatchNorm layers reset
    (0: nothing to do, the batches are not run).
    """
    bns = [m for mod in frozen_modules(model, prefixes) for m in mod.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was = model.training
    saved = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        for x in batches:
            model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
            m.eval()
        model.train(was)
    return len(bns)
