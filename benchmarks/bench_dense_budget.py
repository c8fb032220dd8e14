"""Where the dense small-problem path stops paying: dense against tiled, forced, for the three small losses.

    PYTHONPATH=. python benchmarks/bench_dense_budget.py 256 384 512 724 1024     # B values (about 2 min)

For each B: nt_xent (2B embeddings), sup_con and positional_sup_con ((B, 2, D) features), D = 128, float32,
normalize=True, fwd + bwd, one thread, CPU time (`time.process_time`, steadier than wall time on a shared machine);
`torch_dense.DENSE_MAX_BYTES` is set huge (dense) or negative (tiled) around the calls. 3 rounds alternating the two
paths, 7 timed calls each; the median over all. The logits of one call take (2B)² · 4 bytes.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.host import host_info, host_line  # noqa: E402


def main(argv=None) -> int:
    import torch
    torch.set_num_threads(1)
    import macl_kernels as mk
    from macl_kernels.eager import dense as torch_dense
    batches = [int(b) for b in (argv if argv is not None else sys.argv[1:])] or [256, 512]
    print(host_line(host_info()), flush=True)
    D, keep = 128, torch_dense.DENSE_MAX_BYTES

    def cpu_ms(fn, inputs, n=7):
        ts = []
        for _ in range(n):
            for x in inputs:
                x.grad = None
            c0 = time.process_time()
            fn().backward()
            ts.append(time.process_time() - c0)
        return ts

    try:
        for B in batches:
            g = torch.Generator().manual_seed(0)
            z1 = torch.randn(B, D, generator=g).requires_grad_()
            z2 = torch.randn(B, D, generator=g).requires_grad_()
            f = torch.randn(B, 2, D, generator=g).requires_grad_()
            lab = torch.randint(0, 10, (B,), generator=g)
            pos = torch.rand(B, generator=g)
            cases = {"nt_xent": (lambda: mk.nt_xent(z1, z2, impl="torch"), [z1, z2]),
                     "sup_con": (lambda: mk.sup_con(f, lab, impl="torch"), [f]),
                     "positional_sup_con": (lambda: mk.positional_sup_con(f, pos, 0.1, impl="torch"), [f])}
            line = f"B={B} (logits {(2 * B) ** 2 * 4 / 2 ** 20:.2f} MiB):"
            for name, (fn, inputs) in cases.items():
                res = {"dense": [], "tiled": []}
                for _ in range(3):
                    for mode in res:
                        torch_dense.DENSE_MAX_BYTES = 1 << 40 if mode == "dense" else -1
                        fn().backward()   # warm-up
                        res[mode] += cpu_ms(fn, inputs)
                line += (f"  {name} dense {statistics.median(res['dense']) * 1e3:.1f} ms, "
                         f"tiled {statistics.median(res['tiled']) * 1e3:.1f} ms")
            print(line + f"  | load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        torch_dense.DENSE_MAX_BYTES = keep
    return 0


if __name__ == "__main__":
    sys.exit(main())
