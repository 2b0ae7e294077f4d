"""The routed VAE-GAN step for the built-in MLPs, with every vector-Jacobian product formed exactly once.

A straightforward step builds one autograd graph and calls torch.autograd.grad three times. That propagates
the feature-reconstruction gradient through the discriminator twice, pushes gradients to the discriminator's
input for the real rows (which nothing needs) and through rows whose upstream gradient is zero, and forms
products only to drop them. Here the forward pass keeps, per layer, its input and what its backward needs,
and the backward runs these streams, each on only the rows and layers where it is non-zero:

    discriminator (rows [x; x_p; x_rec], 3B; the order puts every stream on one contiguous block):
      D: dL_D/ds over the rows L_D reads (all 3B, or [x; x_p] when reconstructions are not fakes), top to
         bottom, weight gradients, no input gradient at the first layer
      G: dL_G/ds over the fake rows (x_p, and x_rec if reconstructions count as fakes), top to bottom,
         input gradients only
      U: dL_llike/dD_l(x_rec) over the B reconstruction rows, from the feature layer down, input gradients
         only (the encoder and the decoder share this product: the decoder's is gamma times it)
    at the discriminator's input (through the sigmoid, plus the pixel term's gradient on the logits):
      decoder's upstream   on x_rec: s' * (gamma U + G) + w_pix dL_pix,   on x_p: s' * G
      encoder's upstream   on x_rec: s' * U + w_pix dL_pix
    decoder (rows [z_p; z], 2B):
      Dd: the decoder's upstream over 2B rows, weight gradients, no input gradient at the first layer
      E:  the encoder's upstream over the B rows of z, input gradients only, down to dz
    encoder (B rows): dz and the KL's gradients through the reparameterization and the logvar clamp, weight
      gradients, no input gradient at the first layer.

The losses and the reparameterization run through the backend's fused kernels, which return each loss's
value and its gradient with respect to its inputs in one pass (``softplus_terms``, ``feature_recon_terms``,
``reparam_kl_forward`` / ``reparam_kl_backward``), so on the triton and native backends the whole step is
the project's kernels plus the optimizer. The native backend runs this whole function as one C++ op
(kernels/cpu/routed_step.cpp: the same kernels in the same order, without Python between them), which
``routed_step_gradients`` takes when it can (see ``whole_step``). ``step_flops`` counts the products this performs;
``tests/test_step.py`` checks that the gradients equal those of the three-grad step.

The step computes in x's dtype. In fp16, whose range is too narrow for the losses' sums and exp(logvar), the
losses, the reparameterization and the gradients they seed run in fp32 (as they do under autocast), and with
a ``loss_scale`` S every seed (the score, feature-reconstruction, pixel and KL gradients) enters the fp16
backward multiplied by S, so that small gradients do not vanish: the gradients returned are S times the true
ones (vaegan_fast/loss_scale.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .nn.networks import LOGVAR_MAX, LOGVAR_MIN
from .ops import _dispatch
from .ops.dense import FORWARD_OP as DENSE_FORWARD_OP, dense_chain_impls
from .ops.gan_losses import feature_recon_terms, softplus, softplus_terms
from .ops.image_head import image_head_backward, image_head_forward, loss_dtype_of
from .ops.reparam_kl import reparam_kl_backward, reparam_kl_forward

WHOLE_STEP_OP = "routed_step"  # a backend's whole step in one primitive (the native backend registers it)


@dataclass
class _Layer:
    weight: torch.Tensor
    bias: torch.Tensor
    activation: str
    negative_slope: float


def _as(t, dtype: torch.dtype):
    """``t`` in ``dtype``: no call at all when it already is (a no-op .to() still costs a dispatch)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _layers(fused_linears, dtype: torch.dtype) -> list:
    """The layers' parameters in the step's compute dtype (a cast copy when it differs from theirs)."""
    return [_Layer(_as(l.weight, dtype), _as(l.bias, dtype), l.activation, l.negative_slope) for l in fused_linears]


