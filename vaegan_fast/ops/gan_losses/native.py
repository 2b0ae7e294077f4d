"""The GAN losses on the native CPU backend: kernels/cpu/gan_losses.cpp (torch.ops.vaegan_fast_native.
softplus_losses, feature_recon_loss, feature_recon_terms, ...; their autograd in C++), with their fake
implementations; imported by ops/__init__ once _native_lib has loaded the library. The kernels compute the
gradient with the loss; backward multiplies it by the incoming one."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import upcast_under_autocast
from .._native_lib import _call, _check_dtypes, _ops, _untracked
from . import _need_grad, discriminator_terms, generator_terms


@torch.library.register_fake("vaegan_fast_native::softplus_losses")
def _(xs, signs, coeffs, need_grad):
    return [xs[0].new_empty(())] + [x.new_empty(x.shape if need_grad else (0,)) for x in xs]


@torch.library.register_fake("vaegan_fast_native::feature_recon_loss")
def _(a, b):
    return a.new_empty(())


@torch.library.register_fake("vaegan_fast_native::feature_recon_terms")
def _(a, b):
    return a.new_empty(()), a.new_empty(a.shape)


@torch.library.register_fake("vaegan_fast_native::feature_recon_loss_backward")
def _(a, b, grad, output_mask):
    return tuple(a.new_empty(a.shape if need else (0,)) for need in output_mask)


@torch.library.register_fake("vaegan_fast_native::scale_grad")
def _(stored, grad, want_negated):
    return stored.new_empty(stored.shape), stored.new_empty(stored.shape if want_negated else (0,))


def _softplus_losses(xs, signs, coeffs) -> Tensor:
    if torch.is_autocast_enabled("cpu"):
        xs = upcast_under_autocast(*xs)
    return _call(_ops.softplus_losses, list(xs), signs, coeffs, _need_grad(*xs))[0]


@_dispatch.register("discriminator_loss", "native")
def discriminator_loss_native(real_logits: Tensor, fake_logits: tuple) -> Tensor:
    return _softplus_losses(*discriminator_terms(real_logits, fake_logits))


@_dispatch.register("generator_loss", "native")
def generator_loss_native(fake_logits: tuple, saturating: bool) -> Tensor:
    return _softplus_losses(*generator_terms(fake_logits, saturating))


@_dispatch.register("feature_recon_loss", "native")
def feature_recon_loss_native(features_real: Tensor, features_fake: Tensor) -> Tensor:
    if torch.is_autocast_enabled("cpu"):
        features_real, features_fake = upcast_under_autocast(features_real, features_fake)
    return _call(_ops.feature_recon_loss, features_real, features_fake)


# The step's loss primitives (value and input gradients in one call, no autograd).
@_dispatch.register("softplus_terms", "native")
def softplus_terms_native(xs: list, signs: list, coeffs: list):
    _check_dtypes(**{f"logits[{i}]": x for i, x in enumerate(xs)})
    out = _untracked(_ops.softplus_losses, xs, signs, coeffs, True)
    return out[0], list(out[1:])


@_dispatch.register("feature_recon_terms", "native")
def feature_recon_terms_native(features_real: Tensor, features_fake: Tensor):
    _check_dtypes(features_real=features_real, features_fake=features_fake)
    return tuple(_untracked(_ops.feature_recon_terms, features_real, features_fake))
