"""The "native" backend's library: the C++ CPU kernels of ``kernels/cpu/`` loaded as torch ops, and the helpers
every op's native module shares.

The libraries ``vaegan_fast/_native/libvaegan_fast_native_<isa>.so`` are built by the top-level CMakeLists.txt
when the package is installed (``pip install --no-build-isolation -e .``; setup.py drives CMake). They define the
ops ``torch.ops.vaegan_fast_native.*`` (schemas in kernels/cpu/library.cpp) with CPU kernels and their
autograd formulas in C++ (torch::autograd::Function registered at the Autograd key, in the same .cpp files,
so no Python runs between the call and the kernel). Each op's ``native.py`` (vaegan_fast/ops/<op>/native.py)
adds the fake (meta) implementations of its C++ ops with ``torch.library`` and registers its implementation
with the dispatcher under "native", so ``torch.library.opcheck`` and torch.compile see ordinary custom ops.

Three choices are made here, once, at import (``backend_info()`` reports them and why):

- **ISA.** The same kernels are built for ``generic`` (no ISA flags), ``avx2`` and ``avx512``; exactly one is
  loaded per process (they register the same op namespace). The default follows ATen's own dispatch,
  ``torch.backends.cpu.get_cpu_capability()`` (which honours ``ATEN_CPU_CAPABILITY``), so our kernels use the
  vector width torch's do; ``VAEGAN_FAST_ARCH=generic|avx2|avx512`` overrides it, and an ISA the CPU cannot
  execute is refused with an ImportError (an illegal instruction later would kill the process).
- **bf16 products.** Where the CPU has bf16 units (``torch.cpu._is_avx512_bf16_supported()`` or
  ``_is_amx_tile_supported()``) the bf16 ops form their GEMMs and convolutions on bf16 operands (oneDNN, fp32
  accumulation): about 2.5x the fp32 rate on a Zen 4, 5x on AMX. Elsewhere bf16 products are emulated at
  about a tenth of fp32's rate, so the operands are upcast and the products run in fp32; the same where
  ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) caps oneDNN below its bf16 instructions.
  ``VAEGAN_FAST_BF16_PRODUCTS=bf16|fp32|auto`` forces the choice; ``bf16_products(mode)`` switches it for a
  block of code (tests run both paths on any machine). Both paths meet the bf16 accuracy rule
  (vaegan_fast/testing.py).
- **fp32 products.** torch's BLAS (MKL in its x86-64 wheels) runs its own fastest kernels on Intel CPUs only;
  elsewhere (an AMD Zen 4: 7-80% faster, docs/performance.md) fp32 GEMMs of more than 2^24 multiply-adds go
  to oneDNN's matmul, the one ATen calls for bf16 products ("onednn"; smaller ones stay on BLAS, which costs
  less per call). The library tries oneDNN's matmul once at load: torch 2.13 refuses it, fp32 included, where
  oneDNN may not use AVX-512 (an AVX2-only CPU, or ``ONEDNN_MAX_CPU_ISA=AVX2``), and there BLAS forms them all.
  ``VAEGAN_FAST_FP32_PRODUCTS=onednn|blas|auto`` forces the choice and ``fp32_products(mode)``
  switches it for a block of code. Both paths meet the fp32 rule; their bits differ.

Importing this module raises ImportError when the library is missing or fails to load; ``ops/__init__``
records the reason, so ``backend="native"`` says how to build it and ``backend="auto"`` falls back to the
reference (with one warning).

dtypes: float32, bfloat16 (products as above, everything else computed in fp32), float64 (for gradcheck).
float16 is refused with a TypeError, and
``backend="auto"`` passes float16 work to another backend.
Double backward (``create_graph=True``): each C++ backward, when grad mode is on, computes its result with
differentiable ATen ops from the saved tensors instead of calling the kernel.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from . import _dispatch

BUILD_HINT = "build it with `pip install --no-build-isolation -e .`"
LIB_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_native")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
ISAS = ("generic", "avx2", "avx512")  # narrowest first
ARCH_ENV = "VAEGAN_FAST_ARCH"
BF16_ENV = "VAEGAN_FAST_BF16_PRODUCTS"
BF16_MODES = ("auto", "bf16", "fp32")
FP32_ENV = "VAEGAN_FAST_FP32_PRODUCTS"
FP32_MODES = ("auto", "onednn", "blas")
_CAPABILITY_ISA = {"DEFAULT": "generic", "NO AVX": "generic", "AVX2": "avx2", "AVX512": "avx512"}
# oneDNN's names (dnnl_cpu_isa_t) for caps below its bf16 instructions (avx512_core_bf16): under them a bf16
# product is emulated, at a tenth of the fp32 rate or less (docs/performance.md); and for caps below AMX.
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
ONEDNN_ISAS_WITHOUT_AMX = ONEDNN_ISAS_WITHOUT_BF16 + ("AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16")


def library_path(isa: str, folder: str = LIB_DIR) -> str:
    return os.path.join(folder, f"libvaegan_fast_native_{isa}.so")


def cpu_isas() -> tuple:
    """The ISAs of ISAS this CPU can execute, narrowest first (from torch's cpuinfo, not from
    ATEN_CPU_CAPABILITY, which only lowers what ATen chooses)."""
    return ("generic",) + tuple(isa for isa in ISAS[1:] if _cpu_has(isa))


def _cpu_has(isa: str) -> bool:
    """Whether the CPU executes our ``isa`` build: ATen's own cpuinfo checks when torch exposes them, else
    /proc/cpuinfo's flags (avx2 + fma + f16c; avx512f + bw + vl + dq)."""
    probe = {"avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported"}[isa]
    fn = getattr(torch.cpu, probe, None)
    if fn is not None:
        try:
            return bool(fn())
        except Exception:  # pragma: no cover
            pass
    flags = _proc_flags()
    need = {"avx2": {"avx2", "fma", "f16c"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}[isa]
    return need <= flags


def _proc_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover
        pass
    return set()


def choose_isa(folder: str = LIB_DIR) -> tuple:
    """(isa, reason): VAEGAN_FAST_ARCH when set (refused when the CPU cannot execute it or it is not built),
    else the ISA of ATen's own CPU dispatch, narrowed to the widest one built."""
    runnable = cpu_isas()
    forced = os.environ.get(ARCH_ENV, "").strip().lower()
    if forced and forced != "auto":
        if forced not in ISAS:
            raise ImportError(f"{ARCH_ENV}={forced!r}: choose one of {', '.join(ISAS)} (or auto)")
        if forced not in runnable:
            raise ImportError(f"{ARCH_ENV}={forced}: this CPU cannot execute {forced} code (it runs "
                              f"{', '.join(runnable)}); unset {ARCH_ENV} or choose one of those")
        if not os.path.exists(library_path(forced, folder)):
            raise ImportError(f"{ARCH_ENV}={forced}: {library_path(forced, folder)} is not built")
        return forced, f"{ARCH_ENV}={forced}"
    capability = torch.backends.cpu.get_cpu_capability()
    wanted = _CAPABILITY_ISA.get(capability, "generic")
    for isa in reversed(ISAS[:ISAS.index(wanted) + 1]):
        if isa in runnable and os.path.exists(library_path(isa, folder)):
            why = f"torch's CPU capability {capability}"
            return isa, why if isa == wanted else f"{why}; the {wanted} library is not built"
    raise ImportError(f"the native CPU library is not built (no libvaegan_fast_native_<isa>.so for "
                      f"{', '.join(runnable)} in {folder})")


def find_library(folder: str = LIB_DIR) -> str:
    """The path of the library this process loads from ``folder``; ImportError when none fits."""
    return library_path(choose_isa(folder)[0], folder)


def cpu_has_bf16_units() -> bool:
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # pragma: no cover
            pass
    return False


def _env_mode(env: str, modes: tuple) -> str:
    mode = os.environ.get(env, "auto").strip().lower() or "auto"
    if mode not in modes:
        raise ImportError(f"{env}={mode!r}: choose one of {', '.join(modes)}")
    return mode


def choose_bf16_products() -> tuple:
    """(path, reason): "bf16" or "fp32", from VAEGAN_FAST_BF16_PRODUCTS or the CPU."""
    mode = _env_mode(BF16_ENV, BF16_MODES)
    return (mode, f"{BF16_ENV}={mode}") if mode != "auto" else _bf16_rule()


def _bf16_rule() -> tuple:
    if not cpu_has_bf16_units():
        return "fp32", "the CPU has no bf16 units (bf16 products would be emulated): operands upcast to fp32"
    env, cap = onednn_isa_cap()
    if cap in ONEDNN_ISAS_WITHOUT_BF16:
        return "fp32", (f"{env}={cap} keeps oneDNN off the CPU's bf16 units (bf16 products would be emulated): "
                        "operands upcast to fp32")
    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()) and cap not in ONEDNN_ISAS_WITHOUT_AMX
    return "bf16", "the CPU has bf16 units (" + ("AMX" if amx else "avx512_bf16") + "): oneDNN bf16 products"


