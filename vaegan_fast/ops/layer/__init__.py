"""The fused layer: a product (dense, conv2d or conv_transpose2d) with its bias, an optional batch norm and an
activation, in one op:

    y = act(norm(product(x) + bias))      dense: x @ W^T, x [M, K], W [N, K] (nn.Linear's layout), bias [N];
                                          conv2d / conv_transpose2d: F.conv2d / F.conv_transpose2d (nn's layouts)

(the norm and the step's primitives in full: reference.py, the specification; the activations:
vaegan_fast/ops/activations.py; the layer specs: vaegan_fast/nn/spec.py).

Public ops (differentiable):
    linear_act(x, weight, bias, activation)                       dense, no norm, x [..., K] (leading dims flattened)
    conv2d_act(x, weight, bias, activation, stride=, padding=, norm=, training=)
    conv_transpose2d_act(x, weight, bias, activation, stride=, padding=, output_padding=, norm=, training=)
    layer_act(spec, x, weight, bias, norm, training)              any spec (the fused layers' forward)
``norm`` is the layer's nn.BatchNorm (or None): its affine parameters are used and, in training mode, its
running averages updated, as nn.BatchNorm does.

The training step's primitives (no autograd): layer_forward(spec, params, x, groups, training) -> (y, cache)
and layer_backward(spec, params, cache, dy, r0, r1, groups, entry_pre_norm, need_dx, need_dw) ->
(dx, dW, db, dgamma, dbeta); each backend registers its pair.

Implementations: reference.py; native.py (kernels/cpu/linear_act.cpp for dense layers without a norm,
kernels/cpu/fused_layer.cpp for the others, kernels/cpu/plan_step.cpp for a whole step plan); triton.py
(kernels/triton/linear_act.py for dense layers without a norm, kernels/triton/conv.py for the others). Tests:
tests/test_layer.py, tests/test_ops_reference.py, tests/test_native_ops.py, tests/test_triton_linear_act.py,
tests/test_triton_conv.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch, _validate
from .._autocast import cast_dtype
from ..activations import check_activation
from . import reference
from .common import LayerCache, LayerParams, acc_dtype
from .reference import (layer_act_reference, layer_backward_reference, layer_forward_reference,
                        linear_act_reference, norm_act_reference, product_reference)

LINEAR_ACT_OP = "linear_act"
ACT_OP, FORWARD_OP, BACKWARD_OP = "layer_act", "layer_forward", "layer_backward"

_dispatch.register(LINEAR_ACT_OP, "reference")(linear_act_reference)
_dispatch.register(ACT_OP, "reference")(layer_act_reference)
_dispatch.register(FORWARD_OP, "reference")(layer_forward_reference)
_dispatch.register(BACKWARD_OP, "reference")(layer_backward_reference)


def _floating_inputs(x, weight, bias) -> Optional[torch.device]:
    """The inputs' device when they agree (uniform_device), else None once each is checked to be a floating
    tensor (their devices and dtypes are the caller's to check next)."""
    device = _validate.uniform_device(x, weight, bias)
    if device is None:
        _validate.floating_tensor("x", x)
        _validate.floating_tensor("weight", weight)
        if bias is not None:
            _validate.floating_tensor("bias", bias)
    return device


def _check(spec, x, weight, bias, norm) -> torch.device:
    device = _floating_inputs(x, weight, bias)
    if device is None:
        device = _validate.same_device(x=x, weight=weight, bias=bias)
        _validate.same_dtype(x=x, weight=weight, bias=bias)
    want = (x.shape[0], *spec.in_shape)
    if tuple(x.shape) != want or x.shape[0] == 0:
        raise ValueError(f"x must be [N, {', '.join(map(str, spec.in_shape))}] with N >= 1, got {tuple(x.shape)}")
    if norm is not None:
        if norm.num_features != spec.out_shape[0]:
            raise ValueError(f"norm has {norm.num_features} features, the layer gives {spec.out_shape[0]} channels")
        if norm.running_mean is None or norm.weight is None:
            raise ValueError("norm must have running statistics and affine parameters (nn.BatchNorm's defaults)")
        if norm.weight.device != device:
            raise ValueError(f"norm is on {norm.weight.device} but x is on {device}")
    return device


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               activation: str = "relu", *, negative_slope: float = 0.2, allow_tf32: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """``act(x @ weight.T + bias)`` with x [..., in] (leading dims flattened), weight [out, in].

    allow_tf32: let a backend that takes the flag (its implementation has ``accepts_allow_tf32 = True``,
    e.g. "triton") multiply fp32 inputs with TF32 tensor cores; off by default, so fp32 results match eager
    fp32 with TF32 off. Other backends follow torch's global TF32 setting.
    """
    device = _floating_inputs(x, weight, bias)
    check_activation(activation, negative_slope)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., in_features], got a 0-dim tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but weight expects "
                         f"{weight.shape[1]} (weight shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if x.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"x and weight must not be empty, got shapes {tuple(x.shape)} and {tuple(weight.shape)}")
    if device is None:
        device = _validate.same_device(x=x, weight=weight, bias=bias)
        _validate.same_dtype(x=x, weight=weight, bias=bias)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    _, impl = _dispatch.resolve(LINEAR_ACT_OP, backend, device, cast_dtype(x.dtype, device))
    extra = {"allow_tf32": True} if allow_tf32 and getattr(impl, "accepts_allow_tf32", False) else {}
    if x.dim() == 2:  # the common case: no reshapes (each costs a dispatch on a small layer)
        return impl(x, weight, bias, activation, float(negative_slope), **extra)
    y = impl(x.reshape(-1, x.shape[-1]), weight, bias, activation, float(negative_slope), **extra)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def layer_act(spec, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], norm=None,
              training: bool = True, *, backend: str = "auto") -> torch.Tensor:
    """``act(norm(product(x) + bias))`` for a LayerSpec (vaegan_fast/nn/spec.py)."""
    device = _check(spec, x, weight, bias, norm)
    _, impl = _dispatch.resolve(ACT_OP, backend, device, cast_dtype(x.dtype, device))
    return impl(spec, x, weight, bias, norm, bool(training))


