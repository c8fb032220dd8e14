"""Per-SM cycle model of the compiled kernels (`sass_report`), TFLOP/s predictions and the report's table.

Per CTA iteration of the main loop, from the SASS counts (see `sass_report`'s docstring):
    tensor = executed MACs / MMA rate,  smem = shared-memory bytes / 128 B/clk,
    mufu   = MUFU lanes / 16 per clk,   issue = instructions · warps / 4 per clk;
with c CTAs resident per SM, one iteration of each costs
    round = max(c · max(tensor, smem, mufu, issue), max(tensor, smem) + max(mufu, issue))
(the second term: one CTA's own chain; every loop waits for its MMAs before the softmax). A kernel at a shape:
waves · iterations · round / clock, waves = ⌈programs / (SMs · c)⌉; a phase sums its kernels; effective TFLOP/s
as the benchmark issue defines them (forward 2·N·M·D / t, forward + backward 8·N·M·D / t).

    python -m macl_kernels.triton.sass_model [--arch 80 90] [--rebuild] [--jobs N] [--markdown]
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from .sass_report import H100_SM, HMMA_FRACTION, KernelReport, load_or_build, report_entries

#: the issue's targets (bf16, N = M = 16384, D = 256): effective TFLOP/s (self-contrast: the same 8·N·M·D flops)
TARGETS = {"forward": 450.0, "forward+backward": 300.0, "self-contrast forward+backward": 300.0}
#: the kernels of a phase; self-contrast (k is q) runs the forward and the one 'dsym' backward kernel
PHASE_KERNELS = {"forward": ("fwd",), "forward+backward": ("fwd", "dq", "dk"),
                 "self-contrast forward+backward": ("fwd", "dsym")}


def ctas_per_sm(r: KernelReport, sm: dict = H100_SM) -> int:
    """Resident CTAs per SM: the least of shared memory, registers (8-register granules) and warp slots."""
    by_smem = sm["smem_bytes"] // max(r.shared + 1024, 1)
    by_regs = sm["regs"] // (math.ceil(max(r.registers, 1) / 8) * 8 * 32 * r.num_warps)
    return max(1, min(by_smem, by_regs, sm["max_warps"] // r.num_warps))


def iteration_cycles(r: KernelReport, sm: dict = H100_SM) -> dict:
    """Cycles of one CTA's main-loop iteration per resource, the round of c resident CTAs, and the bound."""
    lp, w = r.loop, r.num_warps
    kind = "tf32" if r.precision == "tf32" else "16bit"
    rate = sm["hgmma_mac_per_clk"][kind]
    wg = max(1, w // 4)
    tensor = lp["hgmma_macs"] * wg / rate + lp["hmma_macs"] * w / (rate * HMMA_FRACTION)
    smem = lp["smem_bytes"] * w / sm["smem_bytes_per_clk"]
    mufu = lp["mufu"] * w * 32 / sm["mufu_per_clk"]
    issue = lp["instructions"] * w / sm["issue_per_clk"]
    c = ctas_per_sm(r, sm)
    parts = {"tensor": tensor, "smem": smem, "mufu": mufu, "issue": issue}
    busiest = max(parts, key=parts.get)
    chain = max(tensor, smem) + max(mufu, issue)
    round_ = max(c * parts[busiest], chain)
    mem_or_mma = "tensor" if tensor >= smem else "smem"
    bound = busiest if c * parts[busiest] >= chain else f"{mem_or_mma}+{'mufu' if mufu > issue else 'issue'} serial"
    return dict(parts, ctas=c, round=round_, per_iter=round_ / c, bound=bound,
                tensor_util=c * tensor / round_ if round_ else 0.0)


def kernel_time(r: KernelReport, N: int, M: int, G: int = 1, sm: dict = H100_SM) -> dict:
    """Predicted seconds of one kernel at (G, N, M, r.D) and what bounds it."""
    rows = r.phase in ("fwd", "dq", "dsym")
    own, loop = (N, M) if rows else (M, N)
    b_own, b_loop = (r.BLOCK_M, r.BLOCK_N) if rows else (r.BLOCK_N, r.BLOCK_M)
    progs = G * math.ceil(own / b_own)
    iters = math.ceil(loop / b_loop)
    ic = iteration_cycles(r, sm)
    waves = math.ceil(progs / (sm["sms"] * ic["ctas"]))
    return dict(seconds=waves * iters * ic["round"] / sm["clock_hz"], programs=progs, waves=waves, **ic)


def predict(reports: Sequence[KernelReport], D: int, N: int = 16384, M: int = 16384, dtype: str = "bf16",
            arch: int = 90, phase: str = "forward+backward") -> dict:
    """Effective TFLOP/s of a phase from the default configurations' reports (dtype, D, arch)."""
    ks = {}
    for k in PHASE_KERNELS[phase]:
        rows = [r for r in reports if r.phase == k and r.D == D and r.dtype == dtype and r.arch == arch
                and r.default and r.precision != "tf32"]
        if not rows:
            raise ValueError(f"no compiled report for {k} {dtype} D={D} sm_{arch}")
        ks[k] = kernel_time(rows[0], N, M)
    t = sum(v["seconds"] for v in ks.values())
    nominal = (2.0 if phase == "forward" else 8.0) * N * M * D   # self-contrast: the same nominal work
    return dict(kernels=ks, seconds=t, tflops=nominal / t / 1e12,
                bound=", ".join(f"{k}: {v['bound']}" for k, v in ks.items()))


def table(reports: Sequence[KernelReport]) -> str:
    """Markdown table: one row per compiled configuration."""
    head = ("| arch | dtype | D | kernel | tile (M×N, warps, stages) | default | regs | spill B | smem KiB | "
            "MMA per warp·iter (SASS) | MMA layouts (TTGIR) | units | exec/useful | exp passes | MUFU | LDSM | "
            "LDS | async waits in loop | bound |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(reports, key=lambda r: (r.arch, r.dtype, r.D, "fwd dq dk dsym".split().index(r.phase),
                                            not r.default)):
        if r.error:
            out.append(f"| sm_{r.arch} | {r.dtype} | {r.D} | {r.phase} | error: {r.error} |")
            continue
        lp = r.loop
        mma = ", ".join(f"{v}× {k}" for k, v in lp["mma"].items())
        ic = iteration_cycles(r)
        out.append(
            f"| sm_{r.arch} | {r.dtype if r.precision != 'tf32' else 'tf32'} | {r.D} | {r.phase} | "
            f"{r.BLOCK_M}×{r.BLOCK_N}, {r.num_warps}w, {r.num_stages}s | {'yes' if r.default else ''} | "
            f"{r.registers} | {r.spill_bytes} | {r.shared / 1024:.0f} | {mma} | {'; '.join(r.ttgir['mma_layouts'])} | "
            f"{r.units:.2f} | {r.ratio:.2f} | {r.exp_passes:.2f} | {lp['mufu']} | {lp['ldsm']} | {lp['lds']} | "
            f"{r.ttgir['wait_nums']} | {ic['bound']} |")
    return "\n".join(out)


