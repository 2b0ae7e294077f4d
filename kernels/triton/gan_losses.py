"""GAN losses with their gradient computed in the forward pass.

Math (softplus(t) = max(t, 0) + log1p(e), e = exp(-|t|), stable at any |t|; its derivative is sigmoid(t),
formed from the same e as (t >= 0 ? 1 : e) / (1 + e), which cannot overflow where 1 / (1 + exp(-t)) does):

    softplus term of a logits tensor x with n elements, sign s (+1/-1) and weight c:
        loss  += c / n * sum_i softplus(s * x_i)
        dx_i   = c / n * s * sigmoid(s * x_i)
    discriminator_loss = term(real, s=-1, c=1) + sum_f term(fake_f, s=+1, c=1)
    generator_loss     = sum_f term(fake_f, s=-1, c=1)        (saturating: s=+1, c=-1)

    feature_recon_loss(a, b), a and b [N, F]:
        loss = 0.5 / N * sum (a - b)^2        da = (a - b) / N        db = -da

Each program reduces a block to one partial sum (fp32, fp64 for fp64 inputs) written to its own slot; the
loss is the sum of the partials in a fixed order (deterministic, no atomics). When a gradient is wanted the
same pass writes it, so backward is a single multiply by the incoming gradient; under no_grad the kernel
writes nothing but the partials. Stored gradients are COMPUTE results rounded once, to nearest even: under
the interpreter (RNE), whose fp32 -> bf16 cast truncates and mangles subnormals, by exact bit arithmetic.

Bytes moved (n elements of s bytes): loss only, reads n s; with the gradient, reads n s and writes n s
(feature_recon_loss: reads 2 n s, writes n s; db is -da, formed in backward). Eager PyTorch launches about
7 kernels per softplus term forward (neg, clamp, abs, neg, exp, log1p, add, mean) plus as many backward, and
5 for feature_recon_loss forward (sub, mul, sum, mean, mul) plus about 5 backward; this is one launch per
tensor plus a tiny reduction of the partials, and one multiply per input in backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CompileSpec, check_tensors, compute_dtype, flat_block, interpreting, tl_name


@triton.jit
def _log1p(y):
    """log(1 + y) to a few ulp for y in [0, 1] without libdevice (which the interpreter lacks).

    log(1 + y) loses y's low bits when 1 + y rounds; scaling log(u) by y / (u - 1), with u = 1 + y, undoes
    that rounding (Goldberg, "What every computer scientist should know about floating-point", thm. 4).
    """
    u = 1.0 + y
    d = u - 1.0
    return tl.where(d == 0.0, y, tl.log(u) * (y / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _bf16_rne(x):
    """fp32 x rounded to the nearest bf16 (ties to even, subnormals included), still as fp32: add half of the
    16 dropped bits' weight (less one, plus the kept lowest bit, for ties to even) and clear them."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # a NaN's carry could reach inf


@triton.jit
def _cast(x, DTYPE: tl.constexpr, RNE: tl.constexpr):
    """x (COMPUTE dtype) as DTYPE, for a store. RNE (the interpreter, whose fp32 -> bf16 cast rounds toward
    zero where the GPU's rounds to nearest) rounds to bf16 by hand and reinterprets the top 16 bits."""
    if RNE and DTYPE == tl.bfloat16:
        top = _bf16_rne(x).to(tl.uint32, bitcast=True) >> 16
        top = tl.where(x != x, top | 0x40, top)  # a NaN whose payload was all in the low bits stays a NaN
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit(do_not_specialize=["n"])  # n is converted to a float inside: never a constexpr 1
def softplus_loss_kernel(
    x_ptr,  # logits viewed as [R, C] (any strides)
    grad_ptr,  # [R * C] output gradient, contiguous in x's logical order (written when WRITE_GRAD)
    partial_ptr,  # [grid] output per-program partial sums of the weighted loss (COMPUTE dtype)
    n,  # number of elements, R * C
    C,  # columns of the [R, C] view
    s_r,  # row stride of x, in elements
    s_c,  # column stride of x
    sign,  # +1.0 or -1.0: the term is softplus(sign * x)
    coeff,  # weight c of this tensor's mean (+1.0 or -1.0); each element's term is weighted c / n
    WRITE_GRAD: tl.constexpr,  # False under no_grad: compute the loss only
    COMPUTE: tl.constexpr,  # arithmetic dtype: tl.float32, or tl.float64 for fp64 inputs
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter, see _cast)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    r = idx // C
    c = idx - r * C
    x = tl.load(x_ptr + r * s_r + c * s_c, mask=mask, other=0.0).to(COMPUTE)
    scale = coeff / (tl.zeros([BLOCK], dtype=COMPUTE) + n)  # c / n in COMPUTE precision (fp64 stays fp64)
    t = x * sign
    e = tl.exp(-tl.abs(t))
    if WRITE_GRAD:  # stored first, so e is dead before the reduction (keeping it live across it spills)
        g = (scale * sign) * (tl.where(t >= 0.0, 1.0, e) / (1.0 + e))  # sigmoid(t) from e: no overflow
        tl.store(grad_ptr + idx, _cast(g, grad_ptr.dtype.element_ty, RNE), mask=mask)
    sp = tl.maximum(t, 0.0) + _log1p(e)
    tl.store(partial_ptr + pid, tl.sum(tl.where(mask, sp * scale, 0.0), axis=0))


