"""Ahead-of-time compile of every autotune candidate for sm_80 and sm_90, with no GPU (KERNELS.md §4).

One report per module (`run_report`, spawned workers, Triton's on-disk cache makes reruns fast): every
configuration of `shipped_configs()` (fp32 IEEE and TF32, fp16, bf16; D ∈ {16, 64, 120, 128, 256, 512, 1024};
size classes s16 / s32 / large; every candidate of each class) for both archs, each with one of the flag sets
of `aot.FLAG_SETS` in rotation (index / label / radius rules, learnable τ with the scale-gradient sum, key
masks, exclude_self; "keys without grad" launches fwd + dq, which these cover). One more test adds every other
flag set for the bf16 large-tile candidates at the target widths D ∈ {128, 256, 512}. Asserts: it compiles, no local memory or spill
instructions, shared memory within the arch's limit, tensor-core instructions where they must be, and, from the
TTGIR, that the 16-bit forward's key loop is software-pipelined without a full drain.
"""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from macl_kernels.triton.aot import FLAG_NAMES, cuobjdump_path, expects_wgmma, jobs_for, run_report  # noqa: E402
from macl_kernels.triton.config import shipped_configs  # noqa: E402

pytestmark = [pytest.mark.skipif(not os.path.exists(cuobjdump_path()), reason="Triton's bundled cuobjdump is missing"),
              pytest.mark.slow]


def _show(rows):
    return "\n".join(f"{r.phase} {r.dtype}/{r.precision} D={r.D} {r.size_class} sm_{r.arch} {r.flags} "
                     f"BM={r.BLOCK_M} BN={r.BLOCK_N} BD={r.BLOCK_D} BO={r.BLOCK_DOUT} w={r.num_warps} "
                     f"s={r.num_stages}: reg={r.registers} stack={r.stack} local={r.local} ldl={r.ldl} stl={r.stl} "
                     f"smem={r.shared} hmma={r.hmma} hgmma={r.hgmma} drains={r.key_loop_drains} {r.error or ''}"
                     for r in rows)


def _check(rows):
    bad = [r for r in rows if r.error is not None or r.registers <= 0]
    assert not bad, "failed to compile:\n" + _show(bad)
    bad = [r for r in rows if r.spills]
    assert not bad, "spills:\n" + _show(bad)
    bad = [r for r in rows if not r.smem_ok]
    assert not bad, "over the arch's shared memory:\n" + _show(bad)
    tc = [r for r in rows if r.dtype in ("fp16", "bf16") or r.precision == "tf32"]
    bad = [r for r in tc if r.arch == 80 and (r.hmma == 0 or r.hgmma != 0)]
    assert not bad, "no HMMA on sm_80:\n" + _show(bad)
    bad = [r for r in rows if expects_wgmma(r) and r.hgmma == 0]
    assert not bad, "no HGMMA on sm_90 for a 64-row block:\n" + _show(bad)
    bad = [r for r in tc if r.arch == 90 and r.dtype != "fp32" and not expects_wgmma(r) and r.hmma == 0]
    assert not bad, "16-bit sm_90 kernel without tensor cores:\n" + _show(bad)
    bad = [r for r in rows if r.dtype == "fp32" and r.precision == "ieee" and (r.hmma or r.hgmma)]
    assert not bad, "IEEE fp32 must not use TF32 MMA:\n" + _show(bad)


@pytest.fixture(scope="module")
def report():
    return run_report(archs=(80, 90), tf32=True)


def test_report_covers_every_candidate_on_both_archs(report):
    entries = shipped_configs()
    got = {(r.phase, r.dtype, r.precision, r.D, r.size_class, r.arch, r.BLOCK_M, r.BLOCK_N, r.num_warps,
            r.num_stages) for r in report}
    tl = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    want = {(e.phase, tl[e.dtype], e.precision, e.D, e.size_class, a, e.config.BLOCK_M, e.config.BLOCK_N,
             e.config.num_warps, e.config.num_stages) for e in entries for a in (e.arch,)}
    assert got == want
    assert len(report) == len(entries)
    assert {r.arch for r in report} == {80, 90}
    assert {r.D for r in report} == {16, 64, 120, 128, 256, 512, 1024}
    for phase in ("fwd", "dq", "dk", "dsym"):   # every flag set meets every phase
        assert {r.flags for r in report if r.phase == phase} == set(FLAG_NAMES)


def test_every_candidate_compiles_without_spills_with_tensor_cores(report):
    _check(report)


def test_forward_key_loop_is_pipelined_on_sm90(report):
    """bf16 (and fp16) forward, sm_90, D = 256 and 512 (q resident): async copies inside the key loop and no
    `async_wait {num = 0}` there (the only full drain is after the loop)."""
    rows = [r for r in report if r.phase == "fwd" and r.arch == 90 and r.dtype in ("bf16", "fp16")
            and r.size_class == "large" and r.D in (256, 512)]
    assert {r.D for r in rows if r.dtype == "bf16"} == {256, 512}
    bad = [r for r in rows if r.key_loop_drains is not False or r.key_loop_async == 0]
    assert not bad, "key loop not pipelined:\n" + _show(bad)


def test_forward_key_loop_is_pipelined_at_every_resident_d(report):
    """Both archs, every 16-bit large forward candidate with q resident (D ≤ 512) and rows 16-byte aligned.
    D = 120 is not async-pipelined: Triton only knows a stride is a multiple of 16 elements, and 120 is not
    (its loads stay synchronous; they still compile spill-free with tensor cores)."""
    rows = [r for r in report if r.phase == "fwd" and r.dtype in ("bf16", "fp16") and r.size_class == "large"
            and r.D <= 512 and r.D % 16 == 0]
    bad = [r for r in rows if r.key_loop_drains is not False or r.key_loop_async == 0]
    assert rows and not bad, "key loop not pipelined:\n" + _show(bad)


def test_full_flag_matrix_for_bf16_large_tiles_at_target_widths(report):
    """Every other flag set for the bf16 large-tile candidates at D ∈ {128, 256, 512} (the rotation compiled one)."""
    done = {(r.phase, r.dtype, r.precision, r.D, r.arch, r.flags, r.BLOCK_M, r.BLOCK_N, r.num_warps, r.num_stages)
            for r in report}
    tl = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    entries = [e for e in shipped_configs() if e.size_class == "large" and e.dtype == torch.bfloat16
               and e.D in (128, 256, 512)]
    todo = [t for t in jobs_for((80, 90), entries, full=True)
            if (t[0].phase, tl[t[0].dtype], t[2], t[0].D, t[1], t[3], t[0].config.BLOCK_M, t[0].config.BLOCK_N,
                t[0].config.num_warps, t[0].config.num_stages) not in done]
    rows = run_report(archs=(80, 90), entries=[t[0] for t in todo], full=True)
    rows = [r for r in rows if (r.phase, r.dtype, r.precision, r.D, r.arch, r.flags, r.BLOCK_M, r.BLOCK_N,
                                r.num_warps, r.num_stages) not in done]
    assert rows
    _check(rows)
