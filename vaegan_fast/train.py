"""The training loop behind ``python -m vaegan_fast train``: checkpoints, metrics log, sample grids.

Stopping: SIGINT (Ctrl-C) and SIGTERM (what job schedulers send) only set a flag, which the loop reads
between steps; it then saves the checkpoint of the last whole step and raises ``TrainingInterrupted``. A
signal can arrive at any point of a step (inside the step's kernels, the optimizer, a checkpoint write) and
the checkpoint still holds a step boundary, so resuming continues exactly as training straight would have.
A second Ctrl-C stops at once, without saving: the checkpoint on disk is then the last one written.
Data-parallel, the ranks agree on the step to stop at (one all-reduce of the flag per step).
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from .data import BatchStream, load_dataset
from .distributed import init_from_environment
from .graphs import CudaGraphStep
from .images import save_grid
from .model import PRESETS, RECOMMENDED_BATCH, Model

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
GRID_SAMPLES, GRID_PAIRS = 64, 32

# Model options a resumed run can take from the command line, and what it does with them: "apply" (they can
# change mid-run: the optimizers' learning rate, the implementation that runs the step) or refuse.
RESUME_APPLIES = ("lr", "backend")
# The command-line flag of each model option, for messages.
FLAGS = {"gamma": "--gamma", "encoder_llike_weight": "--encoder-llike-weight", "pixel_weight": "--pixel-weight",
         "recon_as_fake": "--[no-]recon-as-fake", "saturating": "--[no-]saturating", "gating": "--[no-]gating",
         "feature_layer": "--feature-layer", "discriminator_norm": "--discriminator-norm", "lr": "--lr",
         "backend": "--backend", "mode": "--mode", "precision": "--precision"}


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf; the last checkpoint on disk is the last good state."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped between two steps on a signal, after saving the checkpoint of the last whole step."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint is not None else "no checkpoint written"
        super().__init__(f"{name}: stopped after step {step}; {where} (continue with --resume)")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """While active, SIGINT and SIGTERM only record that a stop was asked for (``requested``); a second SIGINT
    raises KeyboardInterrupt at once. Outside the main thread (where Python cannot install handlers) it does
    nothing, and signals behave as they would without it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, the last checkpoint written stands
        if self.received is None:
            self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def requested(self, dp=None) -> Optional[int]:
        """The signal that asked for a stop, agreed over all ranks when data-parallel (the largest number)."""
        if dp is None:
            return self.received
        agreed = dp.max_int(self.received or 0)
        return agreed or None


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no steps twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _all_finite(model: Model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def write_grids(model: Model, data, out: Path, tag: str) -> None:
    """A grid of prior samples and one of (training image, reconstruction) pairs, in the model's image shape."""
    shape = model.config["image_shape"]
    gen = torch.Generator(model.device).manual_seed(1234)  # the same z each time: grids show progress
    save_grid(model.sample(GRID_SAMPLES, generator=gen), shape, out / f"samples_{tag}.png", columns=8)
    if model.config["mode"] == "gan":
        return  # a GAN has no trained encoder: nothing to reconstruct with
    real = data.images[:GRID_PAIRS].to(model.device)  # fewer when the dataset is smaller
    rec = model.reconstruct(real.view(real.shape[0], *model.input_shape))
    pairs = torch.stack([real, rec.reshape(real.shape)], dim=1).reshape(2 * real.shape[0], -1)
    save_grid(pairs, shape, out / f"reconstructions_{tag}.png", columns=8)


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device this machine has, or a ValueError that says what it has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N): {exc}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available here (torch.cuda.is_available() "
                             "is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r}: training runs on cpu or cuda")
    return dev


