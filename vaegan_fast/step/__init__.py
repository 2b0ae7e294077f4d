"""The training step as a plan over layers (plan.py) and its executors (execute.py in Python; the native
backend's C++ one, kernels/cpu/plan_step.cpp, runs the whole plan in one op call).

``RoutedStep(model)`` is what Model.train_step calls for networks built from vaegan_fast.nn programs: it builds
the plan of the model's networks, options, mode, batch and precision once (and again only when one of them
changes), and runs it on the backend's kernels.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..ops import _dispatch
from ..ops.image_head import loss_dtype_of
from .execute import Kernels, NetworkState, run_plan
from .plan import NETWORK_NAMES, build_plan

WHOLE_PLAN_OP = "plan_step"  # a backend's executor of a whole plan in one call (the native backend has one)
_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class RoutedStep:
    """The planned training step of ``model`` (whose three networks are vaegan_fast.nn programs)."""

    def __init__(self, model):
        self.model = model
        self._plans: dict = {}
        self._kernels: dict = {}

    def programs(self) -> dict:
        m = self.model
        return {0: m.encoder.net, 1: m.decoder.net, 2: m.discriminator.net}

    def compute_dtype(self, master: torch.dtype) -> torch.dtype:
        return _PRECISIONS[self.model.config["precision"]] or master

    def kernels(self, device: torch.device, compute: torch.dtype) -> Kernels:
        key = (self.model.config["backend"], device, compute, tuple(_dispatch._load_errors))
        found = self._kernels.get(key)
        if found is None:
            found = self._kernels[key] = Kernels(self.model.config["backend"], device, compute, loss_dtype_of(compute))
        return found

    def plan(self, batch: int, compute: torch.dtype, noise: torch.dtype, scaled: bool):
        cfg = self.model.config
        options = tuple(cfg[k] for k in ("mode", "gamma", "encoder_llike_weight", "pixel_weight", "recon_as_fake",
                                          "saturating", "discriminator_norm"))
        disc = self.model.discriminator
        key = (batch, compute, noise, scaled, options, disc.tap)
        plan = self._plans.get(key)
        if plan is None:
            specs = {net: program.specs for net, program in self.programs().items()}
            plan = self._plans[key] = build_plan(specs, disc.tap, cfg, cfg["mode"], batch, compute,
                                                 loss_dtype_of(compute), noise, loss_scale=scaled)
        return plan

    def flops(self, batch: int) -> int:
        """Product FLOPs of one step at ``batch`` (2 per multiply-add)."""
        master = self.model.dtype
        plan = self.plan(batch, self.compute_dtype(master), master, False)
        return plan.flops({net: p.specs for net, p in self.programs().items()})

    def __call__(self, x: torch.Tensor, scale: Optional[torch.Tensor] = None,
                 on_network_done: Optional[Callable] = None, whole_step: bool = True,
                 master_grads: bool = True) -> dict:
        """The losses of one step on x (x in the master dtype; the step computes in the model's precision):
        draws the step's noise, and hands each network's gradients to ``on_network_done(name, grads)`` as soon
        as they are complete (the discriminator's first). ``master_grads``: see ``gradients``."""
        model = self.model
        master = x.dtype
        mode = model.config["mode"]
        noise = model._draw_noise(x.shape[0], 2 if mode == "vaegan" else 1, master)
        eps, z_prior = (noise[0], noise[1]) if mode == "vaegan" else \
            ((noise[0], None) if mode == "vae" else (None, noise[0]))
        compute = self.compute_dtype(master)
        _, losses = self.gradients(x.to(compute), eps, z_prior.to(compute) if z_prior is not None else None, scale,
                                   on_network_done, whole_step, master_grads=master_grads)
        return losses

    def gradients(self, x: torch.Tensor, eps: Optional[torch.Tensor], z_prior: Optional[torch.Tensor],
                  scale: Optional[torch.Tensor] = None, on_network_done: Optional[Callable] = None,
                  whole_step: bool = True, memory: Optional[dict] = None, master_grads: bool = True) -> tuple:
        """({network name: [grad per parameter]}, losses) of one step computed in x's dtype, with the given
        noise (eps and z_prior as the mode needs them; eps in any dtype, cast as the plan says). The gradients
        are in the parameters' own dtype (a low-precision step's go to its full-precision master weights, cast
        before ``on_network_done`` sees them: a data-parallel all-reduce then sums them in full precision).

        ``scale`` (fp16's loss scale, a 0-dim tensor) multiplies every gradient. ``whole_step``: use the
        backend's executor of the whole plan in one call when it has one (not with a loss scale or ``memory``,
        which receives "saved_bytes": the bytes of the tensors the forward passes keep for backward); it casts
        the parameters to x's dtype and the gradients back itself (in C++, not two Python calls per parameter), or
        with ``master_grads=False`` leaves a low-precision step's gradients in x's dtype: optim.apply_updates
        widens them as Adam reads them, which saves a pass over every gradient (only that executor does so:
        the Python one, which data-parallel training uses, always casts)."""
        compute, master = x.dtype, self.model.dtype
        noise_dtype = eps.dtype if eps is not None else compute
        plan = self.plan(x.shape[0], compute, noise_dtype, scale is not None)
        kernels = self.kernels(x.device, compute)
        inputs = [x, eps, z_prior] + ([scale] if scale is not None else [])
        done = on_network_done or (lambda name, grads: None)
        whole = _dispatch.implementation(WHOLE_PLAN_OP, kernels.name) if whole_step else None
        if whole is not None and scale is None and memory is None:
            grads, losses = whole(plan, {net: NetworkState(program, None)
                                         for net, program in self.programs().items()}, inputs, master_grads)
            for net in (2, 1, 0):
                if net in grads:
                    done(NETWORK_NAMES[net], grads[net])
        else:
            states = {net: NetworkState(program, compute) for net, program in self.programs().items()}
            in_master = {}

            def to_master(net_grads):
                return [g.to(master) if g.dtype != master else g for g in net_grads]

            def network_done(net, net_grads):
                in_master[net] = to_master(net_grads)
                done(NETWORK_NAMES[net], in_master[net])

            grads, losses = run_plan(plan, states, inputs, kernels, network_done, memory)
            grads = {net: in_master[net] if net in in_master else to_master(g) for net, g in grads.items()}
        return {NETWORK_NAMES[net]: g for net, g in grads.items()}, losses


def step_gradients(model, x: torch.Tensor, eps, z_prior, loss_scale=None, whole_step: bool = True,
                   memory: Optional[dict] = None) -> tuple:
    """({network: [grad per parameter]}, losses) of ``model``'s planned step on x in x's dtype with the given
    noise, without updating anything (what train_step would apply, before the optimizers); the gradients in the
    parameters' dtype."""
    if model._routed is None:
        raise ValueError("the model's networks are not vaegan_fast.nn programs: it trains through autograd")
    return model._routed.gradients(x, eps, z_prior, loss_scale, None, whole_step, memory)


def step_flops(model, batch: int, routed: bool = True) -> int:
    """Matrix-product FLOPs of one step (2 per multiply-add): ``routed`` counts the plan's; otherwise the
    straightforward three-grad step's (mode "vaegan"), in which autograd propagates through all 3B
    discriminator rows for the encoder's and the decoder's losses and through both decoder passes."""
    if routed:
        return model._routed.flops(batch)
    if model.config["mode"] != "vaegan":
        raise ValueError("the straightforward step's FLOPs are counted for mode='vaegan'")
    enc, dec, dis = (p.specs for p in model._routed.programs().values())
    tap = model.discriminator.tap[0]

    def fwd(specs, rows):
        return rows * sum(s.product_flops() for s in specs)

    def input_grads(specs, rows, skip_first=False, top=None):
        specs = specs[: (top + 1) if top is not None else None]
        products = [s for s in specs if s.is_product]
        return rows * sum(s.product_flops() for i, s in enumerate(products) if i > 0 or not skip_first)

    b = batch
    total = fwd(enc, b) + fwd(dec, 2 * b) + fwd(dis, 3 * b)  # forward
    total += fwd(enc, b) + input_grads(enc, b, skip_first=True)  # the encoder's own backward
    # Each autograd.grad call propagates through whole batched tensors: all 3B discriminator rows of one call of
    # the discriminator, or with one call per set ("separate") the calls that reach the network: x_rec's for the
    # encoder, x_p's and x_rec's for the decoder.
    enc_rows, dec_rows = (b, 2 * b) if model.config["discriminator_norm"] == "separate" else (3 * b, 3 * b)
    total += input_grads(dis, enc_rows, top=tap) + input_grads(dec, b)  # the encoder's call
    total += fwd(dec, 2 * b) + input_grads(dec, 2 * b, skip_first=True) + input_grads(dis, dec_rows)  # decoder's
    total += fwd(dis, 3 * b) + input_grads(dis, 3 * b, skip_first=True)  # the discriminator's call
    return total


__all__ = ["RoutedStep", "build_plan", "run_plan", "step_flops", "step_gradients"]
