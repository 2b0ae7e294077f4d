"""reparam_kl on the native CPU backend: kernels/cpu/reparam_kl.cpp (torch.ops.vaegan_fast_native.reparam_kl and
reparam_kl_backward, their autograd in C++), with their fake implementations; imported by ops/__init__ once
_native_lib has loaded the library."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import upcast_under_autocast
from .._native_lib import _call, _check_dtypes, _ops, _untracked


@torch.library.register_fake("vaegan_fast_native::reparam_kl")
def _(mu, logvar, eps):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape[:1])


@torch.library.register_fake("vaegan_fast_native::reparam_kl_backward")
def _(mu, logvar, eps, grad_z, grad_kl, need_grad_eps):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape), mu.new_empty(mu.shape if need_grad_eps else (0,))


@_dispatch.register("reparam_kl", "native")
def reparam_kl_native(mu: Tensor, logvar: Tensor, eps: Tensor):
    if torch.is_autocast_enabled("cpu"):
        mu, logvar, eps = upcast_under_autocast(mu, logvar, eps)
    return _call(_ops.reparam_kl, mu, logvar, eps)


# The step's primitives (value and input gradients in one call, no autograd).
@_dispatch.register("reparam_kl_forward", "native")
def reparam_kl_forward_native(mu: Tensor, logvar: Tensor, eps: Tensor):
    _check_dtypes(mu=mu, logvar=logvar, eps=eps)
    return tuple(_untracked(_ops.reparam_kl, mu, logvar, eps))


@_dispatch.register("reparam_kl_backward", "native")
def reparam_kl_backward_native(mu: Tensor, logvar: Tensor, eps: Tensor, grad_z: Tensor, grad_kl: Tensor):
    return tuple(_untracked(_ops.reparam_kl_backward, mu, logvar, eps, grad_z, grad_kl, False)[:2])
