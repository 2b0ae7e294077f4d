"""The "native" backend: the C++ CPU kernels of ``kernels/cpu/`` registered as torch ops.

The library ``vaegan_fast/_native/libvaegan_fast_native*.so`` is built by the top-level CMakeLists.txt when
the package is installed (``pip install --no-build-isolation -e .``; setup.py drives CMake). It defines the
ops ``torch.ops.vaegan_fast_native.*`` (schemas in kernels/cpu/library.cpp) with CPU kernels and their
autograd formulas in C++ (torch::autograd::Function registered at the Autograd key, in the same .cpp files,
so no Python runs between the call and the kernel); this module adds their fake (meta) implementations
with ``torch.library``. ``torch.library.opcheck`` and torch.compile see ordinary
custom ops. This module registers one implementation per op with the dispatcher under "native".

Importing this module raises ImportError when the library is missing or fails to load; ``ops/__init__``
records the reason, so ``backend="native"`` says how to build it and ``backend="auto"`` falls back to the
reference (with one warning).

dtypes: float32, bfloat16 (computed in fp32), float64 (for gradcheck). float16 is refused with a TypeError, and
``backend="auto"`` passes float16 work to another backend.
Double backward (``create_graph=True``): each C++ backward, when grad mode is on, computes its result with
differentiable ATen ops from the saved tensors instead of calling the kernel.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._autocast import cast_under_autocast, upcast_under_autocast
from .linear_act import ACTIVATIONS

BUILD_HINT = "build it with `pip install --no-build-isolation -e .`"
LIB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_native")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def find_library(folder: str = LIB_DIR) -> str:
    """The path of the built library in ``folder``; ImportError (with the way to build it) when absent."""
    found = sorted(glob.glob(os.path.join(folder, "*vaegan_fast_native*.so")))
    if not found:
        raise ImportError(f"the native CPU library is not built (no *vaegan_fast_native*.so in {folder})")
    return found[0]


def load_library(folder: str = LIB_DIR) -> None:
    path = find_library(folder)
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        raise ImportError(f"the native CPU library {path} failed to load: {exc}") from exc


load_library()


class _Ops:
    """The library's ops as the C++ callables behind their OpOverloads: calling those directly skips the
    overload packet's Python dispatch and the OpOverload's own Python frame (microseconds a call, which is
    most of the cost of an op on a small tensor). ``_op`` is torch's attribute for that callable (torch 2.0
    to 2.13 at least); without it the OpOverload itself is used."""

    def __getattr__(self, name):
        overload = getattr(torch.ops.vaegan_fast_native, name).default
        op = getattr(overload, "_op", overload)
        setattr(self, name, op)
        return op


_ops = _Ops()


def _availability(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "the native backend runs on CPU tensors only"


_dispatch.set_availability("native", _availability)
_dispatch.set_dtypes("native", SUPPORTED_DTYPES)


def _check_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend 'native' supports float32, bfloat16 and float64 on the CPU; {name} has "
                            f"dtype {t.dtype} (float16 is not supported on the CPU: use bfloat16 or float32)")


# =========================================================================================================
# reparam_kl
# =========================================================================================================
@torch.library.register_fake("vaegan_fast_native::reparam_kl")
def _(mu, logvar, eps):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1])


@torch.library.register_fake("vaegan_fast_native::reparam_kl_backward")
def _(mu, logvar, eps, grad_z, grad_kl, need_grad_eps):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape), mu.new_empty(mu.shape if need_grad_eps else (0,))


@_dispatch.register("reparam_kl", "native")
def reparam_kl_native(mu: Tensor, logvar: Tensor, eps: Tensor):
    if torch.is_autocast_enabled("cpu"):
        mu, logvar, eps = upcast_under_autocast(mu, logvar, eps)
    return _call(_ops.reparam_kl, mu, logvar, eps)


# =========================================================================================================
# GAN losses: the kernels compute the gradient with the loss; backward multiplies it by the incoming one.
# =========================================================================================================
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


def _call(op, *args):
    """``op(*args)`` with CPU autocast off: the kernels' own ATen calls (BLAS products) must not be recast by an
    enclosing autocast. The public ops below cast their inputs themselves under autocast (upcast_under_autocast
    for the losses and reparam+KL, cast_under_autocast for linear_act) and otherwise do nothing but this call:
    on a small tensor each context, cast, check or Python frame had been a visible share of the op. Entering an
    autocast context costs microseconds, so it is done only when needed. The dtypes need no check here:
    resolve() passed only those this backend takes, and the C++ ops check them again, naming the argument."""
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return op(*args)
    return op(*args)


def _untracked(op, *args):
    """``op(*args)`` without recording autograd history (the step's primitives form their gradients
    themselves); the step already runs under no_grad, so the context is entered only when needed."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return op(*args)
    return op(*args)


def _need_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _softplus_losses(xs, signs, coeffs) -> Tensor:
    if torch.is_autocast_enabled("cpu"):
        xs = upcast_under_autocast(*xs)
    return _call(_ops.softplus_losses, list(xs), signs, coeffs, _need_grad(*xs))[0]


