"""The host a benchmark figure was measured on: CPU model, SIMD ISA flags, threads, load, versions.

Every CPU figure depends on these (AVX-512 / AMX GEMM kernels, core count, other jobs on the machine), so the
benchmarks store `host_info()` beside every row and print `host_line()` above their tables.
"""
from __future__ import annotations

import os
import platform

#: the ISA flags that change which GEMM / exp kernels torch runs (reported when present, in this order)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni",
             "amx_tile", "amx_bf16", "neon", "asimd", "sve")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and model in ("", platform.machine(),
                                                                           platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = value.split()
    except OSError:
        pass
    return model, flags


def host_info() -> dict:
    """{'cpu', 'isa', 'cpu_count', 'threads', 'load_1min', 'torch', 'machine'}: isa is the subset of
    ISA_FLAGS this CPU has, space-separated; load_1min the 1-minute load average now (noise indicator)."""
    import torch
    model, flags = _cpuinfo()
    have = set(flags)
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = float("nan")
    return dict(cpu=model, isa=" ".join(f for f in ISA_FLAGS if f in have), cpu_count=os.cpu_count(),
                threads=torch.get_num_threads(), load_1min=load, torch=torch.__version__,
                machine=platform.machine())


def host_line(info: dict | None = None) -> str:
    """One line for the top of a benchmark's output."""
    h = info or host_info()
    return (f"host: {h['cpu']} ({h['machine']}, {h['cpu_count']} CPUs, torch {h['torch']} with {h['threads']} "
            f"threads), ISA: {h['isa'] or '-'}, load average {h['load_1min']}")
