"""Keeps the benchmark machinery honest (benchmarks/): a tiny sweep in subprocesses, its CSV, the statuses
a case can end with, the equivalence check, the readiness report and the plots. Seconds, no timing claims."""
from __future__ import annotations

import csv
import importlib.util
import math

import pytest
import torch

from benchmarks.cases import Case, dims, make_fn, make_inputs
from benchmarks.grids import grid
from benchmarks.runner import Mismatch, check_small
from benchmarks.sweep import COLUMNS, run_child, sweep


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "tiny.csv"
    sweep(grid("tiny"), str(path), "cpu", log=lambda s: None)
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    with open(path, newline="") as f:
        return path, header, list(csv.DictReader(f))


def test_tiny_sweep_csv_has_every_column_and_a_row_per_case(tiny_csv):
    _, header, rows = tiny_csv
    assert header == COLUMNS
    cases = grid("tiny")
    timed = [r for r in rows if r["impl"] != "limit"]
    assert [(r["loss"], r["impl"], r["phase"]) for r in timed] == [(c.loss, c.impl, c.phase) for c in cases]
    for r in timed:
        assert r["status"] == "ok", r["detail"]
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["torch"] == torch.__version__
        p20, med, p80 = float(r["p20_s"]), float(r["median_s"]), float(r["p80_s"])
        assert 0 < p20 <= med <= p80
        assert float(r["peak_mb"]) > 50 and float(r["extra_mb"]) >= 0      # the child's whole RSS includes torch
        assert float(r["check_err"]) < 1e-4
        assert math.isclose(float(r["x_limit"]), med / float(r["limit_s"]), rel_tol=1e-3)


def test_tiny_sweep_loss_values_match_the_reference(tiny_csv):
    _, _, rows = tiny_csv
    for c in grid("tiny"):
        r = next(r for r in rows if (r["loss"], r["impl"], r["phase"]) == (c.loss, c.impl, c.phase))
        feats, meta = make_inputs(c.loss, c.d, torch.float64, "cpu")
        ref = float(make_fn(c.loss, "reference")(*feats, **meta).detach())
        assert math.isclose(float(r["loss_value"]), ref, rel_tol=1e-4), (c, r["loss_value"], ref)


def test_tiny_sweep_has_a_limit_row_per_shape_and_phase(tiny_csv):
    _, _, rows = tiny_csv
    timed = {(r["loss"], r["shape"], r["phase"]) for r in rows if r["impl"] != "limit"}
    limits = {(r["loss"], r["shape"], r["phase"]): r for r in rows if r["impl"] == "limit"}
    assert set(limits) == timed
    for r in limits.values():
        assert float(r["median_s"]) > 0 and "GFLOP/s" in r["detail"]


def test_a_case_over_the_memory_cap_is_out_of_memory():
    # naive InfoNCE at N = 8192 stores 256 MiB of logits: over a 64 MiB cap
    res = run_child(Case("info_nce", "naive", "forward", dims(N=8192, D=16), budget_s=60), mem_cap_gb=1 / 16)
    assert res["status"] == "out of memory", res


def test_a_case_over_its_budget_is_too_slow():
    res = run_child(Case("macl_location", "macl_loop", "forward+backward", dims(B=4, C=8, H=48), budget_s=0.2),
                    mem_cap_gb=4)
    assert res["status"] == "too slow", res


def test_the_equivalence_check_rejects_a_wrong_convention():
    case = Case("nt_xent", "naive", "forward+backward", dims(B=64, D=32))
    fn = make_fn("nt_xent", "naive")
    from benchmarks.naive import naive_nt_xent
    assert check_small(case, fn)["check_grad_err"] < 1e-3
    with pytest.raises(Mismatch):   # temperature 0.2 instead of 0.1
        check_small(case, lambda z1, z2: naive_nt_xent(z1, z2, 0.2))
    with pytest.raises(Mismatch):   # right value, wrong gradient
        check_small(case, lambda z1, z2: fn(z1.detach(), z2) + 0 * z1.sum())


