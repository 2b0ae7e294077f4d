"""The optimizer update of a training step, with as little host work as the kernel allows.

``torch.optim.Adam(fused=True)`` updates every parameter in one multi-tensor kernel, but its ``step()``
regroups the tensors by device and dtype, checks its options and walks its hooks in Python on every call:
with three networks, that was about as long as the three kernels themselves on the seed preset (CPU). The
model keeps its ``torch.optim.Adam`` objects (their state_dict is the checkpoint format, and users may hand
them to LR schedulers), and once an optimizer's state exists ``apply_update`` feeds its tensors straight to
the same kernel, ``torch._fused_adam_``, which is what ``step()`` itself ends in. Anything that path does not
cover (another optimizer, several parameter groups, amsgrad, maximize, tensor learning rates, step hooks,
the first step that creates the state) goes through ``step()`` unchanged.

``found_inf`` (a 0-dim float tensor on the parameters' device, or None): 1 skips the whole update, state
included, without reading it on the host (the equilibrium gate, fp16 overflow).

Gradients may come in another dtype than their parameters (a bf16 step hands over its bf16 gradients for fp32
master weights): on the direct path for CPU tensors the native library's ``adam_step_`` (kernels/cpu/adam.cpp)
widens them as it reads them (torch's fused Adam on the widened gradients, to its bits but for the last place
of a parameter's final few elements) and saves a separate cast's pass over every gradient; everywhere else
they are cast to the parameters' dtype first.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks


def _direct_group(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Optional[dict]:
    """The parameter group when ``opt`` is a fused Adam the direct path reproduces exactly, else None."""
    if type(opt) is not torch.optim.Adam or len(opt.param_groups) != 1:
        return None
    group = opt.param_groups[0]
    if (not group.get("fused") or group["amsgrad"] or group["maximize"] or group.get("differentiable")
            or group.get("capturable") or group.get("decoupled_weight_decay")
            or isinstance(group["lr"], torch.Tensor) or any(isinstance(b, torch.Tensor) for b in group["betas"])):
        return None
    if opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks or _global_optimizer_pre_hooks \
            or _global_optimizer_post_hooks:
        return None
    if len(group["params"]) != len(params) or any(p not in opt.state for p in params):
        return None  # the first step creates the state: step() does that
    return group


def _widens(params, dtype: torch.dtype, grad_dtype: torch.dtype) -> bool:
    """Whether the direct path takes gradients of ``grad_dtype`` for ``params`` (of ``dtype``) as they are:
    the same dtype, or bf16 gradients of contiguous fp32 CPU parameters, which the native library widens."""
    if grad_dtype == dtype:
        return True
    if dtype != torch.float32 or grad_dtype != torch.bfloat16 or params[0].device.type != "cpu" or \
            not all(p.is_contiguous() for p in params):
        return False
    from .ops import _dispatch
    return "native" not in _dispatch._load_errors


def apply_update(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 found_inf: Optional[torch.Tensor] = None) -> None:
    """Update ``params`` (``opt``'s parameters, in its order) with ``grads``; the grads are not kept."""
    apply_updates([(opt, params, grads, found_inf)])


def apply_updates(updates: Sequence[tuple]) -> None:
    """``apply_update`` for each (opt, params, grads, found_inf); the direct updates that share their
    hyperparameters and found_inf run as one kernel call (the three networks of a step, usually)."""
    batches: dict = {}
    for opt, params, grads, found_inf in updates:
        group = _direct_group(opt, params)
        if group is None or any(g is None for g in grads):
            for p, g in zip(params, grads):
                p.grad = g if g is None or g.dtype == p.dtype else g.to(p.dtype)
            opt.found_inf = found_inf  # read by fused Adam's step(); other optimizers never see a skip here
            opt.step()
            opt.zero_grad(set_to_none=True)
            continue
        beta1, beta2 = group["betas"]
        device, dtype, grad_dtype = params[0].device, params[0].dtype, grads[0].dtype
        uniform = all(p.device == device and p.dtype == dtype for p in params) and \
            all(g.dtype == grad_dtype for g in grads)
        if not (uniform and _widens(params, dtype, grad_dtype)):
            grads = [g if g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]
        if uniform:
            key = (group["lr"], beta1, beta2, group["weight_decay"], group["eps"], id(found_inf), device, dtype,
                   grads[0].dtype)
        else:
            key = (id(opt),)  # mixed tensors: a call of their own (the kernel takes one device and dtype)
        batch = batches.setdefault(key, ([], [], [], found_inf, group))
        states = [opt.state[p] for p in params]
        batch[0].extend(params)
        batch[1].extend(grads)
        batch[2].extend(states)
        opt._opt_called = True  # what step() records for LR schedulers' order check
    for params, grads, states, found_inf, group in batches.values():
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if grads[0].dtype == params[0].dtype:
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"], beta1=beta1,
                               beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                               maximize=False, grad_scale=None, found_inf=found_inf)
        else:
            torch.ops.vaegan_fast_native.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, group["lr"], beta1,
                                                    beta2, group["weight_decay"], group["eps"], found_inf)
        if found_inf is not None:  # a skipped update does not count as a step (as in torch's fused Adam)
            torch._foreach_sub_(steps, [found_inf] * len(steps))
