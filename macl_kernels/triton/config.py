"""Launch options of the Triton kernels and the static heuristic that picks them.

No autotuning (there is no GPU to tune on where this is built): `choose_config` maps (phase, N, M, D, dtype)
to one of a small, closed set of configurations, and `shipped_configs` lists that set so that
`macl_kernels.aot` can compile every one of them for sm_80 and sm_90 and check registers and spills.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

PHASES = ("fwd", "dq", "dk")
SIZE_CLASSES = ("s16", "s32", "large")
#: representative (N, M) of each size class, for the AOT report
SIZE_EXAMPLES = {"s16": (16, 16), "s32": (32, 32), "large": (4096, 4096)}
SHIPPED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHIPPED_D = (16, 64, 128, 256, 512, 1024)  # 512: the GPU targets are at D ∈ {256, 512}


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel launch.

    BLOCK_M anchors × BLOCK_N keys per z tile; z accumulates over D in BLOCK_D chunks; the backward
    kernels own BLOCK_DOUT output columns each (0 for the forward). All blocks are powers of two ≥ 16
    (tl.dot's minimum).
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
        """Number of D-output chunks (grid factor of the backward kernels)."""
        return max(1, -(-D // self.BLOCK_DOUT)) if self.BLOCK_DOUT else 1


@dataclass(frozen=True)
class ShippedConfig:
    """One entry of `shipped_configs`: a configuration the chooser can return, and where."""
    phase: str
    dtype: torch.dtype
    D: int
    size_class: str
    config: KernelConfig


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def size_class(N: int, M: int) -> str:
    """'s16' / 's32' when both N and M fit one 16 / 32 block (e.g. MACL's dense groups of 2B), else 'large'."""
    n = max(N, M)
    return "s16" if n <= 16 else "s32" if n <= 32 else "large"


def _small(b: int, block_d: int, block_dout: int, warps: int, stages: int) -> KernelConfig:
    cap = min(255, 65536 // (2 * 32 * warps))          # registers per thread for 2 CTAs per SM
    return KernelConfig(b, b, block_d, block_dout, num_warps=warps, num_stages=stages, maxnreg=cap)


def choose_config(phase: str, N: int, M: int, D: int, dtype: torch.dtype) -> KernelConfig:
    """Static configuration for one launch.

    phase: 'fwd' | 'dq' | 'dk'; N anchors and M keys per group; D features; dtype of q and k
    (float32, float16 or bfloat16). Raises ValueError for an unknown phase.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    wide = dtype in (torch.float16, torch.bfloat16)   # tensor-core dtypes; fp32 may run on FMA (ieee)
    cls = size_class(N, M)
    d = max(16, _pow2(D))
    # Every branch below was checked with `python -m macl_kernels.aot` (sm_80 and sm_90, fp32 in IEEE and
    # TF32): no local memory, no spills. Register use is dominated by the BLOCK_M×BLOCK_N tile and by the
    # dot operands (fp32 IEEE dots run on FMA units with operands in registers: small BLOCK_D there).
    # BLOCK_D is the same in all three phases, so the backward recomputes z with the forward's chunking
    # (z must round as it did against the saved LSE; see README).
    if cls != "large":
        # one tile per group (MACL's dense groups of 2B): no wasted rows; a single key tile, so the
        # backward has no key loop for a deeper pipeline to overlap. maxnreg: left alone, ptxas caps these
        # small CTAs at ~80 registers (an occupancy heuristic) and spills values live across the D loop;
        # the explicit cap still lets two CTAs share an SM.
        b = 16 if cls == "s16" else 32
        if phase == "fwd":
            if wide:
                return _small(b, min(d, 64), 0, warps=4 if b == 32 else 2, stages=1)
            return _small(b, 16, 0, warps=4, stages=2)
        warps = 8 if b == 32 else 4
        if wide:
            return _small(b, min(d, 64), min(d, 128), warps=warps, stages=1)
        return _small(b, 16, min(d, 64), warps=warps, stages=1)
    if phase == "fwd":
        if wide:   # 128×64 tiles, 2 warpgroups: wgmma (HGMMA) on sm_90, mma.sync (HMMA) on sm_80
            return KernelConfig(128, 64, min(d, 128 if d <= 256 else 64), 0, num_warps=8, num_stages=2)
        return KernelConfig(64, 64, 16, 0, num_warps=8, num_stages=2)
    if wide:
        return KernelConfig(64, 64, min(d, 128 if d <= 256 else 64), min(d, 128), num_warps=8, num_stages=2)
    if d == 16:
        return KernelConfig(64, 64, 16, 16, num_warps=4, num_stages=2)
    return KernelConfig(64, 64, 16, min(d, 32 if phase == "dq" else 64), num_warps=8, num_stages=2)


def shipped_configs() -> list[ShippedConfig]:
    """Every configuration `choose_config` returns for the shipped dtypes, D values and size classes."""
    out = []
    for phase in PHASES:
        for dtype in SHIPPED_DTYPES:
            for D in SHIPPED_D:
                for cls in SIZE_CLASSES:
                    N, M = SIZE_EXAMPLES[cls]
                    out.append(ShippedConfig(phase, dtype, D, cls, choose_config(phase, N, M, D, dtype)))
    return out
