"""The Gradient Filter of an earlier commit against this checkout's, both against the plain fused loss,
interleaved in ONE process (issue 16: the filter ≤ 2× the plain loss).

    python benchmarks/bench_filter_before_after.py --old 9a9b2d1 --threads 1,2 --reps 7

The old commit's `macl_kernels` is extracted with `git archive` into a temporary folder and imported under
another package name (its imports are relative), so both versions run on the same inputs in the same process:
core (`grouped_info_nce`, impl torch), filtered (old), filtered (this checkout), round-robin after one warm-up
each. SupCon over N = M = --n rows (D = 64, labels from 256 classes, self excluded, τ = 0.1), ρ = --rho,
forward + backward. Prints and writes (--csv) the median wall and CPU time per impl and thread count, the
ratios to core, the host (benchmarks/host.py) and the load average.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.csv_out import write_csv  # noqa: E402
from benchmarks.host import host_info, host_line  # noqa: E402
from macl_kernels import grouped_info_nce  # noqa: E402
from macl_kernels.filter.filtered import filtered_info_nce  # noqa: E402


def old_filter(commit: str, where: str):
    """filtered_info_nce of `commit`, imported as package old_macl_kernels from a `git archive` under where."""
    tar = subprocess.run(["git", "-C", ROOT, "archive", commit, "macl_kernels"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", where], input=tar, check=True)
    shutil.move(os.path.join(where, "macl_kernels"), os.path.join(where, "old_macl_kernels"))
    sys.path.insert(0, where)
    return importlib.import_module("old_macl_kernels.filtered").filtered_info_nce


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default="9a9b2d1", help="the earlier commit (default: before the sample bracket)")
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--rho", type=float, default=0.5)
    ap.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "gcl_filter_before_after_cpu.csv"))
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = old_filter(args.old, tmp)
        gen = torch.Generator().manual_seed(0)
        x = F.normalize(torch.randn(args.n, 64, generator=gen), dim=1).requires_grad_()
        lab = torch.randint(0, 256, (args.n,), generator=gen)
        kw = dict(q_labels=lab, exclude_self=True, temperature=0.1)
        fns = {"core": lambda: grouped_info_nce(x, impl="torch", **kw).loss.backward(),
               f"filtered@{args.old}": lambda: old(x, rho=args.rho, **kw).loss.backward(),
               "filtered@checkout": lambda: filtered_info_nce(x, rho=args.rho, **kw).loss.backward()}
        for th in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(th)
            print(host_line(), flush=True)
            wall, cpu = defaultdict(list), defaultdict(list)
            for f in fns.values():
                f()
            for _ in range(args.reps):
                for name, f in fns.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    f()
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
                    x.grad = None
            w0, c0 = statistics.median(wall["core"]), statistics.median(cpu["core"])
            h = host_info()
            for name in fns:
                w, c = statistics.median(wall[name]), statistics.median(cpu[name])
                rows.append({"impl": name, "threads": th, "median_s": round(w, 4), "ratio": round(w / w0, 3),
                             "cpu_s": round(c, 4), "cpu_ratio": round(c / c0, 3), "n": args.n, "rho": args.rho,
                             "reps": args.reps, "cpu": h["cpu"], "isa": h["isa"], "load_1min": h["load_1min"],
                             "torch": h["torch"]})
                print(f"{th} thread(s)  {name:22s} wall {w:.3f} s ×{w / w0:.2f}   cpu {c:.3f} s ×{c / c0:.2f}",
                      flush=True)
    write_csv(args.csv, rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
