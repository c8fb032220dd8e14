"""The chunked PyTorch implementation (and the reference in low precision) against the float64 reference."""
import pytest
import torch

from core_cases import assert_matches_truth, make_case, run
from macl_kernels import grouped_info_nce

RULES = ["index", "label", "radius"]


@pytest.fixture(params=["dense", "in-tile", "operator"], autouse=True)
def positive_strategy(request, monkeypatch):
    """Run every test with the three ways the torch path runs: the whole logit matrix in one GEMM (small
    problems, eager/dense.py), and tiles with masks inside each tile (few keys per group) or with the
    linear operator Y outside the tiles (many keys)."""
    import macl_kernels.eager.dense as td
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(td, "DENSE_MAX_BYTES", 1 << 40 if request.param == "dense" else -1)
    monkeypatch.setattr(tt, "IN_TILE_MAX_KEYS", 1 << 30 if request.param == "in-tile" else 0)
    return request.param


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("self_contrast", [False, True])
@pytest.mark.parametrize("masks", [False, True])
def test_float64_matches_reference_tightly(rule, self_contrast, masks):
    case = make_case(rule, G=3, N=37, M=53, D=11, self_contrast=self_contrast, masks=masks)
    truth = run("reference", case, torch.float64)
    got = run("torch", case, torch.float64)
    assert_matches_truth(got, truth, None, torch.float64, f"{rule} self={self_contrast} masks={masks}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("tau", [1.0, 0.1, 0.07, 0.01])
def test_float32_non_block_multiple_shapes(rule, tau):
    """N=1000, M=1537, D=123 spans several row and key blocks with ragged edges."""
    case = make_case(rule, G=2, N=1000, M=1537, D=123, masks=(tau == 0.1), seed=3)
    truth = run("reference", case, torch.float64, tau)
    low = run("reference", case, torch.float32, tau)
    got = run("torch", case, torch.float32, tau)
    assert_matches_truth(got, truth, low, torch.float32, f"{rule} tau={tau}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rule", RULES)
def test_half_precision_inputs(dtype, rule):
    case = make_case(rule, G=2, N=130, M=70, D=40, self_contrast=(rule == "label"), seed=5)
    truth = run("reference", case, torch.float64)
    low = run("reference", case, dtype)
    got = run("torch", case, dtype)
    assert got["dq"].dtype == dtype
    assert_matches_truth(got, truth, low, dtype, f"{rule} {dtype}")


@pytest.mark.parametrize("rule", RULES)
def test_unnormalised_inputs_small_tau(rule):
    """|q|·|k| up to ~100 with τ = 0.01: logits of order 1e4, where float32 rounding of the shifted
    logits in the backward decides the error."""
    case = make_case(rule, G=2, N=64, M=96, D=32, unnormalised=True, seed=11)
    truth = run("reference", case, torch.float64, 0.01)
    low = run("reference", case, torch.float32, 0.01)
    got = run("torch", case, torch.float32, 0.01)
    assert_matches_truth(got, truth, low, torch.float32, rule)


def test_single_anchor_and_keys_without_grad():
    case = make_case("index", G=1, N=1, M=300, D=17)
    truth = run("reference", case, torch.float64, k_grad=False)
    got = run("torch", case, torch.float32, k_grad=False)
    low = run("reference", case, torch.float32, k_grad=False)
    assert "dk" not in got
    assert_matches_truth(got, truth, low, torch.float32, "N=1, bank")


def test_q_is_k_gradients_add():
    """Passing the same tensor as q and k must give the sum of both contributions."""
    x = torch.nn.functional.normalize(torch.randn(40, 16, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 4, (40,))
    grads = []
    for impl in ("reference", "torch"):
        a = x.clone().requires_grad_()
        grouped_info_nce(a, a, q_labels=labels, k_labels=labels, exclude_self=True, impl=impl).loss.backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    case = make_case("radius", G=2, N=9, M=9, D=5, self_contrast=True, masks=True)
    q = case["q"].clone().requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fn = lambda q_, t_: grouped_info_nce(q_, temperature=t_, impl="torch", reduction="none", **case["kw"]).loss
    assert torch.autograd.gradcheck(fn, (q, tau))
    case = make_case("label", G=2, N=7, M=11, D=4, masks=True)
    q, k = case["q"].clone().requires_grad_(), case["k"].clone().requires_grad_()
    fn = lambda q_, k_: grouped_info_nce(q_, k_, temperature=0.5, impl="torch", **case["kw"]).loss
    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_no_positive_and_all_invalid_give_zero_and_finite_gradients(impl):
    q = torch.randn(6, 8, requires_grad=True)
    k = torch.randn(10, 8, requires_grad=True)
    # Labels that never match: no anchor has a positive.
    r = grouped_info_nce(q, k, q_labels=torch.zeros(6, dtype=torch.long), k_labels=torch.ones(10, dtype=torch.long),
                         impl=impl)
    r.loss.backward()
    assert r.loss.item() == 0.0 and (r.pos_count == 0).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and (q.grad == 0).all()
    # Every key invalid: empty denominators (LSE = -inf) must not leak NaN.
    q.grad = k.grad = None
    r = grouped_info_nce(q, k, k_valid=torch.zeros(10, dtype=torch.bool), impl=impl)
    r.loss.backward()
    assert r.loss.item() == 0.0 and torch.isinf(r.lse).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    # Every anchor invalid.
    q.grad = k.grad = None
    r = grouped_info_nce(q, k, q_valid=torch.zeros(6, dtype=torch.bool), impl=impl)
    r.loss.backward()
    assert r.loss.item() == 0.0 and (q.grad == 0).all() and (k.grad == 0).all()


def test_mean_counts_only_anchors_with_positives():
    q = torch.randn(8, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])  # anchors 4..7 have no positive
    r = grouped_info_nce(q, q_labels=labels, exclude_self=True, impl="torch")
    assert r.pos_count.tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    torch.testing.assert_close(r.loss, r.per_anchor[:4].mean())


def test_radius_ties_at_threshold_match_float32_comparison():
    """0.3 − 0.2 is 0.1000000015 in float32 (not < 0.1), 0.2 − 0.1 is 0.1 (not <), 0.25 − 0.2 counts."""
    pos = torch.tensor([0.1, 0.2, 0.25, 0.3])
    q = torch.randn(4, 3, dtype=torch.float64)
    for impl in ("reference", "torch"):
        r = grouped_info_nce(q, q_positions=pos, threshold=0.1, exclude_self=True, impl=impl)
        expect = [sum(1 for j in range(4) if j != i and bool((pos[i] - pos[j]).abs() < torch.tensor(0.1))) for i in range(4)]
        assert r.pos_count.tolist() == expect, impl


@pytest.mark.parametrize("unnormalised, tau, redone", [(True, 0.01, True), (False, 0.1, False)])
def test_forward_bound_shift_and_its_exact_fallback(monkeypatch, positive_strategy, unnormalised, tau, redone):
    """The forward shifts each row by the bound B_i = s·|q_i|·max|k_j|; rows whose every logit lies far below
    it (unnormalised features, small τ) underflow and are recomputed exactly. Both paths match the reference."""
    if positive_strategy == "dense":
        pytest.skip("the tiled path's bound; the dense path takes the exact row maximum")
    import macl_kernels.eager.tiled as tt
    calls = []
    exact = tt._exact_lse_rows
    monkeypatch.setattr(tt, "_exact_lse_rows", lambda *a: calls.append(a[-1].shape[0]) or exact(*a))
    case = make_case("label", G=2, N=64, M=96, D=32, unnormalised=unnormalised, masks=True, seed=13)
    truth = run("reference", case, torch.float64, tau)
    low = run("reference", case, torch.float32, tau)
    got = run("torch", case, torch.float32, tau)
    assert_matches_truth(got, truth, low, torch.float32, f"unnormalised={unnormalised}")
    assert bool(calls) == redone and (not redone or sum(calls) > 0)


@pytest.mark.parametrize("tau, normalize, shifted", [(0.1, True, False), (0.02, True, False), (0.01, True, True),
                                                     (0.1, False, True)])
def test_tiles_unshifted_only_where_exp_is_safe(monkeypatch, positive_strategy, tau, normalize, shifted):
    """The tiled path drops the per-row bound shift (plain GEMM tiles) only when exp(z) and every sum stay
    finite (`unshifted_ok`: s ≤ 80 − log M for normalised features); both ways match the float64 reference."""
    if positive_strategy == "dense":
        pytest.skip("the tiled path's choice")
    import macl_kernels.eager.tiled as tt
    seen = []
    logits = tt.TileBuffer.logits
    monkeypatch.setattr(tt.TileBuffer, "logits", lambda self, *a: seen.append(a[-1] is not None) or logits(self, *a))
    case = make_case("label", G=2, N=300, M=700, D=24, unnormalised=not normalize, masks=True, seed=17)
    truth = run("reference", case, torch.float64, tau, normalize=normalize)
    low = run("reference", case, torch.float32, tau, normalize=normalize)
    got = run("torch", case, torch.float32, tau, normalize=normalize)
    assert_matches_truth(got, truth, low, torch.float32, f"tau={tau} normalize={normalize}")
    assert seen and set(seen) == {shifted}
