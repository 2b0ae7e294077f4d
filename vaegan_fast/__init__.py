"""vaegan_fast: a performance engine for training VAE-GANs in PyTorch."""
from . import ops
from .ops import backend_info
from .graphs import CudaGraphStep
from .model import BASELINE_OPTIONS, PRESETS, RECOMMENDED_BATCH, Model

__version__ = "0.1.0"
__all__ = ["BASELINE_OPTIONS", "CudaGraphStep", "Model", "PRESETS", "RECOMMENDED_BATCH", "backend_info", "ops"]
