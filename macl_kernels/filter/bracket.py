"""The exact top-ρ threshold of the Gradient Filter in the "rows" tiling (a tile = a block of anchors × ALL
keys): a sample bracket refined by vectorised counting passes, then the exact k-th largest from the few
members left inside the bracket. No histogram, no scalar scatter over the tile.

Input: a "negatives tile" zn (R, M): row i holds anchor i's negatives at their logits (z or z', finite) and
−inf everywhere else (positives, invalid keys, the anchor itself); n_i = the number of finite entries of row i
and k_i ∈ [0, n_i]. Output: t_i = the exact k_i-th largest entry of row i (+inf where k_i = 0).

With the count R(v) = #{j : zn_ij ≥ v} (exact: a compare and a row sum, one "counting pass" over the tile),
every row keeps a bracket of two values va > vb with their exact counts and the invariant
    R(va) < k_i ≤ R(vb)                    (so t_i ∈ [vb, va); initially va = +inf, vb = −FLT_MAX)
A probe at any value v counts R(v) and replaces va (R(v) < k_i, v < va) or vb (R(v) ≥ k_i, v > vb): the
invariant holds whatever v is; a good v only makes the bracket narrow faster. Probes come in pairs: one
"counting sweep" over the tile counts at two values per row (each row chunk is read from memory once, the
second compare hits the cache: ~1.6× one count, not 2×). The steps:
1. sample: the entries of SAMPLE_COLUMNS fixed, pseudo-randomly chosen key columns (the same for every tile:
   a seeded local generator), sorted per row;
2. one sweep at the two sample values around the expected position of the k_i-th largest (k_i/n_i of the
   finite sample ± BRACKET_SIGMAS binomial sd); an unlucky sample leaves a trivial end (+inf / −FLT_MAX);
3. up to MAX_PROBES more probes, two per sweep, at the values interpolated linearly between the bracket's
   ends and counts (regula falsi; Illinois rule: the residual of an end that did not move is halved), aimed
   REFINE_SIGMAS binomial sd above and below the target, until the brackets hold ≤ MEMBER_TARGET entries
   on average. A row with a trivial end probes its sample's extreme value there instead;
4. members: the entries in [vb, va) are gathered (their number per row is R(vb) − R(va), which checks the
   gather), sorted, and t_i = the (k_i − R(va))-th largest. The same pass sums exp(x) over x ≥ va, so the
   kept exp-sum Σ_{x ≥ t_i} exp(x) = that + the members ≥ t_i comes without another pass.
Exactness rests only on the counts (exact comparisons of the same values), never on the sample or the
interpolation: those decide only how many passes and members it takes (an adversarial row costs more
passes, or a larger member sort, never a wrong threshold). Ties: t_i may equal many entries; the caller
keeps every entry ≥ t_i.
CPU notes (measured): every elementwise pass runs over the tile in row chunks of CHUNK_ELEMENTS per thread
into one chunk-sized 0/1 float buffer (it stays in the core's L2 cache: half the time of a pass over the whole
tile), with float compares (several times faster than bool ones); the chunk views are made once and kept in
the call's workspace across tiles (slicing per pass and chunk costs as much as a small pass); the member mask
of the whole tile is gathered at once, 8 mask bytes at a time; the chunk loops run as TorchScript
(`filter/chunk_loops.py`: without the GIL, so tile workers overlap).
Typical cost (N = M = 8192, ρ = 0.5, 512-row tiles): 3 sweeps (6 counts), ≈ 26 members per row.
"""
from __future__ import annotations

import math

import torch

from . import chunk_loops as loops

SAMPLE_COLUMNS = 64      # sampled key columns per tile (sorted per row)
BRACKET_SIGMAS = 3.0     # the first two probes at the expected sample position ± this many binomial sd
REFINE_SIGMAS = 1.5      # the later probes aim this many binomial sd above / below the interpolated target
MAX_PROBES = 6           # probes after the first two (in pairs: one counting sweep over the tile per pair)
MEMBER_TARGET = 64       # stop probing once the brackets hold ≤ this many entries on average
CHUNK_ELEMENTS = 1 << 17  # elementwise passes go through the tile in row chunks of this size (cache-resident)

_COLUMNS: dict = {}