def test_readiness_roofline_has_every_benchmark_shape_and_phase():
    from benchmarks.readiness import benchmark_shapes, render_markdown, roofline_table
    rows = roofline_table()
    shapes = benchmark_shapes()
    totals = {(r["loss"], r["shape"], r["dtype"], r["phase"]): r for r in rows if r["kernel"] == "total"}
    assert len(totals) == 2 * len(shapes)
    for key, r in totals.items():
        assert r["floor_ms"] > 0 and r["gflop"] > 0
        kernels = [x["kernel"] for x in rows if (x["loss"], x["shape"], x["dtype"], x["phase"]) == key
                   and x["kernel"] != "total"]
        assert kernels == (["fwd"] if key[3] == "forward" else ["fwd", "dq", "dk"])
    # the targets: bf16 N = M = 16384, D = 256 has a target time, and the floor is below it
    t = totals[("info_nce", "D=256,N=16384", "bfloat16", "forward+backward")]
    assert 0 < t["floor_ms"] < t["target_ms"]
    md = render_markdown(None, rows)
    assert "## 1. Ahead-of-time compile" in md and "## 2. Roofline" in md


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_readiness_aot_row_for_a_shipped_config():
    from benchmarks.readiness import aot_rows, aot_summary
    from macl_kernels.triton.config import shipped_configs
    entry = next(e for e in shipped_configs() if e.arch == 90 and e.phase == "fwd" and e.dtype == torch.bfloat16
                 and e.D == 128 and e.size_class == "large")
    rows = aot_rows((90,), entries=[entry], jobs=1, tf32=False)
    assert len(rows) == 1 and rows[0].error is None, rows
    assert rows[0].registers > 0 and rows[0].hgmma > 0 and not rows[0].spills
    assert aot_summary(rows) == dict(total=1, failed=0, spills=0, over_shared_memory=0, sm90_16bit_large_without_hgmma=0,
                                     sm80_tensor_dtype_without_hmma=0)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed")
def test_plot_writes_a_png_per_swept_loss(tiny_csv, tmp_path):
    from benchmarks.plot import main
    path, _, _ = tiny_csv
    assert main(["--csv", str(path), "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["cpu_info_nce.png", "cpu_nt_xent.png"]
    assert all((tmp_path / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_targets_are_read_off_the_sweep_rows():
    from benchmarks.targets import evaluate

    def row(loss, shape, impl, median, extra=0.0, status="ok", detail=""):
        return dict(loss=loss, shape=shape, impl=impl, phase="forward+backward", status=status,
                    median_s=str(median) if status == "ok" else "", extra_mb=str(extra), detail=detail)
    rows = [row("info_nce", "D=128,N=16384", "torch", 1.1, 10.0), row("info_nce", "D=128,N=16384", "limit", 1.0),
            row("info_nce", "D=128,N=16384", "naive", 2.0, 1000.0),
            row("nt_xent", "B=4096,D=128", "torch", 1.0, 1.0), row("nt_xent", "B=4096,D=128", "lightly", 3.0, 100.0),
            row("nt_xent", "B=65536,D=128", "torch", 60.0),
            row("nt_xent", "B=65536,D=128", "monai", 0, status="skipped", detail="out of memory at the smaller size")]
    res = {(r["target"], r["case"]): r for r in evaluate(rows)}
    case = "info_nce N=M=16384 D=128 fwd+bwd"
    assert res[("torch path vs CPU limit", case)]["verdict"] == "met"                # 1.1 ≤ 1.25
    assert res[("torch path vs naive time", case)]["verdict"] == "missed"            # 0.55 > 0.35
    assert res[("torch path vs naive extra memory", case)]["verdict"] == "met"       # 1% ≤ 2%
    assert res[("torch path vs CPU limit", "info_nce N=M=16384 D=64 fwd+bwd")]["verdict"] == "not measured"
    lightly = [r for r in res.values() if r["target"].startswith("nt_xent vs lightly")]
    assert [r["verdict"] for r in lightly] == ["missed", "met"]                      # 3× < 4×; 0.01 ≤ 0.05
    assert res[("runs at batch 65536, where MONAI cannot", "nt_xent batch 65536 D=128 fwd+bwd")]["verdict"] == "met"
