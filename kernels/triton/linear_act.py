"""Dense layer with the activation fused into the GEMMs, forward and backward.

Math (x [M, K], W [N, K] in nn.Linear's layout, b [N]; a is the pre-activation):

    a = x @ W^T + b        y = act(a)                              (forward, one GEMM, fp32 accumulator)
    da = dy * act'(.)      dx = da @ W      dW = da^T @ x      db = sum_m da        (backward, two GEMMs)

act'(.) is computed from what forward saved: the output y for relu and leaky_relu (sign of y = sign of a
when the slope is positive), tanh (1 - y^2) and sigmoid (y (1 - y)); the pre-activation a for gelu and for
leaky_relu with a slope <= 0; nothing for identity. Both gradient GEMMs form da tile by tile as they load
dy (never written to memory), and the dW kernel's programs of the first K-tile also reduce db over all rows
in a fixed order: deterministic, no atomics.

Activations (ACT codes): 0 identity, 1 relu, 2 leaky_relu, 3 tanh (2 sigmoid(2a) - 1: no libdevice; for
|a| < 1/16, where that difference cancels, its odd series), 4 sigmoid, 5 gelu (tanh approximation).

Precision: fp32 inputs multiply in IEEE fp32 (input_precision="ieee": the results match eager fp32 with TF32
off); allow_tf32=True selects "tf32". fp16/bf16 inputs feed the tensor cores with an fp32 accumulator; da is
rounded to the input dtype before its GEMMs, as eager's separate activation-backward kernel does. fp64 uses
an fp64 accumulator (for gradcheck). Every rounding to bf16 (stores, da) is to nearest even, as on the GPU:
under the interpreter (RNE), whose fp32 -> bf16 cast truncates, by exact bit arithmetic (truncated outputs
near +-1 made tanh's and sigmoid's derivatives from y several times eager's error).

Bytes moved (s bytes per element): forward reads x and W once per output tile column/row block (M K s and
N K s per tile pass) and writes y (M N s), plus a (M N s) for gelu; backward reads dy and the saved tensor
twice (once per gradient GEMM: 4 M N s) instead of writing and re-reading da (eager: 3 M N s plus a
launch). Eager PyTorch launches a GEMM (bias in its epilogue) plus 1-6 elementwise kernels forward (gelu
tanh approximation: about 6), and the activation backward, two GEMMs and a bias reduction backward; this is
one launch forward and two backward. Where the fused version can be slower: the fp32 IEEE path uses FMA,
not TF32 tensor cores (as eager with TF32 off), and the dW kernel has only N/BN x K/BK programs, which
underfills a large GPU when N and K are small and M is large (no split-K yet).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import CompileSpec, check_tensors, compute_dtype, interpreting, next_pow2, tl_dtype, tl_name
from .gan_losses import _bf16_rne, _cast

ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4, "gelu": 5}
_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_KAPPA = 0.044715


@triton.jit
def _aligned(v, ALIGN: tl.constexpr):
    """v, rebuilt as a visible multiple of ALIGN (exact: the launcher passes ALIGN=16 only for multiples of 16).

    The kernels opt out of the JIT's own value specialisation (do_not_specialize), so each configuration
    compiles to exactly two variants, ALIGN=16 and ALIGN=1, both of which bench/compile_report.py checks for
    spills; with ALIGN=16 the compiler still learns what it needs for 16-byte vector loads, cp.async /
    TMA-style pipelining and unmasked-in-effect K steps.
    """
    if ALIGN > 1:
        v = v // ALIGN * ALIGN
    return v


@triton.jit
def _tanh(a):
    """tanh(a) as 2 sigmoid(2a) - 1 (no libdevice), except for |a| < 1/16: there that difference cancels (an
    ulp of 1 would be a large part of tanh(a) ~ a), so the odd series to a^9 (truncation below 1e-14)."""
    a2 = a * a
    series = a + a * a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * (
        -0.05396825396825397 + a2 * 0.021869488536155203)))
    return tl.where(tl.abs(a) < 0.0625, series, 2.0 * tl.sigmoid(2.0 * a) - 1.0)


@triton.jit
def _operand(da, ELEM: tl.constexpr, DOT: tl.constexpr, RNE: tl.constexpr):
    """da rounded to the tensors' dtype ELEM (as eager's activation backward stores it), as a DOT operand."""
    if RNE and ELEM == tl.bfloat16:
        return _bf16_rne(da).to(DOT)  # DOT is fp32 under the interpreter, so the rounded value is kept exactly
    else:
        return da.to(ELEM).to(DOT)


@triton.jit
def _apply_act(a, ACT: tl.constexpr, slope):
    """act(a) for the ACT codes above; a is in the compute dtype."""
    if ACT == 1:
        a = tl.maximum(a, 0.0)
    elif ACT == 2:
        a = tl.where(a >= 0.0, a, a * slope)
    elif ACT == 3:
        a = _tanh(a)
    elif ACT == 4:
        a = tl.sigmoid(a)
    elif ACT == 5:
        inner = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = 0.5 * a * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return a


@triton.jit
def _act_grad(s, ACT: tl.constexpr, slope):
    """act'(.) from the saved tensor s (y, or the pre-activation for gelu / leaky_relu with slope <= 0)."""
    if ACT == 1:
        g = tl.where(s > 0.0, 1.0, 0.0)
    elif ACT == 2:
        zero = s * 0.0  # keeps fp64 inputs in fp64
        g = tl.where(s > 0.0, zero + 1.0, zero + slope)
    elif ACT == 3:
        g = 1.0 - s * s
    elif ACT == 4:
        g = s * (1.0 - s)
    else:  # ACT == 5, gelu from the pre-activation
        inner = 0.7978845608028654 * (s + 0.044715 * s * s * s)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * s * s)
    return g


