"""Layer-level primitives of the dense layer for the explicit training step (vaegan_fast/step.py).

    dense_forward(x, W, b, act)  -> (y, saved)        y = act(x @ W^T + b); saved = what backward needs
    dense_backward(dy, x, W, saved, has_bias, act, need_dx, need_dw) -> (dx, dW, db)
        da = dy * act'(saved);  dx = da @ W  (if need_dx);  dW = da^T @ x,  db = sum_rows da  (if need_dw)

No autograd: the step calls these directly, forming each gradient product only where a loss needs it; it
resolves the backend's pair once per step (``dense_impls``), since it runs them for every layer.
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


def dense_impls(backend: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """The backend's (dense_forward, dense_backward) implementations, called with the arguments above."""
    return (_dispatch.resolve(FORWARD_OP, backend, device, dtype)[1],
            _dispatch.resolve(BACKWARD_OP, backend, device, dtype)[1])
