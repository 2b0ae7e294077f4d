"""Evaluation of checkpoints: every reported number is recomputed independently, on the same inputs, with the
shipped classifier's features; real data scores far better than noise; the classifier has its recorded accuracy."""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from test_metrics import reference_frechet_distance, reference_precision_recall
from vaegan_fast import Model, checkpoint
from vaegan_fast.data import FASHION_MNIST_DIR, FASHION_MNIST_INSTALL, ImageDataset, load_fashion_mnist
from vaegan_fast.evaluate import (CLASSIFIER_PATH, FashionClassifier, evaluate_model, features,
                                  load_classifier)
from vaegan_fast.metrics import frechet_distance
from vaegan_fast.nn.networks import mlp_networks

needs_data = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists(),
                                reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} "
                                       f"(`{FASHION_MNIST_INSTALL}`)")


def _shipped_classifier() -> FashionClassifier:
    """The shipped weights, loaded here without load_classifier (which the tests check)."""
    info = checkpoint.load(CLASSIFIER_PATH, map_location="cpu")
    classifier = FashionClassifier()
    classifier.load_state_dict(info["weights"])
    return classifier.eval()


def _recorded_accuracy() -> float:
    return checkpoint.load(CLASSIFIER_PATH, map_location="cpu")["test_accuracy"]


def test_load_classifier_gives_the_shipped_weights_and_64_features():
    classifier, accuracy = load_classifier()
    assert accuracy == _recorded_accuracy()
    shipped = _shipped_classifier()
    images = torch.rand(3, 784)
    with torch.no_grad():
        assert torch.equal(classifier(images), shipped(images))
    assert features(classifier, images).shape == (3, 64)


@needs_data
def test_the_shipped_feature_classifier_has_the_accuracy_it_records():
    test = load_fashion_mnist("test")
    classifier, recorded = load_classifier()
    with torch.no_grad():
        predicted = torch.cat([classifier(test.images[i:i + 2500]).argmax(1) for i in range(0, len(test), 2500)])
    measured = (predicted == test.labels).double().mean().item()
    assert len(test) == 10000
    assert measured > 0.85
    assert measured == pytest.approx(recorded, abs=0.005)


def _small_model(**overrides) -> Model:
    return Model(input_dim=784, latent_dim=4, encoder_hidden=(16,), decoder_hidden=(16,),
                 discriminator_hidden=(8,), **overrides)


# The shipped classifier has dead ReLU units (always 0), so the covariances are singular and scipy's sqrtm
# warns; its answer still agrees with evaluate's to ~1e-9 here.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_evaluate_numbers_match_an_independent_computation():
    # Test images: 200 of the model's own samples (from another seed), then 200 noise images, so that the
    # samples are realistic (high precision) but cover only part of the "data" (the 300 test images that
    # precision and recall use are 2/3 model samples, 1/3 noise: recall near 2/3), precision and recall
    # clearly apart. Needs no dataset: the classifier ships with the package.
    model = _small_model()
    noise = torch.rand(200, 784, generator=torch.Generator().manual_seed(0)) ** 3
    test = ImageDataset(torch.cat([model.sample(200, generator=torch.Generator().manual_seed(1)), noise]), (1, 28, 28))
    samples, seed = 300, 5
    result = evaluate_model(model, samples=samples, seed=seed, test=test)
    assert set(result) >= {"reconstruction_mse", "kl", "fid_classifier", "precision", "recall",
                           "classifier_test_accuracy"}
    assert result["samples"] == samples and result["test_images"] == 400

    with torch.no_grad():
        x = test.images
        mu, logvar = model.encode(x)
        # reconstruction MSE per pixel, decoding the posterior mean
        mse = ((model.decode(mu) - x) ** 2).mean().item()
        # KL(N(mu, sigma^2) || N(0, I)) per image, from torch.distributions rather than the closed form
        posterior = torch.distributions.Normal(mu.double(), (0.5 * logvar.double()).exp())
        prior = torch.distributions.Normal(torch.zeros_like(mu.double()), torch.ones_like(mu.double()))
        kl = torch.distributions.kl_divergence(posterior, prior).sum(1).mean().item()
        # the samples evaluate draws: the prior, from a generator seeded with ``seed``
        z = torch.randn(samples, 4, generator=torch.Generator().manual_seed(seed))
        generated = model.decode(z)
        classifier = _shipped_classifier()
        real_features, fake_features = classifier.features(x), classifier.features(generated)
    assert result["reconstruction_mse"] == pytest.approx(mse, rel=1e-5)
    assert result["kl"] == pytest.approx(kl, rel=1e-5)
    assert kl > 0.01 and mse > 0.01
    # FID: all test images against all samples, in the shipped classifier's 64 features
    fid = reference_frechet_distance(real_features, fake_features)
    assert result["fid_classifier"] == pytest.approx(fid, rel=1e-5)
    # precision and recall (k=3) of the samples against as many test images
    precision, recall = reference_precision_recall(real_features[:samples], fake_features, k=3)
    assert result["precision"] == pytest.approx(precision, abs=1.01 / samples)
    assert result["recall"] == pytest.approx(recall, abs=1.01 / samples)
    assert precision > 0.9 and 0.4 < recall < 0.8
    assert result["classifier_test_accuracy"] == _recorded_accuracy()

    gan = evaluate_model(_small_model(mode="gan"), samples=samples, test=test)
    assert gan["reconstruction_mse"] is None and gan["kl"] is None
    assert gan["fid_classifier"] > 0 and 0 <= gan["precision"] <= 1 and 0 <= gan["recall"] <= 1


