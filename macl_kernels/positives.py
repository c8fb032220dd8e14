"""The positive set as a linear operator, applied without ever forming an N×M mask.

Let Y be the (G, N, M) 0/1 matrix with Y_ij = 1[j ∈ P(i)] (KERNELS.md §1). The chunked PyTorch
implementation needs only two products with it:

    forward:   Y @ x      (G, M, F) -> (G, N, F)   e.g. x = k gives Σ_{p∈P(i)} k_p, x = 1 gives |P(i)|
    backward:  Yᵀ @ w     (G, N, F) -> (G, M, F)   e.g. w_i = g_i/|P(i)|·q_i gives the positive part of dk

Both cost O((N + M)·F) (plus a sort for the radius rule) because every rule has structure:
- index:  Y has one entry per row: a gather, and its transpose a scatter-add.
- label:  Y_ij = 1[l_i = l_j]: per-class sums of x, looked up by the anchor's class.
- radius: Y_ij = 1[|p_i − p_j| < t]: sort keys by position; the positives of anchor i are a contiguous
          run of the sorted keys, so their sum is a difference of prefix sums (accumulated in float64).
          The run's ends are found by a binary search on the exact float32 predicate, so the set is
          identical to the one the reference and the kernels compute, ties at the threshold included.
On top of the rule, Y is masked by k_valid (columns) and, with exclude_self, by j ≠ i (the diagonal).
q_valid is not part of Y: the caller zeroes the rows of anchors that do not count.
"""
from __future__ import annotations

import torch

from .problem import ContrastProblem


class PositiveOperator:
    """Y and Yᵀ products for one `ContrastProblem` (see module docstring)."""

    def __init__(self, p: ContrastProblem):
        self.p = p
        G, N, M, _ = p.shape
        self.G, self.N, self.M = G, N, M
        dev = p.q.device
        self.kv = p.k_valid if p.k_valid is not None else torch.ones(G, M, dtype=torch.bool, device=dev)
        self.all_kv = p.k_valid is None  # no column mask: skip the multiplications by kv (no N×F temporaries)
        if p.rule == "label":
            # One id space for anchors' and keys' labels of all groups: id = unique(group, label).
            g_q = torch.arange(G, device=dev)[:, None].expand(G, N)
            g_k = torch.arange(G, device=dev)[:, None].expand(G, M)
            pairs = torch.cat([torch.stack([g_q.reshape(-1), p.q_meta.reshape(-1)], 1),
                               torch.stack([g_k.reshape(-1), p.k_meta.reshape(-1)], 1)])
            uniq, inverse = torch.unique(pairs, dim=0, return_inverse=True)
            self.n_classes = uniq.shape[0]
            self.q_class = inverse[: G * N]
            self.k_class = inverse[G * N:]
        elif p.rule == "radius":
            self.k_order = torch.argsort(p.k_meta, dim=1, stable=True)
            self.k_sorted = torch.gather(p.k_meta, 1, self.k_order)
            self.k_lo, self.k_hi = _radius_runs(p.q_meta, self.k_sorted, p.threshold)
            self.q_order = torch.argsort(p.q_meta, dim=1, stable=True)
            q_sorted = torch.gather(p.q_meta, 1, self.q_order)
            self.q_lo, self.q_hi = _radius_runs(p.k_meta, q_sorted, p.threshold)
        elif p.rule == "index":
            idx = p.q_meta
            ok = torch.gather(self.kv, 1, idx)
            if p.exclude_self:
                ok = ok & (idx != torch.arange(N, device=dev)[None, :])
            self.index_ok = ok
            self.all_ok = bool(ok.all())
        else:
            raise ValueError(f"unknown positive rule {p.rule!r}")

    def _diagonal(self) -> tuple[int, torch.Tensor | None]:
        """(d, mask): with exclude_self, pairs (i, i) for i < d = min(N, M) leave P(i); mask (G, d) says
        which of them the rule alone would have made positive (those must be subtracted)."""
        p = self.p
        if not p.exclude_self or p.rule == "index":
            return 0, None
        d = min(self.N, self.M)
        if p.rule == "label":
            return d, p.q_meta[:, :d] == p.k_meta[:, :d]
        return d, (p.q_meta[:, :d] - p.k_meta[:, :d]).abs() < p.threshold

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Y @ x: (G, M, F) -> (G, N, F), in x's dtype (radius sums in float64, then cast)."""
        p, G, N, M = self.p, self.G, self.N, self.M
        F = x.shape[-1]
        if p.rule == "index":  # index_ok already holds k_valid (and j ≠ i)
            out = torch.gather(x, 1, p.q_meta[..., None].expand(G, N, F))
            return out if self.all_ok else out.mul_(self.index_ok[..., None])
        xv = x if self.all_kv else x * self.kv[..., None]
        if p.rule == "label":
            sums = x.new_zeros(self.n_classes, F).index_add_(0, self.k_class, xv.reshape(G * M, F))
            out = sums[self.q_class].reshape(G, N, F)
        else:
            out = _run_sums(xv, self.k_order, self.k_lo, self.k_hi).to(x.dtype)
        d, diag = self._diagonal()
        if d:
            out[:, :d] -= xv[:, :d] * diag[..., None]
        return out

    def apply_t(self, w: torch.Tensor) -> torch.Tensor:
        """Yᵀ @ w: (G, N, F) -> (G, M, F)."""
        p, G, N, M = self.p, self.G, self.N, self.M
        F = w.shape[-1]
        if p.rule == "index":
            out = w.new_zeros(G, M, F)
            idx = p.q_meta[..., None].expand(G, N, F)
            return out.scatter_add_(1, idx, w if self.all_ok else w * self.index_ok[..., None])
        if p.rule == "label":
            sums = w.new_zeros(self.n_classes, F).index_add_(0, self.q_class, w.reshape(G * N, F))
            out = sums[self.k_class].reshape(G, M, F)
        else:
            out = _run_sums(w, self.q_order, self.q_lo, self.q_hi).to(w.dtype)
        d, diag = self._diagonal()
        if d:
            out[:, :d] -= w[:, :d] * diag[..., None]
        return out if self.all_kv else out.mul_(self.kv[..., None])


