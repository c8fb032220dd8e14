"""Chunked PyTorch implementation: exact, any device, extra memory O(tile + (N + M)·D).

Forward, with a per-row bound B_i = s·‖q_i‖·max_j ‖k_j‖ ≥ |z_ij| (Cauchy–Schwarz, valid keys only):
    e    = exp(s·q kᵀ)  or  exp(s·q kᵀ − B)     one GEMM into a reused tile buffer, one in-place exp
    S_i += Σ_j e_ij                               over valid keys; after all tiles LSE_i = log S_i (+ B_i)
Unshifted (`unshifted_ok`: max B + log M ≤ 80 in float32, e.g. normalised features with τ ≳ 0.015) the tile is
a plain GEMM: no bias copy and no β = 1 read of it, and no row can overflow or underflow. Otherwise the bound
is folded into the GEMM (baddbmm) so exp never overflows, and rows whose S_i underflows (every logit more than
~69 below B_i, e.g. unnormalised features or τ ≲ 0.007) are recomputed exactly with a running log-sum-exp.
One GEMM and one exp pass per tile, with no running max.
The positive term Σ_{p∈P(i)} z_ip = s·⟨q_i, (Y k)_i⟩ never touches a tile (see positives.py).

Backward recomputes each tile once and uses it twice (4 GEMM units and 2 exp passes in all):
    E    = exp(z)  or  exp(z − LSE + log|s·g|)     as the forward chose; s·g·P = f·E with a per-row f
    dq  += E k (unscaled, accumulated in place by the GEMM; times f once at the end),  dk += Eᵀ (f·q)
    then the −g·Y part through Y, outside the tiles, and ds = (1/s)·Σ_i ⟨dq_i, q_i⟩ (Σ_j dz_ij z_ij = ⟨dq_i, q_i⟩).
Features of 16-bit dtypes are promoted to float32 once (O((N + M)·D)); gradients are cast back.
On a CPU with several intra-op threads the tiles run on worker threads, one core each (eager/tile_workers.py).

normalize=True: q̂ = q/‖q‖ is never stored. Each tile's q rows are scaled by s/‖q_i‖ in the per-tile copy the
GEMM needs anyway, and each key block by 1/‖k_j‖ (one (KEY_BLOCK, D) copy, reused over the row blocks);
the accumulators hold dq̂ and dk̂, projected onto the tangent space in place at the end (rownorm.project_).
Problems whose logits fit torch_dense.DENSE_MAX_BYTES (4 MiB) take the dense path instead (eager/dense.py).
"""
from __future__ import annotations

import math

import torch

from .. import index_terms
from . import double_backward, self_tiles, tile_workers, dense as torch_dense
from ..positives import PositiveOperator
from ..problem import ContrastProblem, RowOutputs, stats_dtype
from ..rownorm import project_, rowdot
from .tile_operands import Operands

TILE_ELEMENTS = 1 << 19  # groups per tile: at most this many logits when a group is smaller than a tile
ROW_BLOCK = 512
KEY_BLOCK = 2048   # 512×2048 tiles: best of 7 shapes at 1 and 2 threads (docs/cpu_path.md)


def tiles(G: int, N: int, M: int, budget: int = TILE_ELEMENTS):
    """Yield (g0, g1, r0, r1, c0, c1): group chunks × row blocks × key blocks covering (G, N, M)."""
    br, bc = max(1, min(N, ROW_BLOCK)), max(1, min(M, KEY_BLOCK))
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
    if p.exclude_self and max(r0, c0) < min(r1, c1):  # the diagonal j == i crosses this tile
        z.diagonal(offset=r0 - c0, dim1=1, dim2=2).fill_(fill)


IN_TILE_MAX_KEYS = 512  # up to this many keys per group, positives are masked inside the tile


def tile_positives(p: ContrastProblem, g0, g1, r0, r1, c0, c1) -> torch.Tensor:
    """P restricted to one tile, (g1−g0, r1−r0, c1−c0) bool, from the per-row metadata (no N×M state)."""
    qm = p.q_meta[g0:g1, r0:r1, None]
    if p.rule == "index":
        pos = qm == torch.arange(c0, c1, device=qm.device)[None, None, :]
    elif p.rule == "label":
        pos = qm == p.k_meta[g0:g1, None, c0:c1]
    else:
        pos = (qm - p.k_meta[g0:g1, None, c0:c1]).abs() < p.threshold
    if p.k_valid is not None:
        pos &= p.k_valid[g0:g1, None, c0:c1]
    if p.exclude_self:
        lo, hi = max(r0, c0), min(r1, c1)
        if lo < hi:
            idx = torch.arange(lo, hi, device=pos.device)
            pos[:, idx - r0, idx - c0] = False
    return pos


