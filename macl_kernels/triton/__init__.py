"""Triton implementation of the core operation (KERNELS.md): fused forward, deterministic two-kernel backward.

Importing this package never imports Triton and never reads the environment: `triton_rows` and
`triton_unavailable_reason` do both at call time, so a machine without a GPU (or without Triton) can
import it, and TRITON_INTERPRET=1 set after import still takes effect.

Open `README.md` first (the derivation), then `entry.py` (launch), `kernels_fwd.py` / `kernels_bwd.py`
(the kernels), `autograd.py`, `config.py` / `autotune.py` (tile tables) and `aot.py` (the ahead-of-time report).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..problem import ContrastProblem, RowOutputs

__all__ = ["triton_rows", "triton_unavailable_reason"]


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when Triton can launch on `device` now, else a sentence saying why not.

    Launchable: a CUDA device with Triton importable and a working driver, or any CPU/CUDA tensor when
    the environment has TRITON_INTERPRET=1 (read at each call). Never raises.
    """
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"Triton is not importable ({type(e).__name__}: {e})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type in ("cpu", "cuda"):
        return None
    if device.type != "cuda":
        return f"Triton needs a CUDA tensor (got device {device}) or TRITON_INTERPRET=1"
    if not torch.cuda.is_available():
        return f"Triton needs a working CUDA device, but torch.cuda.is_available() is False (device {device})"
    try:
        from triton.runtime import driver
        driver.active.get_current_target()
    except Exception as e:
        return f"Triton cannot use the CUDA driver ({type(e).__name__}: {e})"
    if torch.version.hip is None:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(idx)
        if cap < (7, 5):
            return f"the Triton kernels need an NVIDIA GPU of compute capability 7.5 or newer, got {cap[0]}.{cap[1]}"
    return None


def triton_rows(p: ContrastProblem, *, allow_tf32: Optional[bool] = None) -> RowOutputs:
    """Per-anchor loss, LSE and positive count of problem `p` with the fused Triton kernels.

    Shapes (see problem.py): q (G, N, D), k (G, M, D) -> loss (G, N) float32 (differentiable w.r.t. q, k
    and a tensor scale), lse (G, N) float32 (−inf where no key is valid), count (G, N) int32.
    Operand dtype (`macl_kernels.precision.operand_precision`): inside `torch.autocast` for the features'
    device type, the autocast dtype (float16/bfloat16); otherwise the features' dtype, float32 with TF32
    dots when allow_tf32 is True, IEEE when False, torch's setting when None. Statistics are float32;
    gradients come back in the features' dtype. `p.normalize`: q and k are L2-normalised while their operand
    copies are made (`entry.NormalizeCast`). No host-device synchronisation (see entry.py).
    Raises TypeError for an unsupported dtype (float64 included: use impl "torch" or "reference"),
    RuntimeError when Triton cannot launch on the tensors' device (see `triton_unavailable_reason`).
    """
    from ..precision import operand_precision
    from .autograd import TritonContrast, check_dtype, launch_options
    from .entry import prepare_operands
    check_dtype(p.q.dtype)
    if p.k.dtype != p.q.dtype:
        raise TypeError(f"q and k must have the same dtype, got {p.q.dtype} and {p.k.dtype}")
    reason = triton_unavailable_reason(p.q.device)
    if reason is not None:
        raise RuntimeError(reason)
    from .kernels_fwd import interpreting
    prec = operand_precision(p.q.dtype, p.q.device.type, allow_tf32)
    p = prepare_operands(p, prec.dtype)
    opts = launch_options(p, prec.tf32, interpreting())
    loss, lse, cnt = TritonContrast.apply(p.q, p.k, p.scale, opts)
    return RowOutputs(loss, lse, cnt)
