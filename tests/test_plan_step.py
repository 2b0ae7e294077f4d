"""The planned step (vaegan_fast/step/): exact against the straightforward three-grad step for every option,
mode and supported layer (batch norm included, rows coupled), and its two executors equal bit for bit on the
native kernels (Python's execute.py and the C++ plan_step.cpp)."""
import copy
import itertools

import pytest
import torch

import vaegan_fast.ops as ops
from vaegan_fast import Model
from vaegan_fast.model import DISCRIMINATOR_NORMS, MODES
from vaegan_fast.nn import Decoder, Discriminator, Encoder, Flatten, FusedConv2d, FusedConvTranspose2d, FusedLinear
from vaegan_fast.nn import Unflatten
from vaegan_fast.ops import _dispatch
from vaegan_fast.step import step_flops, step_gradients

NATIVE = "native" in ops.available_backends("cpu", "layer_forward")
CPU_BACKENDS = ["reference"] + (["native"] if NATIVE else [])
needs_native = pytest.mark.skipif(not NATIVE, reason="the native library is not built")
SMALL = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12), discriminator_hidden=(11, 6))


def custom_programs(backend="auto"):
    """A program of every supported layer: biases before norms, a gelu, a norm in every network, a tap
    before a norm."""
    enc = Encoder([FusedConv2d(3, 5, 3, 2, 1, norm="batch", activation="gelu", backend=backend),
                   Flatten((5, 3, 3)), FusedLinear(45, 7, norm="batch", activation="tanh", backend=backend),
                   FusedLinear(7, 6, backend=backend)], (3, 6, 6), 3)
    dec = Decoder([FusedLinear(3, 45, activation="relu", backend=backend), Unflatten((5, 3, 3)),
                   FusedConvTranspose2d(5, 4, 3, 2, 1, 1, norm="batch", activation="leaky_relu", negative_slope=-0.1,
                                        backend=backend),
                   FusedConv2d(4, 3, 3, 1, 1, backend=backend)], 3)
    dis = Discriminator([FusedConv2d(3, 4, 3, 1, 1, activation="sigmoid", backend=backend),
                         FusedConv2d(4, 5, 3, 2, 1, norm="batch", activation="leaky_relu", backend=backend),
                         Flatten((5, 3, 3)), FusedLinear(45, 6, norm="batch", activation="relu", backend=backend),
                         FusedLinear(6, 1, backend=backend)], (3, 6, 6), feature_layer=1, feature_point="pre_norm")
    return dict(encoder=enc, decoder=dec, discriminator=dis)


ARCHS = {
    "mlp": lambda backend, **o: Model(**SMALL, backend=backend, **o),
    "conv": lambda backend, **o: Model.preset("conv", image_shape=(1, 8, 8), latent_dim=3, backend=backend, **o),
    "larsen64": lambda backend, **o: Model.preset("larsen64", image_shape=(3, 8, 8), latent_dim=4, backend=backend,
                                                  **o),
    "custom": lambda backend, **o: Model(image_shape=(3, 6, 6), latent_dim=3, backend=backend,
                                         **custom_programs(backend), **o),
}


def batch_for(model, n, dtype=torch.float64):
    return torch.rand(n, *model.input_shape, dtype=dtype)


def applied_gradients(model, x, monkeypatch):
    """The gradients train_step hands the optimizers, and its stats."""
    import vaegan_fast.model as model_module
    applied, real = {}, model_module.apply_updates

    def record(updates):
        for opt, params, grads, skip in updates:
            applied[next(n for n, o in model.optimizers.items() if o is opt)] = [g.clone() for g in grads]
        real(updates)
    monkeypatch.setattr(model_module, "apply_updates", record)
    stats = model.train_step(x)
    monkeypatch.undo()
    return applied, stats


OPTIONS = [dict(zip(("gamma", "pixel_weight", "recon_as_fake", "saturating"), values))
           for values in itertools.product((1.0, 0.3), (0.0, 0.7), (True, False), (False, True))]
