"""CPU benchmark of the torch path against naive PyTorch and the CPU limit, in ONE run, with the host.

    python benchmarks/bench_core_cpu.py                  # every size of issue 15 (about 10-15 min on 2 cores)
    python benchmarks/bench_core_cpu.py --skip-large     # the small losses only (about 1 min)
    python benchmarks/bench_core_cpu.py --monai          # also MONAI ContrastiveLoss at nt_xent B = 1024
    python benchmarks/bench_core_cpu.py --threads 1      # one thread (steadier on a shared machine)

What is timed: forward + backward, float32, τ = 0.1, normalize=True, raw random features.
- Losses at B ∈ {64, 256, 1024}, D = 128 (2B embeddings): `nt_xent`, `sup_con` (10 classes),
  `positional_sup_con` (positions uniform in [0, 1), threshold 0.1). "ours" = macl_kernels with impl="torch";
  "naive" = benchmarks/naive.py (one matmul, masks, cross-entropy / log-softmax, F.normalize). Both run in this
  process, interleaved call by call (so load from other jobs hits both alike); the median of each is reported.
- info_nce N = M = 16384, D = 128, normalize=True: "ours" (normalisation inside the core), "prenorm" (F.normalize
  outside the core, as before issue 15), "naive" (F.cross_entropy(q̂ k̂ᵀ/τ, arange(N))). Each runs in a fresh
  subprocess (its peak memory is its own: extra memory = the growth of resident memory's high-water mark after
  the inputs exist), in rounds ours, prenorm, naive, ours, ... (interleaved); the median over rounds is reported.
- "limit": KERNELS.md §6, 4 GEMM units + 2 exp passes at in-cache rates of torch.mm and torch.exp measured in
  this run (benchmarks/limits.py), next to each size; for the small sizes it is far below any eager code's
  fixed costs and only shows how far they dominate.
Every row carries the host (benchmarks/host.py): CPU model, ISA flags, threads, the load average at that moment.
Wall time and CPU time (time.process_time, all threads of the process) are both reported: on a shared machine a
process may get a fraction of a core, and CPU time is then the steadier measure of the work done.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.host import host_info, host_line  # noqa: E402
from benchmarks.limits import limit_seconds, measure_rates  # noqa: E402

DEFAULT_CSV = os.path.join(HERE, "results", "core_cpu.csv")
TAU, THRESHOLD = 0.1, 0.1
LOSSES = ("nt_xent", "sup_con", "positional_sup_con")
LARGE_IMPLS = ("ours", "prenorm", "naive")


# ------------------------------------------------------------------------------------------ small losses

def _loss_fns(loss: str, B: int, D: int):
    """(ours, naive, inputs) for one loss at batch B: callables that run forward + backward."""
    import torch

    import macl_kernels as mk
    from benchmarks import naive as nv
    g = torch.Generator().manual_seed(0)
    if loss == "nt_xent":
        z1 = torch.randn(B, D, generator=g).requires_grad_()
        z2 = torch.randn(B, D, generator=g).requires_grad_()
        return (lambda: mk.nt_xent(z1, z2, temperature=TAU, impl="torch"),
                lambda: nv.naive_nt_xent(z1, z2, TAU), [z1, z2])
    f = torch.randn(B, 2, D, generator=g).requires_grad_()
    if loss == "sup_con":
        labels = torch.randint(0, 10, (B,), generator=g)
        return (lambda: mk.sup_con(f, labels, temperature=TAU, impl="torch"),
                lambda: nv.naive_sup_con(f, labels, TAU), [f])
    pos = torch.rand(B, generator=g)
    return (lambda: mk.positional_sup_con(f, pos, THRESHOLD, temperature=TAU, impl="torch"),
            lambda: nv.naive_positional_sup_con(f, pos, TAU, THRESHOLD), [f])


def time_small(loss: str, B: int, D: int, min_time: float) -> dict:
    """Interleaved fwd+bwd timing of ours and naive; also checks that both give the same loss."""
    ours, naive, inputs = _loss_fns(loss, B, D)

    def step(fn):
        for x in inputs:
            x.grad = None
        out = fn()
        out.backward()
        return float(out.detach())

    a, b = step(ours), step(naive)  # warm-up, and the equivalence check
    if abs(a - b) > 1e-4 * max(1.0, abs(b)):
        raise SystemExit(f"{loss} B={B}: ours {a} != naive {b}")
    times = {"ours": [], "naive": []}
    cpu = {"ours": [], "naive": []}
    t_end = time.perf_counter() + min_time
    while len(times["ours"]) < 5 or (time.perf_counter() < t_end and len(times["ours"]) < 500):
        for name, fn in (("ours", ours), ("naive", naive)):
            t0, c0 = time.perf_counter(), time.process_time()
            step(fn)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"{k}_cpu": statistics.median(v) for k, v in cpu.items()})
    return out | {"reps": len(times["ours"])}


def time_monai(B: int, D: int) -> float:
    """One fwd+bwd call of MONAI's ContrastiveLoss on the same nt_xent problem (seconds)."""
    import torch
    from monai.losses import ContrastiveLoss
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(B, D, generator=g).requires_grad_()
    z2 = torch.randn(B, D, generator=g).requires_grad_()
    loss = ContrastiveLoss(temperature=TAU, batch_size=B)
    t0 = time.perf_counter()
    loss(z1, z2).backward()
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ large info_nce

