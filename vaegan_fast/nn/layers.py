"""Fused layers: a product (dense, conv2d or conv_transpose2d), its bias, an optional batch norm and an
activation as one layer, plus the layout layers Flatten and Unflatten.

Each is a drop-in for the torch modules it fuses: the same parameters, initialisation and state_dict keys
(the norm's under ``norm.``), so ``FusedConv2d.from_modules(conv, bn, "leaky_relu")`` loads an nn.Conv2d and
an nn.BatchNorm2d unchanged. Each describes itself with a LayerSpec (``.spec``, vaegan_fast/nn/spec.py), which
is what the training step's planner reads; ``forward`` runs the layer through the fused op of its backend
(differentiable, for the autograd path and your own code).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import layer as layer_ops
from ..ops.activations import check_activation
from .spec import LayerSpec, conv_out_size, conv_transpose_out_size, pair

NORMS = (None, "batch")


class _Fused:
    """What the fused layers share: the activation, the optional norm, the backend, the spec."""

    def _init_fused(self, activation: str, negative_slope: float, norm: Optional[str], channels: int,
                    norm_cls, backend: str, device, dtype, eps: float = 1e-5, momentum: float = 0.1):
        check_activation(activation, negative_slope)
        if norm not in NORMS:
            raise ValueError(f"norm must be None or 'batch', got {norm!r}")
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.backend = backend
        self.norm = norm_cls(channels, eps=eps, momentum=momentum, device=device, dtype=dtype) if norm else None

    def _norm_fields(self) -> dict:
        if self.norm is None:
            return {}
        if self.norm.momentum is None or not self.norm.affine or not self.norm.track_running_stats:
            raise ValueError("a fused layer's batch norm needs a momentum, affine=True and running statistics "
                             "(nn.BatchNorm's defaults)")
        return dict(norm=True, eps=float(self.norm.eps), momentum=float(self.norm.momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None and self.training:
            self.norm.num_batches_tracked.add_(1)  # as nn.BatchNorm counts its batches
        return layer_ops.layer_act(self.spec_for(x), x, self.weight, self.bias, self.norm, self.training,
                                   backend=self.backend)

    def _act_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        norm = ", norm=batch" if self.norm is not None else ""
        return f"{norm}, activation={self.activation}{slope}, backend={self.backend}"


class FusedLinear(_Fused, nn.Linear):
    """``act(norm(x @ weight.T + bias))``: a drop-in for nn.Linear (+ nn.BatchNorm1d) + an activation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "identity",
                 negative_slope: float = 0.2, backend: str = "auto", norm: Optional[str] = None, device=None,
                 dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fused(activation, negative_slope, norm, out_features, nn.BatchNorm1d, backend, device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: str = "identity", negative_slope: float = 0.2,
                    backend: str = "auto", norm: Optional[nn.BatchNorm1d] = None) -> "FusedLinear":
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, activation=activation,
                    negative_slope=negative_slope, backend=backend, norm="batch" if norm is not None else None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.load_state_dict({**linear.state_dict(), **{f"norm.{k}": v for k, v in
                                                         (norm.state_dict() if norm is not None else {}).items()}})
        return layer

    @property
    def spec(self) -> LayerSpec:
        return LayerSpec("dense", (self.in_features,), (self.out_features,), bias=self.bias is not None,
                         activation=self.activation, negative_slope=self.negative_slope, **self._norm_fields())

    def spec_for(self, x) -> LayerSpec:
        return self.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:  # the common case keeps linear_act's own (leanest) path
            return layer_ops.linear_act(x, self.weight, self.bias, self.activation,
                                        negative_slope=self.negative_slope, backend=self.backend)
        return _Fused.forward(self, x)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + self._act_repr()


def _check_conv(module, name: str) -> None:
    if module.groups != 1 or tuple(module.dilation) != (1, 1) or module.padding_mode != "zeros":
        raise ValueError(f"{name} supports groups=1, dilation=1 and zero padding only")
    if isinstance(module.padding, str):
        raise ValueError(f"{name} needs explicit integer padding, got {module.padding!r}")


