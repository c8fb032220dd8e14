"""Higher-order gradients (issue 22 item 1): the torch path's gradient is itself differentiable.

Before: `torch.autograd.grad(nt_xent(x1 @ W, x2 @ W), W, create_graph=True)` returned a gradient without graph
on the torch path, so a gradient penalty got a wrong gradient silently. Now a backward with create_graph=True
recomputes the loss with differentiable torch operations (eager/double_backward.py), on the dense small-problem
path and on the tiled path alike; impl="triton" raises one clear error instead.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from macl_kernels import dense_info_nce, grouped_info_nce, info_nce, nt_xent, positional_sup_con, sup_con
from macl_kernels.eager import dense as torch_dense, tiled

D64 = torch.float64


@pytest.fixture(params=["dense", "tiled", "tiled-operator"])
def path(request, monkeypatch):
    """The torch path's three ways: the dense small-problem path, the tiled path with positives masked in the
    tiles, and the tiled path with positives through the linear operator (no in-tile masks)."""
    if request.param != "dense":
        monkeypatch.setattr(torch_dense, "DENSE_MAX_BYTES", 0)
    if request.param == "tiled-operator":
        monkeypatch.setattr(tiled, "IN_TILE_MAX_KEYS", 0)
    return request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _tau():
    return torch.tensor(0.5, dtype=D64, requires_grad=True)


# each case: (inputs builder, loss of the inputs); every float input requires grad (τ included)
def _nt_xent():
    g = _gen(1)
    return (torch.randn(3, 4, generator=g, dtype=D64, requires_grad=True),
            torch.randn(3, 4, generator=g, dtype=D64, requires_grad=True), _tau()), \
        lambda a, b, t: nt_xent(a, b, temperature=t, impl="torch")


def _sup_con():
    g = _gen(2)
    labels = torch.tensor([0, 1, 0])
    return (torch.randn(3, 2, 4, generator=g, dtype=D64, requires_grad=True), _tau()), \
        lambda f, t: sup_con(f, labels, temperature=t, impl="torch")


def _positional():
    g = _gen(3)
    pos = torch.tensor([0.1, 0.5, 0.25])
    return (torch.randn(3, 2, 4, generator=g, dtype=D64, requires_grad=True), _tau()), \
        lambda f, t: positional_sup_con(f, pos, 0.2, temperature=t, impl="torch")


def _info_nce():
    g = _gen(4)
    idx = torch.tensor([2, 0, 1, 4])
    return (torch.randn(4, 3, generator=g, dtype=D64, requires_grad=True),
            torch.randn(5, 3, generator=g, dtype=D64, requires_grad=True), _tau()), \
        lambda q, k, t: info_nce(q, k, idx, temperature=t, impl="torch")


def _dense_image():
    g = _gen(5)
    mask = torch.tensor([[[True, True], [False, True]], [[True, True], [True, True]]])
    return (torch.randn(2, 3, 2, 2, generator=g, dtype=D64, requires_grad=True),
            torch.randn(2, 3, 2, 2, generator=g, dtype=D64, requires_grad=True), _tau()), \
        lambda a, b, t: dense_info_nce(a, b, mask, negatives="image", temperature=t, impl="torch", symmetric=True)


def _dense_location():
    g = _gen(6)
    pos = torch.tensor([0.1, 0.2, 0.9])
    return (torch.randn(3, 2, 2, 1, generator=g, dtype=D64, requires_grad=True),
            torch.randn(3, 2, 2, 1, generator=g, dtype=D64, requires_grad=True), _tau()), \
        lambda a, b, t: dense_info_nce(a, b, negatives="location", positions=pos, threshold=0.15, temperature=t,
                                       impl="torch")


CASES = {"nt_xent": _nt_xent, "sup_con": _sup_con, "positional_sup_con": _positional, "info_nce": _info_nce,
         "dense_info_nce-image": _dense_image, "dense_info_nce-location": _dense_location}


@pytest.mark.parametrize("case", list(CASES))
def test_gradgradcheck_float64(case, path, one_torch_thread):
    inputs, fn = CASES[case]()
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("case", ["nt_xent", "sup_con", "info_nce"])
def test_fixed_temperature_and_no_normalize(case, path, one_torch_thread):
    """A float τ (the drop-in losses' small-problem shortcut on the dense path) and normalize=False."""
    inputs, fn = CASES[case]()
    feats = inputs[:-1]
    wrap = {"nt_xent": lambda a, b: nt_xent(a, b, temperature=0.5, normalize=False, impl="torch"),
            "sup_con": lambda f: sup_con(f, torch.tensor([1, 1, 0]), temperature=0.5, normalize=False, impl="torch"),
            "info_nce": lambda q, k: info_nce(q, k, torch.tensor([0, 0, 3, 4]), temperature=0.5, normalize=False,
                                              impl="torch")}[case]
    assert torch.autograd.gradgradcheck(wrap, feats)


def test_core_rows_and_masks_gradgradcheck(path, one_torch_thread):
    """grouped_info_nce with reduction="none", q_valid / k_valid, exclude_self and two groups."""
    g = _gen(7)
    q = torch.randn(2, 4, 3, generator=g, dtype=D64, requires_grad=True)
    k = torch.randn(2, 5, 3, generator=g, dtype=D64, requires_grad=True)
    lab_q, lab_k = torch.randint(0, 2, (2, 4), generator=g), torch.randint(0, 2, (2, 5), generator=g)
    qv = torch.tensor([[True, False, True, True], [True, True, True, True]])
    kv = torch.tensor([[True, True, False, True, True], [True, True, True, True, False]])
    fn = lambda a, b, t: grouped_info_nce(a, b, temperature=t, q_labels=lab_q, k_labels=lab_k, q_valid=qv,  # noqa
                                          k_valid=kv, exclude_self=True, reduction="none", normalize=True,
                                          impl="torch").loss
    assert torch.autograd.gradgradcheck(fn, (q, k, _tau()))


def _naive_nt_xent(z1, z2, tau):
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n, B = z.shape[0], z1.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(logits, (torch.arange(n) + B) % n)


def _penalty_grad(loss_fn, x1, x2, W0):
    """d/dW of L + 10·|dL/dW|² with L = loss_fn(x1 @ W, x2 @ W)."""
    W = W0.clone().requires_grad_()
    L = loss_fn(x1 @ W, x2 @ W)
    gW, = torch.autograd.grad(L, W, create_graph=True)
    assert gW.requires_grad
    out, = torch.autograd.grad(L + 10 * gW.pow(2).sum(), W)
    return gW.detach(), out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_penalty_matches_naive(dtype, path, one_torch_thread):
    """The issue's example: the penalised gradient equals the naive reference's (it was 0.0853 vs 0.3948)."""
    g = _gen(8)
    x1, x2 = torch.randn(8, 5, generator=g, dtype=dtype), torch.randn(8, 5, generator=g, dtype=dtype)
    W0 = torch.randn(5, 4, generator=g, dtype=dtype)
    g_ref, pen_ref = _penalty_grad(lambda a, b: _naive_nt_xent(a, b, 0.1), x1, x2, W0)
    g_ours, pen_ours = _penalty_grad(lambda a, b: nt_xent(a, b, temperature=0.1, impl="torch"), x1, x2, W0)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == D64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, **tol)
    torch.testing.assert_close(pen_ours, pen_ref, **tol)
    # the part the old code lost: the penalty's own gradient is not small here
    assert (pen_ref - torch.autograd.grad(_naive_nt_xent(x1 @ W0.requires_grad_(), x2 @ W0, 0.1), W0)[0]
            ).abs().max() > 0.1


