"""The GPU readiness report, made with no GPU: what the Triton kernels compile to, and how fast they could be.

    python -m benchmarks.readiness                   # docs/gpu_readiness.md + benchmarks/results/readiness_*.csv
    python -m benchmarks.readiness --no-aot          # roofline only (seconds)
    python -m benchmarks.readiness --arch 90 --jobs 2

1. Ahead-of-time compile (macl_kernels.triton.aot): every shipped kernel configuration for sm_80 and sm_90 (fp32
   also with TF32 dots): registers, shared memory, spills (stack / local memory / LDL / STL), HMMA / HGMMA
   counts, compile errors.
2. Cost model (benchmarks/roofline.py): for each shape of the GPU benchmark grid (and the issue's target
   shapes) and each phase, the kernels' GEMM units, flops, exponentials and bytes counted from their loops
   and tile sizes, the H100 floor, the effective TFLOP/s ceiling at 100% and at 70% tensor-core efficiency
   and, for the target shapes, the targets. Each kernel also says which configuration `choose_config` picks
   and whether that configuration is among the AOT-compiled ones.
0. What the compiled kernels execute (macl_kernels.triton.sass_report / sass_model, cached in
   benchmarks/results/sass_report.json): per default large-tile configuration (sm_80 and sm_90; fp16 / bf16 /
   TF32; D ∈ {64, 128, 256, 512}) the SASS main loop's MMA work × the warps / warpgroups issuing it, executed
   GEMM units and exp passes, executed ÷ useful, the cycle model's bound; forward + backward totals; the
   predicted bf16 TFLOP/s at N = M = 16384 beside the targets. This is the model the GPU check divides by.
A GPU run is judged against section 0's predictions (gpu_check's x_ceiling); sections 2–3 are the older
source-loop roofline, kept for the other shapes.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from typing import Optional, Sequence

from .cases import problem
from .roofline import EFFICIENCIES, H100, TARGET_TFLOPS, _config, phase_floor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the issue's GPU target shapes: H100, bf16, N = M ≥ 16384, D ∈ {256, 512}
TARGET_SHAPES = [("info_nce", (("D", d), ("N", n)), "bfloat16") for n in (16384, 65536) for d in (256, 512)]


def aot_rows(archs: Sequence[int] = (80, 90), entries=None, jobs: Optional[int] = None, tf32: bool = True,
             full: bool = False) -> list:
    """`macl_kernels.triton.aot.run_report` rows (AotRow) for the shipped configurations (or `entries`).

    TRITON_INTERPRET is removed from the environment during the compile (restored after): with it set, as in
    the test session, triton 3.9's compile of the kernels fails ("'value' object has no attribute 'dtype'").
    """
    from macl_kernels.triton.aot import run_report
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return run_report(archs, entries=entries, jobs=jobs, tf32=tf32, full=full)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def read_aot_csv(path: str) -> list:
    """AotRow objects back from a `readiness_aot.csv` a previous full run wrote (re-render without recompiling)."""
    from macl_kernels.triton.aot import AotRow
    types = {f.name: f.type for f in dataclasses.fields(AotRow)}
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kw = {}
            for k, v in row.items():
                if k not in types:
                    continue
                t = str(types[k])
                if v in ("", "None"):
                    kw[k] = None
                elif "bool" in t:
                    kw[k] = v == "True"
                elif "int" in t:
                    kw[k] = int(v)
                elif "float" in t:
                    kw[k] = float(v)
                else:
                    kw[k] = v
            out.append(AotRow(**kw))
    return out


def benchmark_shapes() -> list[tuple]:
    """Distinct (loss, dims, dtype) of the GPU sweep grid, then the target shapes."""
    from .grids import cuda_full
    seen, out = set(), []
    for c in cuda_full():
        if c.impl in ("triton", "torch") and (c.loss, c.dims, c.dtype) not in seen:
            seen.add((c.loss, c.dims, c.dtype))
            out.append((c.loss, c.dims, c.dtype))
    for t in TARGET_SHAPES:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def _shipped_keys() -> set:
    try:
        from macl_kernels.triton.config import shipped_configs
    except Exception:
        return set()
    return {(e.phase, str(e.dtype).replace("torch.", ""), e.config) for e in shipped_configs()}


def roofline_table(shapes: Optional[list] = None) -> list[dict]:
    """One row per (shape, phase, kernel) plus a 'total' row per (shape, phase)."""
    shipped = _shipped_keys()
    rows = []
    for loss, dims, dtype in (shapes or benchmark_shapes()):
        d = dict(dims)
        G, N, M, D = problem(loss, d)
        target = loss == "info_nce" and dtype == "bfloat16" and N >= 16384 and D in (256, 512)
        for phase in TARGET_TFLOPS:
            pf = phase_floor(G, N, M, D, dtype, phase)
            ceil = {eff: phase_floor(G, N, M, D, dtype, phase, efficiency=eff)["effective_tflops"]
                    for eff in EFFICIENCIES}
            base = dict(loss=loss, shape=",".join(f"{k}={v}" for k, v in dims), G=G, N=N, M=M, D=D, dtype=dtype,
                        phase=phase)
            for k in pf["kernels"]:
                aot = ""
                if shipped:
                    cfg = _config(k["kernel"], N, M, D, dtype)
                    aot = "yes" if (k["kernel"], dtype, cfg) in shipped else "no"
                rows.append(dict(base, kernel=k["kernel"], config=k["config"], aot_compiled=aot,
                                 gemm_units=k["units"], z_per_block=k["z_per_block"],
                                 gflop=k["flops"] / 1e9, gexp=k["exps"] / 1e9, mbytes=k["bytes"] / 1e6,
                                 stream_mbytes=k["stream_bytes"] / 1e6, bound=k["bound"],
                                 floor_ms=k["seconds"] * 1e3, effective_tflops="", tflops_at_70="",
                                 target_tflops="", target_ms=""))
            rows.append(dict(base, kernel="total", config="", aot_compiled="", gemm_units=pf["units"],
                             z_per_block="",
                             gflop=sum(k["flops"] for k in pf["kernels"]) / 1e9,
                             gexp=sum(k["exps"] for k in pf["kernels"]) / 1e9,
                             mbytes=sum(k["bytes"] for k in pf["kernels"]) / 1e6,
                             stream_mbytes=sum(k["stream_bytes"] for k in pf["kernels"]) / 1e6, bound="",
                             floor_ms=pf["seconds"] * 1e3, effective_tflops=ceil[1.0], tflops_at_70=ceil[0.7],
                             target_tflops=TARGET_TFLOPS[phase] if target else "",
                             target_ms=pf["target_seconds"] * 1e3 if target else ""))
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def aot_summary(rows: list) -> dict:
    """Counts for the report's headline: compiled, failed, with spills, over shared memory, wgmma-shaped 16-bit
    sm_90 kernels without HGMMA, tensor-core sm_80 kernels without HMMA, pipelined forwards that drain."""
    from macl_kernels.triton.aot import expects_wgmma
    ok = [r for r in rows if not r.error]
    return dict(total=len(rows), failed=len(rows) - len(ok), spills=sum(r.spills for r in ok),
                over_shared_memory=sum(not r.smem_ok for r in ok),
                sm90_16bit_large_without_hgmma=sum(expects_wgmma(r) and r.hgmma == 0 for r in ok),
                sm80_tensor_dtype_without_hmma=sum(r.arch == 80 and (r.dtype in ("bf16", "fp16") or r.precision == "tf32")
                                                   and r.hmma == 0 for r in ok))


def target_summary(roof: list[dict]) -> list[dict]:
    """Per target shape and phase: GEMM units, ceilings at 100% / 70% tensor-core efficiency, target, verdict."""
    out = []
    for r in roof:
        if r["kernel"] == "total" and r["target_tflops"] != "":
            out.append(dict(shape=f"{r['loss']} {r['shape']}", dtype=r["dtype"], phase=r["phase"],
                            gemm_units=r["gemm_units"], ceiling_100=r["effective_tflops"],
                            ceiling_70=r["tflops_at_70"], target=r["target_tflops"],
                            at_70="meets" if r["tflops_at_70"] >= r["target_tflops"] else "below"))
    return out


def _when_where() -> str:
    """'YYYY-MM-DD HH:MM UTC on <CPU model>, triton <version>' for the generated sections."""
    import platform
    import time
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "?"
    return f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {cpu}, triton {tv}"


def compiled_section(reports: Optional[list], error: str = "") -> list[str]:
    """Section 0: the compiled-code tables (`sass_model.table`, `totals`, `predictions`) and their caveats."""
    lines = ["## 0. What the compiled kernels execute (SASS main loop, per-SM cycle model)", ""]
    if reports is None:
        return lines + [f"Not run ({error or 'no report'}).", ""]
    from macl_kernels.triton.sass_model import predictions, table, totals
    lines += [f"Made {_when_where()}, no GPU. "
              "`python -m macl_kernels.triton.sass_model --all` (cache: benchmarks/results/sass_report.json; "
              "flag set label-mask-self). Per configuration: the main loop found by its backward branch in "
              "cuobjdump's SASS; `MMA per warp·iter` are the instructions one warp issues per iteration (HGMMA is "
              "one warpgroup's instruction, HMMA one warp's); `units` = executed MACs per iteration (× warpgroups "
              "or × warps) over BLOCK_M·BLOCK_N·D, `exec/useful` = units over 1 (fwd) or 2 (dq, dk, dsym) — above 1 "
              "a warp or warpgroup repeats another's work; `dsym` is the self-contrast backward (k is q: dq + dk "
              "in one kernel); `exp passes` = MUFU.EX2 lanes per z element (the forward's α rescale is an "
              "exponent-bit power of two, no MUFU); `async waits in loop` are the TTGIR's "
              "`async_wait {num}` inside the loop (0 = full drain); `bound` is the cycle model's binding resource "
              "(`x+y serial`: one CTA per SM, its MMA / shared-memory time and its softmax issue time add up).", "",
              table(reports), "", "Forward + backward (default configurations; two tensors: fwd + dq + dk, "
              "self-contrast: fwd + dsym):", "", totals(reports), "",
              "Predicted bf16 effective TFLOP/s on an H100 SXM (sm_90 defaults, N = M = 16384, G = 1; forward "
              "2·N·M·D / t, forward + backward 8·N·M·D / t). Model: per CTA iteration tensor = MACs / rate "
              "(HGMMA 2048 MAC/clk/SM bf16, mma.sync 0.625 of that — an assumption), smem = bytes / 128 B/clk "
              "(LDSM / LDS / STS / LDGSTS and wgmma operands read from shared memory), MUFU 16 lanes/clk, issue "
              "4 instructions/clk; c resident CTAs: round = max(c·max(parts), max(tensor, smem) + max(mufu, "
              "issue)); 1.83 GHz; no latency, L2 or HBM term, no prologue / epilogue.", "",
              predictions(reports), ""] + OPEN_ITEMS
    return lines


#: what section 0 does not yet show met (issue 21), with the evidence; kept beside the generated tables
OPEN_ITEMS = [
    "History (sm_90 bf16, this tool, same host): the s20 tables (commit 9ba51f4) executed 5 / 7 / 6 / 7 GEMM "
    "units forward + backward and 3.06 / 5.06 / 4.12 / 5.25 exp passes at D = 64 / 128 / 256 / 512; commit "
    "063c892 5.00 units and 3.06–3.12 exp passes (the forward's MUFU per row and key tile for α), predicted "
    "360 / 243 TFLOP/s at D = 256. Now: α is an exact power of two built from exponent bits (1.00 exp pass "
    "forward, so 3.00 in every row above) and self-contrast (k is q) runs one backward kernel, `dsym`: "
    "fwd + dsym = 3.00 units and 3.00 exp passes (self-contrast with a learnable τ launches dq + dk: the "
    "in-kernel ds sum made the SYM kernel spill).", "",
    "### What caps the prediction, and what is not done", "",
    "- **Targets not predicted** for two tensors (D = 256: forward 359 < 450, forward + backward 247 < 300): every "
    "loop runs its MMAs, waits for them (`warp_group_dot_wait {pendings = 0}` right after the dot in the "
    "TTGIR), then the softmax; with one CTA per SM (160–224 KiB of shared memory) nothing overlaps the two, so "
    "the round is tensor-or-shared-memory time plus issue time (`x+y serial`). Overlap would bring the forward "
    "at D = 256 from the serial round to its largest part (issue, ~1.9× in the model). Tried, compile-only, "
    "sm_90, bf16, D = 256, 128×64: `tl.range(..., warp_specialize=True)` (same TTGIR: no warp specialisation "
    "for this loop on sm_90 in triton 3.9) and a one-tile-ahead z (Triton still waits with pendings = 0 right "
    "after issuing it). FA3's ping-pong needs explicit warpgroup roles (Gluon or CUDA); not done. TMA not "
    "tried. Self-contrast forward + backward is predicted at 451 TFLOP/s (D = 256), above the 300 target, "
    "because it does 3 GEMM units of the nominal 4.",
    "- **z on mma.sync** in four sm_90 16-bit backward kernels. dk at D = 256 "
    "(`python -m benchmarks.sm90_tile_trials dk:256:128:64:8:3 dk:256:128:64:8:2 dk:256:32:64:8:3`): the "
    "128×64 tile (z and the gradient on wgmma, 2.00 units) no longer spills since dk takes per-anchor weights "
    "(255 registers, 0 bytes), but with 3 stages it needs 233 472 bytes of shared memory against sm_90's "
    "232 448 per block (`config.SMEM_LIMIT`; q 3 × 64 KiB, k 32 KiB, and the per-row vectors LSE, W, WY, "
    "metadata staged by the pipeliner); with 2 stages (165 888 bytes) the loop waits `async_wait {num = 0}` "
    "at its top for the q tile issued at the end of the previous iteration, which only the gradient wgmma "
    "overlaps, so it is not shipped (the model, which has no latency term, predicts 0.625 ms against the "
    "shipped 32×64 tile's 1.225 ms at N = 16384). Tried, not kept: folding W into the LSE (one vector fewer) "
    "fit the shared memory without spills for a float τ, but spilled with a tensor τ (the scale read from "
    "memory and held in a register). "
    "dq, dk and dsym at D = 512: Triton 3.9 gives a dot whose result feeds another dot all its warps on the "
    "row axis (`warpsPerCTA = [num_warps, 1]`), so a z tile on wgmma has 16·num_warps rows and its "
    "full-width fp32 accumulator 16·num_warps·512 / (32·num_warps) = 256 registers a thread at any warp "
    "count; a 64-row tile at 8 warps repeats z in the second warpgroup. Lifting it needs the accumulator split "
    "over the warpgroups along D (FA3's layout: Gluon or CUDA) or the transposed formulation (zᵀ = k qᵀ, "
    "dqᵀ = kᵀ dzᵀ), which rounds z differently from the forward's LSE. The gradient GEMMs of dk at 512 are "
    "wgmma.",
    "- **Issue slots** bound every loop beside the MMAs: the D = 256 forward issues 712 instructions per warp per "
    "128×64 tile (`issue` 1424 cycles at 8 warps: `python -m benchmarks.sm90_tile_trials fwd:256:128:64:8:3`), ~22 per z element a thread, for one exp each. Part of that is "
    "the positive rule and the masks evaluated per element (compare, select, add). Σ_{j∈P(i)} z_ij and the "
    "gradient's Y terms can be computed outside the N×M loop in O((N + M)·D) (index: a gather of k; label: "
    "per-class sums of k; radius: prefix sums of k over the sorted positions), leaving the loop the softmax "
    "alone; not done.",
    "- **Self-contrast in 2 units** (the upper-triangle scheme: half the tiles, row and column LSE partials "
    "merged in a fixed order, dx_J partials reduced deterministically) is not built; `dsym` recomputes every "
    "tile once (3 units, deterministic, no partial buffers).",
    "",
]


def render_markdown(aot: Optional[list], roof: list[dict], aot_error: str = "", compiled: Optional[list] = None,
                    compiled_error: str = "", aot_source: str = "") -> str:
    lines = ["# GPU readiness report", "",
             "Generated by `python -m benchmarks.readiness` on a machine with no GPU. Section 0 is what the "
             "compiled kernels execute per main-loop iteration and the H100 cycle model built on it (the model "
             "benchmarks/gpu_check.py divides by). Section 1 is what the "
             "shipped Triton kernel configurations compile to (Triton's own ptxas and cuobjdump"
             f"{aot_source}); sections 2 and 3 "
             f"are the {H100['name']} cost model of each benchmark shape (benchmarks/roofline.py), counted from "
             "the kernels' loops and tile sizes: a GPU sweep's `x_limit` is its measured time over the 100% floor. "
             "These are predictions and targets, not measurements.", ""]
    lines += compiled_section(compiled, compiled_error)
    lines += ["## 1. Ahead-of-time compile (sm_80, sm_90)", ""]
    if aot is None:
        lines += [f"Not run ({aot_error or '--no-aot'}).", ""]
    else:
        s = aot_summary(aot)
        lines += [f"{s['total']} compiled rows: {s['failed']} failed, {s['spills']} with register spills, "
                  f"{s['over_shared_memory']} over the arch's shared memory, "
                  f"{s['sm90_16bit_large_without_hgmma']} wgmma-shaped 16-bit sm_90 kernels without HGMMA, "
                  f"{s['sm80_tensor_dtype_without_hmma']} 16-bit/TF32 sm_80 kernels without HMMA. "
                  "`drains`: an `async_wait {num = 0}` inside a loop of the TTGIR (the loop is not overlapped "
                  "across iterations); the 16-bit forwards' key loop must not drain.", ""]
        cols = ["phase", "dtype", "precision", "D", "size_class", "arch", "flags", "default", "BLOCK_M", "BLOCK_N",
                "BLOCK_D", "BLOCK_DOUT", "num_warps", "num_stages", "registers", "shared", "spills", "hmma", "hgmma",
                "drains", "error"]
        lines += [_md_table([dict(dataclasses.asdict(r), spills="yes" if r.spills else "no",
                                  drains=r.key_loop_drains) for r in aot], cols), ""]
    lines += ["## 2. Roofline ceilings of the target shapes at 100% and 70% tensor-core efficiency", "",
              f"Targets (issue): forward ≥ {TARGET_TFLOPS['forward']:.0f}, forward+backward ≥ "
              f"{TARGET_TFLOPS['forward+backward']:.0f} effective TFLOP/s (2·N·M·D / t and 8·N·M·D / t), bf16, "
              "N = M ≥ 16384, D ∈ {256, 512}. `gemm_units`: flops the kernels execute over 2·N·M·D.", ""]
    lines += [_md_table(target_summary(roof), ["shape", "dtype", "phase", "gemm_units", "ceiling_100", "ceiling_70",
                                               "target", "at_70"]), ""]
    lines += ["## 3. Cost model per benchmark shape and kernel", "",
              f"Peaks: bf16/fp16 tensor cores {H100['mma_flops']['bfloat16'] / 1e12:.0f} TFLOP/s, TF32 "
              f"{H100['mma_flops']['tf32'] / 1e12:.0f}, fp32 FMA {H100['mma_flops']['float32'] / 1e12:.0f}; exp "
              f"{H100['exp_per_s'] / 1e12:.1f} T/s; HBM {H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s. "
              "Kernel floor = max(flops, exponentials, compulsory bytes over their peak); phase floor = sum over "
              "kernels. `z_per_block`: how often each (row tile, key tile) block of z is computed in that kernel "
              "(> 1 only for the fp32 IEEE backward, which splits output columns over the grid). "
              "`effective_tflops` / `tflops_at_70`: the phase's ceiling at 100% / 70% tensor-core efficiency. "
              "`aot_compiled` says whether the configuration the chooser picks is among section 1's.", ""]
    cols = ["loss", "shape", "dtype", "phase", "kernel", "config", "aot_compiled", "gemm_units", "z_per_block",
            "gflop", "gexp", "mbytes", "stream_mbytes", "bound", "floor_ms", "effective_tflops", "tflops_at_70",
            "target_tflops"]
    lines += [_md_table(roof, cols), ""]
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "gpu_readiness.md"))
    ap.add_argument("--csv-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, help="compile workers (default: CPU count)")
    ap.add_argument("--no-tf32", action="store_true", help="skip the TF32 variants of fp32")
    ap.add_argument("--no-aot", action="store_true", help="roofline only")
    ap.add_argument("--full", action="store_true", help="AOT: every flag set for every configuration")
    ap.add_argument("--aot-csv", help="reuse the AOT rows of this readiness_aot.csv instead of compiling")
    a = ap.parse_args(argv)
    aot, err = None, ""
    if a.aot_csv:
        aot = read_aot_csv(a.aot_csv)
    elif not a.no_aot:
        try:
            aot = aot_rows(a.arch, jobs=a.jobs, tf32=not a.no_tf32, full=a.full)
        except Exception as e:  # Triton missing or broken: still write the roofline
            err = f"{type(e).__name__}: {e}"
    compiled, c_err = None, ""
    try:
        from macl_kernels.triton.sass_report import load_or_build, report_entries
        compiled = load_or_build(report_entries(tuple(a.arch)), jobs=a.jobs)
    except Exception as e:  # Triton missing or broken: still write the roofline
        c_err = f"{type(e).__name__}: {e}"
    roof = roofline_table()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        src = f"; rows read back from {os.path.relpath(a.aot_csv, ROOT)} by --aot-csv" if a.aot_csv else ""
        f.write(render_markdown(aot, roof, err, compiled, c_err, src))
    write_csv(os.path.join(a.csv_dir, "readiness_roofline.csv"), roof)
    if aot is not None and not a.aot_csv:
        write_csv(os.path.join(a.csv_dir, "readiness_aot.csv"),
                  [dict(dataclasses.asdict(r), spills=r.spills) for r in aot])
        s = aot_summary(aot)
        print(f"AOT: {s}")
    print(f"wrote {a.out}")
    bad = aot is not None and any(aot_summary(aot)[k] for k in ("failed", "spills", "over_shared_memory"))
    return 1 if (err or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
