"""The decoder's image head of the routed training step: sigmoid and pixel term forward, the gradient back.

Math (rows [prior; reconstruction], R = 2B rows of P pixels, s = sigmoid(l), e = exp(-|l|) shared):

    forward   images = s = (l >= 0 ? 1 : e) / (1 + e)                              every row
              pixel  = sum over reconstruction rows of softplus(l) - x l,  / B   (BCE with logits)
                       softplus(l) = max(l, 0) + log1p(e)
    backward  s' = s (1 - s),  p = c S (s - x)   (c = pixel_weight / B; S the fp16 loss scale, or 1)
              dec_up[prior] = g[prior] s'
              dec_up[rec]   = (g[rec] if reconstructions are fakes, else 0) + gamma u) s' + p
              enc_up        = u s' + p

g is the generator loss's gradient at the discriminator's input (rows prior, and reconstruction when they are
fakes), u the feature-reconstruction gradient there (reconstruction rows). The specification is
vaegan_fast/ops/image_head/reference.py.

Each forward program reduces its block of the pixel term to one partial sum (fp32, fp64 for fp64 inputs) in
its own slot; the term is the sum of the partials in a fixed order (deterministic, no atomics). S is read on
the device (a pointer), so a loss-scaled step never waits for the host. Stores round once, to nearest even
(under the interpreter, whose fp32 -> bf16 cast truncates, by hand: gan_losses._cast).

Bytes moved (n = B P elements of s bytes): forward reads l (2 n s) and x (n s), writes images (2 n s);
backward reads images (2 n s), g (n s or 2 n s), u and x (2 n s), writes dec_up (2 n s) and enc_up (n s).
Eager PyTorch: sigmoid, BCE with logits (about 6 kernels), rsub, mul, add, copy, mul, mul, sub, mul, add, add:
about 17 launches and as many passes; this is 2 launches (plus the partials' tiny sum).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import CompileSpec, check_tensors, compute_dtype, flat_block, interpreting, tl_name
from .gan_losses import _cast, _log1p


@triton.jit
def image_head_forward_kernel(
    logits_ptr,  # [2B, P] contiguous: rows prior, then reconstruction
    x_ptr,  # [B, P] contiguous: the real images the reconstructions are judged against
    images_ptr,  # [2B, P] contiguous output: sigmoid(logits)
    partial_ptr,  # [grid] output per-program partial sums of the pixel term (COMPUTE dtype)
    n,  # 2 B P
    half,  # B P: elements before the first reconstruction row
    WITH_PIXEL: tl.constexpr,  # False: images only
    COMPUTE: tl.constexpr,  # arithmetic dtype: tl.float32, or tl.float64 for fp64 inputs
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter)
    BLOCK: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    l = tl.load(logits_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    e = tl.exp(-tl.abs(l))
    s = tl.where(l >= 0.0, 1.0, e) / (1.0 + e)
    tl.store(images_ptr + idx, _cast(s, images_ptr.dtype.element_ty, RNE), mask=mask)
    if WITH_PIXEL:
        rec = mask & (idx >= half)
        x = tl.load(x_ptr + tl.where(rec, idx - half, 0), mask=rec, other=0.0).to(COMPUTE)
        term = tl.maximum(l, 0.0) + _log1p(e) - x * l
        tl.store(partial_ptr + pid, tl.sum(tl.where(rec, term, 0.0), axis=0))


@triton.jit
def image_head_backward_kernel(
    images_ptr,  # [2B, P] contiguous: sigmoid(logits)
    x_ptr,  # [B, P] contiguous
    g_ptr,  # [2B, P] (RECON_AS_FAKE) or [B, P] contiguous: the generator loss's gradient at the images
    u_ptr,  # [B, P] contiguous: the feature-reconstruction gradient at the reconstructions
    dec_ptr,  # [2B, P] contiguous output: the gradient at the decoder's logits
    enc_ptr,  # [B, P] contiguous output: the gradient at the reconstruction rows' logits, for the encoder
    scale_ptr,  # [1]: the fp16 loss scale S (read when HAS_SCALE)
    n,  # 2 B P
    half,  # B P
    gamma,  # weight of the feature reconstruction in the decoder's loss
    factor,  # pixel_weight / B (0.0: no pixel term)
    RECON_AS_FAKE: tl.constexpr,  # reconstruction rows take the generator's gradient too
    HAS_SCALE: tl.constexpr,  # multiply the pixel gradient by S
    COMPUTE: tl.constexpr,
    RNE: tl.constexpr,  # round bf16 stores to nearest by hand (True under the interpreter)
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    rec = mask & (idx >= half)
    prior = mask & (idx < half)
    s = tl.load(images_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    slope = s * (1.0 - s)
    if RECON_AS_FAKE:
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(COMPUTE)
    else:
        g = tl.load(g_ptr + idx, mask=prior, other=0.0).to(COMPUTE)
    rec_idx = tl.where(rec, idx - half, 0)  # never a negative offset, even where masked
    u = tl.load(u_ptr + rec_idx, mask=rec, other=0.0).to(COMPUTE)
    x = tl.load(x_ptr + rec_idx, mask=rec, other=0.0).to(COMPUTE)
    c = factor
    if HAS_SCALE:
        c = c * tl.load(scale_ptr).to(COMPUTE)
    p = tl.where(rec, c * (s - x), 0.0)
    dec = (g + gamma * u) * slope + p  # u (and p) are 0 on prior rows
    tl.store(dec_ptr + idx, _cast(dec, dec_ptr.dtype.element_ty, RNE), mask=mask)
    tl.store(enc_ptr + rec_idx, _cast(u * slope + p, enc_ptr.dtype.element_ty, RNE), mask=rec)


# ---------------------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------------------
_GPU_BLOCK = 2048  # elements per program on a GPU
_GPU_WARPS = 8


def forward(logits: torch.Tensor, x: torch.Tensor, images: torch.Tensor, with_pixel: bool):
    """Write sigmoid(logits) into ``images``; return the pixel term (0-d, fp32 for fp16/bf16) or None."""
    check_tensors(logits, x, images)
    for name, t in (("logits", logits), ("x", x), ("images", images)):
        if not t.is_contiguous():
            raise ValueError(f"image_head: {name} must be contiguous")
    n, half = logits.numel(), x.numel()
    block, warps = flat_block(n, _GPU_BLOCK, _GPU_WARPS)
    grid = triton.cdiv(n, block)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    partials = torch.empty(grid, device=logits.device, dtype=acc)
    image_head_forward_kernel[(grid,)](logits, x, images, partials, n, half, WITH_PIXEL=bool(with_pixel),
                                       COMPUTE=compute_dtype(logits.dtype), RNE=interpreting(), BLOCK=block,
                                       num_warps=warps)
    return partials.sum() / x.shape[0] if with_pixel else None


def backward(images, x, g_fake, u_rec, gamma: float, pixel_factor: float, recon_as_fake: bool,
             scale: Optional[torch.Tensor]):
    """(dec_up [2B, P], enc_up [B, P]): the gradient back through the sigmoid, with the pixel term's."""
    check_tensors(images, x, g_fake, u_rec)
    images, x, g_fake, u_rec = (t.contiguous() for t in (images, x, g_fake, u_rec))
    n, half = images.numel(), x.numel()
    dec_up = torch.empty_like(images)
    enc_up = torch.empty_like(x)
    block, warps = flat_block(n, _GPU_BLOCK, _GPU_WARPS)
    has_scale = scale is not None and pixel_factor != 0
    image_head_backward_kernel[(triton.cdiv(n, block),)](
        images, x, g_fake, u_rec, dec_up, enc_up, scale if has_scale else images, n, half, float(gamma),
        float(pixel_factor), RECON_AS_FAKE=bool(recon_as_fake), HAS_SCALE=has_scale,
        COMPUTE=compute_dtype(images.dtype), RNE=interpreting(), BLOCK=block, num_warps=warps)
    return dec_up, enc_up


