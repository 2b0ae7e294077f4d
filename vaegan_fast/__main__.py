"""Command line: ``python -m vaegan_fast train|sample|evaluate|train-classifier``."""
from __future__ import annotations

import argparse
import sys

import torch

from .model import PRESETS, RECOMMENDED_BATCH


def _model_options(args) -> dict:
    options = {"gamma": args.gamma, "pixel_weight": args.pixel_weight, "recon_as_fake": args.recon_as_fake,
               "saturating": args.saturating, "gating": args.gating, "feature_layer": args.feature_layer,
               "lr": args.lr, "backend": args.backend, "mode": args.mode, "precision": args.precision}
    return {k: v for k, v in options.items() if v is not None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vaegan_fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a VAE-GAN, writing checkpoints, a metrics log and sample grids")
    t.add_argument("--data", default="fashion-mnist", help="fashion-mnist, synthetic, or a folder of PNGs")
    t.add_argument("--steps", type=int, required=True, help="total training steps (a resumed run continues to it)")
    t.add_argument("--batch-size", type=int, default=None, help="default: the preset's recommended batch")
    t.add_argument("--out", required=True, help="folder for checkpoint.pt, metrics.jsonl and PNG grids")
    t.add_argument("--preset", choices=sorted(PRESETS), default="seed")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--mode", choices=("vaegan", "vae", "gan"), default=None,
                   help="vaegan (default), or one of the ablations: vae (no discriminator), gan (no encoder)")
    t.add_argument("--backend", default=None, help="auto (default), reference, triton or native")
    t.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help="compute precision with fp32 master weights (default fp32; fp16 adds loss scaling)")
    t.add_argument("--gamma", type=float, default=None)
    t.add_argument("--pixel-weight", type=float, default=None)
    t.add_argument("--recon-as-fake", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--saturating", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--gating", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--feature-layer", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--grid-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--cuda-graph", action="store_true",
                   help="replay each step from one captured CUDA graph (GPU, single process)")

    s = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-shape", default="28x28", help="HxW of one image (default 28x28)")

    e = sub.add_parser("evaluate", help="reconstruction MSE, KL, FID (classifier features), precision/recall")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default="fashion-mnist", choices=("fashion-mnist",),
                   help="the test split evaluated against (the feature classifier knows Fashion-MNIST only)")
    e.add_argument("--samples", type=int, default=10000, help="generated images compared with the test split")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--classifier", default=None, help="feature classifier weights (default: the shipped ones)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    c = sub.add_parser("train-classifier", help="train the Fashion-MNIST feature classifier used by evaluate")
    c.add_argument("--out", required=True)
    c.add_argument("--epochs", type=int, default=4)
    c.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import NonFiniteLossError, train
        batch = args.batch_size or RECOMMENDED_BATCH[args.preset]
        try:
            train(_model_options(args), data=args.data, steps=args.steps, batch_size=batch, out=args.out,
                  preset=args.preset, resume=args.resume, device=args.device, seed=args.seed,
                  checkpoint_every=args.checkpoint_every, grid_every=args.grid_every, log_every=args.log_every,
                  progress=not args.no_progress, cuda_graph=args.cuda_graph)
        except KeyboardInterrupt:
            return 130
        except (NonFiniteLossError, FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        return 0
    if args.command == "evaluate":
        import json
        from .evaluate import evaluate_checkpoint
        result = evaluate_checkpoint(args.checkpoint, args.samples, args.seed, args.classifier)
        labels = {"reconstruction_mse": "reconstruction MSE (test, per pixel)", "kl": "mean KL (test)",
                  "fid_classifier": "FID (Fashion-MNIST classifier features)", "precision": "precision (k=3)",
                  "recall": "recall (k=3)", "classifier_test_accuracy": "feature classifier test accuracy"}
        for key, label in labels.items():
            value = result[key]
            print(f"{label:42s} {'n/a (no encoder)' if value is None else format(value, '.4f')}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    if args.command == "train-classifier":
        from .evaluate import train_classifier
        train_classifier(args.out, epochs=args.epochs, seed=args.seed)
        return 0
    if args.command == "sample":
        from .images import save_grid
        from .model import Model
        model = Model.load(args.checkpoint, map_location="cpu")
        shape = tuple(int(v) for v in args.image_shape.split("x"))
        gen = torch.Generator().manual_seed(args.seed)
        path = save_grid(model.sample(args.n, generator=gen), shape, args.out)
        print(f"wrote {path}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
