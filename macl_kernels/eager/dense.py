"""Small-problem path of impl="torch": the whole (G, N, M) logit matrix in one batched GEMM.

`torch_tiled.torch_rows` takes this path when the logits of all groups fit `DENSE_MAX_BYTES` (4 MiB, chosen by
measurement); `api._dispatch` calls `dense_reduced` directly for a reduced loss, and the
drop-in losses `dense_loss` (eager/small_path.py). There the tiled path's per-tile bookkeeping costs more than the
arithmetic; this path does what naive code does with fewer tensor operations and no autograd graph: at B = 64
each eager operation costs several microseconds whatever its size, and more with a cold cache (docs/cpu_path.md).

Forward:  z = s·q̂ k̂ᵀ (one bmm; q̂ = q / max(‖q‖, ε) with normalize, else q); invalid keys and the diagonal
          set to −inf in place; λ = log_softmax(z) written over z (CPU); ℓ_i = −mean_{p∈P(i)} λ_ip; then
          P = exp(λ) in the same buffer, kept for the backward; LSE_i = max_j z_ij − max_j λ_ij.
          Positives: the index rule gathers λ_ip (or, for the loss alone, aten's nll_loss reduces it in one
          kernel); label and radius build the mask Y (G, N, M) bool.
          The reduction ("mean" over counted anchors, "sum") happens inside, so it has no autograd nodes;
          without `rows` (the losses' shortcut) no per-anchor loss, LSE or count is made.
Backward: s·dz = s·g·P − (s·g/|P(i)|)·Y (a scatter for the index rule), in P's buffer (a second backward with
          retain_graph recomputes P);  dq̂ = (s·dz) k̂,  dk̂ = (s·dz)ᵀ q̂ (one bmm of s·(dz + dzᵀ) when q is k
          and τ is fixed);  ds = Σ_i ⟨dq̂_i, q̂_i⟩ / s;  with normalize, dq̂ → dq by the tangent projection.
          2-D inputs (`flat`) and the two halves of nt_xent (`pair`) get their gradients directly, so that the
          graph has no unsqueeze or concatenation node.
Memory: P (and Y) within the budget, and the normalised inputs (the size of the inputs) until the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import const_cache, double_backward
from ..problem import ContrastProblem, RowOutputs, stats_dtype
from ..rownorm import EPS

#: logits of all groups, in the statistics dtype. Measured (docs/cpu_path.md, fwd+bwd, 1 thread, CPU time): at
#: 1 MiB (nt_xent B = 256) this path takes 0.4-0.6x the tiled path's time, at 4 MiB (B = 512) 0.7x (nt_xent) to
#: 1.0x (sup_con), at 8 MiB 0.7x (nt_xent) to 1.1x (sup_con), at 16 MiB (B = 1024) 0.75-1.35x: its full passes
#: over z leave the cache, where the tiled path makes one GEMM and one exp pass per tile.
DENSE_MAX_BYTES = 4 << 20

_NLL_MEAN, _NLL_SUM = 1, 2   # reduction codes of aten's nll_loss


def fits(p: ContrastProblem) -> bool:
    """True when the (G, N, M) logits of `p` take at most DENSE_MAX_BYTES in the statistics dtype."""
    G, N, D = p.q.shape
    return G * N * p.k.shape[1] * (8 if p.q.dtype == torch.float64 else 4) <= DENSE_MAX_BYTES


def index_ok(p: ContrastProblem):
    """Index rule: (G, N) bool, whether pos_index_i lies in V(i) (k_valid, ≠ i with exclude_self); None if all."""
    ok = None
    if p.exclude_self and not _never_self(p.q_meta):
        ok = p.q_meta != torch.arange(p.q_meta.shape[1], device=p.q_meta.device)
    if p.k_valid is not None:
        kv = p.k_valid.gather(1, p.q_meta)
        ok = kv if ok is None else ok & kv
    return ok


def _never_self(q_meta: torch.Tensor) -> bool:
    """True when q_meta is a cached index known to hold pos_index_i != i (nt_xent's other view)."""
    trust = const_cache.trusted(q_meta)
    return trust is not None and trust.never_self


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
    """Outputs: (loss, lse, count) for reduction="none"; else the reduced loss, followed by (loss, lse, count)
    when `rows`. With the reduction inside, a small call needs no autograd nodes (nor eager operations) for it,
    and without `rows` no LSE or count is computed at all.
    pair: q and k are the two 2-D halves of a self-contrast problem whose features p.q = p.k (1, N, D) are
    their concatenation (made without autograd): the function takes the halves' gradients itself, so that
    the graph has no concatenation node."""

    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem, reduction: str, rows: bool, pair: bool = False):
        ctx.set_materialize_grads(False)
        inputs = (q, None if k is q else k, scale if isinstance(scale, torch.Tensor) else None)
        rows = rows or reduction == "none"
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.pair = q.shape[0] if pair else None   # the first half's rows
        if pair:
            q = k = p.q
        same = k is q
        ctx.flat = q.dim() == 2   # the caller's 2-D tensors (p.q is q[None]): no unsqueeze node in the graph
        if ctx.flat:
            q = q.unsqueeze(0)
            k = q if same else k.unsqueeze(0)
        sdt = stats_dtype(q.dtype)
        qf = q if q.dtype == sdt else q.to(sdt)   # (forward runs without autograd: no detach needed)
        kf = qf if same else (k if k.dtype == sdt else k.to(sdt))
        s = float(scale)
        q_norm = k_norm = None
        qh, kh = qf, kf
        if p.normalize:   # exactly F.normalize: x / max(‖x‖, ε)
            q_norm = torch.linalg.vector_norm(qf, dim=-1, keepdim=True).clamp_min_(EPS)
            qh = qf / q_norm
            if same:
                k_norm, kh = q_norm, qh
            else:
                k_norm = torch.linalg.vector_norm(kf, dim=-1, keepdim=True).clamp_min_(EPS)
                kh = kf / k_norm
        lsm, zmax = _log_softmax_logits(qh, kh, s, p, with_max=rows)
        lse = zmax.sub_(lsm.amax(-1)) if rows else None
        y = count = c1 = pos_term = None
        if p.rule == "index":
            counted = index_ok(p)    # None: every anchor's positive is valid
            if counted is None and p.q_valid is None and not rows:
                # ℓ_i = −λ_ip for every anchor: the reduction is the negative log-likelihood of pos_index,
                # in one kernel (naive code's own, so often still in the cache)
                G, N, M = lsm.shape
                ctx.n = G * N
                red = torch._C._nn.nll_loss(lsm.view(G * N, M), p.q_meta.view(-1), None,
                                            _NLL_MEAN if reduction == "mean" else _NLL_SUM, -100)
            else:
                pos_term = lsm.gather(2, _column(p.q_meta)).squeeze(-1)       # λ_ip (−inf if invalid)
        else:
            y = positive_mask(p)
            count = y.sum(-1, dtype=torch.int32)
            counted = count > 0
            c1 = count.clamp(min=1)
            pos_term = torch.where(y, lsm, 0.0).sum(-1).div_(c1)   # mean of λ over P(i); exactly 0 if empty
        prob = _probabilities_(lsm, p)   # λ is not needed any more: P = exp(λ) in its buffer
        if p.q_valid is not None:
            counted = p.q_valid.clone() if counted is None else counted.logical_and_(p.q_valid)
            if count is not None:
                count = count * p.q_valid

        ctx.s, ctx.same, ctx.normalize, ctx.p, ctx.reduction = s, same, p.normalize, p, reduction
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(y, c1, counted, qh, kh, q_norm, k_norm, *inputs)
        ctx.prob = prob   # not saved_tensors: the backward takes it over and turns it into dz in place
        if not rows:      # the reduction straight from the positive terms, where no anchor needs masking
            if pos_term is None:
                return red
            if y is not None and p.q_valid is None:   # anchors without a positive have a term of exactly 0
                red = pos_term.sum()
                if reduction == "mean":
                    ctx.n = counted.sum().clamp_(min=1)
                    red.div_(ctx.n)
                return red.neg_()
        loss = pos_term.neg_() if counted is None else torch.where(counted, pos_term.neg_(), 0.0)
        if reduction == "sum":
            red = loss.sum()
        elif reduction == "mean":   # over counted anchors (0 if none); ctx.n is what the backward divides by
            ctx.n = loss.numel() if counted is None else counted.sum().clamp_(min=1)
            red = loss.mean() if counted is None else loss.sum() / ctx.n
        if not rows:
            return red
        if _may_have_empty_rows(p):
            lse.nan_to_num_(-math.inf)
        if count is None:   # index rule: |P(i)| = 1 where counted
            count = (torch.ones_like(p.q_meta, dtype=torch.int32) if counted is None
                     else counted.to(torch.int32))
        ctx.mark_non_differentiable(lse, count)
        return (loss, lse, count) if reduction == "none" else (red, loss, lse, count)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.reduction == "none":
            g_red, g_rows = None, grads[0]
        else:
            g_red, g_rows = grads[0], (grads[1] if len(grads) > 1 else None)
        if g_red is None and g_rows is None:
            return None, None, None, None, None, None, None
        y, c1, counted, qh, kh, q_norm, k_norm, *inputs = ctx.saved_tensors
        if double_backward.create_graph_requested():   # create_graph=True: a gradient with its own graph
            return _backward_with_graph(ctx, g_red, g_rows, *inputs)
        prob, ctx.prob = ctx.prob, None
        if prob is None:   # a second backward through this graph (retain_graph=True): the first consumed P
            prob = _probabilities_(_log_softmax_logits(qh, kh, ctx.s, ctx.p, with_max=False)[0], ctx.p)
        s, same = ctx.s, ctx.same
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        if ctx.pair is not None:   # one features tensor (q is k), split at the end
            need_q = need_k = need_q or need_k
        # s·g_i with g_i = dL/dℓ_i: (G, N), or 0-d when the same for every anchor (the reduction's own gradient)
        if g_rows is None and counted is None:
            gs = g_red * (s / ctx.n) if ctx.reduction == "mean" else g_red * s
        else:
            g = g_red / ctx.n if g_red is not None and ctx.reduction == "mean" else g_red
            if g_rows is not None:
                g = g_rows if g is None else g_rows + g
            if counted is None:
                gs = g * s
            elif g.dim() == 0:   # the reduction's gradient alone: the same for every counted anchor
                gs = counted * (g * s)
            else:
                gs = torch.where(counted, g, 0.0).mul_(s)   # 0 if not counted
        if gs.dtype != prob.dtype:
            gs = gs.to(prob.dtype)
        gs3 = gs.unsqueeze(-1) if gs.dim() else gs
        if y is None:   # index rule, |P(i)| = 1 where counted: s·dz = s·g·(P − onehot(pos_index))
            idx = _column(ctx.p.q_meta)
            dz = prob.scatter_add_(2, idx, const_cache.filled(idx.shape, -1.0, prob.dtype, prob.device)).mul_(gs3)
        else:           # s·dz = s·g·P − (s·g/|P(i)|)·Y (gs is 0 where count is 0)
            dz = prob.mul_(gs3).addcmul_(y, (gs / c1).unsqueeze(-1), value=-1.0)
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
                _project(dq, qh, q_norm)
            if dk is not None:
                _project(dk, kh, k_norm)
        if ctx.pair is not None:
            return _split_pair(ctx, dq, ds)
        if not need_q:
            dq = None
        elif dq.dtype != ctx.dtypes[0]:
            dq = dq.to(ctx.dtypes[0])
        if dk is not None and dk.dtype != ctx.dtypes[1]:
            dk = dk.to(ctx.dtypes[1])
        if ctx.flat:
            dq = dq[0] if dq is not None else None
            dk = dk[0] if dk is not None else None
        return dq, dk, ds, None, None, None, None


