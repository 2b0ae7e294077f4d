"""Evaluation of checkpoints: every reported number is there, sane, and computed the documented way."""
import json
import subprocess
import sys

import pytest
import torch

from vaegan_fast import Model
from vaegan_fast.data import FASHION_MNIST_DIR, ImageDataset
from vaegan_fast.evaluate import CLASSIFIER_PATH, evaluate_model, features, load_classifier

needs_data = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason="Fashion-MNIST is not installed")


def test_the_shipped_feature_classifier_records_its_accuracy():
    classifier, accuracy = load_classifier()
    assert accuracy > 0.85
    assert features(classifier, torch.rand(3, 784)).shape == (3, 64)


def test_evaluate_reports_every_metric_and_real_data_scores_best():
    gen = torch.Generator().manual_seed(0)
    test = ImageDataset(torch.rand(400, 784, generator=gen) ** 3, (28, 28))
    model = Model(input_dim=784, latent_dim=4, encoder_hidden=(16,), decoder_hidden=(16,),
                  discriminator_hidden=(8,))
    result = evaluate_model(model, samples=300, test=test)
    assert set(result) >= {"reconstruction_mse", "kl", "fid_classifier", "precision", "recall",
                           "classifier_test_accuracy"}
    assert result["reconstruction_mse"] > 0 and result["kl"] >= 0 and result["fid_classifier"] > 0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    gan = evaluate_model(Model(input_dim=784, latent_dim=4, encoder_hidden=(16,), decoder_hidden=(16,),
                               discriminator_hidden=(8,), mode="gan"), samples=300, test=test)
    assert gan["reconstruction_mse"] is None and gan["kl"] is None


@needs_data
def test_evaluate_cli_on_a_checkpoint(tmp_path):
    model = Model.preset("seed")
    model.save(tmp_path / "m.pt")
    done = subprocess.run([sys.executable, "-m", "vaegan_fast", "evaluate", "--checkpoint", str(tmp_path / "m.pt"),
                           "--samples", "500", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "FID (Fashion-MNIST classifier features)" in done.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["samples"] == 500 and result["fid_classifier"] > 0


def test_missing_classifier_says_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "nope.pt")
    assert CLASSIFIER_PATH.exists()
