"""The exact top-ρ threshold of the Gradient Filter in the "rows" tiling (a tile = a block of anchors × ALL
keys): a sample bracket refined by vectorised counting passes, then the exact k-th largest from the few
members left inside the bracket. No histogram, no scalar scatter over the tile.

Input: a "negatives tile" zn (R, M): row i holds anchor i's negatives at their shifted logits z' (finite) and
−inf everywhere else (positives, invalid keys, the anchor itself); n_i = the number of finite entries of row i
and k_i ∈ [0, n_i]. Output: t_i = the exact k_i-th largest entry of row i (+inf where k_i = 0).

With R(v) = #{j : zn_ij ≥ v} (exact: a compare and a row sum over the tile, one "counting pass"), every row
keeps a bracket a_i < b_i of positions in an extended, sorted sample of its own values, with
    R(value at a_i) < k_i ≤ R(value at b_i)                                   (the invariant)
so that t_i lies in [value at b_i, value at a_i):
1. sample: the entries of SAMPLE_COLUMNS fixed, pseudo-randomly chosen key columns (the same for every tile
   of a call: a seeded local generator), sorted per row; extended by +inf in front (R = 0) and −FLT_MAX
   behind the finite ones (R = n_i): the trivial bracket, valid for every row whatever the sample;
2. two counting passes at the sample values around the expected position of the k_i-th largest
   (k_i/n_i of the finite sample ± BRACKET_SIGMAS binomial standard deviations) narrow the bracket where they
   land inside it; a row whose sample is unlucky (the true position outside the ±σ window) keeps a trivial
   end there: slower (more members), never wrong;
3. up to MAX_PROBES more counting passes, each probing per row the sample position interpolated linearly
   between the bracket's counts, until every bracket holds at most MEMBER_TARGET entries (typically
   adjacent sample positions, ≈ M/SAMPLE_COLUMNS entries);
4. members: the entries in [value at b_i, value at a_i) are gathered (their count per row is known exactly,
   R(b) − R(a), which also checks the gather), sorted per row, and t_i = the (k_i − R(a))-th largest.
Exactness rests only on the counts (exact comparisons of the same values), never on the sample: the sample
and the interpolation decide only how many passes and members it takes. Ties are handled by the
invariant (t_i may equal many entries; the caller keeps every entry ≥ t_i).
Cost per tile of 2^20 logits on one CPU thread (measured): a counting pass ≈ 0.45 ms, the sample sort
≈ 1 ms, the member gather ≈ 2 ms; the GEMM of the tile ≈ 2 ms.
"""
from __future__ import annotations

import math

import torch

SAMPLE_COLUMNS = 64      # sampled key columns per tile (sorted per row)
BRACKET_SIGMAS = 2.5     # the first two probes at the expected sample position ± this many binomial sd
REFINE_SIGMAS = 2.0      # the later probes aim this many binomial sd above / below the interpolated target
MAX_PROBES = 6           # probes after the first two (each one counting pass over the tile)
MEMBER_TARGET = 64       # stop probing once the brackets hold ≤ this many entries on average
CHUNK_ELEMENTS = 1 << 18  # elementwise passes go through the tile in row chunks of this size (L2-resident)

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
    """t (R,): the k-th largest entry per row (+inf where k = 0); probes: counting passes made; members: the
    entries gathered for the final sort; widened: rows whose first two probes did not both land inside the
    bracket on the expected sides (their bracket kept a trivial end after step 2)."""

    def __init__(self, t, probes, members, widened):
        self.t, self.probes, self.members, self.widened = t, probes, members, widened


