"""The GAN losses on the Triton backend: the kernels of kernels/triton/gan_losses.py as torch custom ops, with
their autograd; imported by ops/__init__ once _triton_lib has loaded the kernels. The kernels compute the
gradient in forward; backward multiplies it by the incoming one."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import upcast_under_autocast
from .._triton_lib import _check_dtypes, kernels
from . import _need_grad, discriminator_terms, generator_terms

K_LOSSES = kernels.gan_losses


@torch.library.custom_op("vaegan_fast::softplus_losses", mutates_args=())
def softplus_losses_op(xs: list[Tensor], signs: list[float], coeffs: list[float],
                       need_grad: bool) -> list[Tensor]:
    """[loss, grad_0, ..., grad_{n-1}]: loss = sum_k coeffs[k] * mean softplus(signs[k] * xs[k]).

    The grads are d loss / d xs[k] (empty tensors when need_grad is False)."""
    loss, grads = K_LOSSES.softplus_losses(xs, signs, coeffs, need_grad)
    return [loss] + [g if g is not None else x.new_empty((0,)) for g, x in zip(grads, xs)]


@softplus_losses_op.register_fake
def _(xs, signs, coeffs, need_grad):
    return [xs[0].new_empty(())] + [x.new_empty(x.shape if need_grad else (0,)) for x in xs]


def _softplus_losses_setup(ctx, inputs, output):
    xs, signs, coeffs, need_grad = inputs
    ctx.signs, ctx.coeffs, ctx.need_grad = signs, coeffs, need_grad
    ctx.save_for_backward(*xs, *output[1:])


def _softplus_losses_backward(ctx, grads):
    g = grads[0]
    saved = ctx.saved_tensors
    n = len(saved) // 2
    xs, stored = saved[:n], saved[n:]
    if torch.is_grad_enabled() or not ctx.need_grad:
        # create_graph=True (or nothing stored): the gradient formula in differentiable PyTorch.
        out = [g * (c * s / x.numel()) * torch.sigmoid(s * x) for x, s, c in zip(xs, ctx.signs, ctx.coeffs)]
    else:
        out = [g * d for d in stored]
    return out, None, None, None


softplus_losses_op.register_autograd(_softplus_losses_backward, setup_context=_softplus_losses_setup)


def _softplus_losses(xs, signs, coeffs):
    _check_dtypes(**{f"logits[{i}]": x for i, x in enumerate(xs)})
    xs = list(upcast_under_autocast(*xs))
    return softplus_losses_op(xs, signs, coeffs, _need_grad(*xs))[0]


@_dispatch.register("discriminator_loss", "triton")
def discriminator_loss_triton(real_logits: Tensor, fake_logits: tuple) -> Tensor:
    return _softplus_losses(*discriminator_terms(real_logits, fake_logits))


@_dispatch.register("generator_loss", "triton")
def generator_loss_triton(fake_logits: tuple, saturating: bool) -> Tensor:
    return _softplus_losses(*generator_terms(fake_logits, saturating))


@torch.library.custom_op("vaegan_fast::feature_recon_loss", mutates_args=())
def feature_recon_loss_op(features_real: Tensor, features_fake: Tensor, need_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss, (real - fake) / N); the second is an empty tensor when need_grad is False."""
    loss, grad = K_LOSSES.feature_recon(features_real, features_fake, need_grad)
    return loss, grad if grad is not None else features_real.new_empty((0,))


@feature_recon_loss_op.register_fake
def _(features_real, features_fake, need_grad):
    return features_real.new_empty(()), features_real.new_empty(features_real.shape if need_grad else (0,))


def _feature_recon_setup(ctx, inputs, output):
    a, b, need_grad = inputs
    ctx.need_grad = need_grad
    ctx.save_for_backward(a, b, output[1])


def _feature_recon_backward(ctx, g, _unused):
    a, b, stored = ctx.saved_tensors
    if torch.is_grad_enabled() or not ctx.need_grad:
        da = g * (a - b) / a.shape[0]
    else:
        da = g * stored
    return (da if ctx.needs_input_grad[0] else None), (-da if ctx.needs_input_grad[1] else None), None


feature_recon_loss_op.register_autograd(_feature_recon_backward, setup_context=_feature_recon_setup)


@_dispatch.register("feature_recon_loss", "triton")
def feature_recon_loss_triton(features_real: Tensor, features_fake: Tensor) -> Tensor:
    _check_dtypes(features_real=features_real, features_fake=features_fake)
    a, b = upcast_under_autocast(features_real, features_fake)
    return feature_recon_loss_op(a, b, _need_grad(a, b))[0]


# The step's loss primitives (no autograd).
@_dispatch.register("softplus_terms", "triton")
def softplus_terms_triton(xs: list, signs: list, coeffs: list):
    out = softplus_losses_op(xs, signs, coeffs, True)
    return out[0], list(out[1:])


@_dispatch.register("feature_recon_terms", "triton")
def feature_recon_terms_triton(features_real: Tensor, features_fake: Tensor):
    return feature_recon_loss_op(features_real, features_fake, True)
