"""Where the time of a training step goes: python bench/profile_step.py [--preset seed] [--batch 256].

Profiles the eager baseline step (bench/baseline.py) and vaegan_fast's step with torch.profiler and splits
their CPU time into matrix products and convolutions, elementwise and reduction kernels, the optimizer, and the rest
(framework and Python overhead: dispatch, autograd bookkeeping, the time between kernels), reported per step.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402
from vaegan_fast import PRESETS, RECOMMENDED_BATCH  # noqa: E402

GEMMS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
         "products::onednn_matmul")  # the native ops' fp32 products on oneDNN (kernels/cpu/products.cpp)
# oneDNN's and the fallback's convolutions, forward and backward (their self time is the product).
CONVOLUTIONS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::convolution",
                "aten::conv2d", "aten::conv_transpose2d", "aten::_slow_conv2d", "aten::slow_conv_transpose2d",
                "aten::cudnn_convolution")


def category(name: str) -> str:
    # Self times: a fused native op's own time is its passes around the BLAS call (bias, activation, its
    # derivative), which is elementwise work; the product itself is the aten::mm inside it.
    if name.startswith(GEMMS) or name.startswith(CONVOLUTIONS):
        return "matrix products and convolutions"
    if "adam" in name.lower() or name.startswith("Optimizer"):
        return "optimizer"
    return "elementwise, reductions, copies (incl. the fused ops' own passes)"


def breakdown(step, x, steps: int) -> dict:
    for _ in range(3):
        step(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step(x)
        wall = (time.perf_counter() - start) / steps
    shares = defaultdict(float)
    for evt in prof.key_averages():
        if "::" in evt.key and not evt.key.startswith(("autograd::", "profiler::")) or evt.key.startswith("Optimizer"):
            shares[category(evt.key)] += evt.self_cpu_time_total / 1e6 / steps
    shares["framework and Python overhead (the rest)"] = max(wall - sum(shares.values()), 0.0)
    return {"wall_s": wall, "parts": dict(shares), "operator_calls": e2e.operator_calls(step, x)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="seed", choices=tuple(PRESETS))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    batch = args.batch or RECOMMENDED_BATCH[args.preset]
    model = e2e.make_model(args.preset, "cpu")
    x = e2e.load_batches(batch, 1, "cpu", model.input_shape)[0][0]
    providers = e2e.providers(model, "cpu", gpu=False)
    print(f"{args.preset}, batch {batch}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    for name in ("eager", *[n for n in providers if n.startswith("vaegan_fast")]):
        result = breakdown(providers[name], x, args.steps)
        print(f"\n{name}: {result['wall_s'] * 1e3:.1f} ms per step, {result['operator_calls']} operator calls")
        for part, seconds in sorted(result["parts"].items(), key=lambda kv: -kv[1]):
            print(f"  {part:45s} {seconds * 1e3:7.2f} ms  {100 * seconds / result['wall_s']:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
