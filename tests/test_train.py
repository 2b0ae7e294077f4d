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


def test_a_colour_folder_of_any_size_trains_in_colour_and_samples_in_colour(tmp_path):
    from PIL import Image
    import numpy as np

    from vaegan_fast.__main__ import main
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):  # fewer images than a grid of reconstruction pairs
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    model = train({}, data=str(folder), steps=3, batch_size=4, out=str(out), grid_every=1, log_every=1,
                  checkpoint_every=1, progress=False)
    assert model.config["image_shape"] == (3, 10, 12) and model.config["input_dim"] == 360
    assert Model.load(out / "checkpoint.pt").config["image_shape"] == (3, 10, 12)
    for name in ("samples_0000001.png", "reconstructions_final.png"):
        with Image.open(out / name) as grid:
            assert grid.mode == "RGB"
    with Image.open(out / "reconstructions_final.png") as grid:  # 5 pairs, 8 columns: 2 rows of 12x10 tiles
        assert grid.size == (2 * (8 * 14 + 2), 2 * (2 * 12 + 2))
    assert main(["sample", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "s.png"), "-n", "1"]) == 0
    with Image.open(tmp_path / "s.png") as sample:
        assert sample.mode == "RGB" and sample.size == (2 * (12 + 4), 2 * (10 + 4))


def test_a_non_finite_loss_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    real_step = Model.train_step

    def poisoned_step(self, x):
        stats = real_step(self, x)
        stats["kl"] = torch.tensor(float("inf"))
        return stats

    monkeypatch.setattr(Model, "train_step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        train({}, data="synthetic", steps=5, batch_size=16, out=str(tmp_path), checkpoint_every=4, log_every=1,
              progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()
