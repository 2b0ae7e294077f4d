"""Test configuration: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it is set here, before any test module imports
the kernels. On a machine with CUDA the same tests run on the device unchanged.
"""
import os
import re
import zlib

# numpy's OpenBLAS (the interpreter's tl.dot) next to torch's OpenMP threads: with its default thread count a
# [16, 32768] x [32768, 32] matmul took 0.57 s instead of 0.5 ms on 2 cores (docs/performance.md). Read when
# numpy loads, so before torch imports it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different but reproducible seed per test: inputs are fresh random numbers, never a fixed pattern
    # shared by every test, and a failure replays exactly.
    # The bf16 product path (the bf16_products fixture below) is left out of the seed: both paths see the inputs
    # the test had before it ran on two paths.
    nodeid = re.sub(r"products-(fp32|bf16)-?|-?products-(fp32|bf16)(?=\])", "", request.node.nodeid)
    torch.manual_seed(zlib.crc32(nodeid.replace("[]", "").encode()))


# The native backend's two bf16 product paths (vaegan_fast/ops/_native_lib.py): "fp32" upcasts the operands of
# every bf16 product, "bf16" forms it on the bf16 operands (oneDNN, fp32 accumulation). The CPU picks one at
# import; a test that takes this fixture runs on both, whatever the CPU (on one without bf16 units the "bf16"
# path is only slower). Parametrised tests whose dtype (or backend: reference, triton) does not involve the native
# bf16 products are deselected for the second path rather than run twice.
BF16_PATHS = ("fp32", "bf16")


@pytest.fixture(params=BF16_PATHS, ids=[f"products-{p}" for p in BF16_PATHS])
def bf16_products(request):
    try:
        from vaegan_fast.ops import _native_lib
    except ImportError:  # no native backend: nothing to switch
        yield request.param
        return
    with _native_lib.bf16_products(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        second_path = params.get("bf16_products") == BF16_PATHS[1]
        dtype = params.get("dtype")
        other_backend = params.get("backend") in ("reference", "triton")
        if second_path and ((dtype is not None and dtype != torch.bfloat16) or other_backend):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
