"""What the fused layer's implementations share: its tensors and its forward cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm and its statistics compute in: fp32 for fp16/bf16, else the dtype itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def plain_dense(spec) -> bool:
    """A dense layer without a norm: the backends run it on their linear_act kernels."""
    return spec.kind == "dense" and not spec.norm


def _as(t, dtype):
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


@dataclass
class LayerParams:
    """A layer's tensors for one step: weight, bias and the norm's affine parameters in the compute dtype (or,
    built with dtype None, the module's own, for an executor that casts them itself); the running averages as
    they are (the module's own buffers, updated in place)."""
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    norm_weight: Optional[torch.Tensor] = None
    norm_bias: Optional[torch.Tensor] = None
    running_mean: Optional[torch.Tensor] = None
    running_var: Optional[torch.Tensor] = None
    num_batches_tracked: Optional[torch.Tensor] = None

    @classmethod
    def of(cls, layer, dtype: torch.dtype) -> "LayerParams":
        weight = getattr(layer, "weight", None)
        if weight is None:  # Flatten / Unflatten
            return cls()
        norm = getattr(layer, "norm", None)
        if norm is None:
            return cls(_as(weight, dtype), _as(layer.bias, dtype))
        return cls(_as(weight, dtype), _as(layer.bias, dtype), _as(norm.weight, dtype), _as(norm.bias, dtype),
                   norm.running_mean, norm.running_var, norm.num_batches_tracked)


@dataclass
class LayerCache:
    """What a layer's forward keeps for its backward: its input x, the pre-norm a = product + bias (with a
    norm), what act' is formed from (y, or the pre-activation where saves_preactivation), the batch
    statistics per group ([groups, C]; the running ones in eval mode) and the mode."""
    x: Optional[torch.Tensor]
    pre: Optional[torch.Tensor]
    kept: Optional[torch.Tensor]
    mean: Optional[torch.Tensor]
    rstd: Optional[torch.Tensor]
    training: bool

    def tensors(self) -> list:
        return [t for t in (self.x, self.pre, self.kept, self.mean, self.rstd) if t is not None]
