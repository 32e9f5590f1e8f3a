"""The training step and what it needs: the loss (DAAL or any pytorch-metric-learning loss),
AdamW with a separate learning rate for the loss's parameters, the cosine schedule with warm-up,
the loss on the global batch (:class:`GlobalBatchLoss`) and one epoch of training
(:func:`train_one_epoch`). The run that ties them together is :mod:`daal_triton.train.run`.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import daal_triton

from daal_triton.core import Hyperparameters
from daal_triton.distributed import gather_batch, rank0_random, sync_grads  # noqa: F401  (engine.rank0_random)
from daal_triton.memory import MemoryBank

from .config import DAAL_TRAIN_FIELDS, TrainConfig, default_daal  # noqa: F401  (engine.default_daal)
from .model import EmbeddingNet, default_width


def build_model(cfg: TrainConfig) -> EmbeddingNet:
    """The embedding network of ``cfg`` (a resumed run's trunk comes from its checkpoint: the
    ``--weights`` file, which may have moved since, is not read)."""
    width = default_width(cfg.dataset, cfg.weights) if cfg.width is None else cfg.width
    return EmbeddingNet(cfg.arch, cfg.embedding_dim, weights=None if cfg.resume else cfg.weights, width=width)


class PMLLoss(nn.Module):
    """A pytorch-metric-learning loss behind DAALLoss's call signature (without a memory bank:
    config refuses --memory-bank with these losses)."""

    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.inner = inner
        self.name = name

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        return self.inner(embeddings.float(), labels, indices_tuple)


def build_miner(miner: Optional[str], miner_kwargs: Optional[Dict[str, Any]] = None) -> Optional[nn.Module]:
    """``None`` -> no miner; ``"pml:<Name>"`` -> ``pytorch_metric_learning.miners.<Name>(**miner_kwargs)``."""
    if not miner:
        if miner_kwargs:
            raise ValueError("--miner-kwargs needs --miner pml:<MinerName>")
        return None
    if not miner.startswith("pml:"):
        raise ValueError(f"--miner must be 'pml:<MinerName>', got {miner!r}")
    try:
        from pytorch_metric_learning import miners as pml_miners
    except ImportError as e:
        raise ImportError(f"--miner {miner} needs pytorch-metric-learning: pip install 'daal-triton[pml]'") from e
    cls = getattr(pml_miners, miner[4:], None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"--miner {miner}: pytorch_metric_learning.miners has no miner named {miner[4:]!r}")
    return _construct(cls, "--miner", miner, **dict(miner_kwargs or {}))


def build_criterion(loss: str, num_classes: int, embedding_dim: int, *, daal: Optional[Dict[str, Any]] = None,
                    loss_kwargs: Optional[Dict[str, Any]] = None, backend: str = "auto") -> nn.Module:
    """``"daal"`` -> :class:`daal_triton.DAALLoss`; ``"pml:<Name>"`` -> ``pytorch_metric_learning.losses.<Name>``
    (``num_classes``/``embedding_size`` are passed when its constructor takes them)."""
    kwargs = dict(loss_kwargs or {})
    if loss == "daal":
        twice = sorted(set(kwargs) & set(Hyperparameters.names()))
        if twice:
            raise ValueError(f"--loss-kwargs: DAAL hyperparameters are set with --daal-* flags "
                             f"(e.g. --daal-{twice[0].replace('_', '-')}), not here: {twice}")
        hp = dict(default_daal(), **(daal or {}))
        return _construct(daal_triton.DAALLoss, "--loss", "daal", num_classes, embedding_dim, backend=backend, **hp,
                          **kwargs)
    if loss.startswith("pml:"):
        name = loss[4:]
        try:
            from pytorch_metric_learning import losses as pml_losses
        except ImportError as e:
            raise ImportError(f"--loss {loss} needs pytorch-metric-learning: pip install 'daal-triton[pml]'") from e
        cls = getattr(pml_losses, name, None)
        if cls is None or not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"--loss {loss}: pytorch_metric_learning.losses has no loss named {name!r}")
        params = inspect.signature(cls.__init__).parameters
        if "num_classes" in params:
            kwargs.setdefault("num_classes", num_classes)
        if "embedding_size" in params:
            kwargs.setdefault("embedding_size", embedding_dim)
        return PMLLoss(_construct(cls, "--loss", loss, **kwargs), name)
    raise ValueError(f"--loss must be 'daal' or 'pml:<LossName>', got {loss!r}")


def check_pml_on_a_batch(criterion: nn.Module, miner: Optional[nn.Module], num_classes: int, embedding_dim: int,
                         device: torch.device, *, loss: str, miner_name: Optional[str]) -> None:
    """A pytorch-metric-learning loss or miner is built from any keyword arguments and only fails
    at its first call (``--loss-kwargs '{"margin": "a"}'``, an abstract base class): run copies of
    them once on a made-up batch (8 unit rows, 4 classes; the copies keep the real ones' state
    untouched: a cross-batch memory enqueues nothing), so that such a setting is one error line
    before anything is written, not a traceback mid-training. ``ValueError`` naming the flag."""
    if not (isinstance(criterion, PMLLoss) or miner is not None):
        return
    g = torch.Generator().manual_seed(0)  # the run's random streams are not touched (nor below: fork_rng)
    emb = nn.functional.normalize(torch.randn(8, embedding_dim, generator=g), dim=1).to(device)
    labels = (torch.arange(8) % min(4, num_classes)).to(device)
    flag, value = ("--miner", miner_name) if miner is not None else ("--loss", loss)
    try:
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # a loss that draws leaves the run's draws
            tuples = copy.deepcopy(miner)(emb, labels) if miner is not None else None
            flag, value = "--loss", loss
            if isinstance(criterion, PMLLoss):
                copy.deepcopy(criterion)(emb, labels, tuples)
    except Exception as e:  # noqa: BLE001 - any failure of the user's setting is reported as one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{flag} {value} fails on a test batch ({type(e).__name__}{': ' + detail if detail else ''}): "
                         f"check {flag}-kwargs") from None


def _construct(cls, flag: str, value: str, /, *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` for ``flag value`` (``--loss daal``, ``--miner pml:...``); keyword
    arguments it does not take are a ``ValueError`` that names ``<flag>-kwargs``."""
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"{flag} {value}: {e} (check {flag}-kwargs)") from None


