"""The VAE-GAN's losses on discriminator logits and features.

With the stable softplus(t) = max(t, 0) + log(1 + exp(-|t|)):

    discriminator_loss(r, f_1..f_n) = mean softplus(-r) + sum_i mean softplus(f_i)
    generator_loss(f_1..f_n)        = sum_i mean softplus(-f_i)          (non-saturating)
                                    = -sum_i mean softplus(f_i)          (saturating, the paper's form)
    feature_recon_loss(a, b)        = mean_over_rows 0.5 * sum_k (a_k - b_k)^2

Each mean is over all elements of its own tensor, so logits of any shape ([N] or [N, 1]) and of different
sizes can be combined. A feature tensor is [N, ...]: everything after the batch dimension is a feature.

Implementations: reference.py (plain PyTorch, the specification), native.py (kernels/cpu/gan_losses.cpp),
triton.py (kernels/triton/gan_losses.py). Tests: tests/test_ops_reference.py, tests/test_native_ops.py,
tests/test_triton_gan_losses.py.
"""
from __future__ import annotations

import torch

from .. import _dispatch, _validate
from .._autocast import upcast_dtype
from . import reference
from .reference import (discriminator_loss_reference, feature_recon_loss_reference, feature_recon_terms_reference,
                        generator_loss_reference, softplus, softplus_terms_reference)

DISCRIMINATOR_OP = "discriminator_loss"
GENERATOR_OP = "generator_loss"
FEATURE_RECON_OP = "feature_recon_loss"

_dispatch.register(DISCRIMINATOR_OP, "reference")(discriminator_loss_reference)
_dispatch.register(GENERATOR_OP, "reference")(generator_loss_reference)
_dispatch.register(FEATURE_RECON_OP, "reference")(feature_recon_loss_reference)


def _check_logits(names_and_tensors) -> torch.device:
    device = _validate.uniform_device(*(t for _, t in names_and_tensors))
    for name, t in names_and_tensors:
        if device is None:
            _validate.floating_tensor(name, t)
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if device is None:
        tensors = dict(names_and_tensors)
        device = _validate.same_device(**tensors)
        _validate.same_dtype(**tensors)
    return device


def discriminator_loss(real_logits: torch.Tensor, *fake_logits: torch.Tensor, backend: str = "auto"):
    """``mean softplus(-real) + sum over fakes of mean softplus(fake)``: a 0-dim tensor."""
    if not fake_logits:
        raise ValueError("discriminator_loss needs at least one fake_logits tensor after real_logits")
    named = [("real_logits", real_logits)] + [(f"fake_logits[{i}]", f) for i, f in enumerate(fake_logits)]
    device = _check_logits(named)
    _, impl = _dispatch.resolve(DISCRIMINATOR_OP, backend, device, upcast_dtype(real_logits.dtype, device))
    return impl(real_logits, tuple(fake_logits))


def generator_loss(*fake_logits: torch.Tensor, saturating: bool = False, backend: str = "auto"):
    """Non-saturating ``sum mean softplus(-fake)``, or saturating ``-sum mean softplus(fake)``."""
    if not fake_logits:
        raise ValueError("generator_loss needs at least one fake_logits tensor")
    if not isinstance(saturating, bool):
        raise TypeError(f"saturating must be a bool, got {type(saturating).__name__}")
    device = _check_logits([(f"fake_logits[{i}]", f) for i, f in enumerate(fake_logits)])
    _, impl = _dispatch.resolve(GENERATOR_OP, backend, device, upcast_dtype(fake_logits[0].dtype, device))
    return impl(tuple(fake_logits), saturating)


def feature_recon_loss(features_real: torch.Tensor, features_fake: torch.Tensor, *, backend: str = "auto"):
    """``0.5 * sum over features of (real - fake)^2``, averaged over the batch: a 0-dim tensor."""
    device = _validate.uniform_device(features_real, features_fake)
    if device is None:
        _validate.floating_tensor("features_real", features_real)
        _validate.floating_tensor("features_fake", features_fake)
    if features_real.shape != features_fake.shape:
        raise ValueError(f"features_fake must have the shape of features_real {tuple(features_real.shape)}, "
                         f"got {tuple(features_fake.shape)}")
    _validate.nonempty_batch("features_real", features_real)
    if device is None:
        device = _validate.same_device(features_real=features_real, features_fake=features_fake)
        _validate.same_dtype(features_real=features_real, features_fake=features_fake)
    _, impl = _dispatch.resolve(FEATURE_RECON_OP, backend, device, upcast_dtype(features_real.dtype, device))
    return impl(features_real, features_fake)


def discriminator_terms(real_logits: torch.Tensor, fake_logits: tuple):
    """discriminator_loss as sum_k c_k mean softplus(s_k x_k): (xs, signs, coeffs), the fused kernels' form."""
    n = len(fake_logits)
    return [real_logits, *fake_logits], [-1.0] + [1.0] * n, [1.0] * (n + 1)


def generator_terms(fake_logits: tuple, saturating: bool):
    """generator_loss as sum_k c_k mean softplus(s_k x_k): (xs, signs, coeffs), the fused kernels' form."""
    n = len(fake_logits)
    if saturating:
        return list(fake_logits), [1.0] * n, [-1.0] * n
    return list(fake_logits), [-1.0] * n, [1.0] * n


def _need_grad(*tensors) -> bool:
    """Whether autograd will ask for the inputs' gradients (the native and Triton kernels then form them with
    the loss, in forward)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------------------
# Loss primitives of the explicit training step (vaegan_fast/step/): the value and the gradient with
# respect to the inputs in one call, no autograd. Each backend registers its fused kernel for them.
# ---------------------------------------------------------------------------------------------------------
SOFTPLUS_TERMS_OP, FEATURE_RECON_TERMS_OP = "softplus_terms", "feature_recon_terms"

_dispatch.register(SOFTPLUS_TERMS_OP, "reference")(softplus_terms_reference)
_dispatch.register(FEATURE_RECON_TERMS_OP, "reference")(feature_recon_terms_reference)


def softplus_terms(xs: list, signs: list, coeffs: list, backend: str):
    _, impl = _dispatch.resolve(SOFTPLUS_TERMS_OP, backend, xs[0].device, xs[0].dtype)
    return impl(list(xs), [float(s) for s in signs], [float(c) for c in coeffs])


def feature_recon_terms(features_real: torch.Tensor, features_fake: torch.Tensor, backend: str):
    _, impl = _dispatch.resolve(FEATURE_RECON_TERMS_OP, backend, features_real.device, features_real.dtype)
    return impl(features_real, features_fake)
