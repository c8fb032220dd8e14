"""Higher-order gradients of the torch path: the backward as a differentiable function of the inputs.

The hand-written backward passes (eager/tiled.py, eager/dense.py) compute the gradient with in-place tile
arithmetic, which autograd cannot differentiate. When a backward runs with `create_graph=True` (grad mode is
then on inside it: gradient penalties, meta-learning, `torch.autograd.gradgradcheck`), they call
`grads_with_graph` instead: it recomputes the per-anchor loss from the saved inputs with plain differentiable
torch operations, chunked over anchor rows, and differentiates that with `create_graph=True`, so the gradient
it returns carries its own graph back to the inputs (and a tensor temperature).

Per row chunk of R anchors (R·M ≤ CHUNK_ELEMENTS logits): z = s·q̂ k̂ᵀ (R, M) in the statistics dtype; keys
outside V(i) at −inf; LSE_i = logsumexp_j z_ij (a row with no valid key uses 0s instead: its loss is 0
anyway, and this keeps its gradient finite); ℓ_i = LSE_i − mean_{p∈P(i)} z_ip where counted, else 0.
The graph keeps every chunk's logits until the second backward: memory O(N·M), as naive code (the first-order
path stays O((N + M)·D + tile)).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..problem import ContrastProblem, stats_dtype

#: logits per row chunk of the differentiable recomputation
CHUNK_ELEMENTS = 1 << 20


def _positives(p: ContrastProblem, r0: int, r1: int, M: int) -> torch.Tensor:
    """P restricted to anchors [r0, r1): (G, R, M) bool (rule ∩ V(i))."""
    qm = p.q_meta[:, r0:r1, None]
    if p.rule == "index":
        pos = qm == torch.arange(M, device=qm.device)
    elif p.rule == "label":
        pos = qm == p.k_meta[:, None, :]
    else:
        pos = (qm - p.k_meta[:, None, :]).abs() < p.threshold
    return pos & _allowed(p, r0, r1, M)


def _allowed(p: ContrastProblem, r0: int, r1: int, M: int) -> torch.Tensor:
    """V restricted to anchors [r0, r1): (G or 1, R, M) bool (k_valid, and j ≠ i with exclude_self)."""
    dev = p.q_meta.device
    ok = torch.ones(1, r1 - r0, M, dtype=torch.bool, device=dev)
    if p.exclude_self:
        ok = ok & (torch.arange(r0, r1, device=dev)[:, None] != torch.arange(M, device=dev))[None]
    if p.k_valid is not None:
        ok = ok & p.k_valid[:, None, :]
    return ok


def differentiable_rows(q: torch.Tensor, k: torch.Tensor, scale, p: ContrastProblem) -> torch.Tensor:
    """Per-anchor loss ℓ (G, N) in the statistics dtype, built from differentiable torch operations only.

    q (G, N, D), k (G, M, D) (k may be q), scale a float or a 0-d tensor, p the problem's rule, masks and
    normalize flag (its own q, k and scale are not read). Equals the torch path's `RowOutputs.loss`.
    """
    sdt = stats_dtype(q.dtype)
    same = k is q
    qf = q.to(sdt)
    kf = qf if same else k.to(sdt)
    if p.normalize:
        qf = torch.nn.functional.normalize(qf, dim=-1)
        kf = qf if same else torch.nn.functional.normalize(kf, dim=-1)
    G, N, _ = qf.shape
    M = kf.shape[1]
    if isinstance(scale, torch.Tensor):
        scale = scale.to(sdt)
    step = max(1, CHUNK_ELEMENTS // max(1, G * M))
    out = []
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        z = torch.matmul(qf[:, r0:r1], kf.transpose(1, 2)) * scale
        allowed = _allowed(p, r0, r1, M)
        has_key = allowed.any(-1, keepdim=True)
        lse = torch.logsumexp(torch.where(has_key, z.masked_fill(~allowed, float("-inf")), 0.0), -1)
        pos = _positives(p, r0, r1, M)
        count = pos.sum(-1)
        counted = count > 0
        if p.q_valid is not None:
            counted = counted & p.q_valid[:, r0:r1]
        pos_mean = torch.where(pos, z, 0.0).sum(-1) / count.clamp(min=1)
        out.append(torch.where(counted, lse - pos_mean, 0.0))
    if not out:
        return qf.new_zeros(G, N) * (scale if isinstance(scale, torch.Tensor) else 1.0)
    return torch.cat(out, 1)


def create_graph_requested() -> bool:
    """True inside a backward that runs with create_graph=True (autograd turns grad mode on for it)."""
    return torch.is_grad_enabled()


def grads_with_graph(loss_of: "callable", inputs: Sequence[Optional[torch.Tensor]],
                     needs: Sequence[bool]) -> list:
    """d(loss_of())/d(inputs) with create_graph=True, None where `needs` is False or an input is None.

    loss_of: a function returning the scalar to differentiate (Σ_i g_i·ℓ_i built by the caller from
    `differentiable_rows` and the incoming gradients). Inputs that are the same tensor object get the
    gradient once (at the first position): the caller's autograd.Function received one tensor twice.
    """
    with torch.enable_grad():
        total = loss_of()
    targets, slots, seen = [], [], set()
    for i, (t, need) in enumerate(zip(inputs, needs)):
        if need and t is not None and id(t) not in seen and t.requires_grad:
            seen.add(id(t))
            targets.append(t)
            slots.append(i)
    out: list = [None] * len(inputs)
    if not targets:
        return out
    if not total.requires_grad:
        for t, i in zip(targets, slots):
            out[i] = torch.zeros_like(t)
        return out
    grads = torch.autograd.grad(total, targets, create_graph=True, allow_unused=True)
    for t, i, gr in zip(targets, slots, grads):
        out[i] = gr if gr is not None else torch.zeros_like(t)
    return out