def make_optimizer(model: nn.Module, criterion: nn.Module, *, lr: float, loss_lr: float,
                   weight_decay: float, fused: Optional[bool] = None) -> torch.optim.Optimizer:
    """AdamW: the network at ``lr`` (no decay on biases and norm layers), the loss's parameters
    (DAAL's segments, proxies) at ``loss_lr`` without weight decay.

    ``fused`` (None: when every parameter is on a CUDA device) selects PyTorch's fused AdamW: one
    kernel for the whole update, step counters on the device, so the step never reads a value
    back to the host (the for-each implementation reads each CPU step counter). The CPU keeps
    the default implementation (and its numbers)."""
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups: List[Dict[str, Any]] = [dict(params=decay, lr=lr, weight_decay=weight_decay),
                                    dict(params=no_decay, lr=lr, weight_decay=0.0)]
    loss_params = [p for p in criterion.parameters() if p.requires_grad]
    if loss_params:
        groups.append(dict(params=loss_params, lr=loss_lr, weight_decay=0.0))
    groups = [g for g in groups if g["params"]]
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.device.type == "cuda" and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, fused=True) if fused else torch.optim.AdamW(groups)


def make_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 0 at ``total_steps`` (stepped per batch)."""
    total_steps = max(1, total_steps)

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_from_embeddings(criterion: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of one batch from its embeddings (one process, no memory bank)."""
    return criterion(embeddings.float(), labels)


