"""The fused layer on the Triton backend (imported by ops/_triton.py once the kernels have loaded).

Dense layers without a norm run kernels/linear_act.py; conv layers and norms run on the reference path until
the Triton conv kernels exist (vaegan_fast.backend_info() says which layers do).
"""
from __future__ import annotations

from .. import _dispatch
from .common import LayerCache
from .reference import layer_act_reference, layer_backward_reference, layer_forward_reference


def _plain_dense(spec) -> bool:
    return spec.kind == "dense" and not spec.norm


@_dispatch.register("layer_forward", "triton")
def layer_forward_triton(spec, p, x, groups: int, training: bool):
    if _plain_dense(spec):
        from .._triton import dense_forward_triton
        y, kept = dense_forward_triton(x, p.weight, p.bias, spec.activation, spec.negative_slope)
        return y, LayerCache(x, None, kept, None, None, training)
    return layer_forward_reference(spec, p, x, groups, training)


@_dispatch.register("layer_backward", "triton")
def layer_backward_triton(spec, p, cache, dy, r0: int, r1: int, dx_rows: tuple, groups: int, entry_pre_norm: bool,
                          need_dx: bool, need_dw: bool, dy_writable: bool = False):
    if _plain_dense(spec) and tuple(dx_rows) == (r0, r1):
        from .._triton import dense_backward_triton
        x, kept = cache.x[r0:r1], cache.kept[r0:r1]
        dx, dw, db = dense_backward_triton(dy, x, p.weight, kept, p.bias is not None, spec.activation,
                                           spec.negative_slope, need_dx, need_dw)
        return dx, dw, db, None, None
    return layer_backward_reference(spec, p, cache, dy, r0, r1, dx_rows, groups, entry_pre_norm, need_dx, need_dw)


@_dispatch.register("layer_act", "triton")
def layer_act_triton(spec, x, weight, bias, norm, training: bool):
    if _plain_dense(spec):
        from .._triton import linear_act_triton
        return linear_act_triton(x, weight, bias, spec.activation, spec.negative_slope)
    return layer_act_reference(spec, x, weight, bias, norm, training)