@triton.jit(do_not_specialize=["M", "N", "K", "s_xm", "s_wn", "s_b"])
def linear_act_fwd_kernel(
    x_ptr,  # [M, K] input, any row stride, unit column stride
    w_ptr,  # [N, K] weight (nn.Linear layout), any row stride, unit column stride
    b_ptr,  # [N] bias, any stride (not read when HAS_BIAS is False)
    y_ptr,  # [M, N] output act(a), contiguous
    a_ptr,  # [M, N] output pre-activation a, contiguous (written only when SAVE_PREACT)
    M,  # rows of x
    N,  # output features
    K,  # input features
    s_xm,  # row stride of x
    s_wn,  # row stride of W
    s_b,  # stride of bias
    slope,  # leaky_relu negative slope
    HAS_BIAS: tl.constexpr,  # add the bias in the epilogue
    ACT: tl.constexpr,  # activation code (see the module docstring)
    SAVE_PREACT: tl.constexpr,  # also store a (for gelu / leaky_relu with slope <= 0)
    COMPUTE: tl.constexpr,  # accumulator and epilogue dtype: tl.float32, or tl.float64 for fp64
    DOT: tl.constexpr,  # dtype the GEMM operands are cast to (input dtype on GPU, COMPUTE in the interpreter)
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands: "ieee" or "tf32"
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter, see _cast)
    BLOCK_M: tl.constexpr,  # rows of the output tile
    BLOCK_N: tl.constexpr,  # columns of the output tile
    BLOCK_K: tl.constexpr,  # reduction step
    GROUP_M: tl.constexpr,  # row-tiles per group in the program order (L2 reuse of W tiles)
    ALIGN: tl.constexpr,  # 16 when N, K, the row strides and the pointers are multiples of 16, else 1
):
    N, K, s_xm, s_wn = _aligned(N, ALIGN), _aligned(K, ALIGN), _aligned(s_xm, ALIGN), _aligned(s_wn, ALIGN)
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    # Tile pointers built once (64-bit row offsets), then advanced by BLOCK_K columns per step. The unit
    # column stride is structural (the launcher guarantees it): the compiler sees contiguous K runs and
    # vectorises / pipelines the loads instead of gathering element by element.
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * s_xm + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * s_wn + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=COMPUTE)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(xt.to(DOT), wt.to(DOT), acc, input_precision=PRECISION, out_dtype=COMPUTE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn * s_b, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
    out = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SAVE_PREACT:
        tl.store(a_ptr + out, _cast(acc, a_ptr.dtype.element_ty, RNE), mask=mask)
    y = _apply_act(acc, ACT, slope)
    tl.store(y_ptr + out, _cast(y, y_ptr.dtype.element_ty, RNE), mask=mask)


@triton.jit(do_not_specialize=["M", "N", "K", "s_dym", "s_wn"])
def linear_act_bwd_dx_kernel(
    dy_ptr,  # [M, N] incoming gradient of y, any row stride, unit column stride
    s_ptr,  # [M, N] saved tensor (y, or a when the derivative needs it), contiguous
    w_ptr,  # [N, K] weight, any row stride, unit column stride
    dx_ptr,  # [M, K] output gradient of x, contiguous
    M,  # rows
    N,  # output features (the reduction dimension here)
    K,  # input features
    s_dym,  # row stride of dy
    s_wn,  # row stride of W
    slope,  # leaky_relu negative slope
    ACT: tl.constexpr,  # activation code
    COMPUTE: tl.constexpr,  # accumulator dtype
    ELEM: tl.constexpr,  # the tensors' dtype: da is rounded to it before the GEMM, as eager does
    DOT: tl.constexpr,  # GEMM operand dtype
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    RNE: tl.constexpr,  # round da and the bf16 store to nearest by hand (True under the interpreter)
    BLOCK_M: tl.constexpr,  # rows of the dx tile
    BLOCK_N: tl.constexpr,  # reduction step over N
    BLOCK_K: tl.constexpr,  # columns of the dx tile
    GROUP_M: tl.constexpr,  # row-tiles per group in the program order
    ALIGN: tl.constexpr,  # 16 when N, K, the row strides and the pointers are multiples of 16, else 1
):
    N, K, s_dym, s_wn = _aligned(N, ALIGN), _aligned(K, ALIGN), _aligned(s_dym, ALIGN), _aligned(s_wn, ALIGN)
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_k = tl.cdiv(K, BLOCK_K)
    group = pid // (GROUP_M * grid_k)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_k)) % size_m
    pid_k = (pid % (GROUP_M * grid_k)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.arange(0, BLOCK_N)
    m_ok = rm < M
    k_ok = rk < K
    rm64 = rm.to(tl.int64)
    dy_ptrs = dy_ptr + rm64[:, None] * s_dym + rn[None, :]
    s_ptrs = s_ptr + rm64[:, None] * N + rn[None, :]
    w_ptrs = w_ptr + rn[:, None] * s_wn + rk[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=COMPUTE)
    for n0 in range(0, N, BLOCK_N):
        n_ok = rn < N - n0
        mn_mask = m_ok[:, None] & n_ok[None, :]
        da = tl.load(dy_ptrs, mask=mn_mask, other=0.0).to(COMPUTE)
        if ACT != 0:
            s = tl.load(s_ptrs, mask=mn_mask, other=0.0).to(COMPUTE)
            da = da * _act_grad(s, ACT, slope)
        wt = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(_operand(da, ELEM, DOT, RNE), wt.to(DOT), acc, input_precision=PRECISION, out_dtype=COMPUTE)
        dy_ptrs += BLOCK_N
        s_ptrs += BLOCK_N
        w_ptrs += BLOCK_N * s_wn
    tl.store(dx_ptr + rm64[:, None] * K + rk[None, :], _cast(acc, dx_ptr.dtype.element_ty, RNE),
             mask=m_ok[:, None] & k_ok[None, :])


@triton.jit(do_not_specialize=["M", "N", "K", "s_dym", "s_xm"])
def linear_act_bwd_dw_kernel(
    dy_ptr,  # [M, N] incoming gradient of y, any row stride, unit column stride
    s_ptr,  # [M, N] saved tensor (y or a), contiguous
    x_ptr,  # [M, K] input, any row stride, unit column stride
    dw_ptr,  # [N, K] output gradient of W, contiguous
    db_ptr,  # [N] output gradient of the bias (written by the programs of the first K-tile when HAS_BIAS)
    M,  # rows (the reduction dimension here)
    N,  # output features
    K,  # input features
    s_dym,  # row stride of dy
    s_xm,  # row stride of x
    slope,  # leaky_relu negative slope
    HAS_BIAS: tl.constexpr,  # also reduce db
    ACT: tl.constexpr,  # activation code
    COMPUTE: tl.constexpr,  # accumulator dtype
    ELEM: tl.constexpr,  # the tensors' dtype (da is rounded to it before the GEMM)
    DOT: tl.constexpr,  # GEMM operand dtype
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    RNE: tl.constexpr,  # round da and the bf16 stores to nearest by hand (True under the interpreter)
    BLOCK_N: tl.constexpr,  # rows of the dW tile
    BLOCK_M: tl.constexpr,  # reduction step over M
    BLOCK_K: tl.constexpr,  # columns of the dW tile
    GROUP_N: tl.constexpr,  # row-tiles per group in the program order
    ALIGN: tl.constexpr,  # 16 when N, K, the row strides and the pointers are multiples of 16, else 1
):
    N, K, s_dym, s_xm = _aligned(N, ALIGN), _aligned(K, ALIGN), _aligned(s_dym, ALIGN), _aligned(s_xm, ALIGN)
    pid = tl.program_id(0)
    grid_n = tl.cdiv(N, BLOCK_N)
    grid_k = tl.cdiv(K, BLOCK_K)
    group = pid // (GROUP_N * grid_k)
    first_n = group * GROUP_N
    size_n = tl.minimum(grid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % (GROUP_N * grid_k)) % size_n
    pid_k = (pid % (GROUP_N * grid_k)) // size_n

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    n_ok = rn < N
    k_ok = rk < K
    rn64 = rn.to(tl.int64)
    # da^T tiles [BLOCK_N, BLOCK_M], loaded transposed straight from dy's strides.
    dy_ptrs = dy_ptr + rm[None, :] * s_dym + rn[:, None]
    s_ptrs = s_ptr + rm[None, :] * N + rn[:, None]
    x_ptrs = x_ptr + rm[:, None] * s_xm + rk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=COMPUTE)
    db = tl.zeros([BLOCK_N], dtype=COMPUTE)
    for m0 in range(0, M, BLOCK_M):
        m_ok = rm < M - m0
        nm_mask = n_ok[:, None] & m_ok[None, :]
        da = tl.load(dy_ptrs, mask=nm_mask, other=0.0).to(COMPUTE)
        if ACT != 0:
            s = tl.load(s_ptrs, mask=nm_mask, other=0.0).to(COMPUTE)
            da = da * _act_grad(s, ACT, slope)
        if HAS_BIAS:
            db += tl.sum(da, axis=1)
        xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(_operand(da, ELEM, DOT, RNE), xt.to(DOT), acc, input_precision=PRECISION, out_dtype=COMPUTE)
        dy_ptrs += BLOCK_M * s_dym
        s_ptrs += BLOCK_M * N
        x_ptrs += BLOCK_M * s_xm
    tl.store(dw_ptr + rn64[:, None] * K + rk[None, :], _cast(acc, dw_ptr.dtype.element_ty, RNE),
             mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + rn, _cast(db, db_ptr.dtype.element_ty, RNE), mask=n_ok)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
# (BLOCK_rows, BLOCK_cols, BLOCK_reduction, num_warps, num_stages) per kernel, operand class and problem size.
# rows x cols is the output tile: y[M, N] (fwd), dx[M, K] (dx), dW[N, K] (dw); the reduction runs over K, N, M.
# Every entry compiles for sm_80 and sm_90 without spilling (bench/compile_report.py checks all of them, for
# 16-aligned shapes and for shapes with no alignment at all). Why they look the way they do:
#   half:  tensor-core tiles. The dW kernel holds a transposed da tile next to its accumulator, so its
#          reduction step is 32 (a 64-deep step spills on sm_80) and its small tile uses 2 stages.
#   unaligned (ALIGN=1: some size / row stride / pointer not a multiple of 16): every element is loaded on
#          its own with its own 64-bit address, so these tiles spread over more warps and do not pipeline.
#   tf32:  tensor cores on fp32 operands, so the same bytes per stage take half the K depth.
#   fp32:  IEEE fp32 is an FMA loop (no tensor cores): every thread keeps its rows of the A slice and its
#          columns of the B slice in registers for the whole K step, so the K step stays at 16 (the
#          smallest tl.dot accepts in triton 3.6; 3.9 also takes 8).
#   fp64:  gradcheck only.
_GPU_CONFIGS = {
    "fwd": {
        "half": {"large": (128, 128, 64, 8, 3), "small": (64, 64, 64, 4, 3), "unaligned": (64, 64, 32, 4, 1)},
        "tf32": {"large": (128, 128, 32, 8, 3), "small": (64, 64, 32, 4, 3), "unaligned": (64, 64, 32, 4, 1)},
        "fp32": {"large": (128, 128, 16, 8, 2), "small": (64, 64, 16, 4, 2), "unaligned": (64, 64, 16, 4, 1)},
        "fp64": {"large": (64, 64, 16, 4, 1), "small": (32, 32, 16, 4, 1), "unaligned": (32, 32, 16, 4, 1)},
    },
    "dx": {
        "half": {"large": (128, 128, 64, 8, 3), "small": (64, 64, 64, 4, 3), "unaligned": (64, 64, 32, 8, 1)},
        "tf32": {"large": (128, 128, 32, 8, 2), "small": (64, 64, 32, 4, 3), "unaligned": (64, 64, 32, 8, 1)},
        "fp32": {"large": (128, 128, 16, 8, 2), "small": (64, 64, 16, 8, 2), "unaligned": (64, 64, 16, 4, 1)},
        "fp64": {"large": (64, 64, 16, 4, 1), "small": (32, 32, 16, 4, 1), "unaligned": (32, 32, 16, 4, 1)},
    },
    "dw": {
        "half": {"large": (128, 128, 32, 8, 3), "small": (64, 64, 32, 4, 2), "unaligned": (64, 64, 16, 8, 1)},
        "tf32": {"large": (128, 128, 32, 8, 3), "small": (64, 64, 32, 4, 3), "unaligned": (64, 64, 16, 8, 1)},
        "fp32": {"large": (128, 128, 16, 8, 2), "small": (64, 64, 16, 4, 2), "unaligned": (64, 64, 16, 8, 1)},
        "fp64": {"large": (32, 32, 16, 4, 1), "small": (32, 32, 16, 4, 1), "unaligned": (16, 32, 16, 4, 1)},
    },
}
_GROUP = 8


def _operand_class(dtype: torch.dtype, precision: str) -> str:
    if dtype.itemsize == 2:
        return "half"
    if dtype == torch.float64:
        return "fp64"
    return "tf32" if precision == "tf32" else "fp32"


def _config(kernel: str, rows: int, cols: int, red: int, dtype: torch.dtype, precision: str,
            align: int) -> tuple[int, int, int, int, int]:
    """Tile of ``kernel`` ("fwd", "dx", "dw") for an output of rows x cols with a reduction of length red."""
    if interpreting():
        clamp = lambda v, lo, hi: max(lo, min(next_pow2(v), hi))  # noqa: E731
        return clamp(rows, 16, 256), clamp(cols, 16, 256), clamp(red, 16, 128), 1, 1
    table = _GPU_CONFIGS[kernel][_operand_class(dtype, precision)]
    if align == 1:  # element-wise loads: no vector loads, no asynchronous copies to pipeline
        return table["unaligned"]
    # Small problems: smaller tiles so that there are enough programs to fill the GPU.
    big = triton.cdiv(rows, 128) * triton.cdiv(cols, 128) >= 64
    return table["large" if big else "small"]


def _alignment(tensors, ints) -> int:
    """The kernels' ALIGN: 16 when every pointer (16 bytes) and every size / row stride is a multiple of 16."""
    ok = all(t.data_ptr() % 16 == 0 for t in tensors if t is not None) and all(int(v) % 16 == 0 for v in ints)
    return 16 if ok else 1


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    """``t`` when its last dimension is contiguous (the kernels' layout), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _operand_types(dtype: torch.dtype, allow_tf32: bool):
    """(COMPUTE, ELEM, DOT, PRECISION) for tensors of ``dtype``."""
    elem = tl_dtype(dtype)
    comp = compute_dtype(dtype)
    # The interpreter's bf16 is raw uint16: upcast the operands (exact) and multiply in COMPUTE.
    dot = comp if interpreting() else elem
    precision = "tf32" if (allow_tf32 and dtype == torch.float32) else "ieee"
    return comp, elem, dot, precision


def saves_preact(activation: str, negative_slope: float) -> bool:
    """Whether backward needs the pre-activation (else the output suffices)."""
    return activation == "gelu" or (activation == "leaky_relu" and negative_slope <= 0)


def linear_act_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                       negative_slope: float, allow_tf32: bool = False, save_preact: bool = False):
    """(y [M, N], a [M, N] or None): y = act(x @ W^T + b); a is written only when save_preact."""
    check_tensors(x, weight, bias)
    x, weight = _unit_inner(x), _unit_inner(weight)
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    a = torch.empty((M, N), device=x.device, dtype=x.dtype) if save_preact else None
    comp, _, dot, precision = _operand_types(x.dtype, allow_tf32)
    align = _alignment((x, weight, bias, y, a), (N, K, x.stride(0), weight.stride(0)))
    bm, bn, bk, warps, stages = _config("fwd", M, N, K, x.dtype, precision, align)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    b_arg = bias if bias is not None else y
    linear_act_fwd_kernel[grid](
        x, weight, b_arg, y, a if a is not None else y, M, N, K, x.stride(0), weight.stride(0),
        b_arg.stride(0) if bias is not None else 0, float(negative_slope),
        HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], SAVE_PREACT=save_preact, COMPUTE=comp, DOT=dot,
        PRECISION=precision, RNE=interpreting(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP, ALIGN=align,
        num_warps=warps, num_stages=stages)
    return y, a


def linear_act_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, saved: torch.Tensor,
                        has_bias: bool, activation: str, negative_slope: float, allow_tf32: bool = False,
                        need_dx: bool = True, need_dw: bool = True):
    """(dx or None, dW or None, db or None); ``saved`` is y, or a when saves_preact(...)."""
    check_tensors(dy, x, weight, saved)
    dy, x, weight, saved = _unit_inner(dy), _unit_inner(x), _unit_inner(weight), saved.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    comp, elem, dot, precision = _operand_types(x.dtype, allow_tf32)
    act = ACT_CODES[activation]
    slope = float(negative_slope)
    dx = dw = db = None
    if need_dx:
        dx = torch.empty((M, K), device=x.device, dtype=x.dtype)
        align = _alignment((dy, saved, weight, dx), (N, K, dy.stride(0), weight.stride(0)))
        bm, bk, bn, warps, stages = _config("dx", M, K, N, x.dtype, precision, align)
        linear_act_bwd_dx_kernel[(triton.cdiv(M, bm) * triton.cdiv(K, bk),)](
            dy, saved, weight, dx, M, N, K, dy.stride(0), weight.stride(0), slope,
            ACT=act, COMPUTE=comp, ELEM=elem, DOT=dot, PRECISION=precision, RNE=interpreting(), BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, GROUP_M=_GROUP, ALIGN=align, num_warps=warps, num_stages=stages)
    if need_dw or has_bias:
        dw = torch.empty((N, K), device=x.device, dtype=x.dtype)
        db = torch.empty((N,), device=x.device, dtype=x.dtype) if has_bias else None
        align = _alignment((dy, saved, x, dw, db), (N, K, dy.stride(0), x.stride(0)))
        bn, bk, bm, warps, stages = _config("dw", N, K, M, x.dtype, precision, align)
        linear_act_bwd_dw_kernel[(triton.cdiv(N, bn) * triton.cdiv(K, bk),)](
            dy, saved, x, dw, db if db is not None else dw, M, N, K, dy.stride(0), x.stride(0), slope,
            HAS_BIAS=has_bias, ACT=act, COMPUTE=comp, ELEM=elem, DOT=dot, PRECISION=precision,
            RNE=interpreting(), BLOCK_N=bn, BLOCK_M=bm, BLOCK_K=bk, GROUP_N=_GROUP, ALIGN=align,
            num_warps=warps, num_stages=stages)
        if not need_dw:
            dw = None
    return dx, dw, db


def configs() -> list[CompileSpec]:
    """Every (tile, ALIGN) variant the GPU launcher can launch, per dtype / precision, for relu (y saved) and
    gelu (a saved). The kernels opt out of the JIT's value specialisation of their integers, so these are
    exactly the variants that get compiled; pointers are listed 16-byte aligned (fresh allocations), as the
    JIT marks them. The default (what CI compiles) is the bf16 large relu forward and backward."""
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t, elem = tl_name(dtype), tl_dtype(dtype)
        comp = tl.float64 if dtype == torch.float64 else tl.float32
        precisions = ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)
        for precision in precisions:
            cls = _operand_class(dtype, precision)
            for size in ("large", "small", "unaligned"):
                align = 1 if size == "unaligned" else 16
                for act_name in ("relu", "gelu"):
                    act = ACT_CODES[act_name]
                    default = dtype == torch.bfloat16 and size == "large" and act_name == "relu"
                    tag = f"{t} {size} {precision} {act_name}"

                    b0, b1, b2, warps, stages = _GPU_CONFIGS["fwd"][cls][size]
                    const = {"HAS_BIAS": True, "ACT": act, "SAVE_PREACT": act_name == "gelu", "COMPUTE": comp,
                             "DOT": elem, "PRECISION": precision, "RNE": False, "BLOCK_M": b0, "BLOCK_N": b1,
                             "BLOCK_K": b2, "GROUP_M": _GROUP, "ALIGN": align}
                    sig = {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}", "a_ptr": f"*{t}",
                           **{k: "i32" for k in ("M", "N", "K", "s_xm", "s_wn", "s_b")},
                           "slope": "fp32", **{k: "constexpr" for k in const}}
                    specs.append(CompileSpec(f"linear_act_fwd {tag} {b0}x{b1}x{b2}", linear_act_fwd_kernel, sig,
                                             const, warps, stages, default=default, divisible=_pointers(sig)))

                    b0, b1, b2, warps, stages = _GPU_CONFIGS["dx"][cls][size]
                    const = {"ACT": act, "COMPUTE": comp, "ELEM": elem, "DOT": elem, "PRECISION": precision,
                             "RNE": False, "BLOCK_M": b0, "BLOCK_N": b2, "BLOCK_K": b1, "GROUP_M": _GROUP,
                             "ALIGN": align}
                    sig = {"dy_ptr": f"*{t}", "s_ptr": f"*{t}", "w_ptr": f"*{t}", "dx_ptr": f"*{t}",
                           **{k: "i32" for k in ("M", "N", "K", "s_dym", "s_wn")},
                           "slope": "fp32", **{k: "constexpr" for k in const}}
                    specs.append(CompileSpec(f"linear_act_bwd_dx {tag} {b0}x{b1}x{b2}", linear_act_bwd_dx_kernel,
                                             sig, const, warps, stages, default=default, divisible=_pointers(sig)))

                    b0, b1, b2, warps, stages = _GPU_CONFIGS["dw"][cls][size]
                    const = {"HAS_BIAS": True, "ACT": act, "COMPUTE": comp, "ELEM": elem, "DOT": elem,
                             "PRECISION": precision, "RNE": False, "BLOCK_N": b0, "BLOCK_M": b2, "BLOCK_K": b1,
                             "GROUP_N": _GROUP, "ALIGN": align}
                    sig = {"dy_ptr": f"*{t}", "s_ptr": f"*{t}", "x_ptr": f"*{t}", "dw_ptr": f"*{t}",
                           "db_ptr": f"*{t}", **{k: "i32" for k in ("M", "N", "K", "s_dym", "s_xm")},
                           "slope": "fp32", **{k: "constexpr" for k in const}}
                    specs.append(CompileSpec(f"linear_act_bwd_dw {tag} {b0}x{b1}x{b2}", linear_act_bwd_dw_kernel,
                                             sig, const, warps, stages, default=default, divisible=_pointers(sig)))
    return specs


def _pointers(sig: dict) -> tuple:
    return tuple(k for k, v in sig.items() if v.startswith("*"))
