"""Small-problem path of impl="torch": the whole (G, N, M) logit matrix in one batched GEMM.

`torch_tiled.torch_rows` takes this path when the logits of all groups fit `DENSE_MAX_BYTES` (8 MiB, a size
that stays in the last-level cache of today's CPUs). There the tiled path's per-tile bookkeeping (row bounds,
per-tile masks, a second GEMM pass in the backward) costs more than the arithmetic, and naive PyTorch wins;
this path does what naive code does with as few operations as possible and no autograd graph:

Forward:  z = s·q̂ k̂ᵀ (one bmm; q̂ = q / ‖q‖ with normalize, else q), the positive mask Y (G, N, M) bool from
          the per-row metadata, Σ_{P(i)} z and |P(i)| from it, then invalid keys and the diagonal set to −inf
          in place, LSE = logsumexp(z), and the softmax P = exp(z − LSE) in place of z, saved.
Backward: s·dz = s·g·P − (s·g/|P(i)|)·Y;  dq̂ = (s·dz) k̂,  dk̂ = (s·dz)ᵀ q̂ (one bmm of s·(dz + dzᵀ) when q is
          k and τ is fixed);  ds = Σ_i ⟨dq̂_i, q̂_i⟩ / s;  with normalize, dq̂ → dq by the tangent projection
          in place (rownorm.project_).
Memory: P and Y (≤ the budget) and the normalised inputs (≤ the inputs) until the backward.
"""
from __future__ import annotations

import math

import torch

from .problem import ContrastProblem, RowOutputs, stats_dtype
from .rownorm import inv_norms, project_

DENSE_MAX_BYTES = 8 << 20  # logits of all groups, in the statistics dtype


def fits(p: ContrastProblem) -> bool:
    """True when the (G, N, M) logits of `p` take at most DENSE_MAX_BYTES in the statistics dtype."""
    G, N, D = p.q.shape
    return G * N * p.k.shape[1] * (8 if p.q.dtype == torch.float64 else 4) <= DENSE_MAX_BYTES


def positive_mask(p: ContrastProblem) -> torch.Tensor:
    """Y (G, N, M) bool: P(i) from the rule, restricted to V(i) (k_valid, and j ≠ i with exclude_self)."""
    G, N, M, _ = p.shape
    if p.rule == "index":
        y = torch.zeros(G, N, M, dtype=torch.bool, device=p.q.device)
        y.scatter_(2, p.q_meta[..., None], True)
    elif p.rule == "label":
        y = p.q_meta[:, :, None] == p.k_meta[:, None, :]
    else:
        y = (p.q_meta[:, :, None] - p.k_meta[:, None, :]).abs_() < p.threshold
    if p.k_valid is not None:
        y &= p.k_valid[:, None, :]
    if p.exclude_self:
        y.diagonal(dim1=1, dim2=2).fill_(False)
    return y


class _DenseInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem):
        sdt = stats_dtype(q.dtype)
        same = k is q
        qf = q.detach().to(sdt)
        kf = qf if same else k.detach().to(sdt)
        s = float(scale)
        q_inv = k_inv = None
        qh, kh = qf, kf
        if p.normalize:
            q_inv = inv_norms(qf)
            qh = qf * q_inv[..., None]
            k_inv, kh = (q_inv, qh) if same else (inv_norms(kf), None)
            if kh is None:
                kh = kf * k_inv[..., None]
        z = torch.bmm(qh, kh.transpose(1, 2)).mul_(s)
        y = positive_mask(p)
        count = y.sum(-1, dtype=torch.int32)
        pos_sum = (z * y).sum(-1)
        if p.k_valid is not None:
            z.masked_fill_(~p.k_valid[:, None, :], -math.inf)
        if p.exclude_self:
            z.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        lse = torch.logsumexp(z, -1)
        prob = z.sub_(lse[..., None]).exp_()
        if p.k_valid is not None or z.shape[2] <= int(p.exclude_self):
            prob.nan_to_num_(0.0)   # rows without any valid key: LSE = −inf, −inf − (−inf) = NaN
        counted = count > 0
        if p.q_valid is not None:
            counted &= p.q_valid
            count = count * p.q_valid
        loss = torch.where(counted, lse - pos_sum / count.clamp(min=1), 0.0)

        ctx.s, ctx.same, ctx.normalize = s, same, p.normalize
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(prob, y, count, counted, qf, kf, qh, kh, q_inv, k_inv)
        ctx.mark_non_differentiable(lse, count)
        return loss, lse, count

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_count):
        prob, y, count, counted, qf, kf, qh, kh, q_inv, k_inv = ctx.saved_tensors
        s, same = ctx.s, ctx.same
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        gs = torch.where(counted, g_loss.to(prob.dtype), 0.0).mul_(s)          # s·g_i
        ws = gs / count.clamp(min=1)                                           # s·g_i/|P(i)|
        dz = (prob * gs[..., None]).sub_(y * ws[..., None])                    # s·dz
        dq = dk = ds = None
        if same and need_q and not need_s:
            dq = torch.bmm(dz + dz.transpose(1, 2), qh)
        else:
            if need_q or need_s:
                dq = torch.bmm(dz, kh)
            if need_k:
                dk = torch.bmm(dz.transpose(1, 2), qh)
            if need_s:
                ds = (torch.linalg.vecdot(dq, qh).sum() / s).to(ctx.scale_dtype)
            if same and dk is not None:   # one tensor: its two contributions add
                dq, dk = dq + dk, None
        if ctx.normalize:
            if dq is not None:
                project_(dq, qf, q_inv)
            if dk is not None:
                project_(dk, kf, k_inv)
        dq = dq.to(ctx.dtypes[0]) if need_q else None
        dk = dk.to(ctx.dtypes[1]) if dk is not None else None
        return dq, dk, ds, None


def dense_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count with the (G, N, M) logits in memory (see module docstring)."""
    return RowOutputs(*_DenseInfoNCE.apply(p.q, p.k, p.scale, p))