def _resume_options(model: Model, options: dict, path: Path) -> list[str]:
    """Check the model options given for a resumed run against the checkpoint's: apply those that can change
    mid-run (returning a note for each), refuse the rest when they differ."""
    notes = []
    for key, value in options.items():
        saved = model.config[key]
        if key == "lr":
            if any(v != float(value) for v in saved.values()):
                for opt in model.optimizers.values():
                    for group in opt.param_groups:
                        group["lr"] = float(value)
                model.config["lr"] = {n: float(value) for n in saved}
                notes.append(f"--lr {value} applies from step {model.step} on (the checkpoint had "
                             f"{', '.join(f'{n} {v:g}' for n, v in saved.items())})")
        elif key == "backend":
            if value != saved:
                model.backend = value
                notes.append(f"--backend {value} runs the step from now on (the checkpoint ran {saved!r})")
        elif saved != value:
            raise ValueError(f"{FLAGS.get(key, key)} {value!r} differs from the checkpoint's {saved!r} ({path}): a "
                             f"resumed run keeps its model options; only {', '.join(FLAGS[k] for k in RESUME_APPLIES)} "
                             "can change on --resume (train into another --out to change the rest)")
    return notes


def train(model_kwargs: dict, *, steps: int, out: str, data: Optional[str] = None,
          batch_size: Optional[int] = None, preset: Optional[str] = None, resume: bool = False,
          device: str = "cpu", seed: Optional[int] = None, checkpoint_every: int = 500, grid_every: int = 500,
          log_every: int = 10, progress: bool = True, cuda_graph: bool = False, channels: Optional[int] = None,
          image_size: Optional[tuple] = None, log=print) -> Model:
    """Train to ``steps`` total steps, resuming from ``out/checkpoint.pt`` when ``resume`` is set.

    ``data`` (default fashion-mnist), ``batch_size`` (default: the preset's), ``preset`` (default seed),
    ``seed`` (default 0) and ``channels``/``image_size`` (image-folder conversion) default to the checkpoint's
    on a resumed run and must match it when given. ``model_kwargs`` are Model options: on a resumed run the
    learning rate and backend are applied and any other that differs from the checkpoint is refused.
    Everything is checked before training starts; mistakes raise ValueError (or FileNotFoundError,
    FileExistsError) with a message that names the option.

    Under torchrun (WORLD_SIZE > 1) every process trains data-parallel on its slice of each global batch of
    ``batch_size`` rows (vaegan_fast.distributed); rank 0 alone logs, draws grids and writes checkpoints.
    ``cuda_graph`` replays each step from one CUDA graph (vaegan_fast.CudaGraphStep; GPU, one process, the
    input value check off). SIGINT/SIGTERM stop it between two steps (see the module docstring).
    """
    steps = positive_int("steps", steps)
    for name, value in (("checkpoint_every", checkpoint_every), ("grid_every", grid_every),
                        ("log_every", log_every)):
        positive_int(name, value)
    if batch_size is not None:
        positive_int("batch_size", batch_size)
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    dev = resolve_device(device)
    if cuda_graph and (dev.type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ValueError("--cuda-graph needs --device cuda and a single process")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder")
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    requested = {"data": data, "batch_size": batch_size, "preset": preset, "seed": seed, "channels": channels,
                 "image_size": tuple(image_size) if image_size is not None else None}

    notes = []
    if resume and ckpt_path.exists():
        model = Model.load(ckpt_path, map_location=dev)
        run = dict(model.checkpoint_extra or {})
        run.setdefault("preset", None)  # not recorded by older checkpoints
        for key, value in requested.items():
            saved = run.get(key)
            if key == "image_size" and saved is not None:
                saved = tuple(saved)
            if value is not None and saved is not None and value != saved:
                raise ValueError(f"{ckpt_path} was trained with {key}={saved!r}; resume with the same "
                                 f"--{key.replace('_', '-')} (or leave it out), not {value!r}")
        run_info = {**{k: run.get(k) for k in requested}, "data": run["data"], "batch_size": run["batch_size"],
                    "seed": run["seed"]}
        notes = _resume_options(model, model_kwargs, ckpt_path)
        saved_step: Optional[int] = model.step
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
        if resume:
            notes.append(f"no checkpoint in {out_dir} yet: starting a new run")
        name = preset or "seed"
        run_info = {"data": data or "fashion-mnist", "batch_size": batch_size or RECOMMENDED_BATCH[name],
                    "seed": 0 if seed is None else seed, "preset": name, "channels": channels,
                    "image_size": requested["image_size"]}
        model = None
        saved_step = None
    dataset = load_dataset(run_info["data"], channels=run_info["channels"], image_size=run_info["image_size"])
    if model is None:
        try:
            model = Model.preset(run_info["preset"], seed=run_info["seed"], image_shape=dataset.image_shape,
                                 **model_kwargs).to(dev)
        except ValueError as exc:
            if "divisible" not in str(exc):
                raise
            raise ValueError(f"{exc}: the {run_info['preset']!r} preset cannot take the images of "
                             f"{run_info['data']!r}; resize them with --image-size") from None
    elif tuple(dataset.image_shape) != tuple(model.config["image_shape"]):
        raise ValueError(f"data {run_info['data']!r} holds images of {dataset.image_shape} (C, H, W) but "
                         f"{ckpt_path} was trained on {model.config['image_shape']}")
    model._check_backend(dev, model.dtype)  # an unavailable backend is refused before any work
    stream = BatchStream(dataset, run_info["batch_size"], seed=run_info["seed"], device=dev)

    dp = init_from_environment(dev)
    main_rank = dp is None or dp.rank == 0
    rows = slice(None)
    if dp is not None:
        model.enable_data_parallel()
        rows = dp.local_rows(run_info["batch_size"])
    if saved_step is not None:
        if main_rank:
            _trim_metrics(metrics_path, model.step)
        if model.step >= steps:
            notes.append(f"{ckpt_path} is at step {model.step}, which --steps {steps} does not exceed: "
                         "nothing to train")
    else:
        if dp is not None:
            torch.distributed.barrier()  # every rank has checked for an old checkpoint before rank 0 writes
        if metrics_path.exists() and main_rank:
            metrics_path.unlink()
    if main_rank:
        for note in notes:
            log(f"note: {note}")
    train_step = model.train_step
    if cuda_graph:
        model.config["check_inputs"] = False  # a graph cannot read values back; the data come from our loader
        train_step = CudaGraphStep(model)

    def save() -> None:
        nonlocal saved_step
        if main_rank and _all_finite(model):  # never replace a good checkpoint with poisoned weights
            model.save(ckpt_path, extra=run_info)
            saved_step = model.step

    def last_good() -> str:
        if saved_step is None:
            return f"no checkpoint was written yet (the first comes at step {checkpoint_every})"
        return f"the last good checkpoint is {ckpt_path} (step {saved_step})"

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress and main_rank:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=min(model.step, steps), unit="step", dynamic_ncols=True)
    start, start_step = time.perf_counter(), model.step
    stops = StopSignals()
    try:
        with stops, (open(metrics_path, "a") if main_rank else open(os.devnull, "w")) as metrics:
            while model.step < steps:
                signum = stops.requested(dp)
                if signum is not None:
                    save()
                    raise TrainingInterrupted(signum, model.step, ckpt_path if saved_step == model.step else None)
                batch = stream.batch(model.step)[rows]
                stats = train_step(batch.view(batch.shape[0], *model.input_shape))
                step = model.step
                if step % log_every == 0 or step == steps:
                    values = {k: float(v) for k, v in stats.items()}
                    if not all(math.isfinite(v) for v in values.values()):
                        bad = [k for k, v in values.items() if not math.isfinite(v)]
                        raise NonFiniteLossError(f"non-finite {', '.join(bad)} at step {step}; {last_good()}")
                    elapsed = time.perf_counter() - start
                    values.update(step=step, samples_per_s=(step - start_step) * run_info["batch_size"]
                                  / max(elapsed, 1e-9))
                    metrics.write(json.dumps(values) + "\n")
                    metrics.flush()
                    if bar is not None:
                        bar.set_postfix({k.split("_")[0][:3]: f"{v:.3g}" for k, v in values.items()
                                         if k.endswith("_loss")})
                if bar is not None:
                    bar.update(1)
                if step % checkpoint_every == 0:
                    save()
                if step % grid_every == 0 and main_rank:
                    write_grids(model, dataset, out_dir, f"{step:07d}")
            save()
            if main_rank:
                write_grids(model, dataset, out_dir, "final")
    finally:
        if bar is not None:
            bar.close()
    return model
