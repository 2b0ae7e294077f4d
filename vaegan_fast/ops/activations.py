"""The activations of the fused layers: one table, read by every backend.

    name         code  act(a)                                     act'(.) formed from
    identity     0     a                                          (nothing: 1)
    relu         1     max(a, 0)                                  y (y > 0)
    leaky_relu   2     a if a >= 0 else s a                       y when s > 0 (sign of y = sign of a), else a
    tanh         3     tanh(a)                                    y (1 - y^2)
    sigmoid      4     1 / (1 + exp(-a))                          y (y (1 - y))
    gelu         5     0.5 a (1 + tanh(sqrt(2/pi)(a + 0.044715 a^3)))   a (the tanh approximation)

The code is the index in ACTIVATIONS: the C++ kernels (kernels/cpu/linear_act.cpp, enum Act) and the Triton
kernels (ACT_CODES in kernels/triton/linear_act.py) use the same numbers, which tests/test_activations.py checks.
``saves_preactivation`` says when backward needs the pre-activation a rather than the output y.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu")
CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def check_activation(activation: str, negative_slope) -> None:
    if activation not in CODES:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")


def saves_preactivation(activation: str, negative_slope: float) -> bool:
    """Whether backward needs the pre-activation (its derivative cannot be formed from the output)."""
    return activation == "gelu" or (activation == "leaky_relu" and negative_slope <= 0)


def apply_activation(a: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """act(a) in plain PyTorch (the specification)."""
    if activation == "identity":
        return a
    if activation == "relu":
        return torch.relu(a)
    if activation == "leaky_relu":
        return F.leaky_relu(a, negative_slope)
    if activation == "tanh":
        return torch.tanh(a)
    if activation == "sigmoid":
        return torch.sigmoid(a)
    if activation == "gelu":
        return F.gelu(a, approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_backward(dy: torch.Tensor, saved: torch.Tensor, activation: str, negative_slope: float):
    """dy * act'(.) from ``saved`` (y, or the pre-activation where saves_preactivation), with ATen's own
    activation-backward kernels (what eager autograd runs: one pass)."""
    aten = torch.ops.aten
    if activation == "identity":
        return dy
    if activation == "relu":
        return aten.threshold_backward(dy, saved, 0)
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(dy, saved, negative_slope, negative_slope > 0)
    if activation == "tanh":
        return aten.tanh_backward(dy, saved)
    if activation == "sigmoid":
        return aten.sigmoid_backward(dy, saved)
    return aten.gelu_backward(dy, saved, approximate="tanh")
