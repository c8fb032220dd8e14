"""Tile shape × tile workers for the tiled torch path: info_nce fwd+bwd against the CPU limit, in one process.

    PYTHONPATH=. python benchmarks/bench_tile_shapes.py --n 8192 --threads 2     # about 30 s on 2 cores
    PYTHONPATH=. python benchmarks/bench_tile_shapes.py --n 8192 --threads 1

info_nce N = M = --n, D = 128, normalize=True on raw features, τ = 0.1. For every (ROW_BLOCK, KEY_BLOCK) of
`torch_tiled` and, with more than one thread, tile workers on and off (`tile_workers.PARALLEL_TILES`), the calls
are interleaved over 3 rounds (one warm-up and one timed call each); the median is reported with its ratio to the
limit (KERNELS.md §6, rates measured in the same process: benchmarks/limits.py). Wall clock with several threads,
CPU time with one. This is how the module constants were chosen (docs/cpu_path.md).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import macl_kernels.eager.tile_workers as tw  # noqa: E402
import macl_kernels.eager.tiled as tt  # noqa: E402
from benchmarks.host import host_line  # noqa: E402
from benchmarks.limits import limit_seconds, measure_rates  # noqa: E402
from macl_kernels import info_nce  # noqa: E402

SHAPES = [(512, 1024), (256, 1024), (256, 2048), (512, 2048), (1024, 1024), (1024, 2048), (2048, 2048)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.threads > 1 else time.process_time
    N, D = args.n, 128
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(N, D, generator=gen).requires_grad_()
    k = torch.randn(N, D, generator=gen).requires_grad_()

    def run():
        info_nce(q, k, temperature=0.1, impl="torch").backward()
        q.grad = k.grad = None

    modes = [True, False] if args.threads > 1 else [False]
    res = {(s, m): [] for s in SHAPES for m in modes}
    saved = (tt.ROW_BLOCK, tt.KEY_BLOCK, tw.PARALLEL_TILES)
    try:
        for _ in range(args.rounds):
            for s in SHAPES:
                for m in modes:
                    tt.ROW_BLOCK, tt.KEY_BLOCK = s
                    tw.PARALLEL_TILES = m
                    run()
                    t0 = clock()
                    run()
                    res[(s, m)].append(clock() - t0)
    finally:
        tt.ROW_BLOCK, tt.KEY_BLOCK, tw.PARALLEL_TILES = saved
    rates = measure_rates(D, clock=clock)
    lim = limit_seconds(rates, 2 * N * N * D, N * N)
    print(host_line())
    print(f"info_nce N=M={N} D={D} fwd+bwd, {args.threads} thread(s), {'wall' if args.threads > 1 else 'CPU'} "
          f"time; limit {lim:.3f} s (mm {rates['gemm_flops'] / 1e9:.0f} GFLOP/s, exp {rates['exp_per_s'] / 1e9:.1f} G/s)")
    for (s, m), v in sorted(res.items(), key=lambda kv: statistics.median(kv[1])):
        med = statistics.median(v)
        print(f"  tile {s[0]:5d} x {s[1]:5d}  workers={'on ' if m else 'off'}  median {med:.3f} s  "
              f"= {med / lim:.2f}x limit")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
