"""The training loop: losses (DAAL or any pytorch-metric-learning loss), AdamW with a separate
learning rate for the loss's parameters, cosine schedule with warm-up, AMP, checkpoints, and the
run that ties it together (evaluations, baselines, plots, metrics.jsonl).

Distributed training (a later issue) plugs in at two places: :func:`loss_from_embeddings` is the
one function that turns a batch's embeddings into the loss (a DDP wrapper all-gathers embeddings
and labels before calling it), and :class:`daal_triton.train.data.PKSampler` draws batches from
``(seed, epoch)`` only, so every rank can take its share of the same draw.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

import daal_triton

from . import evaluate as E
from .data import PKSampler, build_datasets
from .model import EmbeddingNet

# The DAAL hyperparameters the training program uses unless told otherwise (the loss's own
# defaults are SPEC.md's; these are tuned for training a network, see docs/training.md).
DAAL_TRAIN_DEFAULTS: Dict[str, Any] = dict(k=3, m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0, alpha=16.0,
                                           tau=0.8, lambda_pull=0.0, lambda_dens=0.5, lambda_len=0.0,
                                           l_max=1.0)


@dataclass
class TrainConfig:
    """Everything a run needs; ``daal-train --help`` documents each field (same names)."""

    dataset: str = "shapes"
    data_root: Optional[str] = None
    image_size: int = 32
    epochs: int = 5
    steps_per_epoch: Optional[int] = None
    classes_per_batch: int = 12
    samples_per_class: int = 4
    arch: str = "vgg19_bn"
    embedding_dim: int = 512
    weights: Optional[str] = None
    loss: str = "daal"
    daal: Dict[str, Any] = field(default_factory=lambda: dict(DAAL_TRAIN_DEFAULTS))
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss_backend: str = "auto"
    lr: float = 1e-3
    loss_lr: float = 5e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    amp: str = "none"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/shapes"
    resume: Optional[str] = None
    eval_every: int = 1
    eval_batch_size: int = 128
    num_workers: int = 0
    knn_backend: str = "auto"
    augment: str = "none"
    shapes_train_per_class: int = 120
    shapes_test_per_class: int = 40
    shapes_nuisance: float = 1.0
    baselines: bool = True
    tsne: bool = True
    tsne_max_points: int = 2000
    progress: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------- set-up helpers

def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``bf16``/``fp16`` autocast dtype on CUDA; ``none`` (or any AMP on CPU, with a note) -> None."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    if amp == "none":
        return None
    if device.type != "cuda":
        print(f"[daal-train] --amp {amp} is for GPUs; running in float32 on {device.type}")
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


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
        hp = dict(DAAL_TRAIN_DEFAULTS)
        hp.update(daal or {})
        hp.update(kwargs)
        return daal_triton.DAALLoss(num_classes, embedding_dim, backend=backend, **hp)
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
        return PMLLoss(cls(**kwargs), name)
    raise ValueError(f"--loss must be 'daal' or 'pml:<LossName>', got {loss!r}")


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
    """The loss of one batch from its embeddings: the seam a distributed wrapper gathers into."""
    return criterion(embeddings.float(), labels)


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
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
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


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, *, model: nn.Module, criterion: nn.Module, cfg: TrainConfig, epoch: int,
                    metrics: List[Dict[str, Any]], optimizer=None, scheduler=None, scaler=None) -> None:
    """Write a checkpoint atomically (to ``path.tmp``, then rename)."""
    state = dict(model=model.state_dict(), loss=criterion.state_dict(), config=cfg.to_dict(),
                 epoch=epoch, metrics=metrics, version=daal_triton.__version__)
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state["rng"] = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- the run

def build_model(cfg: TrainConfig, *, announce: bool = True) -> EmbeddingNet:
    """The embedding network of ``cfg`` (``announce=False``: no note about missing ImageNet
    weights, for a model about to receive a checkpoint)."""
    return EmbeddingNet(cfg.arch, cfg.embedding_dim, weights=cfg.weights, announce=announce)


def _log(fh, record: Dict[str, Any]) -> None:
    """One metrics.jsonl line (NaN, e.g. a metric undefined on this data, is written as null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
    fh.write(json.dumps(clean) + "\n")
    fh.flush()


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; write everything under ``cfg.out``; return the final
    table's rows ({method: metrics})."""
    t_start = time.time()
    cpu_start = time.process_time()
    os.makedirs(cfg.out, exist_ok=True)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    seed_everything(cfg.seed)

    train_ds, test_ds = build_datasets(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.seed,
                                       augment=cfg.augment, shapes_train_per_class=cfg.shapes_train_per_class,
                                       shapes_test_per_class=cfg.shapes_test_per_class,
                                       shapes_nuisance=cfg.shapes_nuisance)
    print(f"[daal-train] {cfg.dataset}: {len(train_ds)} training images of {train_ds.num_classes} classes, "
          f"{len(test_ds)} test images of {test_ds.num_classes} held-out classes; device {device}")
    model = build_model(cfg).to(device)
    criterion = build_criterion(cfg.loss, train_ds.num_classes, cfg.embedding_dim, daal=cfg.daal,
                                loss_kwargs=cfg.loss_kwargs, backend=_loss_backend(cfg.loss_backend, device)).to(device)
    sampler = PKSampler(train_ds.labels, cfg.classes_per_batch, cfg.samples_per_class, seed=cfg.seed)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0)
    steps = len(sampler) if cfg.steps_per_epoch is None else min(len(sampler), cfg.steps_per_epoch)
    optimizer = make_optimizer(model, criterion, lr=cfg.lr, loss_lr=cfg.loss_lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.epochs * steps, int(round(cfg.warmup_epochs * steps)))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    history: List[Dict[str, Any]] = []
    start_epoch = 1
    if cfg.resume:
        ck = load_checkpoint(cfg.resume)
        model.load_state_dict(ck["model"])
        criterion.load_state_dict(ck["loss"])
        if "optimizer" in ck:
            optimizer.load_state_dict(ck["optimizer"])
        if "scheduler" in ck:
            scheduler.load_state_dict(ck["scheduler"])
        if scaler is not None and "scaler" in ck:
            scaler.load_state_dict(ck["scaler"])
        history = list(ck.get("metrics", []))
        start_epoch = int(ck["epoch"]) + 1
        if "rng" in ck:
            torch.set_rng_state(ck["rng"]["torch"])
            np.random.set_state(ck["rng"]["numpy"])
            random.setstate(ck["rng"]["python"])
        print(f"[daal-train] resumed from {cfg.resume} at epoch {start_epoch}")

    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)
    labels = E.dataset_labels(test_ds)
    modes = test_ds.modes
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    fh = open(metrics_path, "a" if cfg.resume else "w")
    table: Dict[str, Dict[str, float]] = {}
    try:
        def evaluate(epoch: int, name: str, emb: torch.Tensor, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
            t0 = time.time()
            m = E.all_metrics(emb.to(device), labels.to(device), modes, backend=cfg.knn_backend, seed=cfg.seed)
            rec = dict(epoch=epoch, model=name, **m, **(extra or {}), eval_s=round(time.time() - t0, 2),
                       elapsed_s=round(time.time() - t_start, 2))
            _log(fh, rec)
            history.append(rec)
            return rec

        if cfg.baselines and start_epoch == 1:
            t0 = time.time()
            rec = evaluate(0, "raw_pixels", E.pixel_vectors(test_ds))
            table["raw pixels"] = rec
            emb0 = E.embed(model, test_ds, device, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
                           num_workers=cfg.num_workers)
            rec = evaluate(0, "untrained", emb0, dict(embed_s=round(time.time() - t0, 2)))
            table["untrained network"] = rec
            print(f"[daal-train] baselines: raw pixels R@1 {table['raw pixels']['recall@1']:.4f}, "
                  f"untrained network R@1 {rec['recall@1']:.4f} ({time.time() - t0:.1f} s)")
        else:
            for rec in history:  # a resumed run keeps its baselines for the final table
                if rec.get("model") == "raw_pixels":
                    table["raw pixels"] = rec
                elif rec.get("model") == "untrained":
                    table["untrained network"] = rec

        best = max([r["recall@1"] for r in history if r.get("model") == "trained"], default=-1.0)
        last_rec: Optional[Dict[str, Any]] = None
        emb = None
        epoch = start_epoch - 1
        for epoch in range(start_epoch, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            t0 = time.time()
            train_loss = train_one_epoch(model, criterion, loader, optimizer, scheduler, device,
                                         amp_dtype=amp_dtype, scaler=scaler, max_steps=steps,
                                         desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress)
            train_s = time.time() - t0
            do_eval = epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0)
            msg = (f"[daal-train] epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f} ({train_s:.1f} s, "
                   f"CPU {time.process_time() - cpu_start:.0f} s so far)")
            if do_eval:
                emb = E.embed(model, test_ds, device, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
                              num_workers=cfg.num_workers)
                last_rec = evaluate(epoch, "trained", emb, dict(train_loss=train_loss, train_s=round(train_s, 2)))
                msg += "  " + "  ".join(f"{k} {last_rec[k]:.4f}" for k in ("recall@1", "nmi", "map@r")
                                        if k in last_rec)
            else:
                rec = dict(epoch=epoch, model="trained", train_loss=train_loss, train_s=round(train_s, 2),
                           elapsed_s=round(time.time() - t_start, 2))
                _log(fh, rec)
                history.append(rec)
            print(msg, flush=True)
            save_checkpoint(os.path.join(cfg.out, "checkpoint_last.pt"), model=model, criterion=criterion, cfg=cfg,
                            epoch=epoch, metrics=history, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            if do_eval and last_rec["recall@1"] > best:
                best = last_rec["recall@1"]
                save_checkpoint(os.path.join(cfg.out, "checkpoint_best.pt"), model=model, criterion=criterion,
                                cfg=cfg, epoch=epoch, metrics=history)
        if emb is None:  # nothing trained in this call (resumed at the end): evaluate what we have
            emb = E.embed(model, test_ds, device, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
                          num_workers=cfg.num_workers)
            last_rec = evaluate(epoch, "trained", emb)
        table[f"trained ({cfg.loss}, epoch {epoch})"] = last_rec
    finally:
        fh.close()

    from . import plots

    try:
        plots.training_curves(history, os.path.join(cfg.out, "training_curves.png"))
    except Exception as e:  # a plot must never lose a finished run
        print(f"[daal-train] training-curve plot failed: {e}")
    if cfg.tsne:
        t0 = time.time()
        plots.tsne_plot(emb, labels.numpy(), os.path.join(cfg.out, "tsne_test.png"), modes=modes,
                        class_names=test_ds.class_names, mode_names=getattr(test_ds, "mode_names", None),
                        max_points=cfg.tsne_max_points, seed=cfg.seed,
                        title=f"{cfg.dataset} test classes, {cfg.arch} + {cfg.loss}, epoch {epoch}")
        print(f"[daal-train] t-SNE of the test embeddings: {os.path.join(cfg.out, 'tsne_test.png')} "
              f"({time.time() - t0:.1f} s)")
    text = E.format_table(table, keys=_table_keys(table))
    total = time.time() - t_start
    text += (f"\n(held-out classes of {cfg.dataset}; wall time {total:.1f} s, process CPU time "
             f"{time.process_time() - cpu_start:.1f} s on {torch.get_num_threads()} threads; outputs in {cfg.out})")
    with open(os.path.join(cfg.out, "results.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return table


def _table_keys(table: Dict[str, Dict[str, float]]) -> List[str]:
    keys = [f"recall@{k}" for k in E.RECALL_KS] + ["nmi", "map@r", "r_precision", "subcluster_nmi"]
    return [k for k in keys if any(k in r for r in table.values())]


def _loss_backend(name: str, device: torch.device) -> str:
    """DAAL's backend: ``auto`` -> the fused kernels on CUDA, the reference on CPU."""
    if name == "auto":
        return "auto" if device.type == "cuda" else "reference"
    return name
