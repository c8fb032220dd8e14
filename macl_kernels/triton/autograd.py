"""Launch code and the `torch.autograd.Function` of the Triton implementation.

Forward: one launch of `contrast_fwd_kernel` -> (loss, lse, count). Backward: `contrast_dq_kernel` when q
(or a tensor scale) needs a gradient, `contrast_dk_kernel` when k does; no float atomics, so deterministic.
The scale gradient ds = Σ_ij dz_ij z_ij / s is summed per anchor inside the dq kernel, in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..problem import ContrastProblem
from .config import KernelConfig, choose_config

#: fill every output buffer with NaN (counts with -1) before each launch, so an unwritten element shows.
#: Also switched on by the environment variable MACL_POISON_OUTPUTS=1, read at each call.
POISON_OUTPUTS = False
_RULE_ID = {"index": 0, "label": 1, "radius": 2}
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def poison_enabled() -> bool:
    """True when outputs are poisoned before launches (module flag or MACL_POISON_OUTPUTS=1 now)."""
    return POISON_OUTPUTS or os.environ.get("MACL_POISON_OUTPUTS", "0") == "1"


def _empty(shape, dtype, device, fill):
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled():
        out.fill_(fill)
    return out


@dataclass(frozen=True)
class LaunchOptions:
    """Everything a launch needs besides q, k and the scale: metadata, switches, per-phase configs."""
    rule: int
    q_meta: torch.Tensor
    k_meta: Optional[torch.Tensor]
    q_valid: Optional[torch.Tensor]       # uint8 views of the bool masks
    k_valid: Optional[torch.Tensor]
    threshold: float
    exclude_self: bool
    precision: str                        # tl.dot input_precision: "ieee" | "tf32"
    upcast_dot: bool                      # interpreter + bf16 only: tl.dot on fp32 copies
    configs: Optional[dict] = None        # phase -> KernelConfig override (tests); else choose_config

    def config(self, phase: str, N: int, M: int, D: int, dtype: torch.dtype) -> KernelConfig:
        if self.configs and phase in self.configs:
            return self.configs[phase]
        return choose_config(phase, N, M, D, dtype)


def _scale_args(scale, dummy: torch.Tensor):
    """(S_PTR, scale float, SCALE_IN_MEM): a tensor scale is read by the kernel, so no host sync."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(device=dummy.device, dtype=torch.float32).reshape(1), 1.0, True
    return dummy, float(scale), False


def _common(o: LaunchOptions, q: torch.Tensor):
    """Metadata pointers (absent ones replaced by q_meta: never read, the constexpr switch is off)."""
    km = o.k_meta if o.k_meta is not None else o.q_meta
    kv = o.k_valid if o.k_valid is not None else o.q_meta
    return km, kv, dict(RULE=o.rule, EXCLUDE_SELF=o.exclude_self, HAS_KV=o.k_valid is not None,
                        UPCAST_DOT=o.upcast_dot, INPUT_PRECISION=o.precision)


def _launch_opts(cfg: KernelConfig) -> dict:
    return dict(**cfg.constexprs(), **cfg.launch_options())


