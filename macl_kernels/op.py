"""The core operation as a torch custom op (`torch.ops.macl.contrast_rows`), for `torch.compile`.

`torch.compile(step, fullgraph=True)` cannot trace the implementations' `torch.autograd.Function`s (their
forward and backward are Python loops over tiles with data-dependent choices), so while Dynamo traces
(`torch.compiler.is_compiling()`), `api._dispatch` calls this op instead: one opaque node in the graph, with a
fake kernel (output shapes and dtypes only) and autograd registered. In eager mode nothing changes: the entry
point calls the implementations directly, so the op costs an eager call nothing (no dispatcher round trip).

    macl::contrast_rows(q (G, N, D), k (G, M, D), scale_t (0-d, 1/τ) or None, scale (float 1/τ when scale_t
        is None), rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid, normalize, same (k is q),
        impl, tf32 (-1 torch's setting, 0, 1), check_values)
        -> loss (G, N), lse (G, N) (stats dtype: float32, float64 for float64 q), count (G, N) int32
    macl::contrast_rows_backward(g_loss, <the same inputs>, need_q, need_k, need_s) -> (dq, dk, ds)
        dq like q, contiguous; dk like k, contiguous (empty (0,) when same: the whole gradient is in dq); ds like scale_t (empty (0,)
        when there is none or it needs no gradient).

The forward op runs the implementation `impl` selects at run time (as `api.resolve_impl`) without autograd.
The backward op recomputes the forward with autograd on and runs the implementation's own hand-written
backward (`torch.autograd.grad`): a compiled step pays one extra forward of the loss (the eager path keeps its
autograd state from the forward instead). A backward with create_graph=True (eager only: AOTAutograd has no
double backward) differentiates `eager/double_backward.differentiable_rows` instead, so higher-order gradients
work through the op as in eager mode.
check_values: the value checks that read tensors (τ > 0 and finite, pos_index in range, finite positions,
`macl_kernels.input_checks`) run inside the op at run time, where a compiled graph cannot break on them; they
raise the same ValueError as the eager entry point.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .problem import ContrastProblem, RowOutputs, stats_dtype

_TF32 = {None: -1, False: 0, True: 1}


def _problem(q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid, normalize,
             same) -> ContrastProblem:
    return ContrastProblem(q=q, k=q if same else k, scale=scale_t if scale_t is not None else scale, rule=rule,
                           q_meta=q_meta, k_meta=k_meta, threshold=threshold, exclude_self=exclude_self,
                           q_valid=q_valid, k_valid=k_valid, normalize=normalize)


def _check_values(p: ContrastProblem) -> None:
    """The entry point's value checks (api._build_problem with checks on), at run time inside the op."""
    if isinstance(p.scale, torch.Tensor):
        s = float(p.scale)
        if not (math.isfinite(s) and s > 0):   # guarded_scale made 1/τ NaN for an invalid τ
            raise ValueError(f"temperature must be finite and > 0, got {1.0 / s if s else math.inf}")
    M = p.k.shape[1]
    if p.rule == "index" and p.q_meta.numel():
        lo, hi = (int(v) for v in torch.aminmax(p.q_meta))
        if lo < 0 or hi >= M:
            raise ValueError(f"pos_index must lie in [0, M={M}), got values in [{lo}, {hi}]")
    if p.rule == "radius":
        for name, t in (("q_positions", p.q_meta), ("k_positions", p.k_meta)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains non-finite values")


#: runs an implementation eagerly: (p, impl, allow_tf32) -> RowOutputs. Set by `api` when it is imported
#: (`set_runner`), so that this module, below the entry point, does not import it back.
_RUNNER = None


def set_runner(run) -> None:
    """Install the eager runner the op calls (api's dispatch with reduction="none")."""
    global _RUNNER
    _RUNNER = run


def _rows(p: ContrastProblem, impl: str, tf32: int) -> RowOutputs:
    if _RUNNER is None:   # (api imports this module and installs its runner first)
        raise RuntimeError("macl_kernels.op: no runner installed; import macl_kernels first")
    return _RUNNER(p, impl, {-1: None, 0: False, 1: True}[tf32])


@torch.library.custom_op("macl::contrast_rows", mutates_args=())
def contrast_rows(q: torch.Tensor, k: torch.Tensor, scale_t: Optional[torch.Tensor], scale: float, rule: str,
                  q_meta: torch.Tensor, k_meta: Optional[torch.Tensor], threshold: float, exclude_self: bool,
                  q_valid: Optional[torch.Tensor], k_valid: Optional[torch.Tensor], normalize: bool, same: bool,
                  impl: str, tf32: int, check_values: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _problem(q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid,
                 normalize, same)
    if check_values:
        _check_values(p)
    with torch.no_grad():
        loss, lse, count = _rows(p, impl, tf32)
    # fresh tensors (an implementation may return views, e.g. of an empty batch's zeros)
    return loss.clone(), lse.clone(), count.clone()


@contrast_rows.register_fake
def _(q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid, normalize, same,
      impl, tf32, check_values):
    G, N = q.shape[0], q.shape[1]
    sdt = stats_dtype(q.dtype)
    return (q.new_empty((G, N), dtype=sdt), q.new_empty((G, N), dtype=sdt),
            q.new_empty((G, N), dtype=torch.int32))


@torch.library.custom_op("macl::contrast_rows_backward", mutates_args=())
def contrast_rows_backward(g_loss: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale_t: Optional[torch.Tensor],
                           scale: float, rule: str, q_meta: torch.Tensor, k_meta: Optional[torch.Tensor],
                           threshold: float, exclude_self: bool, q_valid: Optional[torch.Tensor],
                           k_valid: Optional[torch.Tensor], normalize: bool, same: bool, impl: str, tf32: int,
                           need_q: bool, need_k: bool, need_s: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    need_s = need_s and scale_t is not None
    with torch.enable_grad():
        qd = q.detach().requires_grad_(need_q or (same and need_k))
        kd = qd if same else k.detach().requires_grad_(need_k)
        sd = scale_t.detach().requires_grad_(need_s) if scale_t is not None else None
        p = _problem(qd, kd, sd, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid,
                     normalize, same)
        loss = _rows(p, impl, tf32).loss
        targets = [t for t in ((qd,) if same else (qd, kd)) + ((sd,) if sd is not None else ()) if t.requires_grad]
        grads = dict(zip(map(id, targets), torch.autograd.grad(loss, targets, g_loss, allow_unused=True)
                         if targets and loss.requires_grad else [None] * len(targets)))
    pick = lambda t, like: grads.get(id(t)) if grads.get(id(t)) is not None else torch.zeros_like(like)  # noqa
    dq = pick(qd, q) if qd.requires_grad else torch.zeros_like(q)
    dk = q.new_empty(0) if same else (pick(kd, k) if kd.requires_grad else torch.zeros_like(k))
    ds = pick(sd, scale_t) if need_s else q.new_empty(0, dtype=scale_t.dtype if scale_t is not None else q.dtype)
    # contiguous, as the fake kernel says (autograd may hand back a gradient with the input's strides)
    return dq.contiguous(), dk.contiguous(), ds.contiguous()


@contrast_rows_backward.register_fake
def _(g_loss, q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid, normalize,
      same, impl, tf32, need_q, need_k, need_s):
    need_s = need_s and scale_t is not None
    return (q.new_empty(q.shape), q.new_empty(0) if same else k.new_empty(k.shape),
            scale_t.new_empty(scale_t.shape) if need_s else q.new_empty(0, dtype=scale_t.dtype if scale_t is not None
                                                                 else q.dtype))


def _setup_context(ctx, inputs, output):
    (q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid, normalize, same,
     impl, tf32, _check) = inputs
    ctx.save_for_backward(q, k, scale_t, q_meta, k_meta, q_valid, k_valid)
    ctx.args = (scale, rule, threshold, exclude_self, normalize, same, impl, tf32)


def _backward(ctx, g_loss, _g_lse, _g_count):
    q, k, scale_t, q_meta, k_meta, q_valid, k_valid = ctx.saved_tensors
    scale, rule, threshold, exclude_self, normalize, same, impl, tf32 = ctx.args
    need_q, need_k, need_s = ctx.needs_input_grad[:3]
    none = (None,) * 13
    if g_loss is None:
        return (None, None, None) + none
    if torch.is_grad_enabled():   # create_graph=True: the gradient as a differentiable function of the inputs
        from .eager import double_backward
        p = _problem(q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid,
                     normalize, same)
        kk = q if same else k
        total = lambda: (double_backward.differentiable_rows(q, kk, p.scale, p) * g_loss).sum()  # noqa: E731
        dq, dk, ds = double_backward.grads_with_graph(total, (q, None if same else k, scale_t),
                                                      (need_q or (same and need_k), need_k, need_s))
        return (dq, dk, ds) + none
    dq, dk, ds = torch.ops.macl.contrast_rows_backward(
        g_loss, q, k, scale_t, scale, rule, q_meta, k_meta, threshold, exclude_self, q_valid, k_valid, normalize,
        same, impl, tf32, need_q, need_k, need_s)
    if same:   # q and k are one tensor here: its whole gradient goes to the q slot
        return (dq if (need_q or need_k) else None, None, ds if need_s else None) + none
    return (dq if need_q else None, dk if need_k else None, ds if need_s else None) + none


contrast_rows.register_autograd(_backward, setup_context=_setup_context)


def rows(p: ContrastProblem, impl: str, allow_tf32: Optional[bool], check_values: bool) -> RowOutputs:
    """`RowOutputs` of problem `p` through the custom op (what `api._dispatch` calls while compiling)."""
    same = p.k is p.q
    scale_t = p.scale if isinstance(p.scale, torch.Tensor) else None
    scale = 0.0 if scale_t is not None else float(p.scale)
    loss, lse, count = torch.ops.macl.contrast_rows(
        p.q, p.q if same else p.k, scale_t, scale, p.rule, p.q_meta, p.k_meta, float(p.threshold),
        bool(p.exclude_self), p.q_valid, p.k_valid, bool(p.normalize), same, impl, _TF32[allow_tf32],
        bool(check_values))
    return RowOutputs(loss, lse, count)
