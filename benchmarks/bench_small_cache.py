"""Small losses with a warm and with a cold cache: ours against naive PyTorch, fwd + bwd, one thread.

    PYTHONPATH=. python benchmarks/bench_small_cache.py            # B = 64 (about 30 s)
    PYTHONPATH=. python benchmarks/bench_small_cache.py --batch 256

At B = 64 a call is mostly fixed cost (Python, the dispatch of each eager operation, autograd nodes), and what
that costs depends on what the cache holds. "warm": the same call back to back (its code and data stay in L1/L2).
"cold": an 8 MiB buffer is written before every call, which evicts the L2 (2 MiB per core here), as the rest of
a training step does between two loss calls. `bench_core_cpu.py` sits in between: it interleaves ours and naive
call by call, so each call starts after the other's. Same inputs and losses as bench_core_cpu.py (float32,
D = 128, τ = 0.1, normalize=True); the median of `--reps` calls of each, run back to back per mode.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.host import host_info, host_line  # noqa: E402

EVICT_BYTES = 8 << 20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="B (2B embeddings; default 64)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=500, help="timed calls per loss, implementation and mode")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    import macl_kernels as mk
    from benchmarks import naive as nv
    print(host_line(host_info()), flush=True)
    B, D, tau, thr = args.batch, args.dim, 0.1, 0.1
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(B, D, generator=g).requires_grad_()
    z2 = torch.randn(B, D, generator=g).requires_grad_()
    f = torch.randn(B, 2, D, generator=g).requires_grad_()
    labels = torch.randint(0, 10, (B,), generator=g)
    pos = torch.rand(B, generator=g)
    cases = {
        "nt_xent": (lambda: mk.nt_xent(z1, z2, temperature=tau, impl="torch"),
                    lambda: nv.naive_nt_xent(z1, z2, tau)),
        "sup_con": (lambda: mk.sup_con(f, labels, temperature=tau, impl="torch"),
                    lambda: nv.naive_sup_con(f, labels, tau)),
        "positional_sup_con": (lambda: mk.positional_sup_con(f, pos, thr, temperature=tau, impl="torch"),
                               lambda: nv.naive_positional_sup_con(f, pos, tau, thr)),
    }
    buf = torch.empty(EVICT_BYTES, dtype=torch.uint8)

    def median_us(fn, cold: bool) -> float:
        ts = []
        for _ in range(args.reps):
            z1.grad = z2.grad = f.grad = None
            if cold:
                buf.fill_(1)
            t0 = time.perf_counter()
            fn().backward()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e6

    for name, (ours, naive) in cases.items():
        ours().backward(), naive().backward()   # warm-up
        line = f"{name:18s} B={B}"
        for mode in ("warm", "cold"):
            o, n = median_us(ours, mode == "cold"), median_us(naive, mode == "cold")
            line += f" | {mode}: ours {o:6.0f} us, naive {n:6.0f} us, ours/naive {o / n:.2f}"
        print(line + f" | load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
