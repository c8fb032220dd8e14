"""Overhead of the collapse diagnostics (macl.diagnostics) on a pre-training step, measured interleaved.

    python benchmarks/diagnostics_overhead.py                      # the demo's size: 64², depth 3, F=16, B=16
    python benchmarks/diagnostics_overhead.py --size 32 --depth 2 --width 4 --steps 100 --pairs 3

Each pair runs `macl.train.pretrain` twice on the same batches and seed, diagnostics off then on (the order
alternates between pairs), with the default settings (spreads on every logged step, log_every = 1, and the
per-term encoder-gradient norms every 100 steps). The figure is the ratio of the summed `step_time_s` of the
two runs (the diagnostics run inside the timed step), the median over pairs. On a shared machine the ratio of
interleaved runs is what is meaningful; the load is printed next to it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch


def _batches(size: int, batch: int, seed: int = 0):
    from macl.methods import Batch

    def factory(start):
        step = start
        while True:
            g = torch.Generator().manual_seed(seed * 100003 + step)
            x = torch.rand(batch, 1, size, size, generator=g)
            yield Batch(torch.rand(batch, generator=g), x, x + 0.05, x.flip(-1), x.flip(-2))
            step += 1
    return factory


def run(size: int, depth: int, width: int, batch: int, steps: int, diagnostics: bool) -> float:
    from macl.config import MethodConfig, NetConfig, PretrainConfig, TrainConfig
    from macl.train import pretrain
    cfg = PretrainConfig(net=NetConfig(base_width=width, depth=depth), method=MethodConfig(),
                         train=TrainConfig(steps=steps, device="cpu", checkpoint_every=0, diagnostics=diagnostics))
    with tempfile.TemporaryDirectory() as d:
        pretrain(cfg, _batches(size, batch), d)
        with open(os.path.join(d, "log.jsonl")) as fh:
            return sum(json.loads(line)["step_time_s"] for line in fh if line.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = []
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        times = {on: run(args.size, args.depth, args.width, args.batch, args.steps, on) for on in order}
        ratios.append(times[True] / times[False])
        print(f"pair {i}: off {times[False]:.2f} s, on {times[True]:.2f} s, on/off {ratios[-1]:.4f}", flush=True)
    load = os.getloadavg()
    print(f"{args.size}^2 depth {args.depth} F={args.width} B={args.batch}, {args.steps} steps, {args.threads} thread(s): "
          f"median on/off = {statistics.median(ratios):.4f} over {args.pairs} pairs "
          f"(overhead {100 * (statistics.median(ratios) - 1):+.2f}%); host {platform.processor() or platform.machine()}, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at {time.strftime('%H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
