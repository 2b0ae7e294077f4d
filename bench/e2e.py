"""End-to-end benchmark: one VAE-GAN training step of each preset, in samples per second.

Providers, all running one configuration from the same weights: vaegan_fast.BASELINE_OPTIONS for the MLP
presets (the configuration of every figure since the first benchmark), each conv preset's own defaults (what
its users train, and what the conv issue's speed target names: gamma 0.01, the pixel term, the gate):
- "eager": bench/baseline.py, the straightforward step a user would write (the yardstick);
- "compile": torch.compile of that step (default mode), with torch._dynamo.config.trace_autograd_ops set
  where the running torch has it, so its three autograd.grad calls land in one graph instead of breaking it
  (on a GPU also "compile[max-autotune-no-cudagraphs]" and "compile[reduce-overhead]");
- "vaegan_fast[<backend>]": Model.train_step with backend="auto" and check_inputs=False (the baseline checks
  nothing either); on a GPU also "vaegan_fast[<backend>,cudagraph]", the same step replayed from one CUDA
  graph (vaegan_fast.CudaGraphStep; its first step runs eagerly, the second is captured, so the check below
  covers a replay).
Low precision (bf16, and fp16 on a GPU), per dtype:
- "eager+autocast[<dtype>]": the baseline's step under torch.autocast, what a user gets without vaegan_fast;
- "vaegan_fast[<backend>,<dtype>]": Model(precision=<dtype>): low-precision compute, fp32 master weights.
Each provider's losses over its first two steps are checked against the fp32 eager baseline's before it is
timed: fp32 providers to LOSS_RTOL; low-precision ones by the project's low-precision rule (at most twice the
deviation of the autocast step in the same dtype, plus a floor of a few units in the last place).
"""
from __future__ import annotations

import copy
import time

import torch

from baseline import EagerVAEGAN
from vaegan_fast import BASELINE_OPTIONS, PRESETS, Model, RECOMMENDED_BATCH
from vaegan_fast.data import load_dataset

LOSS_RTOL = 1e-4  # fp32 losses of the same math, summed in different orders
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}
ULP_FLOOR = 4  # units in the last place of the low-precision dtype, relative to the loss


def load_batches(batch: int, count: int, device, shape: tuple = (784,)) -> tuple:
    """``count`` batches of real Fashion-MNIST images (synthetic ones when it is not installed) in the model's
    input ``shape``; for images of another size (larsen64's 3x64x64), uniform noise in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    if torch.Size(shape).numel() != 784:
        data = torch.rand(count, batch, *shape, generator=gen)
        return [d.to(device) for d in data], f"random {'x'.join(map(str, shape))} images"
    try:
        data, source = load_dataset("fashion-mnist"), "fashion-mnist"
    except FileNotFoundError:
        data, source = load_dataset("synthetic"), "synthetic (Fashion-MNIST not installed)"
    rows = torch.randint(0, len(data), (count, batch), generator=gen)
    return [data.images[r].reshape(batch, *shape).to(device) for r in rows], source


def _compile_step(step, mode):
    try:
        import torch._dynamo.config as dynamo_config
        import torch._functorch.config as functorch_config
        if hasattr(dynamo_config, "trace_autograd_ops"):
            dynamo_config.trace_autograd_ops = True
        # The step's first two autograd.grad calls keep the graph (retain_graph=True), which AOTAutograd's
        # donated buffers refuse at run time; without this the compiled step raises on "wide".
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except ImportError:
        pass
    return torch.compile(step, mode=mode)


def providers(model: Model, device, gpu: bool, low_precisions=()) -> dict:
    """{name: step function taking a batch and returning (encoder, decoder, discriminator) losses}.

    ``low_precisions`` ("bf16", "fp16") adds, per dtype, the eager step under autocast and Model(precision=)."""
    out = {"eager": EagerVAEGAN.like(model).step}
    modes = ["default"] + (["max-autotune-no-cudagraphs", "reduce-overhead"] if gpu else [])
    for mode in modes:
        name = "compile" if mode == "default" else f"compile[{mode}]"
        out[name] = _compile_step(EagerVAEGAN.like(model).step, None if mode == "default" else mode)
    ours = copy.deepcopy(model)
    ours.backend = "auto"
    resolved = _resolved_backend(ours, device)

    def vaegan_step(x, m=ours):
        s = m.train_step(x)
        return s["encoder_loss"], s["decoder_loss"], s["discriminator_loss"]

    vaegan_step.model = ours
    out[f"vaegan_fast[{resolved}]"] = vaegan_step
    if gpu:  # the same step captured in one CUDA graph (one eager warm-up step, then capture and replays)
        from vaegan_fast import CudaGraphStep
        graphed_model = copy.deepcopy(ours)
        graphed = CudaGraphStep(graphed_model, warmup=1)

        def graph_step(x, g=graphed):
            s = g(x)
            return s["encoder_loss"], s["decoder_loss"], s["discriminator_loss"]

        graph_step.model = graphed_model
        out[f"vaegan_fast[{resolved},cudagraph]"] = graph_step
    for name in low_precisions:
        out[f"eager+autocast[{name}]"] = _autocast_step(EagerVAEGAN.like(model), device, LOW_PRECISION[name])
        # fp16 starts its loss scale at 1, as the autocast yardstick scales nothing: the two then take the same
        # first updates (a first step that overflows at GradScaler's 2**16 would be skipped by ours only), and
        # the scaling kernels run all the same.
        scaling = {"loss_scale": {"init": 1.0}} if name == "fp16" else {}
        low = make_model(model.preset_name, device, precision=name, backend="auto", **scaling)
        low.load_state_dict(model.state_dict(), strict=False)  # same weights (fp16 adds loss-scale state)

        def low_step(x, m=low):
            s = m.train_step(x)
            return s["encoder_loss"], s["decoder_loss"], s["discriminator_loss"]

        low_step.model = low
        out[f"vaegan_fast[{_resolved_backend(low, device, LOW_PRECISION[name])},{name}]"] = low_step
    return out


def _autocast_step(base: EagerVAEGAN, device, dtype):
    def step(x):
        with torch.autocast(torch.device(device).type, dtype=dtype):
            return base.step(x)
    return step


def precision_of(provider: str):
    """The low-precision dtype name a provider runs in ("bf16", "fp16"), or None for fp32."""
    for name in LOW_PRECISION:
        if provider.endswith(f",{name}]") or provider == f"eager+autocast[{name}]":
            return name
    return None


def low_precision_bounds(reference_losses, autocast_losses, name: str) -> list:
    """Per-loss tolerance of a low-precision provider: twice the autocast step's deviation from fp32, plus
    ULP_FLOOR units in the last place of the dtype (relative to the loss)."""
    eps = torch.finfo(LOW_PRECISION[name]).eps
    return [2 * abs(float(a) - float(r)) + ULP_FLOOR * eps * abs(float(r)) + 1e-6
            for r, a in zip(reference_losses, autocast_losses)]


def _resolved_backend(model: Model, device, dtype=None) -> str:
    """The backend "auto" picks for the model's layers (by device, and by dtype: native takes no fp16)."""
    from vaegan_fast.ops import _dispatch
    return _dispatch.resolve("layer_forward", model.backend, torch.device(device), dtype)[0]


