"""Reparameterization + KL to N(0, I): one pass forward, one pass backward.

Math (per row b, column j; s = exp(logvar / 2)):

    z[b, j] = mu[b, j] + s[b, j] * eps[b, j]
    kl[b]   = 0.5 * sum_j (mu^2 + exp(logvar) - logvar - 1)

    d mu     = dz + dkl[b] * mu
    d logvar = 0.5 * dz * s * eps + 0.5 * dkl[b] * (exp(logvar) - 1)
    d eps    = dz * s                                  (only when eps itself needs a gradient)

eps is either read from memory or drawn inside the kernel from ``tl.rand(seed, b * D + j)`` (see
``_standard_normal``): the counter is the element's logical index, so the draw does not depend on block
sizes, and backward regenerates the very same eps from the seed instead of reading it (eps is never written
to memory). The counter is 32-bit:
tensors of more than 2^31 elements would repeat noise, so the launcher refuses them.

Bytes moved (B x D elements of s bytes each):
    forward   reads mu, logvar (, eps)     writes z, kl       4 B D s + B s   (3 B D s + B s with a seed)
    backward  reads mu, logvar, dz (, eps) writes dmu, dlogvar 6 B D s + B s   (5 B D s + B s with a seed)
Eager PyTorch launches about 11 kernels forward (mul, exp, mul, add; mul, exp, add, sub, sub, sum, mul) and
about 10 backward, each a full pass over B x D; this is one launch each way. Arithmetic is fp32 (fp64 for
fp64 inputs), rounded once on store, to nearest even (under the interpreter, whose fp32 -> bf16 cast
truncates, by hand: gan_losses._cast), so fp16/bf16 results are at least as accurate as eager's.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import CompileSpec, check_tensors, compute_dtype, interpreting, next_pow2, tl_name
from .gan_losses import _cast


@triton.jit
def _load_tile(ptr, rows64, cols64, s_b, s_d, mask, COMPUTE: tl.constexpr):
    """A [BLOCK_B, BLOCK_D] tile of a strided [B, D] tensor, in the compute dtype (0 where masked)."""
    return tl.load(ptr + rows64[:, None] * s_b + cols64[None, :] * s_d, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def _standard_normal(seed, offsets):
    """N(0, 1) draws from Philox uniforms through the inverse normal CDF (Wichura's AS241, PPND7: relative
    error below 1.2e-7, i.e. fp32 rounding).

    tl.randn's Box-Muller transform calls cos/sin, whose libdevice slow path (huge-argument reduction) keeps
    a local array: 32 bytes of stack per thread under triton 3.6. This needs only log and sqrt.
    """
    u = tl.rand(seed, offsets)
    q = u - 0.5
    r = 0.180625 - q * q
    central = q * (((59.10937472 * r + 159.29113202) * r + 50.434271938) * r + 3.387132872) / (
        ((67.18756360 * r + 78.757757664) * r + 17.895169469) * r + 1.0)
    t = tl.maximum(tl.minimum(u, 1.0 - u), 1e-30)  # u can be exactly 0
    r = tl.sqrt(-tl.log(t))
    a = r - 1.6
    body = (((0.17023821103 * a + 1.3067284816) * a + 2.75681539) * a + 1.4234372777) / (
        (0.1202113297 * a + 0.7370016425) * a + 1.0)
    b = r - 5.0
    tail = (((0.017337203997 * b + 0.42868294337) * b + 3.081226386) * b + 6.657905115) / (
        (0.012258202635 * b + 0.24197894225) * b + 1.0)
    outer = tl.where(r <= 5.0, body, tail)
    outer = tl.where(q < 0.0, -outer, outer)
    return tl.where(tl.abs(q) <= 0.425, central, outer)


@triton.jit
def reparam_kl_fwd_kernel(
    mu_ptr,  # [B, D] mean, any strides
    logvar_ptr,  # [B, D] log-variance, any strides
    eps_ptr,  # [B, D] standard-normal noise, any strides (not read when HAS_EPS is False)
    z_ptr,  # [B, D] output sample, contiguous
    kl_ptr,  # [B] output per-row KL, contiguous
    B,  # number of rows
    D,  # number of columns (latent size)
    s_mu_b,  # row stride of mu, in elements
    s_mu_d,  # column stride of mu
    s_lv_b,  # row stride of logvar
    s_lv_d,  # column stride of logvar
    s_eps_b,  # row stride of eps
    s_eps_d,  # column stride of eps
    seed,  # Philox seed for in-kernel eps (used when HAS_EPS is False)
    HAS_EPS: tl.constexpr,  # True: read eps; False: draw it from tl.rand(seed, b * D + j)
    COMPUTE: tl.constexpr,  # arithmetic dtype: tl.float32, or tl.float64 for fp64 inputs
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter)
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per loop iteration
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    kl = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        cols64 = cols.to(tl.int64)
        mu = _load_tile(mu_ptr, rows64, cols64, s_mu_b, s_mu_d, mask, COMPUTE)
        lv = _load_tile(logvar_ptr, rows64, cols64, s_lv_b, s_lv_d, mask, COMPUTE)
        if HAS_EPS:
            eps = _load_tile(eps_ptr, rows64, cols64, s_eps_b, s_eps_d, mask, COMPUTE)
        else:
            eps = _standard_normal(seed, rows[:, None] * D + cols[None, :]).to(COMPUTE)
        std = tl.exp(lv * 0.5)
        z = mu + std * eps
        tl.store(z_ptr + rows64[:, None] * D + cols64[None, :], _cast(z, z_ptr.dtype.element_ty, RNE), mask=mask)
        term = mu * mu + tl.exp(lv) - lv - 1.0
        kl += tl.sum(tl.where(mask, term, 0.0), axis=1)
    tl.store(kl_ptr + rows64, _cast(kl * 0.5, kl_ptr.dtype.element_ty, RNE), mask=row_ok)


@triton.jit
def reparam_kl_bwd_kernel(
    mu_ptr,  # [B, D] mean saved from forward, any strides
    logvar_ptr,  # [B, D] log-variance saved from forward, any strides
    eps_ptr,  # [B, D] noise saved from forward (not read when HAS_EPS is False)
    dz_ptr,  # [B, D] incoming gradient of z, any strides (not read when HAS_DZ is False)
    dkl_ptr,  # [B] incoming gradient of kl, any stride (not read when HAS_DKL is False)
    dmu_ptr,  # [B, D] output gradient of mu, contiguous
    dlv_ptr,  # [B, D] output gradient of logvar, contiguous
    deps_ptr,  # [B, D] output gradient of eps, contiguous (written only when WRITE_DEPS)
    B,  # number of rows
    D,  # number of columns
    s_mu_b,  # row stride of mu
    s_mu_d,  # column stride of mu
    s_lv_b,  # row stride of logvar
    s_lv_d,  # column stride of logvar
    s_eps_b,  # row stride of eps
    s_eps_d,  # column stride of eps
    s_dz_b,  # row stride of dz (0 for a broadcast gradient)
    s_dz_d,  # column stride of dz
    s_dkl,  # stride of dkl
    seed,  # Philox seed that drew eps in forward (used when HAS_EPS is False)
    HAS_EPS: tl.constexpr,  # True: read eps; False: regenerate it from seed
    HAS_DZ: tl.constexpr,  # False when z received no gradient (treated as zero)
    HAS_DKL: tl.constexpr,  # False when kl received no gradient (treated as zero)
    WRITE_DEPS: tl.constexpr,  # True when eps needs a gradient
    COMPUTE: tl.constexpr,  # arithmetic dtype
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter)
    BLOCK_B: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # columns per loop iteration
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    if HAS_DKL:
        dkl = tl.load(dkl_ptr + rows64 * s_dkl, mask=row_ok, other=0.0).to(COMPUTE)
    else:
        dkl = tl.zeros([BLOCK_B], dtype=COMPUTE)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < D)[None, :]
        cols64 = cols.to(tl.int64)
        mu = _load_tile(mu_ptr, rows64, cols64, s_mu_b, s_mu_d, mask, COMPUTE)
        lv = _load_tile(logvar_ptr, rows64, cols64, s_lv_b, s_lv_d, mask, COMPUTE)
        dmu = dkl[:, None] * mu
        dlv = 0.5 * dkl[:, None] * (tl.exp(lv) - 1.0)
        if HAS_DZ:
            dz = _load_tile(dz_ptr, rows64, cols64, s_dz_b, s_dz_d, mask, COMPUTE)
            if HAS_EPS:
                eps = _load_tile(eps_ptr, rows64, cols64, s_eps_b, s_eps_d, mask, COMPUTE)
            else:
                eps = _standard_normal(seed, rows[:, None] * D + cols[None, :]).to(COMPUTE)
            std = tl.exp(lv * 0.5)
            dmu += dz
            dlv += 0.5 * dz * std * eps
            if WRITE_DEPS:
                tl.store(deps_ptr + rows64[:, None] * D + cols64[None, :],
                         _cast(dz * std, deps_ptr.dtype.element_ty, RNE), mask=mask)
        elif WRITE_DEPS:
            tl.store(deps_ptr + rows64[:, None] * D + cols64[None, :],
                     tl.zeros([BLOCK_B, BLOCK_D], dtype=COMPUTE).to(deps_ptr.dtype.element_ty), mask=mask)
        out = rows64[:, None] * D + cols64[None, :]
        tl.store(dmu_ptr + out, _cast(dmu, dmu_ptr.dtype.element_ty, RNE), mask=mask)
        tl.store(dlv_ptr + out, _cast(dlv, dlv_ptr.dtype.element_ty, RNE), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
_GPU_BLOCK_D = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # columns per iteration the GPU launcher can pick
_GPU_TILE = 512  # elements per program per iteration on a GPU (BLOCK_B * BLOCK_D)
_NUM_WARPS = 4


def _blocks(B: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) for a [B, D] problem."""
    if interpreting():
        block_d = min(next_pow2(D), 2048)
        block_b = max(1, min(next_pow2(B), (1 << 17) // block_d))
        return block_b, block_d, 1
    block_d = min(next_pow2(D), _GPU_BLOCK_D[-1])
    return _GPU_TILE // block_d, block_d, _NUM_WARPS


def _check_size(B: int, D: int) -> None:
    if B * D >= 2**31:
        raise ValueError(f"reparam_kl kernels handle at most 2^31 - 1 elements, got {B} x {D}")


def reparam_kl_forward(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor],
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """z [B, D] (contiguous) and kl [B] from mu, logvar and eps (or eps drawn from ``seed`` when None)."""
    check_tensors(mu, logvar, eps)
    B, D = mu.shape
    _check_size(B, D)
    z = torch.empty((B, D), device=mu.device, dtype=mu.dtype)
    kl = torch.empty((B,), device=mu.device, dtype=mu.dtype)
    block_b, block_d, warps = _blocks(B, D)
    eps_arg = eps if eps is not None else mu
    reparam_kl_fwd_kernel[(triton.cdiv(B, block_b),)](
        mu, logvar, eps_arg, z, kl, B, D,
        mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1), eps_arg.stride(0), eps_arg.stride(1),
        int(seed), HAS_EPS=eps is not None, COMPUTE=compute_dtype(mu.dtype), RNE=interpreting(),
        BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps)
    return z, kl


def reparam_kl_backward(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor], seed: int,
                        dz: Optional[torch.Tensor], dkl: Optional[torch.Tensor], need_deps: bool = False):
    """(dmu, dlogvar, deps or None) for the forward above; a None dz/dkl counts as zero."""
    check_tensors(mu, logvar, eps, dz, dkl)
    B, D = mu.shape
    _check_size(B, D)
    dmu = torch.empty((B, D), device=mu.device, dtype=mu.dtype)
    dlv = torch.empty((B, D), device=mu.device, dtype=mu.dtype)
    deps = torch.empty((B, D), device=mu.device, dtype=mu.dtype) if need_deps else None
    block_b, block_d, warps = _blocks(B, D)
    eps_arg = eps if eps is not None else mu
    dz_arg = dz if dz is not None else mu
    dkl_arg = dkl if dkl is not None else kl_dummy(mu)
    reparam_kl_bwd_kernel[(triton.cdiv(B, block_b),)](
        mu, logvar, eps_arg, dz_arg, dkl_arg, dmu, dlv, deps if deps is not None else dmu, B, D,
        mu.stride(0), mu.stride(1), logvar.stride(0), logvar.stride(1), eps_arg.stride(0), eps_arg.stride(1),
        dz_arg.stride(0), dz_arg.stride(1), dkl_arg.stride(0), int(seed),
        HAS_EPS=eps is not None, HAS_DZ=dz is not None, HAS_DKL=dkl is not None, WRITE_DEPS=need_deps,
        COMPUTE=compute_dtype(mu.dtype), RNE=interpreting(), BLOCK_B=block_b, BLOCK_D=block_d, num_warps=warps)
    return dmu, dlv, deps


