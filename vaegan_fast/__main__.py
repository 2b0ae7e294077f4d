"""Command line: ``python -m vaegan_fast train|sample``."""
from __future__ import annotations

import argparse
import sys

import torch

from .model import PRESETS, RECOMMENDED_BATCH


def _model_options(args) -> dict:
    options = {"gamma": args.gamma, "pixel_weight": args.pixel_weight, "recon_as_fake": args.recon_as_fake,
               "saturating": args.saturating, "gating": args.gating, "feature_layer": args.feature_layer,
               "lr": args.lr, "backend": args.backend}
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
    t.add_argument("--backend", default=None, help="auto (default), reference, triton or native")
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

    s = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--out", required=True, help="PNG file to write")
    s.add_argument("-n", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-shape", default="28x28", help="HxW of one image (default 28x28)")

    args = parser.parse_args(argv)
    if args.command == "train":
        from .train import NonFiniteLossError, train
        batch = args.batch_size or RECOMMENDED_BATCH[args.preset]
        try:
            train(_model_options(args), data=args.data, steps=args.steps, batch_size=batch, out=args.out,
                  preset=args.preset, resume=args.resume, device=args.device, seed=args.seed,
                  checkpoint_every=args.checkpoint_every, grid_every=args.grid_every, log_every=args.log_every,
                  progress=not args.no_progress)
        except KeyboardInterrupt:
            return 130
        except (NonFiniteLossError, FileExistsError, FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
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
