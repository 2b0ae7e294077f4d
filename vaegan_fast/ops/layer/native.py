"""The fused layer on the native CPU backend (imported by ops/__init__ once _native_lib has loaded the library),
and the native executor of a whole step plan.

Dense layers without a norm run the C++ linear_act kernels (kernels/cpu/linear_act.cpp: the public linear_act
and the step's dense primitives below); every other layer runs kernels/cpu/fused_layer.cpp: the product
through ATen (convolutions channels-last, oneDNN), then bias, batch norm and activation in one pass over the
output, and in backward the activation's derivative and the batch-norm backward in one pass before the input-
and weight-gradient products. Flatten turns channels-last images into channel-first rows (one copy), Unflatten
the reverse (the next conv makes it channels-last).

``plan_step_native`` hands a plan (vaegan_fast/step/plan.py) to kernels/cpu/plan_step.cpp, which makes the
calls below in the same order as the Python executor would: the same bits, without Python between kernels.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import cast_under_autocast
from .._native_lib import _call, _check_dtypes, _ops, _untracked
from ..activations import ACTIVATIONS, CODES, saves_preactivation
from .common import LayerCache, LayerParams, plain_dense
from .reference import layer_act_reference

# ---------------------------------------------------------------------------------------------------------
# linear_act: kernels/cpu/linear_act.cpp
# ---------------------------------------------------------------------------------------------------------
def keeps_preactivation(activation: int, negative_slope: float) -> bool:
    """Whether the forward keeps the pre-activation (its derivative cannot be formed from y)."""
    return saves_preactivation(ACTIVATIONS[activation], negative_slope)


@torch.library.register_fake("vaegan_fast_native::linear_act")
def _(x, weight, bias, activation, negative_slope):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if keeps_preactivation(activation, negative_slope) else (0,))


@torch.library.register_fake("vaegan_fast_native::linear_act_backward")
def _(grad_y, x, weight, saved, saved_is_output, activation, negative_slope, output_mask):
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty(weight.shape if output_mask[1] else (0,)),
            x.new_empty((weight.shape[0],) if output_mask[2] else (0,)))


@_dispatch.register("linear_act", "native")
def linear_act_native(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str,
                      negative_slope: float) -> Tensor:
    if torch.is_autocast_enabled("cpu"):  # in the autocast dtype, like F.linear
        x, weight, bias = cast_under_autocast(x, weight, bias)
    return _call(_ops.linear_act, x, weight, bias, CODES[activation], float(negative_slope))[0]


# The dense layer's step primitives (no autograd): forward -> (y, what backward needs)
def dense_forward_native(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str, negative_slope: float):
    _check_dtypes(x=x, weight=weight, bias=bias)
    index = CODES[activation]
    y, pre = _untracked(_ops.linear_act, x, weight, bias, index, float(negative_slope))
    return y, (pre if keeps_preactivation(index, float(negative_slope)) else y)


def dense_backward_native(dy: Tensor, x: Tensor, weight: Tensor, saved: Tensor, has_bias: bool, activation: str,
                          negative_slope: float, need_dx: bool, need_dw: bool):
    _check_dtypes(dy=dy, x=x, weight=weight, saved=saved)
    index = CODES[activation]
    mask = [bool(need_dx), bool(need_dw), bool(need_dw and has_bias)]
    dx, dw, db = _untracked(_ops.linear_act_backward, dy, x, weight, saved,
                            not keeps_preactivation(index, negative_slope), index, float(negative_slope), mask)
    return (dx if mask[0] else None), (dw if mask[1] else None), (db if mask[2] else None)


# ---------------------------------------------------------------------------------------------------------
# Every layer: kernels/cpu/fused_layer.cpp (dense layers without a norm on linear_act's kernels above)
# ---------------------------------------------------------------------------------------------------------
KIND_CODES = {"dense": 0, "conv2d": 1, "conv_transpose2d": 2, "flatten": 3, "unflatten": 4}


def _none_if_empty(t):
    return t if t is not None and t.numel() > 0 else None


@_dispatch.register("layer_forward", "native")
def layer_forward_native(spec, p, x, groups: int, training: bool):
    n = x.shape[0]
    # flatten and unflatten: channel-first rows, channels-last images (the layouts their neighbours read, and
    # plan_step.cpp's: an elementwise op on the result must see the same layouts to give the same bits)
    if spec.kind == "flatten":
        return x.contiguous().view(n, -1), LayerCache(x, None, None, None, None, training)
    if spec.kind == "unflatten":
        return (x.contiguous().view(n, *spec.out_shape).contiguous(memory_format=torch.channels_last),
                LayerCache(x, None, None, None, None, training))
    if plain_dense(spec):
        y, kept = dense_forward_native(x, p.weight, p.bias, spec.activation, spec.negative_slope)
        return y, LayerCache(x, None, kept, None, None, training)
    y, x_used, pre, kept, mean, rstd = _untracked(
        _ops.fused_layer_forward, x, p.weight, p.bias, p.norm_weight, p.norm_bias, p.running_mean, p.running_var,
        p.num_batches_tracked, KIND_CODES[spec.kind], list(spec.stride or (1, 1)), list(spec.padding or (0, 0)),
        list(spec.output_padding or (0, 0)), spec.norm, training, spec.momentum, spec.eps, groups,
        CODES[spec.activation], spec.negative_slope)
    # Empty outputs stand for aliases (the op's outputs never alias): x_used for x, kept for y.
    return y, LayerCache(x_used if x_used.numel() else x, _none_if_empty(pre), kept if kept.numel() else y,
                         _none_if_empty(mean), _none_if_empty(rstd), training)


@_dispatch.register("layer_backward", "native")
def layer_backward_native(spec, p, cache, dy, r0: int, r1: int, dx_rows: tuple, groups: int, entry_pre_norm: bool,
                          need_dx: bool, need_dw: bool, dy_writable: bool = False):
    """(dx, dW, db, dgamma, dbeta); ``dy_writable``: dy may be overwritten (the training step gives up each
    stream's gradients as it goes; autograd's must stay)."""
    d0, d1 = dx_rows
    if spec.kind == "flatten":
        dx = dy.narrow(0, d0 - r0, d1 - d0).contiguous().view(d1 - d0, *spec.in_shape)
        return dx.contiguous(memory_format=torch.channels_last), None, None, None, None
    if spec.kind == "unflatten":
        return dy.narrow(0, d0 - r0, d1 - d0).contiguous().view(d1 - d0, -1), None, None, None, None
    whole = r0 == 0 and r1 == cache.x.shape[0]
    x = cache.x if whole else cache.x.narrow(0, r0, r1 - r0)
    if plain_dense(spec):
        if (d0, d1) != (r0, r1):
            raise ValueError("a dense layer without a norm forms its input gradient on the rows it runs on")
        kept = cache.kept if whole else cache.kept.narrow(0, r0, r1 - r0)
        dx, dw, db = dense_backward_native(dy, x, p.weight, kept, p.bias is not None, spec.activation,
                                           spec.negative_slope, need_dx, need_dw)
        return dx, dw, db, None, None
    size = cache.x.shape[0] // groups
    g0, ng = r0 // size, (r1 - r0) // size
    if spec.norm and cache.training and not entry_pre_norm and (r0 % size or (r1 - r0) % size or ng < 1):
        raise ValueError(f"a backward through a norm must run on whole groups of {size} rows, got [{r0}, {r1})")
    pre = cache.pre.narrow(0, r0, r1 - r0) if cache.pre is not None else None
    mean = cache.mean.narrow(0, g0, ng) if cache.mean is not None else None
    rstd = cache.rstd.narrow(0, g0, ng) if cache.rstd is not None else None
    out = _untracked(_ops.fused_layer_backward, dy, x, p.weight, p.bias is not None, pre,
                     cache.kept.narrow(0, r0, r1 - r0), mean, rstd, p.norm_weight, KIND_CODES[spec.kind],
                     list(spec.stride or (1, 1)), list(spec.padding or (0, 0)), list(spec.output_padding or (0, 0)),
                     spec.norm, cache.training, ng, CODES[spec.activation], spec.negative_slope,
                     bool(entry_pre_norm), bool(need_dx), bool(need_dw), d0 - r0, d1 - d0, bool(dy_writable))
    return tuple(t if t.numel() > 0 else None for t in out)


@_dispatch.register("layer_act", "native")
def layer_act_native(spec, x, weight, bias, norm, training: bool):
    if plain_dense(spec):
        return linear_act_native(x, weight, bias, spec.activation, spec.negative_slope)
    return FusedLayerFunction.apply(spec, norm, training, x, weight, bias,
                                    *((norm.weight, norm.bias) if norm is not None else (None, None)))


class FusedLayerFunction(torch.autograd.Function):
    """The native fused layer with autograd (the autograd path: Model.losses and your own code)."""

    @staticmethod
    def forward(ctx, spec, norm, training, x, weight, bias, norm_weight, norm_bias):
        p = LayerParams(weight, bias, norm_weight, norm_bias, *((norm.running_mean, norm.running_var, None)
                                                                if norm is not None else (None, None, None)))
        # The norm's state before this call, for a double backward that must see the same statistics.
        ctx.norm_copy = copy.deepcopy(norm) if norm is not None and torch.is_grad_enabled() else None
        y, cache = layer_forward_native(spec, p, x, 1, training)
        ctx.spec, ctx.cache, ctx.params, ctx.training = spec, cache, p, training
        ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        spec, cache, p = ctx.spec, ctx.cache, ctx.params
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference, so second derivatives hold
            x, weight, bias, norm_weight, norm_bias = ctx.saved_tensors
            norm = ctx.norm_copy
            if norm is not None:
                norm = copy.deepcopy(norm)
                norm.weight, norm.bias = norm_weight, norm_bias
            inputs = [t for t in (x, weight, bias, norm_weight, norm_bias)]
            wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[3:]) if t is not None and need]
            y = layer_act_reference(spec, x, weight, bias, norm, ctx.training)
            grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
            return (None, None, None, *[next(grads) if t is not None and need else None
                                        for t, need in zip(inputs, ctx.needs_input_grad[3:])])
        n = cache.x.shape[0]
        dx, dw, db, dgamma, dbeta = layer_backward_native(spec, p, cache, dy, 0, n, (0, n), 1, False,
                                                          ctx.needs_input_grad[3], any(ctx.needs_input_grad[4:]),
                                                          dy_writable=False)
        if dx is not None and dx.shape != ctx.saved_tensors[0].shape:
            dx = dx.reshape(ctx.saved_tensors[0].shape)
        return None, None, None, dx, dw, db, dgamma, dbeta



# ---------------------------------------------------------------------------------------------------------
# The whole plan in one C++ call
# ---------------------------------------------------------------------------------------------------------
def _encode_program(plan) -> tuple:
    from ...step.plan import OP_CODES
    program, floats = [], []
    for ins in plan.instrs:
        program += [OP_CODES[ins.op], len(ins.ins), *ins.ins, len(ins.outs), *ins.outs, len(ins.ints), *ins.ints,
                    len(ins.floats)]
        floats += ins.floats
    return program, floats


def _encode_layers(states: dict) -> tuple:
    tensors, table, floats = [], [], []
    for net in (0, 1, 2):
        state = states[net]
        table.append(len(state.specs))
        for spec, p in zip(state.specs, state.params):
            table += [KIND_CODES[spec.kind], int(spec.bias), int(spec.norm), CODES[spec.activation],
                      *(spec.stride or (1, 1)), *(spec.padding or (0, 0)), *(spec.output_padding or (0, 0)),
                      len(spec.out_shape), *spec.out_shape]
            floats += [spec.negative_slope, spec.eps, spec.momentum]
            tensors += [p.weight, p.bias, p.norm_weight, p.norm_bias, p.running_mean, p.running_var,
                        p.num_batches_tracked]
    return tensors, table, floats


_programs: dict = {}


@_dispatch.register("plan_step", "native")
def plan_step_native(plan, states: dict, inputs: list, master_grads: bool = True) -> tuple:
    """({net index: [grads in parameter order]}, losses) of ``plan`` run by kernels/cpu/plan_step.cpp over the
    networks' states (execute.NetworkState: their tensors in the step's dtype and layout); the gradients in the
    parameters' dtype, or with ``master_grads=False`` in the step's (a bf16 step's for optim.apply_updates)."""
    encoded = _programs.get(id(plan))
    if encoded is None or encoded[0] is not plan:
        encoded = _programs[id(plan)] = (plan, *_encode_program(plan))
    _, program, program_floats = encoded
    tensors, table, layer_floats = _encode_layers(states)
    names = list(plan.outputs)
    out = _untracked(_ops.plan_step, inputs, program, program_floats, tensors, table, layer_floats,
                     list(plan.networks), [plan.outputs[n] for n in names], plan.slots, master_grads)
    grads, at = {}, 0
    for net in plan.networks:
        state = states[net]
        state.grads = []
        for spec in state.specs:
            if not spec.is_product:
                state.grads.append(None)
                continue
            dw = out[at]
            db = out[at + 1] if spec.bias else None
            at += 1 + int(spec.bias)
            norm = tuple(out[at:at + 2]) if spec.norm else (None, None)
            at += 2 * int(spec.norm)
            state.grads.append((dw, db, *norm))
        grads[net] = state.param_grads()
    return grads, dict(zip(names, out[at:]))


# Fake (meta) implementations, for torch.library.opcheck and tracing.
def _conv_out(size, kernel, stride, padding, output_padding, transposed):
    if transposed:
        return (size - 1) * stride - 2 * padding + kernel + output_padding
    return (size + 2 * padding - kernel) // stride + 1


@torch.library.register_fake("vaegan_fast_native::fused_layer_forward")
def _(x, weight, bias, norm_weight, norm_bias, running_mean, running_var, num_batches_tracked, kind, stride, padding,
      output_padding, norm, training, momentum, eps, groups, activation, negative_slope):
    n = x.shape[0]
    if kind == 0:
        y = x.new_empty((n, weight.shape[0]))
        x_used = x.new_empty(x.shape)
    else:
        c_out = weight.shape[0] if kind == 1 else weight.shape[1]
        h, w = (_conv_out(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], output_padding[i], kind == 2)
                for i in range(2))
        y = x.new_empty((n, c_out, h, w)).contiguous(memory_format=torch.channels_last)
        x_used = x.new_empty(x.shape).contiguous(memory_format=torch.channels_last)
    def empty():
        return x.new_empty((0,))
    if kind == 0 or x.is_contiguous(memory_format=torch.channels_last):
        x_used = empty()  # the op reads x itself
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = x.new_empty((groups if training else 1, y.shape[1]), dtype=acc) if norm else empty()
    keep = saves_preactivation(ACTIVATIONS[activation], negative_slope)
    return (y, x_used, torch.empty_like(y) if norm else empty(), torch.empty_like(y) if keep else empty(), stats,
            torch.empty_like(stats))


@torch.library.register_fake("vaegan_fast_native::fused_layer_backward")
def _(dy, x, weight, has_bias, pre, kept, mean, rstd, norm_weight, kind, stride, padding, output_padding, norm,
      training, groups, activation, negative_slope, entry_pre_norm, need_dx, need_dw, dx_start, dx_rows,
      dy_writable):
    def empty():
        return x.new_empty((0,))
    c_out = weight.shape[0] if kind in (0, 1) else weight.shape[1]
    dx = empty()
    if need_dx:
        dx = x.new_empty((dx_rows, *x.shape[1:]))
        if kind != 0:  # a conv's input gradient comes back channels-last
            dx = dx.contiguous(memory_format=torch.channels_last)
    dw = torch.empty_like(weight) if need_dw else empty()
    db = x.new_empty((c_out,)) if need_dw and has_bias else empty()
    norm_grads = need_dw and norm and not entry_pre_norm
    return (dx, dw, db, x.new_empty((c_out,)) if norm_grads else empty(),
            x.new_empty((c_out,)) if norm_grads else empty())
