"""The fused layer in plain PyTorch: the specification every backend is tested against.

    a = product(x) + bias          dense: x @ W^T;  conv2d / conv_transpose2d: F.conv2d / F.conv_transpose2d
    h = norm(a)                    batch norm: per group of rows, over the rows and spatial positions of each
                                   channel, h = (a - mean) / sqrt(var + eps) * gamma + beta (var biased); the
                                   running averages follow nn.BatchNorm (momentum m, unbiased variance):
                                   r_mean <- (1 - m) r_mean + m mean,  r_var <- (1 - m) r_var + m var n / (n - 1),
                                   one update per group, in row order; eval mode uses them instead
    y = act(h)                     vaegan_fast.ops.activations

``linear_act_reference`` is the dense layer without a norm as the public ``linear_act`` specifies it:
act(F.linear(x, W, b)).

``layer_act_reference`` is the differentiable form (autograd through torch's own ops, batch norm through
F.batch_norm); ``layer_forward_reference`` / ``layer_backward_reference`` are the training step's primitives
(no autograd, every gradient formed explicitly, batch norm over ``groups`` row groups), and the tests hold
them to the differentiable form. Low precision: the norm and its statistics compute in fp32, rounded once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..activations import activation_backward, apply_activation, saves_preactivation
from .common import LayerCache, acc_dtype


def product_reference(spec, x, weight, bias):
    """a = product(x) + bias."""
    if spec.kind == "dense":
        return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    if spec.kind == "conv2d":
        return F.conv2d(x, weight, bias, spec.stride, spec.padding)
    return F.conv_transpose2d(x, weight, bias, spec.stride, spec.padding, spec.output_padding)


def linear_act_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                         negative_slope: float) -> torch.Tensor:
    """The specification of linear_act: x [M, K] -> act(x @ weight.T + bias) [M, N], plain PyTorch."""
    return apply_activation(F.linear(x, weight, bias), activation, negative_slope)


def layer_act_reference(spec, x, weight, bias, norm, training: bool):
    """y = act(norm(product(x) + bias)), differentiable; ``norm`` is the layer's nn.BatchNorm (or None),
    whose running averages it updates in training mode (num_batches_tracked is the module's business)."""
    a = product_reference(spec, x, weight, bias)
    return norm_act_reference(spec, a, norm, training)


def norm_act_reference(spec, a, norm, training: bool):
    if norm is not None:
        dtype = a.dtype
        acc = acc_dtype(dtype)
        if acc == dtype:
            a = F.batch_norm(a, norm.running_mean, norm.running_var, norm.weight, norm.bias, training, norm.momentum,
                             norm.eps)
        else:  # low precision: the norm in fp32, the running averages kept in their own dtype
            mean, var = norm.running_mean.to(acc), norm.running_var.to(acc)
            a = F.batch_norm(a.to(acc), mean, var, norm.weight.to(acc), norm.bias.to(acc), training, norm.momentum,
                             norm.eps).to(dtype)
            if training and mean.data_ptr() != norm.running_mean.data_ptr():
                with torch.no_grad():
                    norm.running_mean.copy_(mean)
                    norm.running_var.copy_(var)
    return apply_activation(a, spec.activation, spec.negative_slope)


# ---------------------------------------------------------------------------------------------------------
# The training step's primitives
# ---------------------------------------------------------------------------------------------------------
def _grouped(t, groups: int):
    """[N, C, ...] as [groups, N / groups, C, spatial]."""
    n, c = t.shape[0], t.shape[1]
    return t.reshape(groups, n // groups, c, -1)


def batch_stats(a, groups: int, eps: float):
    """(mean, rstd, var_unbiased_factor) per group and channel, [groups, C], in the accumulation dtype."""
    g = _grouped(a.to(acc_dtype(a.dtype)), groups)
    var, mean = torch.var_mean(g, dim=(1, 3), correction=0)
    return mean, torch.rsqrt(var + eps), var


def update_running(p, spec, mean, var, count: int) -> None:
    """nn.BatchNorm's running averages, one update per group in row order (count values per channel each)."""
    m = spec.momentum
    unbias = count / max(count - 1, 1)
    for g in range(mean.shape[0]):
        p.running_mean.mul_(1 - m).add_(mean[g].to(p.running_mean.dtype), alpha=m)
        p.running_var.mul_(1 - m).add_((var[g] * unbias).to(p.running_var.dtype), alpha=m)
    if p.num_batches_tracked is not None:
        p.num_batches_tracked.add_(mean.shape[0])


def _broadcast(stat, like):
    """[groups, C] stats against [groups, n, C, spatial]."""
    return stat[:, None, :, None]


def layer_forward_reference(spec, p, x, groups: int, training: bool):
    """(y, cache) of one layer; ``p`` holds its tensors in the compute dtype (LayerParams)."""
    n = x.shape[0]
    if spec.kind in ("flatten", "unflatten"):
        return x.reshape(n, *spec.out_shape), LayerCache(x, None, None, None, None, training)
    a = product_reference(spec, x, p.weight, p.bias)
    if not spec.norm:
        y = apply_activation(a, spec.activation, spec.negative_slope)
        kept = a if saves_preactivation(spec.activation, spec.negative_slope) else y
        return y, LayerCache(x, None, kept, None, None, training)
    acc = acc_dtype(a.dtype)
    if training:
        mean, rstd, var = batch_stats(a, groups, spec.eps)
        update_running(p, spec, mean, var, (n // groups) * (a[0, 0].numel()))
    else:
        mean = p.running_mean.to(acc)[None]
        rstd = torch.rsqrt(p.running_var.to(acc) + spec.eps)[None]
        groups = 1
    gamma, beta = p.norm_weight.to(acc), p.norm_bias.to(acc)
    g = _grouped(a.to(acc), groups)
    h = ((g - _broadcast(mean, g)) * _broadcast(rstd * gamma, g) + beta[None, None, :, None]).reshape(a.shape)
    h = h.to(a.dtype)
    y = apply_activation(h, spec.activation, spec.negative_slope)
    kept = h if saves_preactivation(spec.activation, spec.negative_slope) else y
    return y, LayerCache(x, a, kept, mean, rstd, training)


def layer_backward_reference(spec, p, cache, dy, r0: int, r1: int, dx_rows: tuple, groups: int,
                             entry_pre_norm: bool, need_dx: bool, need_dw: bool, dy_writable: bool = False):
    """(dx, dW, db, dgamma, dbeta) of one layer from dy on rows [r0, r1) of its cache (each None when not
    asked for or not there); dx on the rows ``dx_rows`` = (d0, d1) within them. In training mode with a
    norm, [r0, r1) must hold whole groups of the ``groups`` the forward used. ``entry_pre_norm``: dy is the
    gradient at the pre-norm point (a tap there). ``dy_writable``: the caller gives dy up (a backend may compute
    in its memory; this one never does)."""
    d0, d1 = dx_rows
    if spec.kind in ("flatten", "unflatten"):
        return dy[d0 - r0:d1 - r0].reshape(d1 - d0, *spec.in_shape), None, None, None, None
    x = cache.x[r0:r1]
    dgamma = dbeta = None
    if entry_pre_norm:
        da = dy
    else:
        dh = activation_backward(dy, cache.kept[r0:r1], spec.activation, spec.negative_slope)
        if spec.norm:
            acc = acc_dtype(dh.dtype)
            a = cache.pre[r0:r1].to(acc)
            gamma = p.norm_weight.to(acc)
            if cache.training:
                size = cache.x.shape[0] // groups
                g0, ng = r0 // size, (r1 - r0) // size
                mean, rstd = cache.mean[g0:g0 + ng], cache.rstd[g0:g0 + ng]
            else:
                mean, rstd, ng = cache.mean, cache.rstd, 1
            g = _grouped(dh.to(acc), ng)
            xhat = (_grouped(a, ng) - _broadcast(mean, g)) * _broadcast(rstd, g)
            sum_dh, sum_dh_xhat = g.sum(dim=(1, 3)), (g * xhat).sum(dim=(1, 3))
            dgamma, dbeta = sum_dh_xhat.sum(0), sum_dh.sum(0)
            scale = _broadcast(rstd * gamma, g)
            if cache.training:
                count = g.shape[1] * g.shape[3]
                da = scale * (g - _broadcast(sum_dh, g) / count - xhat * _broadcast(sum_dh_xhat, g) / count)
            else:
                da = scale * g
            da = da.reshape(dh.shape).to(dh.dtype)
            if need_dw:
                dgamma, dbeta = dgamma.to(dh.dtype), dbeta.to(dh.dtype)
        else:
            da = dh
    dx = dw = db = None
    da_dx, x_dx = da[d0 - r0:d1 - r0], x[d0 - r0:d1 - r0]  # the rows of the input gradient wanted
    if spec.kind == "dense":
        dx = da_dx @ p.weight if need_dx else None
        if need_dw:
            dw = da.t() @ x
            db = da.sum(0) if p.bias is not None else None
    else:
        conv = (list(spec.stride), list(spec.padding), [1, 1], spec.kind == "conv_transpose2d",
                list(spec.output_padding), 1)
        bias_sizes = [p.weight.shape[0 if spec.kind == "conv2d" else 1]] if p.bias is not None else None
        if need_dx:
            dx = torch.ops.aten.convolution_backward(da_dx, x_dx, p.weight, None, *conv, [True, False, False])[0]
        if need_dw:
            _, dw, db = torch.ops.aten.convolution_backward(da, x, p.weight, bias_sizes, *conv,
                                                            [False, True, p.bias is not None])
    if not need_dw:
        dgamma = dbeta = None
    return dx, dw, db, dgamma, dbeta
