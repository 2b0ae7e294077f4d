"""The fused layer on the Triton backend (imported by ops/__init__ once _triton_lib has loaded the kernels).

Dense layers without a norm run kernels/triton/linear_act.py (the public linear_act as torch custom ops, with
their autograd, and the step's dense primitives); conv layers and norms run on the reference path until the
Triton conv kernels exist (vaegan_fast.backend_info() says which layers do).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import cast_under_autocast
from .._triton_lib import _check_dtypes, kernels
from .common import LayerCache, plain_dense
from .reference import layer_act_reference, layer_backward_reference, layer_forward_reference

K_LINEAR = kernels.linear_act


# ---------------------------------------------------------------------------------------------------------
# linear_act: kernels/triton/linear_act.py
# ---------------------------------------------------------------------------------------------------------
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


# The dense layer's step primitives (no autograd): forward -> (y, what backward needs)
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


# ---------------------------------------------------------------------------------------------------------
# Every layer: dense layers without a norm on the kernels above, the others on the reference
# ---------------------------------------------------------------------------------------------------------
ON_REFERENCE = "conv2d, conv_transpose2d and batch-norm layers (no Triton conv kernels yet)"
_warned: set = set()


def _on_reference(spec) -> None:
    """Says once per layer kind that the triton backend runs it on the reference path."""
    kind = spec.kind + (" + batch norm" if spec.norm else "")
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"backend 'triton' runs {kind} layers on the reference path (PyTorch ops): "
                      f"{ON_REFERENCE}; see vaegan_fast.backend_info()", RuntimeWarning, stacklevel=3)


@_dispatch.register("layer_forward", "triton")
def layer_forward_triton(spec, p, x, groups: int, training: bool):
    if plain_dense(spec):
        y, kept = dense_forward_triton(x, p.weight, p.bias, spec.activation, spec.negative_slope)
        return y, LayerCache(x, None, kept, None, None, training)
    _on_reference(spec)
    return layer_forward_reference(spec, p, x, groups, training)


@_dispatch.register("layer_backward", "triton")
def layer_backward_triton(spec, p, cache, dy, r0: int, r1: int, dx_rows: tuple, groups: int, entry_pre_norm: bool,
                          need_dx: bool, need_dw: bool, dy_writable: bool = False):
    if plain_dense(spec) and tuple(dx_rows) == (r0, r1):
        x, kept = cache.x[r0:r1], cache.kept[r0:r1]
        dx, dw, db = dense_backward_triton(dy, x, p.weight, kept, p.bias is not None, spec.activation,
                                           spec.negative_slope, need_dx, need_dw)
        return dx, dw, db, None, None
    return layer_backward_reference(spec, p, cache, dy, r0, r1, dx_rows, groups, entry_pre_norm, need_dx, need_dw)


@_dispatch.register("layer_act", "triton")
def layer_act_triton(spec, x, weight, bias, norm, training: bool):
    if plain_dense(spec):
        return linear_act_triton(x, weight, bias, spec.activation, spec.negative_slope)
    _on_reference(spec)
    return layer_act_reference(spec, x, weight, bias, norm, training)
