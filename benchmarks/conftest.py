"""pytest-benchmark cases: `pytest benchmarks/ --benchmark-only`.

Every case first checks its implementation against macl_kernels' float64 reference on a small input
(benchmarks.runner.check_small: the loss, and the gradients for forward+backward), then times it.
On a CPU machine cases run in float32; with a CUDA GPU in bfloat16 on the GPU. Triton cases need a GPU;
peer cases need the peers environment (benchmarks/make_peers_env.sh); both are skipped otherwise.
Peak memory is not measured here: the sweep (python -m benchmarks.sweep) does it per case in a fresh process.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.cases import Case, make_fn, make_inputs
from benchmarks.runner import check_small

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"


def unavailable(impl: str):
    """Why `impl` cannot run here, or None."""
    if impl in ("monai", "lightly", "pml"):
        from benchmarks.peers import peer_unavailable_reason
        return peer_unavailable_reason(impl)
    if impl == "triton":
        if DEVICE != "cuda":
            return "Triton benchmark cases need a CUDA GPU"
        from macl_kernels.triton import triton_unavailable_reason
        return triton_unavailable_reason(torch.device("cuda"))
    return None


@pytest.fixture
def bench_case(benchmark):
    """bench_case(loss, impl, phase, dims, rounds=5): check against the reference, then time."""
    def go(loss: str, impl: str, phase: str, dims: tuple, rounds: int = 5):
        reason = unavailable(impl)
        if reason:
            pytest.skip(reason)
        case = Case(loss, impl, phase, dims, DTYPE, DEVICE)
        fn = make_fn(loss, impl)
        check = check_small(case, fn)          # raises benchmarks.runner.Mismatch: the test fails, untimed
        feats, meta = make_inputs(loss, case.d, getattr(torch, DTYPE), DEVICE)
        backward = phase == "forward+backward"

        def step():
            for f in feats:
                f.grad = None
            out = fn(*feats, **meta)
            if backward:
                out.backward()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out

        benchmark.group = f"{loss} {case.shape} {phase}"
        benchmark.extra_info.update(loss=loss, impl=impl, phase=phase, shape=case.shape, dtype=DTYPE,
                                    device=DEVICE, **{k: v for k, v in check.items() if v is not None})
        out = benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
        assert torch.isfinite(out.detach()).all()
        return out
    return go
