"""Kernel benchmarks: each fused op, forward / backward / both, for every provider that can run here.

Providers: "eager" (the reference op, plain PyTorch), "compile" (torch.compile of the reference function),
"native" (C++ on a CPU) and "triton" (on a GPU), whichever are available. Every provider's outputs and
gradients are checked against an fp64 reference by the project's tolerance rule before it is timed; one that
disagrees is reported as wrong and not timed.

Each op also has a "bound" provider, timed in the same turns but not checked (it computes another function):
the cheapest autograd graph that does the work no implementation of the op can skip. For linear_act that is
F.linear alone (the three products, the bias and autograd, no activation); for the losses and reparam_kl one
sum per differentiable input (autograd.grad's own cost on this graph). eager / bound is then the largest
ratio any fused op could reach against eager at that size.

"Forward" is a training forward (inputs require grad, so autograd records what backward needs);
"backward" is the gradient of all outputs with respect to all differentiable inputs, given fixed random
upstream gradients; "both" is the two in one call.

Bytes are the minimum each op must move in that mode (each input read once, each output written once; the
tensors a backward pass needs are counted as read again); FLOPs count the arithmetic of the math (2 per
multiply-add in the GEMMs; elementwise ops are counted per element and are memory-bound anyway).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from vaegan_fast import ops
from vaegan_fast.ops.gan_losses.reference import (discriminator_loss_reference, feature_recon_loss_reference,
                                                  generator_loss_reference)
from vaegan_fast.ops.layer.reference import linear_act_reference
from vaegan_fast.ops.reparam_kl.reference import reparam_kl_reference
from vaegan_fast.testing import mismatch

MODES = ("forward", "backward", "both")
SLOPE = 0.2


@dataclass
class Case:
    op: str
    label: str  # the size, as a reader would say it
    shapes: dict  # argument name -> shape
    diff: tuple  # names of the differentiable arguments
    call: Callable  # (args: dict, backend: str) -> tuple of outputs, through the public op
    reference: Callable  # (args: dict) -> tuple of outputs, the raw reference function (what compile gets)
    elements_moved: dict  # mode -> number of elements the op must read + write
    flops: dict  # mode -> floating-point operations
    bound: Callable = None  # (args: dict) -> outputs: the "bound" provider (module docstring); None: a sum per input

    def bound_outputs(self, args: dict) -> tuple:
        if self.bound is not None:
            return self.bound(args)
        total = None
        for name in self.diff:
            part = args[name].sum()
            total = part if total is None else total + part
        return (total,)


def reparam_case(b: int, d: int) -> Case:
    n = b * d
    return Case("reparam_kl", f"{b}x{d}", {"mu": (b, d), "logvar": (b, d), "eps": (b, d)}, ("mu", "logvar"),
                lambda a, be: ops.reparam_kl(a["mu"], a["logvar"], a["eps"], backend=be),
                lambda a: reparam_kl_reference(a["mu"], a["logvar"], a["eps"]),
                # fwd: read mu, logvar, eps, write z, kl. bwd: read mu, logvar, eps, dz, dkl, write dmu, dlogvar
                {"forward": 4 * n + b, "backward": 6 * n + b, "both": 6 * n + 2 * b},
                {"forward": 10 * n, "backward": 10 * n, "both": 20 * n})


def linear_case(m: int, k: int, n: int) -> Case:
    gemm = 2 * m * n * k
    return Case("linear_act", f"{m}x{k}->{n}", {"x": (m, k), "weight": (n, k), "bias": (n,)},
                ("x", "weight", "bias"),
                lambda a, be: (ops.linear_act(a["x"], a["weight"], a["bias"], "leaky_relu",
                                              negative_slope=SLOPE, backend=be),),
                lambda a: (linear_act_reference(a["x"], a["weight"], a["bias"], "leaky_relu", SLOPE),),
                # fwd: read x, W, b, write y. bwd: read dy, x, W and y (the saved activation), write dx, dW, db
                {"forward": m * k + n * k + n + m * n,
                 "backward": 2 * m * n + m * k + n * k + m * k + n * k + n,
                 "both": m * k + n * k + n + m * n + m * n + m * k + n * k + n},
                {"forward": gemm, "backward": 2 * gemm, "both": 3 * gemm},
                bound=lambda a: (F.linear(a["x"], a["weight"], a["bias"]),))


def discriminator_case(n: int) -> Case:
    return Case("discriminator_loss", f"3x{n}", {"real": (n,), "prior": (n,), "rec": (n,)},
                ("real", "prior", "rec"),
                lambda a, be: (ops.discriminator_loss(a["real"], a["prior"], a["rec"], backend=be),),
                lambda a: (discriminator_loss_reference(a["real"], (a["prior"], a["rec"])),),
                {"forward": 3 * n, "backward": 6 * n, "both": 6 * n},
                {"forward": 15 * n, "backward": 12 * n, "both": 27 * n})


def generator_case(n: int) -> Case:
    return Case("generator_loss", f"2x{n}", {"prior": (n,), "rec": (n,)}, ("prior", "rec"),
                lambda a, be: (ops.generator_loss(a["prior"], a["rec"], backend=be),),
                lambda a: (generator_loss_reference((a["prior"], a["rec"]), False),),
                {"forward": 2 * n, "backward": 4 * n, "both": 4 * n},
                {"forward": 10 * n, "backward": 8 * n, "both": 18 * n})


def feature_case(n: int, f: int) -> Case:
    e = n * f
    return Case("feature_recon_loss", f"{n}x{f}", {"real": (n, f), "fake": (n, f)}, ("real", "fake"),
                lambda a, be: (ops.feature_recon_loss(a["real"], a["fake"], backend=be),),
                lambda a: (feature_recon_loss_reference(a["real"], a["fake"]),),
                {"forward": 2 * e, "backward": 4 * e, "both": 4 * e},
                {"forward": 3 * e, "backward": 3 * e, "both": 6 * e})


def cases(full: bool, gpu: bool) -> list:
    """The sizes: the presets' own ("seed" batch 256, "wide" batch 512) first, larger ones with --full."""
    out = [reparam_case(256, 16), reparam_case(512, 128),
           linear_case(256, 128, 64), linear_case(1536, 784, 1024),
           discriminator_case(256), discriminator_case(512),
           generator_case(256), generator_case(512),
           feature_case(256, 32), feature_case(512, 512)]
    if full:
        big = 8192 if gpu else 2048
        out += [reparam_case(big * 8, 1024), linear_case(768, 784, 128), linear_case(big, 1024, 1024),
                discriminator_case(big * 128), generator_case(big * 128), feature_case(big * 8, 1024)]
    return out