# The encoder's weight of the feature term (1 above): weighted into U's seed, with the decoder's share joined onto G
# (reconstructions as fakes) or read from U times gamma / weight (not), and 0 (no U for the encoder at all), with
# and without the pixel term (at 0 the encoder's upstream is the pixel term or nothing).
OPTIONS += [dict(gamma=gamma, pixel_weight=pixel, recon_as_fake=fake, saturating=False, encoder_llike_weight=weight)
            for weight, (gamma, pixel) in itertools.product((0.25, 0.0, 2.5), ((0.3, 0.7), (1.0, 0.0)))
            for fake in (True, False)]
# The discriminator's batch norm over each set's rows ("separate": three groups of B rows, so streams stay on
# their own sets and U's seed covers the reconstructions alone) and over all three ("joint"), either way with the
# options that reshape the streams (the conv preset's default is "separate", the other architectures' "joint").
OPTIONS += [dict(discriminator_norm=norm, gamma=0.3, pixel_weight=0.7, recon_as_fake=fake)
            for norm in DISCRIMINATOR_NORMS for fake in (True, False)]
OPTIONS += [dict(discriminator_norm="separate", gamma=0.3, pixel_weight=0.7, encoder_llike_weight=0.0)]


def check_exact(model, x, monkeypatch):
    """train_step's gradients, losses and running averages equal the three-grad step's (fp64)."""
    twin = copy.deepcopy(model)
    applied, stats = applied_gradients(model, x, monkeypatch)
    losses = twin.losses(x)
    for name in MODES[model.config["mode"]]:
        params = twin.parameters_of(name)
        want = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
        assert len(applied[name]) == len(params)
        want = [torch.zeros_like(p) if w is None else w for p, w in zip(params, want)]
        largest = max(w.abs().max().item() for w in want)
        for i, (got, w) in enumerate(zip(applied[name], want)):
            # Near-zero gradients (a bias before a norm has an analytically zero one) carry the rounding of the
            # network's larger ones: the bound has a floor at fp64 rounding of the network's scale.
            bound = 1e-10 * w.abs().max().item() + 1e-12 * largest
            assert (got - w).abs().max().item() <= bound, f"{name} parameter {i}"
        assert torch.allclose(stats[f"{name}_loss"], losses[name].detach(), rtol=1e-12, atol=1e-12), name
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if "running" in key or "num_batches" in key:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_plan_equals_the_three_grad_step(backend, arch, options, monkeypatch):
    model = ARCHS[arch](backend, **options).double()
    check_exact(model, batch_for(model, 5), monkeypatch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode,norm", [("vae", "joint"), ("gan", "joint"), ("gan", "separate")])
def test_the_ablations_are_plans_too(backend, arch, mode, norm, monkeypatch):
    model = ARCHS[arch](backend, mode=mode, discriminator_norm=norm).double()
    assert model.uses_routed_step
    check_exact(model, batch_for(model, 4), monkeypatch)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("feature_layer", [0, 1, -1])
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_feature_layers_and_odd_batches(backend, feature_layer, batch, monkeypatch):
    for model in (Model(**SMALL, feature_layer=feature_layer, backend=backend).double(),
                  Model.preset("conv", image_shape=(1, 4, 4), latent_dim=2, feature_layer=feature_layer,
                               backend=backend).double()):
        if batch == 1 and model.config["architecture"] == "conv":
            continue  # a norm over one sample per group and 1x1 images: every output is the norm's bias
        check_exact(model, batch_for(model, batch), monkeypatch)


def test_the_clamp_of_logvar_masks_its_gradient(monkeypatch):
    model = Model(**SMALL).double()
    with torch.no_grad():
        model.encoder.net.layers[-1].bias[3:5] = torch.tensor([40.0, -40.0], dtype=torch.float64)
    check_exact(model, batch_for(model, 5), monkeypatch)


def test_sampling_runs_the_norms_on_their_running_averages():
    model = ARCHS["conv"]("reference").double()
    model.train_step(batch_for(model, 6))
    z = torch.randn(3, 3, dtype=torch.float64)
    one_by_one = torch.cat([model.decode(z[i:i + 1]) for i in range(3)])
    assert torch.allclose(model.decode(z), one_by_one, rtol=1e-12, atol=1e-14)  # no batch statistics
    assert model.decoder.training and model.encoder.training  # the mode is restored


# ------------------------------------------------------------------------------------------ the two executors
def both_executors(model, x, dtype):
    batch, latent = x.shape[0], model.config["latent_dim"]
    gen = torch.Generator().manual_seed(3)
    eps, z_prior = torch.randn(batch, latent, generator=gen), torch.randn(batch, latent, generator=gen).to(dtype)
    if dtype == torch.float64:  # an fp64 step of an fp64 model (a bf16 step's gradients go to fp32 masters)
        model = model.double()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    whole = step_gradients(a, x.to(dtype), eps, z_prior, whole_step=True)
    python = step_gradients(b, x.to(dtype), eps, z_prior, whole_step=False)
    return whole, python, a, b


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["vaegan", "vae", "gan"])
@pytest.mark.parametrize("options", [dict(), dict(gamma=0.3, pixel_weight=0.7, recon_as_fake=False, saturating=True)],
                         ids=["defaults", "options"])
