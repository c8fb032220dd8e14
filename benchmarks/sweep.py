"""The benchmark sweep: every case in a fresh subprocess, one CSV row per case.

    python -m benchmarks.sweep                          # CPU: the full preset (< 20 min on 2 cores: cases not
                                                        # started within 15 min are recorded as skipped)
    python -m benchmarks.sweep --preset quick           # a couple of minutes
    python -m benchmarks.sweep --loss nt_xent --impl torch monai --list
    benchmarks/.peers-env/bin/python -m benchmarks.sweep   # with the peers (see make_peers_env.sh)

Each case is checked against the reference on a small input, then timed (benchmarks/runner.py). Its status:
ok, out of memory (an allocation failed under the memory cap, or the process was killed), too slow (over
the case's time budget), skipped (a smaller size of the same implementation ran out of memory or time, or
the sweep's --time-limit-min was reached), mismatch (the check
failed: not timed), error, unavailable (peer not installed here, or no GPU).
Besides the cases, the CSV holds the limit of each (loss, shape, phase): on CPU "limit" rows (KERNELS.md §6,
rates measured before and after the cases, the better kept); on CUDA "roofline_h100" rows (readiness.py).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Optional

from .cases import Case, work, x_value
from .grids import grid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
COLUMNS = ["sweep_id", "machine", "cpu", "isa", "cpu_count", "threads", "python", "torch", "triton", "numpy", "macl_kernels",
           "impl_version", "device", "device_name", "loss", "shape", "x", "G", "N", "M", "D", "dtype", "impl", "phase",
           "status", "median_s", "p20_s", "p80_s", "reps", "warmup_s", "peak_mb", "extra_mb", "limit_s", "x_limit",
           "gflops_per_unit", "loss_value", "check_err", "check_grad_err", "budget_s", "wall_s", "load_avg", "detail"]
FAILED = ("out of memory", "too slow")
#: the full CPU preset stops starting cases after this many minutes (the target-bearing cases run first)
DEFAULT_CPU_LIMIT_MIN = 15.0  # + rate measurements and the last case: < 20 min in all
#: seconds a child may spend outside its budget (start-up, imports, the small-input check, compiles)
STARTUP_ALLOWANCE = 120.0


def environment(device: str) -> dict:
    """Machine and versions, the same for every row of a sweep."""
    import numpy
    import torch

    import macl_kernels
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else cpu
    from .host import host_info
    return dict(machine=platform.machine(), cpu=cpu, isa=host_info()["isa"], cpu_count=os.cpu_count(),
                threads=torch.get_num_threads(),
                python=platform.python_version(), torch=torch.__version__, triton=tv, numpy=numpy.__version__,
                macl_kernels=macl_kernels.__version__, device=device, device_name=name)


def case_row(case: Case, env: dict, sweep_id: str) -> dict:
    from .cases import problem
    G, N, M, D = problem(case.loss, case.d)
    unit, _ = work(case.loss, case.d)
    return dict(env, sweep_id=sweep_id, loss=case.loss, shape=case.shape, x=x_value(case.loss, case.d), G=G, N=N,
                M=M, D=D, dtype=case.dtype, impl=case.impl, phase=case.phase, budget_s=case.budget_s,
                gflops_per_unit=unit / 1e9, impl_version=_impl_version(case.impl))


def _impl_version(impl: str) -> str:
    if impl in ("monai", "lightly", "pml"):
        from .peers import peer_version
        return peer_version(impl)
    return ""


def run_child(case: Case, mem_cap_gb: float, allowance: float = STARTUP_ALLOWANCE,
              threads: Optional[int] = None) -> dict:
    """Run benchmarks.runner for `case` in a fresh process; the parsed result (status always set)."""
    cmd = [sys.executable, "-m", "benchmarks.runner", json.dumps(case.to_json()), "--mem-cap-gb", str(mem_cap_gb)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONWARNINGS="ignore")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=case.budget_s + allowance)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"status": "too slow", "detail": f"killed after {case.budget_s + allowance:g} s (budget + start-up)"}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    if proc.returncode in (-signal.SIGKILL, 137):
        return {"status": "out of memory", "detail": "killed (SIGKILL: the kernel's OOM killer?)"}
    tail = " | ".join(err.strip().splitlines()[-3:])[:300]
    return {"status": "error", "detail": f"exit {proc.returncode}: {tail}"}


def unavailable_reason(case: Case) -> Optional[str]:
    """Why a case cannot run in this environment (checked in the parent, no subprocess), or None."""
    if case.impl in ("monai", "lightly", "pml"):
        from .peers import peer_unavailable_reason
        return peer_unavailable_reason(case.impl)
    if case.device == "cuda" or case.impl == "triton":
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device here (Triton cases run on a GPU only)"
    return None


def _skip_reason(case: Case, failures: dict) -> Optional[str]:
    """Skip a larger size of an implementation that ran out of memory or time at a smaller one (same loss, D,
    dtype; a forward failure also skips forward+backward)."""
    key = (case.loss, case.impl, case.dtype, case.d.get("D", case.d.get("C")))
    x = x_value(case.loss, case.d)
    for (k, phase), (x0, status) in failures.items():
        if k == key and x >= x0 and (phase == case.phase or phase == "forward"):
            return f"{status} at the smaller size x={x0}"
    return None


def limit_rows(rows: list[dict], rates: dict, env: dict, sweep_id: str) -> list[dict]:
    """One 'limit' row per (loss, shape, dtype, phase) of the CPU sweep, and x_limit on every row."""
    from .limits import limit_seconds
    out, seen = [], set()
    for r in rows:
        if r["impl"] == "limit":
            continue
        unit = r["gflops_per_unit"] * 1e9
        exps = unit / (2 * r["D"])
        lim = limit_seconds(rates[r["D"]], unit, exps, r["phase"])
        r["limit_s"] = lim
        if r.get("status") == "ok" and r.get("median_s"):
            r["x_limit"] = r["median_s"] / lim
        key = (r["loss"], r["shape"], r["dtype"], r["phase"])
        if key not in seen:
            seen.add(key)
            rr = rates[r["D"]]
            base = {c: r[c] for c in ("loss", "shape", "x", "G", "N", "M", "D", "dtype", "phase", "gflops_per_unit")}
            out.append({**env, **base, "sweep_id": sweep_id, "impl": "limit", "status": "ok", "median_s": lim,
                        "p20_s": lim, "p80_s": lim, "limit_s": lim, "x_limit": 1.0,
                        "detail": f"KERNELS.md 6: 4 GEMM units + 2 exp passes (forward: 1 + 1) at "
                                  f"{rr['gemm_flops'] / 1e9:.0f} GFLOP/s and {rr['exp_per_s'] / 1e9:.2f} G exp/s in cache"})
    return out


def roofline_rows(rows: list[dict], env: dict, sweep_id: str) -> list[dict]:
    """CUDA sweep: the H100 roofline floor of each (loss, shape, dtype, phase), and x_limit against it."""
    from .roofline import phase_floor
    out, seen = [], set()
    for r in rows:
        G, N, M, D = r["G"], r["N"], r["M"], r["D"]
        floor = phase_floor(G, N, M, D, r["dtype"], r["phase"])["seconds"]
        r["limit_s"] = floor
        if r.get("status") == "ok" and r.get("median_s"):
            r["x_limit"] = r["median_s"] / floor
        key = (r["loss"], r["shape"], r["dtype"], r["phase"])
        if key not in seen:
            seen.add(key)
            out.append({**env, **{c: r[c] for c in ("loss", "shape", "x", "G", "N", "M", "D", "dtype", "phase",
                                                     "gflops_per_unit")},
                        "sweep_id": sweep_id, "impl": "roofline_h100", "status": "ok", "median_s": floor,
                        "limit_s": floor, "x_limit": 1.0, "detail": "H100 SXM roofline floor (benchmarks/roofline.py)"})
    return out


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c, "")) for c in COLUMNS})
    os.replace(tmp, path)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def select(cases: list[Case], losses, impls, phases, max_x: Optional[int]) -> list[Case]:
    return [c for c in cases if (not losses or c.loss in losses) and (not impls or c.impl in impls)
            and (not phases or c.phase in phases) and (max_x is None or x_value(c.loss, c.d) <= max_x)]


def sweep(cases: list[Case], csv_path: str, device: str, mem_cap_gb: float = 16.0, budget_scale: float = 1.0,
          threads: Optional[int] = None, time_limit_s: Optional[float] = None, log=print) -> list[dict]:
    """Run the cases (in order), write the CSV (after every case, and with the limit rows at the end).

    threads: CPU threads of every case and of the limit measurement (default: torch's default).
    time_limit_s: cases not started within this many seconds of the sweep's start are recorded as skipped."""
    import dataclasses

    if threads:
        import torch
        torch.set_num_threads(threads)

    sweep_id = datetime.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    env = environment(device)
    cpu = device == "cpu"
    rates_before = {}
    if cpu:
        from .limits import measure_rates
        rates_before = {D: measure_rates(D) for D in sorted({c.d.get("D", c.d.get("C")) for c in cases})}
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other jobs are running, timings will be "
            f"noisy (the tiled path suffers most from oversubscribed cores)")
    rows: list[dict] = []
    failures: dict = {}
    t_sweep = time.perf_counter()
    for i, case in enumerate(cases, 1):
        if budget_scale != 1.0:
            case = dataclasses.replace(case, budget_s=case.budget_s * budget_scale)
        row = case_row(case, env, sweep_id)
        row["load_avg"] = os.getloadavg()[0]          # 1-minute load average as the case starts: noise indicator
        t0 = time.perf_counter()
        reason = unavailable_reason(case)
        skip = _skip_reason(case, failures)
        if reason:
            res = {"status": "unavailable", "detail": reason}
        elif time_limit_s is not None and time.perf_counter() - t_sweep > time_limit_s:
            res = {"status": "skipped", "detail": f"the sweep's time limit ({time_limit_s:g} s) was reached"}
        elif skip:
            res = {"status": "skipped", "detail": skip}
        else:
            res = run_child(case, mem_cap_gb, threads=threads)
        row.update(res)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        if row["status"] in FAILED:
            k = ((case.loss, case.impl, case.dtype, case.d.get("D", case.d.get("C"))), case.phase)
            failures.setdefault(k, (x_value(case.loss, case.d), row["status"]))
        med = f"{row['median_s']:.4g} s" if row.get("median_s") else ""
        mem = f"{row['extra_mb']:.0f} MiB extra" if row.get("extra_mb") is not None and row.get("median_s") else ""
        log(f"[{i}/{len(cases)} {time.perf_counter() - t_sweep:6.0f} s] {case.loss} {case.shape} {case.dtype} "
            f"{case.impl} {case.phase}: {row['status']} {med} {mem} {row.get('detail', '')[:100]}".rstrip())
        write_csv(csv_path, rows)
    if cpu:
        from .limits import measure_rates
        rates = {}
        for D, before in rates_before.items():
            after = measure_rates(D)
            rates[D] = {k: max(before[k], after[k]) for k in before}
        rows = limit_rows(rows, rates, env, sweep_id) + rows
    else:
        rows = roofline_rows(rows, env, sweep_id) + rows
    write_csv(csv_path, rows)
    log(f"wrote {csv_path} ({len(rows)} rows) in {time.perf_counter() - t_sweep:.0f} s")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="full", choices=("full", "quick", "tiny"))
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    ap.add_argument("--loss", nargs="+", help="only these losses")
    ap.add_argument("--impl", nargs="+", help="only these implementations")
    ap.add_argument("--phase", nargs="+", choices=("forward", "forward+backward"))
    ap.add_argument("--max-x", type=int, help="only sizes whose x-axis value is at most this")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every case's time budget")
    ap.add_argument("--mem-cap-gb", type=float, default=16.0,
                    help="extra memory a CPU case may allocate before it counts as out of memory (default 16)")
    ap.add_argument("--time-limit-min", type=float,
                    help="record cases not started by then as skipped (default: 15 for the full CPU preset, so the "
                         "sweep ends within 20 minutes; 0: no limit)")
    ap.add_argument("--threads", type=int, help="CPU threads per case (OMP_NUM_THREADS); default: all cores")
    ap.add_argument("--csv", help="output (default benchmarks/results/sweep_<device>.csv)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    a = ap.parse_args(argv)
    if a.device is None:
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = select(grid(a.preset, a.device), a.loss, a.impl, a.phase, a.max_x)
    if a.list:
        for c in cases:
            print(f"{c.loss:20s} {c.shape:22s} {c.dtype:9s} {c.impl:10s} {c.phase:17s} budget {c.budget_s:g} s")
        print(f"{len(cases)} cases")
        return 0
    if a.time_limit_min is None and a.device == "cpu" and a.preset == "full":
        a.time_limit_min = DEFAULT_CPU_LIMIT_MIN
    path = a.csv or os.path.join(RESULTS, f"sweep_{a.device}.csv")
    sweep(cases, path, a.device, a.mem_cap_gb, a.budget_scale, a.threads,
          a.time_limit_min * 60 if a.time_limit_min else None, log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
