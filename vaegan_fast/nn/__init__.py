"""Layers and networks built on vaegan_fast.ops."""
from .layers import MLP, FusedLinear
from .networks import LOGVAR_MAX, LOGVAR_MIN, MLPDecoder, MLPDiscriminator, MLPEncoder

__all__ = ["FusedLinear", "LOGVAR_MAX", "LOGVAR_MIN", "MLP", "MLPDecoder", "MLPDiscriminator", "MLPEncoder"]
