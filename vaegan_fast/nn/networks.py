"""The built-in MLP networks of the VAE-GAN and the contract custom networks follow.

Contract (what ``vaegan_fast.Model`` calls):
- encoder(x [B, input_dim]) -> (mu [B, latent], logvar [B, latent])
- decoder(z [B, latent]) -> logits [B, input_dim]; the image is their sigmoid
- discriminator(x [N, input_dim]) -> (logits [N] or [N, 1], features [N, ...]), the features being the
  hidden layer whose activations measure reconstruction (D_l in the paper)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import MLP, FusedLinear, _hidden_index

# exp(logvar) overflows fp32 above ~88 and underflows to a zero variance far below; the reparam op applies
# its formula exactly, so the encoder keeps logvar inside a wide, safe range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class MLPEncoder(nn.Module):
    """x -> hidden layers -> one head producing [mu, logvar] (one GEMM for both), logvar clamped."""

    def __init__(self, input_dim: int, hidden: Sequence[int], latent_dim: int, activation: str = "leaky_relu",
                 negative_slope: float = 0.2, backend: str = "auto"):
        super().__init__()
        self.body = (MLP([input_dim, *hidden], activation, activation, negative_slope, backend)
                     if hidden else nn.Identity())
        self.head = FusedLinear(([input_dim, *hidden])[-1], 2 * latent_dim, activation="identity",
                                backend=backend)
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).split(self.latent_dim, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class MLPDecoder(nn.Module):
    """z -> hidden layers -> pixel logits."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], output_dim: int, activation: str = "leaky_relu",
                 negative_slope: float = 0.2, backend: str = "auto"):
        super().__init__()
        self.net = MLP([latent_dim, *hidden, output_dim], activation, "identity", negative_slope, backend)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    """x -> hidden layers -> one logit per row; also returns hidden layer ``feature_layer``'s activations."""

    def __init__(self, input_dim: int, hidden: Sequence[int], feature_layer: int = -1,
                 activation: str = "leaky_relu", negative_slope: float = 0.2, backend: str = "auto"):
        super().__init__()
        if len(hidden) == 0:
            raise ValueError("discriminator_hidden needs at least one hidden layer to take features from")
        _hidden_index(feature_layer, len(hidden))
        self.net = MLP([input_dim, *hidden, 1], activation, "identity", negative_slope, backend)
        self.feature_layer = feature_layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.net.forward_hidden(x, self.feature_layer)
        return logits.squeeze(1), features
