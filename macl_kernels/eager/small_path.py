"""The drop-in losses' shortcut for small problems: straight to the dense torch path, past the general layers.

`nt_xent`, `sup_con` and `positional_sup_con` lay their inputs out as ONE self-contrast group of 2-D features.
When that group's logits fit the dense path (`torch_dense.fits`), the implementation is the torch one, the
loss is reduced ("mean" or "sum") and no process group spans several ranks, the general entry point
(`dist_core.contrast` -> `api.grouped_info_nce` -> `api._build_problem` -> `api._dispatch`) only re-checks
what these losses already know and re-derives what they already have; at B = 64 its Python costs as much as a
third of the forward (much more than its warm-cache timing suggests: between two calls of a training step
the cache is cold, and every line of Python and every distinct operation then costs several microseconds;
docs/cpu_path.md). This module checks exactly what the general path would check for these inputs, builds the
`ContrastProblem` directly and calls `torch_dense.dense_loss`; anything it does not handle (tensor τ, other
implementations, reduction="none", process groups of several ranks, empty or large batches, any input the
general path would reject) returns None, and the caller takes the general path, which raises the usual errors.
While `torch.compile` traces, it always returns None: the general path then calls the custom op (macl_kernels/op.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import const_cache, dense as torch_dense
from ..distributed.gather import resolve_group, world_size
from ..problem import ContrastProblem

_REDUCED = ("mean", "sum")


def two_views(z1: torch.Tensor, z2: torch.Tensor, pos: torch.Tensor, temperature, normalize, reduction, impl,
              process_group) -> Optional[torch.Tensor]:
    """nt_xent's `self_contrast` of cat([z1, z2]) with the index rule `pos` (a `const_cache` index), the
    concatenation made without autograd: the gradient flows to z1 and z2 from the dense function itself."""
    if z1.dtype != z2.dtype or z1.device != z2.device or not z1.is_floating_point() \
            or torch.compiler.is_compiling():
        return None   # (the general path promotes or raises)
    z = torch.cat([z1.detach(), z2.detach()])
    return self_contrast(z, temperature, normalize, reduction, impl, process_group, "index", pos, pair=(z1, z2))


def self_contrast(z: torch.Tensor, temperature, normalize, reduction, impl, process_group,
                  rule: str, meta: torch.Tensor, threshold=None, pair: Optional[tuple] = None
                  ) -> Optional[torch.Tensor]:
    """`grouped_info_nce(z, exclude_self=True, <rule>=meta, ...).loss`, or None where this path does not apply.

    Args:
        z: (N, D) features, every row an anchor and a key (self-contrast, j = i excluded).
        temperature, normalize, reduction, impl, process_group: as the losses take them.
        rule: "index" (meta = a `const_cache` index tensor, (1, N), trusted in range), "label" (meta = (N,)
            integer labels) or "radius" (meta = (N,) float positions, with `threshold`).
        pair: (z1, z2) when z is their concatenation made without autograd (`two_views`).

    Returns:
        The 0-d reduced loss (float32, float64 for float64 features), differentiable w.r.t. z (or the two
        halves of `pair`); or None.
    """
    if (torch.compiler.is_compiling()   # torch.compile: the general path's custom op (macl_kernels/op.py)
            or reduction not in _REDUCED or normalize.__class__ is not bool
            or temperature.__class__ is not float or not (0.0 < temperature < math.inf)
            or not (impl == "torch" or (impl == "auto" and z.device.type == "cpu"))
            or z.dim() != 2 or not z.is_floating_point()):
        return None
    if process_group is not None and world_size(resolve_group(process_group)) != 1:
        return None   # (a group of one rank changes nothing: the general path then runs the same call)
    N, D = z.shape
    if N == 0 or D == 0 or N * N * (8 if z.dtype == torch.float64 else 4) > torch_dense.DENSE_MAX_BYTES:
        return None
    k_meta, thr = None, 0.0
    if rule == "index":
        trust = const_cache.trusted(meta)
        if trust is None or trust.bound > N or meta.shape != (1, N):
            return None
        q_meta = meta
    else:
        if meta.shape != (N,) or meta.device != z.device:
            return None
        if rule == "label":
            if meta.is_floating_point() or meta.is_complex() or meta.dtype == torch.bool:
                return None
            q_meta = meta.long().contiguous()[None]
        else:
            if (not meta.is_floating_point() or threshold.__class__ not in (float, int)
                    or not (0 < threshold < math.inf)):
                return None
            q_meta, thr = meta.float().contiguous(), float(threshold)
            # finite positions, checked as the general path does except on CUDA (it reads values back): the
            # float64 sum of float32 values cannot overflow, so it is finite iff every position is
            if z.device.type != "cuda" and not math.isfinite(q_meta.sum(dtype=torch.float64).item()):
                return None
            q_meta = q_meta[None]
        k_meta = q_meta
    q = z[None]
    p = ContrastProblem(q=q, k=q, scale=1.0 / temperature, rule=rule, q_meta=q_meta, k_meta=k_meta,
                        threshold=thr, exclude_self=True, normalize=normalize)
    if pair is not None:
        return torch_dense.dense_loss(p, reduction, pair=pair)
    return torch_dense.dense_loss(p, reduction, (z, None))
