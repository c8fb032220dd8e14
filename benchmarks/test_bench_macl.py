"""MACL's location term (B = 16, 32×32 locations, D = 128), forward+backward: ours vs the public code's
per-location Python loop (benchmarks/naive.py: macl_location_loop) and a vectorised naive version.
Target (issue 5): ours ≥ 50× faster than the loop; the sweep reports the ratio."""
import pytest

from benchmarks.cases import dims

SHAPE = dims(B=16, C=128, H=32)


@pytest.mark.parametrize("impl", ["torch", "triton", "naive", "macl_loop"])
def test_macl_location(bench_case, impl):
    bench_case("macl_location", impl, "forward+backward", SHAPE, rounds=2 if impl == "macl_loop" else 5)
