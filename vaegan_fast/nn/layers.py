"""Layers built on the fused ops."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import linear_act
from ..ops.linear_act import check_activation


class FusedLinear(nn.Linear):
    """``act(x @ weight.T + bias)`` through ``vaegan_fast.ops.linear_act``.

    A drop-in for ``nn.Linear`` followed by an activation: same parameters, same initialisation, same
    state_dict keys, so an nn.Linear's weights load unchanged (``FusedLinear.from_linear``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "identity",
                 negative_slope: float = 0.2, backend: str = "auto", device=None, dtype=None):
        check_activation(activation, negative_slope)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "identity", negative_slope: float = 0.2,
                    backend: str = "auto") -> "FusedLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    activation=activation, negative_slope=negative_slope, backend=backend,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_state_dict(linear.state_dict())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_act(x, self.weight, self.bias, self.activation, negative_slope=self.negative_slope,
                          backend=self.backend)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation}{slope}, backend={self.backend}"


class MLP(nn.Module):
    """A stack of FusedLinear layers: ``sizes[0] -> ... -> sizes[-1]``.

    Hidden layers use ``activation``; the last layer uses ``output_activation``. ``forward_hidden`` also
    returns the output of one hidden layer (after its activation), which is how the discriminator exposes
    its features.
    """

    def __init__(self, sizes: Sequence[int], activation: str = "leaky_relu", output_activation: str = "identity",
                 negative_slope: float = 0.2, backend: str = "auto"):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s <= 0 for s in sizes):
            raise ValueError(f"sizes must list at least two positive layer widths, got {sizes}")
        self.layers = nn.ModuleList(
            FusedLinear(n_in, n_out, activation=activation if i < len(sizes) - 2 else output_activation,
                        negative_slope=negative_slope, backend=backend)
            for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])))

    @property
    def num_hidden(self) -> int:
        return len(self.layers) - 1

    def set_backend(self, backend: str) -> None:
        for layer in self.layers:
            layer.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_hidden(self, x: torch.Tensor, hidden_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(output, hidden)`` where hidden is the output of hidden layer ``hidden_index``."""
        if self.num_hidden == 0:
            raise ValueError("this MLP has no hidden layer to take features from")
        index = _hidden_index(hidden_index, self.num_hidden)
        hidden: Optional[torch.Tensor] = None
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == index:
                hidden = x
        return x, hidden


def _hidden_index(index: int, count: int) -> int:
    if not -count <= index < count:
        raise ValueError(f"feature_layer must index one of the {count} hidden layers "
                         f"(from {-count} to {count - 1}), got {index}")
    return index % count
