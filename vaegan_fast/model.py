"""vaegan_fast.Model: the VAE-GAN of Larsen et al. (2016) with correctly routed updates.

One training step on a batch x (see shared docs/vaegan.md, the specification):
    mu, logvar = Enc(x);  z, kl = reparam_kl(mu, logvar);  x_rec = Dec(z);  x_p = Dec(z_p), z_p ~ N(0, I)
    s, D_l = Dis([x; sigmoid(x_rec); sigmoid(x_p)])             (one discriminator pass over all three)
    prior  = mean kl                     llike = feature_recon_loss(D_l(x), D_l(x_rec))
    pixel  = sum BCE(x, x_rec) / B       L_D = discriminator_loss(s(x), s(x_p) [, s(x_rec)])
    L_G    = generator_loss(s(x_p) [, s(x_rec)])
    encoder:       prior + llike + pixel_weight * pixel
    decoder:       gamma * llike + L_G + pixel_weight * pixel
    discriminator: L_D
Each network's gradient comes from its own loss alone (one torch.autograd.grad per network, all taken
before any parameter changes), then each optimizer steps.

The same class trains the two ablations a VAE-GAN is judged against (``mode=``):
    "vae": encoder prior + pixel_weight * pixel, decoder pixel_weight * pixel; no discriminator;
    "gan": decoder L_G and discriminator L_D on real data and prior samples only; no encoder.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .loss_scale import DynamicLossScale, loss_scale_options
from .nn import FusedLinear, MLPDecoder, MLPDiscriminator, MLPEncoder
from .optim import apply_updates
from .ops import discriminator_loss, feature_recon_loss, generator_loss, reparam_kl, softplus
from .step import routed_step_gradients

NETWORKS = ("encoder", "decoder", "discriminator")
# The networks each mode trains.
MODES = {"vaegan": NETWORKS, "vae": ("encoder", "decoder"), "gan": ("decoder", "discriminator")}
OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
# The dtype the step computes in; parameters, optimizer states and updates stay in the parameters' dtype.
# fp16 adds dynamic loss scaling (vaegan_fast/loss_scale.py).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = "vaegan_fast/1"

PRESETS = {
    # The sizes of the foundation's MLP VAE-GAN; batch 256 recommended. The MLP presets size their input to
    # the images (image_shape, default Fashion-MNIST's (1, 28, 28)): RGB 28x28 gives input_dim 2352.
    "seed": dict(latent_dim=16, encoder_hidden=(128, 64, 32), decoder_hidden=(32, 64, 128),
                 discriminator_hidden=(128, 64, 32)),
    # enc 784-1024-512, latent 128, dec 128-512-1024-784, disc 784-1024-512-1; batch 512 recommended.
    "wide": dict(latent_dim=128, encoder_hidden=(1024, 512), decoder_hidden=(512, 1024),
                 discriminator_hidden=(1024, 512)),
}
RECOMMENDED_BATCH = {"seed": 256, "wide": 512}

# The configuration of the straightforward eager baseline in bench/: what comparisons run.
BASELINE_OPTIONS = dict(gamma=1.0, pixel_weight=0.0, recon_as_fake=True, saturating=False, gating=False,
                        feature_layer=-1, lr=2e-4, betas=(0.5, 0.999))


DEFAULT_IMAGE_SHAPE = (1, 28, 28)


def _number(name: str, value, minimum: Optional[float] = None, above: Optional[float] = None,
            below: Optional[float] = None) -> float:
    """``value`` as a float, refusing non-numbers, NaN, +-inf and values outside the bounds, by name."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value!r}")
    return float(value)


