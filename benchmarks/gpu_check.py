"""One-shot GPU check: run it first whenever a GPU is at hand (docs/gpu_check.md).

    bash benchmarks/gpu_check.sh                 # ≤ 8 min on one H100 / H200: prints ONE table
    bash benchmarks/gpu_check.sh --dry-run       # any machine, seconds: every case it would run
    python -m benchmarks.gpu_check --budget 300 --only test,macl-step

The table (also written as CSV and markdown under benchmarks/results/) has one row per case: the CUDA test
subset under `torch.cuda.set_sync_debug_mode("error")`, the speed grid (Triton, naive PyTorch,
torch.compile; effective TFLOP/s and × the roofline ceiling), the MACL step with impl="triton" vs "torch",
peak memory. Every case runs inside its own try: a failure is a FAIL row and the others still run. A global
time budget skips the cases that would start after it (status SKIP(time)); cases run in priority order
(tests, the N = M = 16384 speed shapes, the MACL step, the other shapes) and print in table order.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time
import traceback
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
COLUMNS = ["section", "case", "impl", "status", "ms", "tflops", "x_ceiling", "triton_speedup", "peak_gib",
           "detail"]
DEFAULT_BUDGET_S = 450.0


def run_cases(cases: list, budget_s: float, clock: Callable[[], float] = time.perf_counter,
              log: Optional[Callable[[str], None]] = None) -> list:
    """Run `cases` in priority order within `budget_s` seconds; one row dict per case, in the given order.

    A case whose estimated time would end past the budget is not started (SKIP(time)); an exception in a
    case is caught and becomes status FAIL with the exception's last line (and where it was raised).
    """
    rows = [None] * len(cases)
    start = clock()
    for i in sorted(range(len(cases)), key=lambda j: (cases[j].priority, j)):
        c = cases[i]
        row = dict(section=c.section, case=c.name, impl=c.impl)
        elapsed = clock() - start
        if elapsed + c.est_s > budget_s:
            row.update(status="SKIP(time)", detail=f"{elapsed:.0f} s used of {budget_s:.0f} s")
        else:
            t0 = clock()
            try:
                row.update(c.run())
            except BaseException as e:   # one case must not stop the check (KeyboardInterrupt does)
                if isinstance(e, KeyboardInterrupt):
                    raise
                row.update(status="FAIL", detail=_describe(e))
            row.setdefault("detail", "")
            row["wall_s"] = clock() - t0
        rows[i] = row
        if log:
            log(_line(row))
    return rows


def _describe(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    ours = [f for f in tb if "macl" in f.filename or "benchmarks" in f.filename]
    where = f" at {os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else ""
    msg = (str(e).strip().splitlines() or [""])[-1][:160]
    return f"{type(e).__name__}: {msg}{where}"


def add_speedups(rows: list) -> None:
    """triton_speedup of a baseline row = its time / Triton's time on the same case (> 1: Triton faster)."""
    ours = {(r["section"], r["case"]): r.get("ms") for r in rows if r.get("impl") == "triton"}
    for r in rows:
        t = ours.get((r["section"], r["case"]))
        if r.get("impl") != "triton" and r.get("ms") and t:
            r["triton_speedup"] = r["ms"] / t


def _fmt(v, col: str) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return {"ms": f"{v:.3f}", "tflops": f"{v:.1f}", "x_ceiling": f"{v:.2f}", "triton_speedup": f"{v:.2f}×",
                "peak_gib": f"{v:.3f}"}.get(col, f"{v:.3g}")
    return str(v)


def _line(row: dict) -> str:
    return "  ".join(f"{c}={_fmt(row.get(c), c)}" for c in COLUMNS if row.get(c) not in (None, ""))


def markdown(rows: list, header: str) -> str:
    out = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c), c).replace("|", "/") for c in COLUMNS) + " |")
    return "\n".join(out) + "\n"


def environment() -> str:
    import torch
    try:
        import triton
        tv = triton.__version__
    except Exception as e:
        tv = f"not importable ({type(e).__name__})"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (f"gpu_check on {platform.node()}: {gpu}; torch {torch.__version__}, triton {tv}, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="list every case with its estimate; run nothing")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds (default %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated sections: test,speed,macl-step")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for gpu_check.csv / .md")
    args = ap.parse_args(argv)
    from benchmarks.gpu_check_cases import all_cases
    cases = all_cases()
    if args.only:
        keep = set(args.only.split(","))
        unknown = keep - {c.section for c in cases}
        if unknown:
            ap.error(f"unknown sections {sorted(unknown)}; known: test, speed, macl-step")
        cases = [c for c in cases if c.section in keep]
    if args.dry_run:
        rows = [dict(section=c.section, case=c.name, impl=c.impl, status="DRY",
                     detail=f"est {c.est_s:.0f} s, priority {c.priority}") for c in cases]
        print(markdown(rows, f"gpu_check --dry-run: {len(cases)} cases, estimated "
                             f"{sum(c.est_s for c in cases):.0f} s in total, budget {args.budget:.0f} s"))
        return 0
    import torch
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (use --dry-run to list the cases)", file=sys.stderr)
        return 2
    header = environment()
    print(header, flush=True)
    rows = run_cases(cases, args.budget, log=lambda s: print(s, flush=True))
    add_speedups(rows)
    table = markdown(rows, header)
    print()
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "gpu_check.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + ["wall_s"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    failed = sum(r["status"] in ("FAIL", "OOM") for r in rows)
    print(f"{failed} case(s) failed; wrote {args.out}/gpu_check.csv and gpu_check.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
