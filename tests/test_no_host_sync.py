"""No host-device synchronisation in the Triton path's forward and backward (issue 11 item 4, issue 21 item 4).

`test_no_copies_or_host_reads_*` (issue 21) records, with a `TorchDispatchMode` plus a wrapper of
`Tensor.tolist` (which reads memory without dispatching), every operation that is a host-device transfer on
CUDA: tensors made from Python data (`aten.lift_fresh`: `torch.tensor`, `torch.as_tensor` of a list), reads of
a value to the host (`aten._local_scalar_dense`: `.item()`, `bool()`, `float()`, `int()`; `.tolist()`), operations
whose output size is read from values (`nonzero`, `unique`, `masked_select`, boolean indexing, `repeat_interleave`
without `output_size`), and copies between devices (`aten._to_copy` / `aten.copy_` whose source and destination devices differ: none can
happen on a CPU-only host, they count where a GPU runs the test). Each is attributed to the innermost Python
frame outside torch; those in `macl_kernels/` or `macl/methods/` fail the test. On CPU the first two kinds are
exactly what would be a copy or a sync on CUDA, so the test is meaningful without a GPU. It runs the five
losses (every positive rule, fixed and learnable τ, the modules) and the core with each rule, forward and
backward, on the Triton path (the CUDA path: the interpreter on CPU) with the input checks in their CUDA mode.

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


# ------------------------------------------------------------------ copy recording (issue 21 item 4)

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_aten = torch.ops.aten
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)


#: (file, function) of our code allowed to read a value on CPU, each with why it is no transfer on CUDA:
#: `_LossModule._tau` reads a fixed τ buffer with float() only when the buffer is NOT on a CUDA device (a CPU
#: scalar: no sync); on CUDA it passes the tensor on (losses.py).
HOST_ONLY = {("losses.py", "_tau")}


def _our_frame():
    """'file:line' of the innermost frame outside torch and this file, when it is in our code (and not in
    HOST_ONLY); else None."""
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith(_TORCH_DIR) or os.path.abspath(name) == _HERE):
            if (os.path.basename(name), f.f_code.co_name) in HOST_ONLY:
                return None
            return f"{name}:{f.f_lineno}" if name.startswith(OURS) else None
        f = f.f_back
    return None


#: operations whose output size depends on tensor values: on CUDA the host waits for the size (a sync)
_SIZE_FROM_VALUES = {_aten.nonzero.default, _aten._unique2.default, _aten.unique_dim.default,
                     _aten.unique_consecutive.default, _aten.masked_select.default}


class CopyRecorder(TorchDispatchMode):
    """Records (kind, op, where) for every host-device transfer our code makes (module docstring)."""

    def __init__(self):
        super().__init__()
        self.events: list = []

    def note(self, kind: str, what: str) -> None:
        where = _our_frame()
        if where is not None:
            self.events.append((kind, what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (_aten.lift_fresh.default, _aten.lift_fresh_copy.default):
            self.note("tensor from Python data", str(func))
        elif func is _aten._local_scalar_dense.default:
            self.note("value read to the host", str(func))
        elif func in _SIZE_FROM_VALUES or (func is _aten.index.Tensor and any(
                t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])) or (
                func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None):
            self.note("output size read from values", str(func))
        elif func is _aten._to_copy.default and kwargs.get("device") is not None \
                and torch.device(kwargs["device"]) != args[0].device:
            self.note(f"copy {args[0].device} -> {kwargs['device']}", str(func))
        elif func is _aten.copy_.default and args[0].device != args[1].device:
            self.note(f"copy {args[1].device} -> {args[0].device}", str(func))
        return func(*args, **kwargs)


@pytest.fixture
def copies(monkeypatch):
    """A `CopyRecorder` (enter it with `with copies:`), with Tensor.tolist reported to it too, and the input
    checks in their CUDA mode (off: they read values back by design)."""
    rec = CopyRecorder()
    orig = torch.Tensor.tolist

    def tolist(self, *a, **kw):
        rec.note("value read to the host", "Tensor.tolist")
        return orig(self, *a, **kw)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    monkeypatch.setattr(api, "checks_enabled", lambda check_inputs, device: bool(check_inputs))
    return rec


def _loss_cases():
    """name -> (builder(seed, learn_tau) -> (loss callable, leaves)): the five losses with their rules."""
    from macl_kernels import dense_info_nce, info_nce, nt_xent, sup_con
    from macl_kernels.losses import DenseInfoNCELoss, InfoNCELoss, NTXentLoss, SupConLoss

    def feats(g, *shape):
        return torch.randn(*shape, generator=g, requires_grad=True)

    def tau_of(learn):
        return torch.tensor(0.2, requires_grad=True) if learn else 0.2

    def nt(g, learn):
        a, b, t = feats(g, 6, 8), feats(g, 6, 8), tau_of(learn)
        return (lambda: nt_xent(a, b, temperature=t, impl="triton")), [a, b, t]

    def sc(g, learn):
        x, t, lab = feats(g, 5, 2, 8), tau_of(learn), torch.randint(0, 3, (5,), generator=g)
        return (lambda: sup_con(x, lab, temperature=t, impl="triton")), [x, t]

    def psc(g, learn):
        x, t, pos = feats(g, 5, 2, 8), tau_of(learn), torch.rand(5, generator=g)
        return (lambda: positional_sup_con(x, pos, 0.3, temperature=t, impl="triton")), [x, t]

    def ince(g, learn):
        q, k, t = feats(g, 6, 8), feats(g, 9, 8), tau_of(learn)
        idx = torch.randint(0, 9, (6,), generator=g)
        return (lambda: info_nce(q, k, idx, temperature=t, impl="triton")), [q, k, t]

    def ince_bank(g, learn):   # a no-grad memory bank, the default positive (index i)
        q, t = feats(g, 6, 8), tau_of(learn)
        bank = torch.randn(9, 8, generator=g)
        return (lambda: info_nce(q, bank, temperature=t, impl="triton")), [q, t]

    def dense(negatives, positions):
        def build(g, learn):
            f1, f2, t = feats(g, 2, 8, 3, 2), feats(g, 2, 8, 3, 2), tau_of(learn)
            mask = torch.rand(2, 3, 2, generator=g) > 0.2
            kw = dict(positions=torch.rand(2, generator=g), threshold=0.3) if positions else {}
            return (lambda: dense_info_nce(f1, f2, None if negatives == "location" else mask, negatives=negatives,
                                           temperature=t, impl="triton", symmetric=negatives == "image", **kw)), \
                [f1, f2, t]
        return build

    def module(cls, make_args):
        def build(g, learn):
            crit = cls(learn_temperature=learn, impl="triton")
            args = make_args(g)
            leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            return (lambda: crit(*args)), leaves + ([crit.temperature] if learn else [])
        return build

    return {
        "nt_xent/index": nt, "sup_con/label": sc, "positional_sup_con/radius": psc, "info_nce/index": ince,
        "info_nce/bank": ince_bank, "dense_info_nce/image": dense("image", False),
        "dense_info_nce/batch": dense("batch", False), "dense_info_nce/location-label": dense("location", False),
        "dense_info_nce/location-radius": dense("location", True),
        "NTXentLoss": module(NTXentLoss, lambda g: (feats(g, 4, 8), feats(g, 4, 8))),
        "SupConLoss": module(SupConLoss, lambda g: (feats(g, 4, 2, 8), torch.randint(0, 2, (4,), generator=g))),
        "PositionalSupConLoss": module(PositionalSupConLoss, lambda g: (feats(g, 4, 2, 8), torch.rand(4, generator=g))),
        "InfoNCELoss": module(InfoNCELoss, lambda g: (feats(g, 4, 8), feats(g, 6, 8))),
        "DenseInfoNCELoss": module(DenseInfoNCELoss, lambda g: (feats(g, 2, 8, 2, 2), feats(g, 2, 8, 2, 2))),
    }


LOSS_CASES = _loss_cases()

# On the code before issue 21 (s20, commit 9ba51f4) the 8 radius cases of the two tests below failed (8 failed,
# 37 passed), each with:
#   AssertionError: host-device transfers from our code: [('tensor from Python data', 'aten.lift_fresh.default',
#   '/tmp/hop/old/macl_kernels/positives.py:117')]
# (positives._radius_runs made torch.tensor(threshold, device=...) on every call: a host-to-device copy on CUDA).


@pytest.mark.parametrize("learn_tau", [False, True])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_no_copies_or_host_reads_in_the_losses(case, learn_tau, copies):
    g = torch.Generator().manual_seed(5)
    loss_fn, leaves = LOSS_CASES[case](g, learn_tau)
    leaves = [t for t in leaves if isinstance(t, torch.Tensor)]
    with copies:
        loss = loss_fn()
        grads = torch.autograd.grad(loss, leaves)
    assert copies.events == [], f"host-device transfers from our code: {copies.events}"
    assert torch.isfinite(loss) and all(torch.isfinite(t).all() for t in grads)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rule", list(RULES))
def test_no_copies_or_host_reads_in_the_core(rule, normalize, copies):
    """grouped_info_nce with each rule, masks, a learnable τ, reduction "mean" and "none"."""
    g, q, k = _inputs(seed=6)
    tau = torch.tensor(0.1, requires_grad=True)
    kw = dict(q_valid=torch.rand(2, 24, generator=g) > 0.2, k_valid=torch.rand(2, 31, generator=g) > 0.1,
              **RULES[rule](g, 2, 24, 31))
    with copies:
        for reduction in ("mean", "none"):
            res = grouped_info_nce(q, k, temperature=tau, impl="triton", normalize=normalize, reduction=reduction,
                                   **kw)
            torch.autograd.grad(res.loss.sum(), (q, k, tau))
    assert copies.events == [], f"host-device transfers from our code: {copies.events}"


def test_the_recorder_can_fail(copies):
    """Each kind of transfer is seen when our code makes it (here: the checks on, and a module-level call)."""
    g, q, k = _inputs(seed=7)
    with copies:
        grouped_info_nce(q, k, temperature=torch.tensor(0.1), impl="triton", check_inputs=True,
                         q_positions=torch.rand(2, 24, generator=g), k_positions=torch.rand(2, 31, generator=g),
                         threshold=0.2)
        from macl_kernels import positives
        positives.PositiveOperator   # (an attribute read is no transfer)
    kinds = {e[0] for e in copies.events}
    assert "value read to the host" in kinds   # float(τ), isfinite(...).all()
    rec = CopyRecorder()
    with rec:
        exec(compile("import torch\nt = torch.tensor([1.0, 0.0])\nt.tolist()\nt.nonzero()\nt[t > 0]\n"
                     "t.repeat_interleave(torch.ones(2, dtype=torch.long))", os.path.join(OURS[0], "fake.py"), "exec"))
    # (tolist is seen by the fixture's wrapper, not by the mode)
    assert [e[0] for e in rec.events] == ["tensor from Python data"] + ["output size read from values"] * 3


def test_distributed_gather_path_reduces_on_the_device(copies, monkeypatch):
    """With keys gathered (one metadata exchange per call, `GatherPlan.exchange`), the mean's global count stays
    on the device: no second host read per step (before: `.tolist()` of the all-reduced count and flags)."""
    from macl_kernels.distributed import core
    monkeypatch.setattr(core, "all_reduce_sum", lambda t, group, what="count": t * 2)   # two equal ranks
    rows_sum = torch.tensor(6.0)
    pos_count = torch.tensor([[1, 0, 2]], dtype=torch.int32)
    with copies:
        out = core._global_reduction(rows_sum, pos_count, None, 2, "mean", with_failures=False)
    assert copies.events == []
    assert out.item() == 6.0 * 2 / 4
    with copies:   # the local-keys path keeps its one read (the failure flags of every rank)
        core._global_reduction(rows_sum, pos_count, None, 2, "mean")
    assert [e[0] for e in copies.events] == ["value read to the host"]
