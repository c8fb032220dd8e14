"""Parts of the Gradient Filter (`macl_kernels.filter.filtered`): the histogram selection of the "chunks" tiling
(per-anchor histograms of the shifted logits, the exact k-th largest from the members of one bin; the "rows"
tiling uses `filter_bracket` instead), the positive-pair list, and the per-call scratch buffers. See the
module docstring of `macl_kernels.filter.filtered` for the algorithm."""
from __future__ import annotations

import math

import torch

from ..problem import ContrastProblem
from ..eager.tiled import tile_positives

NUM_BINS = 512                 # histogram bins per anchor over [−2b_i, 0] (at most)
PAIR_BUDGET = 1 << 22          # at most this many positive pairs are listed (two int64 vectors: 64 MiB)
SLOT_ERROR_LIMIT = 0.25        # above this worst-case rounding (in bins) slots are clamped into the guard bins


class Workspace:
    """Reusable tile-sized scratch tensors of one call. Fresh multi-MiB tensors come from mmap on Linux and
    every first touch of a page faults: allocating each tile's temporaries anew made elementwise passes
    several times slower than the same pass into a reused buffer."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, name: str, shape, dtype, device) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype or buf.device != device:
            buf = self.bufs[name] = torch.empty(shape, dtype=dtype, device=device)
        return buf


def _clear_self(p: ContrastProblem, x: torch.Tensor, value, r0, r1, c0, c1) -> None:
    """In place: with exclude_self, the pairs (i, i) of a tile get `value` ((g, r, 1) tensor or scalar)."""
    if p.exclude_self:
        lo, hi = max(r0, c0), min(r1, c1)
        if lo < hi:
            idx = torch.arange(lo, hi, device=x.device)
            if isinstance(value, torch.Tensor):
                value = value[:, idx - r0, 0]
            x[:, idx - r0, idx - c0] = value


class Histogram:
    """Histogram state of one block of anchors (g, r). Slots of a row: 0 = not a negative (invalid key, the
    anchor itself), 1..nb+2 = negative bins (low to high; the outer two only catch rounding), nb+3 = unused,
    nb+4 = positives; nb = `num_bins(M)`."""

    def __init__(self, bound, g0, g1, r0, r1, nb: int, depth: int, ws: Workspace):
        self.shape = (g1 - g0, r1 - r0)
        self.ws = ws
        self.nb = NB = nb
        b = bound[g0:g1, r0:r1]
        dev, dt = b.device, b.dtype
        self.width = NB + 5
        rows = torch.arange(b.numel(), device=dev).reshape(self.shape)
        self.base = (rows * self.width).to(torch.int32)                           # (g, r) first slot
        base = (rows * self.width).to(dt)[..., None]
        self.inv = torch.where(b > 0, NB / (2 * b).clamp(min=1e-30), torch.zeros_like(b))[..., None]
        # slot = ⌊base + NB + 2 + z'·inv⌋ ∈ [base + 1, base + NB + 2] for z' ∈ [−2b, 0] (± rounding)
        self.off, self.lo, self.hi = base + (NB + 2), base, base + (NB + 4)
        self.top = self.base + (NB + 4)                                            # positives' slot
        # rounding of z' (≤ D·eps·b) and of the slot arithmetic must stay below one bin for the guard bins
        eps = torch.finfo(dt).eps
        self.clamp = not bool(torch.isfinite(b).all()) or depth * eps * NB > SLOT_ERROR_LIMIT
        n = b.numel() * self.width
        self.count = torch.zeros(n, dtype=torch.int32, device=dev)
        self.esum = torch.zeros(n, dtype=dt, device=dev)
        self.pos_sum = torch.zeros(self.shape, dtype=dt, device=dev)

    def slots(self, p: ContrastProblem, zp, pidx, g0, g1, r0, r1, c0, c1):
        """(g, r, c) int32 flat slot of every pair of a tile; pidx: the positives' (g, r, c) indices."""
        ws = self.ws
        x = torch.mul(zp, self.inv, out=ws.get("x", zp.shape, zp.dtype, zp.device)).add_(self.off)
        if self.clamp:                             # else z' ∈ [−2b, 0] up to rounding (< 1 bin): no clamp needed
            x.nan_to_num_(nan=0.0).clamp_(self.lo + 1, self.hi - 2)
        slot = ws.get("slot", zp.shape, torch.int32, zp.device).copy_(x)
        slot[pidx] = self.top[pidx[0], pidx[1]]
        if p.k_valid is not None:
            slot = torch.where(p.k_valid[g0:g1, None, c0:c1], slot, self.base[..., None])
        _clear_self(p, slot, self.base[..., None], r0, r1, c0, c1)
        return slot

    def add(self, zp, slot, pidx):
        # index_add_ rather than bincount: bincount scans its input twice more for min and max
        flat = slot.reshape(-1)
        self.count.index_add_(0, flat, _ones(flat.numel(), self.count.dtype, flat.device))
        e = torch.exp(zp, out=self.ws.get("x", zp.shape, zp.dtype, zp.device))      # x is free again
        self.esum.index_add_(0, flat, e.reshape(-1))
        self.pos_sum.index_put_(pidx[:2], zp[pidx], accumulate=True)

    def select(self, rho: float):
        """After the histogram pass: k_i, the negatives in the target bin, the target slot (flat, −1 where
        k_i = 0), the rank r_i inside it, the number of negatives strictly above it, the exp-sum of the slots
        above it (positives included) and |P|."""
        NB = self.nb
        cnt = self.count.reshape(*self.shape, self.width)
        neg = cnt[..., 1:NB + 3]
        n_neg = neg.sum(-1)
        k_i = _k_of(n_neg, rho)
        above = n_neg[..., None] - neg.cumsum(-1) + neg              # above[j] = Σ_{j' ≥ j} (exact integers)
        j = ((above >= k_i[..., None]).sum(-1) - 1).clamp_(min=0)
        strictly = above.gather(-1, j[..., None])[..., 0] - neg.gather(-1, j[..., None])[..., 0]
        es = self.esum.reshape(*self.shape, self.width)
        slots = torch.arange(self.width, device=es.device)
        # Σ over the slots above the target bin (slot j + 1), positives' slot included; a masked sum, not a
        # difference of prefix sums, so that a small kept sum is not lost to cancellation
        e_strict = (es * (slots > (j + 1)[..., None])).sum(-1)
        target = torch.where(k_i > 0, self.base + j + 1, torch.full_like(j, -1)).to(torch.int32)
        e_strict = torch.where(k_i > 0, e_strict, es[..., NB + 4])
        in_bin = torch.where(k_i > 0, neg.gather(-1, j[..., None])[..., 0], torch.zeros_like(k_i))
        return k_i, in_bin, target, k_i - strictly, strictly, e_strict, cnt[..., NB + 4]


