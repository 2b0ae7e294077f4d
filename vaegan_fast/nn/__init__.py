"""Fused layers (vaegan_fast.nn.layers), their specs (spec.py) and the networks built from them (networks.py)."""
from .layers import Flatten, FusedConv2d, FusedConvTranspose2d, FusedLinear, Unflatten
from .networks import LOGVAR_MAX, LOGVAR_MIN, Decoder, Discriminator, Encoder, Program

__all__ = ["Decoder", "Discriminator", "Encoder", "Flatten", "FusedConv2d", "FusedConvTranspose2d", "FusedLinear",
           "LOGVAR_MAX", "LOGVAR_MIN", "Program", "Unflatten"]