class GlobalBatchLoss:
    """The ``loss_fn`` of :func:`train_one_epoch` in every run of the program.

    1. gathers all ranks' embeddings (differentiable) and labels into the global batch
       (:func:`daal_triton.distributed.gather_batch`; the identity in a single process);
    2. computes the loss on the global batch, identical on every rank. With a ``bank``
       (``--memory-bank``), the kNN density's reference set is the global batch followed by the
       bank's rows: ``criterion(emb, labels, ref_emb=ref, ref_labels=ref_labels, ref_includes_batch=True)``;
    3. then enqueues the global batch's detached embeddings, so every rank holds the same bank.

    With a ``miner`` (``--miner``), its tuple of the global batch is passed as ``indices_tuple``.
    The miner and a loss of pytorch-metric-learning draw random numbers (UniformHistogramMiner,
    ManifoldLoss) from rank 0's generators on every rank (:func:`rank0_random`): each rank had
    drawn its own, so the ranks mined different tuples and computed different losses.
    """

    def __init__(self, bank: Optional[MemoryBank] = None, miner: Optional[nn.Module] = None) -> None:
        self.bank = bank
        self.miner = miner

    def __call__(self, criterion: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb, labs = gather_batch(embeddings, labels, same_size=True)  # PKSampler: equal shares on every rank
        emb = emb.float()
        # DAAL draws nothing at random: no collective for it
        shared = rank0_random(emb.device) if self.miner is not None or not isinstance(
            criterion, daal_triton.DAALLoss) else contextlib.nullcontext()
        with shared:
            tuples = self.miner(emb, labs) if self.miner is not None else None
            if self.bank is None:
                return criterion(emb, labs, tuples) if tuples is not None else criterion(emb, labs)
            ref, ref_labels = self.bank.with_batch(emb, labs)
            kw = dict(ref_emb=ref, ref_labels=ref_labels, ref_includes_batch=True)
            loss = criterion(emb, labs, tuples, **kw) if tuples is not None else criterion(emb, labs, **kw)
        self.bank.enqueue(emb.detach(), labs)
        return loss


LOG_EVERY = 50  # default --log-every: steps between two reads of the running loss


def batch_to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    fmt: torch.memory_format) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device`` without waiting (``non_blocking``: pinned by the loader on CUDA), the
    images in the network's memory format."""
    images = images.to(device, non_blocking=True)
    if fmt is torch.channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_step(model: nn.Module, criterion: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, scheduler, *, amp_dtype: Optional[torch.dtype] = None,
               scaler: Optional[torch.amp.GradScaler] = None,
               loss_fn: Callable = loss_from_embeddings) -> torch.Tensor:
    """One optimiser step on a batch already on the device (the network under autocast when
    ``amp_dtype``, the loss in float32); returns the loss, never read back to the host here."""
    with torch.autocast(device_type=images.device.type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        emb = model(images)
    loss = loss_fn(criterion, emb, labels)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        sync_grads(criterion.parameters())  # the loss is outside DDP: keep its parameters identical
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        sync_grads(criterion.parameters())
        optimizer.step()
    if scheduler is not None:
        if scaler is None:
            scheduler.step()
        else:  # a step the scaler skipped (inf/NaN gradients) still advances the schedule: knowing
            # which were skipped would read a value back to the host every step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                scheduler.step()
    return loss


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scheduler, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, max_steps: Optional[int] = None,
                    desc: str = "train", progress: bool = True,
                    loss_fn: Callable = loss_from_embeddings, log_every: int = LOG_EVERY,
                    stats: Optional[Dict[str, Any]] = None) -> float:
    """One pass over ``loader`` (at most ``max_steps`` batches); returns the mean loss.

    The step never waits for the device: the loss is summed on the device (float64) and read back
    to the host only every ``log_every`` steps and once at the end (the progress bar's loss, the
    check that it is finite: a non-finite loss raises ``FloatingPointError`` at the first read
    after it). Batches move with :func:`batch_to_device`.

    ``stats`` (a dict), if given, receives ``data_wait_s``: the host's time waiting for the
    loader's next batch (decoding, augmentation, collation not hidden behind the step), ``steps``
    and ``images``."""
    from .devices import input_memory_format

    model.train()
    criterion.train()
    log_every = max(1, int(log_every))
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    fmt = input_memory_format(model)
    running = torch.zeros((), dtype=torch.float64, device=device)  # sum of the step losses, on the device
    total, n, read_at, images_seen, wait = 0.0, 0, 0, 0, 0.0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True)

    lr_used = optimizer.param_groups[0]["lr"]

    def read(i: int) -> None:
        """The host's one look at the loss sum (a synchronisation on a GPU)."""
        nonlocal total, read_at
        total = running.item()
        if not math.isfinite(total):
            raise FloatingPointError(f"the loss became {total} (summed over steps) between step {read_at} and "
                                     f"step {i} of {desc}")
        read_at = i + 1
        if bar is not None:  # the rate the last step used (the scheduler has already set the next one)
            bar.set_postfix(loss=f"{total / max(1, n):.4f}", lr=f"{lr_used:.2e}")

    batches = iter(loader)
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            images, labels = batch_to_device(images, labels, device, fmt)
            lr_used = optimizer.param_groups[0]["lr"]
            loss = train_step(model, criterion, images, labels, optimizer, scheduler, amp_dtype=amp_dtype,
                              scaler=scaler, loss_fn=loss_fn)
            running += loss.detach()
            n += 1
            images_seen += images.shape[0]
            if bar is not None:
                bar.update(1)
            if n % log_every == 0:
                read(i)
        if n and read_at != n:
            read(n - 1)
    finally:  # a Ctrl-C or a divergence too: the bar is cleared before the program says why it stopped
        if bar is not None:
            bar.close()
    if stats is not None:
        stats.update(data_wait_s=wait, steps=n, images=images_seen)
    return total / max(1, n)
