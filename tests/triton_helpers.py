"""Shared pieces of the Triton backend tests: dtypes by availability, strided inputs, forward+backward runs."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE

# fp16 only where CUDA is available (the rule in tests/numerics.py / DEVELOPERS.md); bf16 everywhere.
LOW_DTYPES = [torch.bfloat16] + ([torch.float16] if DEVICE.type == "cuda" else [])
DTYPES = [torch.float32] + LOW_DTYPES

requires_triton = pytest.mark.skipif(
    "triton" not in __import__("vaegan_fast.ops", fromlist=["available_backends"]).available_backends(
        DEVICE, "reparam_kl"),
    reason="the triton backend cannot run here")


def strided(shape, dtype, device, kind: str):
    """A tensor of ``shape`` whose memory layout is not contiguous: 'slice' (every other column of a wider
    tensor), 'transpose' (column-major), or 'contiguous'."""
    if kind == "contiguous":
        return torch.randn(shape, dtype=dtype, device=device)
    if kind == "slice":
        wide = torch.randn(shape[0], 2 * shape[1], dtype=dtype, device=device)
        return wide[:, ::2]
    if kind == "transpose":
        return torch.randn(shape[1], shape[0], dtype=dtype, device=device).t()
    raise ValueError(kind)


def run(fn, inputs, grad_outputs=None):
    """Outputs of ``fn(*inputs)`` and the gradients of every floating input that requires grad."""
    inputs = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
              for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outs]
    wrt = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(outs, wrt, [g.to(o.dtype) for g, o in zip(grad_outputs, outs)],
                                allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], list(grads)


def as_double(inputs):
    return [x.detach().double() if isinstance(x, torch.Tensor) else x for x in inputs]


def assert_rounded_once(name: str, actual: torch.Tensor, truth: torch.Tensor):
    """Every element of ``actual`` (fp16/bf16) within half an ulp of the fp64 ``truth`` plus fp32 noise: what
    fp32 arithmetic rounded once to nearest gives (a truncating rounding misses by up to a whole ulp)."""
    info = torch.finfo(actual.dtype)
    truth = truth.detach().double()
    ulp = info.eps * torch.exp2(torch.floor(torch.log2(truth.abs().clamp_min(info.tiny))))
    err = (actual.detach().double() - truth).abs()
    excess = err / (0.5 * ulp + 1e-5 * truth.abs())
    i = int(excess.flatten().argmax())
    off = (err / ulp).flatten()[i].item()
    assert excess.max() <= 1, (f"{name}: [{i}] got {actual.flatten()[i].item():.6g}, want "
                               f"{truth.flatten()[i].item():.6g}: {off:.3f} ulp off")
