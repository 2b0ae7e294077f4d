"""A fixed set of native kernel calls, run in a subprocess by tests/test_native_isa.py with VAEGAN_FAST_ARCH
(and VAEGAN_FAST_BF16_PRODUCTS) set: ``python tests/isa_calls.py OUT.pt`` saves, per call and dtype, the native
results, the fp64 reference's and eager PyTorch's in that dtype (for the bf16 rule), with backend_info().

The calls: linear_act forward and backward, reparam_kl, the GAN and feature losses, the fused layer (dense,
conv2d and conv_transpose2d with a batch norm, forward and backward), whole planned steps (the C++
plan_step) of a small conv model (fp32) and a small MLP (fp32 and bf16), and Adam's update from bf16
gradients (adam_step_). Inputs come from fixed seeds, so every process sees the same ones."""
import copy
import sys

import torch

import vaegan_fast
import vaegan_fast.ops as ops
from vaegan_fast import Model
from vaegan_fast.nn import FusedConv2d, FusedConvTranspose2d, FusedLinear
from vaegan_fast.step import step_gradients


def grads_of(fn, inputs, gouts):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, inputs, [g.to(o.dtype) for g, o in zip(gouts, outs)], allow_unused=True,
                                materialize_grads=True)
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def op_cases():
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    x, w, b = r(37, 29), r(19, 29) / 29 ** 0.5, r(19)
    mu, lv, eps = r(23, 9), r(23, 9) * 0.5, r(23, 9)
    real, fake, fa, fb = r(31, 1), r(31, 1), r(17, 40), r(17, 40)
    return {
        "linear_act": (lambda be: lambda x, w, b: ops.linear_act(x, w, b, "leaky_relu", backend=be), [x, w, b],
                       [r(37, 19)]),
        "linear_act_gelu": (lambda be: lambda x, w, b: ops.linear_act(x, w, b, "gelu", backend=be), [x, w, b],
                            [r(37, 19)]),
        "reparam_kl": (lambda be: lambda m, l, e: ops.reparam_kl(m, l, e, backend=be), [mu, lv, eps],
                       [r(23, 9), r(23)]),
        "discriminator_loss": (lambda be: lambda a, c: ops.discriminator_loss(a, c, backend=be), [real, fake],
                               [torch.tensor(1.3)]),
        "feature_recon_loss": (lambda be: lambda a, c: ops.feature_recon_loss(a, c, backend=be), [fa, fb],
                               [torch.tensor(0.7)]),
    }


def layer_cases():
    cases = {}
    for name, make, shape in (("dense_bn", lambda: FusedLinear(29, 24, bias=False, norm="batch", activation="tanh"),
                               (29,)),
                              ("conv_bn", lambda: FusedConv2d(16, 24, 4, 2, 1, bias=False, norm="batch",
                                                              activation="leaky_relu"), (16, 10, 10)),
                              ("convT", lambda: FusedConvTranspose2d(24, 16, 4, 2, 1, activation="relu"),
                               (24, 5, 5))):
        torch.manual_seed(1)
        layer = make()
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(8, *shape, generator=gen)
        with torch.no_grad():
            g = torch.randn(layer.double().train()(x.double()).shape, generator=gen)
        cases[name] = (layer.float(), x, g)
    return cases


def run_layer(layer, x, g, dtype, backend):
    layer = copy.deepcopy(layer).to(dtype).train()
    for m in layer.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    xi = x.to(dtype).requires_grad_(True)
    y = layer(xi)
    params = [xi] + [p for p in layer.parameters()]
    return [y.detach()] + [t.detach() for t in torch.autograd.grad(y, params, g.to(dtype))]