# ---------------------------------------------------------------------------------------------- running
def make_args(case: Case, device, dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    args = {}
    for name, shape in case.shapes.items():
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name == "logvar":
            t = t * 0.5  # a plausible log-variance range
        args[name] = t.to(device=device, dtype=dtype).requires_grad_(name in case.diff)
    return args


def _upstream(outputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outputs)


def run_provider(fn: Callable, case: Case, args: dict):
    """Outputs and gradients of ``fn`` (args -> outputs) for the given args."""
    outputs = fn(args)
    grads = torch.autograd.grad(outputs, [args[n] for n in case.diff], _upstream(outputs))
    return [o.detach() for o in outputs], list(grads)


def check_provider(fn: Callable, case: Case, device, dtype):
    """None if ``fn`` matches the fp64 reference within the tolerance rule, else what is wrong."""
    args = make_args(case, device, dtype)
    truth_args = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in args.items()}
    truth = run_provider(case.reference, case, truth_args)
    eager = run_provider(case.reference, case, args) if dtype not in (torch.float32, torch.float64) else None
    try:
        got = run_provider(fn, case, args)
    except Exception as exc:  # a provider that crashes is reported, not timed
        return f"raised {type(exc).__name__}: {exc}"
    names = [f"output{i}" for i in range(len(truth[0]))] + [f"grad_{n}" for n in case.diff]
    for i, name in enumerate(names):
        actual = (got[0] + got[1])[i]
        want = (truth[0] + truth[1])[i]
        low = (eager[0] + eager[1])[i] if eager is not None else None
        problem = mismatch(name, actual, want, low)
        if problem is not None:
            return problem
    return None


def timed_pair(fn: Callable, case: Case, args: dict, mode: str):
    """(setup, timed) callables for timing.interleaved."""
    inputs = [args[n] for n in case.diff]
    upstream = _upstream(fn(args))
    state = {}

    def forward():
        state["out"] = fn(args)

    def backward():
        torch.autograd.grad(state["out"], inputs, upstream)

    def both():
        torch.autograd.grad(fn(args), inputs, upstream)

    if mode == "forward":
        return None, forward
    if mode == "backward":
        return forward, backward
    return None, both
