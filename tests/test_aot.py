"""Ahead-of-time compile of every shipped Triton configuration for sm_80 and sm_90, with no GPU.

One report per session (about 430 compiles on 2 cores: a few minutes cold, much less with Triton's cache
warm): every configuration `choose_config` can return, for fp32 (IEEE and TF32), fp16 and bf16 and
D ∈ {16, 64, 128, 256, 512, 1024}. Asserts: it compiles, no local memory and no spill instructions, tensor-core
instructions where they must be (HMMA on sm_80 for 16-bit and TF32, HGMMA on sm_90 for large 16-bit tiles).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

triton = pytest.importorskip("triton")

from macl_kernels.aot import cuobjdump_path, run_report  # noqa: E402
from macl_kernels.triton.config import (  # noqa: E402
    PHASES, SHIPPED_D, SHIPPED_DTYPES, SIZE_CLASSES, choose_config, shipped_configs)

pytestmark = pytest.mark.skipif(not os.path.exists(cuobjdump_path()),
                                reason="Triton's bundled cuobjdump is missing")


def _show(rows):
    return "\n".join(f"{r.phase} {r.dtype}/{r.precision} D={r.D} {r.size_class} sm_{r.arch} "
                     f"BM={r.BLOCK_M} BN={r.BLOCK_N} BD={r.BLOCK_D} BO={r.BLOCK_DOUT} w={r.num_warps}: "
                     f"reg={r.registers} stack={r.stack} local={r.local} ldl={r.ldl} stl={r.stl} "
                     f"hmma={r.hmma} hgmma={r.hgmma} {r.error or ''}" for r in rows)


@pytest.fixture(scope="module")
def report():
    return run_report(archs=(80, 90), tf32=True)


def test_report_covers_every_shipped_config(report):
    entries = shipped_configs()
    assert len(entries) == len(PHASES) * len(SHIPPED_DTYPES) * len(SHIPPED_D) * len(SIZE_CLASSES)
    n_fp32 = sum(e.dtype == torch.float32 for e in entries)
    assert len(report) == 2 * (len(entries) + n_fp32)     # two archs; fp32 also as TF32


def test_every_config_compiles(report):
    bad = [r for r in report if r.error is not None or r.registers <= 0]
    assert not bad, "failed to compile:\n" + _show(bad)


def test_no_local_memory_or_spills(report):
    bad = [r for r in report if r.local != 0 or r.stack != 0 or r.ldl or r.stl]
    assert not bad, "spills:\n" + _show(bad)


def test_hmma_on_sm80_for_tensor_core_dtypes(report):
    rows = [r for r in report if r.arch == 80 and (r.dtype in ("fp16", "bf16") or r.precision == "tf32")]
    assert rows
    bad = [r for r in rows if r.hmma == 0 or r.hgmma != 0]
    assert not bad, "no HMMA on sm_80:\n" + _show(bad)


def test_hgmma_on_sm90_for_large_16bit_tiles(report):
    rows = [r for r in report if r.arch == 90 and r.dtype in ("fp16", "bf16") and r.size_class == "large"]
    assert rows
    bad = [r for r in rows if r.hgmma == 0]
    assert not bad, "no HGMMA on sm_90:\n" + _show(bad)
    # small tiles (M < 64) cannot use wgmma; they must still use tensor cores
    small = [r for r in report if r.arch == 90 and r.dtype in ("fp16", "bf16") and r.size_class != "large"]
    assert all(r.hmma > 0 for r in small), _show([r for r in small if r.hmma == 0])


def test_ieee_fp32_stays_off_tensor_cores(report):
    rows = [r for r in report if r.dtype == "fp32" and r.precision == "ieee"]
    assert rows and all(r.hmma == 0 and r.hgmma == 0 for r in rows), "IEEE fp32 must not use TF32 MMA"


def test_backward_recomputes_z_with_the_forward_chunking():
    for dtype in SHIPPED_DTYPES:
        for D in SHIPPED_D:
            for N, M in [(16, 16), (32, 32), (4096, 4096), (7, 5000)]:
                bd = {choose_config(ph, N, M, D, dtype).BLOCK_D for ph in PHASES}
                assert len(bd) == 1, (dtype, D, N, M, bd)


def test_chooser_returns_only_shipped_configs():
    shipped = {(e.phase, e.dtype, e.D, e.config) for e in shipped_configs()}
    rnd = random.Random(0)
    for _ in range(300):
        phase, dtype, D = rnd.choice(PHASES), rnd.choice(SHIPPED_DTYPES), rnd.choice(SHIPPED_D)
        N, M = rnd.choice([1, 7, 16, 17, 32, 33, 100, 5000]), rnd.choice([1, 9, 16, 31, 32, 64, 4097])
        assert (phase, dtype, D, choose_config(phase, N, M, D, dtype)) in shipped, (phase, dtype, D, N, M)
