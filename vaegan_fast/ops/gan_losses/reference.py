"""The GAN losses in plain PyTorch: the specification every backend is tested against (the math: __init__.py;
registered under "reference" there), and the training step's loss primitives, each the value with its
gradient with respect to the inputs."""
from __future__ import annotations

import torch


def softplus(t: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(t)) without overflow at large |t|."""
    return torch.clamp_min(t, 0) + torch.log1p(torch.exp(-t.abs()))


def discriminator_loss_reference(real_logits: torch.Tensor, fake_logits: tuple) -> torch.Tensor:
    loss = softplus(-real_logits).mean()
    for fake in fake_logits:
        loss = loss + softplus(fake).mean()
    return loss


def generator_loss_reference(fake_logits: tuple, saturating: bool) -> torch.Tensor:
    if saturating:
        return -sum(softplus(fake).mean() for fake in fake_logits)
    return sum(softplus(-fake).mean() for fake in fake_logits)


def feature_recon_loss_reference(features_real: torch.Tensor, features_fake: torch.Tensor) -> torch.Tensor:
    diff = (features_real - features_fake).reshape(features_real.shape[0], -1)
    return 0.5 * (diff * diff).sum(dim=1).mean()


def softplus_terms_reference(xs: list, signs: list, coeffs: list):
    """(sum_k c_k mean softplus(s_k x_k), [c_k s_k sigmoid(s_k x_k) / numel(x_k)])."""
    loss = sum(c * softplus(s * x).mean() for x, s, c in zip(xs, signs, coeffs))
    grads = [(c * s / x.numel()) * torch.sigmoid(s * x) for x, s, c in zip(xs, signs, coeffs)]
    return loss, grads


def feature_recon_terms_reference(features_real: torch.Tensor, features_fake: torch.Tensor):
    """(feature_recon_loss, its gradient with respect to features_real, (real - fake) / N)."""
    diff = features_real - features_fake
    return feature_recon_loss_reference(features_real, features_fake), diff / features_real.shape[0]