def _seed(grad: torch.Tensor, loss_scale, dtype: torch.dtype) -> torch.Tensor:
    """A loss's gradient that starts a backward stream: times the loss scale, in the compute dtype."""
    if loss_scale is not None:
        grad = grad.mul_(loss_scale)
    return _as(grad, dtype)


def _param_grads(layers_grads: list, count: int) -> list:
    """The gradients in the order of the network's parameters: each layer's weight, then its bias if any."""
    out = []
    for i in range(count):
        dw, db = layers_grads[i]
        out += [dw] if db is None else [dw, db]
    return out


@torch.no_grad()  # every gradient here is formed explicitly: autograd records nothing
def routed_step_gradients(model, x: torch.Tensor, eps: torch.Tensor, z_prior: torch.Tensor,
                          on_network_done=None, memory: dict | None = None, loss_scale=None,
                          whole_step: bool = True) -> tuple:
    """({network: [grad per parameter]}, losses) of one VAE-GAN step of ``model``'s built-in MLPs.

    x and z_prior are in the compute dtype; eps is cast to the reparameterization's. ``loss_scale`` (a 0-dim
    device tensor, or None) multiplies every gradient returned.

    ``on_network_done(name, grads)``, if given, is called as soon as each network's gradients are complete
    (discriminator, decoder, encoder, in that order): data-parallel training starts its all-reduce there,
    overlapping communication with the rest of the backward pass. ``memory``, if given, receives
    "saved_bytes": the bytes of the distinct tensors the forward pass keeps for the backward streams (what
    autograd's saved tensors are to a straightforward step).

    ``whole_step``: where the backend runs this whole step as one primitive ("routed_step": the native CPU
    backend does, in C++), use it, unless ``memory`` or ``loss_scale`` is asked for; ``on_network_done`` is then
    called for the three networks in the same order once the step is done (no overlap: data-parallel training
    passes False). The code below is its specification, and tests/test_routed_step.py checks it bit for bit.
    """
    done = on_network_done or (lambda name, grads: None)
    cfg, backend = model.config, model.config["backend"]
    batch = x.shape[0]
    body = list(model.encoder.body.layers) if hasattr(model.encoder.body, "layers") else []
    feature_layer = model.discriminator.feature_layer % (len(model.discriminator.net.layers) - 1)
    latent = cfg["latent_dim"]
    # The backend that runs the dense layers here; its whole-step primitive, if it has one.
    name = _dispatch.resolve(DENSE_FORWARD_OP, backend, x.device, x.dtype)[0]
    whole = _dispatch.implementation(WHOLE_STEP_OP, name) if whole_step else None
    if whole is not None and memory is None and loss_scale is None:
        networks = {"encoder": body + [model.encoder.head], "decoder": list(model.decoder.net.layers),
                    "discriminator": list(model.discriminator.net.layers)}
        grads, losses = whole(networks, x, eps, z_prior, latent, feature_layer, cfg["gamma"], cfg["pixel_weight"],
                              cfg["recon_as_fake"], cfg["saturating"], (LOGVAR_MIN, LOGVAR_MAX))
        for net in ("discriminator", "decoder", "encoder"):
            done(net, grads[net])
        return grads, losses
    enc_layers = _layers(body + [model.encoder.head], x.dtype)  # computes in x's dtype (the model's precision)
    dec_layers = _layers(model.decoder.net.layers, x.dtype)
    dis_layers = _layers(model.discriminator.net.layers, x.dtype)
    loss_dtype = loss_dtype_of(x.dtype)  # fp32 for fp16, whose range the losses' sums exceed

    # ---- forward
    # A network's forward, or one backward stream through it, is one chain call (ops/dense.py).
    forward, backward = dense_chain_impls(backend, x.device, x.dtype)
    stats, enc_cache = forward(enc_layers, x)
    mu, logvar_raw = stats[:, :latent], stats[:, latent:]
    logvar = logvar_raw.clamp(LOGVAR_MIN, LOGVAR_MAX)
    mu, logvar, eps = _as(mu, loss_dtype), _as(logvar, loss_dtype), _as(eps, loss_dtype)
    z, kl = reparam_kl_forward(mu, logvar, eps, backend)
    # Row order [prior; reconstruction] in the decoder and [real; prior; reconstruction] in the
    # discriminator: every stream below then works on one contiguous block of rows.
    logits, dec_cache = forward(dec_layers, torch.cat([z_prior, _as(z, x.dtype)]))
    # The images are written straight into the discriminator's input (no concatenation copy). Large
    # temporaries are costly on a CPU (each is fresh memory to fault in), so this section and the one
    # through the sigmoid below reuse buffers in place.
    dis_input = torch.empty(3 * batch, x.shape[1], device=x.device, dtype=x.dtype)
    dis_input[:batch].copy_(x)
    images = dis_input[batch:]
    pixel_weight = cfg["pixel_weight"]
    # images = sigmoid(logits), and the pixel term of the reconstructions, in one pass (ops/image_head.py)
    pixel = image_head_forward(logits, x, images, pixel_weight > 0, backend)
    scores, dis_cache = forward(dis_layers, dis_input)
    scores = _as(scores.reshape(3 * batch), loss_dtype)
    s_real, s_prior, s_rec = scores[:batch], scores[batch:2 * batch], scores[2 * batch:]
    features = dis_cache[feature_layer + 1][0]
    f_real, f_rec = _as(features[:batch], loss_dtype), _as(features[2 * batch:], loss_dtype)

    if memory is not None:
        kept = [t for cache in (enc_cache, dec_cache, dis_cache) for pair in cache for t in pair]
        kept += [logvar_raw, logvar, eps, mu, images, scores]
        distinct = {(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)): t for t in kept}
        memory["saved_bytes"] = sum(t.numel() * t.element_size() for t in distinct.values())

    # ---- losses with their gradients, from the fused loss kernels (value and gradient in one pass)
    llike, grad_real = feature_recon_terms(f_real, f_rec, backend)
    d_llike = _seed(grad_real.neg_(), loss_scale, x.dtype)  # d llike / d f_rec = (f_rec - f_real) / B
    fakes_end = 3 * batch if cfg["recon_as_fake"] else 2 * batch  # rows [batch, fakes_end) are the fakes
    fakes = [s_prior, s_rec] if cfg["recon_as_fake"] else [s_prior]
    ones = [1.0] * len(fakes)
    disc_loss, score_grads = softplus_terms([s_real, *fakes], [-1.0, *ones], [1.0, *ones], backend)
    grad_scores_d = _seed(torch.cat(score_grads), loss_scale, x.dtype)  # rows [real; prior (; reconstruction)]
    if cfg["saturating"]:
        gen_loss, score_grads = softplus_terms(fakes, ones, [-1.0] * len(fakes), backend)
    else:
        gen_loss, score_grads = softplus_terms(fakes, [-1.0] * len(fakes), ones, backend)
    grad_scores_g = _seed(torch.cat(score_grads) if len(score_grads) > 1 else score_grads[0], loss_scale, x.dtype)
    d_real = softplus(-s_real).mean()  # the gate's statistics
    d_fake = softplus(s_prior).mean()
    prior = kl.mean()
    enc_loss = prior + llike
    dec_loss = cfg["gamma"] * llike + gen_loss
    if pixel is not None:
        pixel = _as(pixel, loss_dtype)
        enc_loss = enc_loss + pixel_weight * pixel
        dec_loss = dec_loss + pixel_weight * pixel

    # ---- discriminator streams
    d_rows = slice(None) if fakes_end == 3 * batch else slice(0, fakes_end)
    _, d_grads = backward(dis_layers, dis_cache, grad_scores_d.unsqueeze(1), d_rows, True, False)
    grads = {"discriminator": _param_grads(d_grads, len(dis_layers))}
    done("discriminator", grads["discriminator"])
    g_input, _ = backward(dis_layers, dis_cache, grad_scores_g.unsqueeze(1), slice(batch, fakes_end), False, True)
    below = feature_layer + 1  # the feature-reconstruction gradient enters at the feature layer's output
    u_input, _ = backward(dis_layers[:below], dis_cache[:below], d_llike, slice(2 * batch, None), False, True)

    # ---- through the sigmoid into the decoder's logits (rows [prior; reconstruction]), with the pixel term's
    # gradient (times the loss scale in fp16) added on the reconstruction rows, in one pass
    dec_up, enc_up = image_head_backward(images, x, g_input, u_input, cfg["gamma"], pixel_weight / batch,
                                         cfg["recon_as_fake"], loss_scale, backend)

    # ---- decoder streams
    _, dd_grads = backward(dec_layers, dec_cache, dec_up, slice(None), True, False)
    grads["decoder"] = _param_grads(dd_grads, len(dec_layers))
    done("decoder", grads["decoder"])
    dz, _ = backward(dec_layers, dec_cache, enc_up, slice(batch, None), False, True)

    # ---- encoder: reparameterization, KL and the clamp, then the MLP
    grad_kl = torch.full_like(kl, 1.0 / batch)
    if loss_scale is not None:
        grad_kl.mul_(loss_scale)
    d_mu, d_logvar = reparam_kl_backward(mu, logvar, eps, _as(dz, loss_dtype), grad_kl, backend)
    d_logvar = d_logvar * ((logvar_raw >= LOGVAR_MIN) & (logvar_raw <= LOGVAR_MAX))
    _, e_grads = backward(enc_layers, enc_cache, _as(torch.cat([d_mu, d_logvar], 1), x.dtype), slice(None), True,
                          False)

    grads["encoder"] = _param_grads(e_grads, len(enc_layers))
    done("encoder", grads["encoder"])
    losses = {"encoder": enc_loss, "decoder": dec_loss, "discriminator": disc_loss, "kl": prior, "llike": llike,
              "generator": gen_loss, "d_real": d_real, "d_fake": d_fake}
    if pixel is not None:
        losses["pixel"] = pixel
    return grads, losses


