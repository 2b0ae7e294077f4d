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
reference (reference.py) is the specification; the native CPU backend (native.py: kernels/cpu/image_head.cpp)
and the Triton backend (triton.py: kernels/triton/image_head.py) do each in one pass. Tests:
tests/test_image_head.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch
from . import reference
from .reference import image_head_backward_reference, image_head_forward_reference, loss_dtype_of

FORWARD_OP, BACKWARD_OP = "image_head_forward", "image_head_backward"

_dispatch.register(FORWARD_OP, "reference")(image_head_forward_reference)
_dispatch.register(BACKWARD_OP, "reference")(image_head_backward_reference)


def image_head_forward(logits, x, images, with_pixel: bool, backend: str = "auto"):
    _, impl = _dispatch.resolve(FORWARD_OP, backend, logits.device, logits.dtype)
    return impl(logits, x, images, bool(with_pixel))


def image_head_backward(images, x, g, u, gamma: float, pixel_factor: float, g_has_rec: bool, u_has_prior: bool,
                        scale: Optional[torch.Tensor] = None, backend: str = "auto"):
    _, impl = _dispatch.resolve(BACKWARD_OP, backend, images.device, images.dtype)
    return impl(images, x, g, u, float(gamma), float(pixel_factor), bool(g_has_rec), bool(u_has_prior), scale)
