"""The fused layer on the Triton backend (imported by ops/__init__ once _triton_lib has loaded the kernels).

Dense layers without a norm run kernels/triton/linear_act.py (the public linear_act as torch custom ops, with
their autograd, and the step's dense primitives); every other layer (conv2d, conv_transpose2d, and any layer
with a batch norm: dense ones as 1x1 convolutions) runs kernels/triton/conv.py: ``layer_tensors_forward`` and
``layer_tensors_backward`` below compose its kernels, the step's primitives call them directly and the
differentiable ``layer_act`` through two custom ops. The running averages are updated outside the ops (they are
the module's state), by the reference's ``update_running``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import cast_under_autocast
from .._triton_lib import _check_dtypes, kernels
from ..activations import saves_preactivation
from .common import LayerCache, acc_dtype, plain_dense
from .reference import layer_act_reference, update_running

K_LINEAR = kernels.linear_act
K_CONV = kernels.conv


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
# Every other layer: kernels/triton/conv.py
# ---------------------------------------------------------------------------------------------------------
def _geometry(spec):
    """(transposed, weight dims (j, c), kernel, stride, padding) of a layer's product as a convolution."""
    if spec.kind == "dense":
        return False, (0, 1), (1, 1), (1, 1), (0, 0)
    transposed = spec.kind == "conv_transpose2d"
    return transposed, ((1, 0) if transposed else (0, 1)), tuple(spec.kernel), tuple(spec.stride), \
        tuple(spec.padding)


def _image(spec, t: Tensor) -> Tensor:
    """t as the [N, C, H, W] image the kernels read (a dense layer's rows as 1x1 images: a view)."""
    return t[:, :, None, None] if spec.kind == "dense" else t


def _unimage(spec, t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or spec.kind != "dense" else t[:, :, 0, 0]


def _from_rows(rows: Tensor, like: Tensor) -> Tensor:
    """[N H W, C] rows as the channels-last [N, C, H, W] tensor they are (a view)."""
    n, c, h, w = like.shape
    return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)


def _weight4(spec, weight: Tensor) -> Tensor:
    return weight[:, :, None, None] if spec.kind == "dense" else weight


def layer_tensors_forward(spec, x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                          beta: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                          groups: int, training: bool):
    """(y, a, kept, mean, rstd, var) of one layer (a, the pre-norm, and the statistics None without a norm;
    var None in eval mode). kept is what act' is formed from: y, or the pre-activation (a, or h with a norm)."""
    transposed, jc, _, stride, padding = _geometry(spec)
    x4, w4 = _image(spec, x), _weight4(spec, weight)
    out_hw = tuple(spec.out_shape[1:]) if spec.kind != "dense" else (1, 1)
    act, slope = spec.activation, spec.negative_slope
    keep_pre = saves_preactivation(act, slope)
    mean = rstd = var = a = None
    if not spec.norm:
        y, pre, _ = K_CONV.conv(x4, w4, bias, transposed, jc, out_hw, stride, padding, act, slope, save_pre=keep_pre)
        kept = pre if keep_pre else y
    elif training:
        _, a, _ = K_CONV.conv(x4, w4, bias, transposed, jc, out_hw, stride, padding, write_y=False, save_pre=True)
        rows = K_CONV.rows_of(a)
        mean, var, rstd = K_CONV.channel_moments(rows, groups, spec.eps)
        y_rows, h_rows = K_CONV.norm_act(rows, mean, rstd, gamma, beta, act, slope, keep_pre)
        y = _from_rows(y_rows, a)
        kept = _from_rows(h_rows, a) if keep_pre else y
    else:
        acc = acc_dtype(x.dtype)
        mean = running_mean.to(acc, copy=True)[None]
        rstd = torch.rsqrt(running_var.to(acc) + spec.eps)[None]
        y, a, h = K_CONV.conv(x4, w4, bias, transposed, jc, out_hw, stride, padding, act, slope,
                              norm=(mean[0], rstd[0], gamma, beta), save_pre=True, save_h=keep_pre)
        kept = h if keep_pre else y
    return _unimage(spec, y), _unimage(spec, a), _unimage(spec, kept), mean, rstd, var


