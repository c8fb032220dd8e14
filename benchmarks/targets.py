"""The issue's CPU targets, read off one sweep CSV: measured figure, target, met or missed.

    python -m benchmarks.targets                         # benchmarks/results/sweep_cpu.csv -> markdown table
    python -m benchmarks.targets --csv my.csv --out docs/bench/targets_cpu.md

Every figure comes from rows of the same sweep (same machine, same run). A target whose rows are missing or
not "ok" is reported as "not measured" with the statuses found, never as met.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FB = "forward+backward"


def _find(rows, loss, shape, impl, phase=FB) -> Optional[dict]:
    return next((r for r in rows if r["loss"] == loss and r["shape"] == shape and r["impl"] == impl
                 and r["phase"] == phase), None)


def _ok(r) -> bool:
    return r is not None and r["status"] == "ok" and r["median_s"] not in ("", None)


def _f(r, col) -> float:
    return float(r[col])


def _status(*rs) -> str:
    return ", ".join(f"{r['impl']}: {r['status']}" if r else "missing" for r in rs)


def evaluate(rows: list[dict]) -> list[dict]:
    """One dict per target: target, case, measured, goal, verdict ('met' / 'missed' / 'not measured')."""
    out = []

    def add(target, case, value, goal, ok, rs, fmt="{:.3g}"):
        if value is None:
            out.append(dict(target=target, case=case, measured=f"not measured ({_status(*rs)})", goal=goal,
                            verdict="not measured"))
        else:
            out.append(dict(target=target, case=case, measured=fmt.format(value), goal=goal,
                            verdict="met" if ok(value) else "missed"))

    for D in (64, 128, 256):
        shape = f"D={D},N=16384"
        t, n, lim = (_find(rows, "info_nce", shape, i) for i in ("torch", "naive", "limit"))
        case = f"info_nce N=M=16384 D={D} fwd+bwd"
        add("torch path vs CPU limit", case, _f(t, "median_s") / _f(lim, "median_s") if _ok(t) and _ok(lim) else None,
            "≤ 1.25×", lambda v: v <= 1.25, (t, lim), "{:.2f}×")
        add("torch path vs naive time", case, _f(t, "median_s") / _f(n, "median_s") if _ok(t) and _ok(n) else None,
            "≤ 0.35×", lambda v: v <= 0.35, (t, n), "{:.2f}×")
        add("torch path vs naive extra memory", case,
            _f(t, "extra_mb") / max(_f(n, "extra_mb"), 1e-9) if _ok(t) and _ok(n) else None,
            "≤ 2%", lambda v: v <= 0.02, (t, n), "{:.1%}")
    t, li = _find(rows, "nt_xent", "B=4096,D=128", "torch"), _find(rows, "nt_xent", "B=4096,D=128", "lightly")
    case = "nt_xent 8192 embeddings D=128 fwd+bwd"
    add("nt_xent vs lightly NTXentLoss, speed", case,
        _f(li, "median_s") / _f(t, "median_s") if _ok(t) and _ok(li) else None, "≥ 4× faster", lambda v: v >= 4,
        (t, li), "{:.1f}× faster")
    add("nt_xent vs lightly NTXentLoss, extra memory", case,
        _f(t, "extra_mb") / max(_f(li, "extra_mb"), 1e-9) if _ok(t) and _ok(li) else None, "≤ 0.05×",
        lambda v: v <= 0.05, (t, li), "{:.3f}×")
    t, mo = _find(rows, "nt_xent", "B=1024,D=128", "torch"), _find(rows, "nt_xent", "B=1024,D=128", "monai")
    add("nt_xent vs MONAI ContrastiveLoss, speed", "nt_xent batch 1024 D=128 fwd+bwd",
        _f(mo, "median_s") / _f(t, "median_s") if _ok(t) and _ok(mo) else None, "≥ 1000× faster",
        lambda v: v >= 1000, (t, mo), "{:.0f}× faster")
    big, mbig = _find(rows, "nt_xent", "B=65536,D=128", "torch"), _find(rows, "nt_xent", "B=65536,D=128", "monai")
    out.append(dict(target="runs at batch 65536, where MONAI cannot", case="nt_xent batch 65536 D=128 fwd+bwd",
                    measured=f"ours: {big['status'] if big else 'missing'}"
                             f"{' in %.1f s' % _f(big, 'median_s') if _ok(big) else ''}, "
                             f"MONAI: {mbig['status'] if mbig else 'missing'}"
                             f"{' (' + mbig['detail'][:60] + ')' if mbig and mbig['detail'] else ''}",
                    goal="ours ok, MONAI not", verdict="met" if _ok(big) and not _ok(mbig) and mbig else
                    ("missed" if big and mbig else "not measured")))
    d, lim = _find(rows, "dense_info_nce", "B=2,C=64,S=32", "torch"), _find(rows, "dense_info_nce", "B=2,C=64,S=32", "limit")
    case = "dense_info_nce two 32³ crops B=2 D=64 fwd+bwd"
    add("dense vs its CPU limit", case, _f(d, "median_s") / _f(lim, "median_s") if _ok(d) and _ok(lim) else None,
        "≤ 1.5×", lambda v: v <= 1.5, (d, lim), "{:.2f}×")
    add("dense extra memory", case, _f(d, "extra_mb") if _ok(d) else None, "≤ 256 MB",
        lambda v: v * 2**20 <= 256e6, (d,), "{:.0f} MiB")
    t, lp = _find(rows, "macl_location", "B=16,C=128,H=32", "torch"), _find(rows, "macl_location", "B=16,C=128,H=32", "macl_loop")
    add("MACL location term vs the public per-location loop", "B=16, 32×32 locations, D=128 fwd+bwd",
        _f(lp, "median_s") / _f(t, "median_s") if _ok(t) and _ok(lp) else None, "≥ 50× faster",
        lambda v: v >= 50, (t, lp), "{:.0f}× faster")
    return out


def markdown(results: list[dict], source: str) -> str:
    lines = [f"Targets from `{source}`:", "", "| target | case | measured | target value | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['case']} | {r['measured']} | {r['goal']} | {r['verdict']} |" for r in results]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=os.path.join(ROOT, "benchmarks", "results", "sweep_cpu.csv"))
    ap.add_argument("--out", help="also write the markdown table here")
    a = ap.parse_args(argv)
    with open(a.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    md = markdown(evaluate(rows), os.path.relpath(a.csv, ROOT))
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
