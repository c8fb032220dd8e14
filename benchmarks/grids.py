"""The case lists of the sweep's presets.

- "full": the CPU sweep behind the README's performance table (under 20 minutes on 2 cores); on CUDA the
  GPU sweep (bfloat16 and float32, larger sizes, the Triton kernels).
- "quick": a few small sizes of every loss and implementation (a couple of minutes).
- "tiny": two cases, seconds (tests/test_benchmarks.py).
Sizes are chosen so that each target of the benchmark issue has its case (see benchmarks/README.md).
"""
from __future__ import annotations

from .cases import EXTRA_IMPLS, PHASES, Case, dims

FB = ("forward+backward",)


def _add(out: list, loss: str, shapes, impls, phases=PHASES, device="cpu", dtypes=("float32",), **kw) -> None:
    for shape in shapes:
        for impl in impls:
            for dtype in dtypes:
                for phase in phases:
                    out.append(Case(loss, impl, phase, shape, dtype, device, **kw))


def cpu_full() -> list[Case]:
    c: list[Case] = []
    # core InfoNCE: the torch path against the limit and naive PyTorch (targets at N = M = 16384)
    info = [dims(N=n, D=128) for n in (1024, 4096, 16384)]
    _add(c, "info_nce", info, ("torch", "naive"))
    _add(c, "info_nce", info[:2], ("reference",))
    _add(c, "info_nce", info[1:2], ("compile",), FB, budget_s=120)
    _add(c, "info_nce", [dims(N=16384, D=64), dims(N=16384, D=256)], ("torch", "naive"), FB)
    # nt_xent: MONAI at batch 1024, lightly at 8192 embeddings, ours at batch 65536
    nt = [dims(B=b, D=128) for b in (256, 1024, 4096)]
    _add(c, "nt_xent", nt, ("torch", "naive"))
    _add(c, "nt_xent", nt[:2], ("reference",))
    _add(c, "nt_xent", nt[1:2], ("compile",), FB, budget_s=120)
    _add(c, "nt_xent", nt, EXTRA_IMPLS["nt_xent"], FB)
    _add(c, "nt_xent", [dims(B=65536, D=128)], ("torch",), FB, budget_s=240, max_reps=1, warmup=False)
    _add(c, "nt_xent", [dims(B=65536, D=128)], ("naive",) + EXTRA_IMPLS["nt_xent"], FB, budget_s=60)
    # sup_con against pytorch-metric-learning
    sc = [dims(B=b, D=128, classes=100) for b in (512, 2048, 8192)]
    _add(c, "sup_con", sc, ("torch", "naive"))
    _add(c, "sup_con", sc[:1], ("reference",))
    _add(c, "sup_con", sc[1:2], ("compile",), FB, budget_s=120)
    _add(c, "sup_con", sc, ("pml",), FB)
    # positional SupCon (PCL) against the public PCL code
    ps = [dims(B=b, D=128) for b in (512, 2048, 8192)]
    _add(c, "positional_sup_con", ps, ("torch", "naive"))
    _add(c, "positional_sup_con", ps[:1], ("reference",))
    _add(c, "positional_sup_con", ps[1:2], ("compile",), FB, budget_s=120)
    small = [dims(B=128, D=128)]       # the public code holds an N×N×C tensor: small sizes only
    _add(c, "positional_sup_con", small, ("torch", "naive"), FB)
    _add(c, "positional_sup_con", small + ps[:1], ("pcl",), FB)
    # dense voxel InfoNCE: every voxel of two 32³ crops, B = 2, D = 64 (naive needs 4 GiB of logits per image)
    dn = [dims(B=2, C=64, S=s) for s in (16, 24, 32)]
    _add(c, "dense_info_nce", dn, ("torch", "naive"))
    _add(c, "dense_info_nce", dn[:1], ("reference",))
    _add(c, "dense_info_nce", dn[:1], ("compile",), FB, budget_s=120)
    # MACL's location term: B = 16, 32×32 locations, D = 128, against the public per-location loop
    ml = [dims(B=16, C=128, H=h) for h in (16, 32, 64)]
    _add(c, "macl_location", ml, ("torch", "naive"))
    _add(c, "macl_location", ml[:2], ("macl_loop",), budget_s=120)   # a Python loop over H² locations
    _add(c, "macl_location", ml[:2], ("reference",))
    _add(c, "macl_location", ml[1:2], ("compile",), FB, budget_s=120)
    # the cases behind the targets first; the float64 reference and torch.compile last (stable: sizes stay in
    # order), so that on a slow day the sweep's --time-limit-min drops the least informative cases
    return sorted(c, key=lambda case: case.impl in ("reference", "compile"))


