"""The tolerance rules as assertions; the rules themselves live in vaegan_fast.testing (bench uses them too)."""
from __future__ import annotations

import torch

from vaegan_fast.testing import mismatch


def assert_matches(name: str, actual: torch.Tensor, truth: torch.Tensor, eager: torch.Tensor | None = None):
    """Assert ``actual`` (kernel output, any dtype) is within the project's tolerance of ``truth`` (fp64)."""
    problem = mismatch(name, actual, truth, eager)
    assert problem is None, problem
