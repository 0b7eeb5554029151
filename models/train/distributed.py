"""torchrun support: process group, device choice, batch sharding, DDP wrapping.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) is the ordinary case and
touches nothing distributed. Under torchrun every rank trains on its shard of
each epoch (``DistributedSampler``), gradients of the trainable modules are
averaged by ``DistributedDataParallel``, and only rank 0 writes files or shows
progress bars. The environment is passed in, never read at import.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from polymorphd.models.core.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"environment variable {key}={raw!r} must be an integer (set by torchrun)"
        ) from None


def setup(environ: Mapping[str, str]) -> DistEnv:
    """Read torchrun's variables from ``environ``; init the process group when WORLD_SIZE > 1.

    The device is chosen automatically: this rank's GPU when CUDA is available, else the CPU.
    """
    world = _int(environ, "WORLD_SIZE", 1)
    rank = _int(environ, "RANK", 0)
    local = _int(environ, "LOCAL_RANK", 0)
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        log.info("process group up: rank %d of %d, backend %s, device %s", rank, world, backend, device)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def wrap(module: nn.Module, env: DistEnv) -> nn.Module:
    """DistributedDataParallel around the trainable ``module`` when distributed, else the module itself."""
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def epoch_order(n: int, env: DistEnv, epoch: int, seed: int) -> torch.Tensor:
    """This rank's shuffled sample indices for ``epoch`` (every rank gets the same count)."""
    if env.distributed:
        sampler = DistributedSampler(
            range(n), num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=gen)


def mean_across(value: float, env: DistEnv) -> float:
    """Average a scalar (e.g. an epoch loss) over ranks, for logging."""
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size
