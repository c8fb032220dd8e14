"""GCL-style pre-training: the Gradient Mitigator (PCGrad), the Gradient Filter (against a dense top-ρ
transcription), the pixel positives, training, and the end-to-end run with meta-labels, checkpoint and resume."""
import functools
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from macl.settings.config import MethodConfig, NetConfig, OptimConfig, PretrainConfig, TrainConfig
from macl.data import PhantomConfig, PretrainDataConfig, batches_from_step, load_volumes, open_dataset, write_phantom_dataset
from macl.data.metalabels import MetaLabelDataset, read_attributes_csv
from macl.methods import Batch, build_method, mitigate, pcgrad
from macl.methods.gcl import pixel_labels, pixel_loss
from macl.train import export_weights, load_checkpoint, pretrain
from macl_kernels import grouped_info_nce
from macl_kernels.filter.filtered import filtered_info_nce
import macl_kernels.filter.filtered as flt


# ------------------------------------------------------------------------------------------ mitigator
def test_pcgrad_matches_hand_computation_on_two_conflicting_vectors():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])       # ⟨g1, g2⟩ = −1 < 0
    # g1' = g1 − (−1/2)·g2 = (0.5, 0.5);  g2' = g2 − (−1/1)·g1 = (0, 1);  sum = (0.5, 1.5)
    out = pcgrad([g1, g2])
    assert torch.allclose(out, torch.tensor([0.5, 1.5]))
    assert float(out @ g1) >= 0 and float(out @ g2) >= 0
    assert float((g1 + g2) @ g1) == 0.0                                  # the plain sum would not help g1 at all


def test_pcgrad_non_negative_with_each_when_two_conflict_and_sum_otherwise():
    gen = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(200):
        a, b = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64)
        out = pcgrad([a, b])
        if float((a * b).sum()) < 0:
            conflicts += 1
            assert float((out * a).sum()) >= -1e-12 and float((out * b).sum()) >= -1e-12
            assert not torch.allclose(out, a + b)
        else:
            assert torch.allclose(out, a + b)
    assert 50 < conflicts < 150


def test_mitigate_combines_the_per_copy_gradients_by_pcgrad():
    x = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    b = b - 2 * (a * b).sum() / (a * a).sum() * a if float((a * b).sum()) > 0 else b   # make them conflict
    assert float((a * b).sum()) < 0
    c1, c2 = mitigate(x, 2)
    ((c1 * a).sum() + (c2 * b).sum()).backward()
    assert torch.allclose(x.grad, pcgrad([a, b]), atol=1e-6)
    x.grad = None
    c1, c2 = mitigate(x, 2, enabled=False)
    ((c1 * a).sum() + (c2 * b).sum()).backward()
    assert torch.allclose(x.grad, a + b)


# ------------------------------------------------------------------------------------------ filter
def dense_filtered(q, k, rho, tau, pos, allowed, q_valid=None):
    """Naive transcription: materialise z, rank each anchor's negatives by |P − Y| = P (top ⌈ρ·n⌉),
    keep them and every positive, InfoNCE over the kept pairs. q (G, N, D), k (G, M, D); masks (G, N, M)."""
    z = torch.einsum("gnd,gmd->gnm", q, k) / tau
    prob = torch.softmax(z.masked_fill(~allowed, -math.inf), -1)
    neg = allowed & ~pos
    keep = pos.clone()
    G, N, _ = z.shape
    for g in range(G):
        for i in range(N):
            n = int(neg[g, i].sum())
            kk = math.ceil(rho * n - 1e-9)
            if kk:
                grad_mag = (prob[g, i] - 0).masked_fill(~neg[g, i], -1.0)   # |P − Y| on negatives
                keep[g, i, torch.topk(grad_mag, kk).indices] = True
    lse = torch.logsumexp(z.masked_fill(~keep, -math.inf), -1)
    cnt = pos.sum(-1)
    counted = cnt > 0 if q_valid is None else (cnt > 0) & q_valid
    per = torch.where(counted, lse.masked_fill(~counted, 0) - (z * pos).sum(-1) / cnt.clamp(min=1), torch.zeros_like(lse))
    return per.sum() / counted.sum().clamp(min=1), (keep & neg).sum(-1)


CASES = ["labels", "radius_self", "index_valid"]


