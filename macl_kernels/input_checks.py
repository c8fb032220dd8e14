"""The `check_inputs=` switch: value checks that read tensors back to the host, and what replaces them.

Shape, dtype and device checks never touch tensor values and always run. Three checks read values, which on
a CUDA device is a host-device synchronisation (it stalls the CPU until the GPU catches up, and breaks CUDA
graphs and `torch.compile`):

- a tensor temperature must be finite and > 0 (`float(τ)`);
- pos_index must lie in [0, M) (`int(pos_index.min())`, `int(pos_index.max())`);
- positions must be finite (`bool(isfinite(positions).all())`).

`check_inputs=None` (the default) runs them when the features are not on a CUDA device (CPU: a check costs
nothing there and the error is the friendliest) and skips them on CUDA, where the hot path must not sync.
True / False force them on / off. With the checks off:

- a tensor τ that is ≤ 0 or not finite gives 1/τ = NaN on the device (`guarded_scale`, no sync), so the loss
  is NaN (the trainer's non-finite check stops the run) instead of an error;
- an out-of-range pos_index is undefined: the Triton kernels count that anchor as having no positive, the
  torch implementation may fail with an indexing error;
- non-finite positions are never within the threshold of anything: they give no positives.

While `torch.compile` traces, the checks that are on do not run in the traced Python (they would break the
graph): the custom op `macl.contrast_rows` runs them at run time and raises the same errors (macl_kernels/op.py).
"""
from __future__ import annotations

from typing import Optional

import torch


def checks_enabled(check_inputs: Optional[bool], device: torch.device) -> bool:
    """Whether the value checks run for features on `device` (module docstring).

    Raises TypeError when check_inputs is not None, True or False.
    """
    if check_inputs is None:
        return torch.device(device).type != "cuda"
    if not isinstance(check_inputs, bool):
        raise TypeError(f"check_inputs must be None, True or False, got {check_inputs!r}")
    return check_inputs


def guarded_scale(temperature: torch.Tensor) -> torch.Tensor:
    """1/τ for a 0-d tensor τ, NaN where τ is not finite and > 0; computed on τ's device, no sync.
    The gradient w.r.t. τ is −1/τ² where τ is valid (0 elsewhere)."""
    ok = torch.isfinite(temperature) & (temperature > 0)
    return torch.where(ok, 1.0 / temperature, torch.full_like(temperature, float("nan")))