class FusedConv2d(_Fused, nn.Conv2d):
    """``act(norm(conv2d(x, weight) + bias))`` for [N, C, H, W] images: a drop-in for nn.Conv2d
    (+ nn.BatchNorm2d) + an activation (groups=1, dilation=1, zero padding)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 activation: str = "identity", negative_slope: float = 0.2, norm: Optional[str] = None,
                 backend: str = "auto", device=None, dtype=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, pair("kernel_size", kernel_size),
                           stride=pair("stride", stride), padding=pair("padding", padding), bias=bias,
                           device=device, dtype=dtype)
        _check_conv(self, "FusedConv2d")
        self._init_fused(activation, negative_slope, norm, out_channels, nn.BatchNorm2d, backend, device, dtype)

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, norm: Optional[nn.BatchNorm2d] = None, activation: str = "identity",
                     negative_slope: float = 0.2, backend: str = "auto") -> "FusedConv2d":
        _check_conv(conv, "FusedConv2d.from_modules")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None, activation=activation, negative_slope=negative_slope,
                    norm="batch" if norm is not None else None, backend=backend, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        if norm is not None:
            layer.norm.eps, layer.norm.momentum = norm.eps, norm.momentum
        layer.load_state_dict({**conv.state_dict(), **{f"norm.{k}": v for k, v in
                                                       (norm.state_dict() if norm is not None else {}).items()}})
        return layer

    def spec_at(self, in_shape: tuple) -> LayerSpec:
        """The spec for inputs of per-sample shape (C, H, W)."""
        c, h, w = in_shape
        if c != self.in_channels:
            raise ValueError(f"FusedConv2d expects {self.in_channels} input channels, got shape {tuple(in_shape)}")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        out = (self.out_channels, conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw))
        if min(out[1:]) < 1:
            raise ValueError(f"FusedConv2d with kernel {self.kernel_size}, stride {self.stride}, padding "
                             f"{self.padding} has no output for {h}x{w} inputs")
        return LayerSpec("conv2d", tuple(in_shape), out, kernel=self.kernel_size, stride=self.stride,
                         padding=self.padding, output_padding=(0, 0), bias=self.bias is not None,
                         activation=self.activation, negative_slope=self.negative_slope, **self._norm_fields())

    def spec_for(self, x) -> LayerSpec:
        if x.dim() != 4:
            raise ValueError(f"FusedConv2d expects [N, C, H, W] inputs, got shape {tuple(x.shape)}")
        return self.spec_at(tuple(x.shape[1:]))

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + self._act_repr()


class FusedConvTranspose2d(_Fused, nn.ConvTranspose2d):
    """``act(norm(conv_transpose2d(x, weight) + bias))``: a drop-in for nn.ConvTranspose2d
    (+ nn.BatchNorm2d) + an activation (groups=1, dilation=1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 bias: bool = True, activation: str = "identity", negative_slope: float = 0.2,
                 norm: Optional[str] = None, backend: str = "auto", device=None, dtype=None):
        nn.ConvTranspose2d.__init__(self, in_channels, out_channels, pair("kernel_size", kernel_size),
                                    stride=pair("stride", stride), padding=pair("padding", padding),
                                    output_padding=pair("output_padding", output_padding), bias=bias,
                                    device=device, dtype=dtype)
        _check_conv(self, "FusedConvTranspose2d")
        self._init_fused(activation, negative_slope, norm, out_channels, nn.BatchNorm2d, backend, device, dtype)

    @classmethod
    def from_modules(cls, conv: nn.ConvTranspose2d, norm: Optional[nn.BatchNorm2d] = None,
                     activation: str = "identity", negative_slope: float = 0.2,
                     backend: str = "auto") -> "FusedConvTranspose2d":
        _check_conv(conv, "FusedConvTranspose2d.from_modules")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.output_padding, bias=conv.bias is not None, activation=activation,
                    negative_slope=negative_slope, norm="batch" if norm is not None else None, backend=backend,
                    device=conv.weight.device, dtype=conv.weight.dtype)
        if norm is not None:
            layer.norm.eps, layer.norm.momentum = norm.eps, norm.momentum
        layer.load_state_dict({**conv.state_dict(), **{f"norm.{k}": v for k, v in
                                                       (norm.state_dict() if norm is not None else {}).items()}})
        return layer

    def spec_at(self, in_shape: tuple) -> LayerSpec:
        c, h, w = in_shape
        if c != self.in_channels:
            raise ValueError(f"FusedConvTranspose2d expects {self.in_channels} input channels, got shape "
                             f"{tuple(in_shape)}")
        (kh, kw), (sh, sw), (ph, pw), (oh, ow) = self.kernel_size, self.stride, self.padding, self.output_padding
        if oh >= max(sh, 1) or ow >= max(sw, 1):
            raise ValueError(f"FusedConvTranspose2d: output_padding {self.output_padding} must be smaller than the "
                             f"stride {self.stride}")
        out = (self.out_channels, conv_transpose_out_size(h, kh, sh, ph, oh), conv_transpose_out_size(w, kw, sw, pw, ow))
        if min(out[1:]) < 1:
            raise ValueError(f"FusedConvTranspose2d has no output for {h}x{w} inputs")
        return LayerSpec("conv_transpose2d", tuple(in_shape), out, kernel=self.kernel_size, stride=self.stride,
                         padding=self.padding, output_padding=self.output_padding, bias=self.bias is not None,
                         activation=self.activation, negative_slope=self.negative_slope, **self._norm_fields())

    def spec_for(self, x) -> LayerSpec:
        if x.dim() != 4:
            raise ValueError(f"FusedConvTranspose2d expects [N, C, H, W] inputs, got shape {tuple(x.shape)}")
        return self.spec_at(tuple(x.shape[1:]))

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        if output_size is not None:
            raise ValueError("FusedConvTranspose2d takes its output size from output_padding, not output_size")
        return _Fused.forward(self, x)

    def extra_repr(self) -> str:
        return nn.ConvTranspose2d.extra_repr(self) + self._act_repr()


