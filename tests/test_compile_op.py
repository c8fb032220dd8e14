"""The core as a torch custom op (issue 21 item 5): `torch.compile(fullgraph=True)` of a training step with each
loss and MACL's step traces with zero graph breaks on CPU and gives the eager loss and gradients;
`torch.library.opcheck` passes on `macl.contrast_rows` and its backward op.

Before this, `torch._dynamo.explain(nt_xent)` showed 6 graph breaks (the value checks reading tensors back, the
`const_cache` index's version guard, the autograd.Function's Python tiles) and fullgraph=True failed.
Most cases use the "aot_eager" backend (the same Dynamo trace, the same AOTAutograd forward and backward graphs
with fake tensors, no C++ compile: seconds, not minutes); one runs inductor end to end.
"""
from __future__ import annotations

import pytest
import torch

from macl_kernels import (DenseInfoNCELoss, InfoNCELoss, NTXentLoss, PositionalSupConLoss, SupConLoss,
                          dense_info_nce, info_nce, nt_xent, positional_sup_con, sup_con)
import macl_kernels.op  # noqa: F401  (registers torch.ops.macl.*)


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(W=torch.randn(16, 8, generator=g), x1=torch.randn(6, 16, generator=g),
                x2=torch.randn(6, 16, generator=g), lab=torch.tensor([0, 1, 0, 2, 1, 0]),
                pos=torch.rand(6, generator=g), f1=torch.randn(2, 16, 3, 3, generator=g),
                f2=torch.randn(2, 16, 3, 3, generator=g), idx=torch.tensor([5, 0, 1, 1, 3, 2]))


def _project(f, W):
    return torch.einsum("bchw,cd->bdhw", f, W)


# loss(d, W, tau): a training step's loss from the projection W (and τ: a float or a learnable tensor)
LOSSES = {
    "nt_xent": lambda d, W, t: nt_xent(d["x1"] @ W, d["x2"] @ W, temperature=t),
    "sup_con": lambda d, W, t: sup_con(torch.stack([d["x1"] @ W, d["x2"] @ W], 1), d["lab"], temperature=t),
    "positional_sup_con": lambda d, W, t: positional_sup_con(torch.stack([d["x1"] @ W, d["x2"] @ W], 1), d["pos"],
                                                             0.3, temperature=t),
    "info_nce": lambda d, W, t: info_nce(d["x1"] @ W, d["x2"] @ W, d["idx"], temperature=t),
    "dense_info_nce-image": lambda d, W, t: dense_info_nce(_project(d["f1"], W), _project(d["f2"], W),
                                                           d["f1"][:, 0] > -0.5, temperature=t, symmetric=True),
    "dense_info_nce-batch": lambda d, W, t: dense_info_nce(_project(d["f1"], W), _project(d["f2"], W),
                                                           negatives="batch", temperature=t),
    "dense_info_nce-location": lambda d, W, t: dense_info_nce(_project(d["f1"], W), _project(d["f2"], W),
                                                              negatives="location", positions=d["pos"][:2],
                                                              threshold=0.3, temperature=t),
}


def _eager_and_compiled(fn, params, backend="aot_eager"):
    """(eager loss, eager grads, compiled loss, compiled grads, graph breaks) of fn() w.r.t. params."""
    loss = fn()
    grads = torch.autograd.grad(loss, params)
    explained = torch._dynamo.explain(fn)()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    c_loss = compiled()
    c_grads = torch.autograd.grad(c_loss, params)
    return loss, grads, c_loss, c_grads, explained


