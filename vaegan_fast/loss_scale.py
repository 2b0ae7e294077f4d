"""Dynamic loss scaling for precision="fp16", decided on the device (torch.amp.GradScaler's rule).

fp16 keeps 5 exponent bits: values below 6e-8 vanish and values above 65504 overflow. The step multiplies the
gradients that start its backward passes by the scale S, so that small gradients stay representable, then
converts the results to the fp32 master weights' dtype and divides them by S. A step whose gradients hold an
Inf or NaN updates no network and halves S; after ``growth_interval`` finite steps in a row S doubles. Both the
check and the update are device kernels (``torch._amp_foreach_non_finite_check_and_unscale_``,
``torch._amp_update_scale_``), so the step never waits for the host.
"""
from __future__ import annotations

import math

import torch

# torch.amp.GradScaler's defaults.
DEFAULTS = dict(init=2.0 ** 16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_scale_options(value) -> dict:
    """``Model(loss_scale=...)``: None for the defaults, or a dict overriding some of DEFAULTS' keys."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise TypeError(f"loss_scale must be a dict with keys from {tuple(DEFAULTS)}, got {type(value).__name__}")
    unknown = set(value) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"loss_scale has unknown keys {sorted(unknown)}; expected keys from {tuple(DEFAULTS)}")
    opts = {**DEFAULTS, **value}
    if not _number(opts["init"]) or not 0 < opts["init"] <= torch.finfo(torch.float32).max:
        raise ValueError(f"loss_scale['init'] must be a positive finite number, got {opts['init']!r}")
    if not _number(opts["growth_factor"]) or opts["growth_factor"] <= 1:
        raise ValueError(f"loss_scale['growth_factor'] must be a number > 1, got {opts['growth_factor']!r}")
    if not _number(opts["backoff_factor"]) or not 0 < opts["backoff_factor"] < 1:
        raise ValueError(f"loss_scale['backoff_factor'] must be a number in (0, 1), got {opts['backoff_factor']!r}")
    interval = opts["growth_interval"]
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
        raise ValueError(f"loss_scale['growth_interval'] must be an int >= 1, got {interval!r}")
    return dict(init=float(opts["init"]), growth_factor=float(opts["growth_factor"]),
                backoff_factor=float(opts["backoff_factor"]), growth_interval=interval)


class DynamicLossScale:
    """The scale S and its growth tracker (finite steps since S last changed): device tensors that each step
    updates in place (a captured CUDA graph keeps seeing them)."""

    def __init__(self, init: float, growth_factor: float, backoff_factor: float, growth_interval: int):
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.scale = torch.full((), init, dtype=torch.float32)  # the kernels want fp32 whatever the weights are
        self.growth_tracker = torch.zeros((), dtype=torch.int32)

    def to(self, device: torch.device) -> None:
        if self.scale.device != device:
            self.scale, self.growth_tracker = self.scale.to(device), self.growth_tracker.to(device)

    def unscale_(self, grads: list) -> torch.Tensor:
        """Divide ``grads`` by S in place; returns found_inf, 1.0 when any of them holds an Inf or NaN, else 0.0
        (the value fused Adam's ``found_inf`` skips a step on)."""
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale.device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self.scale.reciprocal())
        return found_inf

    def update_(self, found_inf: torch.Tensor) -> None:
        """Halve S after an overflow; double it after ``growth_interval`` finite steps in a row."""
        torch._amp_update_scale_(self.scale, self.growth_tracker, found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"].to(torch.float32).clone()
        self.growth_tracker = state["growth_tracker"].to(torch.int32).clone()
