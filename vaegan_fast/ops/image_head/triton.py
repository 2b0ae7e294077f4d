"""The image head on the Triton backend: the launchers of kernels/triton/image_head.py, on contiguous rows (the
reference otherwise); imported by ops/__init__ once _triton_lib has loaded the kernels."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import _dispatch
from .._triton_lib import _check_dtypes, kernels
from .reference import image_head_backward_reference, image_head_forward_reference


def _flat_rows(t: Tensor) -> Optional[Tensor]:
    """t as a contiguous [rows, features] view, or None (the kernels read rows of contiguous memory)."""
    return t.view(t.shape[0], -1) if t.is_contiguous() else None


@_dispatch.register("image_head_forward", "triton")
def image_head_forward_triton(logits: Tensor, x: Tensor, images: Tensor, with_pixel: bool):
    _check_dtypes(logits=logits, x=x, images=images)
    flat = [_flat_rows(t) for t in (logits, x, images)]
    if any(f is None for f in flat) or logits.shape[0] != 2 * x.shape[0]:
        return image_head_forward_reference(logits, x, images, with_pixel)
    return kernels.image_head.forward(*flat, with_pixel)


@_dispatch.register("image_head_backward", "triton")
def image_head_backward_triton(images: Tensor, x: Tensor, g: Tensor, u: Tensor, gamma: float, pixel_factor: float,
                               g_has_rec: bool, u_has_prior: bool, scale: Optional[Tensor]):
    _check_dtypes(images=images, x=x, g=g, u=u)
    flat = [_flat_rows(t) for t in (images, x, g.contiguous(), u.contiguous())]
    if u_has_prior or any(f is None for f in flat):  # a norm in the discriminator: the reference
        return image_head_backward_reference(images, x, g, u, gamma, pixel_factor, g_has_rec, u_has_prior, scale)
    dec_up, enc_up = kernels.image_head.backward(*flat, gamma, pixel_factor, g_has_rec, scale)
    return dec_up.view(images.shape), enc_up.view(x.shape)
