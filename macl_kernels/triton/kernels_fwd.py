"""Forward kernel of the core operation (KERNELS.md §1) and the call-time JIT wrapper.

The kernels are plain Python functions, wrapped by `kernel(fn)` when launched: as a `triton.JITFunction`
normally, or as the interpreter's `InterpretedFunction` when TRITON_INTERPRET=1 at call time. Wrapping at
call time (not with an import-time `@triton.jit`) means importing this module never picks a backend from
the environment, and `macl_kernels.triton.aot` always gets a real JITFunction to compile. The cost: the kernels
cannot call other jitted helpers (they would be of the wrong kind in one of the two modes), so the small
tile prologue (z by tl.dot, the masks) is written out in each kernel.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

_WRAPPED: dict = {}


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 now (read at call time, never cached)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel(fn, interpret: bool | None = None):
    """The launchable form of kernel `fn`: JITFunction, or InterpretedFunction under the interpreter."""
    interpret = interpreting() if interpret is None else interpret
    key = (fn, interpret)
    if key not in _WRAPPED:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction
            _WRAPPED[key] = InterpretedFunction(fn)
        else:
            _WRAPPED[key] = triton.JITFunction(fn)
    return _WRAPPED[key]


def contrast_fwd_kernel(
    Q, K, QM, KM, KV, S_PTR, CNT,         # features (G,N,D)/(G,M,D); metadata (G,N)/(G,M); scale (1,); |P(i)| (G,N)
    LOSS, LSE,                            # outputs (G,N) fp32
    scale, threshold, N, M,
    stride_qg, stride_qn, stride_qd, stride_kg, stride_km, stride_kd, stride_og, stride_on,
    D: tl.constexpr, RULE: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    HAS_KV: tl.constexpr, SCALE_IN_MEM: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program = (group g, BLOCK_M anchors), flattened on grid axis 0; streams key tiles of BLOCK_N.

    RULE: 0 index (QM = pos_index int32), 1 label (QM/KM int32 dense label ids), 2 radius (QM/KM fp32
    positions). CNT (G,N) int32 is |P(i)| computed by the launcher in O(N + M) (0 for anchors that do not
    count). Metadata, CNT and validity (uint8) tensors are contiguous: element (g, i) at g*N + i.
    BLOCK_D ≥ D (one chunk): the q tile is loaded once and stays resident for the whole key loop, which is
    then the only loop, so the software pipeliner overlaps the next key tile's load with this tile's math.
    BLOCK_D < D: z accumulates over D chunks inside the key loop (q and k chunks streamed; z computed once).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    NUM_D: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    EVEN_D: tl.constexpr = D % BLOCK_D == 0
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(N, BLOCK_M)
    # int64 offsets by zero extension (indices are ≥ 0): a sign word kept live across the main loop
    # is what ptxas chose to spill in several configurations
    g = (pid // n_row_tiles).to(tl.uint32).to(tl.int64)
    offs_m = (pid % n_row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.uint32).to(tl.int64)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)     # offs_d * stride may exceed 2**31 for strided views
    q_rows = Q + g * stride_qg + rows[:, None] * stride_qn
    k_base = K + g * stride_kg
    if SCALE_IN_MEM:
        s = tl.load(S_PTR).to(tl.float32)
    else:
        s = scale
    if RULE == 2:
        q_meta = tl.load(QM + g * N + rows, mask=row_ok, other=0.0)
    else:
        q_meta = tl.load(QM + g * N + rows, mask=row_ok, other=-1)
    if NUM_D == 1:                        # the q tile stays resident for the whole key loop
        if EVEN_D:
            q_tile = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
        else:
            q_tile = tl.load(q_rows + offs_d[None, :] * stride_qd,
                             mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST_DOT:
            q_tile = q_tile.to(tl.float32)

    # Running state: m = −inf (no key seen), l = 0, and the shift mL = ⌈m·log2e⌉ on the integer grid (0 while
    # m = −inf). An integer shift makes the rescale factor of l an exact power of two, 2^(mL_old − mL_new),
    # built from its exponent bits (FADD + shift) instead of an exp2: the loop's only MUFU.EX2 are the
    # one per z element, so the forward is exactly one exp pass (sass_report counts it). The factor is
    # clamped to [2^-127 → 0, 1]: while m = −inf, l is 0 and so is the product (a first tile whose max is
    # below −88.7 gave 0·inf = NaN with exp2 of the raw difference). Every exponent z·log2e − mL is ≤ ~0,
    # and the row maximum's is > −1, so l ∈ [2^-1, M·1] never under- or overflows.
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    mL_i = tl.zeros([BLOCK_M], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos_dot = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        k_rows = k_base + offs_n.to(tl.uint32).to(tl.int64)[:, None] * stride_km
        # raw dot <q_i, k_j>, fp32 accumulation
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NUM_D == 1:
            if EVEN_D:
                k_tile = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
            else:
                k_tile = tl.load(k_rows + offs_d[None, :] * stride_kd,
                                 mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST_DOT:
                k_tile = k_tile.to(tl.float32)
            acc = tl.dot(q_tile, tl.trans(k_tile), acc, input_precision=INPUT_PRECISION)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + offs_d
                q_c = tl.load(q_rows + dd[None, :] * stride_qd, mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
                k_c = tl.load(k_rows + dd[None, :] * stride_kd, mask=col_ok[:, None] & (dd[None, :] < D), other=0.0)
                if UPCAST_DOT:
                    q_c = q_c.to(tl.float32)
                    k_c = k_c.to(tl.float32)
                acc = tl.dot(q_c, tl.trans(k_c), acc, input_precision=INPUT_PRECISION)
        # V(i): real key, valid key, not self (rows past N are never stored, so not masked here)
        key_ok = col_ok
        if HAS_KV:
            key_ok = key_ok & (tl.load(KV + g * M + offs_n, mask=col_ok, other=0) != 0)
        valid = key_ok[None, :]
        if EXCLUDE_SELF:
            valid = valid & (offs_m[:, None] != offs_n[None, :])
        # P(i) ⊆ V(i), from per-row metadata only
        if RULE == 0:
            pos = valid & (offs_n[None, :] == q_meta[:, None])
        elif RULE == 1:
            k_meta = tl.load(KM + g * M + offs_n, mask=col_ok, other=-1)
            pos = valid & (k_meta[None, :] == q_meta[:, None])
        else:
            k_meta = tl.load(KM + g * M + offs_n, mask=col_ok, other=0.0)
            pos = valid & (tl.abs(q_meta[:, None] - k_meta[None, :]) < threshold)
        # online log-sum-exp: l = Σ exp2(z·log2e − mL), mL = fl(m·log2e), one FMA per exponent. z = fl(acc·s)
        # rounds once, as the reference's does; folding log2e into s instead would put two more roundings of
        # size |z|·eps into every exponent, which P = exp(z − LSE) in the backward turns into gradient error.
        # A row whose keys so far are all masked keeps m = -inf, l = 0.
        z = tl.where(valid, acc * s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        mL_new = tl.ceil(tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E)
        # 2^e for the integer e = mL_i − mL_new ∈ [−127, 0]: e + 127 + 2^23 is a float whose low mantissa
        # bits are e + 127, i.e. the exponent field of 2^e (e = −127 gives +0). Exact: both shifts are integers.
        e = tl.minimum(tl.maximum(mL_i - mL_new, -127.0), 0.0)
        alpha = ((e + 8388735.0).to(tl.uint32, bitcast=True) << 23).to(tl.float32, bitcast=True)
        l_i = l_i * alpha + tl.sum(tl.exp2(z * LOG2E - mL_new[:, None]), 1)
        m_i = m_new
        mL_i = mL_new
        pos_dot += tl.sum(tl.where(pos, acc, 0.0), 1)

    # LSE = m + ln2·(log2 l − (m·log2e − mL)): the FMA gives mL's rounding exactly. -inf (not NaN) when V(i)
    # is empty: m = -inf, mL = 0, l = 0.
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = m_i + (tl.log2(l_i) - tl.fma(m_fin, LOG2E, -mL_i)) * LN2
    o = g * stride_og + rows * stride_on
    cnt = tl.load(CNT + o, mask=row_ok, other=0)
    loss = tl.where(cnt > 0, lse - s * pos_dot / tl.maximum(cnt, 1).to(tl.float32), 0.0)
    tl.store(LOSS + o, loss, mask=row_ok)
    tl.store(LSE + o, lse, mask=row_ok)