def onednn_isa_cap() -> tuple:
    """(variable, ISA name in upper case) of the cap on oneDNN's instruction set the user set, or ("", "")
    (oneDNN reads ONEDNN_MAX_CPU_ISA, else the older DNNL_MAX_CPU_ISA, once, at its first primitive)."""
    for env in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(env, "").strip().upper()
        if value:
            return env, value
    return "", ""


def cpu_vendor() -> str:
    """The CPU's vendor string from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...; "" where unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return ""


def choose_fp32_products(onednn_problem: str) -> tuple:
    """(path, reason): "onednn" or "blas", from VAEGAN_FAST_FP32_PRODUCTS or the CPU and torch's BLAS;
    onednn_problem: why oneDNN's matmul cannot run here, "" where it can (the library tries it)."""
    mode = _env_mode(FP32_ENV, FP32_MODES)
    if mode == "onednn" and onednn_problem:
        raise ImportError(f"{FP32_ENV}=onednn: {onednn_problem}; unset it or choose blas")
    return (mode, f"{FP32_ENV}={mode}") if mode != "auto" else _fp32_rule(onednn_problem)


def _fp32_rule(onednn_problem: str) -> tuple:
    if onednn_problem:
        return "blas", f"{onednn_problem}: torch's BLAS"
    vendor, mkl = cpu_vendor(), torch.backends.mkl.is_available()
    if vendor == "GenuineIntel" and mkl:
        return "blas", "an Intel CPU: torch's BLAS (MKL) runs its own kernels for it"
    return "onednn", (f"a CPU not made by Intel ({vendor or 'vendor unknown'}): oneDNN's matmul for fp32 "
                      f"products over 2^24 multiply-adds, {'MKL' if mkl else 'BLAS'} for smaller ones")


