"""Convolution layers as implicit GEMMs with the layer's epilogue, their gradient products, and batch norm's
statistics and backward as two-stage reductions.

Math (one layer: a = product(x) + b, h = norm(a), y = act(h); nn's layouts: conv2d weight [J, C, kh, kw],
conv_transpose2d weight [C, J, kh, kw]; s the stride, p the padding):

    gather     out[n, j, o] = sum_{c, k} X[n, c, o s - p + k] Wt[j, c, k]          conv2d forward, and the
                                                                                   transposed conv's input grad
    transposed out[n, j, i] = sum_{c, k: (i + p - k) % s = 0} X[n, c, (i + p - k)/s] Wt[c, j, k]
                                                                                   conv_transpose2d forward, and
                                                                                   conv2d's input gradient
    weight     G[u, v, k]   = sum_{n, q} S[n, u, q] T[n, v, q s - p + k]            conv2d: S = da, T = x;
                                                                                   transposed: S = x, T = da
    moments    per group g and channel c: mean and M2 = sum (a - mean)^2 over the group's rows and positions
    grad sums  per group and channel: sum dh and sum dh xhat, dh = dy act'(kept), xhat = (a - mean) rstd
    norm bwd   da = rstd gamma (dh - sum dh / n - xhat sum(dh xhat) / n)  (training; eval: rstd gamma dh)

``conv_kernel`` runs both the gather and the transposed form as one implicit GEMM (rows: output positions
(n, oh, ow); columns: output channels; reduction: the taps (kh, kw) outside, the input channels inside, so a
tap's validity and address are per row and channels-last inputs load contiguous runs). The transposed form
splits the output positions by their phase (oh mod s, ow mod s): within a phase the taps that reach an input
position are kh = kh0 + s t, so it multiplies only those (ceil(kh/s) taps per dimension), never the s^2 - 1 zeros
in s^2 of a zero-inserted input. Its epilogue adds the bias, applies a
batch norm from given statistics (eval mode) and the activation, and stores any of a, h and y. In training mode
with a norm the kernel stores a; ``channel_moments_kernel`` (one program per group, chunk of rows and block of
channels: count, mean, M2 of the chunk) and ``moments_merge_kernel`` (Chan's pairwise update over the chunks, in
order: deterministic, and no E[a^2] - E[a]^2 cancellation) give the statistics, and ``norm_act_kernel`` applies
norm and activation in one pass. Backward: ``grad_sums_kernel`` + ``sums_merge_kernel`` reduce dh and dh xhat
(act' applied as dy loads), ``norm_backward_kernel`` forms da in one pass (act' and the norm's backward
together), then the input gradient (``conv_kernel``) and ``weight_grad_kernel`` (split over the reduction when
the output has few tiles; fp32 partials summed in a fixed order; one tap per program).

Every tensor is read through its own strides (contiguous, channels-last, or a row slice of either); outputs are
channels-last ([N, C, H, W] with the channels innermost: the implicit GEMM's row-major [N H W, C]). Dense
layers with a norm run here as 1x1 convolutions on 1x1 images.

Precision: as kernels/triton/linear_act.py (fp32 IEEE products; bf16/fp16 operands into the tensor cores with
an fp32 accumulator; fp64 for gradcheck; bf16 stores rounded to nearest even under the interpreter). a is
rounded to the tensors' dtype before the norm reads it, h before the activation, as the reference does.

Bytes moved (s bytes per element; P = N OH OW output positions, J output channels): the forward reads x once
per tile of output channels (once when J <= BLOCK_N) and the weight once per tile of positions, and writes y
(plus a and h where backward needs them), P J s each; eager runs the convolution (bias in its epilogue), then
the norm's statistics, the normalisation and the activation as separate kernels, each reading and writing
P J s. Backward reads dy and the saved tensors twice (the sums, then da) and writes da once, where eager's
activation backward, batch-norm backward and convolution backward each read and write the full tensor; the
input- and weight-gradient products then read da as the forward read x.

Where it can be slower than cuDNN: the gathers compute an address per row and tap and load without TMA
descriptors, and the weight gradient's reduction over N OH OW rows is split only when its output has fewer
tiles than the GPU has multiprocessors (two programs per SM).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import CompileSpec, check_tensors, compute_dtype, interpreting, next_pow2, tl_dtype, tl_name
from .gan_losses import _cast
from .linear_act import ACT_CODES, _act_grad, _apply_act

_DO_NOT_SPECIALIZE = ["N", "C", "H", "W", "J", "OH", "OW", "sx_n", "sx_c", "sx_h", "sx_w", "sw_j", "sw_c",
                      "sw_h", "sw_w"]


@triton.jit
def _round(v, ELEM: tl.constexpr, COMPUTE: tl.constexpr, RNE: tl.constexpr):
    """v rounded to the tensors' dtype and back (what a store and a reload would give)."""
    return _cast(v, ELEM, RNE).to(COMPUTE)