def first_losses(step, batches) -> list:
    """The provider's losses over its first two steps, as fp64 CPU scalars."""
    return [loss.double().cpu() for x in batches[:2] for loss in step(x)]


def check(step, reference_losses, batches, bounds=None) -> tuple:
    """Run the provider's first two steps; (problem or None, seconds the first call took).

    Losses must match ``reference_losses`` to LOSS_RTOL, or within the absolute ``bounds`` when given."""
    t0 = time.perf_counter()
    try:
        first = step(batches[0])
        float(first[0])
        first_s = time.perf_counter() - t0
        second = step(batches[1])
    except Exception as exc:
        return f"raised {type(exc).__name__}: {exc}", time.perf_counter() - t0
    for i, (got, want) in enumerate(zip((*first, *second), reference_losses)):
        got = got.double().cpu()
        ok = (abs(float(got) - float(want)) <= bounds[i] if bounds is not None
              else torch.isclose(got, want, rtol=LOSS_RTOL, atol=1e-6))
        if not ok:
            name = ("encoder", "decoder", "discriminator")[i % 3]
            return f"step {i // 3 + 1} {name} loss {float(got):.6g} != eager {float(want):.6g}", first_s
    return None, first_s


def operator_calls(step, x) -> int:
    """Operators a step dispatches (top-level aten / custom ops, including those run by the autograd engine)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(x)
    count = 0
    for evt in prof.events():
        if not _is_op(evt.name):
            continue
        parent = evt.cpu_parent
        while parent is not None and not _is_op(parent.name):
            parent = parent.cpu_parent
        count += parent is None
    return count


def kernel_launches(step, x) -> int:
    """CUDA kernels a step launches (GPU only)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(x)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _is_op(name: str) -> bool:
    return "::" in name and not name.startswith(("autograd::", "Optimizer.", "profiler::"))


def routed_saved_bytes(model: Model, x) -> int:
    """Bytes the routed step keeps from its forward pass for its backward streams (it uses no autograd)."""
    from vaegan_fast.step import step_gradients
    from vaegan_fast.model import PRECISIONS
    memory = {}
    m = copy.deepcopy(model)
    compute = PRECISIONS[m.config["precision"]] or x.dtype  # as train_step computes
    with torch.no_grad():
        eps, z_prior = m._draw_noise(x.shape[0], 2, compute)
        step_gradients(m, x.to(compute), eps, z_prior, memory=memory)
    return memory["saved_bytes"]


def saved_tensor_bytes(step, x) -> int:
    """Bytes of distinct tensors autograd saves for backward during one step."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            seen[key] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(x)
    return sum(seen.values())


def presets_for(names, gpu: bool) -> list:
    """(preset, batch) pairs: each preset at its recommended batch, and "wide" at 4096 too on a GPU."""
    out = [(n, RECOMMENDED_BATCH[n]) for n in names]
    if gpu and "wide" in names:
        out.append(("wide", 4096))
    return out


def make_model(preset: str, device, **options) -> Model:
    options = {"check_inputs": False, "backend": "reference", "seed": 0, **options}
    timed_in = BASELINE_OPTIONS if PRESETS[preset]["architecture"] == "mlp" else {}
    model = Model.preset(preset, **{**timed_in, **options}).to(device)
    model.preset_name = preset
    return model