_STATE: dict = {}
_MODES = {"bf16_products": BF16_MODES, "fp32_products": FP32_MODES}
_REASON = {"bf16_products": "bf16_reason", "fp32_products": "fp32_reason"}


def _apply(path: str, mode: str, min_macs: Optional[int] = None) -> None:
    """Hand a product path to the library; min_macs: the smallest fp32 product oneDNN forms (default: more
    than 2^24 multiply-adds; tests send every product there)."""
    native = torch.ops.vaegan_fast_native
    if path == "bf16_products":
        native.set_bf16_products(mode == "bf16")
    else:
        if mode == "onednn" and min_macs is None:
            min_macs = native.large_product_macs() + 1
        native.set_onednn_min_macs(min_macs if mode == "onednn" else -1)
        _STATE["onednn_min_macs"] = min_macs if mode == "onednn" else None
    _STATE[path] = mode


def load_library(folder: str = LIB_DIR) -> None:
    isa, isa_reason = choose_isa(folder)
    path = library_path(isa, folder)
    bf16_mode, bf16_reason = choose_bf16_products()
    _env_mode(FP32_ENV, FP32_MODES)  # refused before anything is loaded; chosen once the library says what it has
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        raise ImportError(f"the native CPU library {path} failed to load: {exc}") from exc
    built = torch.ops.vaegan_fast_native.build_isa()
    onednn_problem = torch.ops.vaegan_fast_native.onednn_matmul_problem()
    fp32_mode, fp32_reason = choose_fp32_products(onednn_problem)
    _STATE.update(isa=built, isa_reason=isa_reason, library=path, bf16_reason=bf16_reason, fp32_reason=fp32_reason,
                  onednn_problem=onednn_problem)
    _apply("bf16_products", bf16_mode)
    _apply("fp32_products", fp32_mode)


