"""No host-device synchronisation in the Triton path's forward and backward (issue 11, item 4).

On CUDA, reading a tensor value on the host (`.item()`, `bool(t)`, `float(t)`, `int(t)`, `.tolist()`) waits
for the GPU. Here, on CPU under TRITON_INTERPRET=1, those five methods are patched to raise when called
from our code (a frame in `macl_kernels/` or `macl/methods/`), with the input checks in their CUDA mode
(`check_inputs=False`, or the default with CUDA's default forced), for a learnable τ, the radius rule
(positions) and pos_index, forward AND backward. Only calls from our frames raise, so that the test is
about our code and not the interpreter's launch machinery (triton 3.9's interpreter was seen making none of
these calls on the cases here; the filter keeps the test meaningful if a later one does, since a real CUDA
launch reads no tensor values). Host syncs made inside C++ ops (e.g. `nonzero`, a blocking H2D copy) are
invisible here; `benchmarks/gpu_check.py` runs the same calls under `torch.cuda.set_sync_debug_mode("error")`
on a GPU for those.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("triton")

import macl_kernels  # noqa: E402
import macl_kernels.api as api  # noqa: E402
from macl_kernels import grouped_info_nce, positional_sup_con  # noqa: E402
from macl_kernels.losses import PositionalSupConLoss  # noqa: E402

OURS = (os.path.dirname(macl_kernels.__file__) + os.sep,
        os.path.join(os.path.dirname(os.path.dirname(macl_kernels.__file__)), "macl", "methods") + os.sep)
SYNCING = ("item", "__bool__", "__float__", "__int__", "tolist")


class HostSync(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MACL_POISON_OUTPUTS", "1")


@pytest.fixture
def no_sync(monkeypatch):
    """Patch the five host-reading Tensor methods to raise HostSync when called from our code while
    `watch.on`; `watch.elsewhere` lists the (method, file:line) calls seen from other code (the interpreter)."""
    class Watch:
        on = True
        elsewhere: list = []
    watch = Watch()

    def patched(name, orig):
        def f(self, *a, **kw):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            if watch.on and where.startswith(OURS):
                raise HostSync(f"Tensor.{name} called from {where}:{frame.f_lineno}")
            watch.elsewhere.append((name, f"{where}:{frame.f_lineno}"))
            return orig(self, *a, **kw)
        return f

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, patched(name, getattr(torch.Tensor, name)))
    return watch


def _inputs(seed=0, G=2, N=24, M=31, D=16):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(G, N, D, generator=g) / D ** 0.5).requires_grad_()   # logits of a few units at τ = 0.1
    k = (torch.randn(G, M, D, generator=g) / D ** 0.5).requires_grad_()
    return g, q, k


RULES = {
    "pos_index": lambda g, G, N, M: dict(pos_index=torch.randint(0, M, (G, N), generator=g)),
    "radius": lambda g, G, N, M: dict(q_positions=torch.rand(G, N, generator=g),
                                      k_positions=torch.rand(G, M, generator=g), threshold=0.2),
    "label": lambda g, G, N, M: dict(q_labels=torch.randint(0, 3, (G, N), generator=g),
                                     k_labels=torch.randint(0, 3, (G, M), generator=g)),
}


def test_patch_catches_our_syncs(no_sync):
    """The patch can fail: with the checks on, the value checks read τ, pos_index and positions back."""
    g, q, k = _inputs()
    tau = torch.tensor(0.1, requires_grad=True)
    for rule in ("pos_index", "radius"):
        with pytest.raises(HostSync):
            grouped_info_nce(q, k, temperature=tau, impl="triton", check_inputs=True, **RULES[rule](g, 2, 24, 31))


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_forward_backward_without_host_reads(rule, normalize, no_sync):
    g, q, k = _inputs(seed=1)
    tau = torch.tensor(0.1, requires_grad=True)
    kw = dict(q_valid=torch.rand(2, 24, generator=g) > 0.2, **RULES[rule](g, 2, 24, 31))
    res = grouped_info_nce(q, k, temperature=tau, impl="triton", check_inputs=False, normalize=normalize, **kw)
    res.loss.backward()
    # the same values as the checked torch implementation on copies of the inputs
    no_sync.on = False
    q2, k2, tau2 = (t.detach().clone().requires_grad_() for t in (q, k, tau))
    ref = grouped_info_nce(q2, k2, temperature=tau2, impl="torch", normalize=normalize, check_inputs=True, **kw)
    ref.loss.backward()
    assert torch.allclose(res.loss, ref.loss, rtol=1e-5)
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (tau.grad, tau2.grad)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_cuda_default_mode_through_the_losses(monkeypatch, no_sync):
    """check_inputs=None as on CUDA (checks off), through the losses MACL calls every step: a learnable τ in
    `PositionalSupConLoss` and the dense location term with positions, forward and backward."""
    monkeypatch.setattr(api, "checks_enabled", lambda check_inputs, device: bool(check_inputs))
    from macl.settings.config import MethodConfig
    from macl.methods.macl import dense_loss, global_loss
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(6, 2, 16, generator=g, requires_grad=True)
    pos = torch.rand(6, generator=g)
    crit = PositionalSupConLoss(threshold=0.3, temperature=0.1, learn_temperature=True, impl="triton")
    loss = crit(feats, pos)
    cfg = MethodConfig(name="macl", impl="triton")
    p1 = torch.randn(6, 8, 3, 3, generator=g, requires_grad=True)
    p2 = torch.randn(6, 8, 3, 3, generator=g, requires_grad=True)
    z1, z2 = torch.randn(6, 16, generator=g, requires_grad=True), torch.randn(6, 16, generator=g, requires_grad=True)
    total = loss + dense_loss(p1, p2, pos, cfg) + global_loss(z1, z2, pos, cfg)
    total.backward()
    assert crit.temperature.grad is not None and torch.isfinite(crit.temperature.grad)
    assert all(torch.isfinite(t.grad).all() for t in (feats, p1, p2, z1, z2))


def test_checks_off_semantics():
    """With the checks off an invalid τ gives a NaN loss (no error, no sync); None means on for CPU."""
    g, q, k = _inputs(seed=3)
    pi = torch.randint(0, 31, (2, 24), generator=g)
    bad = torch.tensor(-0.1)
    res = grouped_info_nce(q, k, temperature=bad, pos_index=pi, impl="triton", check_inputs=False)
    assert torch.isnan(res.loss)
    with pytest.raises(ValueError, match="temperature"):
        grouped_info_nce(q, k, temperature=bad, pos_index=pi, impl="triton")
    with pytest.raises(ValueError, match="pos_index"):
        grouped_info_nce(q, k, pos_index=pi + 31, impl="triton")
    with pytest.raises(ValueError, match="non-finite"):
        positional_sup_con(q[0].detach(), torch.full((24,), float("nan")), 0.1, impl="triton")
    with pytest.raises(TypeError, match="check_inputs"):
        grouped_info_nce(q, k, pos_index=pi, check_inputs="no")


def test_checks_off_out_of_range_pos_index_is_memory_safe_in_triton():
    """Unchecked, an out-of-range pos_index makes that anchor positive-less in the Triton kernels."""
    g, q, k = _inputs(seed=4)
    pi = torch.randint(0, 31, (2, 24), generator=g)
    pi[0, :5] = 31 + torch.arange(5)
    res = grouped_info_nce(q, k, pos_index=pi, impl="triton", check_inputs=False, reduction="none")
    assert (res.pos_count[0, :5] == 0).all() and (res.loss[0, :5] == 0).all() and (res.pos_count[:, 5:] == 1).all()
