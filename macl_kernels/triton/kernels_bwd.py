"""Backward kernels (KERNELS.md §2): dq over (group, row tile), dk over (group, key tile); for self-contrast
(k is q) the dq kernel with SYM computes the whole gradient dq + dk in one pass (see its docstring).

Both recompute z tile by tile from q, k and the saved LSE, so nothing N×M is stored and no float atomics are
needed: each program owns its output rows, which makes the backward deterministic. With
P_ij = exp(z_ij − LSE_i)·1[j∈V(i)], Y_ij = 1[j∈P(i)]/|P(i)| and g_i (zero for uncounted anchors):
    dz_ij = g_i (P_ij − Y_ij),   dq_i = s Σ_j dz_ij k_j,   dk_j = s Σ_i dz_ij q_i.
Tensor-core configurations own the full output width (BLOCK_DOUT ≥ D): each (row tile, key tile) block of z
is computed once per kernel and the loaded k (dq) / q (dk) tile feeds both dots. Only the fp32 IEEE (FMA)
configurations split the output columns over the grid (BLOCK_DOUT < D), recomputing z once per chunk.
fp16 gradients without underflow: g·P ≈ 1/(N·M) is below fp16's smallest subnormal at N = M ≥ 16k, so the
16-bit operand of the second dot is (P − Y)·DZ_SCALE (dq: g_i and s applied per row after the dot) or
(g_i/max|g|)·(P − Y)·DZ_SCALE (dk); |P − Y| ≤ 1, so DZ_SCALE = 2^14 cannot overflow fp16.
Plain functions; wrap with `kernels_fwd.kernel(fn)` to launch (see there why).
"""
from __future__ import annotations

import triton.language as tl


