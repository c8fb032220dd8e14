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

How it is computed without an N×M tensor (every pass streams tiles; memory O(tile + block·bins + the list of
positive pairs, at most PAIR_BUDGET)):
Logits are taken shifted by a per-anchor upper bound b_i = s·‖q_i‖·max_j ‖k_j‖ ≥ z_ij (Cauchy–Schwarz):
z'_ij = z_ij − b_i ≤ 0, one `bmm` and one subtraction per tile (never fused into the GEMM, so ties of z
stay ties of z'), the ONE way every pass of a call computes a tile
(bit-identical across passes, so the selection made once is reproduced exactly later). In the "rows" tiling
with the sample bracket, when `torch_tiled.unshifted_ok` holds for b (normalised features, τ ≳ 0.015), the
tiles are plain z instead (one `bmm`: no bias copy; b is taken as 0 throughout the call, thresholds on the z
scale; `UNSHIFTED`). Two tilings:
- "rows" (up to FULL_ROW_MAX_KEYS keys per group): a tile = a block of anchors × ALL keys, one GEMM per block
  for threshold and forward statistics together. The positives' logits are read from the positive-pair list
  (Σ_P z', Σ_P exp(z'), |P|), then the positives, invalid keys and the anchor itself are set to −inf in the
  tile (a few writes), leaving each row's negatives; k_i = ⌈ρ·n_i⌉ with n_i = |valid keys| − |P| − self.
  `filter_bracket.bracket_select` finds the exact k_i-th largest negative t_i per row: a sorted sample of
  64 fixed columns brackets it, vectorised counting passes (#{z' ≥ v} per row: one compare, one row sum)
  narrow the bracket, and the few entries left inside are sorted; the same member pass sums exp(z') above
  the bracket, so Σ_kept exp(z') = that + the members ≥ t_i + the positives (no further pass). Exactness
  rests only on the exact counts; the sample decides how many passes it takes (see that module).
  Blocks with a bound ≥ FLT_MAX/4 (non-finite or huge features) use the histogram below; `ROWS_SELECT =
  "histogram"` forces it (the method before the sample bracket, kept for comparison and tests).
- "chunks" (more keys): per block of anchors, chunks of keys; the histogram method (`filter/select.py`):
  1. histogram pass: each allowed pair goes to a slot of its anchor's row: the non-negatives to slot 0, the
     positives to the top slot, a negative to one of nb (+2 guard) bins that cut [−2b_i, 0] into equal widths
     (⌊z'·nb/(2b_i)⌋, a monotone map, so bins are ordered like the logits; nb = min(NUM_BINS, M/16)). One
     pass counts the pairs per slot (`index_add_`) and a second sums exp(z') per slot (no overflow: z' ≤ 0).
     From the counts: |negatives|, k_i and the bin that holds the k_i-th largest negative;
  2. member pass: the logits of that one bin are gathered (recomputing the key chunks), sorted per anchor,
     and t_i is read off. Σ_kept exp(z') = Σ_{slots above the bin} (positives included) + the members ≥ t_i.
  The member buffer holds the logits of one bin per anchor: a few for spread logits; only logits collapsed
  into one bin (all features nearly equal) make it large.
Ties at t_i are all kept in both. The "rows" tiling runs on tile workers (`tile_workers.run`, "rows"
schedule: a worker owns whole row blocks, one intra-op thread each, its own workspace) in the forward and in
the backward, where each worker accumulates its own dk partial, transposed (G, D, M) (qᵀ·W is the faster
GEMM); forward and backward take the same branch, so every tile's GEMM runs with the same thread count in
every pass. `PARALLEL = False`: the serial loop. The backward (`filter/backward.py`) recomputes each tile and
applies dz_ij = g_i·(P^F_ij − Y_ij) on the kept pairs {positives} ∪ {allowed : z' ≥ t_i}: the mask, exp(z') and their product in place, in
row chunks that stay in cache; exp(−LSE'_i)·|g_i|·sign(g_i) is a row factor on the (N, D) side (tiles whose
kept logits all lie far below b_i subtract the shift before the exp instead). Anchors whose kept sum
underflows (every kept logit more than ~69 below b_i) are recomputed exactly in the forward.
CPU notes (measured): tile temporaries live in a per-call `Workspace` (fresh multi-MiB tensors page-fault on
first touch), masks are multiplied in as 0/1 floats (masked_fill_/where branch per element), and the positive
pairs of the label/index rules are listed once per call instead of compared in every tile.
Runs on any device with PyTorch ops (no Triton kernel). Cost on CPU: docs/gcl.md.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch

from ..api import REDUCTIONS, Temperature, _build_problem
from ..problem import ContrastProblem, stats_dtype
from . import backward as filter_backward
from ..eager import tile_workers, tiled as tt
from .bracket import bracket_select, chunks_of
from .select import PositivePairs, Workspace, _clear_self, _k_of, histogram_block
from ..eager.tiled import _valid_keys, tile_positives

__all__ = ["filtered_info_nce", "FilteredResult", "filter_tiles", "tiling_mode", "TILINGS"]


class FilteredResult(NamedTuple):
    """loss: reduced loss (0-d), or per anchor (G, N) / (N,) for reduction="none".
    per_anchor, threshold (the k_i-th largest negative logit z, +inf where nothing is kept), kept (k_i, the
    number of negatives kept without ties, int32) and pos_count (int32): (G, N), or (N,) when q was 2-D."""
    loss: torch.Tensor
    per_anchor: torch.Tensor
    threshold: torch.Tensor
    kept: torch.Tensor
    pos_count: torch.Tensor


TILE_BUDGET = 1 << 22          # logits per tile in the "rows" tiling (16 MiB of float32; 2^21 and 2^23: slower)
FULL_ROW_MAX_KEYS = 1 << 18    # above this many keys per group, the "chunks" tiling
UNDERFLOW = 1e-30              # a kept sum below this is recomputed with a running max
TILINGS = ("rows", "chunks")
MAX_BLOCK_ROWS = 1024          # anchors per block: slot ids (< 2^20) stay exact in float32
ROWS_SELECT = "bracket"        # "rows" tiling: "bracket" (filter_bracket) or "histogram" (the chunks' method)
PARALLEL = True                # "rows" tiling: blocks on tile workers where `tile_workers.plan` allows
UNSHIFTED = True               # "rows" tiling: plain z tiles where `_unshifted` allows (False: always z − b)


# ------------------------------------------------------------------------------------------ tiles
def filter_tiles(G: int, N: int, M: int, mode: str):
    """(g0, g1, r0, r1, c0, c1) tiles, grouped by anchor block (all key chunks of a block in a row):
    "rows" = anchor blocks × all keys (≤ TILE_BUDGET logits); "chunks" = blocks of ROW_BLOCK anchors ×
    KEY_BLOCK keys (torch_tiled's sizes). A block holds at most MAX_BLOCK_ROWS anchors (its histogram's
    slot ids stay exact integers in float32)."""
    if mode == "chunks":
        br, bc = min(N, tt.ROW_BLOCK), min(M, tt.KEY_BLOCK)
        gc = max(1, min(G, MAX_BLOCK_ROWS // br, tt.TILE_ELEMENTS // (br * bc)))
    else:
        br, bc = max(1, min(N, TILE_BUDGET // max(M, 1), MAX_BLOCK_ROWS)), M
        gc = max(1, min(G, TILE_BUDGET // max(br * M, 1), MAX_BLOCK_ROWS // br))
    for g0 in range(0, G, gc):
        for r0 in range(0, N, br):
            for c0 in range(0, max(M, 1), max(bc, 1)):
                yield g0, min(G, g0 + gc), r0, min(N, r0 + br), c0, min(M, c0 + bc)


def tiling_mode(M: int) -> str:
    """"rows" when all M keys of a block of anchors fit one tile's budget, else "chunks"."""
    return "rows" if M <= FULL_ROW_MAX_KEYS else "chunks"


def _blocks(G, N, M, mode):
    """{(g0, g1, r0, r1): [(c0, c1), ...]} in tile order."""
    out: dict = {}
    for g0, g1, r0, r1, c0, c1 in filter_tiles(G, N, M, mode):
        out.setdefault((g0, g1, r0, r1), []).append((c0, c1))
    return out


def _shifted_logits(qs, k, shift, g0, g1, r0, r1, c0, c1, ws: Optional[Workspace] = None):
    """z' = z − b for one tile (shift = b), or z itself (shift None: the unshifted tiles, `_unshifted`): the
    ONE way every pass of a call computes logits (bit-identical across passes). With a workspace the result
    lives in its "z" buffer (valid until the next call)."""
    out = None if ws is None else ws.get("z", (g1 - g0, r1 - r0, c1 - c0), qs.dtype, qs.device)
    z = torch.bmm(qs[g0:g1, r0:r1], k[g0:g1, c0:c1].transpose(1, 2), out=out)
    if shift is not None:
        # after the GEMM, not fused into it (baddbmm): fl(z − b) is a function of the GEMM's z, so logits that
        # the GEMM gives equal stay equal; a BLAS kernel that accumulates from the bias rounds each element
        # along its own path and broke exact ties on some hosts (issue 22 item 7)
        z.sub_(shift[g0:g1, r0:r1, None])
    return z


def _unshifted(bound: torch.Tensor, k: torch.Tensor, mode: str) -> bool:
    """True when the "rows" tiling with the sample bracket may take plain z (no shift, no bias copy in the
    GEMM): exp(z) and its sums safe by `torch_tiled.unshifted_ok` (normalised features with τ ≳ 0.015)."""
    if not UNSHIFTED or mode != "rows" or ROWS_SELECT != "bracket" or not bool(torch.isfinite(bound).all()):
        return False
    ops = SimpleNamespace(kn=k.norm(dim=-1), qf=k)
    return tt.unshifted_ok(bound, ops, k.shape[1])


def _bound(p: ContrastProblem, qs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """b (G, N) ≥ every z_ij of the anchor's valid keys (0 without valid keys)."""
    kn = k.norm(dim=-1)
    if p.k_valid is not None:
        kn = kn.masked_fill(~p.k_valid, 0.0)
    kmax = kn.amax(dim=1, keepdim=True) if k.shape[1] else kn.new_zeros(k.shape[0], 1)
    return qs.norm(dim=-1) * kmax


@torch.no_grad()
def _forward_stats(p: ContrastProblem, qs, k, bound, rho: float, mode: str, positives=None, shifted: bool = True):
    """Thresholds and forward statistics (module docstring, steps 1–2). bound: b (G, N), zeros when not
    shifted (the tiles are plain z, `_unshifted`).

    Returns t' (G, N) (on the z' scale, +inf where nothing is kept), k_i, lse (G, N) of the kept pairs,
    pos_sum (Σ_P z, G, N) and count (|P|, G, N int64)."""
    G, N, M = qs.shape[0], qs.shape[1], k.shape[1]
    positives = positives if positives is not None else PositivePairs(p)
    dev = qs.device
    shift = bound if shifted else None
    t = qs.new_full((G, N), math.inf)
    k_all = torch.zeros(G, N, dtype=torch.int64, device=dev)
    lse = qs.new_full((G, N), -math.inf)
    pos_sum = qs.new_zeros(G, N)
    count = torch.zeros(G, N, dtype=torch.int64, device=dev)
    allowed = _valid_keys(p).to(torch.int64)
    blocks = _blocks(G, N, M, mode)

    def block(ws, tile):   # writes the rows of its block only: workers own row blocks
        g0, g1, r0, r1 = tile[:4]
        chunks = blocks[(g0, g1, r0, r1)]
        if (len(chunks) == 1 and ROWS_SELECT == "bracket"
                and bool((bound[g0:g1, r0:r1] < torch.finfo(qs.dtype).max / 4).all())):
            tb, k_i, total, ps, cnt_pos = _rows_block(p, qs, k, shift, rho, positives, allowed, ws, g0, g1, r0, r1)
        else:
            tb, k_i, total, ps, cnt_pos = histogram_block(p, qs, k, shift, rho, positives, ws, g0, g1, r0, r1,
                                                          chunks, _shifted_logits)
        t[g0:g1, r0:r1] = tb
        k_all[g0:g1, r0:r1] = k_i
        lse[g0:g1, r0:r1] = torch.log(total)
        pos_sum[g0:g1, r0:r1] = ps
        count[g0:g1, r0:r1] = cnt_pos
        low = (total < UNDERFLOW) & ((k_i > 0) | (cnt_pos > 0))
        if bool(low.any()):
            lse[g0:g1, r0:r1] = torch.where(low, _exact_lse(p, qs, k, shift, bound, tb, g0, g1, r0, r1, chunks),
                                            lse[g0:g1, r0:r1])

    _run([(g0, g1, r0, r1, c[0][0], c[-1][1]) for (g0, g1, r0, r1), c in blocks.items()], mode, Workspace,
         block, dev)
    return t, k_all, lse + bound, pos_sum + count * bound, count


def _run(tiles: list, mode: str, make_state, body, device) -> None:
    """body(state, tile) for every tile of `filter_tiles`: the "rows" tiling (a tile = a block of anchors ×
    all keys) on `tile_workers.run`'s "rows" schedule (one worker owns each row block; one state each), the
    "chunks" tiling serially. Forward and backward take the same branch for the same tiles (the backward runs
    with the forward's intra-op thread count, `_same_threads`), so every tile's GEMM runs with the same thread
    count in every pass (bit-identical logits). A worker sets its own count to one first: a pool thread
    otherwise keeps OpenMP's default (every core) whatever the caller set, and a BLAS whose rounding depends
    on the thread count (MKL's AVX2 path: MKL_CBWR=AVX2, AMD hosts) gave the same tile different logits on
    different workers, so the backward's kept set could differ from the forward's by a pair at the threshold."""
    if mode == "rows" and PARALLEL:
        caller = threading.get_ident()

        def one_thread_body(state, tile):
            if threading.get_ident() != caller:     # on a worker (the serial fallback runs in the caller)
                torch.set_num_threads(1)
            body(state, tile)
        tile_workers.run(tiles, "rows", make_state, one_thread_body, device)
    else:
        state = make_state()
        for tile in tiles:
            body(state, tile)


def _rows_block(p, qs, k, shift, rho, positives, allowed, ws, g0, g1, r0, r1):
    """One block of the "rows" tiling (all keys in one tile, finite bounds): `filter_bracket.bracket_select`
    on the tile with its non-negatives set to −inf, then Σ_kept exp(z') in one masked pass.
    Returns t' (g, r), k_i, Σ_kept exp(z'), Σ_P z' and |P| (g, r)."""
    M = k.shape[1]
    shape = (g1 - g0, r1 - r0)
    zp = _shifted_logits(qs, k, shift, g0, g1, r0, r1, 0, M, ws)
    gi, ri, ci = positives.tile(g0, g1, r0, r1, 0, M)
    row = gi * shape[1] + ri
    flat = row * M + ci                                  # the positives in the flat tile (1-D indexing is cheaper)
    n_rows = shape[0] * shape[1]
    zpos = zp.view(-1)[flat]
    cnt_pos = torch.bincount(row, minlength=n_rows)
    pos_sum = zp.new_zeros(n_rows).index_add_(0, row, zpos)
    e_pos = zp.new_zeros(n_rows).index_add_(0, row, torch.exp(zpos))
    # the negatives tile: positives, invalid keys and the anchor itself leave it (−inf); a few writes, no mask
    zp.view(-1).index_fill_(0, flat, -math.inf)
    if p.k_valid is not None:
        for g in range(g0, g1):
            bad = (~p.k_valid[g]).nonzero()[:, 0]
            if bad.numel():
                zp[g - g0].index_fill_(-1, bad, -math.inf)
    _clear_self(p, zp, -math.inf, r0, r1, 0, M)
    n = allowed[g0:g1, r0:r1].reshape(-1) - cnt_pos
    k_i = _k_of(n, rho)
    zn = zp.view(n_rows, M)
    chunks = chunks_of(zn, ws)
    sel = bracket_select(zn, k_i, n, chunks)
    tb, e_neg = sel.t, sel.kept_exp                  # Σ exp(z') over the kept negatives; the positives: e_pos
    return (tb.reshape(shape), k_i.reshape(shape), (e_neg + e_pos).reshape(shape), pos_sum.reshape(shape),
            cnt_pos.reshape(shape))


def _kept(p, zp, t, g0, g1, r0, r1, c0, c1):
    """kept (g, r, c) bool for one tile: positives ∪ {allowed: z' ≥ t'}."""
    pos = tile_positives(p, g0, g1, r0, r1, c0, c1)
    keep = zp >= t[g0:g1, r0:r1, None]
    if p.k_valid is not None:
        keep &= p.k_valid[g0:g1, None, c0:c1]
    _clear_self(p, keep, False, r0, r1, c0, c1)
    return keep.logical_or_(pos)


def _exact_lse(p, qs, k, shift, bound, tb, g0, g1, r0, r1, chunks):
    """log Σ_kept exp(z') of one block with a running max (for the rare underflowing anchors)."""
    out = qs.new_full((g1 - g0, r1 - r0), -math.inf)
    tt = torch.full_like(bound, math.inf)
    tt[g0:g1, r0:r1] = tb
    for c0, c1 in chunks:
        zp = _shifted_logits(qs, k, shift, g0, g1, r0, r1, c0, c1)
        keep = _kept(p, zp, tt, g0, g1, r0, r1, c0, c1)
        torch.logaddexp(out, torch.logsumexp(zp.masked_fill(~keep, -math.inf), -1), out=out)
    return out


class _FilteredInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, p: ContrastProblem, rho: float, mode: str):
        sdt = stats_dtype(q.dtype)
        qf, kf = q.detach().to(sdt), k.detach().to(sdt)
        s = float(scale)
        qs = qf * s
        bound = _bound(p, qs, kf)
        shifted = not _unshifted(bound, kf, mode)
        if not shifted:
            bound = torch.zeros_like(bound)
        positives = PositivePairs(p)
        t, k_i, lse, pos_sum, count = _forward_stats(p, qs, kf, bound, rho, mode, positives, shifted)
        counted = count > 0
        if p.q_valid is not None:
            counted &= p.q_valid
        loss = torch.where(counted, lse.masked_fill(~counted, 0.0) - pos_sum / count.clamp(min=1),
                           torch.zeros_like(lse))
        ctx.p, ctx.s, ctx.mode, ctx.positives, ctx.shifted = p, s, mode, positives, shifted
        ctx.threads = torch.get_num_threads()
        ctx.dtypes = (q.dtype, k.dtype)
        ctx.scale_dtype = scale.dtype if isinstance(scale, torch.Tensor) else None
        ctx.save_for_backward(qf, kf, t, lse, count, counted, bound)
        threshold = t + bound
        ctx.mark_non_differentiable(count, threshold, k_i)
        return loss, count.to(torch.int32), threshold, k_i

    @staticmethod
    def backward(ctx, g_loss, _g_count, _g_t, _g_k):
        with _same_threads(ctx.threads):
            dq, dk, ds = filter_backward.backward(ctx, g_loss, _shifted_logits, filter_tiles, _run)
        return dq, dk, ds, None, None, None


@contextmanager
def _same_threads(threads: int):
    """The forward's intra-op thread count during the backward (restored after): the backward recomputes the
    forward's tiles and must reproduce them bit for bit, so it takes the same branch (workers or serial) and
    its GEMMs the same thread count."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
    tiling: None (automatic: "rows" up to FULL_ROW_MAX_KEYS keys per group, else "chunks"), or force one
    ("radix", the former name of "chunks", is accepted).

    Returns a `FilteredResult`. Raises ValueError for rho outside (0, 1], an unknown tiling and every error
    `grouped_info_nce` raises for bad inputs.
    """
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if tiling not in (None, "rows", "chunks", "radix"):
        raise ValueError(f"tiling must be None, 'rows' or 'chunks', got {tiling!r}")
    unbatched = isinstance(q, torch.Tensor) and q.dim() == 2
    p, _ = _build_problem(q, k, temperature, pos_index, q_labels, k_labels, q_positions, k_positions,
                          threshold, exclude_self, q_valid, k_valid)
    mode = {"radix": "chunks"}.get(tiling, tiling) or tiling_mode(p.k.shape[1])
    per_anchor, count, t, kept = _FilteredInfoNCE.apply(p.q, p.k, p.scale, p, float(rho), mode)
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
