"""How close is close enough: the project's tolerance rules, shared by the tests and the benchmarks.

fp32 (TF32 off): the result's max abs error against an fp64 reference is at most 2e-5 of the reference's max
magnitude. fp16 / bf16: the error against the fp64 reference may be at most twice the error that eager
PyTorch makes in that precision on the same inputs, plus a floor of a few units in the last place.
fp64: against the fp64 reference with a tight bound (checks the formula, not the rounding).
"""
from __future__ import annotations

from typing import Optional

import torch

FP32_RELATIVE = 2e-5
FP64_RELATIVE = 1e-12
FLOOR_ULPS = 4


def _describe(name, actual, truth, err, bound):
    flat = (actual.double() - truth).abs().flatten()
    worst = torch.topk(flat, min(3, flat.numel())).indices
    rows = ", ".join(f"[{i}] got {actual.flatten()[i].item():.6g} want {truth.flatten()[i].item():.6g}"
                     for i in worst.tolist())
    return f"{name}: max error {err:.3g} > bound {bound:.3g}; worst: {rows}"


def mismatch(name: str, actual: torch.Tensor, truth: torch.Tensor,
             eager: Optional[torch.Tensor] = None) -> Optional[str]:
    """None when ``actual`` is close enough to ``truth`` (an fp64 reference), else a description.

    ``eager`` is the eager-PyTorch reference computed in ``actual``'s dtype; it is needed for fp16/bf16.
    """
    if actual.shape != truth.shape:
        return f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    truth = truth.detach().double()
    actual = actual.detach()
    if not torch.isfinite(actual).all():
        return f"{name}: non-finite values in the result"
    if truth.numel() == 0:
        return None
    scale = truth.abs().max().item()
    err = (actual.double() - truth).abs().max().item()
    if actual.dtype == torch.float64:
        bound = FP64_RELATIVE * max(scale, 1e-300)
    elif actual.dtype == torch.float32:
        bound = FP32_RELATIVE * scale
    else:
        if eager is None:
            raise ValueError(f"{name}: low-precision checks need the eager result in {actual.dtype}")
        eager_err = (eager.detach().double() - truth).abs().max().item()
        bound = 2 * eager_err + FLOOR_ULPS * torch.finfo(actual.dtype).eps * scale
    return None if err <= bound else _describe(name, actual, truth, err, bound)