def launch_fwd(q: torch.Tensor, k: torch.Tensor, scale, o: LaunchOptions):
    """q (G,N,D), k (G,M,D) -> loss (G,N) fp32, lse (G,N) fp32, count (G,N) int32."""
    from .kernels_fwd import contrast_fwd_kernel, kernel
    G, N, D = q.shape
    M = k.shape[1]
    loss = _empty((G, N), torch.float32, q.device, float("nan"))
    lse = _empty((G, N), torch.float32, q.device, float("nan"))
    cnt = _empty((G, N), torch.int32, q.device, -1)
    if G * N == 0:
        return loss, lse, cnt
    cfg = o.config("fwd", N, M, D, q.dtype)
    tiles = -(-N // cfg.BLOCK_M)
    km, kv, flags = _common(o, q)
    qv = o.q_valid if o.q_valid is not None else o.q_meta
    s_ptr, s, in_mem = _scale_args(scale, lse)
    kernel(contrast_fwd_kernel)[(G * tiles,)](
        q, k, o.q_meta, km, qv, kv, s_ptr, loss, lse, cnt, s, o.threshold, N, M, tiles,
        *q.stride(), *k.stride(), loss.stride(0), loss.stride(1),
        D=D, HAS_QV=o.q_valid is not None, SCALE_IN_MEM=in_mem, **flags, **_launch_opts(cfg))
    return loss, lse, cnt


def launch_bwd(phase: str, q, k, scale, lse, cnt, grad, o: LaunchOptions, with_ds: bool = False):
    """(dq (G,N,D), ds_rows (G,N) fp32 or None) for phase 'dq'; (dk (G,M,D), None) for 'dk'.

    grad (G,N) fp32, 0 where the anchor does not count. Gradients in the input dtype. with_ds (dq only):
    also Σ_j dz_ij z_ij / s per anchor, whose sum is ∂L/∂s.
    """
    from .kernels_bwd import contrast_dk_kernel, contrast_dq_kernel
    from .kernels_fwd import kernel
    G, N, D = q.shape
    M = k.shape[1]
    rows = N if phase == "dq" else M
    out = _empty((G, rows, D), q.dtype, q.device, float("nan"))
    if N == 0 or M == 0 or D == 0 or G == 0:   # no z_ij at all: the gradients are exactly zero
        return out.zero_(), torch.zeros((G, N), dtype=torch.float32, device=q.device) if with_ds else None
    cfg = o.config(phase, N, M, D, q.dtype)
    ds = _empty((G, N, cfg.n_dout(D)), torch.float32, q.device, float("nan")) if with_ds else None
    tiles = -(-rows // (cfg.BLOCK_M if phase == "dq" else cfg.BLOCK_N))
    km, kv, flags = _common(o, q)
    s_ptr, s, in_mem = _scale_args(scale, lse)
    extra = dict(WITH_DS=with_ds) if phase == "dq" else {}
    args = [q, k, o.q_meta, km, kv, s_ptr, lse, cnt, grad, out]
    if phase == "dq":
        args.append(lse if ds is None else ds)   # DS is never written when WITH_DS is off
    kernel(contrast_dq_kernel if phase == "dq" else contrast_dk_kernel)[(G * tiles * cfg.n_dout(D),)](
        *args, s, o.threshold, N, M, tiles,
        *q.stride(), *k.stride(), lse.stride(0), lse.stride(1), *out.stride(),
        D=D, SCALE_IN_MEM=in_mem, **flags, **extra, **_launch_opts(cfg))
    return out, None if ds is None else ds[..., 0]   # the n_dout copies are identical


class TritonContrast(torch.autograd.Function):
    """apply(q, k, scale, opts) -> (loss, lse, count); only loss is differentiable (w.r.t. q, k, scale).

    q and k may be the same tensor: autograd then adds the dq and dk contributions.
    """

    @staticmethod
    def forward(ctx, q, k, scale, opts: LaunchOptions):
        loss, lse, cnt = launch_fwd(q, k, scale, opts)
        ctx.mark_non_differentiable(lse, cnt)
        tensor_scale = isinstance(scale, torch.Tensor)
        ctx.save_for_backward(q, k, lse, cnt, scale if tensor_scale else None)
        ctx.scale = None if tensor_scale else scale
        ctx.opts = opts
        return loss, lse, cnt

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_lse, g_cnt):
        q, k, lse, cnt, scale_t = ctx.saved_tensors
        scale = scale_t if scale_t is not None else ctx.scale
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        need_s = need_s and scale_t is not None
        dq = dk = ds = None
        if not (need_q or need_k or need_s):
            return None, None, None, None
        # g_i = 0 for anchors that do not count (invalid or no positive): where(), in case g_loss is not finite
        grad = torch.where(cnt > 0, g_loss.to(torch.float32), 0.0).contiguous()
        if need_q or need_s:
            dq, ds_rows = launch_bwd("dq", q, k, scale, lse, cnt, grad, ctx.opts, with_ds=need_s)
            if need_s:   # ∂z_ij/∂s = z_ij/s: ds = Σ_ij dz_ij z_ij / s, per-anchor partial sums from the kernel
                ds = ds_rows.sum(dtype=torch.float64).to(scale_t.dtype).reshape(scale_t.shape)
            dq = dq if need_q else None
        if need_k:
            dk, _ = launch_bwd("dk", q, k, scale, lse, cnt, grad, ctx.opts)
        return dq, dk, ds, None


def launch_options(p: ContrastProblem, allow_tf32: bool, interpret: bool,
                   configs: Optional[dict] = None) -> LaunchOptions:
    """LaunchOptions of problem `p` (metadata made contiguous, bool masks viewed as uint8)."""
    def u8(t):
        return None if t is None else t.contiguous().view(torch.uint8)
    return LaunchOptions(
        rule=_RULE_ID[p.rule], q_meta=p.q_meta.contiguous(),
        k_meta=None if p.k_meta is None else p.k_meta.contiguous(),
        q_valid=u8(p.q_valid), k_valid=u8(p.k_valid), threshold=float(p.threshold),
        exclude_self=bool(p.exclude_self),
        precision="tf32" if (allow_tf32 and p.q.dtype == torch.float32) else "ieee",
        upcast_dot=interpret and p.q.dtype == torch.bfloat16, configs=configs)


def check_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError unless dtype is float32, float16 or bfloat16."""
    if dtype not in _SUPPORTED:
        raise TypeError(f"the Triton implementation supports float32, float16 and bfloat16 inputs, got {dtype}"
                        + (" (use impl='torch' or 'reference' for float64)" if dtype == torch.float64 else ""))