def sample_columns(M: int, device) -> torch.Tensor:
    """min(M, SAMPLE_COLUMNS) distinct key columns in [0, M), ascending; the same for a given M
    (a local torch.Generator seeded with 0: the global random state is neither read nor advanced)."""
    S = min(M, SAMPLE_COLUMNS)
    key = (M, S, str(device))
    cols = _COLUMNS.get(key)
    if cols is None:
        gen = torch.Generator().manual_seed(0)
        cols = torch.randperm(M, generator=gen)[:S].sort().values.to(device)
        if len(_COLUMNS) > 64:
            _COLUMNS.clear()
        _COLUMNS[key] = cols
    return cols


class Selection:
    """t (R,): the k-th largest entry per row (+inf where k = 0); kept_exp (R,): Σ exp(x) over the entries
    ≥ t (0 where k = 0); probes: counting passes made; members: the entries gathered for the final sort;
    widened: rows whose first sample probe landed on the wrong side."""

    def __init__(self, t, kept_exp, probes, members, widened):
        self.t, self.kept_exp, self.probes = t, kept_exp, probes
        self.members, self.widened = members, widened


class Chunks:
    """Row-chunk views of a tile x (R, M) and of two chunk-sized scratch buffers, made once.
    get(name, shape, dtype) gives reusable buffers (e.g. `Workspace.get` bound to a device)."""

    def __init__(self, x: torch.Tensor, get):
        R, M = x.shape
        # a cache-sized piece per thread: with T threads a chunk of T pieces (one fork/join per pass and chunk)
        rc = max(1, min(R, CHUNK_ELEMENTS * max(1, torch.get_num_threads()) // max(M, 1)))
        self.bounds = [(r0, min(R, r0 + rc)) for r0 in range(0, R, rc)]
        self.x = [x[a:b] for a, b in self.bounds]
        self.buf1 = _views(get("chunk1", (rc, M), x.dtype), self.bounds)
        self.buf2 = _views(get("chunk2", (rc, M), x.dtype), self.bounds)
        self.tile = x
        self.full_mask = get("tile_mask", (R, M), torch.bool)          # the member mask, 1 byte per logit
        self.mask = [self.full_mask[a:b] for a, b in self.bounds]
        self.col = torch.empty(R, 1, dtype=x.dtype, device=x.device)    # a per-row value, as a column
        self.cols = [self.col[a:b] for a, b in self.bounds]
        self.out = torch.empty(R, dtype=x.dtype, device=x.device)
        self.outs = [self.out[a:b] for a, b in self.bounds]
        self.col2 = torch.empty(R, 1, dtype=x.dtype, device=x.device)
        self.cols2 = [self.col2[a:b] for a, b in self.bounds]
        self.out2 = torch.empty(R, dtype=x.dtype, device=x.device)
        self.outs2 = [self.out2[a:b] for a, b in self.bounds]

    def count_ge(self, v: torch.Tensor) -> torch.Tensor:
        """(R,) #{j : x_ij ≥ v_i} as exact integers in x's dtype (a view, valid until the next call)."""
        self.col[:, 0] = v
        for x, f, c, o in zip(self.x, self.buf1, self.cols, self.outs):
            torch.sum(torch.ge(x, c, out=f), -1, out=o)
        return self.out

    def count_ge2(self, v1: torch.Tensor, v2: torch.Tensor) -> tuple:
        """(R,) counts at two values per row in one sweep (each chunk is read from memory once, then from the
        cache); views, valid until the next call."""
        self.col[:, 0] = v1
        self.col2[:, 0] = v2
        loops.get(loops.count2)(self.x, self.buf1, self.cols, self.cols2, self.outs, self.outs2)
        return self.out, self.out2

    def exp_where_ge(self, v: torch.Tensor, shift=None) -> None:
        """In place, chunk by chunk: x_ij ← exp(x_ij − shift_i)·1[x_ij ≥ v_i] (without shift: exp(x_ij)·…)."""
        self.col[:, 0] = v
        if shift is None:
            loops.get(loops.exp_ge)(self.x, self.buf1, self.cols)
            return
        for (a, b), x, f, c in zip(self.bounds, self.x, self.buf1, self.cols):
            keep = torch.ge(x, c, out=f)
            x.sub_(shift[a:b, None])
            x.exp_().mul_(keep)


def chunks_of(x: torch.Tensor, ws) -> Chunks:
    """`Chunks` of x with buffers from the workspace ws (`filter_select.Workspace`), made once and kept in it
    while x is the same tensor (the tiles of a call are computed into one workspace buffer)."""
    key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, torch.get_num_threads())
    cached = ws.bufs.get("_chunks")
    if cached is None or cached[0] != key:
        cached = ws.bufs["_chunks"] = (key, Chunks(x, lambda name, shape, dt: ws.get(name, shape, dt, x.device)))
    return cached[1]


def _views(buf, bounds):
    return [buf[:b - a] for a, b in bounds]


def bracket_select(zn: torch.Tensor, k: torch.Tensor, n: torch.Tensor, chunks: Chunks) -> Selection:
    """Exact k_i-th largest entry of each row of zn (see the module docstring).

    zn (R, M) float, contiguous (−inf = not a candidate; every other entry finite); k, n (R,) int64 with
    0 ≤ k_i ≤ n_i = the number of finite entries of row i; chunks: `Chunks(zn, ...)`. Returns a `Selection`.
    Raises RuntimeError if the finite entries of a row do not number n_i (the counts would be meaningless)."""
    R, M = zn.shape
    dev, dt = zn.device, zn.dtype
    t = torch.full((R,), math.inf, dtype=dt, device=dev)
    active = k > 0
    if R == 0 or M == 0 or not bool(active.any()):
        return Selection(t, torch.zeros_like(t), 0, 0, 0)
    big = torch.finfo(dt).max
    kf = k.to(dt)
    va = torch.full((R,), math.inf, dtype=dt, device=dev)
    vb = torch.full((R,), -big, dtype=dt, device=dev)
    ra = torch.zeros(R, dtype=dt, device=dev)
    rb = n.to(dt)

    def narrow(v, cnt):
        """The bracket after a count at v: v replaces va (R(v) < k, v below va) or vb (R(v) ≥ k, v above vb);
        any v keeps the invariant, one outside the bracket changes nothing."""
        low = cnt < kf
        up_a = low & (v < va)
        up_b = ~low & (v > vb)
        torch.where(up_a, v, va, out=va)
        torch.where(up_a, cnt, ra, out=ra)
        torch.where(up_b, v, vb, out=vb)
        torch.where(up_b, cnt, rb, out=rb)
        return up_a, up_b

    def probe2(v1, v2):
        c1, c2 = chunks.count_ge2(v1, v2)
        a1, b1 = narrow(v1, c1)
        a2, b2 = narrow(v2, c2)
        return a1 | a2, b1 | b2

    # 1.–2. the sorted sample (−inf → −FLT_MAX: R(−FLT_MAX) = n) and the first two probes, in one sweep
    smp = zn.index_select(1, sample_columns(M, dev)).sort(dim=1, descending=True).values
    ns = (smp > -math.inf).sum(1)
    smp.clamp_(min=-big)
    f = k.double() / n.clamp(min=1).double()
    mid = f * ns
    sd = torch.sqrt(mid * (1 - f)).mul_(BRACKET_SIGMAS)
    last = (ns - 1).clamp_(min=0)
    p_hi = torch.minimum((mid - sd).floor_().long().sub_(1).clamp_(min=0), last)
    p_lo = torch.minimum((mid + sd).ceil_().long(), last)
    moved_a, moved_b = probe2(torch.where(active, smp.gather(1, p_hi[:, None])[:, 0], va),
                              torch.where(active, smp.gather(1, p_lo[:, None])[:, 0], va))
    widened = int((active & ~(moved_a & moved_b)).sum())
    probes = 2
    s_max, s_min = smp[:, 0], smp.gather(1, last[:, None])[:, 0]
    # 3. interpolation probes in pairs (regula falsi between the bracket's ends, one probe aimed above and
    # one below the target in each sweep; Illinois rule: the residual of an end that did not move is halved)
    wa = torch.ones(R, dtype=dt, device=dev)
    wb = torch.ones(R, dtype=dt, device=dev)
    for it in range(MAX_PROBES // 2):
        m = (rb - ra).mul_(active)
        if float(m.sum()) <= MEMBER_TARGET * R:
            break
        fa = (kf - ra).sub_(0.5).mul_(wa)
        fb = (rb - kf).add_(0.5).mul_(wb)
        pf = fa.div_(fa + fb)
        md = m.clamp(min=1.0)
        marg = (md * pf * (1 - pf)).sqrt_().add_(1.0).mul_(REFINE_SIGMAS).div_(md)
        v1 = torch.lerp(va, vb, (pf - marg).clamp_(0.0, 1.0))
        v2 = torch.lerp(va, vb, (pf + marg).clamp_(0.0, 1.0))
        if bool(((va == math.inf) | (vb == -big)).logical_and_(active).any()):   # a trivial end: the sample's
            v1 = torch.where(va == math.inf, s_max, v1)                          # extreme value instead
            v2 = torch.where(vb == -big, s_min, v2)
        open_ = (m > MEMBER_TARGET) & (((v1 < va) & (v1 > vb)) | ((v2 < va) & (v2 > vb)))
        if not bool(open_.any()):                              # e.g. only rows with a trivial end are left
            break
        moved_a, moved_b = probe2(torch.where(open_, v1, va), torch.where(open_, v2, va))  # closed rows: no change
        probes += 2
        wb = torch.where(moved_b, torch.ones_like(wb), wb * 0.5)
        wa = torch.where(moved_a, torch.ones_like(wa), wa * 0.5)
    # 4. the members [vb, va) of each row, sorted: t = the (k − R(va))-th largest; Σ_{x ≥ t} exp(x) = the
    # sum above va (same pass) + the members ≥ t
    vals, esum = _members(vb.masked_fill(~active, math.inf), va, chunks)
    counts = (rb - ra).round_().long().mul_(active)
    if vals.numel() != int(counts.sum()):
        raise RuntimeError(f"bracket_select: {vals.numel()} members gathered, the counts say {int(counts.sum())} "
                           "(non-finite candidates, or n_i not the number of finite entries)")
    rank = (kf - ra).round_().long().clamp_(min=1)
    rows = torch.repeat_interleave(torch.arange(R, device=dev), counts)
    t = torch.where(active, _kth_largest(vals, rows, counts, rank), t)
    mem = torch.exp(vals).mul_(vals >= t[rows])
    kept = torch.where(active, esum.index_add(0, rows, mem), torch.zeros_like(esum))
    return Selection(t, kept, probes, vals.numel(), widened)


def _members(lo, hi, chunks: Chunks):
    """The entries x with lo_i ≤ x < hi_i, row-major, and (R,) Σ_j exp(x_ij)·1[x_ij ≥ hi_i]: chunk by chunk,
    1[x ≥ hi] multiplies exp(x) in, then 1[x ≥ lo] − 1[x ≥ hi] (0/1 floats) goes to the chunk's rows of a
    tile-wide bool mask; one gather over the whole mask at the end (8 bytes at a time)."""
    esum = chunks.out
    chunks.col[:, 0] = hi
    chunks.col2[:, 0] = lo
    loops.get(loops.members)(chunks.x, chunks.buf1, chunks.buf2, chunks.cols, chunks.cols2, chunks.mask, chunks.outs)
    return _gather_true(chunks.tile, chunks.full_mask), esum


def _gather_true(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[mask] in row-major order, for a sparse mask: the nonzero scan runs over the mask's bytes read 8 at a
    time (as int64 words), then only the words that hold a True are expanded."""
    R, M = mask.shape
    if M % 8 or not (mask.is_contiguous() and x.is_contiguous()):
        return x[mask]
    words = mask.view(torch.uint8).view(torch.int64).reshape(-1)
    hit = words.nonzero()[:, 0]
    # index_select, not x[hit]: the advanced-indexing kernel is ~4× slower for this gather (measured)
    return torch.masked_select(x.reshape(-1, 8).index_select(0, hit), mask.reshape(-1, 8).index_select(0, hit))


def _kth_largest(vals: torch.Tensor, rows: torch.Tensor, counts: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Per row the rank-th largest of its values. vals (T,) grouped by row (row-major), rows (T,) their rows,
    counts (R,) values per row, rank (R,) in [1, counts] where counts > 0. Returns (R,) (−inf where a row has
    no values).
    One 1-D sort, no (R, max count) padding (one row with many members does not make every row wide):
    float32 values as order-preserving int32 keys under their row in the high bits of an int64; other dtypes
    sorted by value, then stably by row."""
    R = counts.shape[0]
    dev = vals.device
    if vals.numel() == 0:
        return torch.full((R,), -math.inf, dtype=vals.dtype, device=dev)
    pos = (torch.cumsum(counts, 0) - rank.clamp(max=counts.clamp(min=1))).clamp_(0, vals.numel() - 1)
    if vals.dtype == torch.float32:
        b = vals.view(torch.int32).long()
        key = torch.where(b < 0, b ^ 0x7FFFFFFF, b).add_(rows << 32)     # sign-magnitude → ordered ints
        kk = key.sort().values[pos] - (torch.arange(R, device=dev) << 32)
        out = torch.where(kk < 0, kk ^ 0x7FFFFFFF, kk).int().view(torch.float32)
    else:
        sv, order = vals.sort()
        out = sv[rows[order].sort(stable=True).indices][pos]
    return torch.where(counts > 0, out, torch.full_like(out, -math.inf))