@triton.jit(do_not_specialize=_DO_NOT_SPECIALIZE)
def conv_kernel(
    x_ptr,  # [N, C, H, W] input, any strides
    w_ptr,  # weight: Wt[j, c, kh, kw] read through the strides sw_j, sw_c, sw_h, sw_w
    b_ptr,  # [J] bias (read when HAS_BIAS)
    mean_ptr,  # [J] norm statistics and affine parameters (read when NORM: eval mode)
    rstd_ptr,
    gamma_ptr,
    beta_ptr,
    y_ptr,  # [N, J, OH, OW] channels-last: act(h) (written when WRITE_Y)
    pre_ptr,  # same layout: a = product + bias (written when SAVE_PRE)
    h_ptr,  # same layout: h = norm(a) (written when SAVE_H)
    N, C, H, W,  # input sizes
    J, OH, OW,  # output channels and size
    sx_n, sx_c, sx_h, sx_w,  # strides of x
    sw_j, sw_c, sw_h, sw_w,  # strides of the weight, by role
    slope,  # leaky_relu negative slope
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size
    SH: tl.constexpr, SW: tl.constexpr,  # stride
    PH: tl.constexpr, PW: tl.constexpr,  # padding
    TRANSPOSED: tl.constexpr,  # the transposed form (grid axis 2: the SH * SW phases)
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,  # apply h = (a - mean) rstd gamma + beta in the epilogue
    ACT: tl.constexpr,  # activation code (kernels/triton/linear_act.py)
    WRITE_Y: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    SAVE_H: tl.constexpr,
    COMPUTE: tl.constexpr,  # accumulator dtype
    DOT: tl.constexpr,  # GEMM operand dtype
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (the interpreter)
    BLOCK_M: tl.constexpr,  # output positions per tile
    BLOCK_N: tl.constexpr,  # output channels per tile
    BLOCK_K: tl.constexpr,  # reduction step over the input channels (the taps are the outer loop)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if TRANSPOSED:
        phase = tl.program_id(2)
        ph_h = phase // SW
        ph_w = phase % SW
        QH = (OH + SH - 1) // SH  # positions per phase (an upper bound: masked below)
        QW = (OW + SW - 1) // SW
        TH = (KH + SH - 1) // SH  # taps per phase and dimension (fewer in some phases: masked)
        TW = (KW + SW - 1) // SW
        kh0 = (ph_h + PH) % SH  # the phase's first tap
        kw0 = (ph_w + PW) % SW
    else:
        QH = OH
        QW = OW
        TH = KH
        TW = KW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = rm // (QH * QW)
    q = rm % (QH * QW)
    if TRANSPOSED:
        oh = ph_h + SH * (q // QW)
        ow = ph_w + SW * (q % QW)
        # the input row tap t reads: (oh + PH - kh0 - SH t) / SH, exact within the phase
        base_h = q // QW + (ph_h + PH - kh0) // SH
        base_w = q % QW + (ph_w + PW - kw0) // SW
    else:
        oh = q // QW
        ow = q % QW
        base_h = oh * SH - PH  # the input row tap (kh, kw) reads: base + k
        base_w = ow * SW - PW
    m_ok = (n < N) & (oh < OH) & (ow < OW)
    rj = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = rj < J
    x_rows = x_ptr + n.to(tl.int64) * sx_n
    rc = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    # Taps outside, channels inside: each tap's validity and address are per row (not per element), and a
    # channels-last input loads contiguous channel runs.
    for t in range(0, TH * TW):
        if TRANSPOSED:
            kh = kh0 + SH * (t // TW)
            kw = kw0 + SW * (t % TW)
            ih = base_h - t // TW
            iw = base_w - t % TW
        else:
            kh = t // TW
            kw = t % TW
            ih = base_h + kh
            iw = base_w + kw
        row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        w_ok = j_ok
        if TRANSPOSED:  # a phase with fewer taps: the rest are outside the kernel (compared as vectors: the
            # interpreter's scalar comparisons can come back as int32, which a mask refuses)
            row_ok = row_ok & (ih * 0 + kh < KH) & (ih * 0 + kw < KW)
            w_ok = w_ok & (rj * 0 + kh < KH) & (rj * 0 + kw < KW)
        x_tap = x_rows + ih * sx_h + iw * sx_w
        w_tap = w_ptr + kh * sw_h + kw * sw_w
        for c0 in range(0, C, BLOCK_K):
            c_ok = rc < C - c0
            xt = tl.load(x_tap[:, None] + (c0 + rc)[None, :] * sx_c, mask=row_ok[:, None] & c_ok[None, :],
                         other=0.0)
            wt = tl.load(w_tap + rj[None, :] * sw_j + (c0 + rc)[:, None] * sw_c,
                         mask=c_ok[:, None] & w_ok[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT), wt.to(DOT), acc, input_precision=PRECISION, out_dtype=COMPUTE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rj, mask=j_ok, other=0.0).to(COMPUTE)[None, :]
    ELEM: tl.constexpr = y_ptr.dtype.element_ty
    out = ((n.to(tl.int64) * OH + oh) * OW + ow)[:, None] * J + rj[None, :]
    mask = m_ok[:, None] & j_ok[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + out, _cast(acc, ELEM, RNE), mask=mask)
    if NORM:
        mean = tl.load(mean_ptr + rj, mask=j_ok, other=0.0).to(COMPUTE)
        scale = tl.load(rstd_ptr + rj, mask=j_ok, other=0.0).to(COMPUTE) * \
            tl.load(gamma_ptr + rj, mask=j_ok, other=0.0).to(COMPUTE)
        beta = tl.load(beta_ptr + rj, mask=j_ok, other=0.0).to(COMPUTE)
        acc = (_round(acc, ELEM, COMPUTE, RNE) - mean[None, :]) * scale[None, :] + beta[None, :]
        if SAVE_H:
            tl.store(h_ptr + out, _cast(acc, ELEM, RNE), mask=mask)
    if WRITE_Y:
        y = _apply_act(_round(acc, ELEM, COMPUTE, RNE), ACT, slope)
        tl.store(y_ptr + out, _cast(y, ELEM, RNE), mask=mask)


@triton.jit(do_not_specialize=["N", "U", "V", "QH", "QW", "TH", "TW", "ss_n", "ss_c", "ss_h", "ss_w", "st_n",
                               "st_c", "st_h", "st_w", "q_per_split"])
def weight_grad_kernel(
    s_ptr,  # S [N, U, QH, QW], any strides (the positions summed over)
    t_ptr,  # T [N, V, TH, TW], any strides (read at q s - p + k)
    g_ptr,  # G [U, V, KH, KW] contiguous (split == 1), or fp32 partials [splits, U, V, KH, KW]
    N, U, V, QH, QW, TH, TW,
    ss_n, ss_c, ss_h, ss_w,
    st_n, st_c, st_h, st_w,
    q_per_split,  # reduction rows per split (a multiple of BLOCK_Q)
    KH: tl.constexpr, KW: tl.constexpr,
    SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    COMPUTE: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    RNE: tl.constexpr,
    BLOCK_U: tl.constexpr,  # rows of the G tile (S's channels)
    BLOCK_V: tl.constexpr,  # columns of the G tile (T's channels, at one tap)
    BLOCK_Q: tl.constexpr,  # reduction step over positions (n, qh, qw)
):
    pid_u = tl.program_id(0)
    tap = tl.program_id(1) // tl.cdiv(V, BLOCK_V)  # one kernel tap (kh, kw) per program: per-row addresses
    pid_v = tl.program_id(1) % tl.cdiv(V, BLOCK_V)
    split = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    ru = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = ru < U
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = rv < V
    P = N * QH * QW
    q_end = tl.minimum(P, (split + 1) * q_per_split)
    acc = tl.zeros([BLOCK_U, BLOCK_V], dtype=COMPUTE)
    for q0 in range(split * q_per_split, q_end, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        n = (rq // (QH * QW)).to(tl.int64)
        qh = (rq // QW) % QH
        qw = rq % QW
        ih = qh * SH - PH + kh
        iw = qw * SW - PW + kw
        q_ok = rq < q_end
        t_ok = q_ok & (ih >= 0) & (ih < TH) & (iw >= 0) & (iw < TW)
        st = tl.load(s_ptr + ru[:, None] * ss_c + (n * ss_n + qh * ss_h + qw * ss_w)[None, :],
                     mask=u_ok[:, None] & q_ok[None, :], other=0.0)
        tt = tl.load(t_ptr + (n * st_n + ih * st_h + iw * st_w)[:, None] + rv[None, :] * st_c,
                     mask=t_ok[:, None] & v_ok[None, :], other=0.0)
        acc = tl.dot(st.to(DOT), tt.to(DOT), acc, input_precision=PRECISION, out_dtype=COMPUTE)
    out = split.to(tl.int64) * U * V * KH * KW + ru[:, None] * (V * KH * KW) + (rv * (KH * KW) + tap)[None, :]
    tl.store(g_ptr + out, _cast(acc, g_ptr.dtype.element_ty, RNE), mask=u_ok[:, None] & v_ok[None, :])


@triton.jit
def _chunk_block(R, C, part_ptr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(group, chunk, channels, channel mask, mask, offsets, partials row) of a first-stage reduction program:
    grid (groups, chunks, channel blocks) over [G R, C] rows, partials [G, chunks, 2, C]."""
    g = tl.program_id(0)
    chunk = tl.program_id(1)
    rr = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mask = (rr < R)[:, None] & c_ok[None, :]
    at = (g * R + rr).to(tl.int64)[:, None] * C + rc[None, :]
    return g, chunk, rc, c_ok, mask, at, part_ptr + (g * tl.num_programs(1) + chunk).to(tl.int64) * 2 * C + rc


@triton.jit(do_not_specialize=["R", "C"])
def channel_moments_kernel(
    a_ptr,  # [G R, C] rows (contiguous): group g holds rows g R .. (g + 1) R - 1
    part_ptr,  # [G, chunks, 2, C] output (COMPUTE dtype): each chunk's mean and M2
    R, C,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per chunk
    BLOCK_C: tl.constexpr,
):
    g, chunk, rc, c_ok, mask, at, base = _chunk_block(R, C, part_ptr, BLOCK_R, BLOCK_C)
    v = tl.load(a_ptr + at, mask=mask, other=0.0).to(COMPUTE)
    count = tl.minimum(R - chunk * BLOCK_R, BLOCK_R).to(COMPUTE)
    mean = tl.sum(v, axis=0) / count
    d = tl.where(mask, v - mean[None, :], 0.0)
    tl.store(base, mean, mask=c_ok)
    tl.store(base + C, tl.sum(d * d, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["R", "C", "chunks"])
def moments_merge_kernel(
    part_ptr,  # [G, chunks, 2, C] from channel_moments_kernel
    mean_ptr,  # [G, C] outputs (COMPUTE dtype): mean, biased variance, 1 / sqrt(var + eps)
    var_ptr,
    rstd_ptr,
    R, C, chunks,
    eps,
    CHUNK: tl.constexpr,  # rows per chunk (channel_moments_kernel's BLOCK_R)
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    mean = tl.zeros([BLOCK_C], dtype=COMPUTE)
    m2 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    count = (R * 0).to(COMPUTE)
    for i in range(0, chunks):
        base = part_ptr + (g * chunks + i).to(tl.int64) * 2 * C + rc
        mean_b = tl.load(base, mask=c_ok, other=0.0)
        m2_b = tl.load(base + C, mask=c_ok, other=0.0)
        n_b = tl.minimum(R - i * CHUNK, CHUNK).to(COMPUTE)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * (n_b / total)
        m2 += m2_b + delta * delta * (count * n_b / total)
        count = total
    var = m2 / count
    out = g * C + rc
    tl.store(mean_ptr + out, mean, mask=c_ok)
    tl.store(var_ptr + out, var, mask=c_ok)
    tl.store(rstd_ptr + out, 1.0 / tl.sqrt(var + eps), mask=c_ok)


@triton.jit
def _row_block(M, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(rows, channels, channel mask, mask, offsets) of this program's block of the [M, C] rows."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    return rr, rc, c_ok, (rr < M)[:, None] & c_ok[None, :], rr.to(tl.int64)[:, None] * C + rc[None, :]


@triton.jit(do_not_specialize=["M", "R", "C"])
def norm_act_kernel(
    a_ptr,  # [M, C] pre-norm rows (contiguous), M = G R
    mean_ptr,  # [G, C] statistics (COMPUTE dtype)
    rstd_ptr,
    gamma_ptr,  # [C]
    beta_ptr,
    y_ptr,  # [M, C] output act(h)
    h_ptr,  # [M, C] output h (written when SAVE_H)
    M, R, C,
    slope,
    ACT: tl.constexpr,
    SAVE_H: tl.constexpr,
    COMPUTE: tl.constexpr,
    RNE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rr, rc, c_ok, mask, at = _row_block(M, C, BLOCK_R, BLOCK_C)
    stat = (rr // R)[:, None] * C + rc[None, :]
    ELEM: tl.constexpr = y_ptr.dtype.element_ty
    a = tl.load(a_ptr + at, mask=mask, other=0.0).to(COMPUTE)
    mean = tl.load(mean_ptr + stat, mask=mask, other=0.0)
    scale = tl.load(rstd_ptr + stat, mask=mask, other=0.0) * tl.load(gamma_ptr + rc, mask=c_ok, other=0.0).to(
        COMPUTE)[None, :]
    h = (a - mean) * scale + tl.load(beta_ptr + rc, mask=c_ok, other=0.0).to(COMPUTE)[None, :]
    if SAVE_H:
        tl.store(h_ptr + at, _cast(h, ELEM, RNE), mask=mask)
    y = _apply_act(_round(h, ELEM, COMPUTE, RNE), ACT, slope)
    tl.store(y_ptr + at, _cast(y, ELEM, RNE), mask=mask)


@triton.jit
def _dh(dy_ptr, kept_ptr, at, mask, slope, ACT: tl.constexpr, COMPUTE: tl.constexpr):
    """dy act'(kept) at the offsets ``at`` (dy and kept share the [M, C] row layout)."""
    dh = tl.load(dy_ptr + at, mask=mask, other=0.0).to(COMPUTE)
    if ACT != 0:
        dh = dh * _act_grad(tl.load(kept_ptr + at, mask=mask, other=0.0).to(COMPUTE), ACT, slope)
    return dh


@triton.jit(do_not_specialize=["R", "C"])
def grad_sums_kernel(
    dy_ptr,  # [G R, C] incoming gradient rows (contiguous)
    kept_ptr,  # [G R, C] what act' is formed from (read when ACT != 0)
    a_ptr,  # [G R, C] pre-norm a (read when XHAT)
    mean_ptr,  # [G, C] statistics (read when XHAT)
    rstd_ptr,
    part_ptr,  # [G, chunks, 2, C] output: each chunk's sum of dh and of dh xhat
    R, C,
    slope,
    ACT: tl.constexpr,
    XHAT: tl.constexpr,  # also sum dh xhat
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    g, chunk, rc, c_ok, mask, at, base = _chunk_block(R, C, part_ptr, BLOCK_R, BLOCK_C)
    dh = _dh(dy_ptr, kept_ptr, at, mask, slope, ACT, COMPUTE)
    tl.store(base, tl.sum(dh, axis=0), mask=c_ok)
    if XHAT:
        mean = tl.load(mean_ptr + g * C + rc, mask=c_ok, other=0.0)
        rstd = tl.load(rstd_ptr + g * C + rc, mask=c_ok, other=0.0)
        xhat = (tl.load(a_ptr + at, mask=mask, other=0.0).to(COMPUTE) - mean[None, :]) * rstd[None, :]
        tl.store(base + C, tl.sum(dh * xhat, axis=0), mask=c_ok)
    else:  # the merge reads both rows
        tl.store(base + C, tl.sum(dh * 0.0, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["G", "C", "chunks"])
def sums_merge_kernel(
    part_ptr,  # [G, chunks, 2, C] from grad_sums_kernel
    sums_ptr,  # [G, 2, C] output: per group
    total_ptr,  # [2, C] output: over the groups, in group order
    G, C, chunks,
    COMPUTE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    total0 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    total1 = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for g in range(0, G):
        s0 = tl.zeros([BLOCK_C], dtype=COMPUTE)
        s1 = tl.zeros([BLOCK_C], dtype=COMPUTE)
        for i in range(0, chunks):
            base = part_ptr + (g * chunks + i).to(tl.int64) * 2 * C + rc
            s0 += tl.load(base, mask=c_ok, other=0.0)
            s1 += tl.load(base + C, mask=c_ok, other=0.0)
        tl.store(sums_ptr + g * 2 * C + rc, s0, mask=c_ok)
        tl.store(sums_ptr + g * 2 * C + C + rc, s1, mask=c_ok)
        total0 += s0
        total1 += s1
    tl.store(total_ptr + rc, total0, mask=c_ok)
    tl.store(total_ptr + C + rc, total1, mask=c_ok)


@triton.jit(do_not_specialize=["M", "R", "C"])
def norm_backward_kernel(
    dy_ptr,  # [M, C] incoming gradient rows (contiguous)
    kept_ptr,  # [M, C] what act' is formed from (read when ACT != 0)
    a_ptr,  # [M, C] pre-norm a (read in training mode)
    mean_ptr,  # [G, C] statistics ([1, C] in eval mode)
    rstd_ptr,
    gamma_ptr,  # [C]
    sums_ptr,  # [G, 2, C] sums of dh and dh xhat (read in training mode)
    da_ptr,  # [M, C] output: the gradient at a
    M, R, C,
    count,  # R as a float, the n of the formula (computed from R here, the fp32 tile spilled under triton 3.6)
    slope,
    ACT: tl.constexpr,
    MODE: tl.constexpr,  # 0: no norm (da = dh), 1: eval-mode norm, 2: training-mode norm
    COMPUTE: tl.constexpr,
    RNE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rr, rc, c_ok, mask, at = _row_block(M, C, BLOCK_R, BLOCK_C)
    da = _dh(dy_ptr, kept_ptr, at, mask, slope, ACT, COMPUTE)
    if MODE != 0:
        g = rr // R if MODE == 2 else rr * 0
        stat = g[:, None] * C + rc[None, :]
        rstd = tl.load(rstd_ptr + stat, mask=mask, other=0.0)
        scale = rstd * tl.load(gamma_ptr + rc, mask=c_ok, other=0.0).to(COMPUTE)[None, :]
        if MODE == 2:
            xhat = (tl.load(a_ptr + at, mask=mask, other=0.0).to(COMPUTE) -
                    tl.load(mean_ptr + stat, mask=mask, other=0.0)) * rstd
            sum_dh = tl.load(sums_ptr + g[:, None] * 2 * C + rc[None, :], mask=mask, other=0.0)
            sum_dh_xhat = tl.load(sums_ptr + g[:, None] * 2 * C + C + rc[None, :], mask=mask, other=0.0)
            da = scale * (da - sum_dh / count - xhat * (sum_dh_xhat / count))
        else:
            da = scale * da
    tl.store(da_ptr + at, _cast(da, da_ptr.dtype.element_ty, RNE), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
# (BLOCK rows, BLOCK cols, BLOCK reduction, num_warps, num_stages) per product kernel and operand class; every
# entry compiles for sm_80 and sm_90 without spills (bench/compile_report.py). The gathers load element by
# element (their addresses depend on the position and the tap), so the tiles are moderate and pipelined lightly.
_GPU_CONFIGS = {
    "conv": {"half": (128, 64, 32, 8, 2), "fp32": (64, 64, 16, 4, 2), "fp64": (32, 32, 16, 4, 1)},
    "weight": {"half": (64, 64, 32, 4, 2), "fp32": (64, 64, 16, 4, 2), "fp64": (32, 32, 16, 4, 1)},
}
# (BLOCK_R, BLOCK_C, num_warps) of the row kernels (moments, sums, norm passes); fp64 in a quarter of the rows
# (the norm backward spilled at 128 and 64 rows in fp64); grad_sums on 8 warps (its half-precision gelu spilled
# on 4 under triton 3.6, where the norm backward spills on 8)
_GPU_ROWS = {"fp64": (32, 32, 4), "other": (128, 32, 4)}
_GRAD_SUMS_WARPS = 8
_SPLIT_TARGET = 264  # programs the weight gradient aims for before it splits its reduction (2 per H100/H200 SM)


def _operand_class(dtype: torch.dtype) -> str:
    return "half" if dtype.itemsize == 2 else ("fp64" if dtype == torch.float64 else "fp32")


def _clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(next_pow2(v), hi))


_INTERPRETER_TILE = 1 << 20  # the interpreter's largest tensor (elements)
# "auto": under the interpreter, its own large tiles; "gpu": the GPU table's everywhere (tests set it so that the
# interpreter runs the tilings, loops and splits a GPU runs).
TILES = "auto"


def _interpreter_tiles() -> bool:
    return interpreting() and TILES != "gpu"


def _product_tile(kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype):
    """(rows, cols, reduction, num_warps, num_stages) of a product kernel's tile. Under the interpreter, the
    largest tiles it allows: its cost grows with the number of programs and loop steps, not with their size."""
    if _interpreter_tiles():
        if kernel == "conv":  # x [rows, red], w [red, cols]: the reduction is the channels, the rows long
            bn = _clamp(cols, 16, 1024)
            bk = _clamp(red, 16, _INTERPRETER_TILE // bn)
            return _clamp(rows, 16, _INTERPRETER_TILE // max(bk, bn)), bn, bk, 1, 1
        bu, bv = _clamp(rows, 16, 1024), _clamp(cols, 16, 1024)  # the weight's: the reduction is the long one
        return bu, bv, _clamp(red, 16, _INTERPRETER_TILE // max(bu, bv)), 1, 1
    return _GPU_CONFIGS[kernel][_operand_class(dtype)]


def _row_tile(rows: int, cols: int, dtype: torch.dtype):
    if _interpreter_tiles():
        bc = _clamp(cols, 1, 1024)
        return _clamp(rows, 1, _INTERPRETER_TILE // bc), bc, 1
    return _GPU_ROWS["fp64" if dtype == torch.float64 else "other"]


def _types(dtype: torch.dtype):
    """(COMPUTE, DOT) for tensors of ``dtype``; the interpreter's bf16 is raw uint16, so it multiplies upcast."""
    comp = compute_dtype(dtype)
    elem = tl_dtype(dtype)
    return comp, (comp if interpreting() else elem)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_channels_last(n: int, c: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((n, c, h, w), device=like.device, dtype=like.dtype, memory_format=torch.channels_last)


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """A channels-last [N, C, H, W] tensor as its [N H W, C] rows (a view; a copy only for other layouts)."""
    t = t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool,
         weight_jc: tuple, out_hw: tuple, stride: tuple, padding: tuple, activation: str = "identity",
         negative_slope: float = 0.0, norm: Optional[tuple] = None, write_y: bool = True, save_pre: bool = False,
         save_h: bool = False):
    """(y, a, h), each channels-last [N, J, OH, OW] or None: the gather (or, ``transposed``, the transposed)
    product of x [N, C, H, W] with the weight, whose output-channel and input-channel dimensions are
    ``weight_jc`` = (j_dim, c_dim); bias [J]; ``norm`` = (mean, rstd, gamma, beta) [J] applies a batch norm
    from given statistics."""
    check_tensors(x, weight, bias)
    n_, c_, h_, w_ = x.shape
    j_dim, c_dim = weight_jc
    J = weight.shape[j_dim]
    oh, ow = out_hw
    kh, kw = weight.shape[2], weight.shape[3]
    sh, sw = stride
    outs = [empty_channels_last(n_, J, oh, ow, x) if want else None for want in (write_y, save_pre, save_h)]
    any_out = next(o for o in outs if o is not None)
    comp, dot = _types(x.dtype)
    phases = sh * sw if transposed else 1
    rows = n_ * triton.cdiv(oh, sh) * triton.cdiv(ow, sw) if transposed else n_ * oh * ow
    bm, bn, bk, warps, stages = _product_tile("conv", rows, J, c_, x.dtype)
    stats = norm if norm is not None else (any_out,) * 4
    conv_kernel[(triton.cdiv(rows, bm), triton.cdiv(J, bn), phases)](
        x, weight, bias if bias is not None else any_out, *stats, *(o if o is not None else any_out for o in outs),
        n_, c_, h_, w_, J, oh, ow, *x.stride(), weight.stride(j_dim), weight.stride(c_dim), weight.stride(2),
        weight.stride(3), float(negative_slope),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=padding[0], PW=padding[1], TRANSPOSED=transposed, HAS_BIAS=bias is not None,
        NORM=norm is not None, ACT=ACT_CODES[activation], WRITE_Y=write_y, SAVE_PRE=save_pre, SAVE_H=save_h,
        COMPUTE=comp, DOT=dot, PRECISION="ieee", RNE=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=warps, num_stages=stages)
    return tuple(outs)


def weight_grad(s: torch.Tensor, t: torch.Tensor, kernel: tuple, stride: tuple, padding: tuple,
                dtype: torch.dtype, splits: Optional[int] = None) -> torch.Tensor:
    """G [U, V, kh, kw] = sum_{n, q} S[n, u, q] T[n, v, q stride - padding + k], in ``dtype``; the reduction
    split into ``splits`` parts (default: by the GPU's size; one under the interpreter)."""
    check_tensors(s, t)
    n_, u_, qh, qw = s.shape
    v_, th, tw = t.shape[1], t.shape[2], t.shape[3]
    kh, kw = kernel
    positions = n_ * qh * qw
    bu, bv, bq, warps, stages = _product_tile("weight", u_, v_, positions, dtype)
    tiles = triton.cdiv(u_, bu) * triton.cdiv(v_, bv) * kh * kw
    if splits is None:
        splits = 1 if _interpreter_tiles() else max(1, min(_SPLIT_TARGET // tiles, triton.cdiv(positions, 8 * bq)))
    per_split = triton.cdiv(triton.cdiv(positions, splits), bq) * bq
    splits = triton.cdiv(positions, per_split)
    out_dtype = dtype if splits == 1 else _stat_dtype(dtype)
    g = torch.empty((splits, u_, v_, kh, kw), device=s.device, dtype=out_dtype)
    comp, dot = _types(dtype)
    weight_grad_kernel[(triton.cdiv(u_, bu), kh * kw * triton.cdiv(v_, bv), splits)](
        s, t, g, n_, u_, v_, qh, qw, th, tw, *s.stride(), *t.stride(), per_split,
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], COMPUTE=comp, DOT=dot,
        PRECISION="ieee", RNE=interpreting(), BLOCK_U=bu, BLOCK_V=bv, BLOCK_Q=bq, num_warps=warps,
        num_stages=stages)
    return g[0] if splits == 1 else g.sum(0).to(dtype)


def _first_stage(t: torch.Tensor, groups: int, chunk: Optional[int]):
    """(R, C, BLOCK_R, BLOCK_C, num_warps, chunks, COMPUTE, partials) of a two-stage reduction over the rows
    t [groups R, C]; ``chunk`` overrides the rows per chunk."""
    m, c = t.shape
    r = m // groups
    br, bc, warps = _row_tile(r, c, t.dtype)
    br = chunk or br
    chunks = triton.cdiv(r, br)
    part = torch.empty((groups, chunks, 2, c), device=t.device, dtype=_stat_dtype(t.dtype))
    return r, c, br, bc, warps, chunks, compute_dtype(t.dtype), part


def channel_moments(a: torch.Tensor, groups: int, eps: float, chunk: Optional[int] = None):
    """(mean, var, rstd), each [groups, C] in fp32 (fp64 for fp64), of the rows a [groups R, C] per group;
    ``chunk`` (a power of two) overrides the rows per chunk of the first stage."""
    check_tensors(a)
    r, c, br, bc, warps, chunks, comp, part = _first_stage(a, groups, chunk)
    sdt = part.dtype
    channel_moments_kernel[(groups, chunks, triton.cdiv(c, bc))](
        a, part, r, c, COMPUTE=comp, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    mean, var, rstd = (torch.empty((groups, c), device=a.device, dtype=sdt) for _ in range(3))
    moments_merge_kernel[(groups, triton.cdiv(c, bc))](
        part, mean, var, rstd, r, c, chunks, float(eps), CHUNK=br, COMPUTE=comp, BLOCK_C=bc, num_warps=warps)
    return mean, var, rstd


def norm_act(a: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
             activation: str, negative_slope: float, save_h: bool):
    """(y, h or None), [G R, C] rows: h = (a - mean) rstd gamma + beta per group, y = act(h)."""
    check_tensors(a, mean, rstd, gamma, beta)
    m, c = a.shape
    r = m // mean.shape[0]
    y = torch.empty_like(a)
    h = torch.empty_like(a) if save_h else None
    br, bc, warps = _row_tile(m, c, a.dtype)
    norm_act_kernel[(triton.cdiv(m, br), triton.cdiv(c, bc))](
        a, mean, rstd, gamma, beta, y, h if h is not None else y, m, r, c, float(negative_slope),
        ACT=ACT_CODES[activation], SAVE_H=save_h, COMPUTE=compute_dtype(a.dtype), RNE=interpreting(),
        BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return y, h


def grad_sums(dy: torch.Tensor, kept: Optional[torch.Tensor], a: Optional[torch.Tensor],
              mean: Optional[torch.Tensor], rstd: Optional[torch.Tensor], groups: int, activation: str,
              negative_slope: float, chunk: Optional[int] = None):
    """(sums [G, 2, C], totals [2, C]) of dh = dy act'(kept) and, with ``a``, of dh xhat, per group of rows;
    ``chunk`` as in channel_moments."""
    check_tensors(dy, kept, a, mean, rstd)
    r, c, br, bc, warps, chunks, comp, part = _first_stage(dy, groups, chunk)
    warps = warps if _interpreter_tiles() else _GRAD_SUMS_WARPS
    sdt = part.dtype
    grad_sums_kernel[(groups, chunks, triton.cdiv(c, bc))](
        dy, kept if kept is not None else dy, a if a is not None else dy, mean if mean is not None else part,
        rstd if rstd is not None else part, part, r, c, float(negative_slope), ACT=ACT_CODES[activation],
        XHAT=a is not None, COMPUTE=comp, BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    sums = torch.empty((groups, 2, c), device=dy.device, dtype=sdt)
    totals = torch.empty((2, c), device=dy.device, dtype=sdt)
    sums_merge_kernel[(triton.cdiv(c, bc),)](part, sums, totals, groups, c, chunks, COMPUTE=comp, BLOCK_C=bc,
                                             num_warps=warps)
    return sums, totals


def norm_backward(dy: torch.Tensor, kept: Optional[torch.Tensor], a: Optional[torch.Tensor],
                  mean: Optional[torch.Tensor], rstd: Optional[torch.Tensor], gamma: Optional[torch.Tensor],
                  sums: Optional[torch.Tensor], mode: int, activation: str, negative_slope: float) -> torch.Tensor:
    """da [M, C] from dy [M, C]: dh = dy act'(kept), then the norm's backward (``mode`` 0 none, 1 eval, 2
    training with the per-group ``sums`` of grad_sums over groups of M / G rows)."""
    check_tensors(dy, kept, a, mean, rstd, gamma, sums)
    m, c = dy.shape
    groups = sums.shape[0] if mode == 2 else 1
    r = m // groups
    da = torch.empty_like(dy)
    br, bc, warps = _row_tile(m, c, dy.dtype)
    filler = da
    norm_backward_kernel[(triton.cdiv(m, br), triton.cdiv(c, bc))](
        dy, kept if kept is not None else filler, a if a is not None else filler,
        mean if mean is not None else filler, rstd if rstd is not None else filler,
        gamma if gamma is not None else filler, sums if sums is not None else filler, da, m, r, c, float(r),
        float(negative_slope), ACT=ACT_CODES[activation], MODE=mode, COMPUTE=compute_dtype(dy.dtype),
        RNE=interpreting(), BLOCK_R=br, BLOCK_C=bc, num_warps=warps)
    return da


# ---------------------------------------------------------------------------------------------------------
# Every configuration the GPU launchers can choose (bench/compile_report.py)
# ---------------------------------------------------------------------------------------------------------
# The layer shapes the presets use: (kernel, stride, padding) of conv (Fashion-MNIST) and larsen64, and a
# 3x3 stride-1 DCGAN-style layer.
_GEOMETRIES = ((4, 2, 1), (5, 2, 2), (5, 1, 2), (3, 1, 1), (1, 1, 0))


def configs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t, elem = tl_name(dtype), tl_dtype(dtype)
        comp = tl.float64 if dtype == torch.float64 else tl.float32
        cls = _operand_class(dtype)
        for k, s, p in _GEOMETRIES:
            geometry = {"KH": k, "KW": k, "SH": s, "SW": s, "PH": p, "PW": p}
            tag = f"{t} k{k}s{s}p{p}"
            b0, b1, b2, warps, stages = _GPU_CONFIGS["conv"][cls]
            for transposed, role in ((False, "fwd eval-norm leaky_relu"), (True, "transposed fwd relu"),
                                     (True, "transposed dx"), (False, "dx of transposed")):
                fwd = "fwd" in role
                const = {**geometry, "TRANSPOSED": transposed, "HAS_BIAS": fwd, "NORM": "norm" in role,
                         "ACT": ACT_CODES["leaky_relu" if "leaky" in role else ("relu" if fwd else "identity")],
                         "WRITE_Y": True, "SAVE_PRE": "norm" in role, "SAVE_H": False, "COMPUTE": comp, "DOT": elem,
                         "PRECISION": "ieee", "RNE": False, "BLOCK_M": b0, "BLOCK_N": b1, "BLOCK_K": b2}
                sig = {**{f: f"*{t}" for f in ("x_ptr", "w_ptr", "b_ptr", "mean_ptr", "rstd_ptr", "gamma_ptr",
                                               "beta_ptr", "y_ptr", "pre_ptr", "h_ptr")},
                       **{i: "i32" for i in ("N", "C", "H", "W", "J", "OH", "OW", "sx_n", "sx_c", "sx_h", "sx_w",
                                             "sw_j", "sw_c", "sw_h", "sw_w")},
                       "slope": "fp32", **{c: "constexpr" for c in const}}
                if "norm" in role:  # statistics in the accumulation dtype
                    sig.update({f: f"*{tl_name(_stat_dtype(dtype))}" for f in ("mean_ptr", "rstd_ptr")})
                default = dtype == torch.bfloat16 and (k, s, p) == (4, 2, 1) and role in (
                    "fwd eval-norm leaky_relu", "transposed dx")  # CI compiles both forms of the kernel
                specs.append(CompileSpec(f"conv {role} {tag} {b0}x{b1}x{b2}", conv_kernel, sig, const, warps,
                                         stages, default=default, divisible=_pointers(sig)))
            b0, b1, b2, warps, stages = _GPU_CONFIGS["weight"][cls]
            for out in (t, tl_name(_stat_dtype(dtype))):  # written directly, or as fp32 split partials
                const = {**geometry, "COMPUTE": comp, "DOT": elem, "PRECISION": "ieee", "RNE": False,
                         "BLOCK_U": b0, "BLOCK_V": b1, "BLOCK_Q": b2}
                sig = {"s_ptr": f"*{t}", "t_ptr": f"*{t}", "g_ptr": f"*{out}",
                       **{i: "i32" for i in ("N", "U", "V", "QH", "QW", "TH", "TW", "ss_n", "ss_c", "ss_h", "ss_w",
                                             "st_n", "st_c", "st_h", "st_w", "q_per_split")},
                       **{c: "constexpr" for c in const}}
                specs.append(CompileSpec(f"conv weight_grad {tag} -> {out} {b0}x{b1}x{b2}", weight_grad_kernel, sig,
                                         const, warps, stages, default=dtype == torch.bfloat16 and (k, s, p) ==
                                         (4, 2, 1) and out == t, divisible=_pointers(sig)))
        specs.extend(_row_specs(dtype, t, comp))
    return specs


def _row_specs(dtype, t: str, comp) -> list[CompileSpec]:
    br, bc, warps = _GPU_ROWS["fp64" if dtype == torch.float64 else "other"]
    st = tl_name(_stat_dtype(dtype))
    default = dtype == torch.bfloat16  # CI compiles the bf16 leaky_relu ones
    out = []
    sig = {"a_ptr": f"*{t}", "part_ptr": f"*{st}", "R": "i32", "C": "i32", "COMPUTE": "constexpr",
           "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    out.append(CompileSpec(f"conv channel_moments {t}", channel_moments_kernel, sig,
                           {"COMPUTE": comp, "BLOCK_R": br, "BLOCK_C": bc}, warps, 1, default, _pointers(sig)))
    sig = {"part_ptr": f"*{st}", "mean_ptr": f"*{st}", "var_ptr": f"*{st}", "rstd_ptr": f"*{st}", "R": "i32",
           "C": "i32", "chunks": "i32", "eps": "fp32", "CHUNK": "constexpr", "COMPUTE": "constexpr",
           "BLOCK_C": "constexpr"}
    out.append(CompileSpec(f"conv moments_merge {t}", moments_merge_kernel, sig,
                           {"CHUNK": br, "COMPUTE": comp, "BLOCK_C": bc}, warps, 1, default, _pointers(sig)))
    for act in ("leaky_relu", "gelu"):
        const = {"ACT": ACT_CODES[act], "SAVE_H": act == "gelu", "COMPUTE": comp, "RNE": False, "BLOCK_R": br,
                 "BLOCK_C": bc}
        sig = {"a_ptr": f"*{t}", "mean_ptr": f"*{st}", "rstd_ptr": f"*{st}", "gamma_ptr": f"*{t}",
               "beta_ptr": f"*{t}", "y_ptr": f"*{t}", "h_ptr": f"*{t}", "M": "i32", "R": "i32", "C": "i32",
               "slope": "fp32", **{c: "constexpr" for c in const}}
        out.append(CompileSpec(f"conv norm_act {t} {act}", norm_act_kernel, sig, const, warps, 1,
                               default and act == "leaky_relu", _pointers(sig)))
        const = {"ACT": ACT_CODES[act], "XHAT": True, "COMPUTE": comp, "BLOCK_R": br, "BLOCK_C": bc}
        sig = {"dy_ptr": f"*{t}", "kept_ptr": f"*{t}", "a_ptr": f"*{t}", "mean_ptr": f"*{st}", "rstd_ptr": f"*{st}",
               "part_ptr": f"*{st}", "R": "i32", "C": "i32", "slope": "fp32", **{c: "constexpr" for c in const}}
        out.append(CompileSpec(f"conv grad_sums {t} {act}", grad_sums_kernel, sig, const, _GRAD_SUMS_WARPS, 1,
                               default and act == "leaky_relu", _pointers(sig)))
        for mode in (0, 2):
            const = {"ACT": ACT_CODES[act], "MODE": mode, "COMPUTE": comp, "RNE": False, "BLOCK_R": br,
                     "BLOCK_C": bc}
            sig = {"dy_ptr": f"*{t}", "kept_ptr": f"*{t}", "a_ptr": f"*{t}", "mean_ptr": f"*{st}",
                   "rstd_ptr": f"*{st}", "gamma_ptr": f"*{t}", "sums_ptr": f"*{st}", "da_ptr": f"*{t}", "M": "i32",
                   "R": "i32", "C": "i32", "count": "fp32", "slope": "fp32", **{c: "constexpr" for c in const}}
            out.append(CompileSpec(f"conv norm_backward {t} {act} mode {mode}", norm_backward_kernel, sig, const,
                                   warps, 1, default and act == "leaky_relu" and mode == 2, _pointers(sig)))
    sig = {"part_ptr": f"*{st}", "sums_ptr": f"*{st}", "total_ptr": f"*{st}", "G": "i32", "C": "i32",
           "chunks": "i32", "COMPUTE": "constexpr", "BLOCK_C": "constexpr"}
    out.append(CompileSpec(f"conv sums_merge {t}", sums_merge_kernel, sig, {"COMPUTE": comp, "BLOCK_C": bc}, warps,
                           1, default, _pointers(sig)))
    return out


def _pointers(sig: dict) -> tuple:
    return tuple(k for k, v in sig.items() if v.startswith("*"))
