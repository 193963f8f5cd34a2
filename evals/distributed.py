"""Multi-process evaluation under ``torchrun``, shared by ``evals.imagenet`` and ``evals.kinetics``.

Every rank evaluates its own shard (:class:`ShardSampler`: each sample on exactly one rank, no
padding), counts are summed and lists gathered over ranks (:class:`Dist`), and only rank 0
writes. One process (no ``WORLD_SIZE``) is the same code with a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["Dist", "ShardSampler", "setup"]


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, rank + 2·world, ...`` of ``range(size)``: every index on
    exactly one rank, no padding or dropping (unlike ``DistributedSampler``), so the last
    ranks may get one sample fewer and counts summed over ranks are exact."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


@dataclass
class Dist:
    """This process's place in the run; collectives are no-ops in a world of one."""

    rank: int = 0
    world_size: int = 1
    owned: bool = False  # whether this run initialised (and must destroy) the process group

    @property
    def lead(self) -> bool:
        """Rank 0: the one that prints and writes."""
        return self.rank == 0

    def all_sum(self, values: list[int | float], device: torch.device) -> list[int | float]:
        """Sums over ranks, kept int where the value is an int (float64: exact to 2^53)."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return [int(v) if isinstance(x, int) else v for x, v in zip(values, tensor.tolist(), strict=True)]

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        """Destroy the process group if this run created it."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str | None) -> tuple[torch.device, Dist]:
    """The device and process group of this rank. Under ``torchrun`` (``WORLD_SIZE`` > 1):
    NCCL on CUDA with one GPU per local rank (``cuda`` without an index means
    ``cuda:LOCAL_RANK``), gloo on CPU. ``device`` None: CUDA if available, else CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
        elif chosen.type == "cuda" and chosen.index != local_rank:
            # NCCL refuses two ranks on one GPU; every rank reads the same --device.
            raise SystemExit(f"--device {device} under torchrun puts every rank on one GPU: give --device cuda "
                             f"(rank {local_rank} then uses cuda:{local_rank})")
    else:
        chosen = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if chosen.type == "cuda":
        visible = torch.cuda.device_count()
        if chosen.index is not None and chosen.index >= visible:
            # torch's own words ("invalid device ordinal") name neither the rank nor the fix.
            fix = f"start at most {visible} processes per node (torchrun --nproc_per_node {visible}), or " if visible else ""
            raise SystemExit(f"rank {local_rank} on this node needs cuda:{chosen.index}, but {visible} GPU(s) are "
                             f"visible: {fix}give --device cpu")
        torch.cuda.set_device(chosen)
    owned = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
        owned = True
    if dist.get_world_size() != world_size:
        raise SystemExit(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks")
    return chosen, Dist(dist.get_rank(), world_size, owned)
