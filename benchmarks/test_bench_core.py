"""Ours (reference, torch, triton) vs naive PyTorch and torch.compile(naive), every loss, both phases."""
import pytest

from benchmarks.cases import PHASES, dims

SHAPES = {
    "info_nce": dims(N=2048, D=128),
    "nt_xent": dims(B=1024, D=128),
    "sup_con": dims(B=1024, D=128, classes=100),
    "positional_sup_con": dims(B=1024, D=128),
    "dense_info_nce": dims(B=2, C=64, S=12),
    "macl_location": dims(B=16, C=128, H=32),
}
IMPLS = ("reference", "torch", "triton", "naive", "compile")


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", list(SHAPES))
def test_core(bench_case, loss, impl, phase):
    bench_case(loss, impl, phase, SHAPES[loss], rounds=3 if impl == "compile" else 5)
