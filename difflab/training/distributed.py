"""Multi-process training and sampling with ``torchrun`` (PyTorch's own DDP engine).

``torchrun --nproc_per_node N -m difflab train ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :func:`init_distributed` reads them
and joins the process group (NCCL on CUDA, gloo on the CPU). Multi-node rendezvous options
(``--nnodes``, ``--rdzv-endpoint``, ...) are torchrun's own and need nothing here.

Work is split so that results do not depend on the number of processes: a global batch is
cut into equal contiguous slices (rank r takes slice r), and a list of sampling seeds into
contiguous shards, gathered back in order on rank 0.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank (GPU index on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints, logs and images (rank 0)."""
        return self.rank == 0


def env_info() -> DistInfo:
    """The torchrun environment of this process (a single process if none)."""
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; return the info and this rank's
    device (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    info = env_info()
    if not info.enabled:
        return info, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)
    return info, device


def shutdown(sync: bool = True) -> None:
    """Leave the process group if one was joined.

    With ``sync`` every rank first waits at a barrier, so none tears down its connections
    while a peer still uses them (rank 0 may still be writing a checkpoint). The garbage
    collection frees group handles held in cycles now, while the interpreter is whole: a
    gloo group destroyed during interpreter shutdown can abort the process."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


@contextmanager
def process_group(release: Callable[[], None] | None = None) -> Iterator[None]:
    """Run a block, then leave the process group: ``release`` first drops whatever holds
    the group (a DDP wrapper), then :func:`shutdown` syncs the ranks. After an error the
    barrier is skipped, since a failed peer would never reach it."""
    try:
        yield
    except BaseException:
        if release is not None:
            release()
        shutdown(sync=False)
        raise
    if release is not None:
        release()
    shutdown()


def local_slice(n: int, info: DistInfo) -> slice:
    """This rank's contiguous share of ``n`` items (shares differ by at most one)."""
    return slice(info.rank * n // info.world_size, (info.rank + 1) * n // info.world_size)


def check_divisible(batch_size: int, info: DistInfo) -> None:
    """Equal slices keep the all-reduced gradient equal to the global-batch mean."""
    if batch_size % info.world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by the number of "
                         f"processes ({info.world_size}) so each takes an equal slice")


def mean_over_ranks(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over all ranks (identity for one process)."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, ``None`` elsewhere."""
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op for one process)."""
    if info.enabled:
        dist.barrier()
