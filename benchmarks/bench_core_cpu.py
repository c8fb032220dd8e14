"""CPU benchmark of the core operation's torch path against the CPU limit and naive PyTorch, in one run.

    python benchmarks/bench_core_cpu.py                      # N = M = 16384, D ∈ {64, 128, 256}
    python benchmarks/bench_core_cpu.py --n 8192 --dims 128 --reps 3

What is timed: forward + backward of InfoNCE (positive of anchor i = key i, q and k both need grad,
float32, τ = 0.1) on normalised random features.
- "torch":  macl_kernels.grouped_info_nce(q, k, impl="torch").
- "naive":  F.cross_entropy(q @ k.T / τ, arange(N)) with autograd (stores the N×M logits).
- "limit":  KERNELS.md §6: 4 GEMM units (2·N·M·D flops each) at the rate torch.mm reaches on
            cache-sized blocks (1024×D by D×1024, repeated) + 2 exp passes (N·M exponentials each) at the
            rate torch.exp reaches on a cache-sized block (512×1024, in place), both measured in this run.
Each implementation runs in a fresh subprocess so that its peak memory is its own: extra memory is the
growth of the process's max RSS across the timed calls (inputs excluded). Results go to a CSV.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.limits import _time, measure_limit  # noqa: E402  (shared with the sweep)

DEFAULT_CSV = os.path.join(HERE, "results", "core_cpu.csv")


def run_one(impl: str, N: int, D: int, reps: int) -> dict:
    """Child process: time forward+backward of one implementation; report times and extra memory."""
    import resource

    import torch
    import torch.nn.functional as F

    from macl_kernels import grouped_info_nce
    torch.manual_seed(0)
    q = F.normalize(torch.randn(N, D), dim=1).requires_grad_()
    k = F.normalize(torch.randn(N, D), dim=1).requires_grad_()
    target = torch.arange(N)

    def step():
        q.grad = k.grad = None
        if impl == "naive":
            loss = F.cross_entropy(q @ k.t() / 0.1, target)
        else:
            loss = grouped_info_nce(q, k, temperature=0.1, impl=impl).loss
        loss.backward()
        return loss

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # warm-up (also the first-touch cost, which the timed runs then avoid)
    times = _time(step, reps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(impl=impl, N=N, D=D, loss=float(loss), times=times, extra_bytes=peak - base)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384, help="N = M (default 16384)")
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], help="feature dims D")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per case (median reported)")
    ap.add_argument("--csv", default=DEFAULT_CSV, help=f"output CSV (default {DEFAULT_CSV})")
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "N", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        impl, n, d = args.one
        print(json.dumps(run_one(impl, int(n), int(d), args.reps)))
        return 0

    import torch
    rows = []
    for D in args.dims:
        limit = measure_limit(args.n, args.n, D)
        results = {}
        for impl in ("torch", "naive"):
            out = subprocess.run([sys.executable, __file__, "--one", impl, str(args.n), str(D),
                                  "--reps", str(args.reps)], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
            if out.returncode != 0:
                raise SystemExit(f"{impl} D={D} failed:\n{out.stderr}")
            results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        lim = measure_limit(args.n, args.n, D)  # measured again after: the limit is the better of the two
        if lim["seconds"] < limit["seconds"]:
            limit = lim
        assert abs(results["torch"]["loss"] - results["naive"]["loss"]) < 1e-4, results
        t_torch = statistics.median(results["torch"]["times"])
        t_naive = statistics.median(results["naive"]["times"])
        for impl, res in results.items():
            ts = sorted(res["times"])
            rows.append(dict(
                machine=platform.machine(), cpu_count=os.cpu_count(), torch=torch.__version__,
                threads=torch.get_num_threads(), N=args.n, M=args.n, D=D, dtype="float32", impl=impl,
                phase="forward+backward", median_s=statistics.median(ts), min_s=ts[0], max_s=ts[-1],
                extra_mb=res["extra_bytes"] / 2**20, limit_s=limit["seconds"],
                gemm_gflops=limit["gemm_gflops"], exp_gps=limit["exp_gps"],
                x_limit=statistics.median(ts) / limit["seconds"],
                x_naive_time=statistics.median(ts) / t_naive,
                x_naive_mem=res["extra_bytes"] / max(results["naive"]["extra_bytes"], 1)))
        print(f"D={D}: limit {limit['seconds']:.3f} s ({limit['gemm_gflops']:.0f} GFLOP/s, "
              f"{limit['exp_gps']:.2f} Gexp/s) | torch {t_torch:.3f} s = {t_torch / limit['seconds']:.2f}x limit, "
              f"{t_torch / t_naive:.2f}x naive time, "
              f"{results['torch']['extra_bytes'] / max(results['naive']['extra_bytes'], 1) * 100:.1f}% naive memory "
              f"({results['torch']['extra_bytes'] / 2**20:.0f} MiB vs {results['naive']['extra_bytes'] / 2**20:.0f} MiB)"
              f" | naive {t_naive:.3f} s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
