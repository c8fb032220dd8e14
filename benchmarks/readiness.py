"""The GPU readiness report, made with no GPU: what the Triton kernels compile to, and how fast they could be.

    python -m benchmarks.readiness                   # docs/gpu_readiness.md + benchmarks/results/readiness_*.csv
    python -m benchmarks.readiness --no-aot          # roofline only (seconds)
    python -m benchmarks.readiness --arch 90 --jobs 2

1. Ahead-of-time compile (macl_kernels.aot): every shipped kernel configuration for sm_80 and sm_90 (fp32
   also with TF32 dots): registers, shared memory, spills (stack / local memory / LDL / STL), HMMA / HGMMA
   counts, compile errors.
2. Roofline (benchmarks/roofline.py): for each shape of the GPU benchmark grid (and the issue's target
   shapes) and each phase, the kernels' flops, exponentials and bytes, the H100 floor, the effective TFLOP/s
   at that floor and, for the target shapes, the time the targets ask for. Each kernel also says which
   configuration `choose_config` picks and whether that configuration is among the AOT-compiled ones.
A GPU run is judged against section 2: `x_limit` in a CUDA sweep is measured time / floor.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from typing import Optional, Sequence

from .cases import problem
from .roofline import H100, TARGET_TFLOPS, _config, phase_floor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the issue's GPU target shapes: H100, bf16, N = M ≥ 16384, D ∈ {256, 512}
TARGET_SHAPES = [("info_nce", (("D", d), ("N", n)), "bfloat16") for n in (16384, 65536) for d in (256, 512)]


def aot_rows(archs: Sequence[int] = (80, 90), entries=None, jobs: Optional[int] = None, tf32: bool = True) -> list:
    """`macl_kernels.aot.run_report` rows (AotRow) for the shipped configurations (or `entries`).

    TRITON_INTERPRET is removed from the environment during the compile (restored after): with it set, as in
    the test session, triton 3.9's compile of the kernels fails ("'value' object has no attribute 'dtype'").
    """
    from macl_kernels.aot import run_report
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        return run_report(archs, entries=entries, jobs=jobs, tf32=tf32)
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


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
    return {(e.phase, str(e.dtype).replace("torch.", ""), e.D, e.config) for e in shipped_configs()}


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
            base = dict(loss=loss, shape=",".join(f"{k}={v}" for k, v in dims), G=G, N=N, M=M, D=D, dtype=dtype,
                        phase=phase)
            for k in pf["kernels"]:
                aot = ""
                if shipped:
                    cfg = _config(k["kernel"], N, M, D, dtype)
                    aot = "yes" if (k["kernel"], dtype, D, cfg) in shipped else "no"
                rows.append(dict(base, kernel=k["kernel"], config=k["config"], aot_compiled=aot,
                                 gflop=k["flops"] / 1e9, gexp=k["exps"] / 1e9, mbytes=k["bytes"] / 1e6,
                                 stream_mbytes=k["stream_bytes"] / 1e6, bound=k["bound"],
                                 floor_ms=k["seconds"] * 1e3, effective_tflops="", target_ms=""))
            rows.append(dict(base, kernel="total", config="", aot_compiled="",
                             gflop=sum(k["flops"] for k in pf["kernels"]) / 1e9,
                             gexp=sum(k["exps"] for k in pf["kernels"]) / 1e9,
                             mbytes=sum(k["bytes"] for k in pf["kernels"]) / 1e6,
                             stream_mbytes=sum(k["stream_bytes"] for k in pf["kernels"]) / 1e6, bound="",
                             floor_ms=pf["seconds"] * 1e3, effective_tflops=pf["effective_tflops"],
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
    """Counts for the report's headline: compiled, failed, with spills, 16-bit sm_90 large tiles without HGMMA."""
    failed = [r for r in rows if r.error]
    spills = [r for r in rows if not r.error and r.spills]
    no_wgmma = [r for r in rows if not r.error and r.arch == 90 and r.dtype in ("bf16", "fp16")
                and r.size_class == "large" and r.hgmma == 0]
    no_mma = [r for r in rows if not r.error and r.arch == 80 and (r.dtype in ("bf16", "fp16") or r.precision == "tf32")
              and r.hmma == 0]
    return dict(total=len(rows), failed=len(failed), spills=len(spills), sm90_16bit_large_without_hgmma=len(no_wgmma),
                sm80_tensor_dtype_without_hmma=len(no_mma))


