"""A training run checked step by step: each step's gradients against the fp64 three-grad step on the same
weights and noise, by the project's rule (vaegan_fast.testing). Comparing weights after several Adam steps
instead would measure the CPU's BLAS, not the kernels: Adam divides each update by the gradient's own size,
so a last-bit difference in a tiny gradient moves a weight by up to the learning rate."""
from __future__ import annotations

import torch

import vaegan_fast.model as model_module
from numerics import assert_matches
from vaegan_fast import Model
from vaegan_fast.model import MODES


def fp64_reference_twin(model: Model) -> Model:
    """A copy of ``model`` on the reference backend in fp64, with its weights (and nothing trained yet)."""
    config = {k: v for k, v in model.config.items() if k != "custom_networks"}
    twin = Model(**{**config, "backend": "reference", "precision": "fp32"})
    twin.load_state_dict(model.state_dict())
    return twin.double().to(model.device)


def check_training_follows_reference(model: Model, batches, monkeypatch) -> None:
    """Train ``model`` on ``batches``; before each step, an fp64 reference twin of it computes the three-grad
    gradients on the same batch and noise, and the gradients the step applies must match them."""
    applied, noise = {}, []
    real_apply, real_draw = model_module.apply_updates, model._draw_noise
    network_of = {id(opt): name for name, opt in model.optimizers.items()}

    def recording_apply(updates):
        for opt, params, grads, skip in updates:
            applied[network_of[id(opt)]] = [g.detach().clone() for g in grads]
        real_apply(updates)

    def recording_draw(batch, count, dtype):
        draws = real_draw(batch, count, dtype)
        noise[:] = [d.clone() for d in draws]
        return draws

    monkeypatch.setattr(model_module, "apply_updates", recording_apply)
    monkeypatch.setattr(model, "_draw_noise", recording_draw)
    for step, x in enumerate(batches):
        twin = fp64_reference_twin(model)
        applied.clear()
        stats = model.train_step(x)
        twin._draw_noise = lambda batch, count, dtype: [d.to(dtype) for d in noise[:count]]
        losses = twin.losses(x.double())
        trained = MODES[model.config["mode"]]
        assert set(applied) == set(trained), (step, sorted(applied))
        for name in trained:
            params = twin.parameters_of(name)
            want = torch.autograd.grad(losses[name], params, retain_graph=True, allow_unused=True)
            for i, (got, truth) in enumerate(zip(applied[name], want)):
                truth = torch.zeros_like(params[i]) if truth is None else truth
                assert_matches(f"step {step + 1}: {name} gradient {i}", got, truth)
        for key in ("encoder", "decoder", "discriminator", "generator"):
            if key in losses:
                assert_matches(f"step {step + 1}: {key}_loss", stats[f"{key}_loss"], losses[key].detach())
