"""Small-problem path of impl="torch": the whole (G, N, M) logit matrix in one batched GEMM.

`torch_tiled.torch_rows` takes this path when the logits of all groups fit `DENSE_MAX_BYTES` (2 MiB, about an
L2 cache; chosen by measurement). There the tiled path's per-tile bookkeeping (row bounds,
per-tile masks, a second GEMM pass in the backward) costs more than the arithmetic, and naive PyTorch wins;
this path does what naive code does, with as few tensor operations as it can and no autograd graph
(each eager operation costs several microseconds whatever its size, which is most of the time at B = 64):

Forward:  z = s·q̂ k̂ᵀ (one bmm; q̂ = q/‖q‖ with normalize, else q); invalid keys and the diagonal set to −inf
          in place; λ = log_softmax(z) (one fused pass), so ℓ_i = −mean_{p∈P(i)} λ_ip; the softmax
          P = exp(λ) is saved; LSE_i = max_j z_ij − max_j λ_ij (exactly m + log Σ exp(z − m)).
          Positives: the index rule gathers λ_ip (no mask); label and radius build the mask Y (G, N, M) bool.
Backward: s·dz = s·g·P − (s·g/|P(i)|)·Y (a scatter for the index rule);  dq̂ = (s·dz) k̂,  dk̂ = (s·dz)ᵀ q̂
          (one bmm of s·(dz + dzᵀ) when q is k and τ is fixed);  ds = Σ_i ⟨dq̂_i, q̂_i⟩ / s;  with
          normalize, dq̂ → dq by the tangent projection in place (rownorm.project_hat_).
Memory: P (and Y) within the budget, and the normalised inputs (the size of the inputs) until the backward.
"""
from __future__ import annotations

import math

import torch

from .problem import ContrastProblem, RowOutputs, stats_dtype
from .rownorm import inv_norms, project_hat_

#: logits of all groups, in the statistics dtype. Measured (docs/cpu_path.md): at 1 MiB (nt_xent B = 256) this
#: path takes half the tiled path's time, at 4 MiB (B = 512) 1.1-1.3x, at 16 MiB (B = 1024) 2x: its many full
#: passes over z leave the cache, where the tiled path makes one GEMM and one exp pass per tile.
DENSE_MAX_BYTES = 2 << 20


def fits(p: ContrastProblem) -> bool:
    """True when the (G, N, M) logits of `p` take at most DENSE_MAX_BYTES in the statistics dtype."""
    G, N, D = p.q.shape
    return G * N * p.k.shape[1] * (8 if p.q.dtype == torch.float64 else 4) <= DENSE_MAX_BYTES


def index_ok(p: ContrastProblem):
    """Index rule: (G, N) bool, whether pos_index_i lies in V(i) (k_valid, ≠ i with exclude_self); None if all."""
    ok = None
    if p.exclude_self:
        ok = p.q_meta != torch.arange(p.q_meta.shape[1], device=p.q_meta.device)
    if p.k_valid is not None:
        kv = p.k_valid.gather(1, p.q_meta)
        ok = kv if ok is None else ok & kv
    return ok


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
        ctx.set_materialize_grads(False)
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
            if same:
                k_inv, kh = q_inv, qh
            else:
                k_inv = inv_norms(kf)
                kh = kf * k_inv[..., None]
        # (alpha=s inside the GEMM rounds differently and measurably worsens the float32 τ gradient)
        z = torch.bmm(qh, kh.transpose(1, 2)).mul_(s)
        if p.k_valid is not None:
            z.masked_fill_(~p.k_valid[:, None, :], -math.inf)
        if p.exclude_self:
            z.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        lsm = torch.log_softmax(z, -1)
        lse = z.amax(-1).sub_(lsm.amax(-1))
        prob = lsm.exp()
        y = None
        if p.rule == "index":
            counted = index_ok(p)    # None: every anchor's positive is valid
            count = (torch.ones_like(p.q_meta, dtype=torch.int32) if counted is None
                     else counted.to(torch.int32))
            pos_term = lsm.gather(2, p.q_meta.unsqueeze(-1)).squeeze(-1)      # λ_ip (−inf if invalid)
        else:
            y = positive_mask(p)
            count = y.sum(-1, dtype=torch.int32)
            counted = count > 0
            pos_term = torch.where(y, lsm, 0.0).sum(-1) / count.clamp(min=1)
        if p.k_valid is not None or z.shape[2] <= int(p.exclude_self):
            # rows without any valid key: λ = NaN; their P is 0 and their LSE −inf
            prob.nan_to_num_(0.0)
            lse.nan_to_num_(-math.inf)
        if p.q_valid is not None:
            counted = p.q_valid.clone() if counted is None else counted.logical_and_(p.q_valid)
            count = count * p.q_valid
        loss = pos_term.neg_() if counted is None else torch.where(counted, pos_term.neg_(), 0.0)

        ctx.s, ctx.same, ctx.normalize, ctx.p = s, same, p.normalize, p
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(prob, y, count, counted, qh, kh, q_inv, k_inv)
        ctx.mark_non_differentiable(lse, count)
        return loss, lse, count

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_count):
        prob, y, count, counted, qh, kh, q_inv, k_inv = ctx.saved_tensors
        s, same = ctx.s, ctx.same
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        if g_loss is None:
            return None, None, None, None
        g = g_loss.to(prob.dtype)
        gs = g * s if counted is None else torch.where(counted, g, 0.0).mul_(s)   # s·g_i (0 if not counted)
        dz = prob * gs.unsqueeze(-1)                                              # s·g·P
        if y is None:   # index rule: |P(i)| = 1 where counted
            dz.scatter_add_(2, ctx.p.q_meta.unsqueeze(-1), gs.neg_().unsqueeze(-1))
        else:
            dz.sub_(y * (gs / count.clamp(min=1)).unsqueeze(-1))
        dq = dk = ds = None
        if same and need_q and not need_s:
            if dz.shape[1] * dz.shape[2] <= 1 << 16:   # tiny: one transposed add beats a second GEMM
                dq = torch.bmm(dz + dz.transpose(1, 2), qh)
            else:
                dq = torch.baddbmm(torch.bmm(dz, qh), dz.transpose(1, 2), qh)
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
                project_hat_(dq, qh, q_inv)
            if dk is not None:
                project_hat_(dk, kh, k_inv)
        dq = dq.to(ctx.dtypes[0]) if need_q else None
        dk = dk.to(ctx.dtypes[1]) if dk is not None else None
        return dq, dk, ds, None


def dense_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count with the (G, N, M) logits in memory (see module docstring)."""
    return RowOutputs(*_DenseInfoNCE.apply(p.q, p.k, p.scale, p))
