"""What is benchmarked: losses, implementations, inputs, the work model, and the size grids.

A `Case` is one (loss, implementation, phase, shape, dtype, device). `make_inputs` builds its seeded inputs
(raw features; every implementation normalises them itself), `make_fn` the callable that computes the loss,
`work` its GEMM flops and exponentials (KERNELS.md §6), and `grid` the list of cases of a preset.

Losses (τ = 0.1, threshold = 0.1):
  info_nce            q, k (N, D); positive of anchor i = key i                      x-axis: N
  nt_xent             z1, z2 (B, D): SimCLR over 2B embeddings                       x-axis: 2B
  sup_con             features (B, 2, D), labels (B,) from `classes` classes         x-axis: 2B
  positional_sup_con  features (B, 2, D), positions (B,) uniform in [0, 1)           x-axis: 2B
  dense_info_nce      f1, f2 (B, C, S, S, S), negatives="image"                      x-axis: S³ voxels per image
  macl_location       f1, f2 (B, C, H, H), positions (B,): MACL's location term      x-axis: H² locations
                      (dense_info_nce negatives="location": H² groups of 2B)
Implementations:
  reference, torch, triton (CUDA only)  macl_kernels with impl=...
  naive                                 straightforward PyTorch (benchmarks/naive.py)
  compile                               torch.compile of naive
  monai, lightly, pml                   the peers (benchmarks/peers.py), nt_xent / sup_con
  pcl                                   the public PCL loss, transcribed (positional_sup_con)
  macl_loop                             the public MACL code's per-location Python loop (macl_location)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

TAU = 0.1
THRESHOLD = 0.1
PHASES = ("forward", "forward+backward")
LOSSES = ("info_nce", "nt_xent", "sup_con", "positional_sup_con", "dense_info_nce", "macl_location")
OURS = ("reference", "torch", "triton")
#: implementations of each loss besides OURS, naive and compile
EXTRA_IMPLS = {"nt_xent": ("monai", "lightly", "pml"), "sup_con": ("pml",),
               "positional_sup_con": ("pcl",), "macl_location": ("macl_loop",)}
#: the x-axis of each loss's plots
X_LABEL = {"info_nce": "N = M (anchors = keys)", "nt_xent": "embeddings 2B", "sup_con": "embeddings 2B",
           "positional_sup_con": "embeddings 2B", "dense_info_nce": "voxels per image S³",
           "macl_location": "locations H·W"}


@dataclass(frozen=True)
class Case:
    """One benchmark case. dims: the loss's shape parameters as sorted (name, value) pairs."""
    loss: str
    impl: str
    phase: str
    dims: tuple
    dtype: str = "float32"
    device: str = "cpu"
    budget_s: float = 60.0          # time allowed for the warm-up and timed calls (child killed past it)
    max_reps: int = 20
    warmup: bool = True
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def d(self) -> dict:
        return dict(self.dims)

    @property
    def shape(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.dims)

    def to_json(self) -> dict:
        return dict(loss=self.loss, impl=self.impl, phase=self.phase, dims=[list(x) for x in self.dims],
                    dtype=self.dtype, device=self.device, budget_s=self.budget_s, max_reps=self.max_reps,
                    warmup=self.warmup)

    @staticmethod
    def from_json(j: dict) -> "Case":
        return Case(j["loss"], j["impl"], j["phase"], tuple(tuple(x) for x in j["dims"]), j["dtype"],
                    j["device"], j["budget_s"], j["max_reps"], j["warmup"])


def dims(**kw) -> tuple:
    return tuple(sorted(kw.items()))


# ------------------------------------------------------------------------------------------- work model

def problem(loss: str, d: dict) -> tuple:
    """(G, N, M, D) of the core operation the loss runs (one direction)."""
    if loss == "info_nce":
        return 1, d["N"], d["N"], d["D"]
    if loss in ("nt_xent", "sup_con", "positional_sup_con"):
        return 1, 2 * d["B"], 2 * d["B"], d["D"]
    if loss == "dense_info_nce":
        L = d["S"] ** 3
        return d["B"], L, L, d["C"]
    if loss == "macl_location":
        return d["H"] ** 2, 2 * d["B"], 2 * d["B"], d["C"]
    raise ValueError(f"unknown loss {loss!r}")


def work(loss: str, d: dict) -> tuple:
    """(flops of one GEMM unit = 2·G·N·M·D, exponentials of one exp pass = G·N·M)."""
    G, N, M, D = problem(loss, d)
    return 2.0 * G * N * M * D, float(G * N * M)


def x_value(loss: str, d: dict) -> int:
    """The plots' x-axis value of a shape (see X_LABEL)."""
    G, N, M, D = problem(loss, d)
    return G if loss == "macl_location" else N