def test_create_graph_first_order_equals_hand_written(path, one_torch_thread):
    """The recomputed gradient (create_graph=True) equals the hand-written one (create_graph=False)."""
    g = _gen(9)
    feats = torch.randn(6, 2, 8, generator=g, requires_grad=True)
    tau = torch.tensor(0.2, requires_grad=True)
    pos = torch.rand(6, generator=g)
    loss = lambda: positional_sup_con(feats, pos, 0.3, temperature=tau, impl="torch")  # noqa: E731
    plain = torch.autograd.grad(loss(), (feats, tau))
    graph = torch.autograd.grad(loss(), (feats, tau), create_graph=True)
    assert all(t.requires_grad for t in graph)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_triton_raises_one_clear_error_at_create_graph():
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    g = _gen(10)
    z1 = torch.randn(4, 8, generator=g, requires_grad=True)
    z2 = torch.randn(4, 8, generator=g, requires_grad=True)
    loss = nt_xent(z1, z2, impl="triton")
    with pytest.raises(RuntimeError, match="impl='triton' does not support higher-order gradients"):
        torch.autograd.grad(loss, z1, create_graph=True)
    # first order is unaffected
    assert torch.isfinite(torch.autograd.grad(nt_xent(z1, z2, impl="triton"), z1)[0]).all()
