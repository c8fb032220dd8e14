"""The backward of the Gradient Filter (`macl_kernels.filter.filtered`; see its module docstring): each tile recomputed
once, dz = g·(P^F − Y) on the kept pairs {positives} ∪ {allowed: z' ≥ t'} applied through two GEMMs, dq rows
per row block and dk per worker (transposed partials, summed at the end)."""
from __future__ import annotations

import math

import torch

from .bracket import chunks_of
from .select import Workspace, _clear_self


def backward(ctx, g_loss, shifted_logits, filter_tiles, run):
    """(dq, dk, ds) of `filtered._FilteredInfoNCE` (None where not needed). ctx: its autograd context (saved
    qf, kf, t', lse, count, counted, bound; p, s, mode, positives, shifted); shifted_logits, filter_tiles,
    run: `filtered`'s one way to compute a tile, its tiling, and its tile runner (serial or on workers, the
    same branch as the forward's)."""
    qf, kf, t, lse, count, counted, bound = ctx.saved_tensors
    p, s = ctx.p, ctx.s
    need_q = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
    need_k = ctx.needs_input_grad[1]
    g = torch.where(counted, g_loss.to(qf.dtype), torch.zeros_like(lse))
    # dz = g·(P^F − Y) with P^F = exp(z' − LSE') on the kept pairs (LSE' = LSE − b: on the z' scale).
    # Folded form (every row of the tile has LSE' above FOLD_LIMIT): w = exp(z')·keep on the tile and
    # exp(z') − exp(LSE')/|P| on the positives, times the row factor sign(g)·|g|·exp(−LSE') applied on the
    # (N, D) side: three elementwise passes per tile (mask, exp, multiply). Otherwise (a row whose kept
    # logits all lie far below b, where exp(z') would underflow) the shift goes into the exponent:
    # w = exp(z' − LSE' + log|g|)·keep, an extra pass.
    lse_p = lse - bound
    nz = g != 0
    sign = torch.sign(g)
    limit = 0.5 * math.log(torch.finfo(qf.dtype).tiny)
    foldable = (lse_p > limit) | ~nz
    row_f = torch.where(nz, sign * g.abs() * torch.exp(-lse_p), torch.zeros_like(g)) * s
    y_f = torch.where(nz, torch.exp(lse_p) / count.clamp(min=1), torch.zeros_like(g))
    shift = (lse_p - torch.log(g.abs())).masked_fill_(~nz, math.inf)
    y = g.abs() / count.clamp(min=1)
    qs = qf * s
    shift_t = bound if ctx.shifted else None
    dq = torch.zeros_like(qf) if need_q else None
    q_fold = qf * row_f[..., None] if need_k else None
    q_signed = qf * (sign * s)[..., None] if need_k else None
    G, N, M = qf.shape[0], qf.shape[1], kf.shape[1]
    states = []

    def make_state():   # a workspace, a dk partial (workers share no key rows) and a Σ dz·z partial
        # dk is accumulated transposed, (G, D, M): the GEMM qᵀ·W is ~20 % faster than Wᵀ·q into (M, D)
        st = [Workspace(), kf.new_zeros(G, kf.shape[2], M) if need_k else None, qf.new_zeros(())]
        states.append(st)
        return st

    def tile(st, t6):   # writes dq rows [r0, r1) and its own dk partial
        ws, dk = st[0], st[1]
        g0, g1, r0, r1, c0, c1 = t6
        zp = shifted_logits(qs, kf, shift_t, g0, g1, r0, r1, c0, c1, ws)
        gi, ri, ci = ctx.positives.tile(g0, g1, r0, r1, c0, c1)
        row = gi * (r1 - r0) + ri
        flat = row * (c1 - c0) + ci                    # the positives in the flat tile
        fold = bool(foldable[g0:g1, r0:r1].all())
        zpos = zp.view(-1)[flat]
        z = zp + bound[g0:g1, r0:r1, None] if ctx.needs_input_grad[2] else None
        # in place, in row chunks that stay in cache; the mask as 0/1 in the tile's dtype, multiplied in
        # (masked_fill_/where branch per element, and a bool operand is converted first: each several
        # times slower than this on CPU)
        chunks = chunks_of(zp.view(-1, zp.shape[-1]), ws)
        if fold:
            factor, q_side = row_f[g0:g1, r0:r1], q_fold
            w_pos = torch.exp(zpos) - y_f[g0:g1, r0:r1].reshape(-1)[row]
            chunks.exp_where_ge(t[g0:g1, r0:r1].reshape(-1))
        else:
            factor, q_side = sign[g0:g1, r0:r1] * s, q_signed
            sh = shift[g0:g1, r0:r1]
            w_pos = torch.exp(zpos - sh.reshape(-1)[row]) - y[g0:g1, r0:r1].reshape(-1)[row]
            chunks.exp_where_ge(t[g0:g1, r0:r1].reshape(-1), sh.reshape(-1))
        w = zp
        if p.k_valid is not None:
            w.mul_(p.k_valid[g0:g1, None, c0:c1])
        _clear_self(p, w, 0.0, r0, r1, c0, c1)
        w.view(-1).index_copy_(0, flat, w_pos)
        if z is not None:
            st[2] = st[2] + ((w * z).sum(-1) * factor).sum() / s
        if need_q:
            dq[g0:g1, r0:r1] += torch.bmm(w, kf[g0:g1, c0:c1]).mul_(factor[..., None])
        if need_k:
            dk[g0:g1, :, c0:c1].baddbmm_(q_side[g0:g1, r0:r1].transpose(1, 2), w)

    run(list(filter_tiles(G, N, M, ctx.mode)), ctx.mode, make_state, tile, qf.device)
    dk = states[0][1]
    if need_k:
        for st in states[1:]:
            dk += st[1]
        dk = dk.transpose(1, 2).contiguous()
    dzz = sum(st[2] for st in states[1:]) + states[0][2]
    ds = (dzz / s).to(ctx.scale_dtype) if ctx.needs_input_grad[2] else None
    dq_out = dq.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    dk_out = dk.to(ctx.dtypes[1]) if need_k else None
    return dq_out, dk_out, ds