def test_the_cpp_executor_equals_the_python_one_bit_for_bit(dtype, arch, mode, options, monkeypatch,
                                                           bf16_products):
    calls = []
    real = _dispatch.implementation("plan_step", "native")
    monkeypatch.setitem(_dispatch._impls, ("plan_step", "native"), lambda *a: calls.append(1) or real(*a))
    model = ARCHS[arch]("native", mode=mode, **options)
    (g1, l1), (g2, l2), a, b = both_executors(model, batch_for(model, 5, torch.float32), dtype)
    assert calls == [1]  # the C++ op ran: the comparison is not the Python executor against itself
    assert g1.keys() == g2.keys() == set(MODES[mode])
    for net in g1:
        for i, (x, y) in enumerate(zip(g1[net], g2[net])):
            master = torch.float32 if dtype == torch.bfloat16 else dtype
            assert x.dtype == y.dtype == master and torch.equal(x, y), f"{net} parameter {i}"
    assert l1.keys() == l2.keys()
    for key in l1:
        assert torch.equal(l1[key], l2[key]), key
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key  # running averages updated alike


@needs_native
@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_cpp_executor_can_hand_over_a_bf16_steps_gradients_in_bf16(arch, bf16_products):
    """master_grads=False (what train_step asks for, for optim's native Adam) leaves them in bf16: the same
    values as the fp32 ones it otherwise returns, without the cast."""
    model = ARCHS[arch]("native")
    x = batch_for(model, 5, torch.float32).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    latent = model.config["latent_dim"]
    eps, z_prior = torch.randn(5, latent, generator=gen), torch.randn(5, latent, generator=gen).to(torch.bfloat16)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    low, l1 = a._routed.gradients(x, eps, z_prior, master_grads=False)
    master, l2 = b._routed.gradients(x, eps, z_prior)
    assert low.keys() == master.keys()
    for net in low:
        for i, (g, m) in enumerate(zip(low[net], master[net])):
            assert g.dtype == torch.bfloat16 and m.dtype == torch.float32, f"{net} parameter {i}"
            assert torch.equal(g.float(), m), f"{net} parameter {i}"
    assert all(torch.equal(l1[key], l2[key]) for key in l1)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("weight", [0.25, 0.0])
@pytest.mark.parametrize("recon_as_fake", [True, False])
def test_the_executors_agree_bit_for_bit_with_an_encoder_weight_of_the_feature_term(dtype, arch, weight,
                                                                                   recon_as_fake, bf16_products):
    model = ARCHS[arch]("native", gamma=0.3, pixel_weight=0.7, recon_as_fake=recon_as_fake,
                        encoder_llike_weight=weight)
    assert_same_step(*both_executors(model, batch_for(model, 5, torch.float32), dtype))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("arch", ["conv", "custom"])
