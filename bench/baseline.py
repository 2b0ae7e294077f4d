"""The yardstick: a straightforward eager VAE-GAN training step, written as a PyTorch user would write it.

The same networks as the model's, in plain torch.nn (nn.Linear / nn.Conv2d / nn.ConvTranspose2d, nn.BatchNorm,
nn.LeakyReLU / nn.ReLU, ...), F.softplus losses, three torch.autograd.grad calls (one per network's loss) and
three torch.optim.Adam optimizers. It is deliberately independent of vaegan_fast's step code, so that work on
the model's own step is always measured against the same fixed work. Its loss options are the model's it
mirrors (gamma, the pixel term's and the encoder's feature-term weights, reconstructions as fakes, the
saturating generator loss, the equilibrium gate, the feature layer, the discriminator's batch statistics joint or
per set, Adam's lr and betas per network): bench/e2e.py builds that model in vaegan_fast.BASELINE_OPTIONS for the
MLP presets and in the conv presets' own defaults.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vaegan_fast import Model
from vaegan_fast.nn import LOGVAR_MAX, LOGVAR_MIN

_ACTIVATIONS = {"identity": lambda s: nn.Identity(), "relu": lambda s: nn.ReLU(), "tanh": lambda s: nn.Tanh(),
                "leaky_relu": lambda s: nn.LeakyReLU(s), "sigmoid": lambda s: nn.Sigmoid(),
                "gelu": lambda s: nn.GELU(approximate="tanh")}


def plain_layer(layer, spec) -> nn.Sequential:
    """A fused layer as torch.nn modules [product, (norm), activation] with its weights; Flatten/Unflatten as
    nn.Flatten / nn.Unflatten."""
    if spec.kind == "flatten":
        return nn.Sequential(nn.Flatten())
    if spec.kind == "unflatten":
        return nn.Sequential(nn.Unflatten(1, spec.out_shape))
    if spec.kind == "dense":
        product = nn.Linear(spec.in_shape[0], spec.out_shape[0], bias=spec.bias)
    elif spec.kind == "conv2d":
        product = nn.Conv2d(spec.in_shape[0], spec.out_shape[0], spec.kernel, spec.stride, spec.padding,
                            bias=spec.bias)
    else:
        product = nn.ConvTranspose2d(spec.in_shape[0], spec.out_shape[0], spec.kernel, spec.stride, spec.padding,
                                     spec.output_padding, bias=spec.bias)
    product.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("norm.")})
    parts = [product]
    if spec.norm:
        norm = (nn.BatchNorm1d if spec.kind == "dense" else nn.BatchNorm2d)(spec.out_shape[0], eps=spec.eps,
                                                                             momentum=spec.momentum)
        norm.load_state_dict(layer.norm.state_dict())
        parts.append(norm)
    parts.append(_ACTIVATIONS[spec.activation](spec.negative_slope))
    return nn.Sequential(*parts)


def plain_network(program) -> nn.ModuleList:
    return nn.ModuleList(plain_layer(layer, spec) for layer, spec in zip(program.layers, program.specs))


class EagerVAEGAN(nn.Module):
    """The eager baseline: ``model``'s networks in plain torch.nn, with its weights, device and random stream."""

    def __init__(self, model: Model):
        super().__init__()
        self.latent_dim = model.config["latent_dim"]
        self.encoder = plain_network(model.encoder.net)
        self.decoder = plain_network(model.decoder.net)
        self.discriminator = plain_network(model.discriminator.net)
        self.tap = model.discriminator.tap
        self.config = {k: model.config[k] for k in ("gamma", "pixel_weight", "encoder_llike_weight", "recon_as_fake",
                                                     "saturating", "gating", "discriminator_norm")}
        self.gate_decisions = model.gate_decisions
        self.params = [list(m.parameters()) for m in (self.encoder, self.decoder, self.discriminator)]
        self.optimizers = [torch.optim.Adam(p, lr=model.config["lr"][net], betas=model.config["betas"][net])
                           for p, net in zip(self.params, ("encoder", "decoder", "discriminator"))]
        self.to(model.device, model.dtype)
        self.generator = copy.deepcopy(model._rng())

    @classmethod
    def like(cls, model: Model) -> "EagerVAEGAN":
        return cls(model)

    def _discriminate(self, x):
        """(logits, features at the tap)."""
        position, point = self.tap
        features = None
        for i, layer in enumerate(self.discriminator):
            if i == position and point == "pre_norm":
                x = layer[0](x)
                features = x
                for module in layer[1:]:
                    x = module(x)
            else:
                x = layer(x)
                if i == position:
                    features = x
        return x.reshape(-1), features

    @torch.compiler.disable  # a host decision: torch.compile breaks its graph here either way, this way silently
    def _gate(self, s_real, s_p) -> tuple:
        """(train encoder, decoder, discriminator) by Larsen's equilibrium: the model's own rule
        (vaegan_fast.Model.gate_decisions), read on the host as a user's step would."""
        train_disc, train_dec = self.gate_decisions(F.softplus(-s_real).mean(), F.softplus(s_p).mean())
        return True, bool(train_dec), bool(train_disc)

    def step(self, x: torch.Tensor):
        """One update of all three networks; returns the three losses (detached)."""
        batch = x.shape[0]
        h = x
        for layer in self.encoder:
            h = layer(h)
        mu, logvar = h.split(self.latent_dim, dim=1)
        logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        eps = torch.randn(mu.shape, generator=self.generator, device=x.device, dtype=x.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1).mean()
        z_p = torch.randn(z.shape, generator=self.generator, device=x.device, dtype=x.dtype)

        def decode(z):  # logits
            for layer in self.decoder:
                z = layer(z)
            return z

        cfg = self.config
        x_p = torch.sigmoid(decode(z_p))  # the prior first, as Model does (a batch norm's running averages)
        rec_logits = decode(z)
        x_rec = torch.sigmoid(rec_logits)
        if cfg["discriminator_norm"] == "separate":  # three calls, each set with its own batch statistics
            (s_real, f_real), (s_p, _), (s_rec, f_rec) = (self._discriminate(t) for t in (x, x_p, x_rec))
            logits, features = torch.cat([s_real, s_rec, s_p]), torch.cat([f_real, f_rec])
        else:
            logits, features = self._discriminate(torch.cat([x, x_rec, x_p]))
        s_real, s_rec, s_p = logits.split(batch)
        f_real, f_rec = features[:batch], features[batch:2 * batch]
        llike = 0.5 * (f_real - f_rec).pow(2).reshape(batch, -1).sum(1).mean()
        fakes = [s_p, s_rec] if cfg["recon_as_fake"] else [s_p]
        loss_d = F.softplus(-s_real).mean() + sum(F.softplus(s).mean() for s in fakes)
        if cfg["saturating"]:  # minimise log(1 - D(fake))
            loss_g = -sum(F.softplus(s).mean() for s in fakes)
        else:
            loss_g = sum(F.softplus(-s).mean() for s in fakes)
        loss_enc = kl + cfg["encoder_llike_weight"] * llike
        loss_dec = cfg["gamma"] * llike + loss_g
        if cfg["pixel_weight"] > 0:
            pixel = F.binary_cross_entropy_with_logits(rec_logits, x, reduction="sum") / batch
            loss_enc = loss_enc + cfg["pixel_weight"] * pixel
            loss_dec = loss_dec + cfg["pixel_weight"] * pixel
        grads = [torch.autograd.grad(loss_enc, self.params[0], retain_graph=True),
                 torch.autograd.grad(loss_dec, self.params[1], retain_graph=True),
                 torch.autograd.grad(loss_d, self.params[2])]
        train = self._gate(s_real, s_p) if cfg["gating"] else (True, True, True)
        for params, g, opt, trained in zip(self.params, grads, self.optimizers, train):
            if not trained:
                continue
            for p, gi in zip(params, g):
                p.grad = gi
            opt.step()
        return loss_enc.detach(), loss_dec.detach(), loss_d.detach()
