"""The "triton" backend: the kernels of ``vaegan_fast.kernels`` registered as torch custom ops.

Each kernel launch is wrapped in ``torch.library.custom_op`` with a fake (meta) implementation and, for the
forward ops, ``register_autograd``, so torch.compile traces a model through them without graph breaks and
``torch.library.opcheck`` can check them. The backward passes are custom ops as well (AOT autograd traces
backward with fake tensors too).

Double backward (``create_graph=True``, e.g. a gradient penalty): each backward, when grad mode is on,
computes its result with plain differentiable PyTorch from the saved tensors instead of launching the
kernel, so second derivatives are correct (just not fused).

Autocast (on the inputs' device type): ``linear_act`` runs in the autocast dtype, like ``F.linear``; the
losses and ``reparam_kl`` run in fp32 (their exp/log are on autocast's fp32 list, as in the reference).

Availability: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels were
imported (Triton's interpreter; used by the tests on machines without a GPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._autocast import cast_under_autocast, upcast_under_autocast


def _import_kernels():
    """``vaegan_fast.kernels``; from a source checkout that was not pip-installed, the repo's kernels/."""
    try:
        return importlib.import_module("vaegan_fast.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "vaegan_fast.kernels":
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "kernels")
    spec = importlib.util.spec_from_file_location("vaegan_fast.kernels", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    if spec is None:
        raise ImportError(f"vaegan_fast.kernels is not installed and {folder} has no kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vaegan_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("vaegan_fast.kernels", None)
        raise
    return module


kernels = _import_kernels()
K_REPARAM = kernels.reparam_kl
K_LOSSES = kernels.gan_losses
K_LINEAR = kernels.linear_act

_INTERPRET_AT_IMPORT = kernels.interpreting()


def _availability(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _INTERPRET_AT_IMPORT:
        return None
    return ("Triton kernels run on CUDA tensors, or on CPU tensors only under Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing vaegan_fast)")


_dispatch.set_availability("triton", _availability)


def _check_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in kernels.SUPPORTED_DTYPES:
            raise TypeError(f"backend 'triton' supports {[str(d) for d in kernels.SUPPORTED_DTYPES]}; "
                            f"{name} has dtype {t.dtype}")


# =========================================================================================================
# reparam_kl
# =========================================================================================================
@torch.library.custom_op("vaegan_fast::reparam_kl", mutates_args=())
def reparam_kl_op(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int) -> tuple[Tensor, Tensor]:
    """(z, kl); eps None means drawn in the kernel from seed."""
    return K_REPARAM.reparam_kl_forward(mu, logvar, eps, seed)


@reparam_kl_op.register_fake
def _(mu, logvar, eps, seed):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1])


@torch.library.custom_op("vaegan_fast::reparam_kl_backward", mutates_args=())
def reparam_kl_backward_op(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, dz: Optional[Tensor],
                           dkl: Optional[Tensor], need_deps: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dmu, dlogvar, deps); deps is an empty tensor unless need_deps."""
    dmu, dlv, deps = K_REPARAM.reparam_kl_backward(mu, logvar, eps, seed, dz, dkl, need_deps)
    return dmu, dlv, deps if deps is not None else mu.new_empty((0,))


@reparam_kl_backward_op.register_fake
def _(mu, logvar, eps, seed, dz, dkl, need_deps):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape), mu.new_empty(mu.shape if need_deps else (0,))


def _reparam_setup(ctx, inputs, output):
    mu, logvar, eps, seed = inputs
    ctx.save_for_backward(mu, logvar, eps)
    ctx.seed = seed


def _reparam_backward(ctx, dz, dkl):
    mu, logvar, eps = ctx.saved_tensors
    need_deps = eps is not None and ctx.needs_input_grad[2]
    if torch.is_grad_enabled():
        # create_graph=True: differentiable PyTorch, so second derivatives are right.
        if eps is None:
            eps = reparam_kl_op(torch.zeros_like(mu), torch.zeros_like(logvar), None, ctx.seed)[0]
        std = torch.exp(logvar * 0.5)
        dz = torch.zeros_like(mu) if dz is None else dz
        dkl = torch.zeros_like(mu[:, 0]) if dkl is None else dkl
        dmu = dz + dkl[:, None] * mu
        dlv = 0.5 * dz * std * eps + 0.5 * dkl[:, None] * (torch.exp(logvar) - 1.0)
        return dmu, dlv, (dz * std if need_deps else None), None
    dmu, dlv, deps = reparam_kl_backward_op(mu, logvar, eps, ctx.seed, dz, dkl, need_deps)
    return dmu, dlv, (deps if need_deps else None), None


reparam_kl_op.register_autograd(_reparam_backward, setup_context=_reparam_setup)


@_dispatch.register("reparam_kl", "triton")
def reparam_kl_triton(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[int] = None):
    _check_dtypes(mu=mu, logvar=logvar, eps=eps)
    mu, logvar, eps = upcast_under_autocast(mu, logvar, eps)
    return reparam_kl_op(mu, logvar, eps, 0 if seed is None else int(seed))


reparam_kl_triton.draws_eps_from_seed = True


# =========================================================================================================
# GAN losses: the kernels compute the gradient in forward; backward multiplies it by the incoming one.
# =========================================================================================================
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


def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _softplus_losses(xs, signs, coeffs):
    _check_dtypes(**{f"logits[{i}]": x for i, x in enumerate(xs)})
    xs = list(upcast_under_autocast(*xs))
    return softplus_losses_op(xs, signs, coeffs, _need_grad(*xs))[0]


@_dispatch.register("discriminator_loss", "triton")
def discriminator_loss_triton(real_logits: Tensor, fake_logits: tuple) -> Tensor:
    n = len(fake_logits)
    return _softplus_losses([real_logits, *fake_logits], [-1.0] + [1.0] * n, [1.0] * (n + 1))


@_dispatch.register("generator_loss", "triton")
def generator_loss_triton(fake_logits: tuple, saturating: bool) -> Tensor:
    n = len(fake_logits)
    if saturating:
        return _softplus_losses(list(fake_logits), [1.0] * n, [-1.0] * n)
    return _softplus_losses(list(fake_logits), [-1.0] * n, [1.0] * n)


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


# =========================================================================================================
# linear_act
# =========================================================================================================
@torch.library.custom_op("vaegan_fast::linear_act", mutates_args=())
def linear_act_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float,
                  allow_tf32: bool, save_preact: bool) -> tuple[Tensor, Tensor]:
    """(y, a): y = act(x @ weight.T + bias); a, the pre-activation, is empty unless save_preact."""
    y, a = K_LINEAR.linear_act_forward(x, weight, bias, activation, negative_slope, allow_tf32, save_preact)
    return y, a if a is not None else x.new_empty((0,))


@linear_act_op.register_fake
def _(x, weight, bias, activation, negative_slope, allow_tf32, save_preact):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_preact else (0,))


@torch.library.custom_op("vaegan_fast::linear_act_backward", mutates_args=())
def linear_act_backward_op(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, has_bias: bool, activation: str,
                           negative_slope: float, allow_tf32: bool, need_dx: bool,
                           need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW, db), each an empty tensor when not asked for."""
    dx, dw, db = K_LINEAR.linear_act_backward(dy, x, weight, saved, has_bias, activation, negative_slope,
                                              allow_tf32, need_dx, need_dw)
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty, dw if dw is not None else empty.clone(),
            db if db is not None else empty.clone())


