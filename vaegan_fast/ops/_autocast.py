"""What the fused ops do under torch.autocast, shared by the backends that launch their own kernels.

Like F.linear, ``linear_act`` runs in the autocast dtype; the losses and reparam+KL (exp/log, on autocast's
fp32 list) run in fp32. Kernels are then called with autocast off, so the ATen calls inside them (the native
backend's BLAS products) do not recast their operands behind their back.
"""
from __future__ import annotations

from typing import Optional

import torch


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``'s type, or None when autocast is off there (or has no
    meaning there, as on the meta device)."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:  # a device type autocast does not know
        pass
    return None


def upcast_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the losses and reparam+KL compute in for inputs of ``dtype`` (what a backend must take)."""
    if dtype in (torch.float16, torch.bfloat16) and autocast_dtype(device) is not None:
        return torch.float32
    return dtype


def cast_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype linear_act computes in for inputs of ``dtype`` (what a backend must take)."""
    return autocast_dtype(device) or dtype


def upcast_under_autocast(*tensors):
    """Under autocast, fp16/bf16 inputs in fp32 (for the losses and reparam+KL)."""
    dev = next(t for t in tensors if t is not None).device
    if autocast_dtype(dev) is None:
        return tensors
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t
                 for t in tensors)


def cast_under_autocast(*tensors):
    """Under autocast, every input in the autocast dtype (for linear_act, as F.linear does)."""
    dev = next(t for t in tensors if t is not None).device
    dtype = autocast_dtype(dev)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None else None for t in tensors)
