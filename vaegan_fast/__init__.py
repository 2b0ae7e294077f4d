"""vaegan_fast: a performance engine for training VAE-GANs in PyTorch."""
from . import ops

__version__ = "0.1.0"
__all__ = ["ops"]