#: S_i below this is treated as underflowed (its largest term < e^-69): the row is recomputed exactly
UNDERFLOW = 1e-30


def row_bound(qn: torch.Tensor, kn: torch.Tensor, p: ContrastProblem, scale: float) -> torch.Tensor:
    """B (G, N) with B_i ≥ z_ij = s·⟨q_i, k_j⟩ for every valid key j of the group (0 when there is none),
    from the row norms qn (G, N) and kn (G, M) of the operands (of q̂ and k̂ with normalize)."""
    if p.k_valid is not None:
        kn = kn.masked_fill(~p.k_valid, 0.0)
    kmax = kn.amax(dim=1, keepdim=True) if kn.shape[1] else kn.new_zeros(kn.shape[0], 1)
    return qn * (kmax * scale)


def _valid_keys(p: ContrastProblem) -> torch.Tensor:
    """|V(i)| (G, N): valid keys of each anchor's group, minus the anchor itself under exclude_self."""
    G, N, M, _ = p.shape
    dev = p.q.device
    n = (p.k_valid.sum(1, keepdim=True) if p.k_valid is not None
         else torch.full((G, 1), M, device=dev)).expand(G, N).clone()
    if p.exclude_self:
        d = min(N, M)
        self_valid = p.k_valid[:, :d] if p.k_valid is not None else torch.ones(G, d, dtype=torch.bool, device=dev)
        n[:, :d] -= self_valid.to(n.dtype)
    return n


