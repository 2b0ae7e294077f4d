"""The native backend's whole step in one C++ op (kernels/cpu/routed_step.cpp) is step.py's routed step.

step.py's streams, run over the same native primitives, are the specification: the C++ op calls the same
kernels in the same order, so every gradient and every loss must be equal bit for bit, for every option, dtype
and architecture. (That those streams equal the three-grad step is tests/test_step.py's subject.)
"""
import copy
import itertools

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.ops import available_backends
from vaegan_fast.step import routed_step_gradients

pytestmark = pytest.mark.skipif("native" not in available_backends("cpu", "routed_step"),
                                reason="the native CPU library is not built")

SIZES = dict(input_dim=21, latent_dim=4, encoder_hidden=(13, 9), decoder_hidden=(9, 13),
             discriminator_hidden=(12, 8, 6))
OPTIONS = [dict(zip(("gamma", "pixel_weight", "recon_as_fake", "saturating", "feature_layer"), values))
           for values in itertools.product((1.0, 0.3), (0.0, 0.7), (True, False), (False, True), (-1, 0))]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _inputs(model, batch, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latent = model.config["latent_dim"]
    x = torch.rand(batch, model.config["input_dim"], generator=gen).to(dtype)
    eps = torch.randn(batch, latent, generator=gen).to(dtype)
    z_prior = torch.randn(batch, latent, generator=gen).to(dtype)
    return x, eps, z_prior


@pytest.fixture
def whole_step_calls(monkeypatch):
    """Counts the calls of the native whole-step primitive (so a test cannot pass by comparing the streams
    with themselves)."""
    from vaegan_fast.ops import _dispatch

    key, calls = ("routed_step", "native"), []
    real = _dispatch.implementation(*key)

    def spy(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setitem(_dispatch._impls, key, spy)
    return calls


def _assert_same_step(model, whole_step_calls, x, eps, z_prior):
    calls, before = [], len(whole_step_calls)
    whole, whole_losses = routed_step_gradients(model, x, eps, z_prior, lambda n, g: calls.append(n))
    assert len(whole_step_calls) == before + 1  # the C++ op ran
    streams, stream_losses = routed_step_gradients(model, x, eps, z_prior, whole_step=False)
    assert len(whole_step_calls) == before + 1  # and the streams did not use it
    assert calls == ["discriminator", "decoder", "encoder"]  # the callback's order, as the streams call it
    assert set(whole) == set(streams) == {"encoder", "decoder", "discriminator"}
    for name in streams:
        params = list(model.parameters_of(name))
        assert len(whole[name]) == len(streams[name]) == len(params)
        for i, (got, want, p) in enumerate(zip(whole[name], streams[name], params)):
            assert got.shape == p.shape and got.dtype == x.dtype, (name, i)
            assert torch.equal(got, want), f"{name} gradient {i} differs"
    assert set(whole_losses) == set(stream_losses)
    for key, want in stream_losses.items():
        assert whole_losses[key].dtype == want.dtype and whole_losses[key].shape == want.shape, key
        assert torch.equal(whole_losses[key], want), f"loss {key}: {whole_losses[key]} vs {want}"


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_step_equals_the_streams_for_every_option(options, dtype, whole_step_calls):
    model = Model(**SIZES, **options, activation="leaky_relu", backend="native")
    _assert_same_step(model, whole_step_calls, *_inputs(model, 6, dtype))


@pytest.mark.parametrize("activation,negative_slope", [("relu", 0.2), ("leaky_relu", 0.2), ("leaky_relu", -0.1),
                                                       ("tanh", 0.2), ("sigmoid", 0.2), ("gelu", 0.2)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_step_equals_the_streams_for_every_activation(activation, negative_slope, dtype, whole_step_calls):
    # gelu and a non-positive leaky slope keep the pre-activation for the backward: the other saved tensor.
    model = Model(**SIZES, activation=activation, negative_slope=negative_slope, backend="native")
    _assert_same_step(model, whole_step_calls, *_inputs(model, 5, dtype, seed=1))


@pytest.mark.parametrize("batch", [1, 2, 7, 37])
@pytest.mark.parametrize("sizes", [
    dict(input_dim=5, latent_dim=1, encoder_hidden=(), decoder_hidden=(), discriminator_hidden=(3,)),
    dict(input_dim=29, latent_dim=3, encoder_hidden=(17,), decoder_hidden=(11, 19, 7),
         discriminator_hidden=(31, 2)),
], ids=["no-hidden-layers", "uneven"])
def test_whole_step_equals_the_streams_for_awkward_shapes(batch, sizes, whole_step_calls):
    model = Model(**sizes, backend="native")
    _assert_same_step(model, whole_step_calls, *_inputs(model, batch, torch.float32, seed=batch))


def test_the_preset_in_fp32_with_an_eps_of_another_dtype(whole_step_calls):
    # Model(precision="bf16") draws eps in fp32 and computes in bf16: the op casts it as step.py does.
    model = Model.preset("seed", backend="native")
    x, eps, z_prior = _inputs(model, 9, torch.bfloat16, seed=3)
    _assert_same_step(model, whole_step_calls, x, eps.float(), z_prior)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_with_the_whole_step_is_training_with_the_streams(precision, monkeypatch, whole_step_calls):
    """Five train_steps (optimizer, gating and all) land on the same weights either way."""
    import vaegan_fast.model as model_module

    model = Model(**SIZES, gating=True, backend="native", precision=precision, seed=4)
    twin = copy.deepcopy(model)
    x = torch.rand(8, SIZES["input_dim"], generator=torch.Generator().manual_seed(5))
    for _ in range(5):
        model.train_step(x)
    assert len(whole_step_calls) == 5  # Model.train_step takes the whole step
    spec = model_module.routed_step_gradients
    monkeypatch.setattr(model_module, "routed_step_gradients",
                        lambda *a, **k: spec(*a, **{**k, "whole_step": False}))
    for _ in range(5):
        twin.train_step(x)
    for (name, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), name


def test_asking_for_memory_or_a_loss_scale_takes_the_streams(whole_step_calls):
    model = Model(**SIZES, backend="native")
    x, eps, z_prior = _inputs(model, 4, torch.float32)
    memory = {}
    routed_step_gradients(model, x, eps, z_prior, memory=memory)
    assert memory["saved_bytes"] > 0  # only the Python streams can report what they keep
    routed_step_gradients(model, x, eps, z_prior, loss_scale=torch.tensor(8.0))
    assert whole_step_calls == []


def test_bad_arguments_name_what_is_wrong():
    model = Model(**SIZES, backend="native")
    x, eps, z_prior = _inputs(model, 4, torch.float32)
    with pytest.raises(RuntimeError, match="eps and z_prior must be"):
        routed_step_gradients(model, x, eps[:, :2], z_prior)
    with pytest.raises(RuntimeError, match="z_prior must have x's dtype"):
        routed_step_gradients(model, x, eps, z_prior.double())
    with pytest.raises(TypeError, match="float16"):
        routed_step_gradients(model, x.half(), eps.half(), z_prior.half())


def test_opcheck():
    from vaegan_fast.ops._native import _network_args

    model = Model(**SIZES, backend="native")
    x, eps, z_prior = _inputs(model, 3, torch.float32)
    body = list(model.encoder.body.layers) + [model.encoder.head]
    args = [a for layers in (body, model.decoder.net.layers, model.discriminator.net.layers)
            for a in _network_args(list(layers))]
    with torch.no_grad():
        args = [[t.detach().clone() if isinstance(t, torch.Tensor) else t for t in a] for a in args]
    torch.library.opcheck(torch.ops.vaegan_fast_native.routed_step.default,
                          (x, eps, z_prior, *args, 4, 2, 0.5, 0.7, True, False, -30.0, 20.0))
