"""pytest-benchmark suite of the fused ops: ``pytest bench/ --benchmark-only``.

Each benchmark first checks its provider against the fp64 reference (a wrong provider fails, it is never
timed), then times forward + backward. Save and compare runs with pytest-benchmark's own tools
(``--benchmark-autosave``, ``pytest-benchmark compare``).
"""
import pytest
import torch

import kernels
from vaegan_fast import ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = kernels.cases(full=False, gpu=DEVICE.type == "cuda")
PROVIDERS = ["eager"] + [b for b in ("native", "triton") if b in ops.available_backends(DEVICE)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.label}" for c in CASES])
def test_forward_backward(benchmark, case, provider):
    backend = "reference" if provider == "eager" else provider

    def fn(args):
        return case.call(args, backend)

    problem = kernels.check_provider(fn, case, DEVICE, torch.float32)
    assert problem is None, problem
    _, both = kernels.timed_pair(fn, case, kernels.make_args(case, DEVICE, torch.float32), "both")
    if DEVICE.type == "cuda":
        def run():
            both()
            torch.cuda.synchronize()
    else:
        run = both
    benchmark.extra_info.update(op=case.op, size=case.label, provider=provider, device=str(DEVICE))
    benchmark(run)
