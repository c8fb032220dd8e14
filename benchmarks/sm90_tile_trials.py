"""Compile candidate tiles that are not in the shipped tables and read what they execute (no GPU needed).

Each TILE is PHASE:D:BLOCK_M:BLOCK_N:WARPS:STAGES (phase fwd | dq | dk | dsym; bf16, full-width backward):
the kernel is compiled for sm_90 with Triton's ptxas (`sass_report.build`, spawned workers) and one line per
tile gives registers, spilled bytes, shared memory, the main loop's MMA instructions, executed GEMM units, the
TTGIR's async-copy waits inside loops (a 0 is a full drain), the cycle model's per-iteration cycles by resource
(`sass_model.iteration_cycles`) and its time at N = M = 16384.
The numbers docs/gpu_readiness.md quotes for tiles it did not ship come from this script.

    python -m benchmarks.sm90_tile_trials dk:256:128:64:8:3 dk:256:128:64:8:2 [--flags index-learn-tau]
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def parse_tile(text: str):
    """ShippedConfig of one PHASE:D:BLOCK_M:BLOCK_N:WARPS:STAGES (bf16, sm_90, full-width backward)."""
    import torch

    from macl_kernels.triton.config import KernelConfig, ShippedConfig, block_d
    try:
        phase, D, bm, bn, w, st = text.split(":")
        D, bm, bn, w, st = int(D), int(bm), int(bn), int(w), int(st)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile must be PHASE:D:BLOCK_M:BLOCK_N:WARPS:STAGES, got {text!r}")
    dout = 0 if phase == "fwd" else max(16, 1 << (D - 1).bit_length())
    c = KernelConfig(bm, bn, block_d(D, torch.bfloat16), dout, w, st, 255)
    return ShippedConfig(phase, torch.bfloat16, D, "large", c, "ieee", True, 90)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from macl_kernels.triton import sass_model, sass_report
    from macl_kernels.triton.aot import FLAG_NAMES
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tiles", nargs="+", type=parse_tile, metavar="TILE")
    ap.add_argument("--flags", default=FLAG_NAMES[0], choices=FLAG_NAMES, help="kernel switch set (aot.FLAG_SETS)")
    a = ap.parse_args(argv)
    for r in sass_report.build([(e, 90, a.flags) for e in a.tiles], jobs=2):
        head = f"{r.phase} D={r.D} {r.BLOCK_M}x{r.BLOCK_N} {r.num_warps}w {r.num_stages}s {a.flags}:"
        if r.error:
            sys.stdout.write(f"{head} error {r.error}\n")
            continue
        t = sass_model.kernel_time(r, 16384, 16384)
        parts = {k: round(t[k]) for k in ("tensor", "smem", "mufu", "issue")}
        sys.stdout.write(f"{head} regs {r.registers}, spill {r.spill_bytes} B, smem {r.shared} B, "
                         f"MMA {r.loop['mma']}, units {r.units:.2f}, waits {r.ttgir['wait_nums']}, "
                         f"cycles per iteration {parts}, model {t['seconds'] * 1e3:.3f} ms ({t['bound']})\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
