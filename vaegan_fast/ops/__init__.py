"""The fused ops of vaegan_fast, one package per op, with a ``backend=`` keyword.

Each op's package holds its public function(s) and math (``__init__.py``), its reference (``reference.py``:
plain PyTorch, the specification every other backend is tested against) and its implementations on the
native and Triton backends (``native.py``, ``triton.py``):

    reparam_kl/    reparameterization + KL             kernels/cpu/reparam_kl.cpp, kernels/triton/reparam_kl.py
    gan_losses/    the GAN and feature losses          kernels/cpu/gan_losses.cpp, kernels/triton/gan_losses.py
    layer/         linear_act, the conv/dense layer    kernels/cpu/linear_act.cpp, fused_layer.cpp, plan_step.cpp;
                                                       kernels/triton/linear_act.py, conv.py
    image_head/    the training step's image head      kernels/cpu/image_head.cpp, kernels/triton/image_head.py

The backends' libraries load in ``_native_lib.py`` and ``_triton_lib.py``; ``_dispatch.py`` picks the
backend: ``auto`` (the default) the best one that can run on the inputs' device.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, available_backends
from .activations import ACTIVATIONS, apply_activation
from .gan_losses import discriminator_loss, feature_recon_loss, generator_loss, softplus
from . import image_head  # noqa: F401  (the training step's primitive; no public function)
from .layer import conv2d_act, conv_transpose2d_act, linear_act
from .reparam_kl import reparam_kl

# The Triton backend registers itself on import; a machine without a working Triton keeps every other
# backend, and naming "triton" there raises BackendUnavailableError with this reason.
try:
    from . import _triton_lib  # noqa: F401
    from .gan_losses import triton as _gan_losses_triton  # noqa: F401
    from .image_head import triton as _image_head_triton  # noqa: F401
    from .layer import triton as _layer_triton  # noqa: F401
    from .reparam_kl import triton as _reparam_kl_triton  # noqa: F401
except Exception as _exc:  # pragma: no cover - depends on the machine
    from . import _dispatch as _d

    _d.record_load_error("triton", f"Triton backend failed to load: {type(_exc).__name__}: {_exc}")
    del _d

# The native CPU backend (kernels/cpu/*.cpp, built by CMakeLists.txt from setup.py) registers itself on
# import; when its library is missing or fails to load, backend="native" raises BackendUnavailableError with
# this reason and backend="auto" falls back to the reference with one warning.
try:
    from . import _native_lib  # noqa: F401
    from .gan_losses import native as _gan_losses_native  # noqa: F401
    from .image_head import native as _image_head_native  # noqa: F401
    from .layer import native as _layer_native  # noqa: F401
    from .reparam_kl import native as _reparam_kl_native  # noqa: F401
except Exception as _exc:  # pragma: no cover - depends on the build
    from . import _dispatch as _d

    _hint = "" if "VAEGAN_FAST_" in str(_exc) else "; build it with `pip install --no-build-isolation -e .`"
    _d.record_load_error("native", f"{_exc}{_hint}")  # an environment setting refused: no build hint
    del _d



def backend_info() -> dict:
    """What the CPU backend runs on, and why: the native library's ISA ("generic", "avx2", "avx512"; None when
    the native backend did not load, with ``native_error``), the bf16 product path ("bf16": products on bf16
    operands through oneDNN, fp32 accumulation; "fp32": operands upcast), the fp32 product path ("onednn": the
    large fp32 GEMMs on oneDNN's matmul; "blas": all on torch's BLAS) and the reasons for each, next to what
    torch reports about the CPU; for the triton backend, why it did not load. The choices are made when
    vaegan_fast is imported (environment: VAEGAN_FAST_ARCH, VAEGAN_FAST_BF16_PRODUCTS, VAEGAN_FAST_FP32_PRODUCTS;
    see vaegan_fast/ops/_native_lib.py)."""
    import sys

    import torch

    from . import _dispatch as d

    info = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
            "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "isa": None, "isa_reason": None, "library": None, "cpu_isas": None, "bf16_products": None,
            "bf16_reason": None, "fp32_products": None, "fp32_reason": None, "native_error": None,
            "triton_error": d._load_errors.get("triton")}
    lib = sys.modules.get(__name__ + "._native_lib")
    if lib is None or "native" in d._load_errors:
        info["native_error"] = d._load_errors.get("native", "the native backend did not load")
    else:
        info.update(lib.info())
    return info


__all__ = [
    "ACTIVATIONS", "BACKENDS", "BackendUnavailableError", "apply_activation", "available_backends", "backend_info",
    "conv2d_act",
    "conv_transpose2d_act", "discriminator_loss", "feature_recon_loss", "generator_loss", "linear_act",
    "reparam_kl", "softplus",
]
