"""Interleaved timing: providers take turns (A, B, C, A, B, C, ...) in one process.

These machines drift by tens of percent over tens of seconds, so only ratios of numbers taken side by side
mean anything. Each provider is a pair (setup, timed): setup runs untimed before every call (for example the
forward pass whose backward is being timed), timed is what the clock sees. On a GPU the clock is a pair of
CUDA events around the call; on a CPU it is time.perf_counter.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    calls: int

    @classmethod
    def of(cls, samples_s: list) -> "Timing":
        ms = sorted(s * 1e3 for s in samples_s)
        q = statistics.quantiles(ms, n=10, method="inclusive") if len(ms) > 1 else [ms[0]] * 9
        return cls(statistics.median(ms), q[1], q[7], len(ms))


def _clock(device: torch.device):
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def interleaved(providers: dict, device: torch.device, budget_s: float = 1.0, min_calls: int = 5,
                max_calls: int = 2000, warmup: int = 2) -> dict:
    """Time ``providers`` ({name: (setup or None, timed)}) in turns until ``budget_s`` is spent."""
    clock = _clock(device)
    for setup, timed in providers.values():  # warm-up: caches, allocator, lazy initialisation
        for _ in range(warmup):
            if setup is not None:
                setup()
            timed()
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples = {name: [] for name in providers}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_calls and (rounds < min_calls or time.perf_counter() - start < budget_s):
        for name, (setup, timed) in providers.items():
            if setup is not None:
                setup()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples[name].append(clock(timed))
        rounds += 1
    return {name: Timing.of(s) for name, s in samples.items()}


def peak_memory_mb(device: torch.device, fn: Callable[[], None]) -> Optional[float]:
    """Peak device memory allocated while ``fn`` runs (GPU only; None on a CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
