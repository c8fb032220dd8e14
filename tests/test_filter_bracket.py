"""The Gradient Filter's threshold in the "rows" tiling (`macl_kernels.filter.bracket`): the exact k-th largest
per row against a sort, on its normal path and on the paths where the sample bracket misses (forced by tiny
samples, zero margins, no refinement probes, and by adversarial rows); the kept exp-sum; and the filtered
loss where every kept logit lies far below the bound (the forward's exact log-sum-exp and the backward's
shifted, unfolded path) against the dense transcription."""
import math

import pytest
import torch

import macl_kernels.filter.bracket as fb
from macl_kernels.filter.filtered import filtered_info_nce

pytestmark = pytest.mark.exactness   # .ci/run runs these under each MKL_CBWR code path too (issue 22)


def negatives_tile(R, M, dtype, gen, ties=False, holes=0.1):
    """(R, M) logits ≤ ~0 with a fraction `holes` of −inf (non-candidates), some rows with no or one
    candidate; ties: values from a small integer grid (many exact ties)."""
    if ties:
        z = torch.randint(-6, 1, (R, M), generator=gen).to(dtype) * 0.5
    else:
        z = torch.randn(R, M, generator=gen, dtype=dtype) * 3 - 5
    z[torch.rand(R, M, generator=gen) < holes] = -math.inf
    z[0] = -math.inf                      # no candidates
    z[1, 1:] = -math.inf                  # one candidate
    return z.contiguous()


def reference(z, k):
    """k-th largest finite entry per row (+inf where k = 0) and Σ exp over the entries ≥ it, by a full sort."""
    srt = z.double().sort(1, descending=True).values
    t = srt.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0].to(z.dtype)
    t = torch.where(k > 0, t, torch.full_like(t, math.inf))
    e = torch.where(z >= t[:, None], z.double().exp(), torch.zeros((), dtype=torch.float64)).sum(1)
    return t, e


def select(z, k):
    n = torch.isfinite(z).sum(1)
    return fb.bracket_select(z, k, n, fb.Chunks(z, lambda name, shape, dt: torch.empty(shape, dtype=dt)))


def ks_for(z, gen, rho=None):
    n = torch.isfinite(z).sum(1)
    if rho is not None:
        return torch.ceil(n.double() * rho - 1e-9).long()
    return (torch.rand(n.shape, generator=gen, dtype=torch.float64) * (n + 1)).long().clamp(max=n)  # 0..n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("rho", [None, 0.05, 0.5, 1.0])
