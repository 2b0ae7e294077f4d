"""Reparameterization + KL in plain PyTorch: the specification every backend is tested against (the math:
__init__.py; registered under "reference" there).

The training step's primitives (no autograd) form the gradients from given upstream ones:
    d mu = dz + dkl * mu        d logvar = 0.5 dz exp(logvar / 2) eps + 0.5 dkl (exp(logvar) - 1)
"""
from __future__ import annotations

import torch


def reparam_kl_reference(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor):
    """The specification: plain PyTorch in the inputs' dtype, differentiable by autograd."""
    z = mu + torch.exp(logvar * 0.5) * eps
    kl = 0.5 * (mu * mu + torch.exp(logvar) - logvar - 1.0).sum(dim=1)
    return z, kl


def reparam_kl_forward_reference(mu, logvar, eps):
    return reparam_kl_reference(mu, logvar, eps)


def reparam_kl_backward_reference(mu, logvar, eps, grad_z, grad_kl):
    std = torch.exp(0.5 * logvar)
    grad_mu = grad_z + grad_kl[:, None] * mu
    grad_logvar = 0.5 * grad_z * std * eps + 0.5 * grad_kl[:, None] * (std * std - 1.0)
    return grad_mu, grad_logvar
