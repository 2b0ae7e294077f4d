"""The image head on the native CPU backend: kernels/cpu/image_head.cpp (torch.ops.vaegan_fast_native.
image_head_forward and image_head_backward), with their fake implementations; imported by ops/__init__ once
_native_lib has loaded the library."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._native_lib import _check_dtypes, _ops, _untracked
from .reference import image_head_backward_reference


@torch.library.register_fake("vaegan_fast_native::image_head_forward")
def _(logits, x, images, with_pixel):
    return logits.new_empty((), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("vaegan_fast_native::image_head_backward")
def _(images, x, g, u, gamma, pixel_factor, g_has_rec, u_has_prior):
    return torch.empty_like(images), torch.empty_like(x)


@_dispatch.register("image_head_forward", "native")
def image_head_forward_native(logits: Tensor, x: Tensor, images: Tensor, with_pixel: bool):
    _check_dtypes(logits=logits, x=x, images=images)
    pixel = _untracked(_ops.image_head_forward, logits, x, images, with_pixel)
    return pixel if with_pixel else None


@_dispatch.register("image_head_backward", "native")
def image_head_backward_native(images: Tensor, x: Tensor, g: Tensor, u: Tensor, gamma: float, pixel_factor: float,
                               g_has_rec: bool, u_has_prior: bool, scale: Optional[Tensor]):
    _check_dtypes(images=images, x=x, g=g, u=u)
    if scale is not None:  # fp16's loss scale: the native kernels take no fp16, so this is never the fast path
        return image_head_backward_reference(images, x, g, u, gamma, pixel_factor, g_has_rec, u_has_prior, scale)
    return tuple(_untracked(_ops.image_head_backward, images, x, g, u, gamma, pixel_factor, g_has_rec,
                            u_has_prior))
