"""The core operation's public entry point: validate, normalise into a `ContrastProblem`, dispatch, reduce.

Everything the user can get wrong is checked here, once, with an error that names the bad value, so the
implementations can assume clean inputs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple, Optional, Union

import torch

from . import op as _op
from .eager import const_cache
from .input_checks import checks_enabled, guarded_scale
from .problem import ContrastProblem, RowOutputs

IMPLS = ("auto", "torch", "triton", "reference")
REDUCTIONS = ("mean", "sum", "none")
Temperature = Union[float, torch.Tensor]


class ContrastResult(NamedTuple):
    """loss: reduced loss (0-d) or, for reduction="none", the per-anchor loss (G, N).
    per_anchor (G, N), lse (G, N) and pos_count (G, N) int32 as in KERNELS.md §1."""
    loss: torch.Tensor
    per_anchor: torch.Tensor
    lse: torch.Tensor
    pos_count: torch.Tensor


def grouped_info_nce(
    q: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    *,
    temperature: Temperature = 0.1,
    pos_index: Optional[torch.Tensor] = None,
    q_labels: Optional[torch.Tensor] = None,
    k_labels: Optional[torch.Tensor] = None,
    q_positions: Optional[torch.Tensor] = None,
    k_positions: Optional[torch.Tensor] = None,
    threshold: Optional[float] = None,
    exclude_self: bool = False,
    q_valid: Optional[torch.Tensor] = None,
    k_valid: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    impl: str = "auto",
    allow_tf32: Optional[bool] = None,
    normalize: bool = False,
    check_inputs: Optional[bool] = None,
) -> ContrastResult:
    """Grouped multi-positive InfoNCE: ℓ_i = log Σ_{j∈V(i)} exp(z_ij) − mean_{p∈P(i)} z_ij, z = ⟨q_i, k_j⟩/τ.

    Args:
        q: anchors (N, D) or (G, N, D); float16/bfloat16/float32 (float64 for torch/reference).
        k: keys (M, D) or (G, M, D), same dtype/device as q; None means k = q (self-contrast).
            k may not require grad (a memory bank): then only q gets a gradient.
        temperature: τ > 0, a float or a 0-d tensor (learnable: it gets a gradient).
        pos_index: (N,) / (G, N) int, "index" rule: P(i) = {pos_index_i}. Default when no rule is given:
            pos_index_i = i (requires N ≤ M).
        q_labels, k_labels: (N,) / (G, N) and (M,) / (G, M) int, "label" rule: P(i) = {j: label_j = label_i}.
            k_labels defaults to q_labels when k is None.
        q_positions, k_positions, threshold: float positions, "radius" rule:
            P(i) = {j: |pos_i − pos_j| < threshold}, compared in float32.
        exclude_self: key j == i leaves the denominator and the positives (use when k is q).
        q_valid: (N,) / (G, N) bool, anchors that count. k_valid: (M,) / (G, M) bool, keys that exist.
        reduction: "mean" over counted anchors (valid, ≥ 1 positive; 0 if none), "sum", or "none".
        impl: "auto" (triton for CUDA tensors when Triton can launch there, else torch), "torch",
            "triton", "reference" (materialises the N×M logits: small inputs only).
        allow_tf32: TF32 dots for float32 features in the Triton kernels: True / False, or None (default)
            for torch's own setting (`torch.backends.cuda.matmul.fp32_precision` / `allow_tf32`). Inside
            `torch.autocast` the Triton kernels take the autocast dtype instead (`macl_kernels.precision`).
        normalize: L2-normalise q and k along D inside the core (gradients flow through it).
        check_inputs: run the checks that read tensor values (τ > 0 and finite for a tensor τ, pos_index in
            range, finite positions): None (default) = on unless the features are on a CUDA device, where
            they would synchronise with the host; True / False force them. With them off, an invalid τ
            gives a NaN loss; see `macl_kernels.input_checks`.

    Returns:
        ContrastResult(loss, per_anchor, lse, pos_count); per-anchor tensors are (G, N), or (N,) when q
        was 2-D. Statistics are float32 (float64 for float64 inputs). Anchors that are invalid or have
        no positive contribute exactly 0 and are not counted in the mean.

    Raises:
        TypeError: non-tensor or integer features, mismatched dtypes, wrong metadata dtypes, float64 with
            impl="triton".
        ValueError: τ ≤ 0 or non-finite, mismatched shapes, several positive rules at once, threshold ≤ 0,
            pos_index out of range, tensors on different devices, unknown reduction/impl, impl="triton"
            where Triton cannot run (the message says why).
    """
    unbatched = isinstance(q, torch.Tensor) and q.dim() == 2
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    p, deferred = _build_problem(q, k, temperature, pos_index, q_labels, k_labels, q_positions,
                                 k_positions, threshold, exclude_self, q_valid, k_valid, check_inputs,
                                 normalize)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    rows, loss = _dispatch(p, impl, allow_tf32, reduction,   # loss: None unless reduced inside
                           (q, k) if unbatched else None, check_values=deferred)
    if loss is None:
        if reduction == "mean":   # over counted anchors (count > 0)
            loss = rows.loss.sum() / torch.count_nonzero(rows.count).clamp_(min=1)
        elif reduction == "sum":
            loss = rows.loss.sum()
        else:
            loss = rows.loss
    if unbatched:
        rows = RowOutputs(*(t[0] for t in rows))
        if reduction == "none":
            loss = loss[0]
    return ContrastResult(loss, rows.loss, rows.lse, rows.count)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation `impl` means for tensors on `device` (see `grouped_info_nce`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if device.type == "cuda" and dtype != torch.float64 and _triton_reason(device) is None:
            return "triton"
        return "torch"
    if impl == "triton":
        reason = _triton_reason(device)
        if reason is not None:
            raise ValueError(f"impl='triton' cannot run here: {reason}")
        if dtype == torch.float64:
            raise TypeError("impl='triton' supports float16, bfloat16 and float32 features, got torch.float64; "
                            "use impl='torch' for float64")
    return impl


def _triton_reason(device: torch.device) -> Optional[str]:
    try:
        from .triton import triton_unavailable_reason
    except ImportError as e:  # triton not installed
        return f"Triton is not importable ({e})"
    return triton_unavailable_reason(device)


# Implementations that normalise inside their own autograd function; the others get normalised inputs.
NATIVE_NORMALIZE: frozenset = frozenset({"triton", "torch", "reference"})


def _dispatch(p: ContrastProblem, impl: str, allow_tf32: Optional[bool], reduction: str = "none",
              flat: Optional[tuple] = None, eager: bool = False, check_values: bool = False):
    """(RowOutputs, reduced loss or None): small torch problems reduce inside their autograd function.
    flat: the caller's (q, k) when they were 2-D (see `torch_dense.dense_reduced`).
    While `torch.compile` traces (and not `eager`), the rows come from the custom op `macl.contrast_rows`
    (macl_kernels/op.py), which runs the value checks `check_values` at run time and resolves `impl` there."""
    if not eager and torch.compiler.is_compiling():
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        return _op.rows(p, impl, allow_tf32, check_values), None
    impl = resolve_impl(impl, p.q.device, p.q.dtype)
    if p.q.shape[0] * p.q.shape[1] * p.k.shape[1] == 0:
        impl = "reference"   # empty batch (no anchor or no key): zero loss, zero gradients, on any device
    if p.normalize and impl not in NATIVE_NORMALIZE:
        q = torch.nn.functional.normalize(p.q, dim=-1)
        k = q if p.k is p.q else torch.nn.functional.normalize(p.k, dim=-1)
        p, flat = dataclasses.replace(p, q=q, k=k, normalize=False), None
    if impl == "reference":
        from .reference import reference_rows
        return reference_rows(p), None
    if impl == "torch":
        from .eager import dense as torch_dense
        if reduction != "none" and torch_dense.fits(p):
            return torch_dense.dense_reduced(p, reduction, flat)
        from .eager.tiled import torch_rows
        return torch_rows(p), None
    from .triton import triton_rows
    return triton_rows(p, allow_tf32=allow_tf32), None


_op.set_runner(lambda p, impl, allow_tf32: _dispatch(p, impl, allow_tf32, "none", None, eager=True)[0])


# ----------------------------------------------------------------------------------------- validation

def _build_problem(q, k, temperature, pos_index, q_labels, k_labels, q_positions, k_positions,
                   threshold, exclude_self, q_valid, k_valid, check_inputs=None, normalize: bool = False):
    """(ContrastProblem, deferred): the validated problem, and whether the value checks are still to run
    (while `torch.compile` traces they cannot read tensors: the custom op runs them, macl_kernels/op.py)."""
    _check_features("q", q)
    checks = checks_enabled(check_inputs, q.device)
    deferred = False
    if checks and torch.compiler.is_compiling():
        checks, deferred = False, True
    self_contrast = k is None
    if self_contrast:
        k = q
    _check_features("k", k)
    if q.dim() != k.dim():
        raise ValueError(f"q and k must both be 2-D (N, D) or both 3-D (G, N, D), got shapes "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if q.dim() == 2:   # self-contrast keeps k the same object as q (the torch path then merges gradients)
        q = q[None]
        k = q if self_contrast else k[None]
    G, N, D = q.shape
    if k.shape[0] != G or k.shape[2] != D:
        raise ValueError(f"q (G, N, D) = {tuple(q.shape)} and k (G, M, D) = {tuple(k.shape)} must agree "
                         f"on G and D")
    M = k.shape[1]
    dev = q.device
    batched = lambda t: t if t.dim() == 2 else t[None]

    scale = _scale(temperature, dev, checks)
    rules = [name for name, v in (("pos_index", pos_index), ("labels", q_labels),
                                  ("positions", q_positions)) if v is not None]
    if len(rules) > 1:
        raise ValueError(f"give one positive rule, got {' and '.join(rules)}")
    thr = 0.0
    k_meta = None
    if q_labels is not None:
        rule = "label"
        if k_labels is None:
            if not self_contrast:
                raise ValueError("k_labels is required when k is given (labels of the keys)")
            k_labels = q_labels
        q_meta = batched(_check_meta("q_labels", q_labels, (G, N), dev, integer=True))
        k_meta = batched(_check_meta("k_labels", k_labels, (G, M), dev, integer=True))
        q_meta, k_meta = q_meta.long().contiguous(), k_meta.long().contiguous()
    elif q_positions is not None:
        rule = "radius"
        if k_positions is None:
            if not self_contrast:
                raise ValueError("k_positions is required when k is given (positions of the keys)")
            k_positions = q_positions
        if getattr(threshold, "ndim", None) == 0 and hasattr(threshold, "item"):
            threshold = threshold.item()  # a NumPy scalar (np.float32) or a 0-d tensor
        if threshold is None or not isinstance(threshold, (int, float)) or isinstance(threshold, bool) \
                or not math.isfinite(threshold) or threshold <= 0:
            raise ValueError(f"threshold must be a finite number > 0 for positional positives, got {threshold!r}")
        thr = float(threshold)
        q_meta = batched(_check_meta("q_positions", q_positions, (G, N), dev, integer=False, values=checks))
        k_meta = batched(_check_meta("k_positions", k_positions, (G, M), dev, integer=False, values=checks))
        q_meta, k_meta = q_meta.float().contiguous(), k_meta.float().contiguous()
    else:
        rule = "index"
        if k_labels is not None or k_positions is not None:
            raise ValueError("k_labels / k_positions given without q_labels / q_positions")
        if pos_index is None:
            if N > M:
                raise ValueError(f"the default positive (pos_index_i = i) needs N ≤ M, got N={N}, M={M}; "
                                 f"pass pos_index")
            q_meta = torch.arange(N, device=dev).expand(G, N).contiguous()
        else:
            q_meta = batched(_check_meta("pos_index", pos_index, (G, N), dev, integer=True)).long().contiguous()
            if checks and q_meta.numel() and not _trusted_in_range(q_meta, M):
                lo, hi = (int(v) for v in torch.aminmax(q_meta))
                if lo < 0 or hi >= M:
                    raise ValueError(f"pos_index must lie in [0, M={M}), got values in [{lo}, {hi}]")
    if threshold is not None and rule != "radius":
        raise ValueError("threshold is only used with positions (the radius rule)")
    qv = batched(_check_mask("q_valid", q_valid, (G, N), dev)) if q_valid is not None else None
    kv = batched(_check_mask("k_valid", k_valid, (G, M), dev)) if k_valid is not None else None
    if not isinstance(exclude_self, bool):
        raise TypeError(f"exclude_self must be a bool, got {exclude_self!r}")
    p = ContrastProblem(q=q, k=k, scale=scale, rule=rule, q_meta=q_meta, k_meta=k_meta, threshold=thr,
                        exclude_self=exclude_self, q_valid=qv, k_valid=kv, normalize=normalize)
    return p, deferred


def _trusted_in_range(pos_index: torch.Tensor, M: int) -> bool:
    """True for an index tensor built (and vouched for) by `const_cache` with values < M: no range check."""
    trust = const_cache.trusted(pos_index)
    return trust is not None and trust.bound <= M


def _check_features(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, D) or (G, N, D), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has feature dimension D = 0 (shape {tuple(x.shape)})")


def _scale(temperature, device, checks: bool = True) -> Union[float, torch.Tensor]:
    """1/τ as a float, or as a 0-d tensor when τ is a tensor (so a learnable τ gets its gradient).
    A tensor τ's value is checked only when `checks` (a sync on CUDA); else an invalid τ gives NaN."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature tensor must be 0-d, got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
        if temperature.device != device and temperature.device.type != "cpu":
            raise ValueError(f"temperature is on {temperature.device}, features on {device}")
        if not checks:
            return guarded_scale(temperature)
        value = float(temperature.detach())
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {value}")
        return 1.0 / temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-d tensor, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return 1.0 / float(temperature)


def _check_meta(name, t, shape_g, device, integer: Optional[bool], values: bool = True) -> torch.Tensor:
    """Check a per-row tensor: integer=True (labels, indices), False (positions), None (bool masks).
    values=False skips the finiteness check of positions (it reads the tensor back: a sync on CUDA)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer is True and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if integer is False and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    G, L = shape_g
    if tuple(t.shape) not in ((G, L),) + (((L,),) if G == 1 else ()):
        want = f"({L},) or ({G}, {L})" if G == 1 else f"({G}, {L})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, features on {device}")
    if integer is False and values and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values")
    return t


def _check_mask(name, t, shape_g, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got "
                        f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    return _check_meta(name, t, shape_g, device, integer=None).contiguous()