def _assert_same(loss, grads, c_loss, c_grads, explained):
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("learn_tau", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_training_step_compiles_fullgraph_with_eager_values(name, learn_tau, one_torch_thread):
    d = _data()
    W = d["W"].clone().requires_grad_()
    tau = torch.tensor(0.2, requires_grad=True) if learn_tau else 0.2
    params = (W, tau) if learn_tau else (W,)
    _assert_same(*_eager_and_compiled(lambda: LOSSES[name](d, W, tau), params))


@pytest.mark.parametrize("cls,args", [(NTXentLoss, ("x1", "x2")), (SupConLoss, ("feats", "lab")),
                                      (PositionalSupConLoss, ("feats", "pos")), (InfoNCELoss, ("x1", "x2", "idx")),
                                      (DenseInfoNCELoss, ("f1", "f2"))])
def test_loss_modules_with_learnable_temperature(cls, args, one_torch_thread):
    d = _data(1)
    crit = cls(learn_temperature=True)
    W = d["W"].clone().requires_grad_()
    d["x1"], d["x2"] = d["x1"], d["x2"]

    def fn():
        vals = {"x1": d["x1"] @ W, "x2": d["x2"] @ W, "feats": torch.stack([d["x1"] @ W, d["x2"] @ W], 1),
                "f1": _project(d["f1"], W), "f2": _project(d["f2"], W), "lab": d["lab"], "pos": d["pos"],
                "idx": d["idx"]}
        return crit(*(vals[a] for a in args))
    _assert_same(*_eager_and_compiled(fn, (W, crit.temperature)))


def test_macl_step_compiles_fullgraph(one_torch_thread):
    """MACL's training step (macl/methods/macl.py): the model's forward, the three terms and their weighted sum."""
    from macl.methods import build_method
    from macl.settings.config import MethodConfig, NetConfig
    from tests.test_methods import make_batch
    torch.manual_seed(0)
    # float64: AOTAutograd's decomposed conv / norm backward sums in another order than eager (float32 differs
    # by ~1e-5 relative); the loss terms themselves are the same computation
    method = build_method(NetConfig(base_width=4, depth=3), MethodConfig()).double()
    batch = make_batch(B=4, size=32, dtype=torch.float64)
    params = [p for p in method.parameters() if p.requires_grad]
    _assert_same(*_eager_and_compiled(lambda: method.combine(method(batch)), params))


def test_inductor_end_to_end(one_torch_thread):
    """The default backend (inductor) on one step, with a learnable τ: it checks the fake kernels' strides."""
    d = _data(2)
    W = d["W"].clone().requires_grad_()
    tau = torch.tensor(0.2, requires_grad=True)
    _assert_same(*_eager_and_compiled(lambda: nt_xent(d["x1"] @ W, d["x2"] @ W, temperature=tau), (W, tau),
                                      backend="inductor"))


def test_value_checks_run_inside_the_compiled_op():
    """Under compile the checks that read tensors are not skipped: the op raises the eager error at run time."""
    x = torch.randn(6, 2, 8)
    bad_tau = torch.tensor(-0.1)
    f = torch.compile(lambda x, t: sup_con(x, torch.tensor([0, 1, 0, 1, 0, 1]), temperature=t), fullgraph=True,
                      backend="aot_eager")
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        f(x, bad_tau)
    g = torch.compile(lambda x, p: positional_sup_con(x, p, 0.2), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="non-finite"):
        g(x, torch.tensor([0.1, float("nan"), 0.2, 0.3, 0.4, 0.5]))
    h = torch.compile(lambda q, k, i: info_nce(q, k, i), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="pos_index must lie in"):
        h(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 5]))
    # the checks off (check_inputs=False), an invalid τ gives NaN as in eager mode
    from macl_kernels import grouped_info_nce
    k = torch.compile(lambda q, t: grouped_info_nce(q, temperature=t, check_inputs=False).loss, fullgraph=True,
                      backend="aot_eager")
    assert torch.isnan(k(torch.randn(4, 3), bad_tau))