load_library()


def _set(path: str, mode: str, min_macs: Optional[int] = None) -> str:
    if mode not in _MODES[path]:
        raise ValueError(f"{path.replace('_', ' ')}: choose one of {', '.join(_MODES[path])}, got {mode!r}")
    if mode == "onednn" and _STATE["onednn_problem"]:
        raise ValueError(f"fp32 products: {_STATE['onednn_problem']}; choose blas")
    previous = _STATE[path]
    reason = f"set_{path}({mode!r})"
    if mode == "auto":
        mode = _bf16_rule()[0] if path == "bf16_products" else _fp32_rule(_STATE["onednn_problem"])[0]
    _apply(path, mode, min_macs)
    _STATE[_REASON[path]] = reason
    return previous


@contextlib.contextmanager
def _switched(path: str, mode: str, min_macs: Optional[int] = None):
    previous = (_STATE[path], _STATE[_REASON[path]], _STATE.get("onednn_min_macs"))
    _set(path, mode, min_macs)
    try:
        yield
    finally:
        _apply(path, previous[0], previous[2])
        _STATE[_REASON[path]] = previous[1]


def get_bf16_products() -> str:
    """The bf16 product path now in force: "bf16" or "fp32"."""
    return _STATE["bf16_products"]


def set_bf16_products(mode: str) -> str:
    """Switch the bf16 product path ("bf16", "fp32" or "auto": what the CPU suggests); returns the previous one.
    For tests and benchmarks: the step's results differ between the paths, so switch between steps only."""
    return _set("bf16_products", mode)


def bf16_products(mode: str):
    """``with bf16_products("bf16"): ...`` runs the block on that product path, then restores the previous."""
    return _switched("bf16_products", mode)


def get_fp32_products() -> str:
    """The fp32 product path now in force: "onednn" or "blas"."""
    return _STATE["fp32_products"]


def set_fp32_products(mode: str) -> str:
    """Switch the fp32 product path ("onednn", "blas" or "auto"); returns the previous one. As for bf16: switch
    between steps only."""
    return _set("fp32_products", mode)


def fp32_products(mode: str, min_macs: Optional[int] = None):
    """``with fp32_products("onednn"): ...`` runs the block on that path, then restores the previous; min_macs
    (onednn only) moves the smallest product oneDNN forms (0: every fp32 product, as the tests run it)."""
    return _switched("fp32_products", mode, min_macs)


def info() -> dict:
    """What was loaded and why (vaegan_fast.backend_info() adds it under "native")."""
    return {"isa": _STATE["isa"], "isa_reason": _STATE["isa_reason"], "library": _STATE["library"],
            "cpu_isas": list(cpu_isas()), "bf16_products": _STATE["bf16_products"],
            "bf16_reason": _STATE["bf16_reason"], "fp32_products": _STATE["fp32_products"],
            "fp32_reason": _STATE["fp32_reason"]}


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
