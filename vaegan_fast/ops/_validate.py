"""Input checks shared by every op and every backend.

Each check raises an error that names the offending argument and says what was expected:
TypeError for a wrong type or a non-floating dtype, ValueError for shapes, devices and empty batches.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._autocast import autocast_dtype


def uniform_device(*tensors) -> Optional[torch.device]:
    """The device of the tensors when every one (None skipped after the first) is a floating-point
    torch.Tensor with the first's dtype and device, else None: the common case, decided in a few attribute
    reads. The ops run their named checks below only when this is None, so that the error still says which
    argument is wrong and how (on a small tensor the named checks had cost as much as the fused op itself)."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not first.is_floating_point():
        return None
    dtype, device = first.dtype, first.device
    for t in tensors[1:]:
        if t is not None and not (isinstance(t, torch.Tensor) and t.dtype is dtype and t.device == device):
            return None
    return device


def floating_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _agree(attribute: str, error, what: str, tensors: dict):
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if getattr(t, attribute) != getattr(first, attribute):
            raise error(f"{name} {what} {getattr(t, attribute)} but {first_name} {what} "
                        f"{getattr(first, attribute)}; all inputs must share one {attribute}")
    return getattr(first, attribute)


def same_device(**tensors: torch.Tensor) -> torch.device:
    return _agree("device", ValueError, "is on", tensors)


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    present = [t for t in tensors.values() if t is not None]
    first = present[0]
    if all(t.dtype == first.dtype for t in present):
        return first.dtype
    if autocast_dtype(first.device) is not None:
        return first.dtype  # under autocast, mixed dtypes are expected: each op casts (ops/_autocast.py)
    return _agree("dtype", TypeError, "has dtype", tensors)


def nonempty_batch(name: str, t: torch.Tensor) -> None:
    if t.dim() == 0 or t.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch (first) dimension, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")


def matrix(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [batch, features], got shape {tuple(t.shape)}")
    nonempty_batch(name, t)