def contrast_dq_kernel(
    Q, K, QM, KM, KV, S_PTR, GMAX, LSE, CNT, GRAD, DQ, DS,  # GRAD (G,N), DS (G,N,n_dout) fp32; DQ (G,N,D) q's dtype
    scale, threshold, N, M,
    stride_qg, stride_qn, stride_qd, stride_kg, stride_km, stride_kd, stride_og, stride_on,
    stride_dg, stride_dn, stride_dd,
    D: tl.constexpr, RULE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_KV: tl.constexpr,
    SCALE_IN_MEM: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, WITH_DS: tl.constexpr,
    DZ_SCALE: tl.constexpr, SYM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    """dq_i[c-chunk] = s g_i Σ_j (P_ij − Y_ij) k_j[c-chunk]; pid = (g·n_row_tiles + row tile)·n_dout + c.

    GMAX (1,) fp32 = max_i |g_i| is read only with SYM.

    SYM (self-contrast: K is Q, M = N, one gradient dx = dq + dk): z is symmetric, so the z tile (I, J) also
    holds z_ji, and the program adds key j's term for anchor j to the same operand:
        dx_i = s Σ_j [g_i (P_ij − Y_ij) + g_j (P_ji − Y_ji)] x_j,   P_ji = exp(z_ij − LSE_j)·1[i∈V(j)],
    with V(j), P(j) evaluated from the metadata with the roles of the two indices swapped (KV / KM at the
    rows, QM at the keys). One kernel, one z and one gradient GEMM per tile: forward + backward = 3 GEMM units
    and 3 exp passes instead of 5 and 3, deterministic (each program owns its rows; no atomics). With SYM the
    launcher passes per-anchor weights instead of g and |P(i)|, so that each key tile loads three floats per
    key (LSE, W, WY) and the operand is one FMA-like expression: GRAD = W_i = g_i/max|g|·DZ_SCALE and CNT (fp32)
    = WY_i = W_i/|P(i)| (0 for anchors that do not count), dz_op = W_i P_ij − WY_i 1[j∈P(i)] + W_j P_ji −
    WY_j 1[i∈P(j)]; |dz_op| ≤ 2·DZ_SCALE = 2^15 stays finite in fp16. SYM excludes WITH_DS: with the ds sum
    the kernel spilled registers, so a learnable scale takes the dq and dk kernels (autograd.TritonContrast).

    WITH_DS: also DS_i = Σ_j dz_ij z_ij / s = Σ_j dz_ij (acc_ij − LSE_i/s) (Σ_j dz_ij = 0 where g_i ≠ 0; the
    shift keeps the terms small when every logit is far from 0), so that ds = Σ_i DS_i is accumulated in fp32
    from dz before dz is rounded to the input dtype for the dot. (A runtime `if c == 0` around that store
    made ptxas spill; each chunk writing its own copy costs n_dout floats per anchor.)
    """
    tl.static_assert(not (SYM and WITH_DS), "SYM excludes WITH_DS")
    LOG2E: tl.constexpr = 1.4426950408889634
    NUM_D: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    NUM_DOUT: tl.constexpr = (D + BLOCK_DOUT - 1) // BLOCK_DOUT
    REUSE_K: tl.constexpr = (NUM_D == 1) and (NUM_DOUT == 1) and (BLOCK_D == BLOCK_DOUT)
    pid = tl.program_id(0)
    n_row_tiles = tl.cdiv(N, BLOCK_M)
    c = pid % NUM_DOUT
    pid_t = pid // NUM_DOUT
    # int64 offsets by zero extension (indices are ≥ 0): a sign word kept live across the main loop
    # is what ptxas chose to spill in several configurations
    g = (pid_t // n_row_tiles).to(tl.uint32).to(tl.int64)
    offs_m = (pid_t % n_row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = offs_m.to(tl.uint32).to(tl.int64)
    row_ok = offs_m < N
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)     # offs_d * stride may exceed 2**31 for strided views
    offs_o = (c * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)).to(tl.int64)
    q_rows = Q + g * stride_qg + rows[:, None] * stride_qn
    k_base = K + g * stride_kg
    if SCALE_IN_MEM:
        s = tl.load(S_PTR).to(tl.float32)
    else:
        s = scale
    o = g * stride_og + rows * stride_on
    lse = tl.load(LSE + o, mask=row_ok, other=0.0)
    if SYM:     # W_i, WY_i (docstring)
        w_row = tl.load(GRAD + o, mask=row_ok, other=0.0)
        wy_row = tl.load(CNT + o, mask=row_ok, other=0.0)
    else:
        g_row = tl.load(GRAD + o, mask=row_ok, other=0.0)
        cnt = tl.load(CNT + o, mask=row_ok, other=0)
        inv_cnt = tl.where(cnt > 0, 1.0 / tl.maximum(cnt, 1).to(tl.float32), 0.0)
    if RULE == 2:
        q_meta = tl.load(QM + g * N + rows, mask=row_ok, other=0.0)
    else:                                 # int32 pos_index / label ids
        q_meta = tl.load(QM + g * N + rows, mask=row_ok, other=-1)
    if NUM_D == 1:
        q_tile = tl.load(q_rows + offs_d[None, :] * stride_qd,
                         mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST_DOT:
            q_tile = q_tile.to(tl.float32)
    if SYM:   # the rows as keys of the other anchors: their validity and key metadata
        row_key_ok = row_ok
        if HAS_KV:
            row_key_ok = row_key_ok & (tl.load(KV + g * M + rows, mask=row_ok, other=0) != 0)
        if RULE == 1:
            k_meta_row = tl.load(KM + g * M + rows, mask=row_ok, other=-1)
        elif RULE == 2:
            k_meta_row = tl.load(KM + g * M + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DOUT], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    if WITH_DS:   # Σ_j dz_ij = 0 on every counted row, so shifting acc by LSE_i/s is exact and cancels less
        ds_shift = tl.where(lse > float("-inf"), lse, 0.0) * tl.where(s != 0.0, 1.0 / tl.where(s != 0.0, s, 1.0), 0.0)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < M
        k_rows = k_base + offs_n.to(tl.uint32).to(tl.int64)[:, None] * stride_km
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NUM_D == 1:
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
        # rows past N have g = 0 (masked load), so only keys are masked here
        key_ok = col_ok
        if HAS_KV:
            key_ok = key_ok & (tl.load(KV + g * M + offs_n, mask=col_ok, other=0) != 0)
        valid = key_ok[None, :]
        if EXCLUDE_SELF:
            valid = valid & (offs_m[:, None] != offs_n[None, :])
        if RULE == 0:
            pos = valid & (offs_n[None, :] == q_meta[:, None])
        elif RULE == 1:
            k_meta = tl.load(KM + g * M + offs_n, mask=col_ok, other=-1)
            pos = valid & (k_meta[None, :] == q_meta[:, None])
        else:
            k_meta = tl.load(KM + g * M + offs_n, mask=col_ok, other=0.0)
            pos = valid & (tl.abs(q_meta[:, None] - k_meta[None, :]) < threshold)
        # P = exp(z − LSE) with z = fl(acc·s) rounded exactly as the forward rounded it (the where() keeps the
        # compiler from contracting acc·s − LSE into one FMA), then z − LSE (near 0, so exact or nearly), then
        # exp2. P must be consistent with the z that LSE was built from: a different rounding of z alone
        # costs ~|z|·eps of relative error on every P_ij, several times the reference's gradient error.
        # where(), not a product with the mask: on rows with LSE = -inf (empty V(i)) the exponent is NaN/inf.
        zs = acc * s
        z = tl.where(valid, zs, float("-inf"))
        p = tl.where(valid, tl.exp2((z - lse[:, None]) * LOG2E), 0.0)
        if SYM:
            dz = w_row[:, None] * p - tl.where(pos, wy_row[:, None], 0.0)
        else:
            dz = p - tl.where(pos, inv_cnt[:, None], 0.0)      # g_i is applied per row after the loop
        if WITH_DS:
            ds += tl.sum(dz * (acc - ds_shift[:, None]), 1)
        if SYM:   # + g_j (P_ji − Y_ji): key j as the anchor, row i as its key (z_ji = z_ij)
            o_c = g * stride_og + offs_n * stride_on
            lse_c = tl.load(LSE + o_c, mask=col_ok, other=0.0)
            w_c = tl.load(GRAD + o_c, mask=col_ok, other=0.0)
            wy_c = tl.load(CNT + o_c, mask=col_ok, other=0.0)
            valid_t = row_key_ok[:, None] & col_ok[None, :]
            if EXCLUDE_SELF:
                valid_t = valid_t & (offs_m[:, None] != offs_n[None, :])
            if RULE == 2:
                q_meta_c = tl.load(QM + g * N + offs_n, mask=col_ok, other=0.0)
                pos_t = valid_t & (tl.abs(q_meta_c[None, :] - k_meta_row[:, None]) < threshold)
            elif RULE == 1:
                q_meta_c = tl.load(QM + g * N + offs_n, mask=col_ok, other=-1)
                pos_t = valid_t & (k_meta_row[:, None] == q_meta_c[None, :])
            else:
                q_meta_c = tl.load(QM + g * N + offs_n, mask=col_ok, other=-1)
                pos_t = valid_t & (offs_m[:, None] == q_meta_c[None, :])
            z_t = tl.where(valid_t, zs, float("-inf"))
            p_t = tl.where(valid_t, tl.exp2((z_t - lse_c[None, :]) * LOG2E), 0.0)
            dz_op = dz + w_c[None, :] * p_t - tl.where(pos_t, wy_c[None, :], 0.0)
        else:
            dz_op = dz * DZ_SCALE
        if REUSE_K:
            k_out = k_tile
        else:
            k_out = tl.load(k_rows + offs_o[None, :] * stride_kd,
                            mask=col_ok[:, None] & (offs_o[None, :] < D), other=0.0)
            if UPCAST_DOT:
                k_out = k_out.to(tl.float32)
        dq = tl.dot(dz_op.to(k_out.dtype), k_out, dq, input_precision=INPUT_PRECISION)

    if SYM:
        dq = dq * (s * (tl.load(GMAX) / DZ_SCALE))
    else:
        dq = dq * (g_row * (s / DZ_SCALE))[:, None]
        ds = ds * g_row
    d_ptrs = DQ + g * stride_dg + rows[:, None] * stride_dn + offs_o[None, :] * stride_dd
    tl.store(d_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_o[None, :] < D))
    if WITH_DS:   # DS (G, N, n_dout): every D-out chunk writes its (identical) copy; no branch on c
        tl.store(DS + (g * N + rows) * NUM_DOUT + c, ds, mask=row_ok)


def contrast_dk_kernel(
    Q, K, QM, KM, KV, S_PTR, GMAX, LSE, CNT, GRAD, DK,   # GMAX (1,) fp32 = max_i |g_i|; DK (G,M,D) in k's dtype
                                                         # GRAD = W (G,N), CNT = WY (G,N) fp32 (docstring)
    scale, threshold, N, M,
    stride_qg, stride_qn, stride_qd, stride_kg, stride_km, stride_kd, stride_og, stride_on,
    stride_dg, stride_dm, stride_dd,
    D: tl.constexpr, RULE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, HAS_KV: tl.constexpr,
    SCALE_IN_MEM: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, DZ_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    """dk_j[c-chunk] = s·gmax Σ_i (g_i/gmax)(P_ij − Y_ij) q_i[c-chunk]; pid = (g·n_key_tiles + key tile)·n_dout + c.

    The launcher passes per-anchor weights, as for the dq kernel with SYM: GRAD = W_i = g_i/max|g|·DZ_SCALE, CNT
    = WY_i = W_i/|P(i)| (fp32, 0 where the anchor does not count), so dz = W_i P_ij − WY_i 1[j∈P(i)] with two
    loads per anchor and no division in the loop (with g and |P(i)| there, the 128×64 sm_90 tile at D = 256
    spilled; `python -m benchmarks.sm90_tile_trials dk:256:128:64:8:3` compiles it with none now).

    z is recomputed as q kᵀ (BLOCK_M × BLOCK_N), exactly as in the forward and dq kernels, and dzᵀ feeds
    the dot: computing zᵀ = k qᵀ instead rounds differently (in the interpreter's BLAS, and whenever the
    reduction order differs), and P = exp(z − LSE) amplifies that inconsistency (3–4× the fp32 error).
    """
    LOG2E: tl.constexpr = 1.4426950408889634
    NUM_D: tl.constexpr = (D + BLOCK_D - 1) // BLOCK_D
    NUM_DOUT: tl.constexpr = (D + BLOCK_DOUT - 1) // BLOCK_DOUT
    REUSE_Q: tl.constexpr = (NUM_D == 1) and (NUM_DOUT == 1) and (BLOCK_D == BLOCK_DOUT)
    pid = tl.program_id(0)
    n_key_tiles = tl.cdiv(M, BLOCK_N)
    c = pid % NUM_DOUT
    pid_t = pid // NUM_DOUT
    g = (pid_t // n_key_tiles).to(tl.uint32).to(tl.int64)
    offs_n = (pid_t % n_key_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n.to(tl.uint32).to(tl.int64)
    col_ok = offs_n < M
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)     # offs_d * stride may exceed 2**31 for strided views
    offs_o = (c * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)).to(tl.int64)
    k_rows = K + g * stride_kg + cols[:, None] * stride_km
    q_base = Q + g * stride_qg
    if SCALE_IN_MEM:
        s = tl.load(S_PTR).to(tl.float32)
    else:
        s = scale
    key_ok = col_ok
    if HAS_KV:
        key_ok = key_ok & (tl.load(KV + g * M + cols, mask=col_ok, other=0) != 0)
    if RULE == 1:
        k_meta = tl.load(KM + g * M + cols, mask=col_ok, other=-1)
    elif RULE == 2:
        k_meta = tl.load(KM + g * M + cols, mask=col_ok, other=0.0)
    if NUM_D == 1:                        # hoist the k tile out of the anchor loop
        k_tile = tl.load(k_rows + offs_d[None, :] * stride_kd,
                         mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST_DOT:
            k_tile = k_tile.to(tl.float32)

    dk = tl.zeros([BLOCK_N, BLOCK_DOUT], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q_rows = q_base + offs_m.to(tl.uint32).to(tl.int64)[:, None] * stride_qn
        # z/s = q kᵀ in the forward's orientation and chunking, so that it rounds as it did against LSE
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if NUM_D == 1:
            q_tile = tl.load(q_rows + offs_d[None, :] * stride_qd,
                             mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST_DOT:
                q_tile = q_tile.to(tl.float32)
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
        o = g * stride_og + offs_m * stride_on
        lse = tl.load(LSE + o, mask=row_ok, other=0.0)
        w_row = tl.load(GRAD + o, mask=row_ok, other=0.0)       # W_i, WY_i (docstring)
        wy_row = tl.load(CNT + o, mask=row_ok, other=0.0)
        valid = key_ok[None, :]           # anchors past N have W = 0
        if EXCLUDE_SELF:
            valid = valid & (offs_m[:, None] != offs_n[None, :])
        if RULE == 0:
            q_meta = tl.load(QM + g * N + offs_m, mask=row_ok, other=-1)
            pos = valid & (offs_n[None, :] == q_meta[:, None])
        elif RULE == 1:
            q_meta = tl.load(QM + g * N + offs_m, mask=row_ok, other=-1)
            pos = valid & (k_meta[None, :] == q_meta[:, None])
        else:
            q_meta = tl.load(QM + g * N + offs_m, mask=row_ok, other=0.0)
            pos = valid & (tl.abs(q_meta[:, None] - k_meta[None, :]) < threshold)
        z = tl.where(valid, acc * s, float("-inf"))                            # as in the dq kernel
        p = tl.where(valid, tl.exp2((z - lse[:, None]) * LOG2E), 0.0)
        dz = w_row[:, None] * p - tl.where(pos, wy_row[:, None], 0.0)
        if REUSE_Q:
            q_out = q_tile
        else:
            q_out = tl.load(q_rows + offs_o[None, :] * stride_qd,
                            mask=row_ok[:, None] & (offs_o[None, :] < D), other=0.0)
            if UPCAST_DOT:
                q_out = q_out.to(tl.float32)
        dk = tl.dot(tl.trans(dz.to(q_out.dtype)), q_out, dk, input_precision=INPUT_PRECISION)

    dk = dk * (s * (tl.load(GMAX) / DZ_SCALE))
    d_ptrs = DK + g * stride_dg + cols[:, None] * stride_dm + offs_o[None, :] * stride_dd
    tl.store(d_ptrs, dk.to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_o[None, :] < D))