class _Replay(nn.Module):
    """A "decoder" whose samples are given images, in order (their logits, so that the sigmoid gives them
    back): a generator that is exactly as good as real data."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", torch.logit(images.clamp(1e-6, 1 - 1e-6)))
        self.unused = nn.Parameter(torch.zeros(1))  # the model's optimizer needs a parameter
        self.next = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(self.next, self.next + z.shape[0]) % len(self.logits)
        self.next += z.shape[0]
        return self.logits[rows] + 0 * self.unused


@needs_data
def test_real_data_scores_best():
    # 1000 test images as the reference; "generators" whose samples are 1000 other test images, uniform
    # noise, and an untrained decoder.
    real = load_fashion_mnist("test")
    test = ImageDataset(real.images[:1000], real.image_shape)

    def replaying(images):
        encoder, _, discriminator = mlp_networks((1, 28, 28), 4, (8,), (8,), (8,), "leaky_relu", 0.2, -1, "auto")
        return Model(input_dim=784, mode="gan", encoder=encoder, decoder=_Replay(images),
                     discriminator=discriminator)

    as_real = evaluate_model(replaying(real.images[5000:6000]), samples=1000, test=test)
    as_noise = evaluate_model(replaying(torch.rand(1000, 784)), samples=1000, test=test)
    untrained = evaluate_model(_small_model(), samples=1000, test=test)
    # (measured: FID 4.5 for real data, 473 for noise, 549 untrained; precision/recall 0.90/0.86, 0.12/0,
    # 1.0/0: a collapsed grey blob sits inside the real manifold, but covers none of it)
    assert as_real["fid_classifier"] < 0.05 * min(as_noise["fid_classifier"], untrained["fid_classifier"])
    assert as_real["precision"] > 0.6 and as_real["recall"] > 0.6
    assert as_noise["precision"] < 0.5 and as_noise["recall"] < 0.05 and untrained["recall"] < 0.05
    # The shipped features separate the classes: two halves of one class are far closer than two classes.
    # (With random weights the features are tiny and every FID is below 0.1, so the scale is checked too.)
    classifier, _ = load_classifier()
    tops, bags = real.images[real.labels == 0], real.images[real.labels == 8]
    same = frechet_distance(features(classifier, tops[:500]), features(classifier, tops[500:]))
    other = frechet_distance(features(classifier, tops[:500]), features(classifier, bags[:500]))
    assert same < 0.1 * other and other > 100 and as_noise["fid_classifier"] > 100


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