def render_markdown(aot: Optional[list], roof: list[dict], aot_error: str = "") -> str:
    lines = ["# GPU readiness report", "",
             "Generated by `python -m benchmarks.readiness` on a machine with no GPU. Section 1 is what the "
             "shipped Triton kernel configurations compile to (Triton's own ptxas and cuobjdump); section 2 is "
             f"the {H100['name']} roofline floor of each benchmark shape (benchmarks/roofline.py): "
             "a GPU sweep's `x_limit` is its measured time over this floor. These are predictions and targets, "
             "not measurements.", ""]
    lines += ["## 1. Ahead-of-time compile (sm_80, sm_90)", ""]
    if aot is None:
        lines += [f"Not run ({aot_error or '--no-aot'}).", ""]
    else:
        s = aot_summary(aot)
        lines += [f"{s['total']} compiled rows: {s['failed']} failed, {s['spills']} with register spills, "
                  f"{s['sm90_16bit_large_without_hgmma']} 16-bit large-tile sm_90 kernels without HGMMA, "
                  f"{s['sm80_tensor_dtype_without_hmma']} 16-bit/TF32 sm_80 kernels without HMMA.", ""]
        cols = ["phase", "dtype", "precision", "D", "size_class", "arch", "BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DOUT",
                "num_warps", "num_stages", "registers", "shared", "spills", "hmma", "hgmma", "error"]
        lines += [_md_table([dict(dataclasses.asdict(r), spills="yes" if r.spills else "no") for r in aot], cols), ""]
    lines += ["## 2. Roofline floor on an H100 per benchmark shape", "",
              f"Peaks: bf16/fp16 tensor cores {H100['mma_flops']['bfloat16'] / 1e12:.0f} TFLOP/s, TF32 "
              f"{H100['mma_flops']['tf32'] / 1e12:.0f}, fp32 FMA {H100['mma_flops']['float32'] / 1e12:.0f}; exp "
              f"{H100['exp_per_s'] / 1e12:.1f} T/s; HBM {H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s. "
              "Kernel floor = max(flops, exponentials, compulsory bytes over their peak); phase floor = sum over "
              "kernels (forward: fwd; forward+backward: fwd + dq + dk = 5 GEMM units + 3 exp passes). "
              f"Targets (issue): forward ≥ {TARGET_TFLOPS['forward']:.0f}, forward+backward ≥ "
              f"{TARGET_TFLOPS['forward+backward']:.0f} effective TFLOP/s (2·N·M·D / t and 8·N·M·D / t), bf16, "
              "N = M ≥ 16384, D ∈ {256, 512}: target_ms is the time that meets them. `aot_compiled` says whether "
              "the configuration the chooser picks for that D is among the compiled ones of section 1.", ""]
    cols = ["loss", "shape", "dtype", "phase", "kernel", "config", "aot_compiled", "gflop", "gexp", "mbytes",
            "stream_mbytes", "bound", "floor_ms", "effective_tflops", "target_ms"]
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
    a = ap.parse_args(argv)
    aot, err = None, ""
    if not a.no_aot:
        try:
            aot = aot_rows(a.arch, jobs=a.jobs, tf32=not a.no_tf32)
        except Exception as e:  # Triton missing or broken: still write the roofline
            err = f"{type(e).__name__}: {e}"
    roof = roofline_table()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(render_markdown(aot, roof, err))
    write_csv(os.path.join(a.csv_dir, "readiness_roofline.csv"), roof)
    if aot is not None:
        write_csv(os.path.join(a.csv_dir, "readiness_aot.csv"),
                  [dict(dataclasses.asdict(r), spills=r.spills) for r in aot])
        s = aot_summary(aot)
        print(f"AOT: {s}")
    print(f"wrote {a.out}")
    bad = aot is not None and (aot_summary(aot)["failed"] or aot_summary(aot)["spills"])
    return 1 if (err or bad) else 0


if __name__ == "__main__":
    sys.exit(main())