def _op_samples():
    g = torch.Generator().manual_seed(3)
    G, N, M, D = 2, 5, 7, 4
    q = torch.randn(G, N, D, generator=g, requires_grad=True)
    k = torch.randn(G, M, D, generator=g, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    idx = torch.randint(0, M, (G, N), generator=g)
    lq, lk = torch.randint(0, 3, (G, N), generator=g), torch.randint(0, 3, (G, M), generator=g)
    pq, pk = torch.rand(G, N, generator=g), torch.rand(G, M, generator=g)
    kv = torch.rand(G, M, generator=g) > 0.2
    qv = torch.rand(G, N, generator=g) > 0.2
    common = dict(threshold=0.0, exclude_self=False, q_valid=None, k_valid=None, normalize=False, same=False,
                  impl="torch", tf32=-1, check_values=True)
    cases = [
        (q, k, None, 2.0, "index", idx, None, common),
        (q, k, s, 0.0, "label", lq, lk, dict(common, k_valid=kv, q_valid=qv, normalize=True)),
        (q, k, s, 0.0, "radius", pq, pk, dict(common, threshold=0.3)),
        (q, q, s, 0.0, "label", lq, lq, dict(common, same=True, exclude_self=True, normalize=True)),
        (q.detach().double().requires_grad_(), k.detach().double(), None, 3.0, "index", idx, None,
         dict(common, impl="reference")),
    ]
    return [(a, kw) for *a, kw in cases]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i, one_torch_thread):
    args, kw = _op_samples()[i]
    q, k, s, scale, rule, qm, km = args
    full = (q, k, s, scale, rule, qm, km, kw["threshold"], kw["exclude_self"], kw["q_valid"], kw["k_valid"],
            kw["normalize"], kw["same"], kw["impl"], kw["tf32"], kw["check_values"])
    torch.library.opcheck(torch.ops.macl.contrast_rows.default, full)
    g = torch.randn(q.shape[:2], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    bw = (g,) + full[:-1] + (True, not kw["same"] and k.requires_grad, s is not None)
    torch.library.opcheck(torch.ops.macl.contrast_rows_backward.default, tuple(t.detach() if isinstance(
        t, torch.Tensor) else t for t in bw))


def test_op_gradients_and_double_backward_match_eager(one_torch_thread):
    """The op's registered autograd gives the eager gradients, and create_graph=True through the op gives the
    eager second-order gradient (the op's backward is differentiable)."""
    from macl_kernels.op import rows
    from macl_kernels.api import _build_problem
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    lab = torch.tensor([0, 1, 0, 1, 2, 2])

    def via_op():
        p, _ = _build_problem(x, None, tau, None, lab, None, None, None, None, True, None, None, True, True)
        return rows(p, "torch", None, False).loss.sum()

    def eager():
        return sup_con(x, lab, temperature=tau, impl="torch", reduction="sum")
    for create_graph in (False, True):
        a = torch.autograd.grad(via_op(), (x, tau), create_graph=create_graph)
        b = torch.autograd.grad(eager(), (x, tau), create_graph=create_graph)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v)
    ga = torch.autograd.grad(via_op(), x, create_graph=True)[0].pow(2).sum()
    gb = torch.autograd.grad(eager(), x, create_graph=True)[0].pow(2).sum()
    torch.testing.assert_close(torch.autograd.grad(ga, (x, tau)), torch.autograd.grad(gb, (x, tau)))


@pytest.mark.parametrize("name", ["nt_xent", "positional_sup_con", "dense_info_nce-location"])
def test_triton_path_through_the_op(name, monkeypatch, one_torch_thread):
    """impl="triton" (the interpreter on CPU; the CUDA path's code) inside a compiled step: the op runs the
    Triton forward, its backward op the Triton backward kernels; equal to the eager Triton call."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    from macl_kernels import losses
    d = _data(5)
    W = d["W"].clone().requires_grad_()
    tau = torch.tensor(0.2, requires_grad=True)
    for fn in ("nt_xent", "positional_sup_con", "dense_info_nce"):   # the losses' default impl -> triton
        orig = getattr(losses, fn)
        monkeypatch.setitem(globals(), fn, lambda *a, _f=orig, **kw: _f(*a, impl="triton", **kw))
    import macl_kernels.triton as mk_triton
    calls = []
    real = mk_triton.triton_rows
    monkeypatch.setattr(mk_triton, "triton_rows", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    _assert_same(*_eager_and_compiled(lambda: LOSSES[name](d, W, tau), (W, tau)))
    assert len(calls) >= 4   # eager fwd, explain's run, the compiled forward op and the backward op's recompute
