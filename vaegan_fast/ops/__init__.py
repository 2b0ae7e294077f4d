"""The fused ops of vaegan_fast, one module each, with a ``backend=`` keyword.

``reference`` is plain PyTorch and is the specification every other backend is tested against;
``auto`` (the default) picks the best backend that can run on the inputs' device.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends
from .gan_losses import discriminator_loss, feature_recon_loss, generator_loss, softplus
from .linear_act import ACTIVATIONS, apply_activation, linear_act
from .reparam_kl import reparam_kl

# The Triton backend registers itself on import; a machine without a working Triton keeps every other
# backend, and naming "triton" there raises BackendUnavailableError with this reason.
try:
    from . import _triton  # noqa: F401
except Exception as _exc:  # pragma: no cover - depends on the machine
    from . import _dispatch as _d

    _d.record_load_error("triton", f"Triton backend failed to load: {type(_exc).__name__}: {_exc}")
    del _d

# The native CPU backend (kernels/cpu/*.cpp, built by CMakeLists.txt from setup.py) registers itself on
# import; when its library is missing or fails to load, backend="native" raises BackendUnavailableError with
# this reason and backend="auto" falls back to the reference with one warning.
try:
    from . import _native  # noqa: F401
except Exception as _exc:  # pragma: no cover - depends on the build
    from . import _dispatch as _d

    _d.record_load_error("native", f"{_exc}; build it with `pip install --no-build-isolation -e .`")
    del _d

__all__ = [
    "ACTIVATIONS", "BACKENDS", "BackendUnavailableError", "apply_activation", "available_backends",
    "discriminator_loss", "feature_recon_loss", "generator_loss", "linear_act", "reparam_kl", "softplus",
]