def _radius_runs(centres: torch.Tensor, sorted_pos: torch.Tensor, threshold: float):
    """For each centre c (G, A), the run [lo, hi) of `sorted_pos` (G, B) with |c − pos| < threshold.

    Binary search on the predicate as computed in float32 (fl(c − pos) is monotone in pos, so the run is
    contiguous), so that boundary ties resolve exactly as `|a − b| < t` does elsewhere.
    """
    # A Python float against float32 tensors is compared in float32 (a wrapped scalar takes the tensor's dtype),
    # as `|a − b| < t` is everywhere else; no tensor is made from it (on CUDA that would be a host-device copy).
    t = float(threshold)
    below = lambda pos, c: (c - pos) >= t   # pos too small: monotone True..True False..False
    above = lambda pos, c: (pos - c) >= t   # pos too large: monotone False..False True..True
    lo = _first_true(sorted_pos, centres, lambda pos, c: ~below(pos, c))
    hi = _first_true(sorted_pos, centres, above)
    return lo, torch.maximum(hi, lo)


def _first_true(sorted_pos: torch.Tensor, centres: torch.Tensor, pred) -> torch.Tensor:
    """Smallest index j in [0, B] with pred(sorted_pos[j], centre) true (B if none); pred monotone in j."""
    B = sorted_pos.shape[1]
    lo = torch.zeros_like(centres, dtype=torch.long)
    hi = torch.full_like(lo, B)
    for _ in range(max(1, B).bit_length()):
        mid = (lo + hi) // 2
        val = torch.gather(sorted_pos, 1, mid.clamp(max=B - 1))
        ok = pred(val, centres) & (mid < B)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok | (mid >= B), lo, mid + 1)
    return hi


