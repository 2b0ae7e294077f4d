"""The VAE-GAN's three networks as programs of fused layers, the built-in architectures, and the contract
custom networks follow.

A Program is a sequence of supported layers (vaegan_fast.nn.layers) with the per-sample shape it takes; its
specs are what the training step's planner reads. The built-in networks wrap one program each:
- Encoder(x [B, *in_shape]) -> (mu [B, latent], logvar [B, latent]): the program's last layer gives
  2 * latent values per row, mu first, and logvar is clamped to [LOGVAR_MIN, LOGVAR_MAX];
- Decoder(z [B, latent]) -> logits of the image shape ([B, P] for a dense last layer, [B, C, H, W] for a conv);
- Discriminator(x) -> (logits [N], features [N, ...]): the features are the tap D_l, the output of fused
  layer ``feature_layer`` (fused layers counted from 0, Flatten/Unflatten not counted; negative indices
  count back from the last hidden fused layer, so -1 is the last layer before the logit), read after its
  activation (``feature_point="output"``) or after its product and bias, before its norm ("pre_norm").

Any encoder, decoder and discriminator built this way from supported layers train through the routed step;
other modules with the same call contract train through autograd (vaegan_fast.Model):
- encoder(x) -> (mu, logvar); decoder(z) -> logits (the image is their sigmoid);
- discriminator(x) -> (logits [N] or [N, 1], features [N, ...]).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..ops import layer as layer_ops
from .layers import FUSED_LAYERS, Flatten, FusedConv2d, FusedConvTranspose2d, FusedLinear, Unflatten, layer_spec
from .spec import TAP_POINTS

# exp(logvar) overflows fp32 above ~88 and underflows to a zero variance far below; the reparam op applies
# its formula exactly, so the encoder keeps logvar inside a wide, safe range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class Program(nn.Module):
    """Supported layers in sequence, for inputs of per-sample shape ``in_shape``."""

    def __init__(self, layers: Sequence[nn.Module], in_shape: Sequence[int]):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.in_shape = tuple(int(s) for s in in_shape)
        if not self.layers:
            raise ValueError("a program needs at least one layer")
        self.specs  # checks that the shapes chain

    @property
    def specs(self) -> list:
        shape, specs = self.in_shape, []
        for i, layer in enumerate(self.layers):
            try:
                spec = layer_spec(layer, shape)
            except ValueError as exc:
                raise ValueError(f"layer {i} ({type(layer).__name__}): {exc}") from None
            specs.append(spec)
            shape = spec.out_shape
        return specs

    @property
    def out_shape(self) -> tuple:
        return self.specs[-1].out_shape

    @property
    def fused_indices(self) -> list:
        """Positions of the fused layers (not Flatten/Unflatten) in ``layers``."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, FUSED_LAYERS)]

    def set_backend(self, backend: str) -> None:
        for layer in self.layers:
            if isinstance(layer, FUSED_LAYERS):
                layer.backend = backend

    def forward(self, x: torch.Tensor, tap: tuple | None = None):
        """The output; with ``tap`` = (layer position, point) also the tapped tensor."""
        tapped = None
        for i, layer in enumerate(self.layers):
            if tap is not None and i == tap[0] and tap[1] == "pre_norm" and layer.norm is not None:
                pre = layer_ops.product_bias(layer, x)
                tapped, x = pre, layer_ops.norm_act(layer, pre)
            else:
                x = layer(x)
                if tap is not None and i == tap[0]:
                    tapped = x
        return x if tap is None else (x, tapped)


