"""How a fine-tuning run trains a (pre-trained) network: frozen parts, parameter groups, the schedule, validation.

Used by :func:`macl.finetune.finetune`; every option is a :class:`macl.finetune.FinetuneConfig` field (and a
``macl finetune`` flag, docs/workflow.md "Fine-tuning recipes"):

- ``freeze``: ``"none"`` | ``"encoder"`` | ``"encoder+decoder"``. Frozen tensors get ``requires_grad=False``, are
  left out of the optimiser, and their modules stay in eval mode (BatchNorm running statistics untouched), so
  they are bit-identical after training. ``"encoder+decoder"`` trains only the 1×1 head: a linear probe.
- ``bn_recalibrate``: before training, re-estimate the BatchNorm statistics of the *frozen* modules on that many
  batches of shuffled training crops (a cumulative average, no parameter changes; the statistics stored by
  pre-training describe its own views, not the fine-tuning input).
- ``probe_steps`` (linear-probe-then-fine-tune): for the first ``probe_steps`` steps only the head learns
  (every other group at learning rate 0), then everything, the non-head groups warming up linearly over
  ``warmup_steps``; cosine decay to ``min_lr`` over the remaining steps.
- ``pretrained_lr_scale``: the learning rate of the pre-trained tensors (the ones loaded) is ``lr`` times this;
  new layers use ``lr``.

Optimiser groups (Adam), named by ``group["name"]``: ``"pretrained"`` (loaded tensors), ``"new"`` (other
non-head tensors), ``"head"`` (the network's ``head`` module, if it has one; else part of ``"new"``). Empty
groups are left out. With every option at its default there is one group and the schedule is today's
``CosineAnnealingLR`` (so old runs resume unchanged).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

FREEZE = ("none", "encoder", "encoder+decoder")
_FROZEN_PREFIXES = {"none": (), "encoder": ("encoder.",), "encoder+decoder": ("encoder.", "decoder.")}


def check_freeze(value: str) -> str:
    """The freeze setting, or ValueError naming the bad value."""
    if value not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {value!r}")
    return value


def check_recipe(cfg) -> None:
    """ValueError naming the first bad recipe setting of a FinetuneConfig."""
    from macl.data.seg_augment import check_spatial_aug
    from macl.finetune_val import check_val
    check_freeze(cfg.freeze)
    check_spatial_aug(cfg.spatial_aug)
    check_val(cfg.val_fraction, cfg.val_cases, cfg.val_every)
    for name in ("probe_steps", "warmup_steps", "bn_recalibrate"):
        if int(getattr(cfg, name)) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.probe_steps >= cfg.steps:
        raise ValueError(f"probe_steps ({cfg.probe_steps}) must be below steps ({cfg.steps}): the fine-tuning "
                         f"phase would never start")
    if not cfg.pretrained_lr_scale > 0:
        raise ValueError(f"pretrained_lr_scale must be > 0, got {cfg.pretrained_lr_scale}")
    if cfg.probe_steps and cfg.freeze != "none":
        raise ValueError(f"probe_steps (linear probe, then fine-tune everything) needs freeze='none', "
                         f"got freeze={cfg.freeze!r}")


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
