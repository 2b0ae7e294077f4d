"""The fused layer on the native CPU backend (imported by ops/_native.py once its library has loaded).

Dense layers without a norm run the C++ linear_act kernels (kernels/cpu/linear_act.cpp); every other layer
runs kernels/cpu/fused_layer.cpp: the product through ATen (convolutions channels-last, oneDNN), then bias,
batch norm and activation in one pass over the output, and in backward the activation's derivative and the
batch-norm backward in one pass before the input- and weight-gradient products.
"""
from __future__ import annotations

from .. import _dispatch
from .common import LayerCache
from .reference import layer_act_reference, layer_backward_reference, layer_forward_reference


def _plain_dense(spec) -> bool:
    return spec.kind == "dense" and not spec.norm


@_dispatch.register("layer_forward", "native")
def layer_forward_native(spec, p, x, groups: int, training: bool):
    if _plain_dense(spec):
        from .._native import dense_forward_native
        y, kept = dense_forward_native(x, p.weight, p.bias, spec.activation, spec.negative_slope)
        return y, LayerCache(x, None, kept, None, None, training)
    return layer_forward_reference(spec, p, x, groups, training)


@_dispatch.register("layer_backward", "native")
def layer_backward_native(spec, p, cache, dy, r0: int, r1: int, groups: int, entry_pre_norm: bool, need_dx: bool,
                          need_dw: bool):
    if _plain_dense(spec):
        from .._native import dense_backward_native
        whole = r0 == 0 and r1 == cache.x.shape[0]
        x, kept = (cache.x, cache.kept) if whole else (cache.x[r0:r1], cache.kept[r0:r1])
        dx, dw, db = dense_backward_native(dy, x, p.weight, kept, p.bias is not None, spec.activation,
                                           spec.negative_slope, need_dx, need_dw)
        return dx, dw, db, None, None
    return layer_backward_reference(spec, p, cache, dy, r0, r1, groups, entry_pre_norm, need_dx, need_dw)




@_dispatch.register("layer_act", "native")
def layer_act_native(spec, x, weight, bias, norm, training: bool):
    if _plain_dense(spec):
        from .._native import linear_act_native
        return linear_act_native(x, weight, bias, spec.activation, spec.negative_slope)
    return layer_act_reference(spec, x, weight, bias, norm, training)