def run_step(dtype, backend, arch):
    """A whole planned step's gradients: "conv" (a small conv model: its products, norms and image head in
    every ISA; fp32 only: at 12x12 with 6 samples a bf16 step is too ill-conditioned for the rule, eager's own
    errors reach half the gradients' size) or "mlp" (fp32 and bf16)."""
    torch.manual_seed(3)
    if arch == "conv":
        model = Model.preset("conv", image_shape=(1, 12, 12), latent_dim=4, backend="native")
    else:
        model = Model(input_dim=33, latent_dim=5, encoder_hidden=(24, 17), decoder_hidden=(17, 24),
                      discriminator_hidden=(19, 11), backend="native")
    gen = torch.Generator().manual_seed(4)
    n = 6 if arch == "conv" else 16
    x = torch.rand(n, *model.input_shape, generator=gen)
    eps, zp = torch.randn(n, model.config["latent_dim"], generator=gen), torch.randn(n, model.config["latent_dim"],
                                                                                    generator=gen)
    model.config["backend"] = backend
    if dtype == torch.float64:
        model = model.double()
    elif dtype == torch.bfloat16:
        model.config["precision"] = "bf16"
    grads, losses = step_gradients(model, x.to(dtype), eps.to(dtype if dtype != torch.bfloat16 else torch.float32),
                                   zp.to(dtype))
    # bf16 values handed over in the fp32 masters' dtype: compared as the bf16 they are
    return [t.detach().to(dtype) for net in sorted(grads) for t in grads[net]]


def run_adam(impl):
    """Two Adam updates from bf16 gradients of parameters of awkward sizes: "native" (adam_step_, fp32), "fp64"
    (torch's fused Adam in fp64 on the same gradients) or "fp32" (torch's, on the gradients cast to fp32)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(37,), (13, 7), (64, 16), (16385,)]
    dtype = torch.float64 if impl == "fp64" else torch.float32
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    exp_avgs = [0.1 * torch.randn(s, generator=gen).to(dtype) for s in shapes]
    exp_avg_sqs = [(0.01 * torch.rand(s, generator=gen) + 1e-6).to(dtype) for s in shapes]
    steps = [torch.tensor(4.0) for _ in shapes]
    for _ in range(2):
        grads = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
        torch._foreach_add_(steps, 1)
        if impl == "native":
            torch.ops.vaegan_fast_native.adam_step_(params, grads, exp_avgs, exp_avg_sqs, steps, 1e-3, 0.5, 0.999,
                                                    0.01, 1e-8, None)
        else:
            torch._fused_adam_(params, [g.to(dtype) for g in grads], exp_avgs, exp_avg_sqs, [], steps, lr=1e-3,
                               beta1=0.5, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=False, maximize=False,
                               grad_scale=None, found_inf=None)
    return params + exp_avgs + exp_avg_sqs


def main(out):
    results = {"info": vaegan_fast.backend_info(), "calls": {}}
    for name, (make, inputs, gouts) in op_cases().items():
        for dt in (torch.float32, torch.bfloat16):
            ins = [t.to(dt) for t in inputs]
            results["calls"][(name, str(dt))] = {
                "native": grads_of(make("native"), ins, gouts),
                "truth": grads_of(make("reference"), [t.double() for t in ins], gouts),
                "eager": grads_of(make("reference"), ins, gouts)}
    for name, (layer, x, g) in layer_cases().items():
        for dt in (torch.float32, torch.bfloat16):
            xd = x.to(dt).double()
            results["calls"][(name, str(dt))] = {
                "native": run_layer(layer, x, g, dt, "native"),
                "truth": run_layer(copy.deepcopy(layer).to(dt), xd, g, torch.float64, "reference"),
                "eager": run_layer(layer, x, g, dt, "reference")}
    for arch, dtypes in (("conv", (torch.float32,)), ("mlp", (torch.float32, torch.bfloat16))):
        for dt in dtypes:
            results["calls"][(f"plan_step_{arch}", str(dt))] = {
                "native": run_step(dt, "native", arch), "truth": run_step(torch.float64, "reference", arch),
                "eager": run_step(dt, "reference", arch)}
    results["calls"][("adam_step", str(torch.float32))] = {
        "native": run_adam("native"), "truth": run_adam("fp64"), "eager": run_adam("fp32")}
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