def _problem(case, gen):
    G, N, M, D = 2, 23, 31, 6
    if case == "radius_self":
        x = torch.randn(G, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
        posn = torch.rand(G, N, generator=gen, dtype=torch.float64)
        kv = torch.rand(G, N, generator=gen) > 0.2
        kw = dict(q_positions=posn, threshold=0.2, exclude_self=True, k_valid=kv)
        pos = ((posn[:, :, None] - posn[:, None, :]).abs().float() < 0.2)
        allowed = kv[:, None, :] & ~torch.eye(N, dtype=torch.bool)[None]
        return (x, None), kw, pos & allowed, allowed, None, (x,)
    q = torch.randn(G, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(G, M, D, generator=gen, dtype=torch.float64, requires_grad=True)
    allowed = torch.ones(G, N, M, dtype=torch.bool)
    if case == "labels":
        lq, lk = torch.randint(0, 4, (G, N), generator=gen), torch.randint(0, 4, (G, M), generator=gen)
        kw = dict(q_labels=lq, k_labels=lk)
        pos = lq[:, :, None] == lk[:, None, :]
        return (q, k), kw, pos, allowed, None, (q, k)
    idx = torch.randint(0, M, (G, N), generator=gen)
    qv = torch.rand(G, N, generator=gen) > 0.3
    kw = dict(pos_index=idx, q_valid=qv)
    pos = idx[:, :, None] == torch.arange(M)[None, None, :]
    return (q, k), kw, pos, allowed, qv, (q, k)


@pytest.mark.exactness
@pytest.mark.parametrize("tiling", ["rows", "radix"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rho", [0.15, 0.5])
def test_filter_equals_dense_top_rho_values_gradients_and_counts(case, tiling, rho):
    gen = torch.Generator().manual_seed(hash((case, tiling, rho)) % 1000)
    (q, k), kw, pos, allowed, qv, leaves = _problem(case, gen)
    res = filtered_info_nce(q, k, rho=rho, temperature=0.3, tiling=tiling, **kw)
    ours = torch.autograd.grad(res.loss, leaves)
    kk = k if k is not None else q
    ref, kept_ref = dense_filtered(q, kk, rho, 0.3, pos, allowed, qv)
    theirs = torch.autograd.grad(ref, leaves)
    assert torch.allclose(res.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    expect = kept_ref if qv is None else kept_ref * qv
    assert torch.equal(res.kept.long(), expect)
    n_neg = (allowed & ~pos).sum(-1)
    exact_k = torch.ceil(n_neg.double() * rho - 1e-9).long()
    assert torch.equal(res.kept.long(), exact_k if qv is None else exact_k * qv)   # exactly ⌈ρ·negatives⌉


@pytest.mark.exactness
def test_filter_float32_and_rho_one_is_the_core():
    gen = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(300, 16, generator=gen), dim=1).requires_grad_()
    lab = torch.randint(0, 20, (300,), generator=gen)
    full = grouped_info_nce(x, q_labels=lab, exclude_self=True, temperature=0.1, impl="torch").loss
    g_full, = torch.autograd.grad(full, x)
    for tiling in ("rows", "radix"):
        one = filtered_info_nce(x, rho=1.0, q_labels=lab, exclude_self=True, temperature=0.1, tiling=tiling).loss
        g_one, = torch.autograd.grad(one, x)
        assert torch.allclose(one, full, rtol=1e-5) and torch.allclose(g_one, g_full, atol=1e-6)
    b = filtered_info_nce(x, rho=0.2, q_labels=lab, exclude_self=True, tiling="radix")
    a = filtered_info_nce(x, rho=0.2, q_labels=lab, exclude_self=True, tiling="rows")   # unshifted tiles z
    assert torch.equal(a.kept, b.kept) and torch.allclose(a.threshold, b.threshold, rtol=1e-6, atol=1e-6)
    flt.UNSHIFTED = False   # both tilings on the same shifted logits z − b: bit-identical thresholds
    try:
        a = filtered_info_nce(x, rho=0.2, q_labels=lab, exclude_self=True, tiling="rows")
    finally:
        flt.UNSHIFTED = True
    assert torch.equal(a.kept, b.kept) and torch.equal(a.threshold, b.threshold)
    assert float(a.loss.detach()) < float(full.detach())   # fewer negatives in every denominator
    with pytest.raises(ValueError, match="1.5"):
        filtered_info_nce(x, rho=1.5, q_labels=lab)


def brute_kept(z, pos, allowed, rho):
    """float64 brute force of the kept set: positives ∪ {negatives with z ≥ the ⌈ρ·n⌉-th largest negative}
    (ties at the threshold all kept). z, pos, allowed (G, N, M). Returns (kept (G, N, M) bool, k (G, N))."""
    neg = allowed & ~pos
    n = neg.sum(-1)
    k = torch.ceil(n.double() * rho - 1e-9).long()
    zs = z.double().masked_fill(~neg, -math.inf).sort(-1, descending=True).values
    t = zs.gather(-1, (k - 1).clamp(min=0)[..., None]).masked_fill((k == 0)[..., None], math.inf)
    return pos | (neg & (z.double() >= t)), k


def old_topk_kept(z, pos, allowed, rho):
    """The pre-issue-16 threshold (`negative_thresholds`, "rows" tiling): torch.topk of max_i k_i per row,
    the k_i-th value as threshold. Kept here only as a reference for the new selection."""
    neg = allowed & ~pos
    k_i = torch.minimum(torch.ceil(neg.sum(-1).double() * rho - 1e-9).long().clamp_(min=0), neg.sum(-1))
    top = torch.topk(z.masked_fill(~neg, -math.inf), int(k_i.max()), dim=-1, sorted=True).values
    t = torch.where(k_i > 0, top.gather(-1, (k_i - 1).clamp(min=0)[..., None])[..., 0], torch.full_like(top[..., 0], math.inf))
    return pos | (neg & (z >= t[..., None]))


def our_kept(q, k, rho, s, tiling, **kw):
    """The pairs the filter keeps, assembled from the same tiles and thresholds its passes use."""
    import macl_kernels.filter.filtered as flt
    from macl_kernels.api import _build_problem
    p, _ = _build_problem(q, k, 1.0 / s, kw.get("pos_index"), kw.get("q_labels"), kw.get("k_labels"), None, None,
                          None, kw.get("exclude_self", False), None, kw.get("k_valid"))
    qs, kf = p.q.double() * s, p.k.double()
    bound = flt._bound(p, qs, kf)
    shifted = not flt._unshifted(bound, kf, tiling)   # as the filter decides: plain z tiles where safe
    if not shifted:
        bound = torch.zeros_like(bound)
    t, k_i, *_ = flt._forward_stats(p, qs, kf, bound, rho, tiling, shifted=shifted)
    G, N, M = qs.shape[0], qs.shape[1], kf.shape[1]
    kept = torch.zeros(G, N, M, dtype=torch.bool)
    for g0, g1, r0, r1, c0, c1 in flt.filter_tiles(G, N, M, tiling):
        zp = flt._shifted_logits(qs, kf, bound if shifted else None, g0, g1, r0, r1, c0, c1)
        kept[g0:g1, r0:r1, c0:c1] = flt._kept(p, zp, t, g0, g1, r0, r1, c0, c1)
    return kept, k_i


@pytest.mark.exactness
@pytest.mark.parametrize("tiling", ["rows", "rows_forced_misses", "chunks"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_filter_keeps_exactly_the_pairs_of_a_float64_brute_force(rho, ties, tiling, monkeypatch):
    """Several ρ; ties: integer features make many logits exactly equal (every tie at the threshold kept).
    "rows": the sample bracket + counting passes (filter_bracket); "rows_forced_misses": the same with a
    2-column sample, no margins and one refinement probe (brackets miss, wide member sets); "chunks": the
    histogram path."""
    import macl_kernels.filter.bracket as fb
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(tt, "KEY_BLOCK", 48)                 # "chunks": several key chunks per anchor block
    monkeypatch.setattr(tt, "ROW_BLOCK", 40)
    if tiling == "rows_forced_misses":
        for name, value in dict(SAMPLE_COLUMNS=2, BRACKET_SIGMAS=0.0, REFINE_SIGMAS=0.0, MAX_PROBES=1).items():
            monkeypatch.setattr(fb, name, value)
        tiling = "rows"
    gen = torch.Generator().manual_seed(int(rho * 100) + 7 * ties)
    N, M, D, s = 90, 130, 5, 2.0
    if ties:
        q = torch.randint(-1, 2, (N, D), generator=gen).double()
        k = torch.randint(-1, 2, (M, D), generator=gen).double()
    else:
        q, k = torch.randn(N, D, generator=gen, dtype=torch.float64), torch.randn(M, D, generator=gen, dtype=torch.float64)
    lq, lk = torch.randint(0, 6, (N,), generator=gen), torch.randint(0, 6, (M,), generator=gen)
    kv = torch.rand(M, generator=gen) > 0.1
    kept, k_i = our_kept(q, k, rho, s, tiling, q_labels=lq, k_labels=lk, k_valid=kv)
    pos = ((lq[:, None] == lk[None]) & kv[None])[None]
    allowed = kv[None, None].expand(1, N, M)
    ref, k_ref = brute_kept((q @ k.T)[None] * s, pos, allowed, rho)
    assert torch.equal(kept, ref) and torch.equal(k_i, k_ref)
    if not ties:
        assert torch.equal(kept, old_topk_kept((q @ k.T)[None] * s, pos, allowed, rho))
    elif rho < 1:
        assert int((kept & ~pos).sum()) > int(k_ref.sum())   # ties at the threshold did occur and were kept
    # the loss over the brute-force kept set (values and gradients)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    res = filtered_info_nce(qg, kg, rho=rho, temperature=1 / s, q_labels=lq, k_labels=lk, k_valid=kv, tiling=tiling)
    z = (qg @ kg.T) * s
    lse = torch.logsumexp(z.masked_fill(~ref[0], -math.inf), -1)
    cnt = pos[0].sum(-1)
    per = torch.where(cnt > 0, lse - (z * pos[0]).sum(-1) / cnt.clamp(min=1), torch.zeros_like(lse))
    ref_loss = per.sum() / (cnt > 0).sum()
    assert torch.allclose(res.loss, ref_loss, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(res.loss, (qg, kg)), torch.autograd.grad(ref_loss, (qg, kg))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def accumulating_gemm(real_bmm):
    """torch.bmm / torch.baddbmm stand-ins that sum each output element term by term, starting from the bias
    (C) when there is one, in an order that depends on the output column: the rounding of a BLAS kernel that
    starts its accumulators from C and splits the inner dimension its own way (issue 22 item 7: MKL's AVX2 /
    AVX-512 kernels on AMD hosts broke exactly tied logits that way). Exact products (integer features) summed
    in any order give the same result; a bias summed in first does not."""

    def gemm(bias, a, b, out=None):
        G, R, D = a.shape
        C = b.shape[-1]
        terms = a[..., :, None] * b[:, None]                              # (G, R, D, C), exact for integers
        acc = a.new_zeros(G, R, C) if bias is None else bias.expand(G, R, C).clone()
        cols = torch.arange(C, device=a.device)
        for step in range(D):
            d = ((cols * 7 + step) % D).expand(G, R, 1, C)
            acc = acc + terms.gather(2, d)[:, :, 0]
        return acc if out is None else out.copy_(acc)

    def bmm(a, b, *, out=None):
        if a.dtype != torch.float64:
            return real_bmm(a, b, out=out)
        return gemm(None, a, b, out)

    def baddbmm(bias, a, b, *, beta=1, alpha=1, out=None):
        assert beta == 1 and alpha == 1
        return gemm(bias, a, b, out)

    return bmm, baddbmm


@pytest.mark.exactness
@pytest.mark.parametrize("tiling", ["rows", "rows_shifted", "chunks"])
@pytest.mark.parametrize("rho", [0.05, 0.3, 0.5, 0.77])
def test_filter_ties_stay_ties_whatever_order_the_gemm_sums_in(rho, tiling, monkeypatch):
    """Issue 22 item 7 without an AMD host: with a GEMM that accumulates from the bias in a column-dependent
    order (`accumulating_gemm`), the kept set of tied integer logits is still exactly the brute force's: the
    shift is applied after the GEMM (z' = fl(z − b) is a function of z, so ties stay ties)."""
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(tt, "KEY_BLOCK", 48)
    monkeypatch.setattr(tt, "ROW_BLOCK", 40)
    if tiling == "rows_shifted":                              # the sample bracket on z' tiles, not plain z
        monkeypatch.setattr(flt, "UNSHIFTED", False)
        tiling = "rows"
    gen = torch.Generator().manual_seed(11)
    N, M, D, s = 90, 130, 5, 2.0
    q = torch.randint(-1, 2, (N, D), generator=gen).double()
    k = torch.randint(-1, 2, (M, D), generator=gen).double()
    lq, lk = torch.randint(0, 6, (N,), generator=gen), torch.randint(0, 6, (M,), generator=gen)
    bmm, baddbmm = accumulating_gemm(torch.bmm)
    a = torch.randn(1, 3, 5, dtype=torch.float64)
    b = torch.randn(1, 5, 4, dtype=torch.float64)
    bias = torch.randn(1, 3, 1, dtype=torch.float64)
    assert torch.allclose(baddbmm(bias, a, b), torch.baddbmm(bias, a, b), rtol=1e-14)   # a GEMM, other rounding
    monkeypatch.setattr(torch, "bmm", bmm)
    monkeypatch.setattr(torch, "baddbmm", baddbmm)
    kept, k_i = our_kept(q, k, rho, s, tiling, q_labels=lq, k_labels=lk)
    pos = (lq[:, None] == lk[None])[None]
    ref, k_ref = brute_kept((q @ k.T)[None] * s, pos, torch.ones(1, N, M, dtype=torch.bool), rho)
    assert torch.equal(k_i, k_ref)
    assert torch.equal(kept, ref), int((kept != ref).sum())
    assert int((kept & ~pos).sum()) > int(k_ref.sum())       # ties at the threshold did occur and were kept


@pytest.mark.exactness
def test_filter_clamped_slot_path_keeps_the_same_pairs(monkeypatch):
    """Slots are clamped into the guard bins when rounding could exceed a bin (huge D, non-finite bounds):
    forcing that path changes nothing."""
    import macl_kernels.filter.select as fsel
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(60, 7, generator=gen, dtype=torch.float64), torch.randn(90, 7, generator=gen, dtype=torch.float64)
    lq, lk = torch.randint(0, 5, (60,), generator=gen), torch.randint(0, 5, (90,), generator=gen)
    plain, _ = our_kept(q, k, 0.4, 3.0, "rows", q_labels=lq, k_labels=lk)
    monkeypatch.setattr(fsel, "SLOT_ERROR_LIMIT", -1.0)
    clamped, _ = our_kept(q, k, 0.4, 3.0, "rows", q_labels=lq, k_labels=lk)
    ref, _ = brute_kept((q @ k.T)[None] * 3.0, (lq[:, None] == lk[None])[None], torch.ones(1, 60, 90, dtype=torch.bool), 0.4)
    assert torch.equal(plain, ref) and torch.equal(clamped, ref)


@pytest.mark.exactness
def test_filter_float32_big_enough_for_the_histogram_path_matches_float64_selection():
    """N = M = 700 float32 rows (bins hold several logits each): same kept pairs as a float64 brute force on
    the float32 logits the filter computes."""
    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(700, 24, generator=gen), dim=1)
    lab = torch.randint(0, 40, (700,), generator=gen)
    kept, k_i = our_kept(x.double(), None, 0.5, 10.0, "rows", q_labels=lab, exclude_self=True)
    eye = torch.eye(700, dtype=torch.bool)
    pos = ((lab[:, None] == lab[None]) & ~eye)[None]
    ref, k_ref = brute_kept((x.double() @ x.double().T)[None] * 10.0, pos, ~eye[None], 0.5)
    assert torch.equal(kept, ref) and torch.equal(k_i, k_ref)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("tiling", ["rows", "radix"])
def test_filter_never_allocates_n_by_m(tiling, monkeypatch):
    import macl_kernels.filter.select as fsel
    import macl_kernels.filter.filtered as flt
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(flt, "TILE_BUDGET", 4096)          # rows tiling: 8 anchors × 512 keys per tile
    monkeypatch.setattr(tt, "ROW_BLOCK", 32)               # radix tiling: 32 anchors × 64 keys per tile
    monkeypatch.setattr(tt, "KEY_BLOCK", 64)
    monkeypatch.setattr(fsel, "NUM_BINS", 128)             # at most 128 bins per anchor
    N, M, D = 256, 512, 8
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(N, D, generator=gen), dim=1).requires_grad_()
    k = F.normalize(torch.randn(M, D, generator=gen), dim=1).requires_grad_()
    lq, lk = torch.randint(0, 30, (N,), generator=gen), torch.randint(0, 30, (M,), generator=gen)
    with LargestTensor() as mode:
        loss = filtered_info_nce(q, k, rho=0.3, q_labels=lq, k_labels=lk, tiling=tiling).loss
        loss.backward()
    # the largest tensors: a tile (4096 or 2048), a block's 32×69 histogram, q / k / dq / dk (4096), and the list
    # of positive pairs (Σ|P(i)| ≈ N·M/30, kept only while ≤ N·M/8)
    n_pairs = int((lq[:, None] == lk[None]).sum())
    assert mode.largest <= max(4096, n_pairs) < N * M // 8, (mode.largest, n_pairs)
    ref, _ = dense_filtered(q[None].double(), k[None].double(), 0.3, 0.1, (lq[:, None] == lk[None])[None],
                            torch.ones(1, N, M, dtype=torch.bool))
    assert torch.allclose(loss.double(), ref, rtol=1e-5)


# ------------------------------------------------------------------------------------------ pixel loss
def naive_pixel_supcon(maps, groups, tau):
    """SupCon over all pixels of [view 1 | view 2]; positives = same location and same group, self excluded."""
    n2, C = maps.shape[:2]
    B = groups.shape[0]
    L = maps[0, 0].numel()
    f = F.normalize(maps.reshape(n2, C, L).permute(0, 2, 1).reshape(-1, C), dim=1)
    img = torch.arange(n2).repeat_interleave(L) % B
    loc = torch.arange(L).repeat(n2)
    pos = (loc[:, None] == loc[None]) & (groups[img][:, None] == groups[img][None])
    eye = torch.eye(len(f), dtype=torch.bool)
    pos &= ~eye
    z = f @ f.T / tau
    lse = torch.logsumexp(z.masked_fill(eye, -math.inf), 1)
    return (lse - (z * pos).sum(1) / pos.sum(1)).mean()


def test_pixel_positives_are_same_location_and_same_meta_label():
    groups = torch.tensor([5, 2, 5])
    lab = pixel_labels(groups, 4)
    assert lab.shape == (2 * 3 * 4,)
    lab = lab.reshape(2, 3, 4)
    assert torch.equal(lab[0], lab[1])                                   # the other view shares labels
    assert torch.equal(lab[0, 0], lab[0, 2]) and not bool((lab[0, 0] == lab[0, 1]).any())
    assert len(set(lab[0, 0].tolist())) == 4                              # different locations never match
    maps = torch.randn(6, 5, 2, 2, dtype=torch.float64, requires_grad=True)
    cfg = MethodConfig(name="gcl", gcl_rho=1.0, temperature=0.2, rescale_by_base_temperature=False)
    ours = pixel_loss(maps, groups, cfg)
    ref = naive_pixel_supcon(maps, groups, 0.2)
    g1, = torch.autograd.grad(ours, maps)
    g2, = torch.autograd.grad(ref, maps)
    assert torch.allclose(ours, ref) and torch.allclose(g1, g2)


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("sampler", ["ns", "sg", "sag"])
def test_sampled_anchors_keep_every_positive_of_their_group_and_their_other_view(sampler):
    from macl.methods.gcl_sampling import pixel_rows
    torch.manual_seed(0)
    groups = torch.tensor([3, 1, 3, 0, 1, 1, 7])
    B, L = 7, 12 * 10
    maps = torch.randn(2 * B, 4, 12, 10)
    r = pixel_rows(maps, groups, 20, 50, sampler)
    a, m = r.anchor_loc.shape[1], r.key_loc.shape[1]
    assert r.q.shape == (2 * B * a, 4) and r.k.shape == (2 * B * m, 4) and torch.equal(r.k[: len(r.q)], r.q)
    assert a == 20 and m == 50
    assert torch.equal(r.key_loc[:, :a], r.anchor_loc)
    for b in range(B):                                   # one location set per meta-label bin, distinct keys
        assert len(set(r.key_loc[b].tolist())) == m
        for b2 in range(B):
            assert torch.equal(r.key_loc[b], r.key_loc[b2]) == bool(groups[b] == groups[b2])
    pos = (r.q_labels[:, None] == r.k_labels[None])
    pos[torch.arange(len(r.q)), torch.arange(len(r.q))] = False
    size = (groups[:, None] == groups[None]).sum(1)                 # images in each image's bin
    expect = (2 * size - 1).repeat_interleave(a).repeat(2)           # its other view + 2 per other image of the bin
    assert torch.equal(pos.sum(1), expect) and bool((pos.sum(1) >= 1).all())
    # the rows are the right features: anchor (view v, image b, location s) is the normalised maps[v·B + b, :, s]
    v, b, j = 1, 4, 7
    s_loc = int(r.anchor_loc[b, j])
    ref = F.normalize(maps[v * B + b].reshape(4, L)[:, s_loc], dim=0)
    assert torch.allclose(r.q[(v * B + b) * a + j], ref)
    code = torch.unique(groups).tolist().index(int(groups[b]))
    assert int(r.q_labels[(v * B + b) * a + j]) == code * L + s_loc


@pytest.mark.exactness
def test_sampling_all_and_counts_above_the_grid_give_the_exact_filtered_loss():
    """"all" is the unsampled formula (loss and gradients of the plain filtered call); counts ≥ L sample every
    location (rows permuted), which gives the same loss and gradients."""
    torch.manual_seed(1)
    groups = torch.tensor([0, 1, 0, 2])
    maps = torch.randn(8, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    base = dict(name="gcl", gcl_rho=0.3, temperature=0.2)
    ours = pixel_loss(maps, groups, MethodConfig(**base, gcl_pixel_anchors="all", gcl_pixel_keys="all"))
    rows = F.normalize(maps.reshape(8, 6, 20).transpose(1, 2).reshape(160, 6), dim=1)
    today = filtered_info_nce(rows, rho=0.3, temperature=0.2, q_labels=pixel_labels(groups, 20),
                              exclude_self=True).loss * MethodConfig(**base).contrast_scale
    g1, = torch.autograd.grad(ours, maps)
    g2, = torch.autograd.grad(today, maps)
    assert torch.equal(ours, today) and torch.equal(g1, g2)
    full = pixel_loss(maps, groups, MethodConfig(**base, gcl_pixel_anchors=20, gcl_pixel_keys=500))
    g3, = torch.autograd.grad(full, maps)
    assert torch.allclose(full, today, rtol=1e-12) and torch.allclose(g3, g2, rtol=1e-9, atol=1e-13)
    part = pixel_loss(maps, groups, MethodConfig(**base, gcl_pixel_anchors=5, gcl_pixel_keys=12))
    assert torch.isfinite(part) and not torch.allclose(part, today)
    with pytest.raises(ValueError, match="gcl_pixel_anchors"):
        MethodConfig(**base, gcl_pixel_anchors=30, gcl_pixel_keys=12)
    with pytest.raises(ValueError, match="gcl_pixel_keys"):
        MethodConfig(**base, gcl_pixel_keys=0)


# ------------------------------------------------------------------------------------------ method
NET = NetConfig(dims=2, base_width=4, depth=2)


def gcl_cfg(**kw):
    base = dict(name="gcl", decoder_blocks=1, proj_dim=16, gcl_rho=0.3, meta_labels=("position", "volume"))
    base.update(kw)
    return MethodConfig(**base)


def test_gcl_terms_and_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    m = build_method(NET, gcl_cfg())
    assert type(m).__name__ == "GCL"
    B = 6
    x = torch.randn(B, 1, 16, 16)
    batch = Batch(torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 0.95]), x, x + 0.1 * torch.randn_like(x), x.flip(-1),
                  x + 0.05 * torch.randn_like(x), meta=torch.tensor([[0.0], [0], [1], [1], [2], [2]]))
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        terms = m(batch)
        loss = m.combine(terms)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert set(terms) == {"L_img_position", "L_img_volume", "L_pix_position", "L_pix_volume"}
    assert losses[-1] < losses[0] - 0.5, losses
    with pytest.raises(ValueError, match="MetaLabelDataset"):
        m(Batch(batch.positions, x, x, x, x))


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("gcl_phantom"),
                                 PhantomConfig(n_subjects=3, shape=(16, 16, 8), seed=4))


def test_meta_label_dataset_codes_volumes_and_csv_attributes(phantom_root, tmp_path):
    vols = load_volumes(open_dataset(phantom_root))
    ids = [v.case_id for v in vols]
    csv_path = tmp_path / "attrs.csv"
    csv_path.write_text("case_id,phase\n" + "\n".join(f"{c},{p}" for c, p in zip(ids, ["ES", "ED", "ES"])) + "\n")
    attrs = read_attributes_csv(csv_path)
    ds = MetaLabelDataset(vols, PretrainDataConfig(dims=2, patch_size=(16, 16)), ("position", "volume", "phase"), attrs)
    b = ds.get_batch([0, 8, 16, 17])                 # 8 slices per volume: volumes 0, 1, 2, 2
    assert b["meta"].tolist() == [[0, 1], [1, 0], [2, 1], [2, 1]]   # ED → 0, ES → 1
    csv_path.write_text("case_id,phase\n" + f"{ids[0]},ES\n")
    with pytest.raises(ValueError, match=f"{ids[1]}.*phase"):
        MetaLabelDataset(vols, PretrainDataConfig(dims=2, patch_size=(16, 16)), ("volume", "phase"),
                         read_attributes_csv(csv_path))


def test_gcl_pretrain_end_to_end_checkpoint_and_exact_resume(phantom_root, tmp_path):
    vols = load_volumes(open_dataset(phantom_root))
    ds = MetaLabelDataset(vols, PretrainDataConfig(dims=2, patch_size=(16, 16)), ("position", "volume"))
    cfg = PretrainConfig(net=NET, method=gcl_cfg(), optim=OptimConfig(lr=0.02),
                         train=TrainConfig(steps=4, device="cpu", checkpoint_every=2, amp=False))
    batches = functools.partial(batches_from_step, ds, 4)
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    pretrain(cfg, batches, full)

    class Crash(Exception):
        pass

    def crash(step, total, record):
        if step == 2:
            raise Crash

    with pytest.raises(Crash):
        pretrain(cfg, batches, part, progress=crash)
    pretrain(cfg, batches, part, resume="auto")
    fa = load_checkpoint(os.path.join(full, "checkpoints", "final.pt"))
    fb = load_checkpoint(os.path.join(part, "checkpoints", "final.pt"))
    assert fb["step"] == 4 and all(torch.equal(fa["model"][k], fb["model"][k]) for k in fa["model"])
    log = [json.loads(x) for x in open(os.path.join(part, "log.jsonl"))]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all("L_pix_volume" in r for r in log)
    from macl.nets import UNet, load_pretrained
    weights = export_weights(fa)
    loaded = load_pretrained(UNet(NET, 5), weights["state_dict"])
    assert any(k.startswith("encoder.") for k in loaded) and any(k.startswith("decoder.") for k in loaded)


def test_cli_pretrain_gcl_with_sampled_pixels_end_to_end(phantom_root, tmp_path):
    """`macl pretrain --method gcl` (the issue's command at a small size) with sampled pixel anchors: every
    step runs and logs finite per-label terms."""
    from macl import cli
    run = tmp_path / "gcl_cli"
    assert cli.main(["pretrain", "--data", str(phantom_root), "--out", str(run), "--method", "gcl", "--steps", "3",
                     "--batch-size", "4", "--patch-size", "16", "--base-width", "4", "--depth", "2", "--threads", "1",
                     "--set", "method.gcl_pixel_anchors=16", "--set", "method.gcl_pixel_keys=48",
                     "--no-progress"]) == 0
    log = [json.loads(x) for x in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["L_pix_volume"]) and math.isfinite(r["L_pix_position"]) for r in log)
    resolved = json.loads((run / "resolved_config.json").read_text())
    assert resolved["pretrain"]["method"]["gcl_pixel_anchors"] == 16


def test_step_benchmark_runs_and_splits_each_step_into_its_terms(tmp_path):
    """benchmarks/bench_gcl_step.py at a tiny size (a subprocess: it wraps the methods' loss functions): one row
    per method step, per term and per filter impl; the terms of a step add up to it (no timing claims)."""
    import csv
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.csv"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_gcl_step.py"), "--batch", "4", "--size", "32",
                    "--width", "4", "--depth", "2", "--reps", "1", "--filter-n", "256", "--filter-reps", "1",
                    "--threads", "1", "--pixel-anchors", "8", "--pixel-keys", "16", "--csv", str(out)],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=root))
    rows = list(csv.DictReader(open(out)))
    step = {r["impl"]: float(r["median_s"]) for r in rows if r["what"] == "step"}
    terms = {r["impl"]: float(r["median_s"]) for r in rows if r["what"] == "term"}
    assert set(step) == {"macl", "gcl"}
    assert {r["impl"] for r in rows if r["what"] == "filter"} == {"filtered", "core", "core_general_tiling"}
    assert {"gcl:L_img", "gcl:L_pix", "gcl:rest", "macl:L_g", "macl:L_d", "macl:L_ER", "macl:rest"} == set(terms)
    for m in step:
        parts = [v for k, v in terms.items() if k.startswith(m + ":")]
        assert all(v > 0 for v in parts) and math.isclose(sum(parts), step[m], abs_tol=1e-3)   # CSV rounds to 0.1 ms