def cpu_quick() -> list[Case]:
    c: list[Case] = []
    _add(c, "info_nce", [dims(N=n, D=128) for n in (512, 2048)], ("torch", "naive", "reference"))
    _add(c, "info_nce", [dims(N=512, D=128)], ("compile",), FB, budget_s=120)
    _add(c, "nt_xent", [dims(B=b, D=128) for b in (128, 512)], ("torch", "naive") + EXTRA_IMPLS["nt_xent"], FB)
    _add(c, "sup_con", [dims(B=256, D=128, classes=10)], ("torch", "naive", "pml"), FB)
    _add(c, "positional_sup_con", [dims(B=256, D=128)], ("torch", "naive", "pcl"), FB)
    _add(c, "dense_info_nce", [dims(B=2, C=64, S=s) for s in (8, 16)], ("torch", "naive"), FB)
    _add(c, "macl_location", [dims(B=16, C=128, H=h) for h in (8, 16)], ("torch", "naive", "macl_loop"), FB)
    return c


def tiny(device: str = "cpu") -> list[Case]:
    c: list[Case] = []
    _add(c, "info_nce", [dims(N=256, D=32)], ("torch",), ("forward",), device=device, budget_s=30, max_reps=3)
    _add(c, "nt_xent", [dims(B=64, D=32)], ("naive",), FB, device=device, budget_s=30, max_reps=3)
    return c


def cuda_full() -> list[Case]:
    c: list[Case] = []
    ours = ("triton", "torch", "naive")
    info = [dims(N=n, D=d) for n in (4096, 16384, 65536) for d in (128, 256, 512)]
    _add(c, "info_nce", info, ours, device="cuda", dtypes=("bfloat16",))
    _add(c, "info_nce", [dims(N=16384, D=128)], ours, device="cuda", dtypes=("float32",))
    _add(c, "info_nce", [dims(N=16384, D=256)], ("compile",), FB, device="cuda", dtypes=("bfloat16",),
         budget_s=180)
    nt = [dims(B=b, D=128) for b in (1024, 4096, 32768)]
    _add(c, "nt_xent", nt, ours, device="cuda", dtypes=("bfloat16",))
    _add(c, "nt_xent", nt, EXTRA_IMPLS["nt_xent"], FB, device="cuda", dtypes=("float32",))
    _add(c, "sup_con", [dims(B=b, D=128, classes=100) for b in (2048, 8192)], ours + ("pml",), FB,
         device="cuda", dtypes=("bfloat16",))
    _add(c, "positional_sup_con", [dims(B=b, D=128) for b in (2048, 8192)], ours + ("pcl",), FB,
         device="cuda", dtypes=("bfloat16",))
    _add(c, "dense_info_nce", [dims(B=2, C=64, S=s) for s in (32, 48)], ours, device="cuda",
         dtypes=("bfloat16",))
    _add(c, "macl_location", [dims(B=16, C=128, H=h) for h in (32, 64)], ours + ("macl_loop",), device="cuda",
         dtypes=("bfloat16",))
    return c


def grid(preset: str, device: str = "cpu") -> list[Case]:
    """The cases of `preset` ("full", "quick", "tiny") on `device` ("cpu" or "cuda")."""
    if preset == "tiny":
        return tiny(device)
    if device == "cuda":
        if preset == "full":
            return cuda_full()
        return [Case(x.loss, x.impl, x.phase, x.dims, "bfloat16", "cuda", x.budget_s, x.max_reps, x.warmup)
                for x in cpu_quick()] + [Case(x.loss, "triton", x.phase, x.dims, "bfloat16", "cuda")
                                         for x in cpu_quick() if x.impl == "torch"]
    if preset == "full":
        return cpu_full()
    if preset == "quick":
        return cpu_quick()
    raise ValueError(f"preset must be full, quick or tiny, got {preset!r}")