def _count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int >= minimum (a bool or a float is refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _sizes(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of layer widths, got {value!r}")
    return tuple(_count(f"{name}[{i}]", v) for i, v in enumerate(value))


def image_shape_of(input_dim: Optional[int], image_shape) -> tuple[int, tuple]:
    """(input_dim, (C, H, W)) from either or both: the shape decides when given; a bare input_dim is a square
    grayscale image when it can be one (784: 1x28x28), else one row of pixels."""
    if image_shape is not None:
        if isinstance(image_shape, (str, bytes)) or not hasattr(image_shape, "__len__") or len(image_shape) != 3:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape!r}")
        shape = tuple(_count(f"image_shape[{i}]", v) for i, v in enumerate(image_shape))
        if shape[0] not in (1, 3):
            raise ValueError(f"image_shape's channels must be 1 (grayscale) or 3 (RGB), got {shape[0]}")
        dim = shape[0] * shape[1] * shape[2]
        if input_dim is not None and _count("input_dim", input_dim) != dim:
            raise ValueError(f"input_dim {input_dim} does not match image_shape {shape} ({dim} values per image)")
        return dim, shape
    if input_dim is None:
        return math.prod(DEFAULT_IMAGE_SHAPE), DEFAULT_IMAGE_SHAPE
    dim = _count("input_dim", input_dim)
    side = math.isqrt(dim)
    return dim, ((1, side, side) if side * side == dim else (1, 1, dim))


def _per_network(name: str, value) -> dict:
    """One value for all three networks, or a dict keyed by network name."""
    if isinstance(value, dict):
        unknown = set(value) - set(NETWORKS)
        missing = set(NETWORKS) - set(value)
        if unknown or missing:
            raise ValueError(f"{name} as a dict needs exactly the keys {NETWORKS}; "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        return dict(value)
    return {n: value for n in NETWORKS}


class Model(nn.Module):
    """A VAE-GAN: encoder, decoder (= generator) and discriminator, with their losses and optimizers.

    Built-in MLP networks are made from the size arguments; pass ``encoder``, ``decoder`` and
    ``discriminator`` modules to use your own (see vaegan_fast.nn.networks for the contract).
    """

    def __init__(self, input_dim: Optional[int] = None, latent_dim: int = 16,
                 encoder_hidden: Sequence[int] = (128, 64, 32), decoder_hidden: Sequence[int] = (32, 64, 128),
                 discriminator_hidden: Sequence[int] = (128, 64, 32), activation: str = "leaky_relu",
                 negative_slope: float = 0.2, *, gamma: float = 1.0, pixel_weight: float = 1.0,
                 recon_as_fake: bool = True, saturating: bool = False, gating: bool = False,
                 equilibrium: float = 0.68, margin: float = 0.35, feature_layer: int = -1,
                 optimizer: str = "adam", lr=2e-4, betas=(0.5, 0.999), backend: str = "auto",
                 check_inputs: bool = True, seed: int = 0, mode: str = "vaegan", precision: str = "fp32",
                 loss_scale: Optional[dict] = None, encoder: Optional[nn.Module] = None,
                 decoder: Optional[nn.Module] = None, discriminator: Optional[nn.Module] = None,
                 image_shape: Optional[Sequence[int]] = None):
        super().__init__()
        custom = [m is not None for m in (encoder, decoder, discriminator)]
        if any(custom) and not all(custom):
            raise ValueError("pass all three of encoder, decoder and discriminator, or none of them")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        if precision == "fp16":
            loss_scale = loss_scale_options(loss_scale)
            if backend == "native":
                raise ValueError("backend='native' cannot compute in torch.float16 (its CPU kernels take float32, "
                                 "bfloat16 and float64): use backend='auto' or 'reference' for precision='fp16'")
        elif loss_scale is not None:
            raise ValueError(f"loss_scale applies to precision='fp16' only, got it with precision={precision!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {tuple(MODES)}, got {mode!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
        input_dim, image_shape = image_shape_of(input_dim, image_shape)
        latent_dim = _count("latent_dim", latent_dim)
        encoder_hidden = _sizes("encoder_hidden", encoder_hidden)
        decoder_hidden = _sizes("decoder_hidden", decoder_hidden)
        discriminator_hidden = _sizes("discriminator_hidden", discriminator_hidden)
        gamma, pixel_weight = _number("gamma", gamma, minimum=0), _number("pixel_weight", pixel_weight, minimum=0)
        margin, equilibrium = _number("margin", margin, minimum=0), _number("equilibrium", equilibrium)
        negative_slope = _number("negative_slope", negative_slope)
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise TypeError(f"feature_layer must be an int, got {type(feature_layer).__name__} {feature_layer!r}")
        seed = _count("seed", seed, minimum=0)
        for name, flag in (("recon_as_fake", recon_as_fake), ("saturating", saturating), ("gating", gating),
                           ("check_inputs", check_inputs)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")
        from .ops import BACKENDS
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        if mode == "vae" and (gating or pixel_weight <= 0):
            raise ValueError("mode='vae' trains on the pixel-wise likelihood alone: it needs pixel_weight > 0 "
                             "and has no discriminator to gate (gating=False)")
        lrs, betas_per_net = _per_network("lr", lr), _per_network("betas", betas)
        for net in NETWORKS:
            lrs[net] = _number(f"lr[{net!r}]" if isinstance(lr, dict) else "lr", lrs[net], above=0)
            pair = betas_per_net[net]
            where = f"betas[{net!r}]" if isinstance(betas, dict) else "betas"
            if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
                raise ValueError(f"{where} must be a pair (beta1, beta2), got {pair!r}")
            betas_per_net[net] = tuple(_number(f"{where}[{i}]", b, minimum=0, below=1) for i, b in enumerate(pair))
        self.config = dict(
            input_dim=int(input_dim), image_shape=image_shape, latent_dim=int(latent_dim),
            encoder_hidden=tuple(encoder_hidden),
            decoder_hidden=tuple(decoder_hidden), discriminator_hidden=tuple(discriminator_hidden),
            activation=activation, negative_slope=float(negative_slope), gamma=float(gamma),
            pixel_weight=float(pixel_weight), recon_as_fake=bool(recon_as_fake), saturating=bool(saturating),
            gating=bool(gating), equilibrium=float(equilibrium), margin=float(margin),
            feature_layer=int(feature_layer), optimizer=optimizer, lr=lrs, betas=betas_per_net, backend=backend,
            check_inputs=bool(check_inputs), seed=int(seed), mode=mode, precision=precision,
            loss_scale=loss_scale, custom_networks=all(custom))

        if all(custom):
            self.encoder, self.decoder, self.discriminator = encoder, decoder, discriminator
        else:
            kw = dict(activation=activation, negative_slope=negative_slope, backend=backend)
            with torch.random.fork_rng(devices=[]):  # initial weights from the model's seed alone
                torch.manual_seed(seed)
                self.encoder = MLPEncoder(input_dim, encoder_hidden, latent_dim, **kw)
                self.decoder = MLPDecoder(latent_dim, decoder_hidden, input_dim, **kw)
                self.discriminator = MLPDiscriminator(input_dim, discriminator_hidden, feature_layer, **kw)

        opt_cls = OPTIMIZERS[optimizer]
        self.optimizers = {}
        for name in NETWORKS:
            kwargs = {"lr": lrs[name]}
            if optimizer == "adam":
                # One fused multi-tensor kernel per update; it also skips a gated or (fp16) overflowing update
                # on the device (through found_inf, as AMP's grad scaler does) without a host round trip.
                kwargs.update(betas=tuple(betas_per_net[name]), fused=True)
            self.optimizers[name] = opt_cls(getattr(self, name).parameters(), **kwargs)

        # How often the equilibrium gate skipped [the discriminator's, the decoder's] update: kept on the
        # device so that counting never waits for the host.
        self.register_buffer("gate_skips", torch.zeros(2, dtype=torch.long))
        # fp16's loss scale: kept out of the buffers, so that model.double() or .half() cannot recast it.
        self.loss_scaler = DynamicLossScale(**loss_scale) if loss_scale is not None else None
        self.step = 0
        self._generator: Optional[torch.Generator] = None
        self.data_parallel = None  # a vaegan_fast.distributed.DataParallel once enable_data_parallel() ran

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def preset(cls, name: str, **overrides) -> "Model":
        """``Model.preset("seed")`` or ``Model.preset("wide")``, with any keyword overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    @property
    def device(self) -> torch.device:
        return self.gate_skips.device  # a buffer: moves with the model, found without walking the modules

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def backend(self) -> str:
        return self.config["backend"]

    @backend.setter
    def backend(self, backend: str) -> None:
        """Switch the backend of the built-in networks and the losses (custom networks keep their own)."""
        self.config["backend"] = backend
        for module in self.modules():
            if isinstance(module, FusedLinear):
                module.backend = backend

    def parameters_of(self, network: str) -> list:
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {network!r}")
        return list(getattr(self, network).parameters())

    def enable_data_parallel(self, group=None) -> "Model":
        """Train data-parallel over torch.distributed's (initialised) ``group``; see vaegan_fast.distributed.

        Each process then passes its slice of the global batch to train_step.
        """
        from .distributed import DataParallel
        self.data_parallel = DataParallel.current(group)
        return self

    def _draw_noise(self, batch: int, count: int, dtype: torch.dtype) -> list:
        """``count`` standard-normal [batch, latent] draws from the training stream, in order.

        Data-parallel, each is this rank's slice of one draw for the global batch, so N processes use the
        same numbers as one process on the concatenated batch.
        """
        gen, dp, latent = self._rng(), self.data_parallel, self.config["latent_dim"]
        rows = batch * (dp.world_size if dp is not None else 1)
        draws = [torch.randn(rows, latent, generator=gen, device=self.device, dtype=dtype) for _ in range(count)]
        if dp is not None:
            local = slice(dp.rank * batch, (dp.rank + 1) * batch)
            draws = [d[local] for d in draws]
        return draws

    def _rng(self) -> torch.Generator:
        """The generator of eps and z_p, on the model's device, seeded from the model's seed."""
        device = self.device
        gen = self._generator
        if gen is None or gen.device.type != device.type:
            gen = torch.Generator(device)
            gen.manual_seed(self.config["seed"] + 1_000_003 * self.step)
            self._generator = gen
        return gen

    # ----------------------------------------------------------------------------------------- inputs
    def _check_batch(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of pixel values, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor of pixel values in [0, 1], got dtype {x.dtype}")
        width = self.config["input_dim"]
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [batch, {width}], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one row, got shape {tuple(x.shape)}")
        if x.shape[1] != width:
            c, h, w = self.config["image_shape"]
            raise ValueError(f"x must have {width} features per row (the model's input_dim: images of {c}x{h}x{w} "
                             f"[channels x height x width], flattened), got {x.shape[1]}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.device}")
        if self.config["check_inputs"]:
            # One read-back from the device; Model(check_inputs=False) skips it for the fastest step.
            finite, in_range = torch.stack([torch.isfinite(x).all(), ((x >= 0) & (x <= 1)).all()]).tolist()
            if not finite:
                raise ValueError("x contains NaN or Inf values")
            if not in_range:
                raise ValueError("x must hold pixel values in [0, 1] (the decoder's sigmoid range)")
        # Any layout the reference accepts: a strided batch is copied, so every backend sees the same bits.
        return x.to(self.dtype).contiguous()

    def _check_backend(self, device: torch.device, dtype: torch.dtype) -> None:
        """Resolve the backend for a batch on ``device`` in ``dtype`` before the step changes anything (the
        random stream, the weights): a backend that cannot run here is refused by a call that leaves the
        model as it was."""
        from .ops import _dispatch
        from .ops.dense import FORWARD_OP as DENSE_FORWARD_OP
        compute = PRECISIONS[self.config["precision"]] or dtype
        if self.uses_routed_step:
            _dispatch.resolve(DENSE_FORWARD_OP, self.config["backend"], device, compute)
        _dispatch.resolve("reparam_kl", self.config["backend"], device, torch.float32
                          if compute in (torch.float16, torch.bfloat16) else compute)

    # ----------------------------------------------------------------------------------------- forward
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]: the sigmoid of the decoder's logits."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each row of x."""
        mu, _ = self.encoder(self._check_batch(x))
        return self.decode(mu)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n images from the prior, [n, input_dim] in [0, 1] (rows of ``config["image_shape"]`` flattened
        channel-first). Uses torch's RNG, not the training stream."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        z = torch.randn(n, self.config["latent_dim"], generator=generator, device=self.device, dtype=self.dtype)
        return self.decode(z)

    def _pixel_loss(self, rec_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Pixel-wise BCE of the reconstruction, from logits, summed over pixels, averaged over the batch."""
        return F.binary_cross_entropy_with_logits(rec_logits, x, reduction="sum") / x.shape[0]

    def _losses(self, x: torch.Tensor) -> dict:
        mode = self.config["mode"]
        if mode == "vae":
            return self._vae_losses(x)
        if mode == "gan":
            return self._gan_losses(x)
        cfg, backend = self.config, self.config["backend"]
        batch = x.shape[0]
        eps, z_prior = self._draw_noise(batch, 2, x.dtype)
        mu, logvar = self.encoder(x)
        z, kl = reparam_kl(mu, logvar, eps, backend=backend)
        rec_logits = self.decoder(z)
        prior_logits = self.decoder(z_prior)
        scores, features = self.discriminator(
            torch.cat([x, torch.sigmoid(rec_logits), torch.sigmoid(prior_logits)]))
        s_real, s_rec, s_prior = scores.reshape(3 * batch).split(batch)
        f_real, f_rec, _ = features.split(batch)

        prior = kl.mean()
        llike = feature_recon_loss(f_real, f_rec, backend=backend)
        fakes = (s_prior, s_rec) if cfg["recon_as_fake"] else (s_prior,)
        disc = discriminator_loss(s_real, *fakes, backend=backend)
        gen_loss = generator_loss(*fakes, saturating=cfg["saturating"], backend=backend)
        enc = prior + llike
        dec = cfg["gamma"] * llike + gen_loss
        pixel = None
        if cfg["pixel_weight"] > 0:
            pixel = self._pixel_loss(rec_logits, x)
            enc = enc + cfg["pixel_weight"] * pixel
            dec = dec + cfg["pixel_weight"] * pixel
        # The equilibrium gate's statistics (detached: they steer, they are not trained on).
        d_real = softplus(-s_real.detach()).mean()
        d_fake = softplus(s_prior.detach()).mean()
        losses = {"encoder": enc, "decoder": dec, "discriminator": disc, "kl": prior, "llike": llike,
                  "generator": gen_loss, "d_real": d_real, "d_fake": d_fake}
        if pixel is not None:
            losses["pixel"] = pixel
        return losses

    def _vae_losses(self, x: torch.Tensor) -> dict:
        mu, logvar = self.encoder(x)
        (eps,) = self._draw_noise(x.shape[0], 1, x.dtype)
        z, kl = reparam_kl(mu, logvar, eps, backend=self.config["backend"])
        prior, pixel = kl.mean(), self._pixel_loss(self.decoder(z), x)
        weighted = self.config["pixel_weight"] * pixel
        return {"encoder": prior + weighted, "decoder": weighted, "kl": prior, "pixel": pixel}

    def _gan_losses(self, x: torch.Tensor) -> dict:
        backend, batch = self.config["backend"], x.shape[0]
        (z_prior,) = self._draw_noise(batch, 1, x.dtype)
        scores, _ = self.discriminator(torch.cat([x, torch.sigmoid(self.decoder(z_prior))]))
        s_real, s_prior = scores.reshape(2 * batch).split(batch)
        gen_loss = generator_loss(s_prior, saturating=self.config["saturating"], backend=backend)
        return {"decoder": gen_loss, "discriminator": discriminator_loss(s_real, s_prior, backend=backend),
                "generator": gen_loss, "d_real": softplus(-s_real.detach()).mean(),
                "d_fake": softplus(s_prior.detach()).mean()}

    def _autocast(self):
        """torch.autocast in the model's precision (a no-op context for fp32)."""
        dtype = PRECISIONS[self.config["precision"]]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def losses(self, x: torch.Tensor) -> dict:
        """The three networks' losses on batch x ("encoder", "decoder", "discriminator") and their parts.

        Draws eps and z_p from the model's training stream, as train_step does. To train with your own
        optimizers, route each loss to its own network only (never sum them and call backward once):

            L = model.losses(x)
            for net in ("encoder", "decoder", "discriminator"):
                params = model.parameters_of(net)
                grads = torch.autograd.grad(L[net], params, retain_graph=True)
                for p, g in zip(params, grads):
                    p.grad = g
            # ...then step your optimizers, after all three gradients are taken.
        """
        return self._losses(self._check_batch(x))

    # ----------------------------------------------------------------------------------------- training
    def gate_decisions(self, d_real: torch.Tensor, d_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train_discriminator, train_decoder) as 0-dim bool tensors, by the equilibrium rule.

        Skip the discriminator when either statistic < eq - margin (it is winning), skip the decoder when
        either > eq + margin (it is losing badly); if both would be skipped, train both.
        """
        if not self.config["gating"]:
            true = torch.ones((), dtype=torch.bool, device=d_real.device)
            return true, true
        low = self.config["equilibrium"] - self.config["margin"]
        high = self.config["equilibrium"] + self.config["margin"]
        train_disc = ~((d_real < low) | (d_fake < low))
        train_dec = ~((d_real > high) | (d_fake > high))
        neither = ~(train_disc | train_dec)
        return train_disc | neither, train_dec | neither

    @property
    def uses_routed_step(self) -> bool:
        """Whether train_step runs the explicit routed step (built-in MLPs, mode "vaegan")."""
        return not self.config["custom_networks"] and self.config["mode"] == "vaegan"

    def routed_gradients(self, losses: dict, networks: Sequence[str] = NETWORKS,
                         loss_scale: Optional[torch.Tensor] = None) -> dict:
        """Each named network's gradient of its own loss alone (times ``loss_scale`` if given, a 0-dim tensor):
        {network: [grad per parameter]}."""
        grads = {}
        for name in networks:
            params = self.parameters_of(name)
            loss = losses[name] if loss_scale is None else losses[name] * loss_scale
            grads[name] = list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
        return grads

    def train_step(self, x: torch.Tensor) -> dict:
        """One VAE-GAN update of all three networks; returns detached 0-dim tensors on the model's device."""
        x = self._check_batch(x)
        self._check_backend(x.device, x.dtype)
        dp, scaler = self.data_parallel, self.loss_scaler
        scale = None
        if scaler is not None:
            scaler.to(x.device)
            scale = scaler.scale
        grads, pending = None, {}
        if self.uses_routed_step:
            # Built-in MLPs: each vector-Jacobian product formed once, without autograd (vaegan_fast/step.py).
            grads, master = {}, self.dtype
            compute = PRECISIONS[self.config["precision"]] or master

            def network_done(name, net_grads):
                # Low-precision gradients, full-precision master weights and updates. The cast comes before the
                # all-reduce: a low-precision sum of scaled gradients would overflow sooner.
                grads[name] = [g.to(master) for g in net_grads] if compute != master else net_grads
                if dp is not None:
                    pending[name] = dp.start_average(grads[name])

            eps, z_prior = self._draw_noise(x.shape[0], 2, x.dtype)
            # Data-parallel training keeps the Python streams, whose per-network callback starts each
            # all-reduce while the rest of the backward runs; otherwise the backend's whole step, if it has one.
            _, losses = routed_step_gradients(self, x.to(compute), eps, z_prior.to(compute), network_done,
                                              loss_scale=scale, whole_step=dp is None)
            if compute != master:
                losses = {k: v.to(master) for k, v in losses.items()}
        else:
            with self._autocast():
                losses = self._losses(x)
        if dp is not None:
            # One all-reduce for every reported loss, the gate's statistics among them: all ranks decide alike.
            keys = list(losses)
            report = dict(zip(keys, dp.average_(torch.stack([losses[k].detach() for k in keys])).unbind()))
        else:
            report = losses
        trained = list(MODES[self.config["mode"]])
        if "d_real" in losses:
            train_disc, train_dec = self.gate_decisions(report["d_real"], report["d_fake"])
        else:
            train_disc = train_dec = torch.ones((), dtype=torch.bool, device=x.device)
        gates = {"discriminator": train_disc, "decoder": train_dec}
        # Fused Adam skips a gated or overflowing update on the device; with RMSprop the host reads the decision.
        skips_on_device = self.config["optimizer"] == "adam"
        if self.config["gating"] and not skips_on_device:
            trained = [n for n in trained if bool(gates.get(n, True))]  # reads the decision on the host
        if grads is None:
            grads = self.routed_gradients(losses, trained, loss_scale=scale)
            if dp is not None:
                pending = {name: dp.start_average(net_grads) for name, net_grads in grads.items()}
        for name, work in pending.items():
            grads[name] = dp.finish_average(work)
        overflow = None
        if scaler is not None:
            # After the all-reduce an Inf or NaN on any rank is in every rank's sums, so all ranks skip alike.
            overflow = scaler.unscale_([g for net_grads in grads.values() for g in net_grads if g is not None])
            if not skips_on_device and bool(overflow):  # reads the decision on the host
                trained = []
        # All gradients are taken before any parameter changes in place.
        updates = []
        for name in trained:
            # Fused Adam skips its whole update (state included) when found_inf is 1: no host sync. Its
            # grad_scale stays unset: the gradients are already unscaled.
            skip = overflow if skips_on_device else None
            if skips_on_device and self.config["gating"] and name in gates:
                gated = (~gates[name]).float()
                skip = gated if skip is None else torch.maximum(skip, gated)
            opt = self.optimizers[name]
            # The optimizer's own list: the network's parameters in the same order, without walking modules.
            groups = getattr(opt, "param_groups", None)
            params = groups[0]["params"] if groups is not None and len(groups) == 1 else self.parameters_of(name)
            updates.append((opt, params, grads[name], skip))
        apply_updates(updates)
        if scaler is not None:
            scaler.update_(overflow)
        self.gate_skips += torch.stack([~train_disc, ~train_dec]).long()
        self.step += 1
        stats = {"train_discriminator": train_disc, "train_decoder": train_dec}
        for name in ("encoder", "decoder", "discriminator", "generator"):
            if name in report:
                stats[f"{name}_loss"] = report[name]
        for name in ("kl", "llike", "pixel", "d_real", "d_fake"):
            if name in report:
                stats[name] = report[name]
        if scaler is not None:
            stats["overflow"] = overflow > 0
            stats["loss_scale"] = scaler.scale.clone()  # a copy: the next step updates the scale in place
        return {k: v.detach() for k, v in stats.items()}

    # ----------------------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        gen = self._rng()
        state = {"format": CHECKPOINT_FORMAT, "config": copy.deepcopy(self.config), "weights": self.state_dict(),
                 "optimizers": {n: opt.state_dict() for n, opt in self.optimizers.items()}, "step": self.step,
                 "rng_device": gen.device.type, "rng_state": gen.get_state()}
        if self.loss_scaler is not None:
            state["loss_scale"] = self.loss_scaler.state_dict()
        return state

    def save(self, path: str | os.PathLike, extra: Optional[dict] = None) -> None:
        """Write config, weights, optimizer states, step count, RNG state and (fp16) the loss scale atomically
        to ``path``."""
        state = self.checkpoint_state()
        if extra is not None:
            state["extra"] = extra
        checkpoint.atomic_save(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location=None, *, encoder: Optional[nn.Module] = None,
             decoder: Optional[nn.Module] = None, discriminator: Optional[nn.Module] = None) -> "Model":
        """Restore a model saved by ``save``; a GPU checkpoint loads on a CPU with map_location="cpu"."""
        state = checkpoint.load(path, map_location)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
        missing = [k for k in ("config", "weights", "optimizers", "step", "rng_device", "rng_state") if k not in state]
        if missing or not isinstance(state["config"], dict) or "custom_networks" not in state["config"]:
            raise ValueError(f"{path} is not a complete {CHECKPOINT_FORMAT} checkpoint (missing "
                             f"{', '.join(missing) or 'its model configuration'})")
        config = dict(state["config"])
        custom = config.pop("custom_networks")
        if custom and encoder is None:
            raise ValueError(f"{path} was saved with custom networks: pass encoder=, decoder= and "
                             "discriminator= modules of the same architecture to Model.load")
        if not custom and encoder is not None:
            raise ValueError(f"{path} holds the built-in networks; do not pass custom modules")
        model = cls(**config, encoder=encoder, decoder=decoder, discriminator=discriminator)
        model.to(state["weights"]["gate_skips"].device)  # where torch.load put the tensors
        model.load_state_dict(state["weights"])
        for name, opt in model.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if model.loss_scaler is not None:
            model.loss_scaler.load_state_dict(state["loss_scale"])
        model.step = int(state["step"])
        model.restore_rng(state["rng_device"], state["rng_state"])
        model.checkpoint_extra = state.get("extra")  # what the caller of save() stored beside the model
        return model

    def restore_rng(self, device_type: str, rng_state: torch.Tensor) -> None:
        self._generator = None
        gen = self._rng()
        if gen.device.type == device_type:
            gen.set_state(rng_state.cpu())
        else:
            warnings.warn(f"the checkpoint's random stream was on {device_type} and the model is on "
                          f"{gen.device.type}: eps and z_p are reseeded from (seed, step), so the run "
                          "continues correctly but not bit-for-bit as it would have on the original device")
