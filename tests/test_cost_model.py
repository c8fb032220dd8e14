"""The H100 cost model (benchmarks/roofline.py) counts what the kernels do, from their loops and tile sizes.

Independent check: the GEMM units and exponentials are recounted here from the configuration alone (every
program visits every tile of the other side once; one z dot per tile and, in the backward, one output dot of
BLOCK_DOUT columns per output chunk), and compared with the model; then the issue's acceptance: forward +
backward ≤ 5 GEMM units at D = 128, 256, 512 (bf16), and ceilings at 70% tensor-core efficiency ≥ the targets.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.roofline import TARGET_TFLOPS, ceilings, kernel_floor, phase_floor
from macl_kernels.triton.config import KernelConfig, choose_config


@pytest.mark.parametrize("D", [128, 256, 512])
def test_forward_backward_is_at_most_five_gemm_units(D):
    pf = phase_floor(1, 16384, 16384, D, "bfloat16", "forward+backward")
    assert pf["units"] <= 5.0 + 1e-9, [(k["kernel"], k["units"]) for k in pf["kernels"]]
    assert all(k["z_per_block"] == 1 for k in pf["kernels"])
    assert pf["exp_passes"] == pytest.approx(3.0)


@pytest.mark.parametrize("D", [16, 64, 120, 1024])
def test_tensor_core_backward_computes_z_once_per_block_at_every_d(D):
    for dtype, prec in (("bfloat16", "ieee"), ("float16", "ieee"), ("float32", "tf32")):
        for k in ("dq", "dk"):
            assert kernel_floor(k, 1, 4096, 4096, D, dtype, prec)["z_per_block"] == 1, (dtype, prec, k, D)


@pytest.mark.parametrize("N,D", [(16384, 256), (16384, 512), (65536, 256), (65536, 512)])
def test_ceilings_at_70_percent_meet_the_targets(N, D):
    for phase, target in TARGET_TFLOPS.items():
        c = ceilings(1, N, N, D, "bfloat16", phase)
        assert c[1.0] >= c[0.7] >= target, (phase, c)


@pytest.mark.parametrize("kernel,N,M,D", [("fwd", 1000, 1537, 123), ("dq", 1000, 1537, 123),
                                          ("dk", 300, 5000, 512), ("dq", 16384, 16384, 256)])
def test_units_recounted_from_the_configuration(kernel, N, M, D):
    cfg = choose_config(kernel, N, M, D, torch.bfloat16, arch=90)
    rt, kt = math.ceil(N / cfg.BLOCK_M), math.ceil(M / cfg.BLOCK_N)
    dpad = math.ceil(D / cfg.BLOCK_D) * cfg.BLOCK_D
    tiles = rt * kt * cfg.n_dout(D)
    flops = tiles * 2 * cfg.BLOCK_M * cfg.BLOCK_N * (dpad + (cfg.BLOCK_DOUT if kernel != "fwd" else 0))
    got = kernel_floor(kernel, 1, N, M, D, "bfloat16")
    assert got["flops"] == pytest.approx(flops)
    assert got["units"] == pytest.approx(flops / (2 * N * M * D))
    assert got["exps"] == pytest.approx(tiles * cfg.BLOCK_M * cfg.BLOCK_N)


def test_a_per_chunk_recompute_design_would_show_more_units(monkeypatch):
    """The model reads the tile sizes: a backward that splits D = 512 into 128-wide output chunks (the old
    design) is counted at 1 + 4 = 5 units per backward kernel (11 for forward + backward), not 2."""
    import benchmarks.roofline as rl
    old = {"fwd": KernelConfig(128, 64, 64, 0), "dq": KernelConfig(64, 64, 64, 128), "dk": KernelConfig(64, 64, 64, 128)}
    monkeypatch.setattr(rl, "_config", lambda phase, *a, **k: old[phase])
    pf = rl.phase_floor(1, 16384, 16384, 512, "bfloat16", "forward+backward")
    assert pf["units"] == pytest.approx(11.0)
    assert [k["z_per_block"] for k in pf["kernels"]] == [1, 4, 4]