def layer_tensors_backward(spec, x: Tensor, weight: Tensor, has_bias: bool, gamma: Optional[Tensor],
                           a: Optional[Tensor], kept: Optional[Tensor], mean: Optional[Tensor],
                           rstd: Optional[Tensor], training: bool, dy: Tensor, dx_rows: tuple, entry_pre_norm: bool,
                           need_dx: bool, need_dw: bool):
    """(dx, dW, db, dgamma, dbeta) from dy on the rows of x (each None when not asked for or not there); the
    statistics are those of the groups these rows make up (one row of each per group); dx on the rows
    ``dx_rows`` = (d0, d1) of them."""
    transposed, jc, kernel, stride, padding = _geometry(spec)
    x4, w4 = _image(spec, x), _weight4(spec, weight)
    dy4 = _image(spec, dy)
    act, slope = spec.activation, spec.negative_slope
    dy_rows = K_CONV.rows_of(dy4)
    dgamma = dbeta = None
    if entry_pre_norm:
        da_rows = dy_rows
    elif spec.norm:
        a_rows = K_CONV.rows_of(_image(spec, a))
        kept_rows = K_CONV.rows_of(_image(spec, kept)) if act != "identity" else None
        sums, totals = K_CONV.grad_sums(dy_rows, kept_rows, a_rows, mean, rstd, mean.shape[0], act, slope)
        da_rows = K_CONV.norm_backward(dy_rows, kept_rows, a_rows, mean, rstd, gamma, sums, 2 if training else 1,
                                       act, slope)
        if need_dw:
            dbeta, dgamma = totals[0].to(dy.dtype, copy=True), totals[1].to(dy.dtype, copy=True)
    elif act != "identity":
        kept_rows = K_CONV.rows_of(_image(spec, kept))
        da_rows = K_CONV.norm_backward(dy_rows, kept_rows, None, None, None, None, None, 0, act, slope)
    else:
        da_rows = dy_rows
    da4 = _from_rows(da_rows, dy4)
    dx = dw = db = None
    if need_dx:
        d0, d1 = dx_rows
        in_hw = tuple(spec.in_shape[1:]) if spec.kind != "dense" else (1, 1)
        dx = _unimage(spec, K_CONV.conv(da4[d0:d1], w4, None, not transposed, jc[::-1], in_hw, stride, padding)[0])
    if need_dw:
        s, t = (x4, da4) if transposed else (da4, x4)
        dw = K_CONV.weight_grad(s, t, kernel, stride, padding, x.dtype)
        dw = dw[:, :, 0, 0] if spec.kind == "dense" else dw
        if has_bias:
            db = K_CONV.grad_sums(da_rows, None, None, None, None, 1, "identity", 0.0)[1][0].to(dy.dtype, copy=True)
    return dx, dw, db, dgamma, dbeta


@dataclass
class _Norm:
    """A batch norm's tensors as the reference's norm_act and update_running read them (num_batches_tracked is
    the module's business here)."""
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1e-5
    momentum: float = 0.0
    num_batches_tracked: Optional[Tensor] = None


def _count(spec, rows: int) -> int:
    """Values per channel and group a norm reduces over: rows x output positions."""
    return rows * math.prod(spec.out_shape[1:])