def _conv_spec(kind, x, weight, bias, activation, stride, padding, output_padding, negative_slope, norm):
    from ...nn.spec import LayerSpec, conv_out_size, conv_transpose_out_size, pair
    check_activation(activation, negative_slope)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [N, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor, got {getattr(weight, 'shape', type(weight).__name__)}")
    stride, padding, output_padding = pair("stride", stride), pair("padding", padding), pair("output_padding",
                                                                                                output_padding)
    kernel = tuple(weight.shape[2:])
    c, h, w = x.shape[1:]
    if kind == "conv2d":
        c_in, c_out = weight.shape[1], weight.shape[0]
        out = (c_out, conv_out_size(h, kernel[0], stride[0], padding[0]),
               conv_out_size(w, kernel[1], stride[1], padding[1]))
    else:
        c_in, c_out = weight.shape[0], weight.shape[1]
        out = (c_out, conv_transpose_out_size(h, kernel[0], stride[0], padding[0], output_padding[0]),
               conv_transpose_out_size(w, kernel[1], stride[1], padding[1], output_padding[1]))
    if c != c_in:
        raise ValueError(f"x has {c} channels but weight {tuple(weight.shape)} expects {c_in}")
    if min(stride) < 1 or min(out[1:]) < 1:
        raise ValueError(f"no output for {h}x{w} inputs with kernel {kernel}, stride {stride}, padding {padding}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c_out,)):
        raise ValueError(f"bias must have shape ({c_out},), got {getattr(bias, 'shape', bias)}")
    extra = dict(norm=True, eps=float(norm.eps), momentum=float(norm.momentum)) if norm is not None else {}
    return LayerSpec(kind, (c, h, w), out, kernel=kernel, stride=stride, padding=padding,
                     output_padding=output_padding, bias=bias is not None, activation=activation,
                     negative_slope=float(negative_slope), **extra)


def conv2d_act(x, weight, bias=None, activation: str = "identity", *, stride=1, padding=0,
               negative_slope: float = 0.2, norm=None, training: bool = True, backend: str = "auto"):
    """``act(norm(conv2d(x, weight, stride, padding) + bias))``, x [N, C, H, W], weight [C_out, C, kh, kw]."""
    spec = _conv_spec("conv2d", x, weight, bias, activation, stride, padding, 0, negative_slope, norm)
    return layer_act(spec, x, weight, bias, norm, training, backend=backend)


def conv_transpose2d_act(x, weight, bias=None, activation: str = "identity", *, stride=1, padding=0,
                         output_padding=0, negative_slope: float = 0.2, norm=None, training: bool = True,
                         backend: str = "auto"):
    """``act(norm(conv_transpose2d(x, weight, ...) + bias))``, weight [C, C_out, kh, kw] (nn's layout)."""
    spec = _conv_spec("conv_transpose2d", x, weight, bias, activation, stride, padding, output_padding,
                      negative_slope, norm)
    return layer_act(spec, x, weight, bias, norm, training, backend=backend)


def product_bias(layer, x: torch.Tensor) -> torch.Tensor:
    """A fused layer's product + bias alone (a tap before its norm), differentiable, through its backend."""
    from dataclasses import replace
    spec = replace(layer.spec_for(x), norm=False, activation="identity")
    return layer_act(spec, x, layer.weight, layer.bias, None, layer.training, backend=layer.backend)


def norm_act(layer, a: torch.Tensor) -> torch.Tensor:
    """The rest of a fused layer after ``product_bias``, as in the reference (the autograd path's tap)."""
    if layer.norm is not None and layer.training:
        layer.norm.num_batches_tracked.add_(1)
    return norm_act_reference(layer, a, layer.norm, layer.training)  # reads its activation and slope


def layer_impls(backend: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """(name, layer_forward, layer_backward) of the backend that runs the step's layers here."""
    name, forward = _dispatch.resolve(FORWARD_OP, backend, device, dtype)
    return name, forward, _dispatch.resolve(BACKWARD_OP, name, device, dtype)[1]


__all__ = ["LayerCache", "LayerParams", "acc_dtype", "conv2d_act", "conv_transpose2d_act", "layer_act",
           "layer_impls", "linear_act", "product_bias", "norm_act", "product_reference"]
