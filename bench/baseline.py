"""The yardstick: a straightforward eager VAE-GAN training step, written as a PyTorch user would write it.

nn.Linear layers, F.softplus losses, three torch.autograd.grad calls (one per network's loss) and three
torch.optim.Adam optimizers. It is deliberately independent of vaegan_fast's model code, so that later work on
the model's own step is always measured against the same fixed work. Its configuration is
vaegan_fast.BASELINE_OPTIONS: gamma 1, no pixel term, reconstructions count as fakes, non-saturating generator
loss, no gating, features from the discriminator's last hidden layer, Adam lr 2e-4 and betas (0.5, 0.999).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vaegan_fast import BASELINE_OPTIONS, Model
from vaegan_fast.nn import LOGVAR_MAX, LOGVAR_MIN


def _mlp(sizes, final_activation: bool, slope: float) -> nn.Sequential:
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class EagerVAEGAN(nn.Module):
    """The eager baseline, with the architecture of vaegan_fast's built-in MLPs (leaky-relu hidden layers)."""

    def __init__(self, input_dim, latent_dim, encoder_hidden, decoder_hidden, discriminator_hidden,
                 negative_slope=0.2, seed=0):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp([input_dim, *encoder_hidden], True, negative_slope)
        self.encoder_head = nn.Linear(encoder_hidden[-1], 2 * latent_dim)
        self.decoder = _mlp([latent_dim, *decoder_hidden, input_dim], False, negative_slope)
        self.disc_body = _mlp([input_dim, *discriminator_hidden], True, negative_slope)
        self.disc_head = nn.Linear(discriminator_hidden[-1], 1)
        opt = dict(lr=BASELINE_OPTIONS["lr"], betas=BASELINE_OPTIONS["betas"])
        self.enc_params = [*self.encoder.parameters(), *self.encoder_head.parameters()]
        self.dec_params = list(self.decoder.parameters())
        self.disc_params = [*self.disc_body.parameters(), *self.disc_head.parameters()]
        self.optimizers = [torch.optim.Adam(p, **opt) for p in (self.enc_params, self.dec_params, self.disc_params)]
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def like(cls, model: Model) -> "EagerVAEGAN":
        """A baseline with ``model``'s sizes, weights, device and random stream (built-in networks only)."""
        cfg = model.config
        base = cls(cfg["input_dim"], cfg["latent_dim"], cfg["encoder_hidden"], cfg["decoder_hidden"],
                   cfg["discriminator_hidden"], cfg["negative_slope"]).to(model.device, model.dtype)
        ours = [m for m in model.modules() if isinstance(m, nn.Linear)]
        theirs = [base.encoder, base.encoder_head, base.decoder, base.disc_body, base.disc_head]
        theirs = [m for part in theirs for m in part.modules() if isinstance(m, nn.Linear)]
        assert len(ours) == len(theirs)
        with torch.no_grad():
            for a, b in zip(ours, theirs):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
        base.generator = copy.deepcopy(model._rng())
        return base

    def step(self, x: torch.Tensor):
        """One update of all three networks; returns the three losses (detached)."""
        batch = x.shape[0]
        mu, logvar = self.encoder_head(self.encoder(x)).split(self.latent_dim, dim=1)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        eps = torch.randn(mu.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1).mean()
        z_p = torch.randn(z.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        x_rec, x_p = torch.sigmoid(self.decoder(z)), torch.sigmoid(self.decoder(z_p))
        features = self.disc_body(torch.cat([x, x_rec, x_p]))
        logits = self.disc_head(features).squeeze(1)
        s_real, s_rec, s_p = logits.split(batch)
        f_real, f_rec, _ = features.split(batch)
        llike = 0.5 * (f_real - f_rec).pow(2).sum(1).mean()
        loss_d = F.softplus(-s_real).mean() + F.softplus(s_p).mean() + F.softplus(s_rec).mean()
        loss_g = F.softplus(-s_p).mean() + F.softplus(-s_rec).mean()
        loss_enc = kl + llike
        loss_dec = BASELINE_OPTIONS["gamma"] * llike + loss_g
        grads = [torch.autograd.grad(loss_enc, self.enc_params, retain_graph=True),
                 torch.autograd.grad(loss_dec, self.dec_params, retain_graph=True),
                 torch.autograd.grad(loss_d, self.disc_params)]
        for params, g, opt in zip((self.enc_params, self.dec_params, self.disc_params), grads, self.optimizers):
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
        return loss_enc.detach(), loss_dec.detach(), loss_d.detach()