@_dispatch.register("layer_forward", "triton")
def layer_forward_triton(spec, p, x, groups: int, training: bool):
    if spec.kind in ("flatten", "unflatten"):
        return x.reshape(x.shape[0], *spec.out_shape), LayerCache(x, None, None, None, None, training)
    if plain_dense(spec):
        y, kept = dense_forward_triton(x, p.weight, p.bias, spec.activation, spec.negative_slope)
        return y, LayerCache(x, None, kept, None, None, training)
    _check_dtypes(x=x, weight=p.weight, bias=p.bias)
    y, a, kept, mean, rstd, var = layer_tensors_forward(spec, x, p.weight, p.bias, p.norm_weight, p.norm_bias,
                                                        p.running_mean, p.running_var, groups, training)
    if spec.norm and training:
        update_running(p, spec, mean, var, _count(spec, x.shape[0] // groups))
    return y, LayerCache(x, a, kept, mean, rstd, training)


@_dispatch.register("layer_backward", "triton")
def layer_backward_triton(spec, p, cache, dy, r0: int, r1: int, dx_rows: tuple, groups: int, entry_pre_norm: bool,
                          need_dx: bool, need_dw: bool, dy_writable: bool = False):
    d0, d1 = dx_rows
    if spec.kind in ("flatten", "unflatten"):
        return dy[d0 - r0:d1 - r0].reshape(d1 - d0, *spec.in_shape), None, None, None, None
    if plain_dense(spec) and tuple(dx_rows) == (r0, r1):
        x, kept = cache.x[r0:r1], cache.kept[r0:r1]
        dx, dw, db = dense_backward_triton(dy, x, p.weight, kept, p.bias is not None, spec.activation,
                                           spec.negative_slope, need_dx, need_dw)
        return dx, dw, db, None, None
    mean, rstd = cache.mean, cache.rstd
    if spec.norm and cache.training:
        size = cache.x.shape[0] // groups
        mean, rstd = mean[r0 // size:r1 // size], rstd[r0 // size:r1 // size]
    rows = lambda t: None if t is None else t[r0:r1]  # noqa: E731
    dx, dw, db, dgamma, dbeta = layer_tensors_backward(
        spec, cache.x[r0:r1], p.weight, p.bias is not None, p.norm_weight, rows(cache.pre), rows(cache.kept), mean,
        rstd, cache.training, dy, (d0 - r0, d1 - r0), entry_pre_norm, need_dx, need_dw)
    return dx, dw, db, (dgamma if need_dw else None), (dbeta if need_dw else None)


# The differentiable layer: two custom ops, the layer's static configuration as plain arguments.
def _spec_args(spec) -> tuple:
    return (spec.kind, list(spec.in_shape), list(spec.out_shape), list(spec.kernel), list(spec.stride),
            list(spec.padding), list(spec.output_padding), bool(spec.bias), bool(spec.norm), float(spec.eps),
            spec.activation, float(spec.negative_slope))


def _spec(kind, in_shape, out_shape, kernel, stride, padding, output_padding, bias, norm, eps, activation, slope):
    from ...nn.spec import LayerSpec
    return LayerSpec(kind, tuple(in_shape), tuple(out_shape), tuple(kernel), tuple(stride), tuple(padding),
                     tuple(output_padding), bias=bias, norm=norm, eps=eps, activation=activation,
                     negative_slope=slope)


def _empty_like_out(spec, x: Tensor) -> Tensor:
    n = x.shape[0]
    if spec.kind == "dense":
        return x.new_empty((n, spec.out_shape[0]))
    return torch.empty((n, *spec.out_shape), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


@torch.library.custom_op("vaegan_fast::fused_layer", mutates_args=())
def fused_layer_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], gamma: Optional[Tensor],
                   beta: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   kind: str, in_shape: list[int], out_shape: list[int], kernel: list[int], stride: list[int],
                   padding: list[int], output_padding: list[int], has_bias: bool, norm: bool, eps: float,
                   activation: str, negative_slope: float,
                   training: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, a, kept, mean, rstd, var) of layer_tensors_forward, each missing one an empty tensor."""
    spec = _spec(kind, in_shape, out_shape, kernel, stride, padding, output_padding, has_bias, norm, eps,
                 activation, negative_slope)
    outs = layer_tensors_forward(spec, x, weight, bias, gamma, beta, running_mean, running_var, 1, training)
    empty = x.new_empty((0,))
    # Outputs must not alias each other or the inputs (custom-op rule): kept may be y itself.
    y, a, kept, mean, rstd, var = outs
    kept = kept.clone() if kept.data_ptr() == y.data_ptr() else kept
    return tuple(t if t is not None else empty.clone() for t in (y, a, kept, mean, rstd, var))


@fused_layer_op.register_fake
def _(x, weight, bias, gamma, beta, running_mean, running_var, kind, in_shape, out_shape, kernel, stride, padding,
      output_padding, has_bias, norm, eps, activation, negative_slope, training):
    spec = _spec(kind, in_shape, out_shape, kernel, stride, padding, output_padding, has_bias, norm, eps,
                 activation, negative_slope)
    out = _empty_like_out(spec, x)
    stat = x.new_empty((1, out_shape[0]), dtype=acc_dtype(x.dtype)) if norm else x.new_empty((0,))
    return (out, _empty_like_out(spec, x) if norm else x.new_empty((0,)), _empty_like_out(spec, x), stat,
            stat.clone(), stat.clone() if norm and training else x.new_empty((0,)))


@torch.library.custom_op("vaegan_fast::fused_layer_backward", mutates_args=())
def fused_layer_backward_op(dy: Tensor, x: Tensor, weight: Tensor, gamma: Optional[Tensor], a: Tensor, kept: Tensor,
                            mean: Tensor, rstd: Tensor, kind: str, in_shape: list[int], out_shape: list[int],
                            kernel: list[int], stride: list[int], padding: list[int], output_padding: list[int],
                            has_bias: bool, norm: bool, eps: float, activation: str, negative_slope: float,
                            training: bool, need_dx: bool, need_dw: bool) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                   Tensor]:
    """(dx, dW, db, dgamma, dbeta) of layer_tensors_backward, each missing one an empty tensor."""
    spec = _spec(kind, in_shape, out_shape, kernel, stride, padding, output_padding, has_bias, norm, eps,
                 activation, negative_slope)
    some = lambda t: t if t.numel() else None  # noqa: E731
    outs = layer_tensors_backward(spec, x, weight, has_bias, gamma, some(a), some(kept), some(mean), some(rstd),
                                  training, dy, (0, x.shape[0]), False, need_dx, need_dw)
    return tuple(t if t is not None else x.new_empty((0,)) for t in outs)


@fused_layer_backward_op.register_fake
def _(dy, x, weight, gamma, a, kept, mean, rstd, kind, in_shape, out_shape, kernel, stride, padding,
      output_padding, has_bias, norm, eps, activation, negative_slope, training, need_dx, need_dw):
    dx = (x.new_empty(x.shape) if kind == "dense" else torch.empty(
        x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)) if need_dx else x.new_empty((0,))
    channels = out_shape[0]
    return (dx, x.new_empty(weight.shape) if need_dw else x.new_empty((0,)),
            x.new_empty((channels,)) if need_dw and has_bias else x.new_empty((0,)),
            x.new_empty((channels,)) if need_dw and norm else x.new_empty((0,)),
            x.new_empty((channels,)) if need_dw and norm else x.new_empty((0,)))


def _fused_setup(ctx, inputs, output):
    x, weight, bias, gamma, beta, running_mean, running_var, *static = inputs
    ctx.static = static
    if static[-1]:  # training: the statistics are the batch's, and the running averages move after this call
        running_mean = running_var = None
    ctx.save_for_backward(x, weight, bias, gamma, beta, running_mean, running_var, *output[1:5])


def _fused_backward(ctx, dy, *_):
    x, weight, bias, gamma, beta, running_mean, running_var, a, kept, mean, rstd = ctx.saved_tensors
    spec_args, training = ctx.static[:-1], ctx.static[-1]
    spec = _spec(*spec_args)
    need = ctx.needs_input_grad
    nones = [None] * (2 + len(ctx.static))
    if torch.is_grad_enabled():
        # create_graph=True: the gradient through differentiable PyTorch (correct second derivatives).
        # The saved tensors themselves (not detached copies), so the result stays a function of the inputs.
        ins = (x, weight, bias, gamma, beta)
        wanted = [t is not None and n and t.requires_grad for t, n in zip(ins, need[:5])]
        norm = None
        if spec.norm:  # the reference's norm; in training mode on scratch running averages (it moves them)
            stats = (running_mean, running_var) if not training else (torch.zeros_like(mean[0]),
                                                                      torch.ones_like(mean[0]))
            norm = _Norm(*stats, weight=gamma, bias=beta, eps=spec.eps)
        y = layer_act_reference(spec, x, weight, bias, norm, training)
        grads = iter(torch.autograd.grad(y, [t for t, w in zip(ins, wanted) if w], dy, create_graph=True,
                                         allow_unused=True, materialize_grads=True))
        return (*[next(grads) if w else None for w in wanted], *nones)
    need_dw = any(need[1:5])
    dx, dw, db, dgamma, dbeta = fused_layer_backward_op(dy, x, weight, gamma, a, kept, mean, rstd, *spec_args,
                                                        training, bool(need[0]), need_dw)
    some = lambda t, n: t if n and t.numel() else None  # noqa: E731
    return (some(dx, need[0]), some(dw, need[1]), some(db, need[2]), some(dgamma, need[3]), some(dbeta, need[4]),
            *nones)


fused_layer_op.register_autograd(_fused_backward, setup_context=_fused_setup)


@_dispatch.register("layer_act", "triton")
def layer_act_triton(spec, x, weight, bias, norm, training: bool):
    if plain_dense(spec):
        return linear_act_triton(x, weight, bias, spec.activation, spec.negative_slope)
    x, weight, bias = cast_under_autocast(x, weight, bias)  # like F.conv2d under autocast
    _check_dtypes(x=x, weight=weight, bias=bias)
    args = (norm.weight, norm.bias, norm.running_mean, norm.running_var) if norm is not None else (None,) * 4
    y, _, _, mean, _, var = fused_layer_op(x, weight, bias, *args, *_spec_args(spec), bool(training))
    if norm is not None and training:
        with torch.no_grad():
            update_running(_Norm(norm.running_mean, norm.running_var), spec, mean, var,
                           _count(spec, x.shape[0]))
    return y
