"""reparam_kl on the Triton backend: the kernels of kernels/triton/reparam_kl.py as torch custom ops (forward,
backward, autograd; eps drawn in the kernel from a seed on request); imported by ops/__init__ once _triton_lib
has loaded the kernels."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import upcast_under_autocast
from .._triton_lib import _check_dtypes, kernels

K_REPARAM = kernels.reparam_kl


@torch.library.custom_op("vaegan_fast::reparam_kl", mutates_args=())
def reparam_kl_op(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int) -> tuple[Tensor, Tensor]:
    """(z, kl); eps None means drawn in the kernel from seed."""
    return K_REPARAM.reparam_kl_forward(mu, logvar, eps, seed)


@reparam_kl_op.register_fake
def _(mu, logvar, eps, seed):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1])


@torch.library.custom_op("vaegan_fast::reparam_kl_backward", mutates_args=())
def reparam_kl_backward_op(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: int, dz: Optional[Tensor],
                           dkl: Optional[Tensor], need_deps: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dmu, dlogvar, deps); deps is an empty tensor unless need_deps."""
    dmu, dlv, deps = K_REPARAM.reparam_kl_backward(mu, logvar, eps, seed, dz, dkl, need_deps)
    return dmu, dlv, deps if deps is not None else mu.new_empty((0,))


@reparam_kl_backward_op.register_fake
def _(mu, logvar, eps, seed, dz, dkl, need_deps):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape), mu.new_empty(mu.shape if need_deps else (0,))


def _reparam_setup(ctx, inputs, output):
    mu, logvar, eps, seed = inputs
    ctx.save_for_backward(mu, logvar, eps)
    ctx.seed = seed


def _reparam_backward(ctx, dz, dkl):
    mu, logvar, eps = ctx.saved_tensors
    need_deps = eps is not None and ctx.needs_input_grad[2]
    if torch.is_grad_enabled():
        # create_graph=True: differentiable PyTorch, so second derivatives are right.
        if eps is None:
            eps = reparam_kl_op(torch.zeros_like(mu), torch.zeros_like(logvar), None, ctx.seed)[0]
        std = torch.exp(logvar * 0.5)
        dz = torch.zeros_like(mu) if dz is None else dz
        dkl = torch.zeros_like(mu[:, 0]) if dkl is None else dkl
        dmu = dz + dkl[:, None] * mu
        dlv = 0.5 * dz * std * eps + 0.5 * dkl[:, None] * (torch.exp(logvar) - 1.0)
        return dmu, dlv, (dz * std if need_deps else None), None
    dmu, dlv, deps = reparam_kl_backward_op(mu, logvar, eps, ctx.seed, dz, dkl, need_deps)
    return dmu, dlv, (deps if need_deps else None), None


reparam_kl_op.register_autograd(_reparam_backward, setup_context=_reparam_setup)


@_dispatch.register("reparam_kl", "triton")
def reparam_kl_triton(mu: Tensor, logvar: Tensor, eps: Optional[Tensor], seed: Optional[int] = None):
    _check_dtypes(mu=mu, logvar=logvar, eps=eps)
    mu, logvar, eps = upcast_under_autocast(mu, logvar, eps)
    return reparam_kl_op(mu, logvar, eps, 0 if seed is None else int(seed))


reparam_kl_triton.draws_eps_from_seed = True


# The step's primitives (no autograd).
@_dispatch.register("reparam_kl_forward", "triton")
def reparam_kl_forward_triton(mu: Tensor, logvar: Tensor, eps: Tensor):
    return reparam_kl_op(mu, logvar, eps, 0)


@_dispatch.register("reparam_kl_backward", "triton")
def reparam_kl_backward_triton(mu: Tensor, logvar: Tensor, eps: Tensor, grad_z: Tensor, grad_kl: Tensor):
    return reparam_kl_backward_op(mu, logvar, eps, 0, grad_z, grad_kl, False)[:2]