@linear_act_backward_op.register_fake
def _(dy, x, weight, saved, has_bias, activation, negative_slope, allow_tf32, need_dx, need_dw):
    return (x.new_empty(x.shape if need_dx else (0,)), x.new_empty(weight.shape if need_dw else (0,)),
            x.new_empty(weight.shape[:1] if has_bias else (0,)))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation, negative_slope, allow_tf32, save_preact = inputs
    y, a = output
    ctx.activation, ctx.negative_slope, ctx.allow_tf32 = activation, negative_slope, allow_tf32
    ctx.has_bias, ctx.save_preact = bias is not None, save_preact
    ctx.save_for_backward(x, weight, bias, a if save_preact else y)


def _activation_derivative(s: Tensor, x, weight, bias, activation: str, negative_slope: float) -> Tensor:
    """act'(.) in differentiable PyTorch from y (or, for gelu / non-positive slopes, from recomputed a)."""
    if activation in ("gelu",) or (activation == "leaky_relu" and negative_slope <= 0):
        s = torch.nn.functional.linear(x, weight, bias)  # recomputed: gradients must not need `a` itself
    if activation == "relu":
        return (s > 0).to(s.dtype)
    if activation == "leaky_relu":
        return torch.where(s > 0, torch.ones_like(s), torch.full_like(s, negative_slope))
    if activation == "tanh":
        return 1 - s * s
    if activation == "sigmoid":
        return s * (1 - s)
    c, k = 0.7978845608028654, 0.044715
    t = torch.tanh(c * (s + k * s * s * s))
    return 0.5 * (1 + t) + 0.5 * s * (1 - t * t) * c * (1 + 3 * k * s * s)