def kl_dummy(mu: torch.Tensor) -> torch.Tensor:
    return mu[:, 0]


def configs() -> list[CompileSpec]:
    """Every (BLOCK_B, BLOCK_D, num_warps) the GPU launcher can choose, per dtype and eps source."""
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = tl_name(dtype)
        for block_d in _GPU_BLOCK_D:
            for has_eps in (True, False):
                block_b = _GPU_TILE // block_d
                default = dtype == torch.float32 and block_d == 64
                ptr = {"mu_ptr": f"*{t}", "logvar_ptr": f"*{t}", "eps_ptr": f"*{t}"}
                ints = ["B", "D", "s_mu_b", "s_mu_d", "s_lv_b", "s_lv_d", "s_eps_b", "s_eps_d", "seed"]
                sig = {**ptr, "z_ptr": f"*{t}", "kl_ptr": f"*{t}", **{k: "i32" for k in ints}}
                const = {"HAS_EPS": has_eps, "COMPUTE": tl.float32, "RNE": False, "BLOCK_B": block_b,
                         "BLOCK_D": block_d}
                sig.update({k: "constexpr" for k in const})
                label = f"reparam_kl_fwd {t} eps={'mem' if has_eps else 'seed'} B{block_b}xD{block_d}"
                specs.append(CompileSpec(label, reparam_kl_fwd_kernel, sig, const, _NUM_WARPS, default=default))

                ints = ["B", "D", "s_mu_b", "s_mu_d", "s_lv_b", "s_lv_d", "s_eps_b", "s_eps_d", "s_dz_b",
                        "s_dz_d", "s_dkl", "seed"]
                sig = {**ptr, "dz_ptr": f"*{t}", "dkl_ptr": f"*{t}", "dmu_ptr": f"*{t}", "dlv_ptr": f"*{t}",
                       "deps_ptr": f"*{t}", **{k: "i32" for k in ints}}
                const = {"HAS_EPS": has_eps, "HAS_DZ": True, "HAS_DKL": True, "WRITE_DEPS": False,
                         "COMPUTE": tl.float32, "RNE": False, "BLOCK_B": block_b, "BLOCK_D": block_d}
                sig.update({k: "constexpr" for k in const})
                label = f"reparam_kl_bwd {t} eps={'mem' if has_eps else 'seed'} B{block_b}xD{block_d}"
                specs.append(CompileSpec(label, reparam_kl_bwd_kernel, sig, const, _NUM_WARPS, default=default))
    return specs