def _backward_with_graph(ctx, g_red, g_rows, q_in, k_in, scale_in):
    """The backward's outputs as differentiable functions of the inputs (eager/double_backward.py): the
    loss is recomputed with plain torch operations, from the tensors `forward` received."""
    same = k_in is None
    k_in = q_in if same else k_in

    def total():
        if ctx.pair is not None:
            q = k = torch.cat([q_in, k_in])[None]
        else:
            q = q_in[None] if ctx.flat else q_in
            k = q if same else (k_in[None] if ctx.flat else k_in)
        rows = double_backward.differentiable_rows(q, k, scale_in if scale_in is not None else ctx.s, ctx.p)
        out = rows.new_zeros(())
        if g_red is not None:
            red = rows.sum()
            out = out + g_red * (red / ctx.n if ctx.reduction == "mean" else red)
        if g_rows is not None:
            out = out + (g_rows * rows).sum()
        return out

    grads = double_backward.grads_with_graph(total, (q_in, k_in, scale_in), ctx.needs_input_grad[:3])
    return (*grads, None, None, None, None)


def _split_pair(ctx, dq, ds):
    """The backward's outputs for `pair`: the gradient rows of each half, in each half's dtype."""
    need_1, need_2 = ctx.needs_input_grad[:2]
    d1 = d2 = None
    if dq is not None:
        dq = dq[0]
        if need_1:
            d1 = dq[:ctx.pair] if dq.dtype == ctx.dtypes[0] else dq[:ctx.pair].to(ctx.dtypes[0])
        if need_2:
            d2 = dq[ctx.pair:] if dq.dtype == ctx.dtypes[1] else dq[ctx.pair:].to(ctx.dtypes[1])
    return d1, d2, ds, None, None, None, None


