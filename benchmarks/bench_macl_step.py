"""One full MACL pre-training step on CPU: time and peak memory (issue 3, "Performance").

    python benchmarks/bench_macl_step.py                 # 2D batch 16 at 512², and 3D batch 2 at 96³
    python benchmarks/bench_macl_step.py --cases 2d --reps 2

A step is what `macl.train.pretrain` does per iteration: the four encoder passes of MACL (the paper's
U-Net, F = 32, depth 4 in 2D and 3 in 3D, L_d "location"), L = λ1·L_g + λ2·L_d + λ3·L_ER, backward, SGD update. Each case runs
in a fresh subprocess; peak memory is the growth of max RSS over the timed steps (model and inputs excluded).
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# 3D: depth 3, because MACL's ×0.25 dominant view must pass the encoder: 96³ → 24³ needs 24 divisible by
# 2^depth (and 96 by 2^(depth + decoder_blocks)); depth 4 would need patches that are multiples of 64.
CASES = {"2d": dict(dims=2, batch=16, size=512, depth=4), "3d": dict(dims=3, batch=2, size=96, depth=3)}


def run_case(name: str, reps: int) -> dict:
    import resource

    import torch

    from macl.settings.config import MethodConfig, NetConfig
    from macl.methods import Batch, build_method
    c = CASES[name]
    torch.manual_seed(0)
    method = build_method(NetConfig(dims=c["dims"], depth=c["depth"]), MethodConfig(name="macl", impl="torch"))
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    shape = (c["batch"], 1) + (c["size"],) * c["dims"]
    batch = Batch(positions=torch.rand(c["batch"]), img1=torch.rand(shape), img2=torch.rand(shape),
                  img3=torch.rand(shape), img4=torch.rand(shape))

    def step():
        terms = method(batch)
        loss = method.combine(terms)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {k: float(v) for k, v in terms.items()}

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    terms = step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n_params = sum(p.numel() for p in method.parameters())
    return dict(case=name, **c, times=times, extra_bytes=peak - base, terms=terms, params=n_params,
                threads=torch.get_num_threads(), torch=torch.__version__)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--reps", type=int, default=2, help="timed steps per case (after one warm-up step)")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "macl_step_cpu.csv"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_case(args.one, args.reps)))
        return 0
    rows = []
    for name in args.cases:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--reps", str(args.reps)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.path.dirname(HERE)))
        if out.returncode != 0:
            raise SystemExit(f"case {name} failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        med = statistics.median(r["times"])
        rows.append(dict(machine=platform.machine(), cpu_count=os.cpu_count(), torch=r["torch"],
                         threads=r["threads"], case=name, dims=r["dims"], batch=r["batch"], size=r["size"],
                         params=r["params"], median_s=med, min_s=min(r["times"]),
                         extra_mb=r["extra_bytes"] / 2**20, L_g=r["terms"].get("L_g"), L_d=r["terms"].get("L_d"),
                         L_ER=r["terms"].get("L_ER")))
        print(f"{name}: batch {r['batch']} at {r['size']}^{r['dims']}: {med:.2f} s per step, "
              f"{r['extra_bytes'] / 2**20:.0f} MiB peak extra ({r['params'] / 1e6:.2f} M parameters)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