def histogram_block(p, qs, k, bound, rho, positives, ws, g0, g1, r0, r1, chunks, shifted_logits):
    """One block of anchors (g0:g1, r0:r1) by the histogram + member passes over its key chunks [(c0, c1)]
    (the "chunks" tiling, or bounds too large for `filter_bracket`); shifted_logits: `filtered._shifted_logits`
    (the one way a tile is computed). Returns t' (g, r), k_i, Σ_kept exp(z'), Σ_P z' and |P| (g, r)."""
    M = k.shape[1]
    dev = qs.device
    blk = Histogram(bound, g0, g1, r0, r1, num_bins(M), qs.shape[-1], ws)
    kept_tiles = []
    for c0, c1 in chunks:
        zp = shifted_logits(qs, k, bound, g0, g1, r0, r1, c0, c1, ws)
        pidx = positives.tile(g0, g1, r0, r1, c0, c1)
        slot = blk.slots(p, zp, pidx, g0, g1, r0, r1, c0, c1)
        blk.add(zp, slot, pidx)
        if len(chunks) == 1:  # "rows": the member pass reads the same tile
            kept_tiles.append((zp, slot))
    k_i, in_bin, target, rank, _, e_strict, cnt_pos = blk.select(rho)
    vals, rows = [], []
    n_rows = k_i.numel()
    for c0, c1 in chunks:
        if kept_tiles:  # one chunk: the members in row-major order, their anchors from the bin counts
            zp, slot = kept_tiles[0]
            eq = torch.eq(slot, target[..., None], out=ws.get("hit", slot.shape, torch.bool, slot.device))
            vals.append(torch.masked_select(zp, eq))
            rows.append(torch.repeat_interleave(torch.arange(n_rows, device=dev), in_bin.reshape(-1)))
            continue
        zp = shifted_logits(qs, k, bound, g0, g1, r0, r1, c0, c1, ws)
        slot = blk.slots(p, zp, positives.tile(g0, g1, r0, r1, c0, c1), g0, g1, r0, r1, c0, c1)
        eq = torch.eq(slot, target[..., None], out=ws.get("hit", slot.shape, torch.bool, slot.device))
        hit = eq.nonzero(as_tuple=True)                                # row-major: grouped by anchor
        vals.append(zp[hit])
        rows.append(hit[0] * (r1 - r0) + hit[1])
    tb, e_mem = _kth_of_members(torch.cat(vals), torch.cat(rows), n_rows, rank.reshape(-1),
                                grouped=len(chunks) == 1)
    tb, e_mem = tb.reshape(blk.shape), e_mem.reshape(blk.shape)
    return tb, k_i, e_strict + e_mem, blk.pos_sum, cnt_pos


_ONES: dict = {}


def _ones(n: int, dtype, device) -> torch.Tensor:
    """A cached read-only ones vector of length ≥ n (the counts' increments)."""
    key = (dtype, str(device))
    buf = _ONES.get(key)
    if buf is None or buf.numel() < n:
        buf = _ONES[key] = torch.ones(n, dtype=dtype, device=device)
    return buf[:n]


