"""The CPU limit of the exact tiled algorithm (KERNELS.md §6), measured in the same run as what it judges.

One GEMM unit = 2·N·M·D flops; one exp pass = N·M exponentials (summed over groups).
- forward:           1 unit + 1 exp pass   (z, then log-sum-exp)
- forward+backward:  4 units + 2 exp passes (z in the forward; z again, dq and dk in the backward)
Rates: `torch.mm` on cache-sized blocks (1024×D by D×1024, repeated) and `torch.exp` on a cache-sized block
(512×1024, in place), both measured now.
"""
from __future__ import annotations

import time
from typing import Callable

#: (GEMM units, exp passes) of each phase for the exact tiled algorithm with nothing N×M stored
PHASE_COST = {"forward": (1, 1), "forward+backward": (4, 2)}


def time_calls(fn: Callable[[], object], reps: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of `reps` calls of fn by `clock` (wall clock by default; time.process_time for CPU time)."""
    out = []
    for _ in range(reps):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


_time = time_calls  # the name bench_core_cpu.py used


def measure_rates(D: int, reps: int = 5, clock: Callable[[], float] = time.perf_counter) -> dict:
    """In-cache rates on this CPU now: {'gemm_flops': flop/s of torch.mm at 1024×D·D×1024,
    'exp_per_s': exponentials/s of in-place torch.exp on 512×1024 float32}. Best of `reps` × 20 calls, timed
    by `clock` (time.process_time gives rates per CPU second, steadier on a shared machine)."""
    import torch
    a, b = torch.randn(1024, D), torch.randn(D, 1024)
    c = torch.empty(1024, 1024)
    inner = 20
    torch.mm(a, b, out=c)
    t_mm = min(time_calls(lambda: [torch.mm(a, b, out=c) for _ in range(inner)], reps, clock)) / inner
    x = torch.randn(512, 1024) * 0.1
    x.exp_()
    t_exp = min(time_calls(lambda: [x.exp_().log_() for _ in range(inner)], reps, clock)) / inner / 2
    return {"gemm_flops": 2 * 1024 * 1024 * D / t_mm, "exp_per_s": 512 * 1024 / t_exp}


def limit_seconds(rates: dict, gemm_flops_per_unit: float, exps_per_pass: float,
                  phase: str = "forward+backward") -> float:
    """Seconds of the phase's GEMM units and exp passes (PHASE_COST) at `rates` (see `measure_rates`)."""
    units, passes = PHASE_COST[phase]
    return units * gemm_flops_per_unit / rates["gemm_flops"] + passes * exps_per_pass / rates["exp_per_s"]


def measure_limit(N: int, M: int, D: int, reps: int = 5) -> dict:
    """Seconds for 4 GEMM units + 2 exp passes (forward+backward of one N×M×D problem) at in-cache rates
    measured now: {'seconds', 'gemm_gflops', 'exp_gps'}."""
    r = measure_rates(D, reps)
    seconds = limit_seconds(r, 2 * N * M * D, N * M, "forward+backward")
    return dict(seconds=seconds, gemm_gflops=r["gemm_flops"] / 1e9, exp_gps=r["exp_per_s"] / 1e9)
