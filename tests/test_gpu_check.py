"""The one-shot GPU check's machinery on CPU (benchmarks/gpu_check.py): the dry run lists every case in
seconds, one failing case becomes a FAIL row while the others run, the time budget skips with SKIP(time),
and the correctness check itself passes a correct kernel and fails a perturbed one (interpreter)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check, roofline
from benchmarks.gpu_check_cases import (PHASES, RULES, SPEED_D, SPEED_N, TEST_DTYPES, CheckCase, all_cases,
                                        ceiling_tflops, run_core_test)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_lists_every_case_in_seconds():
    env = dict(os.environ, PYTHON=sys.executable)
    t0 = time.perf_counter()
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=60)
    took = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr
    assert took < 30, f"dry run took {took:.1f} s"
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ") and "DRY" in line]
    listed = {(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows}
    assert len(rows) == len(all_cases()) == len(listed)
    for N in SPEED_N:
        for D in SPEED_D:
            for phase in PHASES:
                for impl in ("triton", "naive", "compile"):
                    assert ("speed", f"{phase} N=M={N} D={D} bf16", impl) in listed
    for D in SPEED_D:
        assert ("speed", f"self-contrast forward+backward N={SPEED_N[0]} D={D} bf16", "triton") in listed
    for dt in TEST_DTYPES:
        for rule in RULES:
            assert ("test", f"{rule} {dt} learnable-tau", "triton") in listed
    names = " ".join(r[1] for r in rows)
    for what in ("keys-without-grad", "NaN-case", "in-core-normalize", "autocast", "sync-free"):
        assert what in names
    for impl in ("triton", "torch"):
        assert ("macl-step", "MACL step 2d", impl) in listed
    assert "estimated" in out.stdout.splitlines()[0]


def test_estimates_fit_the_default_budget():
    assert sum(c.est_s for c in all_cases()) < gpu_check.DEFAULT_BUDGET_S < 480


def _case(name, run, est=1.0, priority=0):
    return CheckCase("test", name, "triton", run, est, priority)


def test_a_failing_case_is_a_fail_row_and_the_rest_run():
    ran = []

    def ok(tag):
        def run():
            ran.append(tag)
            return dict(status="PASS")
        return run

    def boom():
        raise RuntimeError("first line\nthe last line says why")

    rows = gpu_check.run_cases([_case("a", ok("a")), _case("b", boom), _case("c", ok("c"), priority=-1)], 100)
    assert [r["case"] for r in rows] == ["a", "b", "c"]            # table order kept
    assert ran == ["c", "a"]                                       # priority order run
    assert rows[1]["status"] == "FAIL" and "RuntimeError: the last line says why" in rows[1]["detail"]
    assert rows[0]["status"] == rows[2]["status"] == "PASS"


def test_budget_skips_the_rest_with_skip_time():
    now = [0.0]

    def slow():
        now[0] += 6.0
        return dict(status="PASS")

    cases = [_case(str(i), slow, est=2.0) for i in range(4)]
    rows = gpu_check.run_cases(cases, budget_s=13.0, clock=lambda: now[0])
    assert [r["status"] for r in rows] == ["PASS", "PASS", "SKIP(time)", "SKIP(time)"]
    assert "12 s used of 13 s" in rows[2]["detail"]


def test_speedups_and_markdown():
    rows = [dict(section="speed", case="x", impl="triton", status="ok", ms=2.0, tflops=400.0, x_ceiling=0.5),
            dict(section="speed", case="x", impl="naive", status="ok", ms=5.0),
            dict(section="speed", case="x", impl="compile", status="SKIP(memory)", detail="a | b")]
    gpu_check.add_speedups(rows)
    assert rows[1]["triton_speedup"] == 2.5 and "triton_speedup" not in rows[2]
    md = gpu_check.markdown(rows, "hdr").splitlines()
    assert md[0] == "hdr" and md[2].startswith("| section |") and "2.50×" in md[5] and "a / b" in md[6]


def test_ceiling_is_the_compiled_code_model():
    """x_ceiling divides by the compiled kernels' predicted TFLOP/s (cached SASS analysis), not the loops'."""
    pytest.importorskip("triton")
    for phase in PHASES + ("self-contrast forward+backward",):
        want = roofline.compiled_phase(16384, 16384, 256, "bfloat16", phase)["effective_tflops"]
        assert ceiling_tflops(16384, 16384, 256, phase) == want > 0


def test_naive_planned_skip_and_compile_budget():
    """65536² naive PyTorch needs ~64 GiB of intermediates: planned as skipped on an 80 GB H100; the first
    Triton row of each D pays the compile + autotune estimate, later N only the re-tune."""
    from benchmarks.gpu_check_cases import TRITON_COMPILE_S, naive_fits, speed_estimate
    assert naive_fits(16384, 16384) and not naive_fits(65536, 65536)
    assert speed_estimate(65536, 128, "forward", "naive", False, True) < 1
    first = speed_estimate(16384, 256, "forward", "triton", True, False)
    later = speed_estimate(4096, 256, "forward", "triton", False, False)
    assert first >= TRITON_COMPILE_S > later


@pytest.fixture
def interpret(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_core_check_passes_a_correct_kernel(interpret):
    out = run_core_test(rule="label", dtype="bfloat16", N=30, M=41, D=20, device="cpu")
    assert out["status"] == "PASS" and "err/bound" in out["detail"]


def test_core_check_self_contrast_row_runs_the_dsym_kernel(interpret, monkeypatch):
    """The q-is-k float-τ rows check the one-kernel self-contrast backward (and fail when it is wrong)."""
    from macl_kernels.triton import autograd as ag
    phases = []
    orig = ag.launch_bwd
    monkeypatch.setattr(ag, "launch_bwd", lambda ph, *a, **kw: phases.append(ph) or orig(ph, *a, **kw))
    out = run_core_test(rule="index", dtype="float16", N=40, D=24, q_is_k=True, learn_tau=False, device="cpu")
    assert out["status"] == "PASS" and set(phases) == {"dsym"}

    def wrong(ph, q, k, scale, lse, cnt, grad, o, with_ds=False):
        dx, ds = orig(ph, q, k, scale, lse, cnt, grad, o, with_ds)
        return dx * 1.01, ds
    monkeypatch.setattr(ag, "launch_bwd", wrong)
    with pytest.raises(AssertionError, match="dq"):
        run_core_test(rule="index", dtype="float16", N=40, D=24, q_is_k=True, learn_tau=False, device="cpu")


def test_core_check_fails_a_perturbed_kernel(interpret, monkeypatch):
    from macl_kernels.triton import autograd as ag
    orig = ag.launch_fwd

    def off_by_a_bit(q, k, scale, o):
        loss, lse, cnt = orig(q, k, scale, o)
        return loss * (1 + 1e-3), lse, cnt

    monkeypatch.setattr(ag, "launch_fwd", off_by_a_bit)
    with pytest.raises(AssertionError, match="loss"):
        run_core_test(rule="index", dtype="float32", N=30, M=41, D=20, device="cpu")
