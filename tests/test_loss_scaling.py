"""precision="fp16": dynamic loss scaling on the device. An overflow skips every update and halves the scale,
finite steps grow it, checkpoints carry it, and the options are checked."""
import copy

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.model import NETWORKS
from vaegan_fast.ops import _dispatch

SIZES = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12),
             discriminator_hidden=(11, 6))


def fp16_model(**options) -> Model:
    return Model(**SIZES, **{"precision": "fp16", **options})


def batch(n=9):
    return torch.rand(n, 20)


def networks_and_optimizers(model: Model) -> dict:
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizers": copy.deepcopy({n: o.state_dict()["state"] for n, o in model.optimizers.items()})}


def changed_networks(before: dict, after: dict) -> set:
    changed = set()
    for name in NETWORKS:
        if any(not torch.equal(before["weights"][k], after["weights"][k])
               for k in before["weights"] if k.startswith(name + ".")):
            changed.add(name)
        sb, sa = before["optimizers"][name], after["optimizers"][name]
        if any(not torch.equal(torch.as_tensor(sb[p][key]), torch.as_tensor(sa[p][key])) for p in sb for key in sb[p]):
            changed.add(name)
    return changed


def scaler_state(model: Model) -> tuple:
    return float(model.loss_scaler.scale), int(model.loss_scaler.growth_tracker)


OVERFLOW_CASES = {"routed step": dict(), "gated routed step": dict(gating=True, equilibrium=50.0, margin=0.1),
                  "vae (autograd)": dict(mode="vae"), "gan (autograd)": dict(mode="gan"),
                  "rmsprop": dict(optimizer="rmsprop", lr=1e-3)}


@pytest.mark.parametrize("options", OVERFLOW_CASES.values(), ids=OVERFLOW_CASES.keys())
def test_an_overflow_skips_every_update_and_halves_the_scale(options):
    model = fp16_model(loss_scale=dict(init=2.0 ** 8, growth_interval=100), **options)
    stats = model.train_step(batch())  # a finite step: every optimizer now holds state a skip must not touch
    assert not bool(stats["overflow"]) and scaler_state(model) == (2.0 ** 8, 1)
    model.loss_scaler.scale.fill_(2.0 ** 40)  # far beyond fp16's 65504: the scaled gradients overflow
    before = networks_and_optimizers(model)
    stats = model.train_step(batch())
    assert changed_networks(before, networks_and_optimizers(model)) == set()
    assert bool(stats["overflow"])
    assert float(stats["loss_scale"]) == 2.0 ** 39 and scaler_state(model) == (2.0 ** 39, 0)


def test_a_gated_step_without_overflow_still_skips_only_the_gated_network():
    model = fp16_model(loss_scale=dict(init=2.0 ** 8))
    model.train_step(batch())
    model.config.update(gating=True, equilibrium=50.0, margin=0.1)  # the discriminator is "winning": skip it
    before = networks_and_optimizers(model)
    stats = model.train_step(batch())
    assert not bool(stats["overflow"])
    assert changed_networks(before, networks_and_optimizers(model)) == {"encoder", "decoder"}


def test_the_scale_grows_after_growth_interval_finite_steps():
    model = fp16_model(loss_scale=dict(init=2.0 ** 4, growth_interval=3))
    history = [model.train_step(batch()) for _ in range(7)]
    assert not any(bool(s["overflow"]) for s in history)
    assert [float(s["loss_scale"]) for s in history] == [16.0, 16.0, 32.0, 32.0, 32.0, 64.0, 64.0]
    assert scaler_state(model) == (64.0, 1)


def test_the_defaults_are_grad_scalers():
    model = fp16_model()
    assert model.config["loss_scale"] == dict(init=65536.0, growth_factor=2.0, backoff_factor=0.5,
                                              growth_interval=2000)
    assert scaler_state(model) == (65536.0, 0)
    stats = model.train_step(batch())
    assert stats["loss_scale"].dtype == torch.float32 and stats["overflow"].dtype == torch.bool
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_resumed_training_carries_the_scale_and_equals_training_straight(tmp_path):
    options = dict(seed=3, loss_scale=dict(init=2.0 ** 8, growth_interval=2))
    xs = [batch() for _ in range(6)]
    straight = fp16_model(**options)
    for x in xs:
        straight.train_step(x)
    first = fp16_model(**options)
    for x in xs[:3]:
        first.train_step(x)
    assert scaler_state(first) == (2.0 ** 9, 1)  # the checkpoint falls between two growths
    first.save(tmp_path / "half.pt")
    resumed = Model.load(tmp_path / "half.pt")
    assert resumed.config == first.config
    assert scaler_state(resumed) == scaler_state(first)
    for x in xs[3:]:
        resumed.train_step(x)
    assert scaler_state(resumed) == scaler_state(straight) == (2.0 ** 11, 0)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    for name in NETWORKS:
        sa, sb = straight.optimizers[name].state_dict()["state"], resumed.optimizers[name].state_dict()["state"]
        for p in sa:
            for key in sa[p]:
                assert torch.equal(sa[p][key], sb[p][key]), (name, p, key)


BAD_OPTIONS = [
    (dict(precision="fp16", loss_scale=dict(init=0.0)), ValueError, r"loss_scale\['init'\]"),
    (dict(precision="fp16", loss_scale=dict(init=float("inf"))), ValueError, r"loss_scale\['init'\]"),
    (dict(precision="fp16", loss_scale=dict(growth_factor=1.0)), ValueError, r"loss_scale\['growth_factor'\]"),
    (dict(precision="fp16", loss_scale=dict(backoff_factor=1.5)), ValueError, r"loss_scale\['backoff_factor'\]"),
    (dict(precision="fp16", loss_scale=dict(growth_interval=0)), ValueError, r"loss_scale\['growth_interval'\]"),
    (dict(precision="fp16", loss_scale=dict(growth_interval=2.5)), ValueError, r"loss_scale\['growth_interval'\]"),
    (dict(precision="fp16", loss_scale=dict(scale=2.0)), ValueError, r"loss_scale has unknown keys \['scale'\]"),
    (dict(precision="fp16", loss_scale=2.0 ** 16), TypeError, "loss_scale must be a dict"),
    (dict(precision="bf16", loss_scale=dict(init=8.0)), ValueError, "loss_scale applies to precision='fp16'"),
    (dict(precision="fp16", backend="native"), ValueError, "backend='native' cannot compute in torch.float16"),
]


@pytest.mark.parametrize("options,error,message", BAD_OPTIONS)
def test_bad_loss_scale_options_are_refused_by_name(options, error, message):
    with pytest.raises(error, match=message):
        Model(**SIZES, **options)


def test_auto_passes_fp16_work_past_the_native_backend():
    cpu = torch.device("cpu")
    native = "native" in _dispatch.available_backends(cpu, "layer_forward")
    assert _dispatch.resolve("layer_forward", "auto", cpu, torch.float16)[0] == "reference"
    assert _dispatch.resolve("layer_forward", "auto", cpu, torch.float32)[0] == ("native" if native else "reference")
    if native:
        with pytest.raises(TypeError, match="torch.float16"):
            _dispatch.resolve("layer_forward", "native", cpu, torch.float16)
    model = fp16_model()  # backend="auto"
    assert all(torch.isfinite(v).all() for v in model.train_step(batch()).values())