def _exact_lse_rows(ops: Operands, p: ContrastProblem, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """Running log-sum-exp for the anchors `rows` ((R, 2) of (group, anchor)), key block by key block."""
    q, k = ops.qf, ops.kf
    out = q.new_full((rows.shape[0],), -math.inf)
    for g in rows[:, 0].unique().tolist():
        sel = (rows[:, 0] == g).nonzero()[:, 0]
        idx = rows[sel, 1]
        lse = q.new_full((idx.shape[0],), -math.inf)
        for c0 in range(0, k.shape[1], KEY_BLOCK):
            c1 = min(k.shape[1], c0 + KEY_BLOCK)
            qs = q[g, idx] * (scale if ops.q_inv is None else ops.q_inv[g, idx, None] * scale)
            z = qs @ ops.k_block(g, g + 1, c0, c1)[0].T
            if p.k_valid is not None:
                z.masked_fill_(~p.k_valid[g, None, c0:c1], -math.inf)
            if p.exclude_self:
                hit = (idx >= c0) & (idx < c1)
                z[hit.nonzero()[:, 0], idx[hit] - c0] = -math.inf
            torch.logaddexp(lse, torch.logsumexp(z, -1), out=lse)
        out[sel] = lse
    return out


#: largest log-magnitude the unshifted path lets exp(z) and its sums reach (float32 overflows at e^88.7,
#: float64 at e^709): below it the tiles need no per-row shift (see `unshifted_ok`)
UNSHIFTED_MAX_LOG = {torch.float32: 80.0, torch.float64: 700.0}


def unshifted_ok(bound: torch.Tensor, ops: "Operands", M: int) -> bool:
    """True when exp(z) itself is safe for every tile: max_i B_i + log M + log max(1, max_j ‖k_j‖) stays below
    UNSHIFTED_MAX_LOG, so exp(z_ij) ≤ e^{B_i}, the row sums S_i ≤ M·e^{B_i}, the unscaled Σ_j E_ij k_j and
    1/S_i are all finite, normal numbers. Since |z_ij| ≤ B_i both ways, no row underflows either.
    Then the tiles are plain GEMMs (no bias copy, no β = 1 read of it): normalised features with τ ≳ 0.015."""
    if bound.numel() == 0:
        return True
    kmax = float(ops.kn.amax()) if ops.kn.numel() else 0.0
    head = float(bound.amax()) + math.log(max(M, 1)) + math.log(max(kmax, 1.0))
    return head <= UNSHIFTED_MAX_LOG[ops.qf.dtype]


def tile_dims(G: int, N: int, M: int) -> tuple:
    """(groups, rows, keys) of the largest tile `tiles` yields."""
    br, bc = max(1, min(N, ROW_BLOCK)), max(1, min(M, KEY_BLOCK))
    return max(1, min(G, TILE_ELEMENTS // (br * bc))), br, bc


class TileBuffer:
    """One reused (g, r, c) logit tile: a fresh multi-MiB tensor per tile costs page faults on first touch."""

    def __init__(self, G: int, N: int, M: int, like: torch.Tensor):
        gc, br, bc = tile_dims(G, N, M)
        self.flat = like.new_empty(gc * br * bc)

    def logits(self, ops: "Operands", g0, g1, r0, r1, c0, c1, row_factor, shift) -> torch.Tensor:
        """row_factor_i·⟨q_i, k_j⟩ (− shift_i) for one tile, into the buffer: one GEMM (with the bias folded
        in when shifted). row_factor from `Operands.row_factor`."""
        qt, kt = ops.q_tile(g0, g1, r0, r1, row_factor), ops.k_block(g0, g1, c0, c1)
        out = self.flat[: (g1 - g0) * (r1 - r0) * (c1 - c0)].view(g1 - g0, r1 - r0, c1 - c0)
        if shift is None:
            return torch.bmm(qt, kt.transpose(1, 2), out=out)
        return torch.baddbmm(-shift[g0:g1, r0:r1, None], qt, kt.transpose(1, 2), out=out)


def _forward_tiles(ops: Operands, p: ContrastProblem, scale: float, in_tile: bool, same: bool = False):
    """LSE_i (G, N), −inf where V(i) is empty; with in_tile also Σ_{P(i)} z and |P(i)| from tile masks; whether
    the tiles were shifted by the bound (False: plain exp(z), see `unshifted_ok`); and whether the symmetric
    self-contrast tiling ran (eager/self_tiles.py; `same`: k is q)."""
    qf = ops.qf
    G, N, M = qf.shape[0], qf.shape[1], ops.kf.shape[1]
    bound = row_bound(ops.qn, ops.kn, p, scale)
    if not bool(torch.isfinite(bound).all()):  # inf/nan features: no bound, every row the exact way
        rows = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(N), indexing="ij"), -1).reshape(-1, 2)
        bound = qf.new_zeros(G, N)
    else:
        rows = None
    shifted = rows is not None or not unshifted_ok(bound, ops, M)
    total = qf.new_zeros(G, N)
    pos_sum = qf.new_zeros(G, N) if in_tile else None
    count = torch.zeros(G, N, dtype=torch.int32, device=qf.device) if in_tile else None
    qfac = ops.row_factor(scale)

    def tile(state, t):   # writes rows [r0, r1) only: workers own row blocks
        buf, ops_w = state
        g0, g1, r0, r1, c0, c1 = t
        e = buf.logits(ops_w, g0, g1, r0, r1, c0, c1, qfac, bound if shifted else None)
        _mask_tile(e, p, g0, g1, r0, r1, c0, c1, -math.inf)
        if in_tile:
            pos = tile_positives(p, g0, g1, r0, r1, c0, c1)
            pos_sum[g0:g1, r0:r1].add_(torch.where(pos, e, 0.0).sum(-1))
            count[g0:g1, r0:r1].add_(pos.sum(-1, dtype=torch.int32))
        total[g0:g1, r0:r1].add_(e.exp_().sum(-1))

    symmetric = self_tiles.applies(p, same, shifted, in_tile)
    if symmetric:
        total = self_tiles.forward_sums(ops, p, scale, TILE_ELEMENTS)
    else:
        tile_workers.run(list(tiles(G, N, M)), "rows",
                         lambda: (TileBuffer(G, N, M, qf), ops.worker_copy(*tile_dims(G, N, M))), tile, qf.device)
    if rows is None:   # unshifted, no row can underflow (|z_ij| ≤ B_i)
        rows = ((total < UNDERFLOW) & (_valid_keys(p) > 0)).nonzero() if shifted else total.new_empty(0, 2)
    lse = total.log_()
    if shifted:
        lse += bound
        if in_tile:
            pos_sum += count * bound
    if rows.shape[0]:
        lse[rows[:, 0], rows[:, 1]] = _exact_lse_rows(ops, p, scale, rows.to(qf.device))
    return lse, pos_sum, count, shifted, symmetric


class _ChunkedInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem):
        sdt = stats_dtype(q.dtype)
        qf, kf = q.detach().to(sdt), k.detach().to(sdt)
        s = float(scale)
        ops = Operands(qf, kf, p.normalize, q is k)
        # Few keys per group (MACL's per-location groups): masks inside the tile are cheapest. Many keys:
        # the positives go through the linear operator Y, in O((N + M)·D), never through a tile.
        in_tile = kf.shape[1] <= IN_TILE_MAX_KEYS
        lse, pos_sum, count, shifted, symmetric = _forward_tiles(ops, p, s, in_tile, q is k)
        pos_op = None
        if not in_tile:
            pos_op = PositiveOperator(p)
            count = pos_op.apply(kf.new_ones(kf.shape[0], kf.shape[1], 1))[..., 0].round().to(torch.int32)
            if p.rule == "index":   # one positive: in row chunks, no (N, D) gather
                pos_sum = index_terms.pos_dot(qf, kf, p.q_meta, ops.q_inv, ops.k_inv) * s
            else:
                pos_sum = rowdot(qf, pos_op.apply(ops.k_hat())) * s  # s·⟨q_i, Σ_{p∈P(i)} k_p⟩ (q̂, k̂)
                if ops.q_inv is not None:
                    pos_sum *= ops.q_inv
        counted = count > 0
        if p.q_valid is not None:
            counted &= p.q_valid
            count = count * p.q_valid
        loss = torch.where(counted, lse - pos_sum / count.clamp(min=1), torch.zeros_like(lse))

        ctx.p, ctx.pos_op, ctx.s, ctx.in_tile, ctx.shifted, ctx.symmetric = p, pos_op, s, in_tile, shifted, symmetric
        ctx.inv = (ops.q_inv, ops.k_inv)
        ctx.same = q is k
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(qf, kf, lse, count, counted, q, None if q is k else k,
                              scale if isinstance(scale, torch.Tensor) else None)
        ctx.mark_non_differentiable(lse, count)
        return loss, lse, count

    @staticmethod
    def backward(ctx, g_loss, _g_lse, _g_count):
        qf, kf, lse, count, counted, q_in, k_in, scale_in = ctx.saved_tensors
        p, pos_op, s, in_tile = ctx.p, ctx.pos_op, ctx.s, ctx.in_tile
        if double_backward.create_graph_requested():   # create_graph=True: a gradient with its own graph
            k_in = q_in if ctx.same else k_in
            sc = scale_in if scale_in is not None else s
            rows = lambda: (double_backward.differentiable_rows(q_in, k_in, sc, p) * g_loss).sum()  # noqa: E731
            return (*double_backward.grads_with_graph(rows, (q_in, k_in, scale_in), ctx.needs_input_grad[:3]),
                    None)
        ops = Operands.__new__(Operands)
        ops.qf, ops.kf, (ops.q_inv, ops.k_inv), ops._block = qf, kf, ctx.inv, None
        need_q = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        need_k = ctx.needs_input_grad[1]
        g = torch.where(counted, g_loss.to(qf.dtype), torch.zeros_like(lse))
        gs = g * s
        active = gs != 0
        w = gs / count.clamp(min=1)                             # s·g_i/|P(i)|
        if ctx.shifted:
            # E = exp(z − shift) with shift = LSE − log|s·g|, so s·g·P = f·E with a per-row factor f.
            # The shift is rounded to the tile dtype before it meets the GEMM; f = sign(g)·exp(shift − rounded)
            # carries the rounding error exactly, on the (N, D) side. Uncounted rows get shift +inf: E = 0.
            shift64 = torch.where(active, lse.double() - gs.abs().double().log(),
                                  torch.full_like(lse, math.inf, dtype=torch.float64))
            shift = shift64.to(qf.dtype)
            f64 = torch.where(active, torch.sign(gs).double() * torch.exp(shift.double() - shift64), 0.0)
        else:
            # E = exp(z) is safe (`unshifted_ok`): s·g·P = f·E with f = s·g·exp(−LSE), a plain GEMM per tile
            shift = None
            f64 = torch.where(active, gs.double() * torch.exp(-lse.double()), 0.0)
        f = f64.to(qf.dtype)[..., None]
        # In-tile positives: s·g·(P − Y) = f·(E − c·Y) with c = w/f.
        c = torch.where(active, w.double() / torch.where(active, f64, 1.0), 0.0).to(qf.dtype)[..., None]
        # f is constant along a row: dq accumulates Σ_j (E − c·Y)_ij k_j unscaled (GEMMs accumulate in place)
        # and is scaled once at the end; dk takes f on the q side of each tile.
        G, N, M = qf.shape[0], qf.shape[1], kf.shape[1]
        qs_fac, qf_fac = ops.row_factor(s), ops.row_factor(f)

        def tile(state, t):   # writes dq rows [r0, r1) and dk rows [c0, c1): workers run a Latin square
            buf, ops_w = state
            g0, g1, r0, r1, c0, c1 = t
            kt = ops_w.k_block(g0, g1, c0, c1)
            # Shifted: the GEMM accumulates onto −shift, so partial sums stay near z − shift, which keeps large
            # logits accurate (alpha=s would round s·⟨q, k⟩ first; measurably worse for |z| ~ 1e4).
            e = buf.logits(ops_w, g0, g1, r0, r1, c0, c1, qs_fac, shift)
            _mask_tile(e, p, g0, g1, r0, r1, c0, c1, -math.inf)
            e.exp_()
            if in_tile:
                e.sub_(tile_positives(p, g0, g1, r0, r1, c0, c1) * c[g0:g1, r0:r1])
            if need_q:
                dq[g0:g1, r0:r1].baddbmm_(e, kt)
            if need_k:
                dk[g0:g1, c0:c1].baddbmm_(e.transpose(1, 2), ops_w.q_tile(g0, g1, r0, r1, qf_fac))

        # q is k (self-contrast) and no temperature gradient: one tensor takes both contributions.
        merged = ctx.same and need_q and need_k and not ctx.needs_input_grad[2]
        if ctx.symmetric:   # k is q: both gradients from half the tiles (eager/self_tiles.py)
            dq, dk = self_tiles.backward_grads(ops, p, s, f, TILE_ELEMENTS, merged)
        else:
            dq = torch.zeros_like(qf) if need_q else None
            dk = torch.zeros_like(kf) if need_k else None
            tile_workers.run(list(tiles(G, N, M)), "latin",
                             lambda: (TileBuffer(G, N, M, qf), ops.worker_copy(*tile_dims(G, N, M))), tile, qf.device)
            if need_q:
                dq.mul_(f)
            if merged:
                dk = dq.add_(dk)
        if not in_tile and p.rule == "index":
            coef = w if pos_op.all_ok else w * pos_op.index_ok   # c_i = s·g_i (|P(i)| = 1 where counted)
            index_terms.sub_pos_grads_(dq if need_q else None, dk if need_k else None, qf, kf, p.q_meta, coef,
                                       ops.q_inv, ops.k_inv)
        elif not in_tile:
            w = w[..., None]
            if need_q:
                dq.addcmul_(w, pos_op.apply(ops.k_hat()), value=-1.0)   # − w_i Σ_{p∈P(i)} k_p
            if need_k:
                dk -= pos_op.apply_t(ops.q_hat(w))
        ds = None
        if ctx.needs_input_grad[2]:   # Σ_i ⟨dq̂_i, q̂_i⟩ / s
            qd = rowdot(dq, qf)
            ds = ((qd if ops.q_inv is None else qd * ops.q_inv).sum() / s).to(ctx.scale_dtype)
        if ops.q_inv is not None:   # gradients w.r.t. q̂, k̂ -> w.r.t. q, k (merged: one buffer, one x)
            if dq is not None:
                project_(dq, qf, ops.q_inv)
            if dk is not None and dk is not dq:
                project_(dk, kf, ops.k_inv)
        dq_out = dq.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dk_out = dk.to(ctx.dtypes[1]) if need_k and not merged else None
        return dq_out, dk_out, ds, None


def torch_rows(p: ContrastProblem) -> RowOutputs:
    """Per-anchor loss, LSE and positive count: one GEMM when the logits fit torch_dense.DENSE_MAX_BYTES, else
    chunked over keys (see module docstring)."""
    if torch_dense.fits(p):
        return torch_dense.dense_rows(p)
    scale = p.scale
    loss, lse, count = _ChunkedInfoNCE.apply(p.q, p.k, scale, p)
    return RowOutputs(loss, lse, count)
