"""Data-parallel runs under ``torchrun`` or ``accelerate launch``: which process this is, and the few collectives
the commands need (broadcast and gather of small Python objects, a barrier).

A launcher starts N copies of the same command and tells each its place through the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`data_parallel` reads it and joins the
process group: through accelerate's ``PartialState`` when accelerate is installed (it picks NCCL on GPUs, gloo on
CPUs and sets each process's GPU), else ``torch.distributed.init_process_group`` itself. Without a launcher (or with
one process) it returns a context of one process whose collectives do nothing, so a command has one code path.

Commands shard their items by batches (:func:`shard_batches`: batch ``b`` of the pending items goes to rank
``b % world_size``), so every batch a rank runs is a batch a one-process run would run too: greedy answers do not
depend on how many processes ran them.

Objects are exchanged over a gloo group of their own (CPU tensors, whatever the model's backend), with a long
timeout: the final gather waits for the slowest rank to finish its share.

Example::

    torchrun --nproc_per_node 2 -m vlm_guard.cli eval synthetic --out runs/syn.jsonl
    accelerate launch --num_processes 2 -m vlm_guard.cli calibrate --images scenes/ --out maps/toy
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

COLLECTIVE_TIMEOUT = datetime.timedelta(hours=12)
"""How long a rank waits in a collective for the others (a rank that finishes early waits for the slowest)."""


@dataclass
class DataParallel:
    """This process's place in a data-parallel run (one process: ``rank 0 of 1``, collectives are no-ops).

    Attributes:
        rank: This process's index, 0 .. world_size - 1 (``RANK``).
        world_size: Number of processes (``WORLD_SIZE``).
        local_rank: Index on this machine (``LOCAL_RANK``): the GPU this process uses.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    _group: Any = field(default=None, repr=False)
    _owns_process_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that merges, writes summaries and head maps, and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    def device(self, requested: str) -> str:
        """The device this rank uses: ``"cuda"`` becomes ``"cuda:<local_rank>"`` when several processes run (one GPU
        each); anything else is kept (``"cpu"``, or an explicit ``"cuda:1"``, shared by every rank)."""
        text = str(requested)
        if self.distributed and text == "cuda":
            return f"cuda:{self.local_rank}"
        if self.distributed and text.startswith("cuda:"):
            logger.warning(
                "--device %s: every one of the %d processes uses that one GPU; pass --device cuda to give "
                "each process its own (cuda:<LOCAL_RANK>)",
                text,
                self.world_size,
            )
        return text

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self._group)
        return values

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self._group)

    def close(self) -> None:
        """Leave the process group (when this context joined it)."""
        if self._owns_process_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_process_group = False
        self._group = None


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={text!r} must be an integer (set by torchrun / accelerate "
            f"launch); unset it to run as one process."
        ) from None


def data_parallel(device: str = "cpu") -> DataParallel:
    """Join the data-parallel run this process was launched into, or return a one-process context.

    Args:
        device: The device the command was asked for: ``"cpu"`` joins with gloo; a CUDA device lets accelerate (or
            torch) pick NCCL and this process's GPU.

    Returns:
        A :class:`DataParallel`.

    Raises:
        ValueError: ``WORLD_SIZE``/``RANK`` are malformed, or several processes were launched but torch has no
            distributed support.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DataParallel()
    rank, local_rank = _env_int("RANK", -1), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r} is not in 0..{world_size - 1} (WORLD_SIZE={world_size}); "
            f"launch with torchrun or accelerate launch, or unset WORLD_SIZE to run as one process."
        )
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(
            f"WORLD_SIZE={world_size} asks for {world_size} processes, but this torch build has no "
            f"torch.distributed; run one process (unset WORLD_SIZE)."
        )
    owns = False
    if not dist.is_initialized():
        on_cpu = not str(device).startswith("cuda")
        try:
            from accelerate import PartialState
        except ImportError:
            PartialState = None
        if PartialState is not None:
            PartialState(cpu=on_cpu)
        if not dist.is_initialized():  # accelerate missing, or it chose not to start a group
            backend = "nccl" if not on_cpu and torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        owns = True
    group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    context = DataParallel(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        _group=group,
        _owns_process_group=owns,
    )
    logger.info(
        "data-parallel: rank %d of %d (local rank %d, backend %s)",
        context.rank,
        context.world_size,
        local_rank,
        dist.get_backend(),
    )
    return context


def shard_batches(items: Sequence[T], batch_size: int, rank: int, world_size: int) -> list[T]:
    """This rank's share of ``items``: the batches ``b`` (consecutive runs of ``batch_size`` items) with
    ``b % world_size == rank``, concatenated in order.

    Every item goes to exactly one rank, and re-batching a share by ``batch_size`` gives back whole batches of the
    one-process run (only the last batch overall may be short).

    Example:
        >>> shard_batches(list(range(7)), 2, 0, 2), shard_batches(list(range(7)), 2, 1, 2)
        ([0, 1, 4, 5], [2, 3, 6])
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}.")
    return [item for index, item in enumerate(items) if (index // batch_size) % world_size == rank]


__all__ = ["DataParallel", "data_parallel", "shard_batches", "COLLECTIVE_TIMEOUT"]
