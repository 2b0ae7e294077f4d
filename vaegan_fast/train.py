"""The training loop behind ``python -m vaegan_fast train``: checkpoints, metrics log, sample grids."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from .data import BatchStream, load_dataset
from .distributed import init_from_environment
from .graphs import CudaGraphStep
from .images import save_grid
from .model import Model

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf; the last checkpoint on disk is the last good state."""


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no steps twice."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _all_finite(model: Model) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def write_grids(model: Model, data, out: Path, tag: str, n: int = 64) -> None:
    gen = torch.Generator(model.device).manual_seed(1234)  # the same z each time: grids show progress
    save_grid(model.sample(n, generator=gen), data.image_shape, out / f"samples_{tag}.png", columns=8)
    if model.config["mode"] == "gan":
        return  # a GAN has no trained encoder: nothing to reconstruct with
    real = data.images[:32].to(model.device)
    rec = model.reconstruct(real)
    pairs = torch.stack([real, rec], dim=1).reshape(64, -1)  # real, reconstruction, real, ...
    save_grid(pairs, data.image_shape, out / f"reconstructions_{tag}.png", columns=8)


def train(model_kwargs: dict, *, data: str, steps: int, batch_size: int, out: str, preset: str = "seed",
          resume: bool = False, device: str = "cpu", seed: int = 0, checkpoint_every: int = 500,
          grid_every: int = 500, log_every: int = 10, progress: bool = True, cuda_graph: bool = False) -> Model:
    """Train to ``steps`` total steps, resuming from ``out/checkpoint.pt`` when ``resume`` is set.

    Under torchrun (WORLD_SIZE > 1) every process trains data-parallel on its slice of each global batch of
    ``batch_size`` rows (vaegan_fast.distributed); rank 0 alone logs, draws grids and writes checkpoints.
    ``cuda_graph`` replays each step from one CUDA graph (vaegan_fast.CudaGraphStep; GPU, one process, the
    input value check off).
    """
    if cuda_graph and (torch.device(device).type != "cuda" or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise ValueError("--cuda-graph needs --device cuda and a single process")
    dp = init_from_environment(device)
    main_rank = dp is None or dp.rank == 0
    out_dir = Path(out)
    ckpt_path, metrics_path = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
    if resume and ckpt_path.exists():
        model = Model.load(ckpt_path, map_location=device)
        run = model.checkpoint_extra or {}
        if run.get("data") != data or run.get("batch_size") != batch_size:
            raise ValueError(f"{ckpt_path} was trained on data={run.get('data')!r} with batch size "
                             f"{run.get('batch_size')}; resume with the same --data and --batch-size")
        seed = run["seed"]
        _trim_metrics(metrics_path, model.step)
    else:
        if ckpt_path.exists():
            raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
        model = Model.preset(preset, seed=seed, **model_kwargs).to(device)
        if dp is not None:
            torch.distributed.barrier()  # every rank has checked for an old checkpoint before rank 0 writes
        if metrics_path.exists() and main_rank:
            metrics_path.unlink()
    dataset = load_dataset(data)
    if dataset.dim != model.config["input_dim"]:
        raise ValueError(f"data {data!r} has {dataset.dim} values per image but the model expects "
                         f"{model.config['input_dim']}: set input_dim to match")
    stream = BatchStream(dataset, batch_size, seed=seed, device=device)
    rows = slice(None)
    if dp is not None:
        model.enable_data_parallel()
        rows = dp.local_rows(batch_size)
    run_info = {"data": data, "batch_size": batch_size, "seed": seed}
    train_step = model.train_step
    if cuda_graph:
        model.config["check_inputs"] = False  # a graph cannot read values back; the data come from our loader
        train_step = CudaGraphStep(model)

    def save() -> None:
        if main_rank and _all_finite(model):  # never replace a good checkpoint with poisoned weights
            model.save(ckpt_path, extra=run_info)

    out_dir.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress and main_rank:
        from tqdm import tqdm
        bar = tqdm(total=steps, initial=model.step, unit="step", dynamic_ncols=True)
    start, start_step = time.perf_counter(), model.step
    try:
        with open(metrics_path, "a") if main_rank else open(os.devnull, "w") as log:
            while model.step < steps:
                stats = train_step(stream.batch(model.step)[rows])
                step = model.step
                if step % log_every == 0 or step == steps:
                    values = {k: float(v) for k, v in stats.items()}
                    if not all(math.isfinite(v) for v in values.values()):
                        bad = [k for k, v in values.items() if not math.isfinite(v)]
                        raise NonFiniteLossError(f"non-finite {', '.join(bad)} at step {step}; the last good "
                                                 f"checkpoint is {ckpt_path}")
                    elapsed = time.perf_counter() - start
                    values.update(step=step, samples_per_s=(step - start_step) * batch_size / max(elapsed, 1e-9))
                    log.write(json.dumps(values) + "\n")
                    log.flush()
                    if bar is not None:
                        bar.set_postfix({k.split("_")[0][:3]: f"{v:.3g}" for k, v in values.items()
                                         if k.endswith("_loss")})
                if bar is not None:
                    bar.update(1)
                if step % checkpoint_every == 0:
                    save()
                if step % grid_every == 0 and main_rank:
                    write_grids(model, dataset, out_dir, f"{step:07d}")
    except KeyboardInterrupt:
        save()
        if bar is not None:
            bar.close()
        if main_rank:
            print(f"\ninterrupted at step {model.step}; checkpoint saved to {ckpt_path} (continue with --resume)")
        raise
    if bar is not None:
        bar.close()
    save()
    if main_rank:
        write_grids(model, dataset, out_dir, "final")
    return model