def chunk_rows(M: int) -> int:
    """Rows per chunk of the elementwise passes: CHUNK_ELEMENTS / M (at least 1)."""
    return max(1, CHUNK_ELEMENTS // max(M, 1))


def bracket_select(zn: torch.Tensor, k: torch.Tensor, n: torch.Tensor, scratch=None) -> Selection:
    """Exact k_i-th largest entry of each row of zn (see the module docstring).

    zn (R, M) float, contiguous (−inf = not a candidate; every other entry finite); k, n (R,) int64 with
    0 ≤ k_i ≤ n_i = the number of finite entries of row i; scratch: an optional callable
    (name, shape, dtype) → tensor giving reusable buffers. Returns a `Selection`.
    Raises RuntimeError if the finite entries of a row do not number n_i (the counts would be meaningless)."""
    R, M = zn.shape
    dev, dt = zn.device, zn.dtype
    get = scratch or (lambda name, shape, dtype: torch.empty(shape, dtype=dtype, device=dev))
    t = torch.full((R,), math.inf, dtype=dt, device=dev)
    active = k > 0
    if R == 0 or M == 0 or not bool(active.any()):
        return Selection(t, 0, 0, 0)
    big = torch.finfo(dt).max
    rc = chunk_rows(M)
    cmp = get("cmp", (min(R, rc), M), dt)
    cnt = torch.empty(R, dtype=dt, device=dev)
    kf = k.to(dt)
    # the bracket: values va > vb with exact counts ra < k ≤ rb (counts as exact integers in dt)
    va = torch.full((R,), math.inf, dtype=dt, device=dev)
    vb = torch.full((R,), -big, dtype=dt, device=dev)
    ra = torch.zeros(R, dtype=dt, device=dev)
    rb = n.to(dt)

    def probe(v):
        """One counting pass at v (R,), chunk by chunk (the 0/1 buffer stays in cache); the bracket keeps
        its invariant whatever v is (a v outside it only fails to narrow it)."""
        for r0 in range(0, R, rc):
            r1 = min(R, r0 + rc)
            torch.sum(torch.ge(zn[r0:r1], v[r0:r1, None], out=cmp[:r1 - r0]), -1, out=cnt[r0:r1])
        low = cnt < kf
        torch.where(low, v, va, out=va)
        torch.where(low, cnt, ra, out=ra)
        torch.where(low, vb, v, out=vb)
        torch.where(low, rb, cnt, out=rb)
        return low

    # 1.–2. the sorted sample and the first two probes: the expected sample position of the k-th largest
    # ± BRACKET_SIGMAS sd (inside the sample); where the first lands on the wrong side, the second steps
    # further out
    smp = zn.index_select(1, sample_columns(M, dev)).sort(dim=1, descending=True).values
    S = smp.shape[1]
    ns = (smp > -math.inf).sum(1)
    smp.clamp_(min=-big)                                        # R(−FLT_MAX) = n: no −inf probe
    f = k.double() / n.clamp(min=1).double()
    mid = f * ns.double()
    sd = torch.sqrt(ns.double() * f * (1 - f)).mul_(BRACKET_SIGMAS)
    last = (ns - 1).clamp_(min=0)
    p_hi = torch.minimum((torch.floor(mid - sd).long() - 1).clamp_(min=0), last)
    p_lo = torch.minimum(torch.ceil(mid + sd).long(), last)
    v1 = smp.gather(1, p_hi[:, None])[:, 0]
    missed = ~probe(torch.where(active, v1, va))
    p_lo = torch.where(missed, (2 * p_hi - p_lo).clamp_(min=0), p_lo)
    v2 = smp.gather(1, p_lo[:, None])[:, 0]
    probe(torch.where(active, v2, va))
    widened = int((missed & active).sum())
    probes = 2
    s_max, s_min = smp[:, 0], smp.gather(1, last[:, None])[:, 0]
    # 3. probes alternately just above and just below the value of the k-th largest interpolated linearly
    # between the bracket's ends (regula falsi with the Illinois rule: an end kept twice in a row has its
    # residual halved, against the curvature of the count in the tails); the count above a value inside is
    # binomial, hence the margin of REFINE_SIGMAS sd. A row with a trivial end probes the sample's extreme
    # value on that side (the bracket then holds ≈ M/S entries even if that probe lands on the far side).
    # Until the brackets hold ≤ MEMBER_TARGET entries on average (the final sort costs by the total)
    wa = torch.ones(R, dtype=dt, device=dev)
    wb = torch.ones(R, dtype=dt, device=dev)
    prev = torch.zeros(R, dtype=torch.bool, device=dev)          # the previous probe moved va
    for it in range(MAX_PROBES):
        m = (rb - ra).masked_fill_(~active, 0.0)
        if float(m.sum()) <= MEMBER_TARGET * R:
            break
        probes += 1
        fa = (kf - ra - 0.5).mul_(wa)
        fb = (rb - kf + 0.5).mul_(wb)
        pf = fa / (fa + fb)
        md = m.clamp(min=1.0)
        marg = torch.sqrt(md * pf * (1 - pf)).add_(1.0).mul_(REFINE_SIGMAS / md)
        pf = (pf - marg if it % 2 == 0 else pf + marg).clamp_(0.0, 1.0)  # aim above, then below the target
        v = torch.lerp(va, vb, pf)
        v = torch.where(va == math.inf, s_max, torch.where(vb == -big, s_min, v))
        v = torch.where(m > MEMBER_TARGET, v, va)                # closed rows: R(va) = ra, nothing changes
        low = probe(v)
        wb = torch.where(low & prev, wb * 0.5, torch.where(low, wb, torch.ones_like(wb)))
        wa = torch.where(~low & ~prev, wa * 0.5, torch.where(low, torch.ones_like(wa), wa))
        prev = low
    # 4. the members [vb, va) of each row, sorted: t = the (k − R(va))-th largest
    v_hi = va.masked_fill(~active, math.inf)[:, None]
    v_lo = vb.masked_fill(~active, math.inf)[:, None]
    cmp2 = get("cmp2", cmp.shape, dt)
    hit = get("hit", cmp.shape, torch.bool)
    parts = []
    for r0 in range(0, R, rc):
        r1 = min(R, r0 + rc)
        zc = zn[r0:r1]
        # 1[z ≥ vb] − 1[z ≥ va] as 0/1 floats (float compares are several times faster than bool ones here)
        ind = torch.ge(zc, v_lo[r0:r1], out=cmp[:r1 - r0]).sub_(torch.ge(zc, v_hi[r0:r1], out=cmp2[:r1 - r0]))
        parts.append(_gather_true(zc, hit[:r1 - r0].copy_(ind)))
    vals = torch.cat(parts) if len(parts) > 1 else parts[0]
    counts = torch.where(active, (rb - ra).round_().long(), torch.zeros_like(k))
    if vals.numel() != int(counts.sum()):
        raise RuntimeError(f"bracket_select: {vals.numel()} members gathered, the counts say {int(counts.sum())} "
                           "(non-finite candidates, or n_i not the number of finite entries)")
    rank = (k - ra.round().long()).clamp_(min=1)
    t = torch.where(active, _kth_largest(vals, counts, rank), t)
    return Selection(t, probes, vals.numel(), widened)


def _gather_true(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x[mask] in row-major order, for a sparse mask: the nonzero scan runs over the mask's bytes read 8 at a
    time (as int64 words), then only the words that hold a True are expanded."""
    R, M = mask.shape
    if M % 8 or not (mask.is_contiguous() and x.is_contiguous()):
        return x[mask]
    words = mask.view(torch.uint8).view(torch.int64).reshape(-1)
    hit = words.nonzero()[:, 0]
    return x.reshape(-1, 8)[hit][mask.reshape(-1, 8)[hit]]


def _kth_largest(vals: torch.Tensor, counts: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Per row the rank-th largest of its values. vals (T,) grouped by row (row-major), counts (R,) values per
    row, rank (R,) in [1, counts] where counts > 0. Returns (R,) (−inf where a row has no values).
    One 1-D sort, no (R, max count) padding (one row with many members does not make every row wide):
    float32 values as order-preserving int32 keys under their row in the high bits of an int64; other dtypes
    sorted by value, then stably by row."""
    R = counts.shape[0]
    dev = vals.device
    if vals.numel() == 0:
        return torch.full((R,), -math.inf, dtype=vals.dtype, device=dev)
    rows = torch.repeat_interleave(torch.arange(R, device=dev), counts)
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
