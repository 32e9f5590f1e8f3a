"""torch.distributed helpers: DAAL over the *global* batch of a data-parallel run.

DAAL's density and margins depend on the whole batch, so every rank gathers all ranks'
embeddings (with gradients) and computes the same loss on the global batch::

    emb_all, labels_all = gather_batch(emb, labels)     # differentiable all_gather
    loss = loss_fn(emb_all, labels_all)

Gradient bookkeeping: each rank's (identical) loss backpropagates into every rank's embeddings
through ``torch.distributed.nn.functional.all_gather``, so a rank's local embedding gradient is
``world_size`` times the single-process one; DistributedDataParallel's gradient *averaging* then
gives the model exactly the single-process gradient of the global loss. The loss's segments are
not inside DDP: every rank computes the same full gradient for them; ``sync_grads`` averages it
anyway so they can never drift apart.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ranks' embeddings (differentiable) and labels, concatenated in rank order.

    Every rank must pass the same number of rows. Without a process group this is the identity.
    """
    if not is_distributed() or world_size() == 1:
        return embeddings, labels
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct and differentiable
        warnings.simplefilter("ignore", FutureWarning)
        emb = torch.cat(all_gather(embeddings), 0)
    labs = [torch.empty_like(labels) for _ in range(world_size())]
    dist.all_gather(labs, labels.contiguous())
    return emb, torch.cat(labs, 0)


@torch.no_grad()
def sync_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks (no-op without a process group)."""
    if not is_distributed() or world_size() == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world_size()


@torch.no_grad()
def broadcast_params(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (no-op without a process group).

    For modules kept outside DistributedDataParallel (the loss's segments), so every rank starts
    from the same values however its random state was seeded."""
    if not is_distributed() or world_size() == 1:
        return
    for p in params:
        dist.broadcast(p.data, src=src)
