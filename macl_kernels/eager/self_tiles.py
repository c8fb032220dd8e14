"""Self-contrast tiles on the symmetric logit matrix: half the tiles, 3 GEMM units and 1 exp pass in all.

When k is q (nt_xent, sup_con, positional_sup_con, any call with k=None), with no key mask and unshifted
tiles (`torch_tiled.unshifted_ok`), z_ij = s·⟨x̂_i, x̂_j⟩ = z_ji and E = exp(z) is symmetric, so each pair of
blocks (a, b), a ≤ b, is computed once and used both ways:

Forward:   E_ab = exp(s·X̂_a X̂_bᵀ) (self pairs −inf on the diagonal);  S_a += E_ab·1,  S_b += E_abᵀ·1 (a ≠ b).
Backward:  s·g_i·P_ij = f_i·E_ij with f_i = s·g_i·e^{−LSE_i}; with respect to x̂ the q side gives
           dq̂ = f ⊙ (E X̂) and the k side dk̂ = E (f ⊙ X̂) (E symmetric), so per pair
               dq_a += E_ab X̂_b,   dk_a += E_ab (f_b X̂_b),   and for a ≠ b   dq_b += E_abᵀ X̂_a,   dk_b += E_abᵀ (f_a X̂_a)
           and dq ← f ⊙ dq at the end; without a temperature gradient one buffer takes both (the q side through
           a (block, D) temporary, scaled by f on its way in), else dq and dk stay separate (dτ reads the q side),
           exactly as the general tiled path leaves them, so positives and normalisation follow it.
GEMM units (2·N²·D flops each): forward ½, backward ½ + 2 = 3 in all, against 4; exp passes 1 against 2.
Workers: the pairs of one round of a round-robin tournament share no block, so a round's tiles run in
parallel with no race (`tile_workers.run_rounds`).
"""
from __future__ import annotations

import math

import torch

from . import tile_workers

#: block size of the symmetric tiling (rows = keys): a tile is SELF_BLOCK² logits (4 MiB). nt_xent B = 4096,
#: fwd+bwd, idle 2-core host: 1024 best with 2 threads (0.196 s; 512: 0.210, 2048: 0.212, general tiling 0.222),
#: 512 best with 1 thread (4% ahead of 1024); see docs/cpu_path.md
SELF_BLOCK = 1024
#: master switch (tests compare both ways)
ENABLED = True


def applies(p, same: bool, shifted: bool, in_tile: bool) -> bool:
    """Whether the symmetric path may run: k is q, no key mask, unshifted tiles, positives outside the tiles."""
    return ENABLED and same and not shifted and not in_tile and p.k_valid is None


