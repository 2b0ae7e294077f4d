"""The fused ops of vaegan_fast, one module each, with a ``backend=`` keyword.

``reference`` is plain PyTorch and is the specification every other backend is tested against;
``auto`` (the default) picks the best backend that can run on the inputs' device.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends
from .gan_losses import discriminator_loss, feature_recon_loss, generator_loss, softplus
from .linear_act import ACTIVATIONS, apply_activation, linear_act
from .reparam_kl import reparam_kl

__all__ = [
    "ACTIVATIONS", "BACKENDS", "BackendUnavailableError", "apply_activation", "available_backends",
    "discriminator_loss", "feature_recon_loss", "generator_loss", "linear_act", "reparam_kl", "softplus",
]
