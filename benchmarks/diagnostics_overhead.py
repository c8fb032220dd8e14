"""Overhead of the collapse diagnostics (macl.diagnostics) per pre-training step, measured interleaved.

    python benchmarks/diagnostics_overhead.py                        # the demo's size: 64², depth 3, F=16, B=16
    python benchmarks/diagnostics_overhead.py --size 32 --depth 2 --width 4 --pairs 400

One process, one MACL model (the default preset) and SGD; a seeded random half of the steps are plain steps
(forward, backward, update: what `macl.train.pretrain` does without diagnostics), the other half the same step
with the diagnostics as the trainer runs them at their defaults with log_every = 1 (constant-embedding values
every step, spreads on every 10th diagnosed step, the per-term encoder-gradient norms on every 100th: one extra
backward per term). Interleaving step by step puts both under the same machine load. Reported: the ratio of
the mean wall step times (diagnosed / plain, gradient-share steps included) with its two parts (median per-step
cost, gradient-share steps spread over 100 steps); and, more precise on a busy machine, where wall step times
scatter by tens of percent, the diagnostics' own calls timed in CPU time (time.process_time, which other
processes do not inflate): (mean observe() + mean grad_shares() / 100) / mean CPU time of a plain step.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def measure(size: int, depth: int, width: int, batch: int, pairs: int, warmup: int = 10) -> dict:
    from macl.settings.config import MethodConfig, NetConfig
    from macl.diagnostics import Diagnostics, DiagnosticsConfig
    from macl.methods import Batch, build_method
    torch.manual_seed(0)
    method = build_method(NetConfig(base_width=width, depth=depth), MethodConfig()).train()
    opt = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
    cfg = DiagnosticsConfig()
    diag = Diagnostics(cfg, log_warnings=False)
    g = torch.Generator().manual_seed(0)
    plain, spread, grads = [], [], []
    observe_time, grad_time, plain_cpu = [], [], []  # CPU times: the diagnostics' own calls, the plain steps
    # which steps are diagnosed: a seeded random half (a strict alternation showed a position bias on a busy machine)
    order = torch.randperm(warmup + 2 * pairs, generator=torch.Generator().manual_seed(1)) % 2
    diagnosed = 0
    for i in range(warmup + 2 * pairs):
        x = torch.rand(batch, 1, size, size, generator=g)
        b = Batch(torch.rand(batch, generator=g), x, x + 0.05, x.flip(-1), x.flip(-2))
        on = bool(order[i])
        t0, c0 = time.perf_counter(), time.process_time()
        terms = method(b)
        loss = method.combine(terms)
        detached = torch.stack([t.detach() for t in terms.values()] + [loss.detach()])
        values = dict(zip(list(terms) + ["loss"], detached.tolist()))
        with_grads = False
        if on:
            diagnosed += 1
            if diag.due_grad(diagnosed):
                tg = time.process_time()
                values.update(diag.grad_shares(method, terms))
                grad_time.append(time.process_time() - tg)
                with_grads = True
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on:
            to = time.process_time()
            values.update(diag.observe(diagnosed, method, values, logged=True))
            if i >= warmup:
                observe_time.append(time.process_time() - to)
        dt = time.perf_counter() - t0
        if i < warmup:
            continue
        if not on:
            plain_cpu.append(time.process_time() - c0)
        (grads if with_grads else spread if on else plain).append(dt)
    base = statistics.mean(plain)
    on_all = spread + grads
    every = cfg.grad_every
    return {"plain_mean": base, "on_mean": statistics.mean(on_all), "ratio_of_means": statistics.mean(on_all) / base,
            "spread_median_overhead": statistics.median(spread) / statistics.median(plain) - 1,
            "grad_step_overhead_per_step": (statistics.mean(grads) - statistics.median(plain)) / every
            / statistics.median(plain) if grads else float("nan"),
            "n_plain": len(plain), "n_on": len(on_all), "n_grad_steps": len(grads),
            "observe_ms": 1000 * statistics.mean(observe_time), "grad_shares_ms": 1000 * statistics.mean(grad_time),
            "plain_cpu_ms": 1000 * statistics.mean(plain_cpu),
            "direct_overhead": (statistics.mean(observe_time) + statistics.mean(grad_time) / every)
            / statistics.mean(plain_cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=200, help="plain/diagnosed step pairs (grad shares every 100)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    before = os.getloadavg()
    r = measure(args.size, args.depth, args.width, args.batch, args.pairs)
    after = os.getloadavg()
    print(f"{args.size}^2 depth {args.depth} F={args.width} B={args.batch}, {args.pairs} pairs, {args.threads} thread(s): "
          f"plain step {1000 * r['plain_mean']:.1f} ms, diagnosed/plain (means, {r['n_grad_steps']} grad-share steps "
          f"included) = {r['ratio_of_means']:.4f}; spreads {100 * r['spread_median_overhead']:+.2f}% (median), "
          f"grad shares {100 * r['grad_step_overhead_per_step']:+.2f}% amortised over {100} steps; direct: "
          f"observe {r['observe_ms']:.2f} ms per step + grad shares {r['grad_shares_ms']:.0f} ms per 100 steps = "
          f"{100 * r['direct_overhead']:.2f}% of a plain step's {r['plain_cpu_ms']:.1f} ms (CPU times); "
          f"host {platform.machine()}, load average {before[0]:.1f} before, {after[0]:.1f} after, "
          f"{time.strftime('%H:%M UTC', time.gmtime())}")


if __name__ == "__main__":
    main()
