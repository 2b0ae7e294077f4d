"""The decoder's image head, a primitive of the training step's plan (vaegan_fast/step/plan.py): no autograd.

Images are rows of R = B or 2B images (any per-row shape, any memory layout shared by every argument), the
last B of them reconstructions of x; s = sigmoid(logits):

    image_head_forward(logits, x, images, with_pixel)  writes s into ``images`` and returns the pixel term,
        sum over the last B rows of BCE-with-logits(l, x), / B   (None without it; fp32 at least)
    image_head_backward(images, x, g, u, gamma, pixel_factor, g_has_rec, u_has_prior, scale)
                                                        -> (dec_up [2B], enc_up [B]), images [prior; rec]
        s' = s (1 - s),  p = pixel_factor * scale * (s - x)   (no p when pixel_factor is 0)
        dec_up[prior] = (g[prior] + gamma u[prior]) s'                 (u[prior] only when u_has_prior)
        dec_up[rec]   = (g[rec] + gamma u[rec]) s' + p                 (g[rec] only when g_has_rec)
        enc_up        = u[rec] s' + p
g is the generator loss's gradient at the discriminator's input: rows [prior] or [prior; rec]; u the
feature-reconstruction gradient there: rows [rec] or [prior; rec] (with a batch norm in the discriminator,
every row's features depend on every row). ``scale`` is fp16's loss scale (a 0-dim tensor) or None. The
reference below is the specification; the native CPU backend (kernels/cpu/image_head.cpp) and the Triton
backend (kernels/image_head.py) do each in one pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch

FORWARD_OP, BACKWARD_OP = "image_head_forward", "image_head_backward"


def loss_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype the pixel term is summed in: fp32 for fp16 (whose range a sum of B P terms exceeds)."""
    return torch.float32 if dtype == torch.float16 else dtype


@_dispatch.register(FORWARD_OP, "reference")
def image_head_forward_reference(logits: torch.Tensor, x: torch.Tensor, images: torch.Tensor, with_pixel: bool):
    batch = x.shape[0]
    images.copy_(torch.sigmoid(logits))
    if not with_pixel:
        return None
    dtype = loss_dtype_of(x.dtype)
    return F.binary_cross_entropy_with_logits(logits[-batch:].to(dtype), x.to(dtype), reduction="sum") / batch


@_dispatch.register(BACKWARD_OP, "reference")
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


def image_head_forward(logits, x, images, with_pixel: bool, backend: str = "auto"):
    _, impl = _dispatch.resolve(FORWARD_OP, backend, logits.device, logits.dtype)
    return impl(logits, x, images, bool(with_pixel))


def image_head_backward(images, x, g, u, gamma: float, pixel_factor: float, g_has_rec: bool, u_has_prior: bool,
                        scale: Optional[torch.Tensor] = None, backend: str = "auto"):
    _, impl = _dispatch.resolve(BACKWARD_OP, backend, images.device, images.dtype)
    return impl(images, x, g, u, float(gamma), float(pixel_factor), bool(g_has_rec), bool(u_has_prior), scale)
