"""The "triton" backend's library: the kernels of ``vaegan_fast.kernels`` (kernels/triton/), imported once,
and the helpers every op's triton module shares.

Each op's ``triton.py`` (vaegan_fast/ops/<op>/triton.py) wraps its kernel launches in
``torch.library.custom_op`` with a fake (meta) implementation and, for the forward ops, ``register_autograd``,
so torch.compile traces a model through them without graph breaks and ``torch.library.opcheck`` can check
them. The backward passes are custom ops as well (AOT autograd traces backward with fake tensors too).

Double backward (``create_graph=True``, e.g. a gradient penalty): each backward, when grad mode is on,
computes its result with plain differentiable PyTorch from the saved tensors instead of launching the
kernel, so second derivatives are correct (just not fused).

Autocast (on the inputs' device type): ``linear_act`` runs in the autocast dtype, like ``F.linear``; the
losses and ``reparam_kl`` run in fp32 (their exp/log are on autocast's fp32 list, as in the reference).

Availability: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the kernels were
imported (Triton's interpreter; used by the tests on machines without a GPU).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from . import _dispatch


def _import_kernels():
    """``vaegan_fast.kernels``; from a source checkout that was not pip-installed, the repo's kernels/triton/."""
    try:
        return importlib.import_module("vaegan_fast.kernels")
    except ModuleNotFoundError as exc:
        if exc.name != "vaegan_fast.kernels":
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "kernels", "triton")
    spec = importlib.util.spec_from_file_location("vaegan_fast.kernels", os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    if spec is None:
        raise ImportError(f"vaegan_fast.kernels is not installed and {folder} has no kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["vaegan_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("vaegan_fast.kernels", None)
        raise
    return module


kernels = _import_kernels()

_INTERPRET_AT_IMPORT = kernels.interpreting()


def _availability(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _INTERPRET_AT_IMPORT:
        return None
    return ("Triton kernels run on CUDA tensors, or on CPU tensors only under Triton's interpreter "
            "(set TRITON_INTERPRET=1 before importing vaegan_fast)")


_dispatch.set_availability("triton", _availability)


def _check_dtypes(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in kernels.SUPPORTED_DTYPES:
            raise TypeError(f"backend 'triton' supports {[str(d) for d in kernels.SUPPORTED_DTYPES]}; "
                            f"{name} has dtype {t.dtype}")
