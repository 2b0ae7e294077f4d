"""Triton kernels of vaegan_fast and their launchers (kernels/triton/, installed as ``vaegan_fast.kernels``).

Device code only: tensors in, tensors out. No autograd and no nn.Module here; the autograd / custom-op
registration of each op lives in ``vaegan_fast/ops/<op>/triton.py`` (linear_act's in ``ops/layer/triton.py``),
which imports these modules through ``vaegan_fast/ops/_triton_lib.py``. One file per fused op, each opening
with its math, the bytes it moves and the eager launches it replaces:

    reparam_kl.py   z = mu + exp(logvar/2) * eps and the per-row KL, forward and backward
    gan_losses.py   softplus GAN losses and the feature reconstruction loss, gradient computed in forward
    linear_act.py   act(x @ W^T + b) with the activation in the GEMM epilogue; gradient GEMMs that apply
                    the activation's derivative as they load
    image_head.py   the training step's image head: sigmoid and pixel term, and the gradient back through them

Launch configuration: every launcher picks its block sizes from a small fixed table (``configs()`` in each
module lists all of them, so ``bench/compile_report.py`` can compile every one for sm_80 and sm_90).
Under ``TRITON_INTERPRET=1`` (CPU tensors, no GPU) launchers use much larger blocks: the interpreter's
cost grows with the number of program instances, not with the block size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when kernels run through Triton's CPU interpreter (read at call time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else triton.next_power_of_2(int(n))


def flat_block(n: int, gpu_block: int, gpu_warps: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a kernel over n flat elements: the module's GPU configuration, or under the
    interpreter one large program (its cost grows with the number of programs, not their size)."""
    if interpreting():
        return min(next_pow2(n), 1 << 16), 1
    return gpu_block, gpu_warps


# torch dtype -> (Triton pointer type name used in compile signatures, accumulator / compute dtype)
_TL_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
SUPPORTED_DTYPES = tuple(_TL_NAME)


def tl_name(dtype: torch.dtype) -> str:
    return _TL_NAME[dtype]


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch dtype (the kernels' ELEM / DOT operands)."""
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


def compute_dtype(dtype: torch.dtype):
    """Arithmetic is fp32 for fp32/fp16/bf16 and fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_tensors(*tensors: torch.Tensor) -> None:
    """Device/dtype guard of every launcher (the ops layer validates first; this catches direct calls)."""
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in _TL_NAME:
            raise TypeError(f"Triton kernels support {[str(d) for d in _TL_NAME]}, got {t.dtype}")
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                             f"got a tensor on {t.device}")


@dataclass
class CompileSpec:
    """One configuration a launcher can choose, in the form ``triton.compile(ASTSource(...))`` takes."""

    name: str  # human-readable label for reports
    kernel: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3
    default: bool = False  # True for the configuration CI compiles for sm_90
    # Arguments the JIT would mark divisible by 16 (pointers, sizes, strides) in the specialisation this
    # configuration stands for; empty for the no-alignment worst case.
    divisible: tuple = ()
    meta: dict = field(default_factory=dict)


from . import conv, gan_losses, image_head, linear_act, reparam_kl  # noqa: E402


def all_compile_specs(default_only: bool = False) -> list[CompileSpec]:
    specs = []
    for module in (reparam_kl, gan_losses, linear_act, image_head, conv):
        specs.extend(s for s in module.configs() if s.default or not default_only)
    return specs


__all__ = ["CompileSpec", "all_compile_specs", "check_tensors", "conv", "gan_losses", "image_head", "interpreting",
           "linear_act", "reparam_kl"]
