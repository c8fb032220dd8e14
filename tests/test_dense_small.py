"""The small-problem fast paths (issue 15): the reduction inside the dense autograd function, the loss shortcut
(eager/small_path.py), the cached trusted nt_xent index (eager/const_cache.py), the in-place buffers of the dense backward.

Every value and gradient is compared with the float64 reference implementation (impl="reference", which builds
the full logit matrix and differentiates it by autograd) to 1e-10; gradcheck in float64 where a path has its own
backward.
"""
import pytest
import torch

from core_cases import assert_matches_truth, make_case
from macl_kernels.eager import const_cache, small_path
from macl_kernels import grouped_info_nce, nt_xent, positional_sup_con, sup_con
from macl_kernels.eager import dense as torch_dense

TOL = dict(rtol=1e-10, atol=1e-10)


def _loss_and_grads(impl, case, reduction, normalize, tau, use_rows=False):
    q = case["q"].clone().requires_grad_()
    k = case["k"].clone().requires_grad_() if case["k"] is not None else None
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    res = grouped_info_nce(q, k, temperature=t, reduction=reduction, impl=impl, normalize=normalize, **case["kw"])
    out = res.loss
    if use_rows:   # the per-anchor rows are differentiable too, alone or mixed with the reduced loss
        w = torch.linspace(-1.0, 2.0, res.per_anchor.numel(), dtype=torch.float64).view_as(res.per_anchor)
        out = out + (res.per_anchor * w).sum()
    inputs = [q, t] + ([k] if k is not None else [])
    grads = torch.autograd.grad(out, inputs)
    return [res.loss.detach(), res.per_anchor.detach(), res.lse, res.pos_count] + list(grads)


@pytest.mark.parametrize("rule", ["index", "label", "radius"])
@pytest.mark.parametrize("self_contrast", [False, True])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_inside_the_dense_function_matches_reference(rule, self_contrast, masks, reduction):
    case = make_case(rule, G=2, N=13, M=17, D=5, self_contrast=self_contrast, masks=masks, unnormalised=True)
    for normalize in (False, True):
        for use_rows in (False, True):
            got = _loss_and_grads("torch", case, reduction, normalize, 0.3, use_rows)
            want = _loss_and_grads("reference", case, reduction, normalize, 0.3, use_rows)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **TOL, equal_nan=False)


@pytest.mark.parametrize("rule", ["index", "label", "radius"])
@pytest.mark.parametrize("tau", [0.5, 0.05])
def test_reduced_float32_within_twice_the_reference_error(rule, tau):
    """float32 through the reduced dense function (learnable τ, masks, raw features of norm ~5, normalize=True):
    every output within 2× the reference's own float32 error of the float64 truth (KERNELS.md §5)."""
    case = make_case(rule, G=2, N=40, M=56, D=16, masks=True, unnormalised=True, seed=4)

    def run_reduced(impl, dtype):
        q = case["q"].to(dtype).requires_grad_()
        k = case["k"].to(dtype).requires_grad_()
        t = torch.tensor(tau, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
        res = grouped_info_nce(q, k, temperature=t, impl=impl, normalize=True, **case["kw"])
        dq, dk, dt = torch.autograd.grad(res.loss, (q, k, t))
        return dict(loss=res.loss.detach(), lse=res.lse, count=res.pos_count, dq=dq, dk=dk, dtau=dt)

    truth = run_reduced("reference", torch.float64)
    assert_matches_truth(run_reduced("torch", torch.float32), truth, run_reduced("reference", torch.float32),
                         torch.float32, f"{rule} tau={tau}")


def test_unbatched_inputs_get_their_gradient_without_a_view_node():
    """2-D q (and k) enter the dense function themselves; outputs and gradients are those of the reference."""
    q = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 11, (9,))
    grads = {}
    for impl in ("torch", "reference"):
        res = grouped_info_nce(q, k, pos_index=pos, impl=impl, normalize=True)
        assert res.per_anchor.shape == res.lse.shape == res.pos_count.shape == (9,)
        grads[impl] = (res.loss.detach(), *torch.autograd.grad(res.loss, (q, k)))
        if impl == "torch":
            assert type(res.loss.grad_fn).__name__ == "_DenseInfoNCEBackward"
    for a, b in zip(grads["torch"], grads["reference"]):
        torch.testing.assert_close(a, b, **TOL)


def test_gradcheck_reduced_dense_function():
    case = make_case("label", G=2, N=6, M=6, D=3, self_contrast=True, masks=True)
    q = case["q"].clone().requires_grad_()
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum"):
        fn = lambda q_, t_: grouped_info_nce(q_, temperature=t_, impl="torch", reduction=reduction,
                                             normalize=True, **case["kw"]).loss
        assert torch.autograd.gradcheck(fn, (q, tau))
    z1 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, temperature=0.3, impl="torch"), (z1, z2))