@pytest.mark.parametrize("mode", ["vaegan", "gan"])
@pytest.mark.parametrize("norm", DISCRIMINATOR_NORMS)
def test_the_executors_agree_bit_for_bit_with_either_discriminator_norm(dtype, arch, mode, norm, bf16_products):
    model = ARCHS[arch]("native", mode=mode, discriminator_norm=norm)
    assert_same_step(*both_executors(model, batch_for(model, 5, torch.float32), dtype))


def assert_same_step(whole, python, a, b):
    """The two executors' gradients, losses and running averages are equal bit for bit."""
    (g1, l1), (g2, l2) = whole, python
    for net in g1:
        for i, (x, y) in enumerate(zip(g1[net], g2[net])):
            assert torch.equal(x, y), f"{net} parameter {i}"
    assert all(torch.equal(l1[key], l2[key]) for key in l1)
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


@needs_native
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", "identity", "leaky_relu"])
@pytest.mark.parametrize("batch", [1, 2, 37])
def test_the_executors_agree_for_every_activation_and_batch(activation, batch):
    model = Model(**SMALL, activation=activation, negative_slope=-0.2 if activation == "leaky_relu" else 0.2)
    (g1, l1), (g2, l2), _, _ = both_executors(model, batch_for(model, batch, torch.float32), torch.float32)
    assert all(torch.equal(x, y) for net in g1 for x, y in zip(g1[net], g2[net]))
    assert all(torch.equal(l1[k], l2[k]) for k in l1)


@needs_native
def test_training_with_either_executor_lands_on_the_same_weights(monkeypatch):
    runs = []
    for whole in (True, False):
        if not whole:  # without the backend's whole-plan op, train_step runs the Python executor
            monkeypatch.delitem(_dispatch._impls, ("plan_step", "native"))
        model = Model.preset("conv", image_shape=(1, 8, 8), latent_dim=3, gating=True, equilibrium=0.9, margin=0.1,
                             backend="native")
        gen = torch.Generator().manual_seed(0)
        for _ in range(4):
            model.train_step(torch.rand(6, 1, 8, 8, generator=gen))
        runs.append(model.state_dict())
    for (key, a), b in zip(runs[0].items(), runs[1].values()):
        assert torch.equal(a, b), key


def test_the_gradients_of_each_network_are_handed_over_as_soon_as_they_are_complete():
    model = Model(**SMALL)
    order = []
    model._routed(torch.rand(4, 20), None, lambda name, grads: order.append(name), whole_step=False)
    assert order == ["discriminator", "decoder", "encoder"]


# ------------------------------------------------------------------------------------------ FLOPs
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mode", ["vaegan", "vae", "gan"])
def test_the_plans_flop_count_is_what_its_products_do(arch, mode):
    from torch.utils.flop_counter import FlopCounterMode
    model = ARCHS[arch]("reference", mode=mode)
    x = batch_for(model, 4, torch.float32)
    with FlopCounterMode(display=False) as counter:
        step_gradients(model, x, torch.randn(4, model.config["latent_dim"]), torch.randn(4, model.config["latent_dim"]),
                       whole_step=False)
    assert counter.get_total_flops() == step_flops(model, 4)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("norm", DISCRIMINATOR_NORMS)
def test_the_straightforward_steps_flop_count_matches_torchs_counter(arch, norm):
    from torch.utils.flop_counter import FlopCounterMode
    model = ARCHS[arch]("reference", pixel_weight=0.0, discriminator_norm=norm)
    x = batch_for(model, 4, torch.float32)
    with FlopCounterMode(display=False) as counter:
        model.routed_gradients(model.losses(x))
    assert counter.get_total_flops() == step_flops(model, 4, routed=False)
    assert step_flops(model, 4) <= step_flops(model, 4, routed=False)
