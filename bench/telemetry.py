"""What machine ran the benchmark: device, peaks, and NVML telemetry (when an NVIDIA GPU is present)."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Optional

import torch

# Datasheet peaks (dense, no sparsity) by device-name substring, first match wins.
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM5 / PCIe), NVIDIA H200 datasheet, NVIDIA A100 datasheet.
PEAKS = [
    ("H200", {"bandwidth_gbs": 4800, "tflops": {"bfloat16": 989, "float16": 989, "float32": 67,
                                                  "tf32": 494}, "source": "NVIDIA H200 datasheet (SXM)"}),
    ("H100 PCIe", {"bandwidth_gbs": 2000, "tflops": {"bfloat16": 756, "float16": 756, "float32": 51,
                                                      "tf32": 378}, "source": "NVIDIA H100 datasheet (PCIe)"}),
    ("H100", {"bandwidth_gbs": 3350, "tflops": {"bfloat16": 989, "float16": 989, "float32": 67,
                                                 "tf32": 494}, "source": "NVIDIA H100 datasheet (SXM5)"}),
    ("A100", {"bandwidth_gbs": 2039, "tflops": {"bfloat16": 312, "float16": 312, "float32": 19.5,
                                                 "tf32": 156}, "source": "NVIDIA A100 datasheet (SXM4 80GB)"}),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model or platform.processor() or 'CPU'} ({os.cpu_count()} cores)"


def peaks(name: str) -> Optional[dict]:
    for key, value in PEAKS:
        if key in name:
            return value
    return None


def measured_copy_bandwidth_gbs(device: torch.device) -> Optional[float]:
    """Device-to-device copy of 1 GiB: read + write bytes over the median time (GPU only)."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * 4 / times[len(times) // 2] / 1e9


def nvml_snapshot() -> dict:
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"no NVIDIA GPU ({exc})"}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if torch.cuda.is_available() else 0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return {
            "available": True,
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _text(pynvml.nvmlSystemGetDriverVersion()),
            "memory_used_mb": mem.used / 2**20, "memory_total_mb": mem.total / 2**20,
            "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "memory_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
            "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
    except pynvml.NVMLError as exc:
        return {"available": False, "reason": f"NVML query failed ({exc})"}
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_features() -> dict:
    """The CPU's identity (vendor, family, model: CPUs of one name, "AMD EPYC" say, differ by generation) and
    bf16-relevant flags as /proc/cpuinfo lists them for its first processor, and torch's CPU capability."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends here
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"capability": torch.backends.cpu.get_cpu_capability(), "vendor": fields.get("vendor_id"),
            "family": fields.get("cpu family"), "model": fields.get("model"),
            "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags, "avx512f": "avx512f" in flags,
            "avx2": "avx2" in flags}


def cpu_generation(c: dict) -> str:
    """ "AuthenticAMD family 26 model 2" from cpu_features(), or "" where /proc/cpuinfo does not say."""
    return f"{c.get('vendor')} family {c['family']} model {c.get('model')}" if c.get("family") is not None else ""


def native_backend() -> dict:
    """vaegan_fast.backend_info(): the native library's ISA and bf16 product path, with their reasons."""
    try:
        import vaegan_fast
        return vaegan_fast.backend_info()
    except Exception as exc:  # pragma: no cover
        return {"error": f"{type(exc).__name__}: {exc}"}


def native_summary(env: dict) -> str:
    """One line for a results header: ISA loaded, bf16 and fp32 product paths (why), and the CPU's bf16 flags."""
    n, c = env.get("native") or {}, env.get("cpu") or {}
    flags = f"avx512_bf16 {'yes' if c.get('avx512_bf16') else 'no'}, amx {'yes' if c.get('amx') else 'no'}"
    if c.get("family") is not None:
        flags = f"{cpu_generation(c)}, {flags}"
    if not n.get("isa"):
        return f"native backend: not loaded ({n.get('native_error') or n.get('error')}); {flags}"
    fp32 = f"fp32 products {n['fp32_products']} ({n['fp32_reason']}); " if n.get("fp32_products") else ""
    return (f"native ISA {n['isa']} ({n['isa_reason']}); bf16 products {n['bf16_products']} ({n['bf16_reason']}); "
            f"{fp32}CPU {flags}")


# Environment variables that change which kernels run, or how: a results file names those that were set.
_SETTINGS_PREFIXES = ("VAEGAN_FAST_", "ATEN_CPU_CAPABILITY", "ONEDNN_", "DNNL_", "MKL_", "OMP_", "KMP_", "MALLOC_",
                      "LD_PRELOAD", "TRITON_", "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_")


def settings_in_environment() -> dict:
    """{name: value} of the environment variables set here that change which kernels run, or how."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_SETTINGS_PREFIXES)}


def settings_summary(env: dict) -> str:
    settings = env.get("settings") or {}
    return ("Environment: " + " ".join(f"{k}={v}" for k, v in settings.items()) if settings
            else "Environment: none of the variables that change kernels is set")


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip())
    except OSError:
        commit, dirty = None, None
    name = device_name(device)
    return {"device": name, "cpu": cpu_features(), "native": native_backend(),
            "device_type": device.type, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "git_commit": commit,
            "git_dirty": dirty, "peaks": peaks(name), "copy_bandwidth_gbs": measured_copy_bandwidth_gbs(device),
            "settings": settings_in_environment()}
