"""Which dtype the fused kernels compute their dots in: the user's autocast and TF32 settings, per call.

The rule (`operand_precision`), for features of dtype `dtype` on a device of type `device_type`:

1. Inside `torch.autocast(device_type=..., dtype=X)` for that device type, with X float16 or bfloat16:
   float32, float16 and bfloat16 features are cast to X at the core's entry (as autocast casts a matmul's
   inputs; float64 is never cast). The kernels then run X dots on tensor cores; the statistics (running max,
   sum of exponentials, LSE, loss) stay float32, and gradients come back in the features' own dtype.
   Reason: the losses call `F.normalize`, which autocast keeps in float32, so without this rule a model
   trained under autocast hands the core float32 features and gets the slow IEEE float32 kernels.
2. Otherwise the features' own dtype; for float32, TF32 dots when `allow_tf32` is True, IEEE float32 when
   it is False, and torch's own setting when it is None (the default): `torch.backends.cuda.matmul.
   fp32_precision == "tf32"` (which `torch.set_float32_matmul_precision("high" | "medium")` and
   `torch.backends.cuda.matmul.allow_tf32 = True` also set), or the legacy `allow_tf32` flag on older torch.

Only the Triton implementation uses this; the torch implementation's matmuls follow autocast by themselves.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)


class OperandPrecision(NamedTuple):
    """dtype: the dtype of the dot operands. tf32: float32 operands use TF32 dots (False for 16-bit)."""
    dtype: torch.dtype
    tf32: bool


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for `device_type` ("cuda", "cpu", ...) now, or None outside autocast."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, RuntimeError, AttributeError):   # torch < 2.4 or an unknown device type
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        return None


def torch_allows_tf32() -> bool:
    """torch's float32 matmul setting for CUDA: True when it lets float32 matmuls use TF32.

    Reads the new API (`torch.backends.cuda.matmul.fp32_precision`, then `torch.backends.fp32_precision`)
    first: on torch ≥ 2.9, reading the legacy `allow_tf32` flag raises after the new API was used.
    """
    matmul = torch.backends.cuda.matmul
    try:
        new = getattr(matmul, "fp32_precision", None)
        if new is not None:
            if new == "none":   # not set for matmuls: inherit the global setting
                new = getattr(torch.backends, "fp32_precision", "none")
            return new == "tf32"
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return torch.get_float32_matmul_precision() != "highest"


def operand_precision(dtype: torch.dtype, device_type: str, allow_tf32: Optional[bool] = None,
                      autocast: Optional[torch.dtype] = ..., torch_tf32: Optional[bool] = None
                      ) -> OperandPrecision:
    """The operand dtype and TF32 switch for features of `dtype` on a `device_type` device (module docstring).

    Args:
        dtype: the features' dtype. device_type: their device's type ("cuda"; "cpu" under TRITON_INTERPRET=1).
        allow_tf32: True / False force TF32 / IEEE dots for float32 operands; None follows torch's setting.
        autocast: the autocast dtype to assume (None: no autocast); by default read from torch for device_type.
        torch_tf32: torch's TF32 setting to assume; by default read with `torch_allows_tf32()`.

    Raises:
        TypeError: allow_tf32 is not None or a bool.
    """
    if allow_tf32 is not None and not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be None, True or False, got {allow_tf32!r}")
    ac = autocast_dtype(device_type) if autocast is ... else autocast
    if ac in _AUTOCAST_DTYPES and dtype in _CASTABLE:
        return OperandPrecision(ac, False)
    if dtype != torch.float32:
        return OperandPrecision(dtype, False)
    if allow_tf32 is None:
        allow_tf32 = torch_allows_tf32() if torch_tf32 is None else torch_tf32
    return OperandPrecision(dtype, allow_tf32)
