"""Command line: ``python -m vaegan_fast train|sample|evaluate|train-classifier``.

Every argument is checked before any work is done; a mistake is reported as one line ``error: ...`` that
names it, with exit code 2 for a malformed argument (argparse's own messages) and 1 for one that does not fit
the data, the checkpoint or the machine. ``VAEGAN_FAST_TRACEBACK=1`` shows the traceback behind an error.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from .model import DISCRIMINATOR_NORMS, PRESETS

BACKEND_CHOICES = ("auto", "reference", "native", "triton")
MIN_SAMPLES = 4  # precision/recall with k = 3 need more than 3 samples


# ------------------------------------------------------------------------------------------ argument types
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def finite_float(minimum: float | None = None, positive: bool = False):
    """A float that is finite (NaN and +-inf refused), and >= minimum or > 0 when asked."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {text!r}")
        return value
    return parse


def image_size(text: str) -> tuple:
    """'HxW' or 'N' (square) in pixels."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected HxW (e.g. 64x64) or one size N, got {text!r}")
    return values


def _model_options(args) -> dict:
    options = {"gamma": args.gamma, "encoder_llike_weight": args.encoder_llike_weight,
               "pixel_weight": args.pixel_weight, "recon_as_fake": args.recon_as_fake,
               "saturating": args.saturating, "gating": args.gating, "feature_layer": args.feature_layer,
               "discriminator_norm": args.discriminator_norm, "lr": args.lr, "backend": args.backend,
               "mode": args.mode, "precision": args.precision}
    return {k: v for k, v in options.items() if v is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vaegan_fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE-GAN, writing checkpoints, a metrics log and sample grids")
    t.add_argument("--data", default=None,
                   help="fashion-mnist (default), synthetic, or a folder of PNGs (grayscale or colour)")
    t.add_argument("--channels", type=int, choices=(1, 3), default=None,
                   help="convert a folder's images to grayscale (1) or RGB (3); default: as the files are")
    t.add_argument("--image-size", type=image_size, default=None,
                   help="resize a folder's images to HxW; default: as the files are (all the same size)")
    t.add_argument("--steps", type=positive_int, required=True,
                   help="total training steps (a resumed run continues to it)")
    t.add_argument("--batch-size", type=positive_int, default=None, help="default: the preset's recommended batch")
    t.add_argument("--out", required=True, help="folder for checkpoint.pt, metrics.jsonl and PNG grids")
    t.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: seed")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    t.add_argument("--seed", type=nonnegative_int, default=None, help="weights, noise and batch order (default 0)")
    t.add_argument("--mode", choices=("vaegan", "vae", "gan"), default=None,
                   help="vaegan (default), or one of the ablations: vae (no discriminator), gan (no encoder)")
    t.add_argument("--backend", choices=BACKEND_CHOICES, default=None, help="default: auto")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="compute precision with fp32 master weights (default fp32; fp16 adds loss scaling)")
    t.add_argument("--gamma", type=finite_float(minimum=0), default=None)
    t.add_argument("--encoder-llike-weight", type=finite_float(minimum=0), default=None,
                   help="weight of the feature reconstruction in the encoder's loss (default: the preset's, 1.0)")
    t.add_argument("--pixel-weight", type=finite_float(minimum=0), default=None)
    t.add_argument("--recon-as-fake", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--saturating", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--gating", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--feature-layer", type=integer, default=None)
    t.add_argument("--discriminator-norm", choices=DISCRIMINATOR_NORMS, default=None,
                   help="the discriminator's batch norm over real, prior and reconstructed rows together (joint) "
                        "or each set over its own rows (separate); default: the preset's")
    t.add_argument("--lr", type=finite_float(positive=True), default=None)
    t.add_argument("--checkpoint-every", type=positive_int, default=500)
    t.add_argument("--grid-every", type=positive_int, default=500)
    t.add_argument("--log-every", type=positive_int, default=10)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--cuda-graph", action="store_true",
                   help="replay each step from one captured CUDA graph (GPU, single process)")

    s = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("-n", type=positive_int, default=64, help="number of samples")
    s.add_argument("--seed", type=nonnegative_int, default=0)

    e = sub.add_parser("evaluate", help="reconstruction MSE, KL, FID (classifier features), precision/recall")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default="fashion-mnist",
                   help="the test set: fashion-mnist's test split (default), or a folder of images of the "
                        "checkpoint's shape (reconstruction and KL only: the FID classifier knows Fashion-MNIST only)")
    e.add_argument("--samples", type=positive_int, default=10000,
                   help="generated images compared with the test split (at least 4)")
    e.add_argument("--seed", type=nonnegative_int, default=0)
    e.add_argument("--classifier", default=None, help="feature classifier weights (default: the shipped ones)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    c = sub.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier used by evaluate")
    c.add_argument("--out", required=True)
    c.add_argument("--epochs", type=positive_int, default=4)
    c.add_argument("--seed", type=nonnegative_int, default=0)
    return parser


# ------------------------------------------------------------------------------------------ commands
def _train(args) -> int:
    import torch

    from .distributed import shutdown
    from .train import TrainingInterrupted, train
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train(_model_options(args), data=args.data, steps=args.steps, batch_size=args.batch_size, out=args.out,
              preset=args.preset, resume=args.resume, device=device, seed=args.seed,
              checkpoint_every=args.checkpoint_every, grid_every=args.grid_every, log_every=args.log_every,
              progress=not args.no_progress, cuda_graph=args.cuda_graph, channels=args.channels,
              image_size=args.image_size)
    except TrainingInterrupted as stop:
        print(f"\n{stop}", flush=True)
        return stop.exit_code
    except KeyboardInterrupt:
        print(f"\nstopped at once by a second Ctrl-C; {args.out}/checkpoint.pt is the last checkpoint written "
              "(continue with --resume)", flush=True)
        return 130
    finally:
        shutdown()
    return 0


def _sample(args) -> int:
    import torch

    from .images import save_grid
    from .model import Model
    _check_output_file(args.out, ".png")
    model = Model.load(args.checkpoint, map_location="cpu")
    gen = torch.Generator().manual_seed(args.seed)
    path = save_grid(model.sample(args.n, generator=gen), model.config["image_shape"], args.out)
    print(f"wrote {path}")
    return 0


def _evaluate(args) -> int:
    import json

    from .evaluate import evaluate_checkpoint
    if args.samples < MIN_SAMPLES:
        raise ValueError(f"--samples must be at least {MIN_SAMPLES} (precision/recall compare each sample with "
                         f"its 3 nearest neighbours), got {args.samples}")
    if args.json:
        _check_output_file(args.json, ".json")
    result = evaluate_checkpoint(args.checkpoint, args.samples, args.seed, args.classifier, args.data)
    labels = {"reconstruction_mse": "reconstruction MSE (test, per pixel)", "kl": "mean KL (test)",
              "fid_classifier": "FID (Fashion-MNIST classifier features)", "precision": "precision (k=3)",
              "recall": "recall (k=3)", "classifier_test_accuracy": "feature classifier test accuracy"}
    for key, label in labels.items():
        value = result[key]
        missing = "n/a (no encoder)" if key in ("reconstruction_mse", "kl") else "n/a (see the note)"
        print(f"{label:42s} {missing if value is None else format(value, '.4f')}")
    if result.get("note"):
        print(f"note: {result['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _train_classifier(args) -> int:
    from .evaluate import train_classifier
    _check_output_file(args.out, None)
    train_classifier(args.out, epochs=args.epochs, seed=args.seed)
    return 0


def _check_output_file(path: str, suffix: str | None) -> None:
    """A file we can write: not a folder, in a folder that exists or can be made (checked before the work)."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder; give a file name{f' ending in {suffix}' if suffix else ''}")
    if suffix is not None and not path.lower().endswith(suffix):
        raise ValueError(f"{path}: the output file must end in {suffix}")
    parent = os.path.dirname(os.path.abspath(path))
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK):
        raise ValueError(f"{path}: cannot write into {existing}")


COMMANDS = {"train": _train, "sample": _sample, "evaluate": _evaluate, "train-classifier": _train_classifier}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .ops import BackendUnavailableError
    from .train import NonFiniteLossError
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError, BackendUnavailableError, NonFiniteLossError) as exc:
        if os.environ.get("VAEGAN_FAST_TRACEBACK", "") not in ("", "0"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the exception held
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