def step_flops(model, batch: int, routed: bool = True) -> int:
    """Matrix-product FLOPs of one step (2 per multiply-add) for the built-in MLPs.

    ``routed=True`` counts this module's step; ``routed=False`` the straightforward three-grad step, in
    which autograd propagates through all 3B discriminator rows for the encoder's and the decoder's losses
    and through both decoder passes for the encoder's.
    """
    def sizes(mlp):
        return [(l.in_features, l.out_features) for l in mlp.layers]

    enc = sizes(model.encoder.body) if hasattr(model.encoder.body, "layers") else []
    enc = enc + [(model.encoder.head.in_features, model.encoder.head.out_features)]
    dec, dis = sizes(model.decoder.net), sizes(model.discriminator.net)
    feature_layer = model.discriminator.feature_layer % (len(dis) - 1)

    def fwd(layers, rows):
        return sum(2 * rows * k * n for k, n in layers)

    def input_grads(layers, rows, skip_first=False, top=None):
        layers = layers[: (top + 1) if top is not None else None]
        return sum(2 * rows * k * n for i, (k, n) in enumerate(layers) if i > 0 or not skip_first)

    b = batch
    total = fwd(enc, b) + fwd(dec, 2 * b) + fwd(dis, 3 * b)  # forward
    # A weight gradient needs the upstream gradient at its layer: input gradients above the first layer.
    total += fwd(enc, b) + input_grads(enc, b, skip_first=True)  # the encoder's own backward
    if routed:
        d_rows = 3 * b if model.config["recon_as_fake"] else 2 * b
        fakes = d_rows - b
        total += fwd(dis, d_rows) + input_grads(dis, d_rows, skip_first=True)  # D
        total += input_grads(dis, fakes)  # G
        total += input_grads(dis, b, top=feature_layer)  # U
        total += fwd(dec, 2 * b) + input_grads(dec, 2 * b, skip_first=True)  # Dd
        total += input_grads(dec, b)  # E
    else:
        # Each autograd.grad call propagates through whole batched tensors: all 3B discriminator rows.
        total += input_grads(dis, 3 * b, top=feature_layer) + input_grads(dec, b)  # the encoder's call
        total += fwd(dec, 2 * b) + input_grads(dec, 2 * b, skip_first=True) + input_grads(dis, 3 * b)  # decoder's
        total += fwd(dis, 3 * b) + input_grads(dis, 3 * b, skip_first=True)  # the discriminator's call
    return total
