"""torchrun / DistributedDataParallel plumbing for the trainers (the losses' side is `macl_kernels.distributed`).

Under ``torchrun --nproc_per_node K ...`` every process has RANK, LOCAL_RANK and WORLD_SIZE in its
environment. :func:`init_from_env` turns them into an initialised default process group (NCCL for CUDA,
gloo for CPU) and returns a :class:`World`; without torchrun (or with WORLD_SIZE=1) it returns the
single-process world and initialises nothing, so a one-process run is exactly the plain run.

The conventions every trainer follows (see docs/distributed.md, "Training under torchrun"):

- ``data.batch_size`` is the **global** batch. Every step, all ranks walk the same seeded sample order and rank
  r takes the contiguous rows [r·B/W, (r+1)·B/W) of the global batch (the partition DistributedSampler
  makes), so the sample order, the epochs and the step count do not depend on W and a run resumes on any
  world size. B must be divisible by W.
- Contrastive losses take their keys from every rank (``process_group="world"``), so the loss is that of the
  global batch; DDP averages the parameter gradients.
- Only rank 0 writes: logs, checkpoints, configs, exported weights, progress bars. Checkpoints hold the
  unwrapped model, so they load at any world size, and every rank reads the same file on resume (a file
  system shared by the nodes, as usual for multi-node runs).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process stands: rank r of `size` processes, `local_rank` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs, checkpoints and progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, global_batch: int) -> Tuple[int, int]:
        """[start, stop) of this rank's rows of a global batch of `global_batch` rows.

        Raises ValueError when the batch does not split evenly (the per-rank losses and DDP's gradient
        average assume equal shards)."""
        if global_batch % self.size:
            raise ValueError(f"data.batch_size {global_batch} is not divisible by the world size {self.size}: "
                             f"the global batch is split evenly over the ranks")
        n = global_batch // self.size
        return self.rank * n, (self.rank + 1) * n

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The average of `values` over the ranks (the tensor itself in a single process)."""
        if not self.distributed:
            return values
        out = values.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.size


SINGLE = World()


def env_world() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK), without initialising.

    Raises ValueError for malformed values."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"cannot read the torchrun environment (RANK={os.environ.get('RANK')!r}, "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}): {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={size}")
    return World(rank, size, local)


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> World:
    """Initialise the default process group when launched by torchrun with WORLD_SIZE > 1.

    device: the trainer's device setting ("auto", "cpu", "cuda", "cuda:N"). CUDA runs use NCCL and bind this
    process to GPU LOCAL_RANK; CPU runs use gloo. An already initialised group is reused.
    Returns the `World`; `SINGLE` when there is nothing to distribute.
    """
    world = env_world()
    if world.size == 1:
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), world.local_rank)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), world.local_rank)


def shutdown(world: World) -> None:
    """Destroy the process group `init_from_env` made (no-op in a single process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_device(world: World, device: torch.device) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for a CUDA run under torchrun, `device` otherwise."""
    if world.distributed and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


def wrap_ddp(module: torch.nn.Module, world: World, device: torch.device, sync_batchnorm: bool = False):
    """`module` wrapped in DistributedDataParallel (returned unchanged in a single process).

    sync_batchnorm converts BatchNorm layers to SyncBatchNorm first (CUDA only: torch's SyncBatchNorm has no
    CPU kernel). Parameters the method does not use (e.g. a head whose λ is 0) are allowed: the graph is
    static (the same parameters take part in every step of a run), so DDP records the unused ones once
    (`static_graph=True`) instead of searching the graph every step (`find_unused_parameters=True`, which
    also warned on every rank of every run when nothing was unused).
    """
    if not world.distributed:
        return module
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError("train.sync_batchnorm needs CUDA (torch's SyncBatchNorm has no CPU kernel); on CPU "
                             "set train.sync_batchnorm=false, or net.norm='instance' for norms independent of "
                             "the batch split")
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, static_graph=True)


def loss_group(world: World) -> Optional[str]:
    """What the methods pass to the losses as `process_group`: "world" under torchrun, else None."""
    return "world" if world.distributed else None
