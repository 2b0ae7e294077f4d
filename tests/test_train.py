"""The training loop's safety: a NaN stops training and the last good checkpoint survives."""
import json

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.train import NonFiniteLossError, train


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real_step = Model.train_step

    def poisoned_step(self, x):
        stats = real_step(self, x)
        if self.step >= 5:
            with torch.no_grad():  # the weights blow up, as they do when training diverges
                self.decoder.net.layers[0].weight.fill_(float("nan"))
            stats["decoder_loss"] = torch.tensor(float("nan"))
        return stats

    monkeypatch.setattr(Model, "train_step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match="decoder_loss at step 5"):
        train({}, data="synthetic", steps=20, batch_size=16, out=str(tmp_path), checkpoint_every=2,
              grid_every=100, log_every=1, progress=False)
    good = Model.load(tmp_path / "checkpoint.pt")
    assert good.step == 4
    assert all(torch.isfinite(p).all() for p in good.parameters())
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["vae", "gan"])
def test_ablations_train_through_the_loop(tmp_path, mode):
    model = train({"mode": mode}, data="synthetic", steps=3, batch_size=16, out=str(tmp_path), grid_every=100,
                  progress=False)
    assert model.config["mode"] == mode and model.step == 3
    assert (tmp_path / "samples_final.png").exists()
    assert (tmp_path / "reconstructions_final.png").exists() == (mode == "vae")
