"""Evaluation of a checkpoint on Fashion-MNIST: reconstruction, KL and sample quality.

Sample quality is measured in the feature space of a small CNN classifier that this project trains on
Fashion-MNIST itself (no pretrained network can be downloaded here). Its weights ship with the package
(vaegan_fast/assets/fmnist_classifier.pt, with the command that made them and their test accuracy inside);
``python -m vaegan_fast train-classifier`` retrains them. The Fréchet distance in those features is reported
as "FID (Fashion-MNIST classifier features)": comparable between models evaluated here, not with the
Inception FID of papers.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint
from .data import BatchStream, load_fashion_mnist
from .metrics import frechet_distance, precision_recall
from .model import Model

CLASSIFIER_PATH = Path(__file__).resolve().parent / "assets" / "fmnist_classifier.pt"
CLASSIFIER_COMMAND = "python -m vaegan_fast train-classifier --out vaegan_fast/assets/fmnist_classifier.pt"


class FashionClassifier(nn.Module):
    """Two conv blocks and a 64-wide feature layer: ~106k parameters, ~91% test accuracy."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, 64)
        self.out = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 784] images in [0, 1] -> [N, 64] features (the layer FID is measured in)."""
        h = F.max_pool2d(F.relu(self.conv1(x.reshape(-1, 1, 28, 28))), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


@torch.no_grad()
def _accuracy(model: FashionClassifier, images, labels, chunk=2000) -> float:
    correct = sum((model(images[i:i + chunk]).argmax(1) == labels[i:i + chunk]).sum().item()
                  for i in range(0, len(images), chunk))
    return correct / len(images)


def train_classifier(out: str | Path, epochs: int = 4, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, log=print) -> dict:
    """Train the feature network on the Fashion-MNIST train split and save it with its test accuracy."""
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    torch.manual_seed(seed)
    model = FashionClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    stream = BatchStream(train, batch_size, seed=seed)
    steps = epochs * stream.steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        rows = stream.rows(step)
        loss = F.cross_entropy(model(train.images[rows]), train.labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % stream.steps_per_epoch == 0:
            log(f"epoch {(step + 1) // stream.steps_per_epoch}/{epochs}: loss {loss.item():.3f}")
    model.eval()
    accuracy = _accuracy(model, test.images, test.labels)
    info = {"weights": model.state_dict(), "test_accuracy": accuracy, "epochs": epochs, "batch_size": batch_size,
            "lr": lr, "seed": seed, "train_seconds": time.perf_counter() - start, "command": CLASSIFIER_COMMAND}
    checkpoint.atomic_save(info, out)
    log(f"test accuracy {accuracy:.4f}; saved to {out}")
    return info


def load_classifier(path: Optional[str | Path] = None) -> tuple:
    """(classifier in eval mode, its recorded test accuracy)."""
    path = Path(path) if path is not None else CLASSIFIER_PATH
    if not path.exists():
        raise FileNotFoundError(f"feature classifier {path} not found; train it with `{CLASSIFIER_COMMAND}`")
    info = checkpoint.load(path, map_location="cpu")
    model = FashionClassifier()
    model.load_state_dict(info["weights"])
    return model.eval(), info["test_accuracy"]


@torch.no_grad()
def features(classifier: FashionClassifier, images: torch.Tensor, chunk: int = 2000) -> torch.Tensor:
    return torch.cat([classifier.features(images[i:i + chunk].float().cpu()) for i in range(0, len(images), chunk)])


FASHION_MNIST_SHAPE = (1, 28, 28)
FID_NOTE = ("the FID classifier covers only Fashion-MNIST (1x28x28 grayscale images): sample quality is not "
            "measured for other images")


@torch.no_grad()
def evaluate_model(model: Model, samples: int = 10000, seed: int = 0, classifier_path=None,
                   test=None) -> dict:
    """Reconstruction MSE and mean KL of ``model`` on a test set (default: Fashion-MNIST's test split), and
    for Fashion-MNIST-shaped models the FID and precision/recall of its samples in the classifier's features."""
    shape = tuple(model.config.get("image_shape", FASHION_MNIST_SHAPE))
    fmnist = shape == FASHION_MNIST_SHAPE
    if test is None:
        if not fmnist:
            raise ValueError(f"this model's images are {'x'.join(map(str, shape))}: evaluate it on a folder of such "
                             "images (--data DIR); " + FID_NOTE)
        test = load_fashion_mnist("test")
    if tuple(test.image_shape) != shape:
        raise ValueError(f"the test images are {'x'.join(map(str, test.image_shape))} but this model's are "
                         f"{'x'.join(map(str, shape))}")
    images = test.images.to(model.device, model.dtype)
    result = {"mode": model.config["mode"], "step": model.step, "test_images": len(test), "test_data": test.name}
    if model.config["mode"] != "gan":
        mse, kl = 0.0, 0.0
        for i in range(0, len(images), 2000):
            x = images[i:i + 2000]
            mu, logvar = model.encode(x.view(x.shape[0], *model.input_shape))
            mse += (model.decode(mu).reshape(x.shape) - x).pow(2).mean(1).sum().item()
            kl += (0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(1)).sum().item()
        result.update(reconstruction_mse=mse / len(images), kl=kl / len(images))
    else:
        result.update(reconstruction_mse=None, kl=None)  # a GAN has no encoder
    if not fmnist:
        result.update(fid_classifier=None, precision=None, recall=None, samples=0, classifier_test_accuracy=None,
                      note=FID_NOTE)
        return result
    classifier, accuracy = load_classifier(classifier_path)
    gen = torch.Generator(model.device).manual_seed(seed)
    generated = torch.cat([model.sample(min(2000, samples - i), generator=gen) for i in range(0, samples, 2000)])
    real_features, fake_features = features(classifier, test.images), features(classifier, generated)
    precision, recall = precision_recall(real_features[:samples], fake_features)
    result.update(fid_classifier=frechet_distance(real_features, fake_features), precision=precision,
                  recall=recall, samples=samples, classifier_test_accuracy=accuracy)
    return result


def evaluate_checkpoint(path: str | Path, samples: int = 10000, seed: int = 0, classifier_path=None,
                        data: Optional[str] = None) -> dict:
    """evaluate_model on a checkpoint; ``data``: the test set (fashion-mnist's test split by default, or a
    folder of images of the checkpoint's shape)."""
    model = Model.load(path, map_location="cpu")
    test = None
    if data is not None and data != "fashion-mnist":
        from .data import load_dataset
        test = load_dataset(data, split="test")
    return evaluate_model(model, samples, seed, classifier_path, test)
