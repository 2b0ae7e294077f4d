"""vaegan_fast.Model: gradient routing, gating, checkpoints and input checks (the foundation's contract)."""
import copy
import os

import pytest
import torch

import vaegan_fast
from vaegan_fast import Model
from vaegan_fast.model import NETWORKS

SMALL = dict(input_dim=20, latent_dim=3, encoder_hidden=(12, 7), decoder_hidden=(7, 12),
             discriminator_hidden=(11, 6))


def small_model(**options) -> Model:
    return Model(**{**SMALL, **options})


def batch(n=9, dim=20, dtype=torch.float32):
    return torch.rand(n, dim, dtype=dtype)


def snapshot(model: Model) -> dict:
    """Everything a step may change: weights, optimizer states, step count, random stream."""
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizers": copy.deepcopy({n: o.state_dict() for n, o in model.optimizers.items()}),
            "step": model.step, "rng": model._rng().get_state().clone()}


def assert_same_state(a: dict, b: dict):
    assert a["step"] == b["step"]
    assert torch.equal(a["rng"], b["rng"])
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for name in NETWORKS:
        sa, sb = a["optimizers"][name]["state"], b["optimizers"][name]["state"]
        assert sa.keys() == sb.keys(), name
        for p in sa:
            for key in sa[p]:
                assert torch.equal(torch.as_tensor(sa[p][key]), torch.as_tensor(sb[p][key])), (name, p, key)


class RecordingOptimizer:
    """Wraps an optimizer and keeps a copy of the gradients it is asked to apply."""

    def __init__(self, optimizer):
        self.optimizer, self.applied = optimizer, None

    def step(self):
        self.applied = [p.grad.clone() for g in self.optimizer.param_groups for p in g["params"]]
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


OPTION_GRID = [
    dict(),
    dict(recon_as_fake=False, saturating=True, gamma=0.3, pixel_weight=0.0),
    dict(feature_layer=0, gamma=2.0, pixel_weight=0.5),
    dict(gamma=0.3, encoder_llike_weight=0.25),
    dict(recon_as_fake=False, encoder_llike_weight=0.0),
]