def block_dims(G: int, N: int, block: int, budget: int) -> tuple:
    """(groups per tile, block size) of the symmetric tiling."""
    bs = max(1, min(N, block))
    return max(1, min(G, budget // (bs * bs))), bs


def _worker_state(ops, gc: int, bs: int, with_tmp: bool):
    """Per worker: a flat tile buffer, its own operand copy, and (merged backward) a (block, D) temporary."""
    state = (ops.qf.new_empty(gc * bs * bs), ops.worker_copy(gc, bs, bs))
    return state + (ops.qf.new_empty(gc * bs * ops.qf.shape[2]),) if with_tmp else state


def pair_rounds(G: int, N: int, block: int, budget: int) -> list:
    """Rounds of tiles (g0, g1, a0, a1, b0, b1), a0 ≤ b0, over group chunks × block pairs; tiles of one round
    share no (group, block)."""
    gc, bs = block_dims(G, N, block, budget)
    starts = list(range(0, N, bs))
    rounds = [[] for _ in tile_workers.tournament(len(starts))]
    for g0 in range(0, G, gc):
        g1 = min(G, g0 + gc)
        for r, pairs in enumerate(tile_workers.tournament(len(starts))):
            for a, b in pairs:
                rounds[r].append((g0, g1, starts[a], min(N, starts[a] + bs), starts[b], min(N, starts[b] + bs)))
    return rounds


def _tile(buf: torch.Tensor, ops, t, row_factor, exclude_self: bool) -> torch.Tensor:
    """E = exp(z) of one tile into the flat buffer (−inf → 0 on a self pair's diagonal with exclude_self)."""
    g0, g1, a0, a1, b0, b1 = t
    out = buf[: (g1 - g0) * (a1 - a0) * (b1 - b0)].view(g1 - g0, a1 - a0, b1 - b0)
    torch.bmm(ops.q_tile(g0, g1, a0, a1, row_factor), ops.k_block(g0, g1, b0, b1).transpose(1, 2), out=out)
    if exclude_self and a0 == b0:
        out.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    return out.exp_()


def forward_sums(ops, p, scale: float, budget: int) -> torch.Tensor:
    """S_i = Σ_{j∈V(i)} exp(z_ij) (G, N) over the symmetric tiles."""
    G, N = ops.qf.shape[0], ops.qf.shape[1]
    total = ops.qf.new_zeros(G, N)
    qfac = ops.row_factor(scale)
    gc, bs = block_dims(G, N, SELF_BLOCK, budget)

    def body(state, t):
        buf, ops_w = state
        g0, g1, a0, a1, b0, b1 = t
        e = _tile(buf, ops_w, t, qfac, p.exclude_self)
        total[g0:g1, a0:a1].add_(e.sum(-1))
        if a0 != b0:
            total[g0:g1, b0:b1].add_(e.sum(-2))

    tile_workers.run_rounds(pair_rounds(G, N, SELF_BLOCK, budget),
                            lambda: _worker_state(ops, gc, bs, False), body, ops.qf.device)
    return total


def backward_grads(ops, p, scale: float, f: torch.Tensor, budget: int, merged: bool):
    """(dq, dk) with respect to x̂ (or x without normalize), before the positive terms: dq = f ⊙ (E X̂),
    dk = E (f ⊙ X̂); f (G, N, 1). merged: one tensor holds dq + dk (returned twice; no second (N, D) buffer:
    the q side goes through a (block, D) temporary and is scaled by f on its way in)."""
    G, N, D = ops.qf.shape
    dq = torch.zeros_like(ops.qf)
    dk = dq if merged else torch.zeros_like(ops.qf)
    zfac, xfac, ffac = ops.row_factor(scale), ops.row_factor(1.0), ops.row_factor(f)
    gc, bs = block_dims(G, N, SELF_BLOCK, budget)

    def q_side(tmp, e, x, g0, g1, r0, r1):   # dq rows [r0, r1) += E x (scaled by f there when merged)
        if not merged:
            dq[g0:g1, r0:r1].baddbmm_(e, x)
            return
        t = torch.bmm(e, x, out=tmp[: e.shape[0] * e.shape[1] * D].view(e.shape[0], e.shape[1], D))
        dq[g0:g1, r0:r1].addcmul_(t, f[g0:g1, r0:r1])

    def body(state, t):
        buf, ops_w, tmp = state
        g0, g1, a0, a1, b0, b1 = t
        e = _tile(buf, ops_w, t, zfac, p.exclude_self)
        q_side(tmp, e, ops_w.k_block(g0, g1, b0, b1), g0, g1, a0, a1)
        dk[g0:g1, a0:a1].baddbmm_(e, ops_w.q_tile(g0, g1, b0, b1, ffac))
        if a0 != b0:
            et = e.transpose(1, 2)
            q_side(tmp, et, ops_w.q_tile(g0, g1, a0, a1, xfac), g0, g1, b0, b1)
            dk[g0:g1, b0:b1].baddbmm_(et, ops_w.q_tile(g0, g1, a0, a1, ffac))

    tile_workers.run_rounds(pair_rounds(G, N, SELF_BLOCK, budget),
                            lambda: _worker_state(ops, gc, bs, True), body, ops.qf.device)
    return (dq, dk) if merged else (dq.mul_(f), dk)
