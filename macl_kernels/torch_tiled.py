"""Chunked PyTorch implementation: exact, any device, extra memory O(tile + (N + M)·D).

Forward, per tile of (groups × BR anchors × BC keys):
    z  = s·q kᵀ − B            one batched GEMM with the shift B folded in (baddbmm)
    Σ += exp(z) over valid keys
B_i is an upper bound of anchor i's logits (Cauchy–Schwarz: s·|q_i|·max_j |k_j|), so exp never overflows
and no running max or rescale pass is needed. If the bound is so loose that a row's sum underflows
(its largest logit is > 60 below the bound), the forward is redone for the whole problem with an exact
running max: rare, and still exact.
The positive term Σ_{p∈P(i)} z_ip = s·⟨q_i, (Y k)_i⟩ never touches a tile (see positives.py).

Backward recomputes each tile once and uses it twice (4 GEMM units and 2 exp passes in all):
    P  = exp(z − LSE)·1[valid],   dz = g·P   (the −g·Y part is applied through Y, outside the tiles)
    dq += s·dz k,                 dk += s·dzᵀ q
    ds  = (1/s)·Σ_i ⟨dq_i, q_i⟩   (Σ_j dz_ij z_ij = ⟨dq_i, q_i⟩)
Features of 16-bit dtypes are promoted to float32 once (O((N + M)·D)); gradients are cast back.
"""
from __future__ import annotations

import math

import torch

from .positives import PositiveOperator
from .problem import ContrastProblem, RowOutputs, stats_dtype

TILE_ELEMENTS = 1 << 19  # z-tile size: 2 MiB of float32, sized for the per-core L2 of today's CPUs
ROW_BLOCK = 512
KEY_BLOCK = 1024
UNDERFLOW = math.exp(-60.0)