@_dispatch.register("discriminator_loss", "native")
def discriminator_loss_native(real_logits: Tensor, fake_logits: tuple) -> Tensor:
    n = len(fake_logits)
    return _softplus_losses([real_logits, *fake_logits], [-1.0] + [1.0] * n, [1.0] * (n + 1))


@_dispatch.register("generator_loss", "native")
def generator_loss_native(fake_logits: tuple, saturating: bool) -> Tensor:
    n = len(fake_logits)
    if saturating:
        return _softplus_losses(fake_logits, [1.0] * n, [-1.0] * n)
    return _softplus_losses(fake_logits, [-1.0] * n, [1.0] * n)


@_dispatch.register("feature_recon_loss", "native")
def feature_recon_loss_native(features_real: Tensor, features_fake: Tensor) -> Tensor:
    if torch.is_autocast_enabled("cpu"):
        features_real, features_fake = upcast_under_autocast(features_real, features_fake)
    return _call(_ops.feature_recon_loss, features_real, features_fake)


# =========================================================================================================
# linear_act
# =========================================================================================================
def keeps_preactivation(activation: int, negative_slope: float) -> bool:
    """Whether the forward keeps the pre-activation (its derivative cannot be formed from y)."""
    return ACTIVATIONS[activation] == "gelu" or (ACTIVATIONS[activation] == "leaky_relu" and negative_slope <= 0)


@torch.library.register_fake("vaegan_fast_native::linear_act")
def _(x, weight, bias, activation, negative_slope):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if keeps_preactivation(activation, negative_slope) else (0,))


@torch.library.register_fake("vaegan_fast_native::linear_act_backward")
def _(grad_y, x, weight, saved, saved_is_output, activation, negative_slope, output_mask):
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty(weight.shape if output_mask[1] else (0,)),
            x.new_empty((weight.shape[0],) if output_mask[2] else (0,)))


_ACTIVATION_INDEX = {name: i for i, name in enumerate(ACTIVATIONS)}


@_dispatch.register("linear_act", "native")
def linear_act_native(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                      negative_slope: float) -> Tensor:
    if torch.is_autocast_enabled("cpu"):  # in the autocast dtype, like F.linear
        x, weight, bias = cast_under_autocast(x, weight, bias)
    return _call(_ops.linear_act, x, weight, bias, _ACTIVATION_INDEX[activation], float(negative_slope))[0]


# =========================================================================================================
# The dense layer's step primitives (no autograd), for ops/layer/: forward -> (y, what backward needs)
# =========================================================================================================
def dense_forward_native(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float):
    _check_dtypes(x=x, weight=weight, bias=bias)
    index = _ACTIVATION_INDEX[activation]
    y, pre = _untracked(_ops.linear_act, x, weight, bias, index, float(negative_slope))
    return y, (pre if keeps_preactivation(index, float(negative_slope)) else y)


def dense_backward_native(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, has_bias: bool, activation: str,
                          negative_slope: float, need_dx: bool, need_dw: bool):
    _check_dtypes(dy=dy, x=x, weight=weight, saved=saved)
    index = _ACTIVATION_INDEX[activation]
    mask = [bool(need_dx), bool(need_dw), bool(need_dw and has_bias)]
    dx, dw, db = _untracked(_ops.linear_act_backward, dy, x, weight, saved,
                            not keeps_preactivation(index, negative_slope), index, float(negative_slope), mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None)


# =========================================================================================================
# The step's loss and reparameterization primitives (value and input gradients in one call, no autograd)
# =========================================================================================================
@_dispatch.register("softplus_terms", "native")
def softplus_terms_native(xs: list, signs: list, coeffs: list):
    _check_dtypes(**{f"logits[{i}]": x for i, x in enumerate(xs)})
    out = _untracked(_ops.softplus_losses, xs, signs, coeffs, True)
    return out[0], list(out[1:])


@_dispatch.register("feature_recon_terms", "native")
def feature_recon_terms_native(features_real: Tensor, features_fake: Tensor):
    _check_dtypes(features_real=features_real, features_fake=features_fake)
    return tuple(_untracked(_ops.feature_recon_terms, features_real, features_fake))


@_dispatch.register("reparam_kl_forward", "native")
def reparam_kl_forward_native(mu: Tensor, logvar: Tensor, eps: Tensor):
    _check_dtypes(mu=mu, logvar=logvar, eps=eps)
    return tuple(_untracked(_ops.reparam_kl, mu, logvar, eps))


@_dispatch.register("reparam_kl_backward", "native")
def reparam_kl_backward_native(mu: Tensor, logvar: Tensor, eps: Tensor, grad_z: Tensor, grad_kl: Tensor):
    return tuple(_untracked(_ops.reparam_kl_backward, mu, logvar, eps, grad_z, grad_kl, False)[:2])


# =========================================================================================================
# The step's image head (ops/image_head.py): sigmoid + pixel term forward, the gradient through the sigmoid
# =========================================================================================================
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
        from .image_head import image_head_backward_reference
        return image_head_backward_reference(images, x, g, u, gamma, pixel_factor, g_has_rec, u_has_prior, scale)
    return tuple(_untracked(_ops.image_head_backward, images, x, g, u, gamma, pixel_factor, g_has_rec,
                            u_has_prior))


from .layer import native as _layer_native  # noqa: E402,F401  (the fused layer and the plan executor)