@pytest.mark.parametrize("options", OPTION_GRID)
def test_each_network_is_updated_by_the_gradient_of_its_own_loss_alone(options):
    model = small_model(**options).double()
    x = batch(dtype=torch.float64)
    twin = copy.deepcopy(model)
    for name in NETWORKS:
        model.optimizers[name] = RecordingOptimizer(model.optimizers[name])
    model.train_step(x)

    for name in NETWORKS:
        # A fresh model, a fresh graph, one loss, one backward: the gradient that network must receive.
        alone = copy.deepcopy(twin)
        alone.losses(x)[name].backward()
        expected = [p.grad for p in alone.parameters_of(name)]
        applied = model.optimizers[name].applied
        assert len(applied) == len(expected)
        for got, want in zip(applied, expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_summing_the_losses_would_route_wrong_gradients():
    """The test above has teeth: one backward over the summed losses gives the decoder a different gradient."""
    model = small_model().double()
    x = batch(dtype=torch.float64)
    alone, summed = copy.deepcopy(model), copy.deepcopy(model)
    alone.losses(x)["decoder"].backward()
    losses = summed.losses(x)
    (losses["encoder"] + losses["decoder"] + losses["discriminator"]).backward()
    own = torch.cat([p.grad.flatten() for p in alone.parameters_of("decoder")])
    mixed = torch.cat([p.grad.flatten() for p in summed.parameters_of("decoder")])
    assert (own - mixed).abs().max() > 1e-6


def test_losses_routed_by_hand_match_train_step():
    model = small_model().double()  # train_step's routed step and autograd agree to rounding: check in fp64
    x = batch(dtype=torch.float64)
    manual = copy.deepcopy(model)
    stats = model.train_step(x)
    losses = manual.losses(x)
    grads = {n: torch.autograd.grad(losses[n], manual.parameters_of(n), retain_graph=True) for n in NETWORKS}
    for name in NETWORKS:  # step only after every gradient is taken, as the docstring says
        for p, g in zip(manual.parameters_of(name), grads[name]):
            p.grad = g
        manual.optimizers[name].step()
    for (k, a), b in zip(model.state_dict().items(), manual.state_dict().values()):
        if k != "gate_skips":
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)
    torch.testing.assert_close(stats["encoder_loss"], losses["encoder"].detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("d_real,d_fake,train_disc,train_dec", [
    (0.68, 0.68, True, True),     # in equilibrium: train both
    (0.20, 0.70, False, True),    # real score too good (< 0.33): the discriminator is winning, skip it
    (0.70, 0.20, False, True),
    (1.20, 0.70, True, False),    # > 1.03: the discriminator is losing badly, skip the decoder
    (0.70, 1.20, True, False),
    (0.20, 1.20, True, True),     # both would be skipped: train both
    (0.33, 1.03, True, True),     # the bounds themselves are inside
])
def test_gate_decisions_follow_the_equilibrium_rule(d_real, d_fake, train_disc, train_dec):
    model = small_model(gating=True, equilibrium=0.68, margin=0.35)
    disc, dec = model.gate_decisions(torch.tensor(d_real), torch.tensor(d_fake))
    assert (bool(disc), bool(dec)) == (train_disc, train_dec)


@pytest.mark.parametrize("skipped,equilibrium", [("discriminator", 50.0), ("decoder", -50.0)])
def test_a_gated_update_leaves_that_network_and_its_optimizer_untouched(skipped, equilibrium):
    model = small_model()
    model.train_step(batch())  # every optimizer now holds state that a skipped update must not touch
    model.config.update(gating=True, equilibrium=equilibrium, margin=0.1)
    before = snapshot(model)
    stats = model.train_step(batch())
    after = snapshot(model)
    for name in NETWORKS:
        unchanged = all(torch.equal(before["weights"][k], after["weights"][k])
                        for k in before["weights"] if k.startswith(name + "."))
        assert unchanged == (name == skipped), name
        state_before, state_after = before["optimizers"][name]["state"], after["optimizers"][name]["state"]
        same_state = all(torch.equal(state_before[p][key], state_after[p][key])
                         for p in state_before for key in state_before[p])
        assert same_state == (name == skipped), name
    key = "train_discriminator" if skipped == "discriminator" else "train_decoder"
    assert not bool(stats[key])
    assert model.gate_skips.tolist() == ([1, 0] if skipped == "discriminator" else [0, 1])


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = small_model(lr={"encoder": 1e-3, "decoder": 2e-3, "discriminator": 5e-4}, gamma=0.5)
    for _ in range(3):
        model.train_step(batch())
    model.save(tmp_path / "m.pt")
    loaded = Model.load(tmp_path / "m.pt")
    assert loaded.config == model.config
    assert_same_state(snapshot(model), snapshot(loaded))
    x = batch()
    a, b = model.train_step(x), loaded.train_step(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_from_before_discriminator_norm_loads_with_the_joint_statistics_it_trained_with(tmp_path):
    model = Model.preset("conv", image_shape=(1, 8, 8), latent_dim=3)
    assert model.config["discriminator_norm"] == "separate"  # the conv preset's default now
    model.save(tmp_path / "new.pt")
    state = vaegan_fast.checkpoint.load(tmp_path / "new.pt")
    del state["config"]["discriminator_norm"]  # as the code before the option wrote it
    vaegan_fast.checkpoint.atomic_save(state, tmp_path / "old.pt")
    assert Model.load(tmp_path / "old.pt").config["discriminator_norm"] == "joint"
    assert small_model().config["discriminator_norm"] == "joint"  # Larsen et al.'s: one batch over all three sets


def test_training_resumed_from_a_checkpoint_equals_training_straight(tmp_path):
    xs = [batch() for _ in range(6)]
    straight = small_model(seed=3)
    for x in xs:
        straight.train_step(x)
    first = small_model(seed=3)
    for x in xs[:3]:
        first.train_step(x)
    first.save(tmp_path / "half.pt")
    resumed = Model.load(tmp_path / "half.pt")
    for x in xs[3:]:
        resumed.train_step(x)
    assert_same_state(snapshot(straight), snapshot(resumed))


@pytest.mark.parametrize("failure", ["serialising", "disk full"])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    model = small_model()
    path = tmp_path / "m.pt"
    model.save(path)
    good = path.read_bytes()
    model.train_step(batch())

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch if failure == "serialising" else os, "save" if failure == "serialising" else "fsync",
                        fail)
    with pytest.raises(OSError, match="No space left"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind
    assert Model.load(path).step == 0


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "not a checkpoint"])
def test_a_damaged_checkpoint_is_reported_not_loaded(tmp_path, damage):
    path = tmp_path / "m.pt"
    small_model().save(path)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip a byte":
        raw[len(raw) * 2 // 3] ^= 0x01  # inside the weights: a zip reader alone would not notice
    else:
        raw = b"PK\x03\x04" + raw[4:]
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt|truncated"):
        Model.load(path)


BAD_BATCHES = [
    (torch.rand(9, 21), ValueError, "20 features"),
    (torch.rand(9, 20).index_fill_(0, torch.tensor([4]), float("nan")), ValueError, "NaN or Inf"),
    (torch.rand(9, 20).index_fill_(0, torch.tensor([0]), float("inf")), ValueError, "NaN or Inf"),
    (torch.randint(0, 2, (9, 20)), TypeError, "floating-point"),
    (torch.rand(3, 3, 20), ValueError, "2-D"),
    (torch.rand(0, 20), ValueError, "at least one row"),
    (torch.rand(9, 20) * 3, ValueError, r"\[0, 1\]"),
    ([[0.5] * 20], TypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("x,error,message", BAD_BATCHES)
def test_bad_input_raises_a_clear_error_and_changes_nothing(x, error, message):
    model = small_model()
    model.train_step(batch())
    before = snapshot(model)
    with pytest.raises(error, match=message):
        model.train_step(x)
    assert_same_state(before, snapshot(model))


def test_check_inputs_can_be_switched_off_for_the_fastest_step():
    model = small_model(check_inputs=False)
    model.train_step(batch() * 0.5)  # no read-back; shape and dtype checks still apply
    with pytest.raises(ValueError, match="20 features"):
        model.train_step(torch.rand(9, 19))


def test_presets_have_the_documented_sizes():
    seed = Model.preset("seed")
    assert [l.weight.shape[1] for l in seed.discriminator.net.layers] == [784, 128, 64, 32]
    assert seed.encoder.net.layers[-1].weight.shape == (32, 32)  # [mu; logvar] for latent 16
    wide = Model.preset("wide", gamma=0.5)
    assert [tuple(l.weight.shape) for l in wide.decoder.net.layers] == [(512, 128), (1024, 512), (784, 1024)]
    assert wide.config["gamma"] == 0.5
    with pytest.raises(ValueError, match="preset"):
        Model.preset("huge")


def test_a_presets_gating_applies_to_the_modes_with_a_discriminator():
    conv = Model.preset("conv")
    assert (conv.config["gamma"], conv.config["gating"]) == (0.01, True)  # its tuned VAE-GAN defaults
    assert Model.preset("conv", mode="gan").config["gating"] is True
    assert Model.preset("conv", mode="vae").config["gating"] is False  # the VAE has nothing to gate
    with pytest.raises(ValueError, match="gating"):
        Model.preset("conv", mode="vae", gating=True)  # asked for explicitly: refused, as for Model(...)


def test_public_helpers_shapes_and_ranges():
    model = small_model()
    x = batch()
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (9, 3)
    images = model.sample(5)
    assert images.shape == (5, 20) and images.min() >= 0 and images.max() <= 1
    assert model.reconstruct(x).shape == x.shape
    rng_before = model._rng().get_state().clone()
    model.sample(3)
    assert torch.equal(rng_before, model._rng().get_state())  # sampling does not disturb training's stream


def test_logvar_is_clamped_by_the_encoder():
    model = small_model()
    with torch.no_grad():
        model.encoder.net.layers[-1].bias[3:] = 1e4
    _, logvar = model.encode(batch())
    assert logvar.max().item() == vaegan_fast.nn.LOGVAR_MAX


class ConvEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=2)
        self.head = torch.nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x.reshape(-1, 1, 8, 8))).flatten(1)
        return self.head(h).chunk(2, dim=1)


