"""Layer-level primitives of the dense layer for the explicit training step (vaegan_fast/step.py).

    dense_forward(x, W, b, act)  -> (y, saved)        y = act(x @ W^T + b); saved = what backward needs
    dense_backward(dy, x, W, saved, has_bias, act, need_dx, need_dw) -> (dx, dW, db)
        da = dy * act'(saved);  dx = da @ W  (if need_dx);  dW = da^T @ x,  db = sum_rows da  (if need_dw)

No autograd: the step calls these directly, forming each gradient product only where a loss needs it,
through the chains below (a network's forward, or one backward stream, as one call).
``saved`` is the output y, from which relu, leaky_relu (positive slope), tanh and sigmoid derive their
derivative, or the pre-activation for gelu and non-positive leaky slopes (``saves_preactivation``). Each
backend registers its pair; the reference below is the specification.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch
from .linear_act import apply_activation

FORWARD_OP, BACKWARD_OP = "dense_forward", "dense_backward"


def saves_preactivation(activation: str, negative_slope: float) -> bool:
    """Whether backward needs the pre-activation (else the output suffices)."""
    return activation == "gelu" or (activation == "leaky_relu" and negative_slope <= 0)


@_dispatch.register(FORWARD_OP, "reference")
def dense_forward_reference(x, weight, bias, activation: str, negative_slope: float):
    a = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y = apply_activation(a, activation, negative_slope)
    return y, (a if saves_preactivation(activation, negative_slope) else y)


def _activation_backward(dy, saved, activation: str, negative_slope: float):
    """dy * act'(.) with ATen's own activation-backward kernels (what eager autograd runs: one pass)."""
    aten = torch.ops.aten
    if activation == "identity":
        return dy
    if activation == "relu":
        return aten.threshold_backward(dy, saved, 0)
    if activation == "leaky_relu":
        if negative_slope > 0:  # saved is y, whose sign is the pre-activation's
            return aten.leaky_relu_backward(dy, saved, negative_slope, True)
        return aten.leaky_relu_backward(dy, saved, negative_slope, False)
    if activation == "tanh":
        return aten.tanh_backward(dy, saved)
    if activation == "sigmoid":
        return aten.sigmoid_backward(dy, saved)
    return aten.gelu_backward(dy, saved, approximate="tanh")


@_dispatch.register(BACKWARD_OP, "reference")
def dense_backward_reference(dy, x, weight, saved, has_bias: bool, activation: str, negative_slope: float,
                             need_dx: bool, need_dw: bool):
    da = _activation_backward(dy, saved, activation, negative_slope)
    dx = da @ weight if need_dx else None
    dw = da.t() @ x if need_dw else None
    db = da.sum(0) if need_dw and has_bias else None
    return dx, dw, db


# ---------------------------------------------------------------------------------------------------------
# Chains: a network's forward, or one backward stream through its layers, as one primitive. ``layers`` are
# objects with weight, bias, activation and negative_slope (vaegan_fast/step.py's _Layer).
#   chain_forward(layers, x) -> (y, cache)      cache[i] = (input of layer i, what its backward needs)
#   chain_backward(layers, cache, dy, rows, weight_grads, input_grad) -> (dx or None, [(dW, db)] or None)
#       dy enters at the last of ``layers`` and goes down to layer 0, on ``rows`` (a slice) of the cached
#       tensors; dx is the gradient at layer 0's input (when input_grad), db None for a layer without bias.
# The loop below, over a backend's layer pair, is the specification; a backend may register its own chain
# (the native one runs the loop in C++: one op call per stream instead of one per layer).
# ---------------------------------------------------------------------------------------------------------
CHAIN_FORWARD_OP, CHAIN_BACKWARD_OP = "dense_chain_forward", "dense_chain_backward"


def chain_of(dense_forward, dense_backward) -> tuple:
    """(chain_forward, chain_backward) looping over a backend's layer pair."""
    def chain_forward(layers: list, x: torch.Tensor) -> tuple:
        cache = []
        for layer in layers:
            y, saved = dense_forward(x, layer.weight, layer.bias, layer.activation, layer.negative_slope)
            cache.append((x, saved))
            x = y
        return x, cache

    def chain_backward(layers: list, cache: list, dy: torch.Tensor, rows: slice, weight_grads: bool,
                       input_grad: bool) -> tuple:
        grads = [None] * len(layers) if weight_grads else None
        whole = rows.start in (None, 0) and rows.stop is None  # all rows: the tensors, not views of them
        for i in range(len(layers) - 1, -1, -1):
            layer = layers[i]
            x, saved = cache[i]
            if not whole:
                x, saved = x[rows], saved[rows]
            dx, dw, db = dense_backward(dy, x, layer.weight, saved, layer.bias is not None, layer.activation,
                                        layer.negative_slope, i > 0 or input_grad, weight_grads)
            if weight_grads:
                grads[i] = (dw, db)
            dy = dx
        return (dy if input_grad else None), grads

    return chain_forward, chain_backward


_chains: dict = {}


def dense_chain_impls(backend: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """The (chain_forward, chain_backward) of the backend that runs the dense layers for this device and
    dtype: its own chain when it registered one, else the loop over its layer pair."""
    name, forward = _dispatch.resolve(FORWARD_OP, backend, device, dtype)
    own = _dispatch.implementation(CHAIN_FORWARD_OP, name), _dispatch.implementation(CHAIN_BACKWARD_OP, name)
    if None not in own:
        return own
    backward = _dispatch.resolve(BACKWARD_OP, name, device, dtype)[1]
    if (forward, backward) not in _chains:
        _chains[(forward, backward)] = chain_of(forward, backward)
    return _chains[(forward, backward)]