# ------------------------------------------------------------------------------------ inputs, callables

def make_inputs(loss: str, d: dict, dtype, device, seed: int = 0):
    """(features: list of tensors that require grad, meta: dict of other inputs), seeded, on `device`."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def feat(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    if loss == "info_nce":
        return [feat(d["N"], d["D"]), feat(d["N"], d["D"])], {}
    if loss == "nt_xent":
        return [feat(d["B"], d["D"]), feat(d["B"], d["D"])], {}
    if loss == "sup_con":
        return [feat(d["B"], 2, d["D"])], {"labels": torch.randint(0, d["classes"], (d["B"],), generator=g).to(device)}
    if loss == "positional_sup_con":
        return [feat(d["B"], 2, d["D"])], {"positions": torch.rand(d["B"], generator=g).to(device)}
    if loss == "dense_info_nce":
        s = (d["B"], d["C"], d["S"], d["S"], d["S"])
        return [feat(*s), feat(*s)], {}
    if loss == "macl_location":
        s = (d["B"], d["C"], d["H"], d["H"])
        return [feat(*s), feat(*s)], {"positions": torch.rand(d["B"], generator=g).to(device)}
    raise ValueError(f"unknown loss {loss!r}")


def _ours(loss: str, impl: str) -> Callable:
    import macl_kernels as mk
    if loss == "info_nce":
        return lambda q, k: mk.info_nce(q, k, temperature=TAU, impl=impl)
    if loss == "nt_xent":
        return lambda z1, z2: mk.nt_xent(z1, z2, temperature=TAU, impl=impl)
    if loss == "sup_con":
        return lambda f, labels: mk.sup_con(f, labels, temperature=TAU, impl=impl)
    if loss == "positional_sup_con":
        return lambda f, positions: mk.positional_sup_con(f, positions, THRESHOLD, temperature=TAU, impl=impl)
    if loss == "dense_info_nce":
        return lambda f1, f2: mk.dense_info_nce(f1, f2, negatives="image", temperature=TAU, impl=impl)
    if loss == "macl_location":
        return lambda f1, f2, positions: mk.dense_info_nce(f1, f2, negatives="location", temperature=TAU,
                                                           positions=positions, threshold=THRESHOLD, impl=impl)
    raise ValueError(f"unknown loss {loss!r}")


def _naive(loss: str) -> Callable:
    from . import naive as nv
    return {
        "info_nce": lambda q, k: nv.naive_info_nce(q, k, TAU),
        "nt_xent": lambda z1, z2: nv.naive_nt_xent(z1, z2, TAU),
        "sup_con": lambda f, labels: nv.naive_sup_con(f, labels, TAU),
        "positional_sup_con": lambda f, positions: nv.naive_positional_sup_con(f, positions, TAU, THRESHOLD),
        "dense_info_nce": lambda f1, f2: nv.naive_dense_image(f1, f2, TAU),
        "macl_location": lambda f1, f2, positions: nv.naive_macl_location(f1, f2, positions, TAU, THRESHOLD),
    }[loss]


def make_fn(loss: str, impl: str) -> Callable:
    """fn(*features, **meta) -> 0-d loss, for `impl` (see the module docstring)."""
    if impl in OURS:
        return _ours(loss, impl)
    if impl == "naive":
        return _naive(loss)
    if impl == "compile":
        import torch
        return torch.compile(_naive(loss), dynamic=False)
    if impl == "pcl" and loss == "positional_sup_con":
        from .naive import pcl_sup_con
        return lambda f, positions: pcl_sup_con(f, positions, TAU, THRESHOLD)
    if impl == "macl_loop" and loss == "macl_location":
        from .naive import macl_location_loop
        return lambda f1, f2, positions: macl_location_loop(f1, f2, positions, TAU, THRESHOLD)
    if impl in ("monai", "lightly", "pml"):
        from .peers import peer_fn
        return peer_fn(impl, loss, TAU)
    raise ValueError(f"no implementation {impl!r} of {loss!r}")


def impls_of(loss: str) -> tuple:
    return OURS + ("naive", "compile") + EXTRA_IMPLS.get(loss, ())


#: a small shape of each loss, for the equivalence check that runs before every timing
CHECK_DIMS = {
    "info_nce": dims(N=48, D=24),
    "nt_xent": dims(B=24, D=24),
    "sup_con": dims(B=24, D=24, classes=5),
    "positional_sup_con": dims(B=24, D=24),
    "dense_info_nce": dims(B=2, C=16, S=3),
    "macl_location": dims(B=4, C=16, H=3),
}