def phase_sums(reports: Sequence[KernelReport], arch: int, dtype: str, D: int) -> Optional[dict]:
    """Executed GEMM units and exp passes of forward + backward (fwd, dq, dk) and of self-contrast forward +
    backward (fwd, dsym), and the worst executed ÷ useful ratio, from the default configurations; None if
    one of the four kernels is missing. dtype: 'fp16' | 'bf16' | 'tf32'."""
    rows = {r.phase: r for r in reports if r.default and r.arch == arch and r.D == D and not r.error
            and (r.dtype if r.precision != "tf32" else "tf32") == dtype}
    if set(rows) != {"fwd", "dq", "dk", "dsym"}:
        return None
    pair, self_ = [rows[k] for k in ("fwd", "dq", "dk")], [rows["fwd"], rows["dsym"]]
    return dict(units=sum(r.units for r in pair), exp=sum(r.exp_passes for r in pair),
                self_units=sum(r.units for r in self_), self_exp=sum(r.exp_passes for r in self_),
                ratio=max(r.ratio for r in rows.values()))


def totals(reports: Sequence[KernelReport]) -> str:
    """Markdown: forward + backward executed GEMM units and exp passes per (arch, dtype, D), defaults only,
    for two tensors (fwd + dq + dk) and for self-contrast (fwd + dsym)."""
    out = ["| arch | dtype | D | fwd+bwd GEMM units | exp passes | self-contrast GEMM units | self-contrast exp passes "
           "| max exec/useful |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.arch, r.dtype if r.precision != "tf32" else "tf32", r.D) for r in reports})
    for a, dt, D in keys:
        t = phase_sums(reports, a, dt, D)
        if t is None:
            continue
        out.append(f"| sm_{a} | {dt} | {D} | {t['units']:.2f} | {t['exp']:.2f} | {t['self_units']:.2f} | "
                   f"{t['self_exp']:.2f} | {t['ratio']:.2f} |")
    return "\n".join(out)


def predictions(reports: Sequence[KernelReport], dims: Sequence[int] = (256, 512)) -> str:
    """Markdown: predicted bf16 sm_90 TFLOP/s at N = M = 16384 beside the targets, with the binding resource."""
    out = ["| D | phase | predicted TFLOP/s | target | per-kernel bound |", "|---|---|---|---|---|"]
    for D in dims:
        for ph in PHASE_KERNELS:
            p = predict(reports, D, phase=ph)
            tgt = f"≥ {TARGETS[ph]:.0f}" if D == 256 else "—"   # the targets are set at D = 256
            out.append(f"| {D} | {ph} | {p['tflops']:.0f} | {tgt} | {p['bound']} |")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--rebuild", action="store_true", help="recompile everything (ignore the cache)")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--all", action="store_true", help="every candidate, not only the defaults")
    a = ap.parse_args(argv)
    reps = load_or_build(report_entries(tuple(a.arch), defaults_only=not a.all), rebuild=a.rebuild, jobs=a.jobs)
    print(table(reps), totals(reps), sep="\n\n")
    if 90 in a.arch:
        print("\n" + predictions(reps))
    bad = [r for r in reps if r.error or r.spill_bytes]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
