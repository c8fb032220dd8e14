"""Chunked PyTorch implementation: exact, any device, extra memory O(tile + (N + M)·D).

Forward, per tile of (groups × BR anchors × BC keys):
    z    = s·q kᵀ                       one batched GEMM
    LSE  = logaddexp(LSE, logsumexp(z))  over valid keys (torch.logsumexp reads the tile twice, writes nothing)
The positive term Σ_{p∈P(i)} z_ip = s·⟨q_i, (Y k)_i⟩ never touches a tile (see positives.py).

Backward recomputes each tile once and uses it twice (4 GEMM units and 2 exp passes in all):
    E    = exp(z − LSE + log|s·g|)       one baddbmm with the shift folded in, one in-place exp
    dq  += f·(E k),    dk += Eᵀ (f·q)   (s·g·P = f·E: f = sign(g) times the shift's rounding correction,
                                       applied on the (N, D) side, never on the tile)
    then the −g·Y part through Y, outside the tiles, and ds = (1/s)·Σ_i ⟨dq_i, q_i⟩ (Σ_j dz_ij z_ij = ⟨dq_i, q_i⟩).
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


def _lse(qs: torch.Tensor, k: torch.Tensor, p: ContrastProblem) -> torch.Tensor:
    """LSE_i = log Σ_{j∈V(i)} exp(⟨qs_i, k_j⟩), (G, N); −inf where V(i) is empty. qs = s·q."""
    G, N, M = qs.shape[0], qs.shape[1], k.shape[1]
    lse = qs.new_full((G, N), -math.inf)
    for g0, g1, r0, r1, c0, c1 in tiles(G, N, M):
        z = torch.bmm(qs[g0:g1, r0:r1], k[g0:g1, c0:c1].transpose(1, 2))
        _mask_tile(z, p, g0, g1, r0, r1, c0, c1, -math.inf)
        part = lse[g0:g1, r0:r1]
        torch.logaddexp(part, torch.logsumexp(z, -1), out=part)
    return lse


class _ChunkedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem):
        sdt = stats_dtype(q.dtype)
        qf, kf = q.detach().to(sdt), k.detach().to(sdt)
        s = float(scale)
        qs = qf * s
        ops = PositiveOperator(p)

        lse = _lse(qs, kf, p)

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
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(qf, kf, lse, count, counted, pos_k)
        ctx.mark_non_differentiable(lse, count)
        return loss, lse, count

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_count):
        qf, kf, lse, count, counted, pos_k = ctx.saved_tensors
        p, ops, s = ctx.p, ctx.ops, ctx.s
        need_q = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        need_k = ctx.needs_input_grad[1]
        g = torch.where(counted, g_loss.to(qf.dtype), torch.zeros_like(lse))
        gs = g * s
        # E = exp(z − shift) with shift = LSE − log|s·g|, so s·g·P = f·E with a per-row factor f.
        # The shift is rounded to the tile dtype before it meets the GEMM; f = sign(g)·exp(shift − rounded)
        # carries the rounding error exactly, on the (N, D) side. Uncounted rows get shift +inf: E = 0.
        shift64 = torch.where(gs != 0, lse.double() - gs.abs().double().log(), torch.full_like(lse, math.inf, dtype=torch.float64))
        shift = shift64.to(qf.dtype)
        f = torch.where(gs != 0, torch.sign(gs).double() * torch.exp(shift.double() - shift64), 0.0)
        f = f.to(qf.dtype)[..., None]
        qs = qf * s
        q_f = qf * f
        dq = torch.zeros_like(qf) if need_q else None
        dk = torch.zeros_like(kf) if need_k else None
        G, N, M = qf.shape[0], qf.shape[1], kf.shape[1]
        for g0, g1, r0, r1, c0, c1 in tiles(G, N, M):
            kt = kf[g0:g1, c0:c1]
            e = torch.baddbmm(-shift[g0:g1, r0:r1, None], qs[g0:g1, r0:r1], kt.transpose(1, 2))
            _mask_tile(e, p, g0, g1, r0, r1, c0, c1, -math.inf)
            e.exp_()
            if need_q:
                dq[g0:g1, r0:r1] += torch.bmm(e, kt).mul_(f[g0:g1, r0:r1])
            if need_k:
                dk[g0:g1, c0:c1].baddbmm_(e.transpose(1, 2), q_f[g0:g1, r0:r1])
        w = (gs / count.clamp(min=1))[..., None]                # s·g_i/|P(i)|
        if need_q:
            dq -= w * pos_k
        if need_k:
            dk -= ops.apply_t(w * qf)
        ds = None
        if ctx.needs_input_grad[2]:
            ds = ((dq * qf).sum() / s).to(ctx.scale_dtype)
        dq_out = dq.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dk_out = dk.to(ctx.dtypes[1]) if need_k else None
        return dq_out, dk_out, ds, None


def torch_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count, chunked over keys (see module docstring)."""
    scale = p.scale
    loss, lse, count = _ChunkedInfoNCE.apply(p.q, p.k, scale, p)
    return RowOutputs(loss, lse, count)
