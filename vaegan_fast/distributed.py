"""Data-parallel training on torch.distributed (launched by torchrun), without DistributedDataParallel.

DDP's wrapper hooks ``loss.backward()`` and does not support ``torch.autograd.grad``, which the routed step
relies on, so the model averages its routed gradients itself with torch.distributed's collectives:

- every rank gets its slice of the global batch (``--batch-size`` is global) and its slice of one global draw
  of eps and z_p from the shared, identically seeded generator, so N processes compute exactly what one
  process computes on the concatenated batch;
- each network's gradients are flattened into one bucket and all-reduced asynchronously as soon as that
  network's backward is done (the discriminator's first, while the decoder's and encoder's are still
  running), then averaged;
- the losses, including the statistics the equilibrium gate reads, are averaged in one all-reduce before
  the gate decides, so every rank takes the same decision;
- rank 0 alone writes checkpoints; a checkpoint holds no per-rank state, so it resumes on any number of
  processes.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class DataParallel:
    rank: int
    world_size: int
    group: Optional[object] = None  # a torch.distributed ProcessGroup; None = the default group

    @classmethod
    def current(cls, group=None) -> "DataParallel":
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                               "vaegan_fast.distributed.init_from_environment() (the CLI does)")
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def local_rows(self, global_rows: int) -> slice:
        if global_rows % self.world_size:
            raise ValueError(f"the global batch ({global_rows} rows) must divide evenly among "
                             f"{self.world_size} processes")
        per_rank = global_rows // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def max_int(self, value: int) -> int:
        """The largest of every rank's ``value`` (what the ranks agree on, e.g. a stop request)."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        flag = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def average_(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor.div_(self.world_size)

    def start_average(self, grads: list) -> tuple:
        """Launch the all-reduce of one network's gradients (one flattened bucket) without waiting."""
        present = [g for g in grads if g is not None]
        bucket = _flatten_dense_tensors(present)
        return grads, bucket, dist.all_reduce(bucket, group=self.group, async_op=True)

    def finish_average(self, pending: tuple) -> list:
        grads, bucket, work = pending
        work.wait()
        bucket.div_(self.world_size)
        averaged = iter(_unflatten_dense_tensors(bucket, [g for g in grads if g is not None]))
        return [next(averaged) if g is not None else None for g in grads]


def shutdown() -> None:
    """Leave the process group at the end of a run (after every rank's last collective).

    ``torch.distributed.destroy_process_group`` alone can leave the group's gloo threads alive until the
    interpreter's own shutdown (the group sits in a reference cycle), and a thread that then frees the tensors
    of its last collective aborts the process ("terminate called without an active exception"; seen on
    torch 2.13 in about one two-process run in ten). Collecting the cycle while the interpreter is still whole
    joins those threads in time.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def init_from_environment(device: str | torch.device) -> Optional[DataParallel]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL for CUDA, gloo for the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    device = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DataParallel.current()
