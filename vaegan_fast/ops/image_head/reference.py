"""The image head in plain PyTorch: the specification every backend is tested against (the math: __init__.py;
registered under "reference" there, and the native and Triton backends' fallback for the cases their kernels
do not take)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def loss_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pixel term is summed in: fp32 for fp16 (whose range a sum of B P terms exceeds)."""
    return torch.float32 if dtype == torch.float16 else dtype


def image_head_forward_reference(logits: torch.Tensor, x: torch.Tensor, images: torch.Tensor, with_pixel: bool):
    batch = x.shape[0]
    images.copy_(torch.sigmoid(logits))
    if not with_pixel:
        return None
    dtype = loss_dtype_of(x.dtype)
    return F.binary_cross_entropy_with_logits(logits[-batch:].to(dtype), x.to(dtype), reduction="sum") / batch


def image_head_backward_reference(images, x, g, u, gamma: float, pixel_factor: float, g_has_rec: bool,
                                  u_has_prior: bool, scale: Optional[torch.Tensor]):
    batch = x.shape[0]
    slope = torch.rsub(images, 1.0).mul_(images)  # sigmoid' = s (1 - s)
    dec_up = torch.zeros_like(images)
    dec_up[:g.shape[0]] = g
    u_rec = u[-batch:]
    if u_has_prior:
        dec_up.add_(u, alpha=gamma)
    else:
        dec_up[batch:].add_(u_rec, alpha=gamma)
    dec_up.mul_(slope)
    enc_up = u_rec * slope[batch:]
    if pixel_factor != 0:
        # One factor: pixel_factor alone would leave fp16 subnormals before the scale lifts them.
        factor = pixel_factor if scale is None else scale * pixel_factor
        d_pixel = torch.sub(images[batch:], x).mul_(factor)
        dec_up[batch:].add_(d_pixel)
        enc_up.add_(d_pixel)
    return dec_up, enc_up
