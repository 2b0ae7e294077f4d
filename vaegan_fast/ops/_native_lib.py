"""The "native" backend's library: the C++ CPU kernels of ``kernels/cpu/`` loaded as torch ops, and the helpers
every op's native module shares.

The library ``vaegan_fast/_native/libvaegan_fast_native*.so`` is built by the top-level CMakeLists.txt when
the package is installed (``pip install --no-build-isolation -e .``; setup.py drives CMake). It defines the
ops ``torch.ops.vaegan_fast_native.*`` (schemas in kernels/cpu/library.cpp) with CPU kernels and their
autograd formulas in C++ (torch::autograd::Function registered at the Autograd key, in the same .cpp files,
so no Python runs between the call and the kernel). Each op's ``native.py`` (vaegan_fast/ops/<op>/native.py)
adds the fake (meta) implementations of its C++ ops with ``torch.library`` and registers its implementation
with the dispatcher under "native", so ``torch.library.opcheck`` and torch.compile see ordinary custom ops.

Importing this module raises ImportError when the library is missing or fails to load; ``ops/__init__``
records the reason, so ``backend="native"`` says how to build it and ``backend="auto"`` falls back to the
reference (with one warning).

dtypes: float32, bfloat16 (computed in fp32), float64 (for gradcheck). float16 is refused with a TypeError, and
``backend="auto"`` passes float16 work to another backend.
Double backward (``create_graph=True``): each C++ backward, when grad mode is on, computes its result with
differentiable ATen ops from the saved tensors instead of calling the kernel.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch

from . import _dispatch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .`"
LIB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_native")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def find_library(folder: str = LIB_DIR) -> str:
    """The path of the built library in ``folder``; ImportError (with the way to build it) when absent."""
    found = sorted(glob.glob(os.path.join(folder, "*vaegan_fast_native*.so")))
    if not found:
        raise ImportError(f"the native CPU library is not built (no *vaegan_fast_native*.so in {folder})")
    return found[0]


def load_library(folder: str = LIB_DIR) -> None:
    path = find_library(folder)
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        raise ImportError(f"the native CPU library {path} failed to load: {exc}") from exc


load_library()


class _Ops:
    """The library's ops as the C++ callables behind their OpOverloads: calling those directly skips the
    overload packet's Python dispatch and the OpOverload's own Python frame (microseconds a call, which is
    most of the cost of an op on a small tensor). ``_op`` is torch's attribute for that callable (torch 2.0
    to 2.13 at least); without it the OpOverload itself is used."""

    def __getattr__(self, name):
        overload = getattr(torch.ops.vaegan_fast_native, name).default
        op = getattr(overload, "_op", overload)
        setattr(self, name, op)
        return op


_ops = _Ops()


def _availability(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else "the native backend runs on CPU tensors only"


_dispatch.set_availability("native", _availability)
_dispatch.set_dtypes("native", SUPPORTED_DTYPES)


def _check_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend 'native' supports float32, bfloat16 and float64 on the CPU; {name} has "
                            f"dtype {t.dtype} (float16 is not supported on the CPU: use bfloat16 or float32)")


def _call(op, *args):
    """``op(*args)`` with CPU autocast off: the kernels' own ATen calls (BLAS products) must not be recast by an
    enclosing autocast. The ops' native implementations cast their inputs themselves under autocast
    (upcast_under_autocast for the losses and reparam+KL, cast_under_autocast for linear_act) and otherwise do
    nothing but this call: on a small tensor each context, cast, check or Python frame had been a visible share
    of the op. Entering an autocast context costs microseconds, so it is done only when needed. The dtypes need
    no check here: resolve() passed only those this backend takes, and the C++ ops check them again, naming the
    argument."""
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return op(*args)
    return op(*args)


def _untracked(op, *args):
    """``op(*args)`` without recording autograd history (the step's primitives form their gradients
    themselves); the step already runs under no_grad, so the context is entered only when needed."""
    if torch.is_grad_enabled():
        with torch.no_grad():
            return op(*args)
    return op(*args)