class Encoder(nn.Module):
    def __init__(self, layers: Sequence[nn.Module], in_shape: Sequence[int], latent_dim: int):
        super().__init__()
        self.net = Program(layers, in_shape)
        self.latent_dim = int(latent_dim)
        if self.net.out_shape != (2 * self.latent_dim,):
            raise ValueError(f"the encoder's last layer must give 2 * latent_dim = {2 * self.latent_dim} values "
                             f"(mu, then logvar), gives {self.net.out_shape}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).split(self.latent_dim, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class Decoder(nn.Module):
    def __init__(self, layers: Sequence[nn.Module], latent_dim: int):
        super().__init__()
        self.net = Program(layers, (int(latent_dim),))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    def __init__(self, layers: Sequence[nn.Module], in_shape: Sequence[int], feature_layer: int = -1,
                 feature_point: str = "output"):
        super().__init__()
        self.net = Program(layers, in_shape)
        if self.net.out_shape != (1,):
            raise ValueError(f"the discriminator's last layer must give one logit per row, gives {self.net.out_shape}")
        if feature_point not in TAP_POINTS:
            raise ValueError(f"feature_point must be one of {TAP_POINTS}, got {feature_point!r}")
        self.feature_layer, self.feature_point = int(feature_layer), feature_point
        self.tap  # checks the index

    @property
    def tap(self) -> tuple:
        """(position in the program's layers, point) of the features D_l."""
        fused = self.net.fused_indices
        hidden = len(fused) - 1
        if hidden < 1 or not -hidden <= self.feature_layer < hidden:
            raise ValueError(f"feature_layer must index one of the discriminator's {hidden} hidden fused layers "
                             f"(from {-hidden} to {hidden - 1}), got {self.feature_layer}")
        position = fused[self.feature_layer % hidden]
        if self.feature_point == "pre_norm" and self.net.layers[position].norm is None:
            raise ValueError(f"feature_point='pre_norm' needs a norm in feature layer {self.feature_layer}")
        return position, self.feature_point

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.net(x, tap=self.tap)
        return logits.reshape(-1), features


# ---------------------------------------------------------------------------------------------- built-ins
ARCHITECTURES = ("mlp", "conv", "larsen64")


def _dense_stack(sizes: Sequence[int], activation: str, slope: float, backend: str, last: str = "identity"):
    return [FusedLinear(n_in, n_out, activation=activation if i < len(sizes) - 2 else last, negative_slope=slope,
                        backend=backend) for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]


def mlp_networks(image_shape, latent_dim, encoder_hidden, decoder_hidden, discriminator_hidden, activation,
                 negative_slope, feature_layer, backend) -> tuple:
    """The foundation's MLPs on flat images [B, C*H*W]."""
    pixels = image_shape[0] * image_shape[1] * image_shape[2]
    if len(discriminator_hidden) == 0:
        raise ValueError("discriminator_hidden needs at least one hidden layer to take features from")
    act = dict(activation=activation, slope=negative_slope, backend=backend)
    encoder = Encoder(_dense_stack([pixels, *encoder_hidden, 2 * latent_dim], **act), (pixels,), latent_dim)
    decoder = Decoder(_dense_stack([latent_dim, *decoder_hidden, pixels], **act), latent_dim)
    discriminator = Discriminator(_dense_stack([pixels, *discriminator_hidden, 1], **act), (pixels,), feature_layer)
    return encoder, decoder, discriminator


def _divisible(name: str, image_shape, by: int) -> None:
    c, h, w = image_shape
    if h % by or w % by:
        raise ValueError(f"the {name} architecture needs image sides divisible by {by}, got {h}x{w}")


def conv_networks(image_shape, latent_dim, feature_layer, feature_point, backend) -> tuple:
    """The conv preset (Fashion-MNIST 28x28x1; any C x H x W with sides divisible by 4), LeakyReLU(0.2)."""
    _divisible("conv", image_shape, 4)
    c, h, w = image_shape
    lrelu = dict(activation="leaky_relu", negative_slope=0.2, backend=backend)
    flat = 64 * (h // 4) * (w // 4)
    encoder = Encoder([FusedConv2d(c, 32, 4, 2, 1, bias=False, norm="batch", **lrelu),
                       FusedConv2d(32, 64, 4, 2, 1, bias=False, norm="batch", **lrelu),
                       Flatten((64, h // 4, w // 4)), FusedLinear(flat, 256, **lrelu),
                       FusedLinear(256, 2 * latent_dim, backend=backend)], image_shape, latent_dim)
    decoder = Decoder([FusedLinear(latent_dim, flat, **lrelu), Unflatten((64, h // 4, w // 4)),
                       FusedConvTranspose2d(64, 32, 4, 2, 1, bias=False, norm="batch", **lrelu),
                       FusedConvTranspose2d(32, c, 4, 2, 1, backend=backend)], latent_dim)
    discriminator = Discriminator([FusedConv2d(c, 32, 4, 2, 1, **lrelu),
                                   FusedConv2d(32, 64, 4, 2, 1, bias=False, norm="batch", **lrelu),
                                   Flatten((64, h // 4, w // 4)), FusedLinear(flat, 256, **lrelu),
                                   FusedLinear(256, 1, backend=backend)], image_shape, feature_layer, feature_point)
    return encoder, decoder, discriminator


def larsen64_networks(image_shape, latent_dim, feature_layer, feature_point, backend) -> tuple:
    """Larsen et al.'s CelebA networks (64x64x3; sides divisible by 8): 5x5 convs, batch norm, ReLU."""
    _divisible("larsen64", image_shape, 8)
    c, h, w = image_shape
    relu = dict(activation="relu", backend=backend)
    bn = dict(bias=False, norm="batch", **relu)
    s8 = (h // 8, w // 8)
    encoder = Encoder([FusedConv2d(c, 64, 5, 2, 2, **bn), FusedConv2d(64, 128, 5, 2, 2, **bn),
                       FusedConv2d(128, 256, 5, 2, 2, **bn), Flatten((256, *s8)),
                       FusedLinear(256 * s8[0] * s8[1], 2048, **bn), FusedLinear(2048, 2 * latent_dim, backend=backend)],
                      image_shape, latent_dim)
    decoder = Decoder([FusedLinear(latent_dim, 256 * s8[0] * s8[1], **bn), Unflatten((256, *s8)),
                       FusedConvTranspose2d(256, 256, 5, 2, 2, 1, **bn), FusedConvTranspose2d(256, 128, 5, 2, 2, 1, **bn),
                       FusedConvTranspose2d(128, 32, 5, 2, 2, 1, **bn), FusedConv2d(32, c, 5, 1, 2, backend=backend)],
                      latent_dim)
    discriminator = Discriminator([FusedConv2d(c, 32, 5, 1, 2, **relu), FusedConv2d(32, 128, 5, 2, 2, **bn),
                                   FusedConv2d(128, 256, 5, 2, 2, **bn), FusedConv2d(256, 256, 5, 2, 2, **bn),
                                   Flatten((256, *s8)), FusedLinear(256 * s8[0] * s8[1], 512, **bn),
                                   FusedLinear(512, 1, backend=backend)], image_shape, feature_layer, feature_point)
    return encoder, decoder, discriminator


def is_program_network(module: nn.Module) -> bool:
    return isinstance(module, (Encoder, Decoder, Discriminator))
