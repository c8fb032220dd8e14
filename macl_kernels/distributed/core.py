"""The core operation across ranks: each rank's anchors against the keys of every rank (local loss).

`contrast` is what every loss adapter calls. Without a process group (or with a group of one rank) it is
exactly `grouped_info_nce(...).loss`. With a group of W > 1 ranks, rank r holds anchors q_r (N_r rows) and
keys k_r (M_r rows) with their metadata; then

- the keys and their metadata are gathered from every rank, this rank's first (`GatherPlan`, own_first), so
  local positive indices and `exclude_self` need no shift: local anchor i is key i of the gathered set;
- this rank computes only its own N_r rows against the M = Σ M_r keys (memory O(N_r + M) with the fused core);
- the reduction is made global: with S_r = Σ of rank r's per-anchor losses and C = Σ_r (counted anchors of
  rank r) (one all-reduce of a scalar),
      reduction="mean": L_r = W · S_r / C            reduction="sum": L_r = W · S_r
  so that the MEAN over ranks of L_r is the single-process loss over the concatenated batch, and, because the
  gather's backward sums the key gradients over ranks, x.grad on rank r is W × ∂L/∂x_r: DistributedDataParallel,
  which AVERAGES gradients over ranks, then applies exactly the single-process gradient ∂L/∂θ (a learnable
  temperature included). reduction="none" returns rank r's rows of the single-process per-anchor loss, unscaled.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..api import REDUCTIONS, _build_problem, grouped_info_nce, resolve_impl
from .gather import GatherPlan, all_reduce_sum, group_rank, world_size


def contrast(q: torch.Tensor, k: Optional[torch.Tensor] = None, *, group=None, gather_keys: bool = True,
             reduction: str = "mean", impl: str = "auto", **kw) -> torch.Tensor:
    """`grouped_info_nce(q, k, **kw).loss`, over the ranks of `group` when it has more than one rank.

    Args:
        q: this rank's anchors (N_r, D) or (G, N_r, D). k: this rank's keys (M_r, D) / (G, M_r, D), or None
            for self-contrast (k = q, k_labels = q_labels, k_positions = q_positions).
        group: a resolved ProcessGroup (`distributed.resolve_group`) or None.
        gather_keys: False when the keys never cross ranks (e.g. dense negatives="image"): only the mean
            becomes global.
        reduction, impl, **kw: as `grouped_info_nce` (temperature, pos_index, labels, positions, threshold,
            exclude_self, q_valid, k_valid, allow_tf32, check_inputs). pos_index indexes this rank's own keys.

    Returns:
        The loss as described in the module docstring (0-d, or this rank's per-anchor rows for "none").

    Raises:
        What `grouped_info_nce` raises (on the rank whose inputs are wrong; the other ranks raise a
        RuntimeError naming it), and the errors of `GatherPlan.exchange` when ranks disagree on D or dtype.
    """
    W = world_size(group)
    if W == 1:
        return grouped_info_nce(q, k, reduction=reduction, impl=impl, **kw).loss
    if not gather_keys:
        return _local_keys(q, k, group, W, reduction, impl, kw)

    if k is None:
        k = q
        kw.setdefault("k_labels", kw.get("q_labels"))
        kw.setdefault("k_positions", kw.get("q_positions"))
    error = _check_locally(q, k, reduction, impl, kw)
    meta = {name: kw.get(name) for name in ("k_labels", "k_positions", "k_valid")}
    plan = GatherPlan.exchange(k, group, dim=-2, error=error,
                               flags={name: t is not None for name, t in meta.items()})
    keys = plan.gather(k, own_first=True, what="keys")
    for name, t in meta.items():
        if t is not None:
            if t.dim() == 1 and k.dim() == 3:
                t = t[None]
            t = t.long() if name == "k_labels" else t.float() if name == "k_positions" else t
            kw[name] = plan.gather(t, own_first=True, what=name)
    res = grouped_info_nce(q, keys, reduction="none" if reduction == "none" else "sum", impl=impl, **kw)
    # the exchange above was this call's one host read (its errors are raised there): the count stays on the device
    return _global_reduction(res.loss, res.pos_count, group, W, reduction, with_failures=False)


def _check_locally(q, k, reduction, impl, kw) -> Optional[BaseException]:
    """The error `grouped_info_nce` would raise on this rank's own inputs (keys not yet gathered), or None."""
    try:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        extra = set(kw) - _CORE_ARGS
        if extra:
            raise TypeError(f"unexpected arguments {sorted(extra)}")
        p, _ = _build_problem(q, k, kw.get("temperature", 0.1), kw.get("pos_index"), kw.get("q_labels"),
                              kw.get("k_labels"), kw.get("q_positions"), kw.get("k_positions"),
                              kw.get("threshold"), kw.get("exclude_self", False), kw.get("q_valid"),
                              kw.get("k_valid"), kw.get("check_inputs"))
        resolve_impl(impl, p.q.device, p.q.dtype)
    except (TypeError, ValueError) as e:
        return e
    return None


_CORE_ARGS = {"temperature", "pos_index", "q_labels", "k_labels", "q_positions", "k_positions", "threshold",
              "exclude_self", "q_valid", "k_valid", "allow_tf32", "check_inputs", "normalize"}


def _local_keys(q, k, group, W, reduction, impl, kw) -> torch.Tensor:
    """Keys stay on their rank; only the count of the mean is summed over ranks. A rank whose own call
    fails still joins the all-reduce (with a failure flag), so the others raise instead of waiting."""
    try:
        res = grouped_info_nce(q, k, reduction="none" if reduction == "none" else "sum", impl=impl, **kw)
    except (TypeError, ValueError):
        if reduction == "mean":
            flags = torch.zeros(1 + W, dtype=torch.int64, device=q.device)
            flags[1 + group_rank(group)] = 1
            all_reduce_sum(flags, group)
        raise
    return _global_reduction(res.loss, res.pos_count, group, W, reduction)


def _global_reduction(rows_or_sum, pos_count, group, W, reduction, with_failures: bool = True) -> torch.Tensor:
    """The per-rank loss of the module docstring. with_failures: the all-reduce also carries one failure flag
    per rank (`_local_keys`: its one host read per call, so that a rank whose inputs were rejected stops every
    rank); without, C stays on the device (no host read: the gather path exchanged its errors already)."""
    if reduction == "none":
        return rows_or_sum
    if reduction == "sum":
        return rows_or_sum * W
    if not with_failures:
        count = all_reduce_sum((pos_count > 0).sum().reshape(1), group)[0]
        return rows_or_sum * W / count.clamp(min=1).to(rows_or_sum.dtype)
    local = torch.zeros(1 + W, dtype=torch.int64, device=pos_count.device)   # [count, failed flag per rank]
    local[0] = (pos_count > 0).sum()
    count, *failed = all_reduce_sum(local, group).tolist()
    if any(failed):
        raise RuntimeError(f"rank(s) {[r for r, f in enumerate(failed) if f]} of the process group rejected their "
                           f"inputs to the distributed loss (see the error raised there); this rank stops too")
    return rows_or_sum * (W / max(count, 1))
