"""The training step and what it needs: the loss (DAAL or any pytorch-metric-learning loss),
AdamW with a separate learning rate for the loss's parameters, the cosine schedule with warm-up,
the loss on the global batch (:class:`GlobalBatchLoss`) and one epoch of training
(:func:`train_one_epoch`). The run that ties them together is :mod:`daal_triton.train.run`.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

import daal_triton

from daal_triton.core import Hyperparameters
from daal_triton.distributed import gather_batch, sync_grads
from daal_triton.memory import MemoryBank

from .config import DAAL_TRAIN_FIELDS, TrainConfig, default_daal  # noqa: F401  (engine.default_daal)
from .model import EmbeddingNet


def build_model(cfg: TrainConfig) -> EmbeddingNet:
    """The embedding network of ``cfg``."""
    return EmbeddingNet(cfg.arch, cfg.embedding_dim, weights=cfg.weights)


class PMLLoss(nn.Module):
    """A pytorch-metric-learning loss behind DAALLoss's call signature."""

    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.inner = inner
        self.name = name

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, ref_emb=None, ref_labels=None) -> torch.Tensor:
        if ref_emb is not None:
            return self.inner(embeddings.float(), labels, ref_emb=ref_emb.float(), ref_labels=ref_labels)
        return self.inner(embeddings.float(), labels)


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
        return _construct(daal_triton.DAALLoss, "daal", num_classes, embedding_dim, backend=backend, **hp, **kwargs)
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
        return PMLLoss(_construct(cls, loss, **kwargs), name)
    raise ValueError(f"--loss must be 'daal' or 'pml:<LossName>', got {loss!r}")


def _construct(cls, loss: str, *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)``; keyword arguments it does not take are a ``ValueError`` that
    names ``--loss-kwargs``."""
    try:
        return cls(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"--loss {loss}: {e} (check --loss-kwargs)") from None


def make_optimizer(model: nn.Module, criterion: nn.Module, *, lr: float, loss_lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """AdamW: the network at ``lr`` (no decay on biases and norm layers), the loss's parameters
    (DAAL's segments, proxies) at ``loss_lr`` without weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [dict(params=decay, lr=lr, weight_decay=weight_decay),
              dict(params=no_decay, lr=lr, weight_decay=0.0)]
    loss_params = [p for p in criterion.parameters() if p.requires_grad]
    if loss_params:
        groups.append(dict(params=loss_params, lr=loss_lr, weight_decay=0.0))
    return torch.optim.AdamW([g for g in groups if g["params"]])


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
    """

    def __init__(self, bank: Optional[MemoryBank] = None) -> None:
        self.bank = bank

    def __call__(self, criterion: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb, labs = gather_batch(embeddings, labels)
        emb = emb.float()
        if self.bank is None:
            return criterion(emb, labs)
        ref, ref_labels = self.bank.with_batch(emb, labs)
        loss = criterion(emb, labs, ref_emb=ref, ref_labels=ref_labels, ref_includes_batch=True)
        self.bank.enqueue(emb.detach(), labs)
        return loss


def train_one_epoch(model: nn.Module, criterion: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    scheduler, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
                    scaler: Optional[torch.amp.GradScaler] = None, max_steps: Optional[int] = None,
                    desc: str = "train", progress: bool = True,
                    loss_fn: Callable = loss_from_embeddings) -> float:
    """One pass over ``loader`` (at most ``max_steps`` batches); returns the mean loss."""
    model.train()
    criterion.train()
    total, n = 0.0, 0
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True)
    for i, (images, labels) in enumerate(loader):
        if i >= steps:
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            emb = model(images)
        loss = loss_fn(criterion, emb, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {i} of {desc}")
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
            scheduler.step()
        total += loss.item()
        n += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if bar is not None:
        bar.close()
    return total / max(1, n)