def test_retain_graph_second_backward_recomputes_the_consumed_softmax():
    """The backward turns the saved softmax into dz in place; a second backward through the same graph
    recomputes it, so both give the same gradient."""
    for fn in (lambda x: nt_xent(x[:5], x[5:], impl="torch"),
               lambda x: grouped_info_nce(x, q_labels=torch.arange(10) % 3, exclude_self=True, impl="torch").loss):
        x = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
        loss = fn(x)
        g1, = torch.autograd.grad(loss, x, retain_graph=True)
        g2, = torch.autograd.grad(loss, x)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the loss shortcut

def _loss_cases():
    z1, z2 = torch.randn(2, 7, 5, dtype=torch.float64).unbind(0)
    feats = torch.randn(6, 2, 5, dtype=torch.float64) * 3
    flat = torch.randn(8, 5, dtype=torch.float64)
    labels, flat_labels = torch.tensor([0, 1, 0, 2, 1, 3]), torch.tensor([1, 1, 0, 2, 2, 0, 5, 1])
    positions = torch.tensor([0.1, 0.2, 0.25, 0.3, 0.9, 0.55])
    return [
        ("nt_xent", (z1, z2), lambda a, b, **kw: nt_xent(a, b, **kw)),
        ("sup_con 3-D", (feats,), lambda f, **kw: sup_con(f, labels, **kw)),
        ("sup_con 2-D", (flat,), lambda f, **kw: sup_con(f, flat_labels, **kw)),
        ("positional_sup_con", (feats,), lambda f, **kw: positional_sup_con(f, positions, 0.1, **kw)),
    ]


