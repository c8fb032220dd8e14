"""Optimiser groups and learning-rate schedule of fine-tuning (docs/workflow.md "Fine-tuning recipes").

Adam groups, named by ``group["name"]``: ``"pretrained"`` (the tensors loaded from pre-trained weights, at
``lr * pretrained_lr_scale``), ``"new"`` (other trainable non-head tensors, at ``lr``), ``"head"`` (the network's
``head`` module, at ``lr``; a network without one has it in ``"new"``). Frozen parameters (``requires_grad`` off)
are in no group; empty groups are left out.

Schedule (:func:`lr_factor`): linear-probe-then-fine-tune (``probe_steps``): for the first ``probe_steps`` steps only
the head learns (every other group at learning rate 0), then everything, the non-head groups warming up linearly
over ``warmup_steps``; cosine decay to ``min_lr``. With every option at its default there is one group and the
schedule is ``CosineAnnealingLR`` as before these options existed (so older runs resume unchanged).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn


def param_groups(model: nn.Module, loaded: Sequence[str], lr: float, pretrained_lr_scale: float,
                 weight_decay: float) -> list[dict]:
    """Adam groups ``pretrained`` / ``new`` / ``head`` of the trainable parameters (module docstring).

    ``loaded``: state-dict keys copied from pre-trained weights. Each group carries ``name`` and ``base_lr``.
    """
    loaded_set = set(loaded)
    groups: dict[str, list] = {"pretrained": [], "new": [], "head": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in loaded_set:
            groups["pretrained"].append(p)
        elif name.startswith("head."):
            groups["head"].append(p)
        else:
            groups["new"].append(p)
    rates = {"pretrained": lr * pretrained_lr_scale, "new": lr, "head": lr}
    out = [{"params": ps, "name": g, "lr": rates[g], "base_lr": rates[g], "weight_decay": weight_decay}
           for g, ps in groups.items() if ps]
    if not out:
        raise ValueError("nothing to train: every parameter of the network is frozen")
    return out


def lr_factor(step: int, steps: int, lr: float, min_lr: float, probe_steps: int, warmup_steps: int,
              head: bool) -> float:
    """The learning-rate multiplier of a group at optimiser step ``step`` (0-based, before the step).

    Head groups: cosine from 1 to ``min_lr / lr`` over all ``steps``. Other groups: 0 for the first
    ``probe_steps``, then a linear warm-up over ``warmup_steps`` (1/w, 2/w, ..., 1), times a cosine from 1 to
    ``min_lr / lr`` over the remaining steps.
    """
    floor = min_lr / lr
    if head:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    if step < probe_steps:
        return 0.0
    t, span = step - probe_steps, max(steps - probe_steps, 1)
    warm = min(1.0, (t + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span)))


def is_default(cfg) -> bool:
    """Whether ``cfg`` asks for today's plain recipe (one group, cosine schedule)."""
    return (cfg.freeze == "none" and cfg.probe_steps == 0 and cfg.warmup_steps == 0
            and cfg.pretrained_lr_scale == 1.0)


def build_optimizer(model: nn.Module, cfg, loaded: Sequence[str]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam and its schedule for ``cfg`` (a FinetuneConfig); frozen parameters are not in the optimiser."""
    if is_default(cfg):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        opt.param_groups[0]["name"] = "all"
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.min_lr)
    groups = param_groups(model, loaded, cfg.lr, cfg.pretrained_lr_scale, cfg.weight_decay)
    if cfg.probe_steps and not any(g["name"] == "head" for g in groups):
        raise ValueError(f"probe_steps needs a network with a 'head' module (the layer the probe trains); "
                         f"{type(model).__name__} has none")
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lambdas: list[Callable[[int], float]] = []
    for g in groups:
        lambdas.append(lambda s, head=g["name"] == "head", base=g["base_lr"]: lr_factor(
            s, cfg.steps, base, min(cfg.min_lr, base), cfg.probe_steps, cfg.warmup_steps, head))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambdas)