def _log_softmax_logits(qh: torch.Tensor, kh: torch.Tensor, s: float, p: ContrastProblem, with_max: bool):
    """(λ, max_j z_ij or None): λ = log_softmax(z) along keys, (G, N, M), of z = s·q̂ k̂ᵀ with invalid keys and
    (with exclude_self) the diagonal at −inf; on a CPU λ is written over z's own buffer (one (G, N, M) buffer)."""
    # (alpha=s inside the GEMM rounds differently and measurably worsens the float32 τ gradient)
    z = torch.bmm(qh, kh.transpose(1, 2)).mul_(s)
    if p.k_valid is not None:
        z.masked_fill_(~p.k_valid.unsqueeze(1), -math.inf)
    if p.exclude_self:
        z.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    zmax = z.amax(-1) if with_max else None
    if z.device.type == "cpu":   # the CPU kernel reads each row (max, sum) before it writes it: in place is exact
        return torch._log_softmax(z, -1, False, out=z), zmax
    return torch.log_softmax(z, -1), zmax


def _may_have_empty_rows(p: ContrastProblem) -> bool:
    """Whether some anchor may have no valid key at all (its λ row is NaN)."""
    return p.k_valid is not None or p.k.shape[1] <= int(p.exclude_self)


def _probabilities_(lsm: torch.Tensor, p: ContrastProblem) -> torch.Tensor:
    """P = exp(λ) in place; 0 on rows without any valid key (where λ is NaN)."""
    prob = lsm.exp_()
    return prob.nan_to_num_(0.0) if _may_have_empty_rows(p) else prob