def run_large(impl: str, N: int, D: int, reps: int) -> dict:
    """Child process: fwd+bwd of info_nce at N = M, normalize=True; times and extra memory (VmHWM growth)."""
    import torch
    import torch.nn.functional as F

    from macl_kernels import grouped_info_nce
    g = torch.Generator().manual_seed(0)
    q = torch.randn(N, D, generator=g).requires_grad_()
    k = torch.randn(N, D, generator=g).requires_grad_()
    target = torch.arange(N)

    def step():
        q.grad = k.grad = None
        if impl == "naive":
            loss = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / TAU, target)
        elif impl == "prenorm":
            loss = grouped_info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1), temperature=TAU,
                                    impl="torch").loss
        else:
            loss = grouped_info_nce(q, k, temperature=TAU, impl="torch", normalize=True).loss
        loss.backward()
        return float(loss.detach())

    with open("/proc/self/clear_refs", "w") as f:   # reset the high-water mark to the current resident size
        f.write("5")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    loss = step()   # warm-up (first touch of every buffer: its memory is counted, its time is not)
    warm = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    extra = (_status_kb("VmHWM") - base) * 1024
    return dict(impl=impl, loss=loss, times=times, cpu=cpu, warm_s=warm, extra_bytes=extra)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def large(N: int, D: int, rounds: int, reps: int, info: dict, rows: list, csv_path: str) -> None:
    results = {impl: [] for impl in LARGE_IMPLS}
    limits = []
    cpu_limits = []
    for r in range(rounds):
        rates = measure_rates(D)
        limits.append(limit_seconds(rates, 2.0 * N * N * D, float(N) * N))
        cpu_limits.append(limit_seconds(measure_rates(D, clock=time.process_time), 2.0 * N * N * D, float(N) * N))
        for impl in LARGE_IMPLS:
            out = subprocess.run([sys.executable, __file__, "--one", impl, str(N), str(D), "--reps", str(reps),
                                  "--threads", str(info["threads"])],
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
            if out.returncode != 0:
                raise SystemExit(f"{impl} N={N} D={D} failed:\n{out.stderr}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[impl].append(res)
            print(f"  round {r + 1} {impl}: {min(res['times']):.3f} s (min of {reps}; CPU {min(res['cpu']):.3f} s), extra "
                  f"{res['extra_bytes'] / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}", flush=True)
    limit, cpu_limit = min(limits), min(cpu_limits)
    losses = {impl: results[impl][0]["loss"] for impl in LARGE_IMPLS}
    assert max(losses.values()) - min(losses.values()) < 1e-4, losses
    med = {impl: statistics.median(min(x["times"]) for x in results[impl]) for impl in LARGE_IMPLS}
    cpu = {impl: statistics.median(min(x["cpu"]) for x in results[impl]) for impl in LARGE_IMPLS}
    mem = {impl: max(x["extra_bytes"] for x in results[impl]) for impl in LARGE_IMPLS}
    line = f"info_nce N=M={N} D={D} normalize=True fwd+bwd: limit {limit:.3f} s (in CPU time {cpu_limit:.3f} s)"
    for impl in LARGE_IMPLS:
        line += (f" | {impl} {med[impl]:.3f} s = {med[impl] / limit:.2f}x limit, {med[impl] / med['naive']:.2f}x "
                 f"naive (CPU time {cpu[impl]:.3f} s = {cpu[impl] / cpu_limit:.2f}x the CPU-time limit, "
                 f"{cpu[impl] / cpu['naive']:.2f}x naive), "
                 f"{mem[impl] / 2**20:.0f} MiB = {100 * mem[impl] / mem['naive']:.2f}% of naive's memory")
        rows.append(dict(info, host_load_end=os.getloadavg()[0], loss="info_nce", size=f"N=M={N},D={D}",
                         impl=impl, median_s=med[impl], cpu_s=cpu[impl], limit_s=limit, cpu_limit_s=cpu_limit,
                         x_cpu_limit=cpu[impl] / cpu_limit, x_limit=med[impl] / limit,
                         x_naive_time=med[impl] / med["naive"], extra_mb=mem[impl] / 2**20,
                         x_naive_mem=mem[impl] / mem["naive"], reps=f"{rounds} rounds x {reps}"))
    print(line, flush=True)
    _write(rows, csv_path)


# ------------------------------------------------------------------------------------------------ main

def _write(rows: list, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024], help="B of the small losses")
    ap.add_argument("--dim", type=int, default=128, help="feature dim D (default 128)")
    ap.add_argument("--n", type=int, default=16384, help="N = M of the large info_nce (default 16384)")
    ap.add_argument("--min-time", type=float, default=3.0, help="seconds of interleaved calls per small size")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the large case")
    ap.add_argument("--reps", type=int, default=2, help="timed calls per large-case subprocess (min taken)")
    ap.add_argument("--skip-large", action="store_true", help="only the small losses")
    ap.add_argument("--monai", action="store_true", help="also MONAI ContrastiveLoss, nt_xent B = 1024 (slow)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--csv", default=DEFAULT_CSV, help=f"output CSV (default {DEFAULT_CSV})")
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.one:
        impl, n, d = args.one
        print(json.dumps(run_large(impl, int(n), int(d), args.reps)))
        return 0

    info = host_info()
    print(host_line(info), flush=True)
    rows: list = []
    D = args.dim
    rates = measure_rates(D)
    for B in args.batches:
        N = 2 * B
        limit = limit_seconds(rates, 2.0 * N * N * D, float(N) * N)
        for loss in LOSSES:
            load = os.getloadavg()[0]
            t = time_small(loss, B, D, args.min_time)
            print(f"{loss:18s} B={B:5d} (2B={N}) fwd+bwd: ours {t['ours'] * 1e3:8.2f} ms, naive "
                  f"{t['naive'] * 1e3:8.2f} ms, ours/naive {t['ours'] / t['naive']:.2f} (CPU time "
                  f"{t['ours_cpu'] / t['naive_cpu']:.2f}), limit {limit * 1e3:.3f} ms (ours {t['ours'] / limit:.0f}x), "
                  f"{t['reps']} interleaved calls each, load {load:.1f}", flush=True)
            for impl in ("ours", "naive"):
                rows.append(dict(info, load_1min=load, loss=loss, size=f"B={B},D={D}", impl=impl,
                                 median_s=t[impl], cpu_s=t[f"{impl}_cpu"], limit_s=limit, x_limit=t[impl] / limit,
                                 x_naive_time=t[impl] / t["naive"],
                                 x_naive_cpu=t[f"{impl}_cpu"] / t["naive_cpu"], reps=t["reps"]))
            _write(rows, args.csv)
    if args.monai and 1024 in args.batches:
        ours = next(r["median_s"] for r in rows if r["loss"] == "nt_xent" and r["size"].startswith("B=1024,")
                    and r["impl"] == "ours")
        t_monai = time_monai(1024, D)
        print(f"nt_xent B=1024: MONAI ContrastiveLoss {t_monai:.2f} s (one call) = {t_monai / ours:.0f}x ours",
              flush=True)
        rows.append(dict(info, load_1min=os.getloadavg()[0], loss="nt_xent", size=f"B=1024,D={D}", impl="monai",
                         median_s=t_monai, x_naive_time=None, reps=1))
        _write(rows, args.csv)
    if not args.skip_large:
        large(args.n, D, args.rounds, args.reps, dict(info, load_1min=os.getloadavg()[0]), rows, args.csv)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
