"""Checkpoints written before the step became a plan (commit cdfc8bb: other module names, no architecture in the
config) still load, and training continues from them where the old code would have continued."""
from pathlib import Path

import torch

from vaegan_fast import Model

DATA = Path(__file__).parent / "data"


def test_checkpoint_from_before_the_plan_loads_and_continues():
    expected = torch.load(DATA / "checkpoint-cdfc8bb-expected.pt")
    model = Model.load(DATA / "checkpoint-cdfc8bb.pt")
    assert model.step == expected["step"]
    for key in ("input_dim", "image_shape", "latent_dim", "gamma", "gating", "lr", "betas", "seed", "backend"):
        assert model.config[key] == expected["config"][key], key
    # Weights, buffers and Adam's moments exactly as the old code held them (state_dict order is the
    # modules' order, which the new layout keeps; the names changed).
    state = list(model.state_dict().values())
    assert len(state) == len(expected["state_before"])
    for got, want in zip(state, expected["state_before"]):
        assert torch.equal(got, want)
    for net, states in expected["adam_before"].items():
        loaded = list(model.optimizers[net].state_dict()["state"].values())
        assert len(loaded) == len(states)
        for got, want in zip(loaded, states):
            for k in want:
                assert torch.equal(got[k], want[k]), (net, k)
    # The next step draws its noise from the restored stream: its losses match the old code's (fp32; a
    # tolerance, not bit equality, because the products may be summed in another order on another CPU).
    stats = model.train_step(expected["batches"][2])
    for name, want in expected["losses"].items():
        assert abs(float(stats[name]) - want) <= 1e-5 * abs(want) + 1e-6, (name, float(stats[name]), want)
