"""Launch configurations of the Triton kernels: a small list per (phase, precision, D class, size class).

`config_list` gives the candidates of one launch; its first entry is the fixed, deterministic default
(`choose_config`), used wherever no GPU tunes (the interpreter, the ahead-of-time compile, or a GPU with
MACL_TRITON_AUTOTUNE=0). On a real GPU `autotune.py` times the candidates once per problem class and keeps
the fastest. `shipped_configs` lists every candidate of every class, so that `macl_kernels.triton.aot` compiles each
one for sm_80 and sm_90 and checks registers, spills, shared memory and tensor-core instructions.

Shape rules (KERNELS.md §4, README "Block choice"):
- 16-bit and TF32: BLOCK_D ≥ D for D ≤ 512 (16-bit) / 128 (TF32): the forward keeps the q tile resident for
  the whole key loop, which is the software-pipelined loop (num_stages 3: two key tiles in flight). The
  backward kernels own the full output width (BLOCK_DOUT ≥ D): z is computed once per (row tile, key tile)
  per kernel, and the block shrinks as D grows so the fp32 accumulator fits the registers.
- fp32 IEEE dots run on FMA units with operands in registers: small BLOCK_D, and the backward splits the
  output columns over the grid (BLOCK_DOUT < D), recomputing z per chunk; not a tensor-core path.
- BLOCK_D depends on (precision, D) only, never on the candidate: the backward recomputes z with the
  forward's chunking (z must round as it did against the saved LSE).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

#: "dsym": the self-contrast backward (k is q; the dq kernel with SYM, one launch for dq + dk), dq's tiles
PHASES = ("fwd", "dq", "dk", "dsym")
SIZE_CLASSES = ("s16", "s32", "large")
#: representative (N, M) of each size class, for the AOT report
SIZE_EXAMPLES = {"s16": (16, 16), "s32": (32, 32), "large": (4096, 4096)}
SHIPPED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: D values whose classes are compiled ahead of time (120: D % 8 ≠ 0 of a non-power-of-two width)
SHIPPED_D = (16, 64, 120, 128, 256, 512, 1024)
#: shared memory per block that every shipped configuration fits (sm_80's 163 KiB opt-in maximum)
SMEM_LIMIT = {80: 166912, 90: 232448}
#: the configuration tables: sm_80 (mma.sync; also sm_86 / sm_89) and sm_90 (wgmma)
ARCHS = (80, 90)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel launch.

    BLOCK_M anchors × BLOCK_N keys per z tile; z accumulates over D in BLOCK_D chunks; the backward
    kernels own BLOCK_DOUT output columns each (0 for the forward; ≥ D means the full width, one program
    per tile). All blocks are powers of two ≥ 16 (tl.dot's minimum).
    """
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    BLOCK_DOUT: int = 0
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: Optional[int] = None   # register cap handed to ptxas (.maxnreg); None: ptxas decides

    def launch_options(self) -> dict:
        """Triton compile options (num_warps, num_stages[, maxnreg])."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts

    def constexprs(self) -> dict:
        """The BLOCK_* kernel constexprs (BLOCK_DOUT only for the backward kernels)."""
        c = {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_D": self.BLOCK_D}
        if self.BLOCK_DOUT:
            c["BLOCK_DOUT"] = self.BLOCK_DOUT
        return c

    def n_dout(self, D: int) -> int:
        """Number of D-output chunks (grid factor of the backward kernels); 1 for the full-width configs."""
        return max(1, -(-D // self.BLOCK_DOUT)) if self.BLOCK_DOUT else 1


@dataclass(frozen=True)
class ShippedConfig:
    """One entry of `shipped_configs`: a candidate configuration, and the class it serves."""
    phase: str
    dtype: torch.dtype
    D: int
    size_class: str
    config: KernelConfig
    precision: str = "ieee"         # tl.dot input_precision: "ieee" | "tf32" (fp32 only)
    default: bool = True            # first of its list: the configuration used where nothing tunes
    arch: int = 80                  # the SM version whose table it comes from (80: sm_80 / sm_89; 90: sm_90)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def size_class(N: int, M: int) -> str:
    """'s16' / 's32' when both N and M fit one 16 / 32 block (e.g. MACL's dense groups of 2B), else 'large'."""
    n = max(N, M)
    return "s16" if n <= 16 else "s32" if n <= 32 else "large"


def kind(dtype: torch.dtype, precision: str = "ieee") -> str:
    """'16bit' (fp16/bf16), 'tf32' (fp32 with TF32 dots) or 'fp32' (IEEE fp32 on FMA units)."""
    if dtype in (torch.float16, torch.bfloat16):
        return "16bit"
    return "tf32" if precision == "tf32" else "fp32"


def block_d(D: int, dtype: torch.dtype, precision: str = "ieee", small: bool = False) -> int:
    """z's D chunk: one chunk (the resident q / k tile) up to 512 (16-bit) / 128 (TF32), else fixed chunks
    (128 for 16-bit; 64 for the one-tile small classes, whose 1024-wide chunks spilled)."""
    d = max(16, _pow2(D))
    k = kind(dtype, precision)
    if k == "16bit":
        return d if d <= 512 else (64 if small else 128)
    if k == "tf32":
        return d if d <= 128 else 32
    return 16


def _C(bm, bn, bd, bo, w, st, reg=None) -> KernelConfig:
    return KernelConfig(bm, bn, bd, bo, num_warps=w, num_stages=st, maxnreg=reg)


def _small_cap(warps: int) -> int:
    return min(255, 65536 // (2 * 32 * warps))          # registers per thread for 2 CTAs per SM


def _small(phase: str, b: int, d: int, bd: int, k: str) -> list[KernelConfig]:
    """One tile per group (MACL's dense groups of 2B): a single key tile, so no pipeline to deepen.
    maxnreg: left alone, ptxas caps these small CTAs at ~80 registers and spills; the explicit cap lets two
    CTAs share an SM where that fits, else the whole file (wide D)."""
    if phase == "fwd":
        if k == "fp32":
            return [_C(b, b, bd, 0, 4, 1, 255)]
        w = 4 if b == 32 else 2
        return [_C(b, b, bd, 0, w, 1, _small_cap(w))]
    w = 8 if b == 32 else 4
    if k == "fp32":
        return [_C(b, b, bd, min(d, 64), w, 1, _small_cap(w))]
    if d >= 1024:      # full-width accumulator: 16 own rows (as the large class); shapes from the AOT report
        if phase == "dq":
            return [_C(16, b, bd, d, 8, 1, 255)]
        return [_C(16, 16, bd, d, 16, 1)] if k == "16bit" else [_C(16, 16, bd, d, 8, 1, 255)]
    return [_C(b, b, bd, d, w, 1, _small_cap(w) if d <= 64 else 255)]


def _backward(phase: str, cands, bd: int, d: int) -> list[KernelConfig]:
    """Full-width backward configs from (own, streamed, warps, stages): own = the block whose gradient rows a
    program accumulates (anchors for dq, keys for dk)."""
    out = []
    for own, other, w, st in cands:
        bm, bn = (own, other) if phase == "dq" else (other, own)
        out.append(_C(bm, bn, bd, d, w, st, 255))
    return out


def _large(phase: str, d: int, bd: int, k: str) -> list[KernelConfig]:
    """maxnreg 255 everywhere: uncapped, ptxas aimed at 2–3 CTAs per SM (128 / 168 registers) and spilled a
    few words in many of these shapes (AOT report)."""
    R = 255
    if k == "fp32":   # FMA dots: operands in registers, output columns split over the grid, no D pipeline
        if phase == "fwd":
            return [_C(64, 64, 16, 0, 8, 2, R)]
        if d == 16:
            return [_C(64, 64, 16, 16, 4, 1, R)]
        return [_C(64, 64, 16, min(d, 32 if phase == "dq" else 64), 8, 1, R)]
    if phase == "fwd":
        if k == "tf32":
            return [_C(64, 64, bd, 0, 8, 3, R)]
        if d <= 128:
            return [_C(128, 64, bd, 0, 8, 3, R), _C(128, 128, bd, 0, 8, 3, R), _C(64, 64, bd, 0, 4, 4, R)]
        if d == 256:   # 128×64 spilled on sm_80 (the q operand stays in registers for mma.sync)
            return [_C(128, 32, bd, 0, 8, 3, R), _C(64, 64, bd, 0, 4, 3, R)]
        if d == 512:
            return [_C(64, 32, bd, 0, 8, 3, R), _C(64, 32, bd, 0, 4, 3, R)]
        return [_C(128, 64, bd, 0, 8, 3, R)]
    # backward: full output width; (own, other) = (block whose gradient rows the program accumulates, block
    # it streams). At D = 512 the 64-row fp32 accumulator (128 registers a thread) spilled in every 64-row
    # shape tried (64×32 and 64×16, 8 or 16 warps): 32 × 32 there (mma.sync: no wgmma for 32 rows), 16 own
    # rows at D = 1024.
    # No warp repeats another's z rows (sass_model): a z tile that feeds the second dot gets its warps on
    # one axis, so 8 warps need 128 rows ([8, 1]) or ≥ 64 columns ([1, 8]); the 32×32 tiles at 8 warps, the
    # 64×32 dq tile and the 64×64 tiles at [8, 1] computed z twice.
    if k == "tf32":    # fp32 operands: twice the bytes; at D ≥ 256 the D-chunked z spreads 8 warps as [2, 4]
        cands = [(32, 32, 4, 3)] if d <= 128 else [(32, 32, 8, 2)] if d <= 512 else [(16, 16, 8, 2)]
    elif d <= 64:
        cands = [(64, 64, 4, 3), (128, 64, 8, 3)] if phase == "dq" else [(64, 64, 4, 3)]
    elif d == 128:
        cands = [(64, 64, 8, 3)] if phase == "dq" else [(64, 64, 8, 3), (64, 32, 8, 3)]
    elif d == 256:
        cands = [(32, 64, 8, 3)] if phase == "dq" else [(64, 32, 8, 3)]
    elif d == 512:     # 3 stages of 32×512 and 64×512 tiles pass sm_80's 163 KiB
        cands = [(32, 64, 8, 2)] if phase == "dq" else [(64, 32, 8, 2)]
    else:
        cands = [(16, 32, 8, 2)]
    return _backward(phase, cands, bd, d)


def _large_sm90(phase: str, d: int, bd: int, k: str, aligned: bool = True) -> list[KernelConfig]:
    """sm_90 (wgmma) tiles, read from the compiled code (`sass_model`): no warp or warpgroup repeats another's
    z tile, 16-bit loops pipelined with ≥ 2 copies in flight (3 stages), no spills.

    Triton gives a dot whose result feeds another dot (z → dq / dk) warpsPerCTA = [num_warps, 1]: at 8 warps
    the z tile needs 128 rows (two warpgroups of 64), else the second warpgroup repeats the first's rows
    (the dq / dk tiles of 64 rows at 8 warps computed z twice). The full-width fp32 accumulator of a
    64-row warpgroup needs D/2 registers a thread, so own-row blocks of 128 (8 warps) fit up to D = 256;
    at D = 512 the backward keeps 32-row z tiles on mma.sync (dq entirely; dk's own 64-key gradient GEMM
    is split over the two warpgroups, [4, 2], and runs on wgmma). `aligned`: D % 16 == 0; other D (e.g. 120)
    keep their loads synchronous, and the 128×64 dq tile spilled there (64×64 at 4 warps too): 128×32."""
    R = 255
    if k == "tf32":   # fp32 operands: half the rows of 16-bit; 4 warps so no warp repeats another's z rows
        if phase == "fwd":
            return [_C(64, 64, bd, 0, 4, 3, R)]
        if d <= 128:   # unaligned D (synchronous loads): 4 warps spilled 8 bytes; 8 warps repeat z there
            return [_C(32, 32, bd, d, 4, 3, R) if aligned else _C(32, 32, bd, d, 8, 2, R)]
        return [_C(32, 32, bd, d, 8, 2, R)] if d <= 512 else [_C(16, 16, bd, d, 8, 2, R)]   # 4 warps spilled
    if phase == "fwd":
        if d <= 128:
            return [_C(128, 64, bd, 0, 8, 3, R), _C(128, 128, bd, 0, 8, 3, R), _C(64, 64, bd, 0, 4, 4, R)]
        if d == 256:
            return [_C(128, 64, bd, 0, 8, 3, R), _C(128, 32, bd, 0, 8, 3, R)]
        if d == 512:    # q 128 KiB resident + 3 × 32 KiB of keys
            return [_C(128, 32, bd, 0, 8, 3, R)]
        return [_C(128, 64, bd, 0, 8, 3, R)]
    if d <= 64:
        cands = [(64, 64, 4, 3), (128, 64, 8, 3)] if phase == "dq" else [(64, 64, 4, 3), (64, 128, 8, 3)]
    elif d == 128:
        cands = ([(128, 64, 8, 3)] if aligned else [(128, 32, 8, 3)]) if phase == "dq" else [(64, 128, 8, 3)]
    elif d == 256:
        cands = [(128, 32, 8, 3)] if phase == "dq" else [(64, 32, 8, 3)]
    elif d == 512:
        cands = [(32, 64, 8, 3)] if phase == "dq" else [(64, 32, 8, 3)]
    else:
        cands = [(16, 32, 8, 2)]
    return _backward(phase, cands, bd, d)


def _dsym(cls: str, arch: int, k: str, d: int, bd: int, aligned: bool) -> list[KernelConfig]:
    """The self-contrast backward (the dq kernel with SYM, launched without the scale-gradient sum): dq's
    shapes, except where the extra per-key loads and the second exponential spilled them (AOT report, every
    flag set): 16-bit sm_90 D = 128 (dq's 128×64 at 8 warps: 96 bytes), TF32 at D = 128 (32×32 at 4 warps;
    also D = 120), fp32 IEEE at D = 16 (64×64), and the small classes' 2-CTA register cap."""
    if cls != "large":
        return [replace(c, maxnreg=255) for c in _small("dq", 16 if cls == "s16" else 32, d, bd, k)]
    if k == "fp32" and d == 16:
        return [_C(32, 64, 16, 16, 4, 1, 255)]
    if k == "tf32" and d == 128:
        return [_C(16, 32, bd, d, 4, 3, 255)]
    if arch == 90 and k == "16bit" and aligned and d == 128:
        return [_C(128, 32, bd, d, 8, 3, 255)]
    if arch == 90 and k != "fp32":
        return _large_sm90("dq", d, bd, k, aligned=aligned)
    return _large("dq", d, bd, k)


def current_arch() -> int:
    """Table of the current CUDA device: 90 for compute capability 9.x (wgmma), else 80; 80 without CUDA
    (the interpreter runs the sm_80 shapes unless a test passes configurations)."""
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        return 90 if major == 9 else 80
    return 80


def config_list(phase: str, N: int, M: int, D: int, dtype: torch.dtype, precision: str = "ieee",
                arch: Optional[int] = None) -> list[KernelConfig]:
    """Candidate configurations of one launch; the first is the deterministic default.

    phase: 'fwd' | 'dq' | 'dk' | 'dsym' (self-contrast backward: the dq kernel's shape, so dq's list but where
    that spilled); N anchors and M keys per group; D features; dtype of q and k (float32, float16 or bfloat16); precision: tl.dot's input_precision ('ieee' or 'tf32'; only fp32 uses tf32);
    arch: 80 or 90 (table), default `current_arch()`. Raises ValueError for an unknown phase or arch.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    arch = current_arch() if arch is None else arch
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    k = kind(dtype, precision)
    d = max(16, _pow2(D))
    cls = size_class(N, M)
    bd = block_d(D, dtype, precision, small=cls != "large")
    if phase == "dsym":
        return _dsym(cls, arch, k, d, bd, D % 16 == 0)
    if cls != "large":
        return _small(phase, 16 if cls == "s16" else 32, d, bd, k)
    if arch == 90 and k != "fp32":
        return _large_sm90(phase, d, bd, k, aligned=D % 16 == 0)
    return _large(phase, d, bd, k)


def choose_config(phase: str, N: int, M: int, D: int, dtype: torch.dtype, precision: str = "ieee",
                  arch: Optional[int] = None) -> KernelConfig:
    """The fixed default configuration of one launch (first of `config_list`)."""
    return config_list(phase, N, M, D, dtype, precision, arch)[0]


def precisions(dtype: torch.dtype) -> tuple:
    """tl.dot input precisions a dtype ships with: fp32 in IEEE and TF32, 16-bit in its own."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def shipped_configs() -> list[ShippedConfig]:
    """Every candidate `config_list` returns for the shipped dtypes, precisions, D values and size classes."""
    out = []
    for arch in ARCHS:
        for phase in PHASES:
            for dtype in SHIPPED_DTYPES:
                for prec in precisions(dtype):
                    for D in SHIPPED_D:
                        for cls in SIZE_CLASSES:
                            N, M = SIZE_EXAMPLES[cls]
                            for i, c in enumerate(config_list(phase, N, M, D, dtype, prec, arch)):
                                out.append(ShippedConfig(phase, dtype, D, cls, c, prec, i == 0, arch))
    return out