def test_bracket_select_equals_a_sort(dtype, ties, rho):
    gen = torch.Generator().manual_seed(int(ties) * 10 + (0 if rho is None else int(rho * 100)))
    z = negatives_tile(70, 512, dtype, gen, ties)                    # M % 8 == 0: the word-wise member gather
    k = ks_for(z, gen, rho)
    sel = select(z, k)
    t, e = reference(z, k)
    assert torch.equal(sel.t, t)
    assert torch.allclose(sel.kept_exp.double(), e, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    if ties and rho == 0.5:
        assert int((z >= t[:, None]).sum()) > int(k.sum())         # ties at the threshold did occur


@pytest.mark.parametrize("forced", [
    dict(SAMPLE_COLUMNS=1),                                          # a one-column "sample": trivial brackets
    dict(SAMPLE_COLUMNS=4, BRACKET_SIGMAS=0.0, REFINE_SIGMAS=0.0),   # no margins: the probes miss often
    dict(MAX_PROBES=0),                                              # no refinement: wide brackets, many members
    dict(MAX_PROBES=0, BRACKET_SIGMAS=0.0, CHUNK_ELEMENTS=1),        # … and one row per chunk
])
@pytest.mark.parametrize("ties", [False, True])
def test_bracket_select_exact_when_the_sample_bracket_misses(forced, ties, monkeypatch):
    for name, value in forced.items():
        monkeypatch.setattr(fb, name, value)
    gen = torch.Generator().manual_seed(3 + int(ties))
    z = negatives_tile(40, 203, torch.float32, gen, ties)            # M % 8 != 0: the plain member gather
    k = ks_for(z, gen)
    sel = select(z, k)
    t, e = reference(z, k)
    assert torch.equal(sel.t, t)
    assert torch.allclose(sel.kept_exp.double(), e, rtol=1e-5)


def test_adversarial_rows_whose_sample_holds_only_the_largest_values(monkeypatch):
    """The sampled columns carry each row's smallest logits, so the sample puts the k-th largest far too low:
    the first probe lands on the wrong side for every row (widened), the threshold stays exact."""
    monkeypatch.setattr(fb, "SAMPLE_COLUMNS", 16)
    gen = torch.Generator().manual_seed(0)
    R, M = 24, 256
    z = torch.randn(R, M, generator=gen) - 5
    cols = fb.sample_columns(M, z.device)
    z[:, cols] = -torch.rand(R, cols.numel(), generator=gen) - 20     # the sample: far below every other entry
    k = torch.full((R,), M // 2)
    sel = select(z.contiguous(), k)
    t, e = reference(z, k)
    assert sel.widened == R
    assert torch.equal(sel.t, t) and torch.allclose(sel.kept_exp.double(), e, rtol=1e-5)


def test_sample_columns_are_fixed_and_do_not_touch_the_global_generator():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = fb.sample_columns(1000, "cpu").clone()
    fb._COLUMNS.clear()
    b = fb.sample_columns(1000, "cpu")
    assert torch.equal(a, b) and torch.equal(before, torch.random.get_rng_state())
    assert a.numel() == min(1000, fb.SAMPLE_COLUMNS) and bool((a[1:] > a[:-1]).all())


def test_far_bound_uses_the_exact_lse_and_the_shifted_backward():
    """One key with a huge norm makes the Cauchy–Schwarz bound b_i ≈ 1000 while every logit is O(1): every
    kept exp(z − b) underflows in float64's folded form, so the forward recomputes LSE with a running max
    and the backward takes the shifted path. Values and gradients against the dense transcription."""
    gen = torch.Generator().manual_seed(4)
    N, M, D, rho = 30, 50, 6, 0.4
    q = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=torch.float64), dim=1)
    k = torch.randn(M, D, generator=gen, dtype=torch.float64) * 0.3
    k[0] = 0.0
    k[0, 0] = 1000.0
    q[:, 0] = -q[:, 0].abs()                                          # ⟨q_i, k_0⟩ ≤ 0: key 0 is never large
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    lq, lk = torch.randint(0, 4, (N,), generator=gen), torch.randint(0, 4, (M,), generator=gen)
    res = filtered_info_nce(q, k, rho=rho, temperature=1.0, q_labels=lq, k_labels=lk, tiling="rows")
    z = q @ k.T
    assert float((z.detach() - 1000 * q.detach().norm(dim=1, keepdim=True)).max()) < -700   # exp(z − b) = 0
    pos = lq[:, None] == lk[None]
    neg = ~pos
    n = neg.sum(1)
    kk = torch.ceil(n.double() * rho - 1e-9).long()
    zs = z.detach().masked_fill(~neg, -math.inf).sort(1, descending=True).values
    t = zs.gather(1, (kk - 1).clamp(min=0)[:, None])
    keep = pos | (neg & (z.detach() >= t))
    lse = torch.logsumexp(z.masked_fill(~keep, -math.inf), 1)
    cnt = pos.sum(1)
    per = torch.where(cnt > 0, lse - (z * pos).sum(1) / cnt.clamp(min=1), torch.zeros_like(lse))
    ref = per.sum() / (cnt > 0).sum()
    assert torch.allclose(res.loss, ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(res.loss, (q, k)), torch.autograd.grad(ref, (q, k))):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_bracket_and_histogram_selections_agree_on_float32(monkeypatch):
    """The two exact selections of the "rows" tiling (sample bracket + counting passes, and the histogram
    + member pass) give bit-identical thresholds, kept counts and losses on the same float32 logits (both
    on the shifted tiles z − b: the histogram needs them)."""
    import macl_kernels.filter.filtered as flt
    monkeypatch.setattr(flt, "UNSHIFTED", False)
    gen = torch.Generator().manual_seed(8)
    x = torch.nn.functional.normalize(torch.randn(600, 24, generator=gen), dim=1)
    lab = torch.randint(0, 30, (600,), generator=gen)
    out = {}
    for how in ("bracket", "histogram"):
        monkeypatch.setattr(flt, "ROWS_SELECT", how)
        out[how] = filtered_info_nce(x, rho=0.3, q_labels=lab, exclude_self=True, temperature=0.1, tiling="rows")
    a, b = out["bracket"], out["histogram"]
    assert torch.equal(a.threshold, b.threshold) and torch.equal(a.kept, b.kept)
    assert torch.allclose(a.per_anchor, b.per_anchor, rtol=1e-5, atol=1e-6)
