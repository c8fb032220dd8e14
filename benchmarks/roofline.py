"""Cost model of the Triton kernels on an H100 (SXM): from the compiled code (`compiled_phase`) and, for
reference, from their loop structure and tile sizes (`kernel_floor`, `phase_floor`).

`compiled_phase` is the one the GPU check and docs/gpu_readiness.md use: the sm_90 default configurations'
SASS main loops (executed MMA work with the warps / warpgroups that issue it, MUFU, shared-memory traffic,
instructions) through the per-SM cycle model of `macl_kernels.triton.sass_model`, read from the cached
analysis in benchmarks/results/sass_report.json (compiled on a cache miss). The source-loop model below
cannot see work the compiler duplicates (a second warpgroup repeating the first's z tile): it counts what the
loops ask for, at a tensor-core efficiency the caller assumes.

For each kernel launch the configuration comes from `macl_kernels.triton.config.choose_config` (the tile sizes
the launcher uses where nothing tunes), and the work is counted the way the kernels loop (kernels_fwd.py,
kernels_bwd.py):
  fwd: one program per (group, BLOCK_M row tile); each loops over ⌈M/BLOCK_N⌉ key tiles and computes the
       z tile once (a BLOCK_M×BLOCK_N×(⌈D/BLOCK_D⌉·BLOCK_D) dot) and BLOCK_M·BLOCK_N exponentials.
  dq:  one program per (group, row tile, D-output chunk): n_dout = ⌈D/BLOCK_DOUT⌉ (1 for the full-width
       tensor-core configurations); per key tile: z once + dq chunk (BLOCK_M×BLOCK_N×BLOCK_DOUT), exps.
  dk:  one program per (group, key tile, D-output chunk), looping over row tiles: z once + dk chunk, exps.
GEMM units = counted flops / (2·G·N·M·D) (padding of partial tiles included), so a design that recomputes
z per output chunk shows (n_dout + 1) units per backward kernel. Bytes: compulsory HBM traffic (q and k read
once, metadata, statistics, gradients written once); `stream_bytes` adds what the loops re-read (k per row
tile, q per key tile), which L2 usually serves, reported for information.
Time of a kernel at tensor-core efficiency η = max(flops / (η·peak), exponentials / MUFU rate, bytes / HBM);
a phase sums its kernels. "Effective TFLOP/s" follows the benchmark issue: forward 2·N·M·D·G / t,
forward+backward 8·N·M·D·G / t. The ceiling at η = 1 is the floor of the old report; η = 0.7 is what a
well-tuned fused kernel reaches (FlashAttention-3 reports ~75% of H100 bf16 peak in the forward).
"""
from __future__ import annotations

import math
from typing import Optional

from macl_kernels.triton.sass_model import PHASE_KERNELS, TARGETS

#: H100 SXM5 dense peaks (NVIDIA's H100 datasheet; exp: 16 MUFU.EX2 per SM per clock, 132 SMs, ~1.83 GHz)
H100 = {
    "name": "H100 SXM5",
    "mma_flops": {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "exp_per_s": 3.9e12,
    "hbm_bytes_per_s": 3.35e12,
}
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}
#: the two-tensor phases of the compiled-code model (the loop model here has no self-contrast kernel)
KERNELS = {ph: ks for ph, ks in PHASE_KERNELS.items() if "dsym" not in ks}
#: the issue's GPU targets: effective TFLOP/s (bf16, N = M ≥ 16384, D ∈ {256, 512})
TARGET_TFLOPS = {ph: TARGETS[ph] for ph in KERNELS}
#: tensor-core efficiencies the report shows ceilings at
EFFICIENCIES = (1.0, 0.7)


def _config(phase: str, N: int, M: int, D: int, dtype: str, precision: str = "ieee"):
    """The configuration `choose_config` gives the launch on an sm_90 device (raises ImportError without torch /
    the package)."""
    import torch

    from macl_kernels.triton.config import choose_config
    return choose_config(phase, N, M, D, getattr(torch, dtype), precision, arch=90)   # the H100's table


def loop_counts(kernel: str, G: int, N: int, M: int, D: int, cfg) -> dict:
    """Programs, inner-loop iterations and the padded per-iteration work of one kernel with config `cfg`.

    Returns dict(programs, iterations (per program), z_flops, out_flops, exps (per iteration), z_per_block
    (how many times each (row tile, key tile) block of z is computed in this kernel)).
    """
    row_tiles, key_tiles = math.ceil(N / cfg.BLOCK_M), math.ceil(M / cfg.BLOCK_N)
    d_pad = math.ceil(D / cfg.BLOCK_D) * cfg.BLOCK_D
    tile = cfg.BLOCK_M * cfg.BLOCK_N
    if kernel == "fwd":
        return dict(programs=G * row_tiles, iterations=key_tiles, z_flops=2.0 * tile * d_pad, out_flops=0.0,
                    exps=float(tile), z_per_block=1)
    n_dout = cfg.n_dout(D)
    own = row_tiles if kernel == "dq" else key_tiles
    loop = key_tiles if kernel == "dq" else row_tiles
    return dict(programs=G * own * n_dout, iterations=loop, z_flops=2.0 * tile * d_pad,
                out_flops=2.0 * tile * cfg.BLOCK_DOUT, exps=float(tile), z_per_block=n_dout)


