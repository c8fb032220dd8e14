"""normalize=True inside the core (torch path: dense and tiled; reference) against the float64 reference.

The truth is the reference in float64, which normalises with plain F.normalize and differentiates by autograd;
the torch path scales tile rows by the inverse norms and projects its gradients by hand (rownorm.py).
"""
import pytest
import torch

from core_cases import assert_matches_truth, make_case, run
from macl_kernels import grouped_info_nce
from macl_kernels.api import NATIVE_NORMALIZE


@pytest.fixture(params=["dense", "in-tile", "operator"])
def strategy(request, monkeypatch):
    import macl_kernels.eager.dense as td
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(td, "DENSE_MAX_BYTES", 1 << 40 if request.param == "dense" else -1)
    monkeypatch.setattr(tt, "IN_TILE_MAX_KEYS", 1 << 30 if request.param == "in-tile" else 0)
    return request.param


def test_torch_and_reference_normalise_natively():
    assert {"torch", "reference"} <= NATIVE_NORMALIZE


def test_reference_normalize_equals_prenormalised_inputs():
    case = make_case("label", G=2, N=9, M=13, D=6, unnormalised=True, masks=True)
    got = run("reference", case, torch.float64, normalize=True)
    pre = dict(case, q=torch.nn.functional.normalize(case["q"], dim=-1),
               k=torch.nn.functional.normalize(case["k"], dim=-1))
    want = run("reference", pre, torch.float64)
    for name in ("loss", "lse", "dtau"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rule", ["index", "label", "radius"])
@pytest.mark.parametrize("self_contrast", [False, True])
@pytest.mark.parametrize("masks", [False, True])
def test_float64_tight(strategy, rule, self_contrast, masks):
    case = make_case(rule, G=2, N=29, M=41, D=7, self_contrast=self_contrast, masks=masks, unnormalised=True,
                     seed=21)
    truth = run("reference", case, torch.float64, normalize=True)
    got = run("torch", case, torch.float64, normalize=True)
    assert_matches_truth(got, truth, None, torch.float64, f"{strategy} {rule} self={self_contrast} masks={masks}")


@pytest.mark.parametrize("rule", ["index", "label", "radius"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_and_small_tau(strategy, rule, dtype):
    """Raw features of norm ~3·√D (and one zero row), τ = 0.05, ragged shapes."""
    case = make_case(rule, G=2, N=70, M=130, D=33, unnormalised=True, masks=(rule == "label"), seed=22)
    case["q"][0, 3] = 0.0   # F.normalize leaves a zero row zero; its gradient is dq̂/ε there, not a projection
    truth = run("reference", case, torch.float64, 0.05, normalize=True)
    low = run("reference", case, dtype, 0.05, normalize=True)
    got = run("torch", case, dtype, 0.05, normalize=True)
    assert_matches_truth(got, truth, low, dtype, f"{strategy} {rule} {dtype}")


def test_keys_without_grad_and_fixed_tau(strategy):
    case = make_case("index", G=1, N=20, M=50, D=8, unnormalised=True, seed=23)
    truth = run("reference", case, torch.float64, k_grad=False, learn_tau=False, normalize=True)
    got = run("torch", case, torch.float64, k_grad=False, learn_tau=False, normalize=True)
    assert "dk" not in got and "dtau" not in got
    assert_matches_truth(got, truth, None, torch.float64, strategy)


def test_q_is_k_merged_gradient(strategy):
    """Self-contrast passing the same tensor as q and k, fixed τ: one merged buffer, projected once."""
    x = torch.randn(30, 6, dtype=torch.float64) * 2
    labels = torch.randint(0, 3, (30,))
    grads = []
    for impl in ("reference", "torch"):
        a = x.clone().requires_grad_()
        grouped_info_nce(a, a, q_labels=labels, k_labels=labels, exclude_self=True, impl=impl,
                         normalize=True).loss.backward()
        grads.append(a.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def test_gradcheck_float64(strategy):
    case = make_case("radius", G=2, N=7, M=7, D=4, self_contrast=True, masks=True, unnormalised=True)
    q = case["q"].clone().requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fn = lambda q_, t_: grouped_info_nce(q_, temperature=t_, impl="torch", reduction="none", normalize=True,
                                         **case["kw"]).loss
    assert torch.autograd.gradcheck(fn, (q, tau))
    case = make_case("index", G=1, N=6, M=9, D=3, unnormalised=True)
    q, k = case["q"].clone().requires_grad_(), case["k"].clone().requires_grad_()
    fn = lambda q_, k_: grouped_info_nce(q_, k_, temperature=0.5, impl="torch", normalize=True,
                                         **case["kw"]).loss
    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("self_contrast", [False, True])
def test_index_rule_in_row_chunks(monkeypatch, normalize, self_contrast):
    """The tiled path's index-rule positives go in row chunks (index_terms.py): chunks of 5 rows, ragged."""
    import macl_kernels.index_terms as it
    import macl_kernels.eager.dense as td
    import macl_kernels.eager.tiled as tt
    monkeypatch.setattr(td, "DENSE_MAX_BYTES", -1)
    monkeypatch.setattr(tt, "IN_TILE_MAX_KEYS", 0)
    monkeypatch.setattr(it, "CHUNK", 5)
    case = make_case("index", G=2, N=23, M=31, D=6, self_contrast=self_contrast, masks=True, unnormalised=True,
                     seed=24)
    truth = run("reference", case, torch.float64, normalize=normalize)
    got = run("torch", case, torch.float64, normalize=normalize)
    assert_matches_truth(got, truth, None, torch.float64, f"normalize={normalize} self={self_contrast}")
