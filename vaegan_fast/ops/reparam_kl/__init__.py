"""Reparameterization + KL divergence to a standard normal prior.

    z[b, j]  = mu[b, j] + exp(logvar[b, j] / 2) * eps[b, j]          eps ~ N(0, I)
    kl[b]    = 0.5 * sum_j (mu[b, j]^2 + exp(logvar[b, j]) - logvar[b, j] - 1)

The formula is applied exactly as written: clamping logvar to a safe range is the encoder's job
(vaegan_fast.nn.MLPEncoder clamps it to [-30, 20]).

Implementations: reference.py (plain PyTorch, the specification), native.py (kernels/cpu/reparam_kl.cpp),
triton.py (kernels/triton/reparam_kl.py). Tests: tests/test_ops_reference.py, tests/test_native_ops.py,
tests/test_triton_reparam_kl.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _dispatch, _validate
from .._autocast import upcast_dtype
from . import reference
from .reference import reparam_kl_backward_reference, reparam_kl_forward_reference, reparam_kl_reference

OP = "reparam_kl"

_dispatch.register(OP, "reference")(reparam_kl_reference)


def reparam_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None, *,
               generator: Optional[torch.Generator] = None, seed: Optional[int] = None, backend: str = "auto"):
    """Sample ``z = mu + exp(logvar/2) * eps`` and the per-row KL to N(0, I).

    mu, logvar: [B, D] floating tensors of one dtype and device. eps: [B, D] or None, in which case it is
    drawn from ``generator`` (torch's RNG) here, before the backend runs, so every backend sees the same
    noise. Returns ``(z [B, D], kl [B])``.

    seed (opt-in, exclusive with eps and generator): a backend that can draw eps inside its kernel (its
    implementation has ``draws_eps_from_seed = True``, e.g. "triton") does so from this seed, never writing
    eps to memory; same seed, same z. Other backends draw eps from a torch.Generator seeded with it.
    """
    device = _validate.uniform_device(mu, logvar, eps)
    if device is None:
        _validate.floating_tensor("mu", mu)
        _validate.floating_tensor("logvar", logvar)
    _validate.matrix("mu", mu)
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar must have the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    if eps is not None:
        if device is None:
            _validate.floating_tensor("eps", eps)
        if eps.shape != mu.shape:
            raise ValueError(f"eps must have the shape of mu {tuple(mu.shape)}, got {tuple(eps.shape)}")
    if seed is not None:
        if eps is not None or generator is not None:
            raise ValueError("seed draws eps itself: pass either seed or eps/generator, not both")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if device is None:
        device = _validate.same_device(mu=mu, logvar=logvar, eps=eps)
        _validate.same_dtype(mu=mu, logvar=logvar, eps=eps)
    _, impl = _dispatch.resolve(OP, backend, device, upcast_dtype(mu.dtype, device))
    if seed is not None:
        if getattr(impl, "draws_eps_from_seed", False):
            return impl(mu, logvar, None, seed=seed)
        generator = torch.Generator(device=device).manual_seed(seed)
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype)
    return impl(mu, logvar, eps)


# ---------------------------------------------------------------------------------------------------------
# Primitives of the explicit training step (vaegan_fast/step/): forward, and backward from given upstream
# gradients, no autograd (the formulas: reference.py). Each backend registers its fused kernels for them.
# ---------------------------------------------------------------------------------------------------------
FORWARD_OP, BACKWARD_OP = "reparam_kl_forward", "reparam_kl_backward"

_dispatch.register(FORWARD_OP, "reference")(reparam_kl_forward_reference)
_dispatch.register(BACKWARD_OP, "reference")(reparam_kl_backward_reference)


def reparam_kl_forward(mu, logvar, eps, backend: str):
    _, impl = _dispatch.resolve(FORWARD_OP, backend, mu.device, mu.dtype)
    return impl(mu, logvar, eps)


def reparam_kl_backward(mu, logvar, eps, grad_z, grad_kl, backend: str):
    _, impl = _dispatch.resolve(BACKWARD_OP, backend, mu.device, mu.dtype)
    return impl(mu, logvar, eps, grad_z, grad_kl)