def _run_sums(x: torch.Tensor, order: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Σ of x's rows over sorted runs: x (G, B, F) sorted by `order`; runs (G, A) -> (G, A, F) float64."""
    G, B, F = x.shape
    xs = torch.gather(x.double(), 1, order[..., None].expand(G, B, F))
    prefix = torch.cat([xs.new_zeros(G, 1, F), xs.cumsum(1)], 1)
    A = lo.shape[1]
    return (torch.gather(prefix, 1, hi[..., None].expand(G, A, F))
            - torch.gather(prefix, 1, lo[..., None].expand(G, A, F)))


def dense_label_ids(q_labels: torch.Tensor, k_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group dense int32 ids of the labels: equal labels of one group get equal ids, in [0, N + M).

    q_labels (G, N), k_labels (G, M) integer -> (q_ids (G, N), k_ids (G, M)) int32, contiguous. A sort and a
    cumulative sum: no host-device synchronisation (unlike `torch.unique`), and int64 labels of any value
    become int32 ids that compare exactly as the labels do.
    """
    N = q_labels.shape[1]
    both = torch.cat([q_labels, k_labels], 1)
    if both.shape[1] == 0:
        return q_labels.to(torch.int32), k_labels.to(torch.int32)
    sv, order = torch.sort(both, dim=1, stable=True)
    new = torch.ones_like(sv, dtype=torch.int32)
    new[:, 1:] = (sv[:, 1:] != sv[:, :-1]).to(torch.int32)
    ids = torch.empty_like(new).scatter_(1, order, torch.cumsum(new, 1, dtype=torch.int32) - 1)
    return ids[:, :N].contiguous(), ids[:, N:].contiguous()


def positive_counts(rule: str, q_meta: torch.Tensor, k_meta, M: int, *, threshold: float = 0.0,
                    exclude_self: bool = False, q_valid=None, k_valid=None) -> torch.Tensor:
    """|P(i)| (G, N) int32 in O((N + M) log M), with no host-device synchronisation; 0 where q_valid is False.

    rule 'index': q_meta = pos_index (G, N) in [0, M); 'label': q_meta / k_meta label ids (G, N) / (G, M)
    (any integer dtype); 'radius': float32 positions (G, N) / (G, M) and `threshold`. k_valid / q_valid:
    (G, M) / (G, N) bool or uint8, or None. The same set as the kernels' per-tile masks (KERNELS.md §1):
    P(i) = rule ∩ k_valid ∩ (j ≠ i if exclude_self). Raises ValueError for an unknown rule.
    """
    G, N = q_meta.shape
    dev = q_meta.device
    kv = None if k_valid is None else k_valid.to(torch.int32)
    if M == 0 or N == 0:
        cnt = torch.zeros(G, N, dtype=torch.int32, device=dev)
    elif rule == "index":
        idx = q_meta.long()
        inside = (idx >= 0) & (idx < M)
        ok = inside
        if kv is not None:
            ok = ok & (torch.gather(kv, 1, idx.clamp(0, M - 1)) != 0)
        if exclude_self:
            ok = ok & (idx != torch.arange(N, device=dev)[None, :])
        cnt = ok.to(torch.int32)
    elif rule in ("label", "radius"):
        if rule == "label":
            q_ids, k_ids = dense_label_ids(q_meta, k_meta)
            w = torch.ones(G, M, dtype=torch.int32, device=dev) if kv is None else kv
            hist = torch.zeros(G, N + M, dtype=torch.int32, device=dev).scatter_add_(1, k_ids.long(), w)
            cnt = torch.gather(hist, 1, q_ids.long())
            same = lambda d: q_ids[:, :d] == k_ids[:, :d]   # noqa: E731
        else:
            order = torch.argsort(k_meta, dim=1, stable=True)
            lo, hi = _radius_runs(q_meta, torch.gather(k_meta, 1, order), threshold)
            w = torch.ones(G, M, dtype=torch.int32, device=dev) if kv is None else torch.gather(kv, 1, order)
            prefix = torch.cat([torch.zeros(G, 1, dtype=torch.int32, device=dev), torch.cumsum(w, 1, dtype=torch.int32)], 1)
            cnt = torch.gather(prefix, 1, hi) - torch.gather(prefix, 1, lo)
            same = lambda d: (q_meta[:, :d] - k_meta[:, :d]).abs() < threshold   # noqa: E731 (fp32 compare)
        if exclude_self:
            d = min(N, M)
            diag = same(d) if kv is None else same(d) & (kv[:, :d] != 0)
            cnt = torch.cat([cnt[:, :d] - diag.to(torch.int32), cnt[:, d:]], 1)
    else:
        raise ValueError(f"unknown positive rule {rule!r}")
    if q_valid is not None:
        cnt = torch.where(q_valid.bool(), cnt, 0)
    return cnt.to(torch.int32).contiguous()
