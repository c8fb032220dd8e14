"""Gradient-filtered InfoNCE (the GCL-style "Gradient Filter"), exact and memory-bounded.

For the core loss ℓ_i = LSE_i − mean_{p∈P(i)} z_ip the gradient on the logit of pair (i, j) is
g_i·(P_ij − Y_ij), with P the softmax over the allowed keys V(i) and Y_ij = 1[j∈P(i)]/|P(i)| (KERNELS.md §2).
The filter keeps, per anchor, the pairs whose gradient magnitude |P_ij − Y_ij| is largest:

    K(i) = P(i) ∪ { the k_i negatives j ∈ V(i)∖P(i) with the largest |P_ij − Y_ij| },  k_i = ⌈ρ·|V(i)∖P(i)|⌉

and the loss is computed over the kept pairs only:  ℓ_i^F = log Σ_{j∈K(i)} exp(z_ij) − mean_{p∈P(i)} z_ip.
Interpretation choices (GCL has no public code):
- positives are always kept and do not use up the fraction: ρ is the fraction of the *negatives* kept;
- for a negative |P_ij − Y_ij| = P_ij = exp(z_ij − LSE_i), a monotone function of z_ij, so "largest gradient"
  is "largest logit": the k_i hardest negatives. The ranking uses the full (unfiltered) softmax, as the
  gradient of the unfiltered loss would;
- ties at the k_i-th value are all kept (|K(i)| ≥ k_i + |P(i)|; with continuous features ties do not occur);
- the selection is a constant for autograd (no gradient flows through which pairs were kept).

How it is computed without an N×M tensor:
1. per-anchor threshold t_i = the k_i-th largest negative logit, exactly:
   - up to `FULL_ROW_MAX_KEYS` keys per group ("rows" tiling): tiles are blocks of R anchors × all M keys,
     R·M ≤ `TILE_BUDGET` (memory O(TILE_BUDGET), never N×M); one pass, `torch.topk` of max_i k_i per block;
   - more keys ("radix" tiling, the usual anchor × key-chunk tiles): a radix select on the order-preserving
     integer image of the float logits, 4 passes for float32 (8 for float64), each recomputing the tiles and
     building a 256-bin histogram per anchor of the next 8 bits among the negatives whose higher bits match
     the prefix chosen so far; all passes run per block of anchors (memory O(tile + block·256));
2. one forward pass over the tiles: LSE over {j ∈ V(i) : j ∈ P(i) or z_ij ≥ t_i}, Σ_P z and |P| in-tile;
3. the backward recomputes each tile and applies dz_ij = g_i·(P^F_ij − Y_ij) on the kept pairs.
Every pass computes a tile's logits with the same batched GEMM on the same slices, so the selection made in
(1) is reproduced bit for bit in (2) and (3). Runs on any device with PyTorch ops (no Triton kernel).
Cost on CPU (benchmarks/bench_filter.py): see docs/gcl.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from .api import REDUCTIONS, Temperature, _build_problem
from .problem import ContrastProblem, stats_dtype
from .torch_tiled import tiles, tile_positives

__all__ = ["filtered_info_nce", "FilteredResult", "negative_thresholds", "filter_tiles", "tiling_mode"]


class FilteredResult(NamedTuple):
    """loss: reduced loss (0-d), or per anchor (G, N) / (N,) for reduction="none".
    per_anchor, threshold (the k_i-th largest negative logit, +inf where nothing is kept), kept (number of
    negatives kept, int32) and pos_count (int32): (G, N), or (N,) when q was 2-D."""
    loss: torch.Tensor
    per_anchor: torch.Tensor
    threshold: torch.Tensor
    kept: torch.Tensor
    pos_count: torch.Tensor


TILE_BUDGET = 1 << 22          # logits per tile in the "rows" tiling (16 MiB of float32)
FULL_ROW_MAX_KEYS = 1 << 18    # above this many keys per group, thresholds come from the radix select


# ------------------------------------------------------------------------------------------ tiles
def filter_tiles(G: int, N: int, M: int, mode: str):
    """(g0, g1, r0, r1, c0, c1) tiles: "rows" = anchor blocks × all keys; "radix" = torch_tiled's tiles."""
    if mode == "radix":
        yield from tiles(G, N, M)
        return
    r = max(1, min(N, TILE_BUDGET // max(M, 1)))
    gc = max(1, min(G, TILE_BUDGET // max(r * M, 1)))
    for g0 in range(0, G, gc):
        for r0 in range(0, N, r):
            yield g0, min(G, g0 + gc), r0, min(N, r0 + r), 0, M


def tiling_mode(M: int) -> str:
    """"rows" when all M keys of a block of anchors fit one tile's budget, else "radix"."""
    return "rows" if M <= FULL_ROW_MAX_KEYS else "radix"


def _tile_logits(qs, k, g0, g1, r0, r1, c0, c1):
    """z for one tile: the ONE way every pass computes logits (bit-identical across passes)."""
    return torch.bmm(qs[g0:g1, r0:r1], k[g0:g1, c0:c1].transpose(1, 2))


def _allowed(p: ContrastProblem, g0, g1, r0, r1, c0, c1, device) -> torch.Tensor:
    """V restricted to a tile: (g, r, c) bool (valid keys, not self)."""
    allowed = torch.ones(g1 - g0, r1 - r0, c1 - c0, dtype=torch.bool, device=device)
    if p.k_valid is not None:
        allowed &= p.k_valid[g0:g1, None, c0:c1]
    if p.exclude_self:
        lo, hi = max(r0, c0), min(r1, c1)
        if lo < hi:
            idx = torch.arange(lo, hi, device=device)
            allowed[:, idx - r0, idx - c0] = False
    return allowed


def _order_keys(z: torch.Tensor) -> torch.Tensor:
    """int64 keys whose signed order is the float order of z (float32 or float64)."""
    if z.dtype == torch.float64:
        i = z.contiguous().view(torch.int64)
        return torch.where(i < 0, i ^ 0x7FFFFFFFFFFFFFFF, i)
    i = z.to(torch.float32).contiguous().view(torch.int32).long()
    return torch.where(i < 0, i ^ 0x7FFFFFFF, i)


def _keys_to_float(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.float64:
        return torch.where(key < 0, key ^ 0x7FFFFFFFFFFFFFFF, key).view(torch.float64)
    k32 = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32)
    return k32.view(torch.float32).to(dtype)


def _k_of(n_neg: torch.Tensor, rho: float) -> torch.Tensor:
    """k_i = ⌈ρ·|negatives|⌉ (a 1e-9 guard keeps 0.3·10 at 3), at most |negatives|."""
    return torch.minimum(torch.ceil(n_neg.double() * rho - 1e-9).long().clamp_(min=0), n_neg)


@torch.no_grad()
def negative_thresholds(p: ContrastProblem, qs: torch.Tensor, k: torch.Tensor, rho: float, mode: str):
    """Per anchor: (t (G, N) the k_i-th largest negative logit or +inf, k_i (G, N) int64, |negatives| (G, N)).

    qs = q·s and k in the statistics dtype; mode "rows" or "radix" (see the module docstring).
    """
    if mode == "radix":
        return _radix_thresholds(p, qs, k, rho)
    G, N, M = qs.shape[0], qs.shape[1], k.shape[1]
    t = qs.new_full((G, N), math.inf)
    k_all = torch.zeros(G, N, dtype=torch.int64, device=qs.device)
    n_all = torch.zeros(G, N, dtype=torch.int64, device=qs.device)
    for g0, g1, r0, r1, c0, c1 in filter_tiles(G, N, M, "rows"):
        z = _tile_logits(qs, k, g0, g1, r0, r1, c0, c1)
        neg = _allowed(p, g0, g1, r0, r1, c0, c1, qs.device) & ~tile_positives(p, g0, g1, r0, r1, c0, c1)
        n_neg = neg.sum(-1)
        k_i = _k_of(n_neg, rho)
        k_max = int(k_i.max()) if k_i.numel() else 0
        if k_max > 0:
            top = torch.topk(z.masked_fill_(~neg, -math.inf), k_max, dim=-1, sorted=True).values
            kth = top.gather(-1, (k_i - 1).clamp(min=0)[..., None])[..., 0]
            t[g0:g1, r0:r1] = torch.where(k_i > 0, kth, torch.full_like(kth, math.inf))
        k_all[g0:g1, r0:r1] = k_i
        n_all[g0:g1, r0:r1] = n_neg
    return t, k_all, n_all


@torch.no_grad()
def _radix_thresholds(p: ContrastProblem, qs: torch.Tensor, k: torch.Tensor, rho: float):
    """`negative_thresholds` by an exact radix select (module docstring). Per block of anchors, every pass
    streams torch_tiled's key blocks, so the per-anchor state is a (g, R, 256) histogram of one block."""
    G, N, M = qs.shape[0], qs.shape[1], k.shape[1]
    dev = qs.device
    t = qs.new_full((G, N), math.inf)
    k_all = torch.zeros(G, N, dtype=torch.int64, device=dev)
    n_all = torch.zeros(G, N, dtype=torch.int64, device=dev)
    blocks = sorted({(g0, g1, r0, r1) for g0, g1, r0, r1, _, _ in tiles(G, N, M)})
    key_blocks = sorted({(c0, c1) for *_, c0, c1 in tiles(G, N, M)})
    for g0, g1, r0, r1 in blocks:
        t[g0:g1, r0:r1], k_all[g0:g1, r0:r1], n_all[g0:g1, r0:r1] = _radix_block(
            p, qs, k, rho, g0, g1, r0, r1, key_blocks)
    return t, k_all, n_all


def _radix_block(p, qs, k, rho, g0, g1, r0, r1, key_blocks):
    bits = 64 if qs.dtype == torch.float64 else 32
    dev = qs.device
    shape = (g1 - g0, r1 - r0)
    prefix = torch.zeros(shape, dtype=torch.int64, device=dev)
    for pas in range(bits // 8):
        shift = bits - 8 * (pas + 1)
        hist = torch.zeros(shape + (256,), dtype=torch.int32, device=dev)
        for c0, c1 in key_blocks:
            z = _tile_logits(qs, k, g0, g1, r0, r1, c0, c1)
            neg = _allowed(p, g0, g1, r0, r1, c0, c1, dev) & ~tile_positives(p, g0, g1, r0, r1, c0, c1)
            key = _order_keys(z)
            del z
            if pas > 0:
                neg &= (key >> (shift + 8)) == prefix[..., None]
            digit = (key >> shift) & 0xFF
            del key
            if pas == 0:
                digit ^= 0x80  # the top byte carries the sign: offset-binary order
            hist.scatter_add_(2, digit, neg.int())
        if pas == 0:
            n_neg = hist.sum(-1, dtype=torch.int64)
            k_rem = _k_of(n_neg, rho)
            k_i = k_rem.clone()
        above = hist.flip(-1).cumsum(-1).flip(-1)              # above[d] = Σ_{d' ≥ d} hist
        d_star = ((above >= k_rem[..., None]).sum(-1) - 1).clamp_(min=0)
        strictly_above = above.gather(-1, d_star[..., None])[..., 0] - hist.gather(-1, d_star[..., None])[..., 0]
        k_rem = k_rem - strictly_above
        if pas == 0:
            raw = d_star ^ 0x80
            prefix = torch.where(raw >= 128, raw - 256, raw)    # the signed top byte
        else:
            prefix = prefix * 256 + d_star
    t = _keys_to_float(prefix, qs.dtype)
    return torch.where(k_i > 0, t, torch.full_like(t, math.inf)), k_i, n_neg


def _kept(p, z, t, g0, g1, r0, r1, c0, c1):
    """(kept (g, r, c) bool, positives (g, r, c) bool) for one tile."""
    pos = tile_positives(p, g0, g1, r0, r1, c0, c1)
    keep = _allowed(p, g0, g1, r0, r1, c0, c1, z.device) & (pos | (z >= t[g0:g1, r0:r1, None]))
    return keep, pos


class _FilteredInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem, t: torch.Tensor, mode: str):
        sdt = stats_dtype(q.dtype)
        qf, kf = q.detach().to(sdt), k.detach().to(sdt)
        s = float(scale)
        qs = qf * s
        G, N, M = qf.shape[0], qf.shape[1], kf.shape[1]
        lse = qs.new_full((G, N), -math.inf)
        pos_sum = qs.new_zeros(G, N)
        count = torch.zeros(G, N, dtype=torch.int64, device=qs.device)
        for g0, g1, r0, r1, c0, c1 in filter_tiles(G, N, M, mode):
            z = _tile_logits(qs, kf, g0, g1, r0, r1, c0, c1)
            keep, pos = _kept(p, z, t, g0, g1, r0, r1, c0, c1)
            pos_sum[g0:g1, r0:r1] += torch.where(pos, z, 0.0).sum(-1)
            count[g0:g1, r0:r1] += pos.sum(-1)
            part = lse[g0:g1, r0:r1]
            torch.logaddexp(part, torch.logsumexp(z.masked_fill(~keep, -math.inf), -1), out=part)
        counted = count > 0
        if p.q_valid is not None:
            counted &= p.q_valid
        loss = torch.where(counted, lse.masked_fill(~counted, 0.0) - pos_sum / count.clamp(min=1),
                           torch.zeros_like(lse))
        ctx.p, ctx.s, ctx.mode = p, s, mode
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(qf, kf, t, lse, count, counted)
        ctx.mark_non_differentiable(count)
        return loss, count.to(torch.int32)

    @staticmethod
    def backward(ctx, g_loss, _g_count):
        qf, kf, t, lse, count, counted = ctx.saved_tensors
        p, s = ctx.p, ctx.s
        need_q = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        need_k = ctx.needs_input_grad[1]
        g = torch.where(counted, g_loss.to(qf.dtype), torch.zeros_like(lse))
        y = (g / count.clamp(min=1))[..., None]
        lse_safe = torch.where(counted, lse, torch.zeros_like(lse))[..., None]
        qs = qf * s
        dq = torch.zeros_like(qf) if need_q else None
        dk = torch.zeros_like(kf) if need_k else None
        dzz = qf.new_zeros(())
        G, N, M = qf.shape[0], qf.shape[1], kf.shape[1]
        for g0, g1, r0, r1, c0, c1 in filter_tiles(G, N, M, ctx.mode):
            z = _tile_logits(qs, kf, g0, g1, r0, r1, c0, c1)
            keep, pos = _kept(p, z, t, g0, g1, r0, r1, c0, c1)
            prob = torch.exp(z - lse_safe[g0:g1, r0:r1]).masked_fill_(~keep, 0.0)
            dz = prob.mul_(g[g0:g1, r0:r1, None]).sub_(pos * y[g0:g1, r0:r1])   # g·P^F − g·Y
            if ctx.needs_input_grad[2]:
                dzz = dzz + (dz * z).sum()
            if need_q:
                dq[g0:g1, r0:r1] += torch.bmm(dz, kf[g0:g1, c0:c1]) * s
            if need_k:
                dk[g0:g1, c0:c1] += torch.bmm(dz.transpose(1, 2), qf[g0:g1, r0:r1]) * s
        ds = (dzz / s).to(ctx.scale_dtype) if ctx.needs_input_grad[2] else None
        dq_out = dq.to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dk_out = dk.to(ctx.dtypes[1]) if need_k else None
        return dq_out, dk_out, ds, None, None, None


def filtered_info_nce(
    q: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    *,
    rho: float,
    temperature: Temperature = 0.1,
    pos_index: Optional[torch.Tensor] = None,
    q_labels: Optional[torch.Tensor] = None,
    k_labels: Optional[torch.Tensor] = None,
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    exclude_self: bool = False,
    q_valid: Optional[torch.Tensor] = None,
    k_valid: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    tiling: Optional[str] = None,
) -> FilteredResult:
    """Grouped multi-positive InfoNCE over the gradient-filtered pairs (see the module docstring).

    Arguments as `macl_kernels.grouped_info_nce` (q (N, D) or (G, N, D); k (M, D) / (G, M, D) or None for
    self-contrast; one positive rule; exclude_self; q_valid / k_valid; reduction "mean" over counted anchors,
    "sum", "none"), plus rho ∈ (0, 1]: the fraction of each anchor's negatives kept (ρ = 1 gives exactly
    the unfiltered loss). Features are used as given (normalise them first for cosine logits).
    tiling: None (automatic: "rows" up to FULL_ROW_MAX_KEYS keys per group, else "radix"), or force one.

    Returns a `FilteredResult`. Raises ValueError for rho outside (0, 1] and every error
    `grouped_info_nce` raises for bad inputs.
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    unbatched = isinstance(q, torch.Tensor) and q.dim() == 2
    p, _ = _build_problem(q, k, temperature, pos_index, q_labels, k_labels, q_positions, k_positions,
                          threshold, exclude_self, q_valid, k_valid)
    if tiling not in (None, "rows", "radix"):
        raise ValueError(f"tiling must be None, 'rows' or 'radix', got {tiling!r}")
    mode = tiling or tiling_mode(p.k.shape[1])
    sdt = stats_dtype(p.q.dtype)
    s = float(p.scale)
    t, kept, _ = negative_thresholds(p, p.q.detach().to(sdt) * s, p.k.detach().to(sdt), float(rho), mode)
    per_anchor, count = _FilteredInfoNCE.apply(p.q, p.k, p.scale, p, t, mode)
    if p.q_valid is not None:
        count = count * p.q_valid
        kept = kept * p.q_valid
    counted = count > 0
    if reduction == "mean":
        loss = per_anchor.sum() / counted.sum().clamp(min=1).to(per_anchor.dtype)
    elif reduction == "sum":
        loss = per_anchor.sum()
    else:
        loss = per_anchor
    kept = kept.to(torch.int32)
    if unbatched:
        per_anchor, t, kept, count = per_anchor[0], t[0], kept[0], count[0]
        if reduction == "none":
            loss = loss[0]
    return FilteredResult(loss, per_anchor, t, kept, count)
