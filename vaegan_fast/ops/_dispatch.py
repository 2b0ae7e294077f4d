"""Backend selection for the fused ops.

Every op has a plain-PyTorch ``reference`` implementation (its specification). Faster backends register
an implementation per op under a name ("triton", "native") together with a check that says whether the
backend can run on a given device, and optionally the dtypes it computes in. ``backend="auto"`` picks the
first usable one in the order of preference for the device, skipping a backend that cannot take the dtype
(float16 on the native CPU backend); naming an unknown backend is a ValueError, naming one that cannot run
here is a BackendUnavailableError that says why, and naming one that cannot take the dtype is a TypeError
that names it.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

BACKENDS = ("reference", "native", "triton")

# Preference of "auto", best first, by device type.
_AUTO_ORDER = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}

_impls: dict[tuple[str, str], Callable] = {}
# backend -> function(device) returning None when usable there, else the reason it is not.
_availability: dict[str, Callable[[torch.device], Optional[str]]] = {"reference": lambda device: None}
# backend -> the dtypes it computes in (a backend absent here takes every floating dtype).
_dtypes: dict[str, tuple] = {}
# backend -> why it failed to load (set by the module that tried to load it).
_load_errors: dict[str, str] = {}
# backends whose load failure "auto" has already warned about (one warning per backend and process).
_warned_load_errors: set[str] = set()
# resolve()'s answers: every fused-op call resolves its backend, and on small tensors the search itself was a
# visible share of the call. Keyed on the load failures too, so recording one (or a test patching them)
# never serves a stale answer; the setters below clear it.
_resolved: dict[tuple, tuple[str, Callable]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run the op on these inputs."""


def register(op: str, backend: str) -> Callable[[Callable], Callable]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn: Callable) -> Callable:
        _impls[(op, backend)] = fn
        _resolved.clear()
        return fn

    return decorate


def implementation(op: str, backend: str) -> Optional[Callable]:
    """What ``backend`` registered for ``op``, or None (no availability or dtype checks: for composite
    primitives whose parts were resolved already)."""
    return _impls.get((op, backend))


def set_availability(backend: str, check: Callable[[torch.device], Optional[str]]) -> None:
    _availability[backend] = check
    _resolved.clear()


def set_dtypes(backend: str, dtypes: tuple) -> None:
    _dtypes[backend] = tuple(dtypes)
    _resolved.clear()


def _dtype_refusal(backend: str, dtype: Optional[torch.dtype]) -> Optional[str]:
    supported = _dtypes.get(backend)
    if dtype is None or supported is None or dtype in supported:
        return None
    return (f"backend {backend!r} cannot compute in {dtype}; it takes "
            f"{', '.join(str(d) for d in supported)}")


def record_load_error(backend: str, reason: str) -> None:
    _load_errors[backend] = reason
    _resolved.clear()


def _unusable_reason(op: str, backend: str, device: torch.device) -> Optional[str]:
    if backend in _load_errors:
        return _load_errors[backend]
    if (op, backend) not in _impls or backend not in _availability:
        return f"the {backend!r} backend has no implementation of {op}"
    return _availability[backend](device)


def resolve(op: str, backend: str, device: torch.device,
            dtype: Optional[torch.dtype] = None) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` of ``op`` for tensors on ``device`` that it computes in
    ``dtype`` (None: do not check the dtype)."""
    key = (op, backend, device, dtype, tuple(_load_errors))
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _resolve(op, backend, device, dtype)
    return found


def _resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype]) -> tuple[str, Callable]:
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            if _unusable_reason(op, name, device) is None and _dtype_refusal(name, dtype) is None:
                return name, _impls[(op, name)]
            if name in _load_errors and name not in _warned_load_errors:
                _warned_load_errors.add(name)
                warnings.warn(f"backend='auto' skips {name!r}, which failed to load: {_load_errors[name]}",
                              RuntimeWarning, stacklevel=4)
        raise BackendUnavailableError(f"no backend can run {op} on {device}")  # unreachable: reference
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    reason = _unusable_reason(op, backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run {op} on {device}: {reason}")
    refusal = _dtype_refusal(backend, dtype)
    if refusal is not None:
        raise TypeError(f"{op}: {refusal}")
    return backend, _impls[(op, backend)]


def available_backends(device: torch.device | str = "cpu", op: str = "linear_act",
                       dtype: Optional[torch.dtype] = None) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if _unusable_reason(op, b, device) is None and _dtype_refusal(b, dtype) is None]
