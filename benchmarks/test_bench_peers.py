"""The losses users have today (MONAI, lightly, pytorch-metric-learning, the public PCL code) next to ours,
at sizes every one of them survives. Run in the peers environment: benchmarks/make_peers_env.sh."""
import pytest

from benchmarks.cases import dims

CASES = [
    ("nt_xent", dims(B=256, D=128), ("torch", "naive", "monai", "lightly", "pml")),
    ("sup_con", dims(B=256, D=128, classes=10), ("torch", "naive", "pml")),
    ("positional_sup_con", dims(B=128, D=128), ("torch", "naive", "pcl")),
]


@pytest.mark.parametrize("loss,shape,impl", [(lo, s, i) for lo, s, impls in CASES for i in impls],
                         ids=[f"{lo}-{i}" for lo, _, impls in CASES for i in impls])
def test_peer(bench_case, loss, shape, impl):
    bench_case(loss, impl, "forward+backward", shape, rounds=3)
