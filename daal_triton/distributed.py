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
anyway so they can never drift apart. They must also *start* equal: DDP copies rank 0's network to
every rank, not the loss, so call ``broadcast_params(loss_fn.parameters())`` once before training
(ranks seeded differently would otherwise each keep their own segments)::

    broadcast_params(loss_fn.parameters())              # once
    ...
    loss.backward()
    sync_grads(loss_fn.parameters())                     # every step, before optimizer.step()
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator, Tuple

import torch
import torch.distributed as dist

from .validation import check_same_device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def gather_batch(embeddings: torch.Tensor, labels: torch.Tensor, *,
                 same_size: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ranks' embeddings (differentiable) and labels, concatenated in rank order.

    Ranks may pass different numbers of rows (a short last batch), none included: the row counts
    are gathered first (a few integers per rank, and a host synchronisation to read them), every
    share is padded to the largest for the gather and cut back after it. The same gather carries
    each rank's dtypes and per-row shapes: ranks that disagree raise ``ValueError`` (every rank
    alike) instead of aborting in the collective. ``same_size=True`` promises that every rank
    passes as many rows as this one, of the same dtypes and shapes, and skips that step (the
    training program's sampler gives every rank the same share). Without a process group this is
    the identity. Embeddings and labels must be on one device, a CUDA one under NCCL, with one
    label per row, and carry a gradient on every rank or on none (``ValueError`` otherwise: on every
    rank, from the gather of the shares, so no rank is left inside a collective; with
    ``same_size=True`` on the offending rank only, before any collective). Labels of any integer dtype arrive bit for bit
    (those gloo has no type for, int16 and uint16/32/64, travel as bytes).
    """
    if not is_distributed() or world_size() == 1:
        return embeddings, labels
    problem = _local_problem(embeddings, labels)
    if same_size:  # no gather of the shares: a local problem can only be raised here
        if problem is not None:
            raise ValueError(problem)
    from torch.distributed.nn.functional import all_gather

    n = embeddings.shape[0]
    sizes = [n] * world_size()
    if not same_size:
        sizes = _gather_shares(embeddings, labels, problem)
    most = max(sizes)
    if most != n:
        embeddings = torch.cat([embeddings, embeddings.new_zeros((most - n, *embeddings.shape[1:]))])
        labels = torch.cat([labels, labels.new_zeros((most - n, *labels.shape[1:]))])
    with warnings.catch_warnings():  # deprecated in favour of a private API; still correct and differentiable
        warnings.simplefilter("ignore", FutureWarning)
        embs = all_gather(embeddings)
    wire = labels.contiguous()
    if labels.dtype in _AS_BYTES:
        wire = wire.view(torch.uint8)  # the last dimension's entries as itemsize bytes each
    labs = [torch.empty_like(wire) for _ in sizes]
    dist.all_gather(labs, wire)
    labs = [y.view(labels.dtype) for y in labs]
    if most == min(sizes):
        return torch.cat(embs, 0), torch.cat(labs, 0)
    return (torch.cat([e[:k] for e, k in zip(embs, sizes)], 0),
            torch.cat([y[:k] for y, k in zip(labs, sizes)], 0))


def _local_problem(embeddings: torch.Tensor, labels: torch.Tensor):
    """What is wrong with this rank's share alone (a message), or None."""
    if embeddings.dim() == 0 or labels.dim() == 0:
        return (f"gather_batch needs rows: embeddings and labels must have a first dimension, got "
                f"shapes {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if embeddings.shape[:1] != labels.shape[:1]:
        return (f"embeddings has {embeddings.shape[0]} rows but labels has {labels.shape[0]}: "
                "gather_batch needs one label per row")
    try:
        check_same_device(embeddings=embeddings, labels=labels)
    except ValueError as e:
        return str(e)
    if dist.get_backend() == "nccl" and embeddings.device.type != "cuda":
        return (f"the process group's backend is NCCL, which gathers CUDA tensors only: embeddings "
                f"and labels are on {embeddings.device}")
    return None


# dtypes by a stable code, for comparing ranks' tensors in one integer gather
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64)

# gloo gathers no 16-bit integers nor unsigned 32/64-bit ones ("Invalid scalar type"): labels of
# those dtypes (which the loss takes) travel as their bytes
_AS_BYTES = (torch.int16, torch.uint16, torch.uint32, torch.uint64)


_WIDTH = 5  # integers describing a tensor: dtype code, number of dimensions, 3 trailing sizes


def _describe(t: torch.Tensor) -> list:
    """:data:`_WIDTH` integers: the dtype's code, the number of dimensions, the first trailing sizes."""
    code = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
    trailing = list(t.shape[1:_WIDTH - 1])
    return [code, t.dim(), *trailing, *([-1] * (_WIDTH - 2 - len(trailing)))]


def _gather_shares(embeddings: torch.Tensor, labels: torch.Tensor, problem=None) -> list:
    """Every rank's row count, from one integer all_gather that also carries each rank's dtypes,
    trailing shapes, whether its share is usable at all (``problem``: a local check's message) and
    whether it carries a gradient: ranks that disagree, or any rank whose share is refused, make
    every rank raise ``ValueError`` alike, rather than one rank leaving the others inside a
    collective (a hang, or the next step's gather paired with this one's)."""
    grad = int(embeddings.requires_grad and torch.is_grad_enabled())
    rows0 = embeddings.shape[0] if embeddings.dim() else 0
    device = embeddings.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    meta = torch.tensor([rows0, *_describe(embeddings), *_describe(labels), int(problem is not None), grad],
                        dtype=torch.int64, device=device)
    metas = [torch.empty_like(meta) for _ in range(world_size())]
    dist.all_gather(metas, meta)
    rows = torch.stack(metas).tolist()
    if problem is not None:
        raise ValueError(problem)
    refused = [r for r, m in enumerate(rows) if m[-2]]
    if refused:
        raise ValueError(f"gather_batch: rank(s) {refused} passed a share they refused (see their error); every "
                         "rank raises so that none is left inside the gather")
    if len({m[-1] for m in rows}) > 1:
        raise ValueError("embeddings carry a gradient on some ranks and not on others (requires_grad, or "
                         "torch.no_grad on one rank): the gather's backward would wait for ranks that never run it")
    for name, t, cols in (("embeddings", embeddings, slice(1, 1 + _WIDTH)),
                          ("labels", labels, slice(1 + _WIDTH, 1 + 2 * _WIDTH))):
        seen = {tuple(r[cols]) for r in rows}
        if len(seen) > 1:
            raise ValueError(f"{name} differ across ranks in dtype or trailing shape (this rank: {t.dtype}, "
                             f"shape (n, {', '.join(map(str, t.shape[1:]))})): gather_batch concatenates "
                             "rows, so every rank must pass the same dtype and per-row shape")
    return [r[0] for r in rows]


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


@contextlib.contextmanager
def rank0_random(device: torch.device) -> Iterator[None]:
    """Inside, every rank draws rank 0's random numbers (torch's CPU generator, and ``device``'s if
    CUDA), and rank 0 draws them as it would alone; the other ranks' own generators are as before
    afterwards. One broadcast of rank 0's generator states (a few KB); nothing in one process.
    For what draws random numbers on the global batch (a random miner or loss: each rank would
    mine its own tuples); ``daal-train`` runs its miner and pytorch-metric-learning losses in it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    cpu = torch.get_rng_state()
    cuda = device.type == "cuda"
    state = torch.cat([cpu, torch.cuda.get_rng_state(device)]) if cuda else cpu
    # NCCL moves CUDA tensors only; gloo both
    on = device if cuda and dist.get_backend() == "nccl" else torch.device("cpu")
    state = state.to(on)
    dist.broadcast(state, src=0)
    if dist.get_rank() == 0:
        yield
        return
    state = state.cpu()
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.set_rng_state(state[:cpu.numel()])
        if cuda:
            torch.cuda.set_rng_state(state[cpu.numel():], device)
        yield
