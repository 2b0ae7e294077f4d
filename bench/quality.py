"""Does the fusion pay off? Train a VAE, a GAN and a VAE-GAN the same way and compare them.

    python bench/quality.py --steps 3000 --seeds 0,1,2
    python bench/quality.py --preset conv --steps 1500,3000      # the conv networks, evaluated at both budgets
    python bench/quality.py --modes vaegan --precisions fp32,bf16   # is low-precision training as good?
    python bench/quality.py --preset conv --seeds 1 --modes vaegan --vaegan-option encoder_llike_weight=0.25  # a trial

All three are vaegan_fast.Model with one preset's networks (default "seed"), trained on the Fashion-MNIST
train split with the same batch size (the preset's), step budget, optimizer (Adam, lr 2e-4, betas
(0.5, 0.999)), the preset's default options and seeds; only `mode` differs:
- vae:    mode="vae": KL + pixel-wise BCE likelihood (pixel_weight 1); no discriminator;
- gan:    mode="gan": non-saturating GAN on prior samples; no encoder;
- vaegan: feature-space reconstruction (the preset's gamma) + pixel term (pixel_weight 1), reconstructions
          count as fakes, the preset's gating (seed: gamma 1, no gating; conv: see vaegan_fast.PRESETS).
Each model is evaluated on the test split (vaegan_fast.evaluate): reconstruction MSE, mean KL, FID in the
features of the project's Fashion-MNIST classifier, precision and recall. Writes a markdown table, JSON and
one PNG with the three models' samples side by side under bench/results/ (or --results).

``--vaegan-option KEY=VALUE`` (repeatable) overrides one of the VAE-GAN's options for the vaegan rows alone: the
VAE and the GAN keep the preset's defaults, so a tuning trial never tunes the baselines.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import telemetry  # noqa: E402
from vaegan_fast import PRESETS, RECOMMENDED_BATCH, Model  # noqa: E402
from vaegan_fast.data import load_fashion_mnist  # noqa: E402
from vaegan_fast.evaluate import features, frechet_distance, load_classifier  # noqa: E402
from vaegan_fast.evaluate import evaluate_model  # noqa: E402
from vaegan_fast.train import train  # noqa: E402

MODES = {"vae": {"mode": "vae"}, "gan": {"mode": "gan"}, "vaegan": {}}
METRICS = [("reconstruction_mse", "recon MSE", ".4f"), ("kl", "KL", ".1f"),
           ("fid_classifier", "FID (F-MNIST clf)", ".2f"), ("precision", "precision", ".3f"),
           ("recall", "recall", ".3f"), ("train_seconds", "train s", ".0f")]
RESULTS = Path(__file__).resolve().parent / "results"


def _cell(values, spec):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def side_by_side(grids: dict, path: Path) -> None:
    """One PNG: a labelled 8x8 grid of samples per model, left to right."""
    from PIL import Image, ImageDraw
    images = {name: Image.open(p) for name, p in grids.items()}
    width = sum(im.width for im in images.values()) + 20 * (len(images) - 1)
    height = max(im.height for im in images.values()) + 24
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for name, im in images.items():
        draw.text((x + im.width // 2 - 4 * len(name), 5), name, fill=0)
        canvas.paste(im, (x, 24))
        x += im.width + 20
    canvas.save(path)


def vaegan_option(text: str) -> tuple:
    """KEY=VALUE with VALUE a Python literal (0.25, True, 1e-4, (0.5, 0.9)); a bare word stays a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. encoder_llike_weight=0.25), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="3000", help="comma list of step budgets: each run is evaluated at each")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--preset", default="seed", choices=tuple(PRESETS))
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--out", default=None, help="folder for the runs (default bench/results/quality-runs)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {tuple(MODES)}")
    p.add_argument("--precisions", default="fp32", help="comma list of Model precisions, e.g. fp32,bf16")
    p.add_argument("--vaegan-option", type=vaegan_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a Model option for the vaegan rows alone (repeatable), e.g. encoder_llike_weight=0.25")
    p.add_argument("--results", default=None, help="folder for the table, JSON and PNG (default bench/results)")
    args = p.parse_args(argv)
    overrides = dict(args.vaegan_option)
    for key in ("mode", "precision", "seed"):
        if key in overrides:
            raise SystemExit(f"--vaegan-option {key}: set by the benchmark itself (--modes, --precisions, --seeds)")
    if overrides:
        try:  # a misspelt or out-of-range option is refused before any training
            Model.preset(args.preset, **overrides)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"--vaegan-option: {exc}") from None
    budgets = sorted(int(s) for s in args.steps.split(","))
    batch = args.batch_size or RECOMMENDED_BATCH[args.preset]
    seeds = [int(s) for s in args.seeds.split(",")]
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        raise SystemExit(f"--modes: choose from {tuple(MODES)}, got {args.modes!r}")
    precisions = args.precisions.split(",")
    # One row per (mode, precision); precision is named in the row only when more than fp32 is compared.
    variants = {(f"{m} ({p})" if precisions != ["fp32"] else m):
                {**MODES[m], **(overrides if m == "vaegan" else {}), "precision": p}
                for m in modes for p in precisions}
    runs = Path(args.out) if args.out else RESULTS / "quality-runs"
    test = load_fashion_mnist("test")

    results = []
    for mode, options in variants.items():
        for seed in seeds:
            out = runs / f"{args.preset}-{mode.replace(' (', '-').rstrip(')')}-seed{seed}"
            if (out / "checkpoint.pt").exists():
                (out / "checkpoint.pt").unlink()
            seconds = 0.0
            for steps in budgets:  # one run, evaluated at each budget on the way
                start = time.perf_counter()
                model = train(options, data="fashion-mnist", steps=steps, batch_size=batch, out=str(out),
                              preset=args.preset, seed=seed, checkpoint_every=steps, grid_every=steps,
                              progress=False, resume=steps != budgets[0], log=lambda *a: None)
                seconds += time.perf_counter() - start
                result = evaluate_model(model, samples=args.samples, seed=seed, test=test)
                result.update(seed=seed, train_seconds=seconds, steps=steps, options=options, variant=mode,
                              preset=args.preset)
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "options"}), flush=True)

    # The floor: real training images against the test split, in the same features.
    classifier, accuracy = load_classifier()
    train_images = load_fashion_mnist("train").images[:args.samples]
    floor = frechet_distance(features(classifier, test.images), features(classifier, train_images))

    lines = []
    for steps in budgets:
        lines += [f"{steps} steps:", "", f"| model | {' | '.join(label for _, label, _ in METRICS)} |",
                  "|---" * (len(METRICS) + 1) + "|"]
        for mode in variants:
            rows = [r for r in results if r["variant"] == mode and r["steps"] == steps]
            lines.append(f"| {mode} | " + " | ".join(_cell([r[k] for r in rows], spec) for k, _, spec in METRICS)
                         + " |")
        lines += [f"| real train images | - | - | {floor:.2f} | - | - | - |", ""]
    table = "\n".join(lines)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results_dir = Path(args.results) if args.results else RESULTS
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"quality-{stamp}"
    side_by_side({mode: runs / f"{args.preset}-{mode.replace(' (', '-').rstrip(')')}-seed{seeds[0]}" /
                  "samples_final.png" for mode in variants}, stem.with_suffix(".png"))
    cpu = telemetry.cpu_features()
    machine = ", ".join(s for s in (telemetry.device_name(torch.device("cpu")), telemetry.cpu_generation(cpu)) if s)
    header = (f"preset {args.preset}, {', '.join(map(str, budgets))} steps, batch {batch}, seeds {seeds} "
              f"(mean ± std), {args.samples} samples; "
              + (f"vaegan options beyond the preset: {overrides}; " if overrides else "") +
              f"feature classifier test accuracy {accuracy:.4f}; torch {torch.__version__}; {machine}; "
              f"{telemetry.settings_summary({'settings': telemetry.settings_in_environment()})}; "
              f"command: `{' '.join([sys.executable.split('/')[-1], *sys.argv])}`")
    stem.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"results": results, "real_floor_fid": floor,
                                                     "header": header}, indent=1))
    print(header)
    print(table)
    print(f"wrote {stem}.md, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
