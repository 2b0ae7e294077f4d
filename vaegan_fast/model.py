"""vaegan_fast.Model: the VAE-GAN of Larsen et al. (2016) with correctly routed updates.

One training step on a batch x (see shared docs/vaegan.md, the specification):
    mu, logvar = Enc(x);  z, kl = reparam_kl(mu, logvar);  x_p = Dec(z_p), z_p ~ N(0, I);  x_rec = Dec(z)
    s, D_l = Dis([x; sigmoid(x_rec); sigmoid(x_p)])             (one discriminator pass over all three)
    kl    = mean kl                      llike = feature_recon_loss(D_l(x), D_l(x_rec))
    pixel = sum BCE(x, x_rec) / B        disc  = discriminator_loss(s(x), s(x_p) [, s(x_rec)])
    generator = generator_loss(s(x_p) [, s(x_rec)])
and each network's loss combines them as vaegan_fast.step.plan.LOSSES says (encoder kl + encoder_llike_weight
llike + pixel_weight pixel, decoder gamma llike + generator + pixel_weight pixel, discriminator disc). Each network's
gradient comes from its own loss alone, all taken before any parameter changes, then each optimizer steps.
The decoder decodes the prior samples first: with a batch norm in the decoder the two calls update its
running averages in the order the training step's plan uses. With discriminator_norm="separate" the
discriminator's batch norm normalises each of the three sets over its own rows, as three calls of Dis on x,
x_p and x_rec (in that order) would.

The same class trains the two ablations a VAE-GAN is judged against (``mode=``): "vae" (encoder and
decoder: KL and the pixel likelihood, no discriminator) and "gan" (decoder and discriminator on real data and
prior samples, no encoder).

Networks built from the fused layers (the built-in architectures, or your own vaegan_fast.nn programs) train
through the planned step (vaegan_fast/step/), which forms each vector-Jacobian product once; other modules
train through autograd with the same routing.
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
from .nn import networks as builtin
from .nn.layers import FUSED_LAYERS
from .optim import apply_updates
from .ops import discriminator_loss, feature_recon_loss, generator_loss, reparam_kl, softplus
from .step import RoutedStep
from .step.plan import LOSSES, loss_weights

NETWORKS = ("encoder", "decoder", "discriminator")
# How the discriminator's batch norm takes its statistics over the sets it sees in one step: all together
# ([x; x_p; x_rec] as one batch, Larsen et al.'s code) or each set over its own rows.
DISCRIMINATOR_NORMS = ("joint", "separate")
# The networks each mode trains.
MODES = {mode: tuple(n for n in NETWORKS if n in LOSSES[mode]) for mode in LOSSES}
OPTIMIZERS = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}
# The dtype the step computes in; parameters, optimizer states and updates stay in the parameters' dtype.
# fp16 adds dynamic loss scaling (vaegan_fast/loss_scale.py).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = "vaegan_fast/1"

MLP_DEFAULTS = dict(encoder_hidden=(128, 64, 32), decoder_hidden=(32, 64, 128), discriminator_hidden=(128, 64, 32),
                    activation="leaky_relu", negative_slope=0.2)
PRESETS = {
    # The foundation's MLPs (batch 256), sized to the images (image_shape, default Fashion-MNIST's (1, 28, 28)).
    "seed": dict(architecture="mlp", latent_dim=16, encoder_hidden=(128, 64, 32), decoder_hidden=(32, 64, 128),
                 discriminator_hidden=(128, 64, 32)),
    # enc 784-1024-512, latent 128, dec 128-512-1024-784, disc 784-1024-512-1 on 28x28 (batch 512).
    "wide": dict(architecture="mlp", latent_dim=128, encoder_hidden=(1024, 512), decoder_hidden=(512, 1024),
                 discriminator_hidden=(1024, 512)),
    # Two conv blocks per network for Fashion-MNIST (vaegan_fast.nn.networks.conv_networks; batch 64); D_l is
    # the discriminator's second conv block. Its VAE-GAN defaults were tuned (docs/quality.md): with gamma 1 and
    # no gating the GAN term overwhelmed the decoder (FID far above the VAE's); with batch statistics per set in
    # the discriminator every seed's FID lands 30% or more below the VAE's, with shared ones seed 1 did not.
    "conv": dict(architecture="conv", latent_dim=32, image_shape=(1, 28, 28), feature_layer=1, gamma=0.01,
                 gating=True, discriminator_norm="separate"),
    # Larsen et al.'s networks for 64x64 RGB (batch 64); D_l is the fourth conv before its batch norm.
    "larsen64": dict(architecture="larsen64", latent_dim=128, image_shape=(3, 64, 64), feature_layer=3,
                     feature_point="pre_norm"),
}
RECOMMENDED_BATCH = {"seed": 256, "wide": 512, "conv": 64, "larsen64": 64}

# The configuration of the straightforward eager baseline in bench/: what comparisons run.
BASELINE_OPTIONS = dict(gamma=1.0, pixel_weight=0.0, recon_as_fake=True, saturating=False, gating=False,
                        lr=2e-4, betas=(0.5, 0.999))  # each preset's own feature layer


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

    ``architecture`` builds the networks: "mlp" (from the size arguments), "conv" or "larsen64" (fixed layers
    for ``image_shape``; see vaegan_fast.nn.networks). Or pass ``encoder``, ``decoder`` and ``discriminator``
    modules: programs of vaegan_fast.nn layers train through the planned step, other modules through autograd
    (see vaegan_fast.nn.networks for the contract).
    """

    def __init__(self, input_dim: Optional[int] = None, latent_dim: int = 16,
                 encoder_hidden: Optional[Sequence[int]] = None, decoder_hidden: Optional[Sequence[int]] = None,
                 discriminator_hidden: Optional[Sequence[int]] = None, activation: Optional[str] = None,
                 negative_slope: Optional[float] = None, *, gamma: float = 1.0, pixel_weight: float = 1.0,
                 encoder_llike_weight: float = 1.0,
                 recon_as_fake: bool = True, saturating: bool = False, gating: bool = False,
                 equilibrium: float = 0.68, margin: float = 0.35, feature_layer: int = -1,
                 feature_point: str = "output", discriminator_norm: str = "joint", optimizer: str = "adam",
                 lr=2e-4, betas=(0.5, 0.999),
                 backend: str = "auto", check_inputs: bool = True, seed: int = 0, mode: str = "vaegan",
                 precision: str = "fp32", loss_scale: Optional[dict] = None, encoder: Optional[nn.Module] = None,
                 decoder: Optional[nn.Module] = None, discriminator: Optional[nn.Module] = None,
                 image_shape: Optional[Sequence[int]] = None, architecture: str = "mlp"):
        super().__init__()
        custom = [m is not None for m in (encoder, decoder, discriminator)]
        if any(custom) and not all(custom):
            raise ValueError("pass all three of encoder, decoder and discriminator, or none of them")
        if architecture not in builtin.ARCHITECTURES:
            raise ValueError(f"architecture must be one of {builtin.ARCHITECTURES}, got {architecture!r}")
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
        if discriminator_norm not in DISCRIMINATOR_NORMS:
            raise ValueError(f"discriminator_norm must be one of {DISCRIMINATOR_NORMS}, got {discriminator_norm!r}")
        mlp_args = dict(encoder_hidden=encoder_hidden, decoder_hidden=decoder_hidden,
                        discriminator_hidden=discriminator_hidden, activation=activation,
                        negative_slope=negative_slope)
        if architecture != "mlp" and not all(custom):
            given = [k for k, v in mlp_args.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} size the mlp architecture; the {architecture!r} "
                                 "architecture has fixed layers")
        mlp_args = {k: MLP_DEFAULTS[k] if v is None else v for k, v in mlp_args.items()}
        input_dim, image_shape = image_shape_of(input_dim, image_shape)
        latent_dim = _count("latent_dim", latent_dim)
        encoder_hidden = _sizes("encoder_hidden", mlp_args["encoder_hidden"])
        decoder_hidden = _sizes("decoder_hidden", mlp_args["decoder_hidden"])
        discriminator_hidden = _sizes("discriminator_hidden", mlp_args["discriminator_hidden"])
        activation = mlp_args["activation"]
        gamma, pixel_weight = _number("gamma", gamma, minimum=0), _number("pixel_weight", pixel_weight, minimum=0)
        encoder_llike_weight = _number("encoder_llike_weight", encoder_llike_weight, minimum=0)
        margin, equilibrium = _number("margin", margin, minimum=0), _number("equilibrium", equilibrium)
        negative_slope = _number("negative_slope", mlp_args["negative_slope"])
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
        mlp = architecture == "mlp" or all(custom)  # the other architectures have fixed layers: nothing to record
        self.config = dict(
            architecture=architecture, input_dim=int(input_dim), image_shape=image_shape, latent_dim=latent_dim,
            encoder_hidden=encoder_hidden if mlp else None, decoder_hidden=decoder_hidden if mlp else None,
            discriminator_hidden=discriminator_hidden if mlp else None, activation=activation if mlp else None,
            negative_slope=negative_slope if mlp else None, gamma=gamma, pixel_weight=pixel_weight,
            encoder_llike_weight=encoder_llike_weight,
            recon_as_fake=recon_as_fake, saturating=saturating, gating=gating, equilibrium=equilibrium,
            margin=margin, feature_layer=int(feature_layer), feature_point=feature_point,
            discriminator_norm=discriminator_norm, optimizer=optimizer,
            lr=lrs, betas=betas_per_net, backend=backend, check_inputs=check_inputs, seed=seed, mode=mode,
            precision=precision, loss_scale=loss_scale, custom_networks=all(custom))

        if all(custom):
            self.encoder, self.decoder, self.discriminator = encoder, decoder, discriminator
        else:
            with torch.random.fork_rng(devices=[]):  # initial weights from the model's seed alone
                torch.manual_seed(seed)
                if architecture == "mlp":
                    nets = builtin.mlp_networks(image_shape, latent_dim, encoder_hidden, decoder_hidden,
                                                discriminator_hidden, activation, negative_slope, feature_layer,
                                                backend)
                elif architecture == "conv":
                    nets = builtin.conv_networks(image_shape, latent_dim, feature_layer, feature_point, backend)
                else:
                    nets = builtin.larsen64_networks(image_shape, latent_dim, feature_layer, feature_point, backend)
                self.encoder, self.decoder, self.discriminator = nets

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
        self._routed = RoutedStep(self) if self.uses_routed_step else None

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def preset(cls, name: str, **overrides) -> "Model":
        """``Model.preset("seed" | "wide" | "conv" | "larsen64")``, with any keyword overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
        options = {**PRESETS[name], **overrides}
        if options.get("mode") == "vae" and "gating" not in overrides:
            options["gating"] = False  # a preset's gating is for the modes with a discriminator
        return cls(**options)

    @property
    def device(self) -> torch.device:
        return self.gate_skips.device  # a buffer: moves with the model, found without walking the modules

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def input_shape(self) -> tuple:
        """The per-sample shape of a batch: what the encoder's program takes ((C*H*W,) for the mlp
        architecture, (C, H, W) for the convolutional ones); flat (input_dim,) for other custom modules."""
        net = getattr(self.encoder, "net", None) if builtin.is_program_network(self.encoder) else None
        if net is not None:
            return net.in_shape
        if self.config["mode"] == "gan" and builtin.is_program_network(self.discriminator):
            return self.discriminator.net.in_shape
        return (self.config["input_dim"],)

    @property
    def backend(self) -> str:
        return self.config["backend"]

    @backend.setter
    def backend(self, backend: str) -> None:
        """Switch the backend of the fused layers and the losses (other custom modules keep their own)."""
        self.config["backend"] = backend
        for module in self.modules():
            if isinstance(module, FUSED_LAYERS):
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
        shape = self.input_shape
        want = f"[batch, {', '.join(map(str, shape))}]"
        c, h, w = self.config["image_shape"]
        what = (f"images of {c}x{h}x{w} [channels x height x width], flattened" if len(shape) == 1
                else "[channels, height, width]")
        if x.dim() != 1 + len(shape):
            raise ValueError(f"x must be {1 + len(shape)}-D {want} ({what}), got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x must hold at least one row, got shape {tuple(x.shape)}")
        if tuple(x.shape[1:]) != shape:
            if len(shape) == 1:
                raise ValueError(f"x must have {shape[0]} features per row (the model's input_dim: {what}), "
                                 f"got {x.shape[1]}")
            raise ValueError(f"x must be {want} ({what}), got shape {tuple(x.shape)}")
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
        compute = PRECISIONS[self.config["precision"]] or dtype
        if self._routed is not None:
            self._routed.kernels(device, compute)
        _dispatch.resolve("reparam_kl", self.config["backend"], device, torch.float32
                          if compute in (torch.float16, torch.bfloat16) else compute)

    # ----------------------------------------------------------------------------------------- forward
    @contextlib.contextmanager
    def _inference(self):
        """The networks in eval mode (a batch norm uses its running averages), restored afterwards."""
        modes = [m.training for m in (self.encoder, self.decoder, self.discriminator)]
        for m in (self.encoder, self.decoder, self.discriminator):
            m.eval()
        try:
            yield
        finally:
            for m, mode in zip((self.encoder, self.decoder, self.discriminator), modes):
                m.train(mode)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of x, the networks in eval mode (running batch-norm statistics)."""
        with self._inference():
            return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1]: the sigmoid of the decoder's logits (eval mode)."""
        with self._inference():
            return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decode the posterior mean of each image of x (eval mode)."""
        mu, _ = self.encode(self._check_batch(x))
        return self.decode(mu)

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n images from the prior in [0, 1], in the model's input shape ([n, C*H*W] for the mlp
        architecture, flattened channel-first; [n, C, H, W] for the conv ones), eval mode. Uses torch's RNG,
        not the training stream."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        z = torch.randn(n, self.config["latent_dim"], generator=generator, device=self.device, dtype=self.dtype)
        return self.decode(z)

    def _losses(self, x: torch.Tensor) -> dict:
        """The straightforward step's losses through autograd (the specification the planned step equals)."""
        cfg, backend, mode = self.config, self.config["backend"], self.config["mode"]
        batch = x.shape[0]
        terms, out = {}, {}
        if mode == "vaegan":
            eps, z_prior = self._draw_noise(batch, 2, x.dtype)
        elif mode == "vae":
            (eps,) = self._draw_noise(batch, 1, x.dtype)
        else:
            (z_prior,) = self._draw_noise(batch, 1, x.dtype)
        if mode != "gan":
            mu, logvar = self.encoder(x)
            z, kl = reparam_kl(mu, logvar, eps, backend=backend)
            terms["kl"] = kl.mean()
        prior_logits = self.decoder(z_prior) if mode != "vae" else None  # first: see the module docstring
        rec_logits = self.decoder(z) if mode != "gan" else None
        if mode != "gan" and cfg["pixel_weight"] > 0:
            terms["pixel"] = F.binary_cross_entropy_with_logits(rec_logits, x, reduction="sum") / batch
        if mode != "vae":
            images = [x, torch.sigmoid(rec_logits), torch.sigmoid(prior_logits)] if mode == "vaegan" else \
                [x, torch.sigmoid(prior_logits)]
            if cfg["discriminator_norm"] == "separate":
                # One call per set, in the plan's order x, x_p, x_rec (the running averages' update order).
                outs = {i: self.discriminator(images[i]) for i in ((0, 2, 1) if mode == "vaegan" else (0, 1))}
                scores = torch.cat([outs[i][0] for i in range(len(images))])
                features = torch.cat([outs[i][1] for i in range(len(images))])
            else:
                scores, features = self.discriminator(torch.cat(images))
            scores = scores.reshape(len(images) * batch)
            s_real, s_prior = scores[:batch], scores[-batch:]
            fakes = (s_prior, scores[batch:2 * batch]) if mode == "vaegan" and cfg["recon_as_fake"] else (s_prior,)
            terms["disc"] = discriminator_loss(s_real, *fakes, backend=backend)
            terms["generator"] = generator_loss(*fakes, saturating=cfg["saturating"], backend=backend)
            if mode == "vaegan":
                terms["llike"] = feature_recon_loss(features[:batch], features[batch:2 * batch], backend=backend)
            # The equilibrium gate's statistics (detached: they steer, they are not trained on).
            out.update(d_real=softplus(-s_real.detach()).mean(), d_fake=softplus(s_prior.detach()).mean())
        for net, weights in loss_weights(mode, cfg).items():
            loss = None
            for term, w in weights.items():
                part = terms[term] if w == 1.0 else terms[term] * w
                loss = part if loss is None else loss + part
            out[net] = loss
        out.update({k: terms[k] for k in ("kl", "llike", "generator", "pixel") if k in terms})
        return out

    def _autocast(self):
        """torch.autocast in the model's precision (a no-op context for fp32)."""
        dtype = PRECISIONS[self.config["precision"]]
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def losses(self, x: torch.Tensor) -> dict:
        """The three networks' losses on batch x ("encoder", "decoder", "discriminator") and their parts.

        Draws eps and z_p from the model's training stream, as train_step does, and runs the networks in
        training mode (a batch norm uses the batch's statistics and updates its running averages). To train
        with your own optimizers, route each loss to its own network only (never sum them and call backward
        once):

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
        """Whether train_step runs the planned step (networks built from vaegan_fast.nn programs)."""
        return all(builtin.is_program_network(m) for m in (self.encoder, self.decoder, self.discriminator))

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
        """One VAE-GAN update of the mode's networks; returns detached 0-dim tensors on the model's device."""
        x = self._check_batch(x)
        self._check_backend(x.device, x.dtype)
        dp, scaler = self.data_parallel, self.loss_scaler
        scale = None
        if scaler is not None:
            scaler.to(x.device)
            scale = scaler.scale
        grads, pending = None, {}
        trained = list(MODES[self.config["mode"]])
        if self._routed is not None:
            grads, master = {}, self.dtype

            def network_done(name, net_grads):
                # In the master weights' dtype where they are summed or unscaled (step/__init__.py casts them
                # before the all-reduce: a low-precision sum of scaled gradients would overflow sooner);
                # otherwise a bf16 step's may stay bf16, which apply_updates widens as Adam reads them.
                grads[name] = net_grads
                if dp is not None:
                    pending[name] = dp.start_average(grads[name])

            # Data-parallel training keeps the Python executor, whose per-network callback starts each
            # all-reduce while the rest of the backward runs; otherwise the backend's whole step, if it has one.
            losses = self._routed(x, scale, network_done, whole_step=dp is None,
                                  master_grads=dp is not None or scaler is not None)
            losses = {k: v.to(master) if v.dtype != master else v for k, v in losses.items()}
        else:
            with self._autocast():
                losses = self._losses(x)
        if dp is not None:
            # One all-reduce for every reported loss, the gate's statistics among them: all ranks decide alike.
            keys = list(losses)
            report = dict(zip(keys, dp.average_(torch.stack([losses[k].detach() for k in keys])).unbind()))
        else:
            report = losses
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
        weights = state["weights"]
        if "architecture" not in config:  # written before the networks became programs: the MLPs' old keys
            config["architecture"] = "mlp"
            weights = _renamed_mlp_weights(weights, len(config["encoder_hidden"]))
        if custom and encoder is None:
            raise ValueError(f"{path} was saved with custom networks: pass encoder=, decoder= and "
                             "discriminator= modules of the same architecture to Model.load")
        if not custom and encoder is not None:
            raise ValueError(f"{path} holds the built-in networks; do not pass custom modules")
        model = cls(**config, encoder=encoder, decoder=decoder, discriminator=discriminator)
        model.to(weights["gate_skips"].device)  # where torch.load put the tensors
        model.load_state_dict(weights)
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


def _renamed_mlp_weights(weights: dict, hidden: int) -> dict:
    """State-dict keys of the MLP networks as they were before they became programs: encoder.body.layers.i and
    encoder.head (now encoder.net.layers.i and .hidden), decoder/discriminator.net.layers.i (unchanged)."""
    out = {}
    for key, value in weights.items():
        if key.startswith("encoder.body.layers."):
            key = "encoder.net.layers." + key[len("encoder.body.layers."):]
        elif key.startswith("encoder.head."):
            key = f"encoder.net.layers.{hidden}." + key[len("encoder.head."):]
        out[key] = value
    return out
