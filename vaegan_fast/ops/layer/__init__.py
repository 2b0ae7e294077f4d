"""The fused layer: a product (dense, conv2d or conv_transpose2d) with its bias, an optional batch norm and an
activation, in one op (math and specification: reference.py; the layer specs: vaegan_fast/nn/spec.py).

Public ops (differentiable):
    linear_act(x, weight, bias, activation)                       dense, no norm (vaegan_fast/ops/linear_act.py)
    conv2d_act(x, weight, bias, activation, stride=, padding=, norm=, training=)
    conv_transpose2d_act(x, weight, bias, activation, stride=, padding=, output_padding=, norm=, training=)
    layer_act(spec, x, weight, bias, norm, training)              any spec (the fused layers' forward)
``norm`` is the layer's nn.BatchNorm (or None): its affine parameters are used and, in training mode, its
running averages updated, as nn.BatchNorm does.

The training step's primitives (no autograd): layer_forward(spec, params, x, groups, training) -> (y, cache)
and layer_backward(spec, params, cache, dy, r0, r1, groups, entry_pre_norm, need_dx, need_dw) ->
(dx, dW, db, dgamma, dbeta); each backend registers its pair.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch, _validate
from .._autocast import cast_dtype
from ..activations import check_activation
from ..linear_act import linear_act
from .common import LayerCache, LayerParams, acc_dtype
from .reference import (layer_act_reference, layer_backward_reference, layer_forward_reference,
                        norm_act_reference, product_reference)

ACT_OP, FORWARD_OP, BACKWARD_OP = "layer_act", "layer_forward", "layer_backward"

_dispatch.register(ACT_OP, "reference")(layer_act_reference)
_dispatch.register(FORWARD_OP, "reference")(layer_forward_reference)
_dispatch.register(BACKWARD_OP, "reference")(layer_backward_reference)


def _check(spec, x, weight, bias, norm) -> torch.device:
    device = _validate.uniform_device(x, weight, bias)
    if device is None:
        _validate.floating_tensor("x", x)
        _validate.floating_tensor("weight", weight)
        if bias is not None:
            _validate.floating_tensor("bias", bias)
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
