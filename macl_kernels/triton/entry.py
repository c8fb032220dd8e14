"""The Triton path's entry: operand copies in the kernels' dtype, normalised on the way, and τ on the device.

`prepare_operands(p, op_dtype)` turns the user's q, k (any strides, the features' dtype) and scale into what
the kernels read, with no host-device synchronisation:

- q_op, k_op (G, ·, D) in `op_dtype` with unit feature stride (non-contiguous inputs such as
  `dense_info_nce`'s (B, L, C) view with feature stride L are copied: the kernels' loads would not coalesce);
  with `p.normalize`, L2-normalised along D in float32 on the way (`NormalizeCast`), so the one copy the cast
  needs anyway is also the normalised operand, and autograd keeps only it (no float32 normalised copy);
  otherwise a plain, differentiable `.to()` (no copy at all when nothing changes);
- k_op is q_op when k is q (also when both are the same view of one tensor, as `grouped_info_nce` makes for a
  2-D self-contrast): one copy, and the dq and dk contributions meet in one gradient;
- a tensor scale moved to the features' device as float32 once per call (non-blocking: no sync for a CPU τ;
  the kernels read it from memory), differentiably, so a learnable τ gets its gradient on its own device.

Gradients come back in the features' dtype (float32 features under autocast get float32 gradients).
"""
from __future__ import annotations

import dataclasses

import torch

from ..problem import ContrastProblem

#: F.normalize's eps: ‖x‖ is clamped to at least this, so a zero row normalises to 0, as in the reference
NORM_EPS = 1e-12


class NormalizeCast(torch.autograd.Function):
    """apply(x (G, L, D) float, op_dtype) -> x / max(‖x‖, eps) in op_dtype, contiguous.

    The norm is computed in float32 (float64 stays float64). Backward, with x̂ the saved operand and
    n = max(‖x‖, eps): dx = (dx̂ − x̂·⟨x̂, dx̂⟩)/n, the projection on the tangent space of the sphere (the radial
    term is dropped where the clamp is active, as F.normalize's gradient does), in float32, returned in
    x's dtype. Saved: the operand copy (which the kernels' own Function saves too) and n (G, L, 1).
    """

    @staticmethod
    def forward(ctx, x, op_dtype):
        xf = x if x.dtype == torch.float64 else x.float()
        norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).clamp_min(NORM_EPS)
        y = (xf / norm).to(op_dtype).contiguous()   # .to(memory_format=) keeps a same-dtype view strided
        ctx.save_for_backward(y, norm)
        ctx.in_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        y, norm = ctx.saved_tensors
        dyf, yf = dy.to(norm.dtype), y.to(norm.dtype)
        radial = (yf * dyf).sum(-1, keepdim=True) * (norm > NORM_EPS)
        return ((dyf - yf * radial) / norm).to(ctx.in_dtype), None


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when b is a, or both are the same view (shape, strides, offset) of one base tensor."""
    if a is b:
        return True
    base = a._base
    return (base is not None and b._base is base and a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset() and a.dtype == b.dtype)


def _operand(x: torch.Tensor, op_dtype: torch.dtype, normalize: bool) -> torch.Tensor:
    if normalize:
        return NormalizeCast.apply(x, op_dtype)
    if x.dtype != op_dtype:
        return x.to(op_dtype, memory_format=torch.contiguous_format)
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def device_scale(scale, device: torch.device):
    """A float scale as it is; a tensor scale as a float32 tensor on `device` (differentiable, no sync)."""
    if not isinstance(scale, torch.Tensor) or (scale.device == device and scale.dtype == torch.float32):
        return scale
    return scale.to(device=device, dtype=torch.float32, non_blocking=True)


def prepare_operands(p: ContrastProblem, op_dtype: torch.dtype) -> ContrastProblem:
    """`p` with q, k replaced by the kernels' operands and the scale on the device (module docstring);
    normalize is then False (done). Shapes unchanged: q (G, N, D), k (G, M, D)."""
    q = _operand(p.q, op_dtype, p.normalize)
    k = q if same_tensor(p.q, p.k) else _operand(p.k, op_dtype, p.normalize)
    return dataclasses.replace(p, q=q, k=k, scale=device_scale(p.scale, p.q.device), normalize=False)