class ConvDiscriminator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=2)
        self.out = torch.nn.Linear(36, 1)

    def forward(self, x):
        features = torch.relu(self.conv(x.reshape(-1, 1, 8, 8))).flatten(1)
        return self.out(features), features  # [N, 1] logits are accepted


def test_custom_networks_train_and_round_trip(tmp_path):
    def make():
        torch.manual_seed(0)
        return dict(encoder=ConvEncoder(), decoder=torch.nn.Linear(2, 64), discriminator=ConvDiscriminator())
    model = Model(input_dim=64, latent_dim=2, **make())
    for _ in range(2):
        stats = model.train_step(torch.rand(5, 64))
    assert torch.isfinite(stats["encoder_loss"])
    model.save(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="custom networks"):
        Model.load(tmp_path / "c.pt")
    loaded = Model.load(tmp_path / "c.pt", **make())
    assert_same_state(snapshot(model), snapshot(loaded))


def test_model_options_are_validated():
    with pytest.raises(ValueError, match="optimizer"):
        small_model(optimizer="sgd")
    with pytest.raises(ValueError, match="feature_layer"):
        small_model(feature_layer=5)
    with pytest.raises(ValueError, match="lr as a dict"):
        small_model(lr={"encoder": 1e-3})
    with pytest.raises(ValueError, match="all three"):
        Model(**SMALL, encoder=torch.nn.Linear(20, 6))
    with pytest.raises(ValueError, match="backend"):
        small_model(backend="cuda-magic").train_step(batch())