def num_bins(M: int) -> int:
    """Bins per anchor: about 16 keys per bin for small M (a histogram never larger than the tile), at most
    NUM_BINS."""
    return int(max(16, min(NUM_BINS, M // 16)))


def _k_of(n_neg: torch.Tensor, rho: float) -> torch.Tensor:
    """k_i = ⌈ρ·|negatives|⌉ (a 1e-9 guard keeps 0.3·10 at 3), at most |negatives|."""
    return torch.minimum(torch.ceil(n_neg.double() * rho - 1e-9).long().clamp_(min=0), n_neg)


def _kth_of_members(vals, rows, n_rows, rank, grouped: bool = False):
    """Exact rank-th largest member per row and Σ exp over members ≥ it.

    vals (T,) member logits, rows (T,) their row in [0, n_rows); rank (n_rows,) ≥ 1 where the row has
    members; grouped: rows is already non-decreasing. Returns (t (n_rows,), esum (n_rows,)); t = +inf for
    rows without members."""
    dev, dt = vals.device, vals.dtype
    counts = torch.bincount(rows, minlength=n_rows)
    width = int(counts.max()) if counts.numel() and vals.numel() else 0
    t = torch.full((n_rows,), math.inf, dtype=dt, device=dev)
    es = torch.zeros(n_rows, dtype=dt, device=dev)
    if width == 0:
        return t, es
    if grouped:
        rows_s, vals_s = rows, vals
    else:
        order = torch.argsort(rows, stable=True)
        rows_s, vals_s = rows[order], vals[order]
    start = torch.cumsum(counts, 0) - counts
    col = torch.arange(rows_s.numel(), device=dev) - start[rows_s]
    padded = torch.full((n_rows, width), -math.inf, dtype=dt, device=dev)
    padded[rows_s, col] = vals_s
    ranked = padded.sort(dim=1, descending=True).values
    has = counts > 0
    kth = ranked.gather(1, (rank.clamp(min=1, max=width) - 1)[:, None])[:, 0]
    t = torch.where(has, kth, t)
    es = torch.where(padded >= t[:, None], torch.exp(padded), 0.0).sum(1)
    return t, es


class PositivePairs:
    """The positive pairs of a problem, listed once (rule "label" / "index"), so that a tile finds its
    positives by slicing instead of comparing every pair; not listed (`pairs is None`) for the radius rule or
    when positives are dense (more than N·M/8, or PAIR_BUDGET), where each tile compares labels as
    `tile_positives` does."""

    def __init__(self, p: ContrastProblem):
        self.p = p
        self.pairs = None
        G, N, M, _ = p.shape
        if p.rule == "radius" or N == 0 or M == 0:
            return
        dev = p.q.device
        out = []
        total = 0
        for g in range(G):
            keys = torch.arange(M, device=dev)
            if p.k_valid is not None:
                keys = keys[p.k_valid[g]]
            if p.rule == "index":
                cols = p.q_meta[g]
                ok = torch.isin(cols, keys)
                rows, cols = torch.arange(N, device=dev)[ok], cols[ok]
            else:
                kl = p.k_meta[g][keys]
                order = torch.argsort(kl, stable=True)
                sk, sid = kl[order], keys[order]
                lo = torch.searchsorted(sk, p.q_meta[g], right=False)
                cnt = torch.searchsorted(sk, p.q_meta[g], right=True) - lo
                total += int(cnt.sum())
                if total > min(N * M * G // 8, PAIR_BUDGET):
                    return
                T = int(cnt.sum())
                rows = torch.repeat_interleave(torch.arange(N, device=dev), cnt, output_size=T)
                first = torch.repeat_interleave(lo - (torch.cumsum(cnt, 0) - cnt), cnt, output_size=T)
                cols = sid.index_select(0, first.add_(torch.arange(T, device=dev)))   # index_select: faster
            if p.exclude_self:
                keep = (rows != cols).nonzero()[:, 0]
                rows, cols = rows.index_select(0, keep), cols.index_select(0, keep)
            ptr = torch.zeros(N + 1, dtype=torch.long, device=dev)
            ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=N), 0)
            out.append((ptr.tolist(), rows, cols))
        self.pairs = out

    def tile(self, g0, g1, r0, r1, c0, c1):
        """(gi, ri, ci) local indices of the positives of one tile, row-major within each group."""
        if self.pairs is None:
            return tile_positives(self.p, g0, g1, r0, r1, c0, c1).nonzero(as_tuple=True)
        gs, rs, cs = [], [], []
        full = c0 == 0 and c1 == self.p.k.shape[1]
        for g in range(g0, g1):
            ptr, rows, cols = self.pairs[g]
            a, b = ptr[r0], ptr[r1]
            rr, cc = rows[a:b] - r0, cols[a:b]
            if not full:
                inside = (cc >= c0) & (cc < c1)
                rr, cc = rr[inside], cc[inside] - c0
            gs.append(torch.full_like(rr, g - g0))
            rs.append(rr)
            cs.append(cc)
        return torch.cat(gs), torch.cat(rs), torch.cat(cs)