@triton.jit(do_not_specialize=["rows"])  # rows is converted to a float inside
def feature_recon_kernel(
    a_ptr,  # features_real viewed as [N, F] (any strides)
    b_ptr,  # features_fake viewed as [N, F] (any strides)
    grad_ptr,  # [N * F] output gradient of a, (a - b) / N, contiguous (written when WRITE_GRAD)
    partial_ptr,  # [grid] output per-program partial sums of the loss (COMPUTE dtype)
    n,  # number of elements, N * F
    F,  # features per row
    s_a_r,  # row stride of a
    s_a_c,  # feature stride of a
    s_b_r,  # row stride of b
    s_b_c,  # feature stride of b
    rows,  # N, the number of rows (the loss is a mean over rows)
    WRITE_GRAD: tl.constexpr,  # False under no_grad: compute the loss only
    COMPUTE: tl.constexpr,  # arithmetic dtype
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter, see _cast)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    r = idx // F
    c = idx - r * F
    a = tl.load(a_ptr + r * s_a_r + c * s_a_c, mask=mask, other=0.0).to(COMPUTE)
    b = tl.load(b_ptr + r * s_b_r + c * s_b_c, mask=mask, other=0.0).to(COMPUTE)
    d = a - b
    inv_rows = 1.0 / (tl.zeros([BLOCK], dtype=COMPUTE) + rows)  # 1 / N in COMPUTE precision
    tl.store(partial_ptr + pid, tl.sum(d * d * (0.5 * inv_rows), axis=0))
    if WRITE_GRAD:
        tl.store(grad_ptr + idx, _cast(d * inv_rows, grad_ptr.dtype.element_ty, RNE), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
_GPU_BLOCK = 4096  # elements per program on a GPU
_GPU_WARPS = 8


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    """x as an [R, C] view when its layout allows (0-d/1-d -> [n, 1]); a copy only as a last resort."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.unsqueeze(1)
    if x.dim() == 2:
        return x
    return x.reshape(x.shape[0], -1)


def softplus_losses(xs, signs, coeffs, need_grad: bool):
    """sum_k coeffs[k] * mean(softplus(signs[k] * xs[k])) as a 0-d tensor, and each x's gradient (or None)."""
    check_tensors(*xs)
    dtype, device = xs[0].dtype, xs[0].device
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    plans = []
    total = 0
    for x in xs:
        n = x.numel()
        block, warps = flat_block(n, _GPU_BLOCK, _GPU_WARPS)
        grid = triton.cdiv(n, block)
        plans.append((n, block, warps, grid, total))
        total += grid
    partials = torch.empty(total, device=device, dtype=acc)
    grads = []
    for x, sign, coeff, (n, block, warps, grid, start) in zip(xs, signs, coeffs, plans):
        x2 = _as_2d(x)
        grad = torch.empty(x.shape, device=device, dtype=dtype) if need_grad else None
        softplus_loss_kernel[(grid,)](
            x2, grad if grad is not None else partials, partials[start:], n, x2.shape[1], x2.stride(0),
            x2.stride(1), float(sign), float(coeff), WRITE_GRAD=need_grad, COMPUTE=compute_dtype(dtype),
            RNE=interpreting(), BLOCK=block, num_warps=warps)
        grads.append(grad)
    return partials.sum().to(dtype), grads


def feature_recon(a: torch.Tensor, b: torch.Tensor, need_grad: bool):
    """0.5 * sum over features of (a - b)^2 averaged over rows (0-d), and (a - b) / N (or None)."""
    check_tensors(a, b)
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    n = a2.numel()
    block, warps = flat_block(n, _GPU_BLOCK, _GPU_WARPS)
    grid = triton.cdiv(n, block)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    partials = torch.empty(grid, device=a.device, dtype=acc)
    grad = torch.empty(a.shape, device=a.device, dtype=a.dtype) if need_grad else None
    feature_recon_kernel[(grid,)](
        a2, b2, grad if grad is not None else partials, partials, n, a2.shape[1], a2.stride(0), a2.stride(1),
        b2.stride(0), b2.stride(1), a.shape[0], WRITE_GRAD=need_grad, COMPUTE=compute_dtype(a.dtype),
        RNE=interpreting(), BLOCK=block, num_warps=warps)
    return partials.sum().to(a.dtype), grad


def configs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = tl_name(dtype)
        for write_grad in (True, False):
            default = dtype == torch.float32 and write_grad
            const = {"WRITE_GRAD": write_grad, "COMPUTE": tl.float32, "RNE": False, "BLOCK": _GPU_BLOCK}
            sig = {"x_ptr": f"*{t}", "grad_ptr": f"*{t}", "partial_ptr": "*fp32", "n": "i32", "C": "i32",
                   "s_r": "i32", "s_c": "i32", "sign": "fp32", "coeff": "fp32", **{k: "constexpr" for k in const}}
            specs.append(CompileSpec(f"softplus_loss {t} grad={write_grad} BLOCK{_GPU_BLOCK}", softplus_loss_kernel,
                                     sig, const, _GPU_WARPS, default=default))
            sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "grad_ptr": f"*{t}", "partial_ptr": "*fp32", "n": "i32",
                   "F": "i32", "s_a_r": "i32", "s_a_c": "i32", "s_b_r": "i32", "s_b_c": "i32", "rows": "i32",
                   **{k: "constexpr" for k in const}}
            specs.append(CompileSpec(f"feature_recon {t} grad={write_grad} BLOCK{_GPU_BLOCK}", feature_recon_kernel,
                                     sig, const, _GPU_WARPS, default=default))
    return specs