def test_rmsprop_optimizers_train():
    model = small_model(optimizer="rmsprop", lr=1e-3)
    assert all(isinstance(o, torch.optim.RMSprop) for o in model.optimizers.values())
    before = snapshot(model)
    model.train_step(batch())
    assert not torch.equal(before["weights"]["decoder.net.layers.0.weight"], model.decoder.net.layers[0].weight)


@pytest.mark.parametrize("mode,trained", [("vae", ("encoder", "decoder")), ("gan", ("decoder", "discriminator"))])
def test_ablation_modes_train_only_their_networks_with_their_own_losses(mode, trained):
    model = small_model(mode=mode).double()
    x = batch(dtype=torch.float64)
    twin = copy.deepcopy(model)
    before = snapshot(model)
    for name in NETWORKS:
        model.optimizers[name] = RecordingOptimizer(model.optimizers[name])
    stats = model.train_step(x)
    for name in NETWORKS:
        changed = any(not torch.equal(before["weights"][k], v) for k, v in model.state_dict().items()
                      if k.startswith(name + "."))
        assert changed == (name in trained), name
        if name in trained:
            alone = copy.deepcopy(twin)
            alone.losses(x)[name].backward()
            for got, p in zip(model.optimizers[name].applied, alone.parameters_of(name)):
                torch.testing.assert_close(got, p.grad, rtol=1e-12, atol=1e-14)
    if mode == "vae":
        assert "discriminator_loss" not in stats and stats["kl"] > 0
        assert torch.allclose(stats["encoder_loss"], stats["kl"] + stats["pixel"])
    else:
        assert "encoder_loss" not in stats and "kl" not in stats


def test_mode_options_are_validated():
    with pytest.raises(ValueError, match="mode must be one of"):
        small_model(mode="wgan")
    with pytest.raises(ValueError, match="pixel_weight > 0"):
        small_model(mode="vae", pixel_weight=0.0)


NUMERIC_OPTIONS = {"gamma": {}, "encoder_llike_weight": {}, "pixel_weight": {}, "margin": {}, "equilibrium": {},
                   "negative_slope": {},
                   "lr": {}, "lr['decoder']": {}, "betas[0]": {}, "betas['encoder'][1]": {},
                   "loss_scale['init']": dict(precision="fp16"), "loss_scale['growth_factor']": dict(precision="fp16"),
                   "loss_scale['backoff_factor']": dict(precision="fp16")}


def _with_value(option: str, value) -> dict:
    """Model keyword arguments that set ``option`` (as written in NUMERIC_OPTIONS) to ``value``."""
    nets = ("encoder", "decoder", "discriminator")
    if option == "lr['decoder']":
        return {"lr": {n: value if n == "decoder" else 1e-3 for n in nets}}
    if option == "betas[0]":
        return {"betas": (value, 0.999)}
    if option == "betas['encoder'][1]":
        return {"betas": {n: (0.5, value if n == "encoder" else 0.999) for n in nets}}
    if option.startswith("loss_scale"):
        return {"loss_scale": {option.split("'")[1]: value}}
    return {option: value}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("option", list(NUMERIC_OPTIONS))
