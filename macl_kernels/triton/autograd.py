"""Launch code and the `torch.autograd.Function` of the Triton implementation.

Forward: one launch of `contrast_fwd_kernel` -> (loss, lse, count). Backward: `contrast_dq_kernel` when q
(or a tensor scale) needs a gradient, `contrast_dk_kernel` when k does; when k is q (self-contrast), one
launch of the dq kernel with SYM ('dsym') gives the whole gradient dq + dk from one z per tile (3 GEMM
units forward + backward instead of 5). No float atomics, so deterministic.
The scale gradient ds = Σ_ij dz_ij z_ij / s is summed per anchor inside the dq kernel, in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..positives import dense_label_ids, positive_counts
from ..problem import ContrastProblem
from .autotune import launch
from .config import KernelConfig, config_list

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
    q_meta: torch.Tensor                  # int32 pos_index / dense label ids, or float32 positions
    k_meta: Optional[torch.Tensor]
    q_valid: Optional[torch.Tensor]       # uint8 views of the bool masks
    k_valid: Optional[torch.Tensor]
    threshold: float
    exclude_self: bool
    precision: str                        # tl.dot input_precision: "ieee" | "tf32"
    upcast_dot: bool                      # interpreter + bf16 only: tl.dot on fp32 copies
    configs: Optional[dict] = None        # phase -> KernelConfig override (tests); else config_list
    interpret: bool = False               # launched under TRITON_INTERPRET (no autotuning)

    def candidates(self, phase: str, N: int, M: int, D: int, dtype: torch.dtype) -> list[KernelConfig]:
        """Configurations a launch may use: the override, or `config_list` (first = default)."""
        if self.configs and phase in self.configs:
            return [self.configs[phase]]
        if self.configs and phase == "dsym" and "dq" in self.configs:   # the dq kernel's shape
            return [self.configs["dq"]]
        return config_list(phase, N, M, D, dtype, self.precision)

    def config(self, phase: str, N: int, M: int, D: int, dtype: torch.dtype) -> KernelConfig:
        return self.candidates(phase, N, M, D, dtype)[0]


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


def _dz_scale(dtype: torch.dtype) -> float:
    """Power-of-two scale of the backward's 16-bit dz operand: 2^14 for fp16 (|P − Y| ≤ 1 stays finite,
    g·P ≈ 1/(N·M) no longer underflows), 1 otherwise (bf16 and fp32 have fp32's exponent range)."""
    return 16384.0 if dtype == torch.float16 else 1.0


def launch_fwd(q: torch.Tensor, k: torch.Tensor, scale, o: LaunchOptions):
    """q (G,N,D), k (G,M,D) -> loss (G,N) fp32, lse (G,N) fp32, count (G,N) int32.

    |P(i)| is counted by `positives.positive_counts` in O(N + M), outside the kernel's N×M pass.
    """
    from .kernels_fwd import contrast_fwd_kernel
    G, N, D = q.shape
    M = k.shape[1]
    loss = _empty((G, N), torch.float32, q.device, float("nan"))
    lse = _empty((G, N), torch.float32, q.device, float("nan"))
    cnt = positive_counts(("index", "label", "radius")[o.rule], o.q_meta, o.k_meta, M, threshold=o.threshold,
                          exclude_self=o.exclude_self, q_valid=o.q_valid, k_valid=o.k_valid)
    if G * N == 0:
        return loss, lse, cnt
    km, kv, flags = _common(o, q)
    s_ptr, s, in_mem = _scale_args(scale, lse)
    launch(contrast_fwd_kernel, o.candidates("fwd", N, M, D, q.dtype), o.interpret,
           lambda meta: (G * -(-N // meta["BLOCK_M"]),),
           [q, k, o.q_meta, km, kv, s_ptr, cnt, loss, lse, s, o.threshold, N, M,
            *q.stride(), *k.stride(), loss.stride(0), loss.stride(1)],
           dict(D=D, SCALE_IN_MEM=in_mem, **flags), sizes=(N, M))
    return loss, lse, cnt


def launch_bwd(phase: str, q, k, scale, lse, cnt, grad, o: LaunchOptions, with_ds: bool = False):
    """(dq (G,N,D), ds_rows (G,N) fp32 or None) for phase 'dq'; (dk (G,M,D), None) for 'dk'; for 'dsym'
    (k is q, N = M) the whole gradient dq + dk (G,N,D) and ds_rows as for 'dq'.

    grad (G,N) fp32, 0 where the anchor does not count. Gradients in the input dtype. with_ds (dq only):
    also Σ_j dz_ij z_ij / s per anchor, whose sum is ∂L/∂s.
    """
    from .kernels_bwd import contrast_dk_kernel, contrast_dq_kernel
    G, N, D = q.shape
    M = k.shape[1]
    rows_phase = phase in ("dq", "dsym")
    rows = N if rows_phase else M
    out = _empty((G, rows, D), q.dtype, q.device, float("nan"))
    if N == 0 or M == 0 or D == 0 or G == 0:   # no z_ij at all: the gradients are exactly zero
        return out.zero_(), torch.zeros((G, N), dtype=torch.float32, device=q.device) if with_ds else None
    cands = o.candidates(phase, N, M, D, q.dtype)
    n_dout = cands[0].n_dout(D)              # BLOCK_DOUT is the same for every candidate of a class
    ds = _empty((G, N, n_dout), torch.float32, q.device, float("nan")) if with_ds else None
    km, kv, flags = _common(o, q)
    s_ptr, s, in_mem = _scale_args(scale, lse)
    # dk, dsym: dz = (g_i / max|g|)(P − Y)·DZ_SCALE, so max|g| is read by the kernel (a device scalar: no sync)
    gmax = grad.abs().amax().reshape(1) if phase != "dq" else lse
    extra = dict(WITH_DS=with_ds, SYM=phase == "dsym") if rows_phase else {}
    if phase != "dq":   # dk, dsym: per-anchor weights W_i = g_i/max|g|·DZ_SCALE, WY_i = W_i/|P(i)| (kernels_bwd)
        w = grad * torch.where(gmax > 0, _dz_scale(q.dtype) / gmax.clamp_min(1e-30), 0.0)
        grad, cnt = w, torch.where(cnt > 0, w / cnt.clamp_min(1), 0.0)
    args = [q, k, o.q_meta, km, kv, s_ptr, gmax, lse, cnt, grad, out]
    if rows_phase:
        args.append(lse if ds is None else ds)   # DS is never written when WITH_DS is off
    block = "BLOCK_M" if rows_phase else "BLOCK_N"
    launch(contrast_dq_kernel if rows_phase else contrast_dk_kernel, cands, o.interpret,
           lambda meta: (G * -(-rows // meta[block]) * n_dout,),
           args + [s, o.threshold, N, M, *q.stride(), *k.stride(), lse.stride(0), lse.stride(1), *out.stride()],
           dict(D=D, SCALE_IN_MEM=in_mem, DZ_SCALE=_dz_scale(q.dtype), **flags, **extra), sizes=(N, M))
    return out, None if ds is None else ds[..., 0]   # the n_dout copies are identical


#: raised by a backward with create_graph=True (docs/losses.md, "Higher-order gradients")
DOUBLE_BACKWARD_ERROR = (
    "impl='triton' does not support higher-order gradients (a backward with create_graph=True, e.g. a gradient "
    "penalty or torch.autograd.gradgradcheck): its backward kernels are not differentiable. Use impl='torch' "
    "for this loss (it recomputes the loss with differentiable torch operations when create_graph=True)")


class TritonContrast(torch.autograd.Function):
    """apply(q, k, scale, opts) -> (loss, lse, count); only loss is differentiable (w.r.t. q, k, scale).

    q and k may be the same tensor (self-contrast): the backward then launches the one 'dsym' kernel and returns
    the whole gradient in q's slot. With a learnable scale it launches dq (with the ds sum) and dk instead: a
    version of the SYM kernel with the in-kernel ds sum spilled registers under the learnable-τ flag sets (the
    16-bit sm_90 defaults at D = 64 and 256 among them), so the kernel now excludes it.
    """

    @staticmethod
    def forward(ctx, q, k, scale, opts: LaunchOptions):
        loss, lse, cnt = launch_fwd(q, k, scale, opts)
        ctx.mark_non_differentiable(lse, cnt)
        tensor_scale = isinstance(scale, torch.Tensor)
        ctx.save_for_backward(q, k, lse, cnt, scale if tensor_scale else None)
        ctx.scale = None if tensor_scale else scale
        ctx.opts = opts
        ctx.self_contrast = q is k
        return loss, lse, cnt

    @staticmethod
    def backward(ctx, g_loss, g_lse, g_cnt):
        if torch.is_grad_enabled():   # a backward with create_graph=True
            raise RuntimeError(DOUBLE_BACKWARD_ERROR)
        return TritonContrast._backward(ctx, g_loss, g_lse, g_cnt)

    @staticmethod
    @once_differentiable
    def _backward(ctx, g_loss, g_lse, g_cnt):
        q, k, lse, cnt, scale_t = ctx.saved_tensors
        scale = scale_t if scale_t is not None else ctx.scale
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        need_s = need_s and scale_t is not None
        dq = dk = ds = None
        if not (need_q or need_k or need_s):
            return None, None, None, None
        # g_i = 0 for anchors that do not count (invalid or no positive): where(), in case g_loss is not finite
        grad = torch.where(cnt > 0, g_loss.to(torch.float32), 0.0).contiguous()
        if ctx.self_contrast and (need_q or need_k) and not need_s:   # dq + dk from one kernel, in q's slot
            dx, _ = launch_bwd("dsym", q, q, scale, lse, cnt, grad, ctx.opts)
            return dx, None, None, None
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
    """LaunchOptions of problem `p`: int32 metadata (pos_index; labels as per-group dense ids, converted once
    here, sync-free), float32 positions, bool masks viewed as uint8; all contiguous."""
    def u8(t):
        return None if t is None else t.contiguous().view(torch.uint8)
    if p.rule == "label":
        q_meta, k_meta = dense_label_ids(p.q_meta, p.k_meta)
    elif p.rule == "index":
        q_meta, k_meta = p.q_meta.to(torch.int32).contiguous(), None   # pos_index < M < 2**31
    else:
        q_meta, k_meta = p.q_meta.contiguous(), p.k_meta.contiguous()
    return LaunchOptions(
        rule=_RULE_ID[p.rule], q_meta=q_meta, k_meta=k_meta,
        q_valid=u8(p.q_valid), k_valid=u8(p.k_valid), threshold=float(p.threshold),
        exclude_self=bool(p.exclude_self),
        precision="tf32" if (allow_tf32 and p.q.dtype == torch.float32) else "ieee",
        upcast_dot=interpret and p.q.dtype == torch.bfloat16, configs=configs, interpret=interpret)


def check_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError unless dtype is float32, float16 or bfloat16."""
    if dtype not in _SUPPORTED:
        raise TypeError(f"the Triton implementation supports float32, float16 and bfloat16 inputs, got {dtype}"
                        + (" (use impl='torch' or 'reference' for float64)" if dtype == torch.float64 else ""))