def tiles(G: int, N: int, M: int, budget: int = TILE_ELEMENTS):
    """Yield (g0, g1, r0, r1, c0, c1): group chunks × row blocks × key blocks covering (G, N, M)."""
    br, bc = min(N, ROW_BLOCK), min(M, KEY_BLOCK)
    gc = max(1, min(G, budget // (br * bc)))
    for g0 in range(0, G, gc):
        for c0 in range(0, M, bc):
            for r0 in range(0, N, br):
                yield g0, min(G, g0 + gc), r0, min(N, r0 + br), c0, min(M, c0 + bc)


def _mask_tile(z: torch.Tensor, p: ContrastProblem, g0, g1, r0, r1, c0, c1, fill: float) -> None:
    """In place: invalid keys and (with exclude_self) the diagonal get `fill`."""
    if p.k_valid is not None:
        kv = p.k_valid[g0:g1, c0:c1]
        z.masked_fill_(~kv[:, None, :], fill)
    if p.exclude_self:
        lo, hi = max(r0, c0), min(r1, c1)
        if lo < hi:  # the diagonal j == i crosses this tile
            idx = torch.arange(lo, hi, device=z.device)
            z[:, idx - r0, idx - c0] = fill


def _sum_exp(qs: torch.Tensor, k: torch.Tensor, shift: torch.Tensor, p: ContrastProblem,
             exact_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_j∈V(i) exp(s·⟨q_i,k_j⟩ − shift_i) and the final shift. qs = s·q. With exact_max the shift is a
    running max (rescaled per key block); otherwise the given fixed bound."""
    G, N, M = qs.shape[0], qs.shape[1], k.shape[1]
    total = qs.new_zeros(G, N)
    shift = shift.clone()
    if exact_max:
        shift.fill_(float("-inf"))
    for g0, g1, r0, r1, c0, c1 in tiles(G, N, M):
        z = torch.bmm(qs[g0:g1, r0:r1], k[g0:g1, c0:c1].transpose(1, 2))
        _mask_tile(z, p, g0, g1, r0, r1, c0, c1, float("-inf"))
        sh = shift[g0:g1, r0:r1]
        if exact_max:  # running max; −inf while a row has seen no valid key (its sum stays 0)
            new = torch.maximum(sh, z.amax(-1))
            safe = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
            total[g0:g1, r0:r1] *= torch.exp(sh - safe)
            sh.copy_(new)
            z.sub_(safe[..., None])
        else:
            z.sub_(sh[..., None])
        total[g0:g1, r0:r1] += z.exp_().sum(-1)
    return total, shift


class _ChunkedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem):
        sdt = stats_dtype(q.dtype)
        qf, kf = q.detach().to(sdt), k.detach().to(sdt)
        s = float(scale)
        qs = qf * s
        ops = PositiveOperator(p)

        # Fixed upper bound of each anchor's logits over valid keys (Cauchy–Schwarz).
        k_norm = kf.norm(dim=-1)
        if p.k_valid is not None:
            k_norm = k_norm.masked_fill(~p.k_valid, 0.0)
        bound = qs.norm(dim=-1) * k_norm.amax(dim=1, keepdim=True)
        total, shift = _sum_exp(qs, kf, bound, p, exact_max=False)
        has_key = _has_valid_key(p)
        if bool(((total < UNDERFLOW) & has_key).any()):
            total, shift = _sum_exp(qs, kf, bound, p, exact_max=True)
        lse = torch.where(has_key, shift + total.log(), torch.full_like(total, -math.inf))

        ones = kf.new_ones(kf.shape[0], kf.shape[1], 1)
        count = ops.apply(ones)[..., 0].round().to(torch.int32)
        pos_k = ops.apply(kf)                                   # Σ_{p∈P(i)} k_p   (G, N, D)
        counted = count > 0
        if p.q_valid is not None:
            counted &= p.q_valid
        pos_mean = (qs * pos_k).sum(-1) / count.clamp(min=1)
        loss = torch.where(counted, lse - pos_mean, torch.zeros_like(lse))
        if p.q_valid is not None:
            count = count * p.q_valid

        ctx.p, ctx.ops, ctx.s = p, ops, s
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.scale_is_tensor = isinstance(scale, torch.Tensor)
        ctx.save_for_backward(qf, kf, lse, count, counted)
        ctx.mark_non_differentiable(lse, count)
        return loss, lse, count

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_count):
        qf, kf, lse, count, counted = ctx.saved_tensors
        p, ops, s = ctx.p, ctx.ops, ctx.s
        need_q = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        need_k = ctx.needs_input_grad[1]
        g = torch.where(counted, g_loss.to(qf.dtype), torch.zeros_like(lse))
        # Uncounted rows: +inf makes exp(z − LSE) exactly 0 (their g is 0; LSE may be −inf).
        lse_b = torch.where(counted, lse, torch.full_like(lse, math.inf))
        gs = g * s
        qs = qf * s
        dq = torch.zeros_like(qf) if need_q else None
        dk = torch.zeros_like(kf) if need_k else None
        G, N, M = qf.shape[0], qf.shape[1], kf.shape[1]
        for g0, g1, r0, r1, c0, c1 in tiles(G, N, M):
            z = torch.baddbmm(-lse_b[g0:g1, r0:r1, None], qs[g0:g1, r0:r1], kf[g0:g1, c0:c1].transpose(1, 2))
            _mask_tile(z, p, g0, g1, r0, r1, c0, c1, float("-inf"))
            dz = z.exp_().mul_(gs[g0:g1, r0:r1, None])          # s·g_i·P_ij
            if need_q:
                dq[g0:g1, r0:r1].baddbmm_(dz, kf[g0:g1, c0:c1])
            if need_k:
                dk[g0:g1, c0:c1].baddbmm_(dz.transpose(1, 2), qf[g0:g1, r0:r1])
        w = (gs / count.clamp(min=1))[..., None]                # s·g_i/|P(i)|
        if need_q:
            dq -= w * ops.apply(kf)
        if need_k:
            dk -= ops.apply_t(w * qf)
        ds = None
        if ctx.needs_input_grad[2]:
            ds = (dq * qf).sum() / s
        dq_out = dq.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dk_out = dk.to(ctx.dtypes[1]) if need_k else None
        return dq_out, dk_out, ds, None


def _has_valid_key(p: ContrastProblem) -> torch.Tensor:
    """(G, N) bool: V(i) is not empty."""
    G, N, M, _ = p.shape
    n_valid = p.k_valid.sum(1, keepdim=True) if p.k_valid is not None else torch.full((G, 1), M, device=p.q.device)
    n_valid = n_valid.expand(G, N).clone()
    if p.exclude_self and min(N, M) > 0:
        d = min(N, M)
        self_valid = p.k_valid[:, :d] if p.k_valid is not None else torch.ones(G, d, dtype=torch.bool, device=p.q.device)
        n_valid[:, :d] -= self_valid.long()
    return n_valid > 0


def torch_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count, chunked over keys (see module docstring)."""
    scale = p.scale
    loss, lse, count = _ChunkedInfoNCE.apply(p.q, p.k, scale, p)
    return RowOutputs(loss, lse, count)