def test_every_numeric_option_refuses_non_finite_values_by_name(option, value):
    name = option.split("[")[0]
    with pytest.raises(ValueError, match=name):
        small_model(**NUMERIC_OPTIONS[option], **_with_value(option, value))


@pytest.mark.parametrize("options,message", [
    (dict(latent_dim=0), "latent_dim"), (dict(input_dim=-3), "input_dim"), (dict(seed=-1), "seed"),
    (dict(encoder_hidden=(12, 0)), r"encoder_hidden\[1\]"), (dict(lr=0.0), "lr"), (dict(betas=(0.5, 1.0)), "betas"),
    (dict(gamma=-0.1), "gamma"), (dict(encoder_llike_weight=-0.5), "encoder_llike_weight must be >= 0"),
    (dict(image_shape=(2, 4, 5), input_dim=None), "channels"),
    (dict(image_shape=(1, 4, 4)), "does not match"), (dict(backend="gpu"), "backend"),
    (dict(discriminator_norm="per_set"), r"discriminator_norm must be one of \('joint', 'separate'\)"),
])
def test_out_of_range_options_are_refused_by_name(options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        small_model(**options)


@pytest.mark.parametrize("options,error", [(dict(feature_layer=1.0), TypeError), (dict(latent_dim=3.0), TypeError),
                                           (dict(gating=1), TypeError), (dict(seed=True), TypeError),
                                           (dict(encoder_llike_weight="0.5"), TypeError),
                                           (dict(encoder_llike_weight=True), TypeError)])
def test_options_of_the_wrong_type_are_refused(options, error):
    with pytest.raises(error):
        small_model(**options)


@pytest.mark.parametrize("weight", [1.0, 0.25, 0.0])
def test_the_encoders_loss_reads_the_feature_term_at_its_weight(weight):
    model = small_model(gamma=0.3, encoder_llike_weight=weight).double()
    stats = model.train_step(batch(dtype=torch.float64))
    want = stats["kl"] + weight * stats["llike"] + stats["pixel"]
    assert torch.allclose(stats["encoder_loss"], want, rtol=1e-12, atol=1e-12)
    assert model.config["encoder_llike_weight"] == weight
    assert small_model().config["encoder_llike_weight"] == 1.0  # the default: the paper's encoder loss


def test_a_nan_gamma_can_no_longer_poison_the_weights():
    with pytest.raises(ValueError, match="gamma must be a finite number, got nan"):
        Model.preset("seed", gamma=float("nan"))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded rows"])
@pytest.mark.parametrize("backend", vaegan_fast.ops.available_backends("cpu", "layer_forward"))
def test_every_backend_accepts_a_strided_batch_with_the_bits_of_its_contiguous_copy(backend, layout):
    x = batch()
    strided = {"transposed": x.t().contiguous().t(), "sliced": torch.cat([x, x], 1)[:, ::2],
               "expanded rows": x[:1].expand(9, 20)}[layout]
    assert not strided.is_contiguous()
    a, b = small_model(backend=backend, seed=5), small_model(backend=backend, seed=5)
    for _ in range(2):
        got, want = a.train_step(strided), b.train_step(strided.contiguous())
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert_same_state(snapshot(a), snapshot(b))


def test_a_batch_on_another_device_or_a_backend_that_cannot_run_is_refused_with_no_state_changed(monkeypatch):
    from vaegan_fast.ops import BackendUnavailableError, _dispatch
    model = small_model()
    model.train_step(batch())
    before = snapshot(model)
    with pytest.raises(ValueError, match="is on meta but the model is on cpu"):
        model.train_step(torch.empty(9, 20, device="meta"))
    assert_same_state(before, snapshot(model))
    monkeypatch.setitem(_dispatch._load_errors, "native", "pretend the library failed to load")
    monkeypatch.setattr(_dispatch, "_resolved", {})
    model.backend = "native"
    with pytest.raises(BackendUnavailableError, match="pretend"):
        model.train_step(batch())
    assert_same_state(before, snapshot(model))
