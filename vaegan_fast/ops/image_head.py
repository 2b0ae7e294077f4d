"""The decoder's image head, a primitive of the explicit training step (vaegan_fast/step.py): no autograd.

Rows [prior; reconstruction] (2B rows of P pixels), s = sigmoid(logits):

    image_head_forward(logits, x, images)  writes s into ``images`` (the discriminator's input rows) and
        returns the pixel term  sum over reconstruction rows of BCE-with-logits(l, x), / B  (None without it)
    image_head_backward(images, x, g_fake, u_rec, gamma, pixel_factor, recon_as_fake, scale) -> (dec_up, enc_up)
        s' = s (1 - s),  p = pixel_factor * scale * (s - x)   (no p when pixel_factor is 0)
        dec_up[prior] = g_fake[prior] s'
        dec_up[rec]   = (g_fake[rec] if recon_as_fake else 0) + gamma u_rec) s' + p
        enc_up        = u_rec s' + p

g_fake is the generator loss's gradient at the discriminator's input (rows prior, and reconstruction when
reconstructions are fakes), u_rec the feature-reconstruction gradient there; ``scale`` is fp16's loss scale
(a 0-dim tensor) or None. The reference below is the specification; the native CPU backend
(kernels/cpu/image_head.cpp) and the Triton backend (kernels/image_head.py) do each in one pass.
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
    torch.sigmoid(logits, out=images)
    if not with_pixel:
        return None
    dtype = loss_dtype_of(x.dtype)
    return F.binary_cross_entropy_with_logits(logits[batch:].to(dtype), x.to(dtype), reduction="sum") / batch


@_dispatch.register(BACKWARD_OP, "reference")
def image_head_backward_reference(images, x, g_fake, u_rec, gamma: float, pixel_factor: float,
                                  recon_as_fake: bool, scale: Optional[torch.Tensor]):
    batch = x.shape[0]
    slope = torch.rsub(images, 1.0).mul_(images)  # sigmoid' = s (1 - s)
    dec_up = torch.empty_like(images)
    if recon_as_fake:
        torch.add(g_fake[batch:], u_rec, alpha=gamma, out=dec_up[batch:])
    else:
        torch.mul(u_rec, gamma, out=dec_up[batch:])
    dec_up[:batch].copy_(g_fake[:batch])
    dec_up.mul_(slope)
    enc_up = u_rec * slope[batch:]
    if pixel_factor != 0:
        # One factor: pixel_factor alone would leave fp16 subnormals before the scale lifts them.
        factor = pixel_factor if scale is None else scale * pixel_factor
        d_pixel = torch.sub(images[batch:], x).mul_(factor)
        dec_up[batch:].add_(d_pixel)
        enc_up.add_(d_pixel)
    return dec_up, enc_up


def image_head_forward(logits, x, images, with_pixel: bool, backend: str):
    _, impl = _dispatch.resolve(FORWARD_OP, backend, logits.device, logits.dtype)
    return impl(logits, x, images, with_pixel)


def image_head_backward(images, x, g_fake, u_rec, gamma: float, pixel_factor: float, recon_as_fake: bool,
                        scale: Optional[torch.Tensor], backend: str):
    _, impl = _dispatch.resolve(BACKWARD_OP, backend, images.device, images.dtype)
    return impl(images, x, g_fake, u_rec, float(gamma), float(pixel_factor), bool(recon_as_fake), scale)
