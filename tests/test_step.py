"""The routed step computes exactly the gradients of the three-grad step, with fewer FLOPs."""
import copy
import itertools

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.model import NETWORKS
from vaegan_fast.ops import available_backends
from vaegan_fast.step import step_flops, step_gradients

SIZES = dict(input_dim=21, latent_dim=4, encoder_hidden=(13, 9), decoder_hidden=(9, 13),
             discriminator_hidden=(12, 8, 6))

OPTIONS = [dict(zip(("gamma", "pixel_weight", "recon_as_fake", "saturating", "feature_layer"), values))
           for values in itertools.product((1.0, 0.3), (0.0, 0.7), (True, False), (False, True), (-1, 0))]
# The encoder's weight of the feature term away from 1 (and at 0: the encoder reads no U).
OPTIONS += [dict(gamma=0.3, pixel_weight=pixel, recon_as_fake=fake, saturating=False, feature_layer=layer,
                 encoder_llike_weight=weight)
            for weight, pixel, fake, layer in itertools.product((0.1, 0.0), (0.0, 0.7), (True, False), (-1, 0))]


def three_grad_and_routed(model, x):
    gen_state = model._rng().get_state()
    reference = model.routed_gradients(model.losses(x))
    model._rng().set_state(gen_state)
    eps = torch.randn(x.shape[0], model.config["latent_dim"], generator=model._rng(), dtype=x.dtype)
    z_prior = torch.randn(eps.shape, generator=model._rng(), dtype=x.dtype)
    routed, losses = step_gradients(model, x, eps, z_prior)
    return reference, routed, losses


# fp64 runs on the CPU backends (the Triton backend's step is checked by tests/test_triton_model.py).
CPU_BACKENDS = [b for b in ("reference", "native") if b in available_backends("cpu", "layer_forward")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_routed_gradients_equal_the_three_grad_step(options, backend):
    model = Model(**SIZES, **options, activation="leaky_relu", backend=backend).double()
    x = torch.rand(7, 21, dtype=torch.float64)
    with torch.no_grad():  # push some logvars into the clamp so its gradient mask is exercised
        model.encoder.net.layers[-1].bias[4:6] = torch.tensor([40.0, -40.0], dtype=torch.float64)
    reference, routed, losses = three_grad_and_routed(model, x)
    for name in NETWORKS:
        assert len(routed[name]) == len(reference[name])
        for i, (got, want) in enumerate(zip(routed[name], reference[name])):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"{name} parameter {i}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu", "identity"])
def test_routed_gradients_for_every_activation(activation, backend):
    model = Model(**SIZES, activation=activation, backend=backend).double()
    reference, routed, _ = three_grad_and_routed(model, torch.rand(5, 21, dtype=torch.float64))
    for name in NETWORKS:
        for got, want in zip(routed[name], reference[name]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_losses_of_the_routed_step_match():
    model = Model(**SIZES).double()
    x = torch.rand(6, 21, dtype=torch.float64)
    gen_state = model._rng().get_state()
    want = model.losses(x)
    model._rng().set_state(gen_state)
    _, _, got = three_grad_and_routed(copy.deepcopy(model), x)
    for key in ("encoder", "decoder", "discriminator", "kl", "llike", "generator", "d_real", "d_fake", "pixel"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12, msg=key)


def test_flop_count_of_the_straightforward_step_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    model = Model.preset("seed", pixel_weight=0.0, backend="reference")
    x = torch.rand(32, 784)
    with FlopCounterMode(display=False) as counter:
        model.routed_gradients(model.losses(x))
    assert counter.get_total_flops() == step_flops(model, 32, routed=False)
    assert step_flops(model, 32, routed=True) < step_flops(model, 32, routed=False)
