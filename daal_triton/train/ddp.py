"""Data-parallel runs of the training program: torchrun's environment, the process group, rank 0.

``torchrun --nproc_per_node=N -m daal_triton.train ...`` starts N copies of the program with
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` set; :func:`setup` sees a world larger than one, picks the
device (``cuda:LOCAL_RANK`` on GPUs) and the backend (NCCL on GPUs, gloo on CPUs, unless
``--dist-backend`` says otherwise) and initialises the process group. Without those variables
(or with ``WORLD_SIZE=1``) the run is the ordinary single process and nothing here does anything.

How a run uses it (:mod:`daal_triton.train.run`): every rank draws its share of the same global P x K batch
(:class:`~daal_triton.train.data.DistributedPKSampler`), the model is wrapped in
DistributedDataParallel, embeddings and labels are gathered with gradients
(:func:`daal_triton.distributed.gather_batch`) and the loss is computed on the global batch on
every rank; the loss module stays outside DDP and its gradients are averaged with
:func:`daal_triton.distributed.sync_grads`. Rank 0 alone evaluates and writes files; the others
wait at a barrier.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist


class ConfigError(ValueError):
    """A configuration the program refuses before doing any work (printed as ``daal-train: error``)."""


def env_world() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment (``(0, 1, 0)`` outside it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers: {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def world_size() -> int:
    """The number of processes of the run about to start: an existing process group's size, else
    torchrun's ``WORLD_SIZE`` (read before any group is joined, so a bad configuration is refused
    first)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world()[1]


@dataclass
class DistContext:
    """Where this process stands in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owns_group: bool = False  # this run created the process group (and destroys it at the end)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if not self.distributed:
            return
        if "nccl" in (self.backend or "") and torch.cuda.is_available():  # "nccl", or "cpu:gloo,cuda:nccl"
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()

    def all_objects(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (plain, picklable data), in rank order, on every rank: a collective."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def choose_backend(requested: str, device: torch.device) -> str:
    """``auto`` -> NCCL for CUDA devices, gloo for the CPU."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested not in ("nccl", "gloo"):
        raise ConfigError(f"--dist-backend must be auto, nccl or gloo, got {requested!r}")
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("--dist-backend nccl needs CUDA devices; use gloo (the default on CPUs)")
    return requested


def setup(device: torch.device, backend: str = "auto", timeout_min: float = 60.0) -> Tuple[DistContext, torch.device]:
    """Initialise the process group when torchrun started this process in a world larger than one.

    Returns the context and the device this rank uses (``cuda:LOCAL_RANK`` for a CUDA run; the
    CPU stays the CPU). A process group that already exists (a caller's own launcher) is used as
    it is and left open at the end; where that launcher sets no ``LOCAL_RANK`` (``mp.spawn``) a
    CUDA rank takes GPU ``rank % device_count`` (the ranks of one machine in turn), not all GPU 0.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "-1"))
        if local < 0:
            local = rank % torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        return DistContext(rank, world, local, dist.get_backend(), owns_group=False), device
    rank, world, local = env_world()
    if world == 1:
        if device.type == "cuda" and device.index is not None:  # --device cuda:N: N current, as for a
            torch.cuda.set_device(device)  # rank (Triton launches on the current device; memory stats read it)
        return DistContext(), device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                              "--nproc_per_node must not exceed the number of GPUs")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    name = choose_backend(backend, device)
    dist.init_process_group(name, timeout=datetime.timedelta(minutes=timeout_min))
    return DistContext(rank, world, local, name, owns_group=True), device