@pytest.mark.parametrize("name, inputs, fn", _loss_cases(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("normalize", [True, False])
def test_loss_shortcut_matches_reference(monkeypatch, name, inputs, fn, reduction, normalize):
    taken = []
    shortcut = small_path.self_contrast
    monkeypatch.setattr(small_path, "self_contrast", lambda *a, **k: taken.append(1) or shortcut(*a, **k))
    out = {}
    for impl in ("torch", "reference"):
        xs = [x.clone().requires_grad_() for x in inputs]
        loss = fn(*xs, temperature=0.2, normalize=normalize, reduction=reduction, impl=impl)
        out[impl] = (loss.detach(), *torch.autograd.grad(loss, xs))
    assert type(loss.grad_fn).__name__ != "_DenseInfoNCEBackward"   # the reference ran the general path
    for a, b in zip(out["torch"], out["reference"]):
        torch.testing.assert_close(a, b, **TOL)
    assert taken   # the shortcut was asked; that it answered is checked below


def test_loss_shortcut_is_taken_only_where_it_applies(monkeypatch):
    z1, z2 = torch.randn(2, 6, 4).unbind(0)
    calls = []
    dense_loss = torch_dense.dense_loss
    monkeypatch.setattr(torch_dense, "dense_loss", lambda *a, **k: calls.append(1) or dense_loss(*a, **k))
    nt_xent(z1, z2, impl="torch")
    nt_xent(z1, z2)                                 # auto on a CPU is torch
    assert len(calls) == 2
    nt_xent(z1, z2, impl="reference")
    nt_xent(z1, z2, temperature=torch.tensor(0.1), impl="torch")   # tensor τ: the general path
    nt_xent(z1, z2, reduction="none", impl="torch")
    big = torch.randn(600, 4)
    nt_xent(big, big, impl="torch")                 # 1200² logits > 4 MiB: tiled
    nt_xent(z1[:0], z2[:0], impl="torch")           # empty
    assert len(calls) == 2


def test_loss_shortcut_keeps_the_general_path_errors():
    feats = torch.randn(4, 2, 3)
    with pytest.raises(ValueError, match="non-finite"):
        positional_sup_con(feats, torch.tensor([0.1, float("nan"), 0.3, 0.4]), 0.1)
    with pytest.raises(ValueError, match="threshold"):
        positional_sup_con(feats, torch.rand(4), -1.0)
    with pytest.raises(TypeError, match="integer"):
        sup_con(feats, torch.rand(4))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(feats[:, 0], feats[:, 1], temperature=-0.1)
    with pytest.raises(ValueError, match="reduction"):
        nt_xent(feats[:, 0], feats[:, 1], reduction="avg")
    with pytest.raises(TypeError, match="normalize"):
        sup_con(feats, torch.arange(4), normalize=1)
    with pytest.raises(ValueError, match="D = 0"):
        nt_xent(torch.randn(3, 0), torch.randn(3, 0))


# ------------------------------------------------------------------------------------ the constant cache

def test_other_view_index_values_cached_per_size_and_device():
    const_cache.clear()
    a = const_cache.other_view_index(3, torch.device("cpu"))
    assert a.tolist() == [[3, 4, 5, 0, 1, 2]] and a.dtype == torch.int64
    assert const_cache.other_view_index(3, torch.device("cpu")) is a
    b = const_cache.other_view_index(4, torch.device("cpu"))
    assert b is not a and b.tolist() == [[4, 5, 6, 7, 0, 1, 2, 3]]
    assert const_cache.trusted(a) == const_cache.Trust(bound=6, never_self=True)
    assert const_cache.trusted(a.clone()) is None   # equal values are not enough: only the cached object
    meta = torch.device("meta")
    m = const_cache.other_view_index(3, meta)
    assert m.device == meta and m is not a and const_cache.other_view_index(3, meta) is m
    assert const_cache.column(a).shape == (1, 6, 1)
    assert const_cache.other_view_index(0, torch.device("cpu")).shape == (1, 0)


def test_cache_is_bounded():
    const_cache.clear()
    first = const_cache.other_view_index(1, torch.device("cpu"))
    for B in range(2, 2 + 3 * const_cache.MAX_ENTRIES):
        const_cache.other_view_index(B, torch.device("cpu"))
        const_cache.filled((1, B, 1), -1.0, torch.float32, torch.device("cpu"))
    assert len(const_cache._CACHE) == const_cache.MAX_ENTRIES
    assert len(const_cache._BY_ID) == const_cache.MAX_ENTRIES
    assert const_cache.trusted(first) is None   # evicted: no longer vouched for


def test_filled_is_keyed_by_dtype_and_rebuilt_after_a_write():
    const_cache.clear()
    a = const_cache.filled((1, 4, 1), -1.0, torch.float32, torch.device("cpu"))
    b = const_cache.filled((1, 4, 1), -1.0, torch.float64, torch.device("cpu"))
    assert a.dtype == torch.float32 and b.dtype == torch.float64 and (a == -1).all() and (b == -1).all()
    assert const_cache.filled((1, 4, 1), -1.0, torch.float32, torch.device("cpu")) is a
    a.zero_()
    c = const_cache.filled((1, 4, 1), -1.0, torch.float32, torch.device("cpu"))
    assert c is not a and (c == -1).all()


def test_a_modified_cached_index_loses_its_trust_and_is_checked_again():
    const_cache.clear()
    t = const_cache.other_view_index(2, torch.device("cpu"))
    q = torch.randn(4, 3)
    grouped_info_nce(q, pos_index=t, exclude_self=True)   # trusted: no range check needed, and in range
    t.add_(10)
    assert const_cache.trusted(t) is None
    with pytest.raises(ValueError, match="pos_index must lie in"):
        grouped_info_nce(q, pos_index=t, exclude_self=True)
    fresh = const_cache.other_view_index(2, torch.device("cpu"))
    assert fresh is not t and fresh.tolist() == [[2, 3, 0, 1]]
    # a trusted index is still range-checked against a smaller M than it was built for
    with pytest.raises(ValueError, match="pos_index must lie in"):
        grouped_info_nce(torch.randn(4, 3), torch.randn(3, 3), pos_index=fresh)


def test_nt_xent_halves_get_their_own_gradients_in_their_dtype():
    """The shortcut hands nt_xent's two views to the dense function separately: one without grad, and
    16-bit views, get exactly what the general path gives them."""
    base1, base2 = torch.randn(2, 6, 4, dtype=torch.float64).unbind(0)
    for dtype in (torch.float64, torch.bfloat16):
        out = {}
        for impl in ("torch", "reference"):
            z1 = base1.to(dtype)
            z2 = base2.to(dtype).requires_grad_()
            loss = nt_xent(z1, z2, temperature=0.3, impl=impl)
            out[impl] = (loss.detach(), torch.autograd.grad(loss, z2)[0])
        assert out["torch"][1].dtype == dtype
        tol = TOL if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
        for a, b in zip(out["torch"], out["reference"]):
            torch.testing.assert_close(a.double(), b.double(), **tol)


def test_reduced_losses_do_not_depend_on_the_anchor_layout():
    """For a reduced loss, (B, V, D) features are laid out sample-major (a view, no copy); the loss and the
    gradient are those of the view-major layout that reduction="none" keeps."""
    feats = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1])
    positions = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9])
    for fn in (lambda **kw: sup_con(feats, labels, **kw),
               lambda **kw: positional_sup_con(feats, positions, 0.1, **kw)):
        rows = fn(reduction="none", impl="torch")
        assert rows.shape == (5, 3)
        want = rows.sum() / (rows != 0).sum()
        g_want, = torch.autograd.grad(want, feats)
        got = fn(impl="torch")
        g_got, = torch.autograd.grad(got, feats)
        torch.testing.assert_close(got, want, **TOL)
        torch.testing.assert_close(g_got, g_want, **TOL)
