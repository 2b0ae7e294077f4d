"""Dense layer: matrix product, bias and activation in one op.

    y = act(x @ weight.T + bias)        x [M, K], weight [N, K] (nn.Linear's layout), bias [N] or None

Activations (names accepted by ``activation=``):
    identity     a
    relu         max(a, 0)
    leaky_relu   a if a >= 0 else negative_slope * a
    tanh         tanh(a)
    sigmoid      1 / (1 + exp(-a))
    gelu         0.5 * a * (1 + tanh(sqrt(2/pi) * (a + 0.044715 a^3)))   (the tanh approximation)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _dispatch, _validate
from ._autocast import cast_dtype

OP = "linear_act"
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "gelu")


def apply_activation(a: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """The activations of the table above, in plain PyTorch."""
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


@_dispatch.register(OP, "reference")
def linear_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         activation: str, negative_slope: float) -> torch.Tensor:
    """The specification: x [M, K] -> act(x @ weight.T + bias) [M, N], plain PyTorch."""
    return apply_activation(F.linear(x, weight, bias), activation, negative_slope)


def check_activation(activation: str, negative_slope: float) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope must be a float, got {type(negative_slope).__name__}")


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               activation: str = "relu", *, negative_slope: float = 0.2, allow_tf32: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """``act(x @ weight.T + bias)`` with x [..., in] (leading dims flattened), weight [out, in].

    allow_tf32: let a backend that takes the flag (its implementation has ``accepts_allow_tf32 = True``,
    e.g. "triton") multiply fp32 inputs with TF32 tensor cores; off by default, so fp32 results match eager
    fp32 with TF32 off. Other backends follow torch's global TF32 setting.
    """
    device = _validate.uniform_device(x, weight, bias)
    if device is None:
        _validate.floating_tensor("x", x)
        _validate.floating_tensor("weight", weight)
        if bias is not None:
            _validate.floating_tensor("bias", bias)
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
    _, impl = _dispatch.resolve(OP, backend, device, cast_dtype(x.dtype, device))
    extra = {"allow_tf32": True} if allow_tf32 and getattr(impl, "accepts_allow_tf32", False) else {}
    if x.dim() == 2:  # the common case: no reshapes (each costs a dispatch on a small layer)
        return impl(x, weight, bias, activation, float(negative_slope), **extra)
    y = impl(x.reshape(-1, x.shape[-1]), weight, bias, activation, float(negative_slope), **extra)
    return y.reshape(*x.shape[:-1], weight.shape[0])