def configs() -> list[CompileSpec]:
    specs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = tl_name(dtype)
        for flag in (True, False):
            default = dtype == torch.float32 and flag
            const = {"WITH_PIXEL": flag, "COMPUTE": tl.float32, "RNE": False, "BLOCK": _GPU_BLOCK}
            sig = {"logits_ptr": f"*{t}", "x_ptr": f"*{t}", "images_ptr": f"*{t}", "partial_ptr": "*fp32",
                   "n": "i32", "half": "i32", **{k: "constexpr" for k in const}}
            specs.append(CompileSpec(f"image_head_forward {t} pixel={flag} BLOCK{_GPU_BLOCK}",
                                     image_head_forward_kernel, sig, const, _GPU_WARPS, default=default))
            for has_scale in ((True, False) if dtype == torch.float16 else (False,)):
                const = {"RECON_AS_FAKE": flag, "HAS_SCALE": has_scale, "COMPUTE": tl.float32, "RNE": False,
                         "BLOCK": _GPU_BLOCK}
                # Without a scale the launcher passes the images as the (unread) scale pointer.
                sig = {"images_ptr": f"*{t}", "x_ptr": f"*{t}", "g_ptr": f"*{t}", "u_ptr": f"*{t}",
                       "dec_ptr": f"*{t}", "enc_ptr": f"*{t}", "scale_ptr": "*fp32" if has_scale else f"*{t}",
                       "n": "i32", "half": "i32",
                       "gamma": "fp32", "factor": "fp32", **{k: "constexpr" for k in const}}
                specs.append(CompileSpec(f"image_head_backward {t} recon_as_fake={flag} scale={has_scale} "
                                         f"BLOCK{_GPU_BLOCK}", image_head_backward_kernel, sig, const, _GPU_WARPS,
                                         default=default))
    return specs