def _linear_backward(ctx, dy, _da):
    x, weight, bias, saved = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    if torch.is_grad_enabled():
        # create_graph=True: the gradient in differentiable PyTorch (correct second derivatives).
        da = dy
        if ctx.activation != "identity":
            da = dy * _activation_derivative(saved, x, weight, bias, ctx.activation, ctx.negative_slope)
        return (da @ weight if need_dx else None, da.t() @ x if need_dw else None,
                da.sum(0) if need_db else None, None, None, None, None)
    dx, dw, db = linear_act_backward_op(dy, x, weight, saved, ctx.has_bias, ctx.activation, ctx.negative_slope,
                                        ctx.allow_tf32, need_dx, need_dw)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None, None, None)


linear_act_op.register_autograd(_linear_backward, setup_context=_linear_setup)


@_dispatch.register("linear_act", "triton")
def linear_act_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float,
                      allow_tf32: bool = False) -> Tensor:
    _check_dtypes(x=x, weight=weight, bias=bias)
    x, weight, bias = cast_under_autocast(x, weight, bias)  # like F.linear under autocast
    save_preact = K_LINEAR.saves_preact(activation, negative_slope)
    return linear_act_op(x, weight, bias, activation, float(negative_slope), bool(allow_tf32), save_preact)[0]


linear_act_triton.accepts_allow_tf32 = True


# =========================================================================================================
# The dense layer's step primitives (no autograd), for ops/layer/: forward -> (y, what backward needs)
# =========================================================================================================
def dense_forward_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float):
    _check_dtypes(x=x, weight=weight, bias=bias)
    save_preact = K_LINEAR.saves_preact(activation, negative_slope)
    y, a = linear_act_op(x, weight, bias, activation, float(negative_slope), False, save_preact)
    return y, (a if save_preact else y)


def dense_backward_triton(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, has_bias: bool, activation: str,
                          negative_slope: float, need_dx: bool, need_dw: bool):
    want_db = has_bias and need_dw
    dx, dw, db = linear_act_backward_op(dy, x, weight, saved, want_db, activation, float(negative_slope), False,
                                        need_dx, need_dw)
    return dx if need_dx else None, dw if need_dw else None, db if want_db else None


@_dispatch.register("softplus_terms", "triton")
def softplus_terms_triton(xs: list, signs: list, coeffs: list):
    out = softplus_losses_op(xs, signs, coeffs, True)
    return out[0], list(out[1:])


@_dispatch.register("feature_recon_terms", "triton")
def feature_recon_terms_triton(features_real: Tensor, features_fake: Tensor):
    return feature_recon_loss_op(features_real, features_fake, True)


def _flat_rows(t: Tensor) -> Optional[Tensor]:
    """t as a contiguous [rows, features] view, or None (the kernels read rows of contiguous memory)."""
    return t.view(t.shape[0], -1) if t.is_contiguous() else None


@_dispatch.register("image_head_forward", "triton")
def image_head_forward_triton(logits: Tensor, x: Tensor, images: Tensor, with_pixel: bool):
    _check_dtypes(logits=logits, x=x, images=images)
    flat = [_flat_rows(t) for t in (logits, x, images)]
    if any(f is None for f in flat) or logits.shape[0] != 2 * x.shape[0]:
        from .image_head import image_head_forward_reference
        return image_head_forward_reference(logits, x, images, with_pixel)
    return kernels.image_head.forward(*flat, with_pixel)


@_dispatch.register("image_head_backward", "triton")
def image_head_backward_triton(images: Tensor, x: Tensor, g: Tensor, u: Tensor, gamma: float, pixel_factor: float,
                               g_has_rec: bool, u_has_prior: bool, scale: Optional[Tensor]):
    _check_dtypes(images=images, x=x, g=g, u=u)
    flat = [_flat_rows(t) for t in (images, x, g.contiguous(), u.contiguous())]
    if u_has_prior or any(f is None for f in flat):  # a norm in the discriminator: the reference
        from .image_head import image_head_backward_reference
        return image_head_backward_reference(images, x, g, u, gamma, pixel_factor, g_has_rec, u_has_prior, scale)
    dec_up, enc_up = kernels.image_head.backward(*flat, gamma, pixel_factor, g_has_rec, scale)
    return dec_up.view(images.shape), enc_up.view(x.shape)


@_dispatch.register("reparam_kl_forward", "triton")
def reparam_kl_forward_triton(mu: Tensor, logvar: Tensor, eps: Tensor):
    return reparam_kl_op(mu, logvar, eps, 0)


@_dispatch.register("reparam_kl_backward", "triton")
def reparam_kl_backward_triton(mu: Tensor, logvar: Tensor, eps: Tensor, grad_z: Tensor, grad_kl: Tensor):
    return reparam_kl_backward_op(mu, logvar, eps, 0, grad_z, grad_kl, False)[:2]


from .layer import triton as _layer_triton  # noqa: E402,F401  (the fused layer's registrations)