class Flatten(nn.Module):
    """[N, C, H, W] -> [N, C*H*W] (channel-first, as torch.flatten)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def spec_at(self, in_shape: tuple) -> LayerSpec:
        if tuple(in_shape) != self.shape:
            raise ValueError(f"Flatten expects per-sample shape {self.shape}, got {tuple(in_shape)}")
        return LayerSpec("flatten", self.shape, (self.shape[0] * self.shape[1] * self.shape[2],))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"Flatten expects [N, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class Unflatten(nn.Module):
    """[N, C*H*W] -> [N, C, H, W] (channel-first)."""

    def __init__(self, shape):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def spec_at(self, in_shape: tuple) -> LayerSpec:
        if tuple(in_shape) != (self.shape[0] * self.shape[1] * self.shape[2],):
            raise ValueError(f"Unflatten to {self.shape} expects {self.shape[0] * self.shape[1] * self.shape[2]} "
                             f"features, got per-sample shape {tuple(in_shape)}")
        return LayerSpec("unflatten", tuple(in_shape), self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


FUSED_LAYERS = (FusedLinear, FusedConv2d, FusedConvTranspose2d)
LAYOUT_LAYERS = (Flatten, Unflatten)


def layer_spec(layer: nn.Module, in_shape: tuple) -> LayerSpec:
    """The spec of a supported layer for per-sample inputs of ``in_shape``; ValueError otherwise."""
    if isinstance(layer, FusedLinear):
        if tuple(in_shape) != (layer.in_features,):
            raise ValueError(f"FusedLinear expects {layer.in_features} features, got per-sample shape "
                             f"{tuple(in_shape)}")
        return layer.spec
    if isinstance(layer, (FusedConv2d, FusedConvTranspose2d, Flatten, Unflatten)):
        if len(in_shape) != (3 if not isinstance(layer, Unflatten) else 1):
            raise ValueError(f"{type(layer).__name__} cannot take per-sample shape {tuple(in_shape)}")
        return layer.spec_at(tuple(in_shape))
    raise ValueError(f"{type(layer).__name__} is not a layer the routed step knows (FusedLinear, FusedConv2d, "
                     "FusedConvTranspose2d, Flatten, Unflatten)")