def _column(q_meta: torch.Tensor) -> torch.Tensor:
    """q_meta (G, N) as a (G, N, 1) gather/scatter index: cached for `const_cache` indices."""
    return const_cache.column(q_meta) if const_cache.trusted(q_meta) is not None else q_meta.unsqueeze(-1)


def _project(dx_hat: torch.Tensor, x_hat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """In place: the gradient w.r.t. x̂ = x / norm (norm = max(‖x‖, ε), (..., 1)) becomes the one w.r.t. x,
    (dx̂ − x̂⟨x̂, dx̂⟩) / norm, or dx̂ / ε where the norm was clamped (as autograd through F.normalize gives)."""
    r = (x_hat * dx_hat).sum(-1, keepdim=True).masked_fill_(norm <= EPS, 0.0)
    return dx_hat.addcmul_(x_hat, r, value=-1.0).div_(norm)


def _apply(q, k, scale, *rest):
    """`_DenseInfoNCE.apply` without `torch.autograd.Function.apply`'s Python wrapper when no functorch
    transform is active (the wrapper then only unwraps dead functorch wrappers, done here too): a few
    microseconds of Python that a cold-cache small call feels."""
    if _C_APPLY is None or torch._C._are_functorch_transforms_active():
        return _DenseInfoNCE.apply(q, k, scale, *rest)
    if isinstance(scale, torch.Tensor):
        scale = _unwrap_if_dead(scale)
    return _C_APPLY(_unwrap_if_dead(q), _unwrap_if_dead(k), scale, *rest)


try:   # private torch API: fall back to the public apply if it moves
    _C_APPLY = super(torch.autograd.Function, _DenseInfoNCE).apply
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
except AttributeError:  # pragma: no cover
    _C_APPLY = None


def dense_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count with the (G, N, M) logits in memory (see module docstring)."""
    return RowOutputs(*_apply(p.q, p.k, p.scale, p, "none", True))


def dense_reduced(p: ContrastProblem, reduction: str, flat: Optional[tuple] = None
                  ) -> tuple[RowOutputs, torch.Tensor]:
    """`dense_rows` and the reduced loss ("mean" over counted anchors, or "sum") from one autograd function.

    The reduced loss equals `loss.sum() / max(#counted, 1)` ("mean") or `loss.sum()` of the rows, with its
    gradient flowing through the same hand-written backward (no autograd nodes for the reduction); the rows
    stay differentiable too. `flat`: (q, k) as the caller gave them when they were 2-D (p.q is q[None], p.k is
    k[None], or k is None for self-contrast): the function then takes them directly, so that the graph has no
    unsqueeze node (the outputs are (1, N) all the same). Raises ValueError for any other reduction.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' here, got {reduction!r}")
    q, k = p.q, p.k
    if flat is not None:
        q, k = flat[0], (flat[0] if p.k is p.q else flat[1])
    red, loss, lse, count = _apply(q, k, p.scale, p, reduction, True)
    return RowOutputs(loss, lse, count), red


def dense_loss(p: ContrastProblem, reduction: str, flat: Optional[tuple] = None,
               pair: Optional[tuple] = None) -> torch.Tensor:
    """The reduced loss of `dense_reduced` alone (no per-anchor loss, LSE or count is computed).

    pair: (a, b), 2-D, for a self-contrast p whose p.q = p.k is cat([a, b])[None] made without autograd: the
    gradient flows to a and b directly (no concatenation node in the graph). Raises ValueError for a
    reduction other than "mean" and "sum".
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' here, got {reduction!r}")
    if pair is not None:
        return _apply(pair[0], pair[1], p.scale, p, reduction, False, True)
    q, k = p.q, p.k
    if flat is not None:
        q, k = flat[0], (flat[0] if p.k is p.q else flat[1])
    return _apply(q, k, p.scale, p, reduction, False)
