"""Roofline floor of the Triton kernels on an H100 (SXM), per kernel and per phase: no GPU needed.

Per kernel launch over G groups of N anchors × M keys × D features (KERNELS.md §4 and §6):
  fwd: z = q kᵀ (1 GEMM unit = 2·G·N·M·D flops), 1 exp pass (G·N·M exponentials)
  dq:  z again + dq = P k (2 units), 1 exp pass        dk: z again + dk = Pᵀ q (2 units), 1 exp pass
  forward = fwd; forward+backward = fwd + dq + dk = 5 units + 3 exp passes (the deterministic backward).
Bytes: compulsory HBM traffic (q and k read once, per-row statistics and metadata, gradients written once);
`stream_bytes` adds the re-reads of k (fwd, dq: once per row tile) and q (dk: once per key tile) that the
tiling implies, which L2 usually serves, and is reported for information.
Floor of a kernel = max(flops / tensor-core peak, exponentials / MUFU rate, compulsory bytes / HBM bandwidth);
floor of a phase = the sum over its kernels. "Effective TFLOP/s" follows the benchmark issue: forward
2·N·M·D·G / t, forward+backward 8·N·M·D·G / t.
"""
from __future__ import annotations

import math

#: H100 SXM5 dense peaks (NVIDIA's H100 datasheet; exp: 16 MUFU.EX2 per SM per clock, 132 SMs, ~1.83 GHz)
H100 = {
    "name": "H100 SXM5",
    "mma_flops": {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "exp_per_s": 3.9e12,
    "hbm_bytes_per_s": 3.35e12,
}
ELEM = {"bfloat16": 2, "float16": 2, "float32": 4}
KERNELS = {"forward": ("fwd",), "forward+backward": ("fwd", "dq", "dk")}
#: the issue's GPU targets: effective TFLOP/s (bf16, N = M ≥ 16384, D ∈ {256, 512})
TARGET_TFLOPS = {"forward": 450.0, "forward+backward": 300.0}


def _config(phase: str, N: int, M: int, D: int, dtype: str):
    try:
        import torch

        from macl_kernels.triton.config import choose_config
        return choose_config(phase, N, M, D, getattr(torch, dtype))
    except Exception:  # the chooser is not importable: report without tile sizes
        return None


def kernel_floor(kernel: str, G: int, N: int, M: int, D: int, dtype: str = "bfloat16", precision: str = "ieee",
                 gpu: dict = H100) -> dict:
    """Flops, exponentials, bytes and the floor (s) of one kernel ('fwd', 'dq', 'dk') on `gpu`."""
    e = ELEM[dtype]
    units = 1 if kernel == "fwd" else 2
    flops = units * 2.0 * G * N * M * D
    exps = float(G * N * M)
    rows, keys = G * N, G * M
    meta = 8 * (rows + keys) + rows + keys                         # int64 metadata, bool validity
    if kernel == "fwd":
        byts = e * (rows + keys) * D + meta + 12 * rows            # loss, lse fp32, count int32 out
    elif kernel == "dq":
        byts = e * (rows + keys) * D + meta + 12 * rows + e * rows * D   # + lse, count, grad in; dq out
    else:
        byts = e * (rows + keys) * D + meta + 12 * rows + e * keys * D   # dk out
    cfg = _config(kernel, N, M, D, dtype)
    stream = byts
    if cfg is not None:
        if kernel in ("fwd", "dq"):
            stream += e * G * (math.ceil(N / cfg.BLOCK_M) - 1) * M * D
        else:
            stream += e * G * (math.ceil(M / cfg.BLOCK_N) - 1) * N * D
    mma_key = "tf32" if (dtype == "float32" and precision == "tf32") else dtype
    t_mma = flops / gpu["mma_flops"][mma_key]
    t_exp = exps / gpu["exp_per_s"]
    t_mem = byts / gpu["hbm_bytes_per_s"]
    bound = max((t_mma, "tensor cores"), (t_exp, "exp (MUFU)"), (t_mem, "HBM"))
    return dict(kernel=kernel, flops=flops, exps=exps, bytes=float(byts), stream_bytes=float(stream),
                t_mma=t_mma, t_exp=t_exp, t_mem=t_mem, seconds=bound[0], bound=bound[1],
                config="" if cfg is None else f"{cfg.BLOCK_M}x{cfg.BLOCK_N}x{cfg.BLOCK_D}"
                f"{'/' + str(cfg.BLOCK_DOUT) if cfg.BLOCK_DOUT else ''} w{cfg.num_warps} s{cfg.num_stages}")


def phase_floor(G: int, N: int, M: int, D: int, dtype: str = "bfloat16", phase: str = "forward+backward",
                precision: str = "ieee", gpu: dict = H100) -> dict:
    """The phase's kernels (`kernel_floor` each), their summed floor, and the effective TFLOP/s at that floor."""
    ks = [kernel_floor(k, G, N, M, D, dtype, precision, gpu) for k in KERNELS[phase]]
    seconds = sum(k["seconds"] for k in ks)
    nominal = (2.0 if phase == "forward" else 8.0) * G * N * M * D
    return dict(kernels=ks, seconds=seconds, effective_tflops=nominal / seconds / 1e12,
                target_seconds=nominal / (TARGET_TFLOPS[phase] * 1e12))
