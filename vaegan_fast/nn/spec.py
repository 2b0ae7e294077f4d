"""Layer specs: what the planner and the executors know of a layer (its static configuration).

A fused layer is    y = act(norm(product(x) + bias))
    product  dense (x @ W^T), conv2d, or conv_transpose2d (the input-gradient of a conv2d)
    norm     none, or batch norm over each group of rows (and the spatial positions): in training mode it
             uses the group's own statistics, which couples the rows of a group; in eval mode the running
             averages
    act      one of vaegan_fast.ops.activations.ACTIVATIONS
plus two layout layers, flatten ([C, H, W] -> [C*H*W], channel-first) and unflatten (the reverse). Shapes are
per sample: (features,) for dense layers, (C, H, W) for convolutions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import math

KINDS = ("dense", "conv2d", "conv_transpose2d", "flatten", "unflatten")
PRODUCTS = ("dense", "conv2d", "conv_transpose2d")
# Where a tap (the discriminator's feature layer) reads a layer: its output, or its product + bias before
# the norm (Larsen et al.'s code takes the fourth conv's features before their batch norm).
TAP_POINTS = ("output", "pre_norm")


@dataclass(frozen=True)
class LayerSpec:
    kind: str
    in_shape: tuple
    out_shape: tuple
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    output_padding: tuple = ()
    bias: bool = False
    norm: bool = False  # batch norm after the product
    eps: float = 1e-5
    momentum: float = 0.1
    activation: str = "identity"
    negative_slope: float = 0.2

    @property
    def is_product(self) -> bool:
        return self.kind in PRODUCTS

    @property
    def couples_rows(self) -> bool:
        """Whether, in training mode, a row's output depends on the other rows of its group."""
        return self.norm

    @property
    def out_channels(self) -> int:
        return self.out_shape[0]

    def product_flops(self) -> int:
        """Multiply-add FLOPs (2 per multiply-add) of the product for one sample; the input- and
        weight-gradient products cost the same each."""
        if self.kind == "dense":
            return 2 * self.in_shape[0] * self.out_shape[0]
        if self.kind == "conv2d":
            c_in, (c_out, h, w) = self.in_shape[0], self.out_shape
            return 2 * c_in * c_out * self.kernel[0] * self.kernel[1] * h * w
        if self.kind == "conv_transpose2d":
            (c_in, h, w), c_out = self.in_shape, self.out_shape[0]
            return 2 * c_in * c_out * self.kernel[0] * self.kernel[1] * h * w
        return 0


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_transpose_out_size(size: int, kernel: int, stride: int, padding: int, output_padding: int) -> int:
    return (size - 1) * stride - 2 * padding + kernel + output_padding


def pair(name: str, value) -> tuple:
    """An int or a pair of ints as a pair of non-negative ints."""
    values = (value, value) if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{name} must be an int or a pair of ints >= 0, got {value!r}")
    return values


def numel(shape: tuple) -> int:
    return math.prod(shape)


def find_spec(layers, index: int) -> Optional[LayerSpec]:
    return layers[index].spec if 0 <= index < len(layers) else None
