"""Test configuration: run Triton kernels through the interpreter when there is no GPU.

TRITON_INTERPRET is read when ``@triton.jit`` runs, so it is set here, before any test module imports
the kernels. On a machine with CUDA the same tests run on the device unchanged.
"""
import os
import zlib

import torch

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
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