def kernel_floor(kernel: str, G: int, N: int, M: int, D: int, dtype: str = "bfloat16", precision: str = "ieee",
                 gpu: dict = H100, efficiency: float = 1.0) -> dict:
    """Flops, GEMM units, exponentials, bytes and the time (s) of one kernel ('fwd', 'dq', 'dk') on `gpu`
    at tensor-core `efficiency`, counted from the kernel's loops and tile sizes (module docstring)."""
    e = ELEM[dtype]
    cfg = _config(kernel, N, M, D, dtype, precision)
    lc = loop_counts(kernel, G, N, M, D, cfg)
    n_iter = lc["programs"] * lc["iterations"]
    flops = n_iter * (lc["z_flops"] + lc["out_flops"])
    exps = n_iter * lc["exps"]
    units = flops / (2.0 * G * N * M * D) if G * N * M * D else 0.0
    rows, keys = G * N, G * M
    meta = 4 * (rows + keys) + rows + keys                         # int32 metadata, uint8 validity
    byts = e * (rows + keys) * D + meta + 12 * rows                # q, k; count in, loss and lse out
    if kernel == "dq":
        byts += 4 * rows + e * rows * D                            # grad in; dq out
    elif kernel == "dk":
        byts += 4 * rows + e * keys * D                            # grad in; dk out
    # re-reads by the loops: k (or q) once per program, q (or k) per program for the resident tile
    streamed = (M if kernel in ("fwd", "dq") else N) * D * e
    stream = lc["programs"] * streamed + e * (rows if kernel != "dk" else keys) * D * (cfg.n_dout(D) if kernel != "fwd" else 1)
    mma_key = "tf32" if (dtype == "float32" and precision == "tf32") else dtype
    t_mma = flops / (gpu["mma_flops"][mma_key] * efficiency)
    t_exp = exps / gpu["exp_per_s"]
    t_mem = byts / gpu["hbm_bytes_per_s"]
    bound = max((t_mma, "tensor cores"), (t_exp, "exp (MUFU)"), (t_mem, "HBM"))
    return dict(kernel=kernel, flops=float(flops), units=units, z_per_block=lc["z_per_block"], exps=float(exps),
                bytes=float(byts), stream_bytes=float(max(stream, byts)), t_mma=t_mma, t_exp=t_exp, t_mem=t_mem,
                seconds=bound[0], bound=bound[1],
                config=f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_D}"
                f"{'/' + str(cfg.BLOCK_DOUT) if cfg.BLOCK_DOUT else ''} w{cfg.num_warps} s{cfg.num_stages}")


def phase_floor(G: int, N: int, M: int, D: int, dtype: str = "bfloat16", phase: str = "forward+backward",
                precision: str = "ieee", gpu: dict = H100, efficiency: float = 1.0) -> dict:
    """The phase's kernels (`kernel_floor` each), summed time and GEMM units, effective TFLOP/s at that time."""
    ks = [kernel_floor(k, G, N, M, D, dtype, precision, gpu, efficiency) for k in KERNELS[phase]]
    seconds = sum(k["seconds"] for k in ks)
    nominal = (2.0 if phase == "forward" else 8.0) * G * N * M * D
    return dict(kernels=ks, seconds=seconds, units=sum(k["units"] for k in ks),
                exp_passes=sum(k["exps"] for k in ks) / max(G * N * M, 1),
                effective_tflops=nominal / seconds / 1e12,
                target_seconds=nominal / (TARGET_TFLOPS[phase] * 1e12))


def ceilings(G: int, N: int, M: int, D: int, dtype: str = "bfloat16", phase: str = "forward+backward",
             precision: str = "ieee", gpu: dict = H100) -> dict:
    """Effective TFLOP/s ceiling of a phase at each tensor-core efficiency of `EFFICIENCIES`."""
    return {eff: phase_floor(G, N, M, D, dtype, phase, precision, gpu, eff)["effective_tflops"]
            for eff in EFFICIENCIES}


_DT = {"bfloat16": "bf16", "float16": "fp16"}


def compiled_reports(arch: int = 90) -> list:
    """The compiled-code analysis of the default large-tile configurations of `arch` (16-bit and TF32)."""
    from macl_kernels.triton.sass_report import load_or_build, report_entries
    return load_or_build(report_entries((arch,), defaults_only=True))


def compiled_phase(N: int, M: int, D: int, dtype: str = "bfloat16", phase: str = "forward+backward",
                   arch: int = 90, reports: Optional[list] = None) -> dict:
    """Predicted time and effective TFLOP/s of a phase (G = 1) from the compiled kernels' cycle model.

    phase: 'forward' | 'forward+backward' (fwd + dq + dk) | 'self-contrast forward+backward' (fwd + dsym).
    Returns dict(seconds, effective_tflops, units (executed GEMM units of the phase's kernels as compiled),
    exp_passes, bound (per kernel), kernels). Raises ValueError for a dtype / D the report does not hold."""
    from macl_kernels.triton.sass_model import predict
    if dtype not in _DT:
        raise ValueError(f"compiled model covers bfloat16 / float16, got {dtype!r}")
    reps = compiled_reports(arch) if reports is None else reports
    p = predict(reps, D, N, M, _DT[dtype], arch, phase)
    rows = [r for r in reps if r.default and r.D == D and r.dtype == _DT[dtype] and r.arch == arch
            and r.precision != "tf32" and r.phase in PHASE_KERNELS[phase]]
    return dict(seconds=p["seconds"], effective_tflops=p["tflops"], bound=p["bound"], kernels=p["kernels"],
                units=sum(r.units for r in rows), exp_passes=sum(r.exp_passes for r in rows))
