"""The training loop: losses (DAAL or any pytorch-metric-learning loss), AdamW with a separate
learning rate for the loss's parameters, cosine schedule with warm-up, AMP, checkpoints, and the
run that ties it together (evaluations, baselines, plots, metrics.jsonl).

Distributed training (``torchrun ... -m daal_triton.train``, see :mod:`daal_triton.train.ddp`):
every rank takes its share of the same global P x K batch (:class:`~daal_triton.train.data.DistributedPKSampler`),
the model runs inside DistributedDataParallel, and :class:`GlobalBatchLoss` gathers the ranks'
embeddings and labels (with gradients) so the loss is computed on the global batch on every rank;
the loss's parameters stay outside DDP and are averaged after backward. :class:`GlobalBatchLoss`
also holds the optional cross-batch memory (``--memory-bank``). Rank 0 alone evaluates and writes.
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

from daal_triton.distributed import broadcast_params, gather_batch, sync_grads
from daal_triton.core import Hyperparameters
from daal_triton.memory import MemoryBank

from . import ddp
from . import evaluate as E
from .data import DistributedPKSampler, PKSampler, build_datasets
from .ddp import ConfigError
from .model import NO_WEIGHTS_NOTE, EmbeddingNet, default_width

# The DAAL hyperparameters a run sets (``--daal-*``): all of the loss's but the reduction, which
# training fixes to "mean". Their defaults are the loss's own (daal_triton.Hyperparameters).
DAAL_TRAIN_FIELDS = tuple(name for name in Hyperparameters.names() if name != "reduction")


def default_daal() -> Dict[str, Any]:
    defaults = Hyperparameters().as_dict()
    return {name: defaults[name] for name in DAAL_TRAIN_FIELDS}


@dataclass
class TrainConfig:
    """Everything a run needs; ``daal-train --help`` documents each field (same names)."""

    dataset: str = "shapes"
    data_root: Optional[str] = None
    image_size: int = 32
    epochs: int = 12
    steps_per_epoch: Optional[int] = None
    classes_per_batch: int = 12
    samples_per_class: int = 4
    arch: str = "vgg19_bn"
    width: Optional[float] = None  # channel multiplier; None: model.default_width(dataset, weights)
    embedding_dim: int = 512
    weights: Optional[str] = None
    loss: str = "daal"
    daal: Dict[str, Any] = field(default_factory=default_daal)
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    miner: Optional[str] = None  # "pml:<MinerName>", applied to the gathered batch before the loss
    miner_kwargs: Dict[str, Any] = field(default_factory=dict)
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
    memory_bank: int = 0
    dist_backend: str = "auto"
    dist_timeout: float = 60.0
    sync_bn: bool = False

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
        _say(f"--amp {amp} is for GPUs; running in float32 on {device.type}")
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

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None, ref_emb=None,
                ref_labels=None) -> torch.Tensor:
        if ref_emb is not None:
            return self.inner(embeddings.float(), labels, indices_tuple, ref_emb=ref_emb.float(), ref_labels=ref_labels)
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
    return cls(**dict(miner_kwargs or {}))


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
        return daal_triton.DAALLoss(num_classes, embedding_dim, backend=backend, **hp, **kwargs)
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
    """The loss of one batch from its embeddings (one process, no memory bank)."""
    return criterion(embeddings.float(), labels)


class GlobalBatchLoss:
    """The ``loss_fn`` of :func:`train_one_epoch` in every run of the program.

    1. gathers all ranks' embeddings (differentiable) and labels into the global batch
       (:func:`daal_triton.distributed.gather_batch`; the identity in a single process);
    2. computes the loss on the global batch, identical on every rank. With a ``bank``
       (``--memory-bank``), the kNN density's reference set is the global batch followed by the
       bank's rows: ``criterion(emb, labels, ref_emb, ref_labels, ref_includes_batch=True)``;
    3. then enqueues the global batch's detached embeddings, so every rank holds the same bank.

    With a ``miner`` (``--miner``), its tuple of the global batch is passed as ``indices_tuple``.
    """

    def __init__(self, bank: Optional[MemoryBank] = None, miner: Optional[nn.Module] = None) -> None:
        self.bank = bank
        self.miner = miner

    def __call__(self, criterion: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        emb, labs = gather_batch(embeddings, labels)
        emb = emb.float()
        tuples = self.miner(emb, labs) if self.miner is not None else None
        if self.bank is None:
            return criterion(emb, labs, tuples) if tuples is not None else criterion(emb, labs)
        ref, ref_labels = self.bank.with_batch(emb, labs)
        kw = dict(ref_emb=ref, ref_labels=ref_labels, ref_includes_batch=True)  # by name: PML's order has
        loss = criterion(emb, labs, tuples, **kw) if tuples is not None else criterion(emb, labs, **kw)  # indices_tuple 3rd
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


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, *, model: nn.Module, criterion: nn.Module, cfg: TrainConfig, epoch: int,
                    metrics: List[Dict[str, Any]], optimizer=None, scheduler=None, scaler=None,
                    memory_bank: Optional[MemoryBank] = None, world_size: int = 1) -> None:
    """Write a checkpoint atomically (to ``path.tmp``, then rename). ``model`` is the bare network
    (not its DistributedDataParallel wrapper), so checkpoints of any world size load anywhere."""
    state = dict(model=model.state_dict(), loss=criterion.state_dict(), config=cfg.to_dict(),
                 epoch=epoch, metrics=metrics, version=daal_triton.__version__, world_size=world_size)
    if memory_bank is not None:
        state["memory_bank"] = memory_bank.state_dict()
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
    width = default_width(cfg.dataset, cfg.weights) if cfg.width is None else cfg.width
    return EmbeddingNet(cfg.arch, cfg.embedding_dim, weights=cfg.weights, announce=announce, width=width)


def _log(fh, record: Dict[str, Any]) -> None:
    """One metrics.jsonl line (NaN, e.g. a metric undefined on this data, is written as null)."""
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
    fh.write(json.dumps(clean) + "\n")
    fh.flush()


_PREFIX = "[daal-train]"


def _say(msg: str) -> None:
    """A log line, tagged with the rank that wrote it in a distributed run."""
    print(f"{_PREFIX} {msg}", flush=True)


def validate_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Refuse, before any work, what cannot run (:class:`ConfigError`, a ``ValueError``)."""
    if isinstance(cfg.memory_bank, bool) or not isinstance(cfg.memory_bank, int) or cfg.memory_bank < 0:
        raise ConfigError(f"--memory-bank must be an integer >= 0 (0: off), got {cfg.memory_bank!r}")
    if cfg.memory_bank and cfg.loss != "daal":
        raise ConfigError(f"--memory-bank is for --loss daal (its kNN density takes the bank as reference set); "
                          f"--loss {cfg.loss} cannot use it: pytorch-metric-learning's ref_emb does not take "
                          f"the batch as part of the reference set (wrap the loss in its CrossBatchMemory "
                          f"in your own loop instead)")
    if cfg.weights and cfg.width not in (None, 1, 1.0):
        raise ConfigError(f"--weights needs --width 1 (ImageNet weights exist only for torchvision's full-width "
                          f"VGG-19), got --width {cfg.width}")
    if cfg.dist_backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"--dist-backend must be auto, nccl or gloo, got {cfg.dist_backend!r}")
    if world_size > 1 and cfg.classes_per_batch % world_size:
        raise ConfigError(f"--classes-per-batch (P) = {cfg.classes_per_batch} must be divisible by the world size "
                          f"{world_size}: each rank takes P / world_size whole classes of every global batch")


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train and evaluate as ``cfg`` says; write everything under ``cfg.out``; return the final
    table's rows ({method: metrics}; empty on ranks other than 0).

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (see :mod:`daal_triton.train.ddp`),
    trains data-parallel, and destroys the group at the end."""
    global _PREFIX
    validate_config(cfg, ddp.env_world()[1])
    ctx, device = ddp.setup(resolve_device(cfg.device), cfg.dist_backend, cfg.dist_timeout)
    _PREFIX = ctx.prefix
    try:
        return _run(cfg, ctx, device)
    finally:
        ctx.close()
        _PREFIX = "[daal-train]"


def _run(cfg: TrainConfig, ctx: ddp.DistContext, device: torch.device) -> Dict[str, Any]:
    t_start = time.time()
    cpu_start = time.process_time()
    main = ctx.is_main
    validate_config(cfg, ctx.world_size)
    if cfg.sync_bn and ctx.distributed and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    if main:
        os.makedirs(cfg.out, exist_ok=True)
    amp_dtype = resolve_amp(cfg.amp, device)
    seed_everything(cfg.seed)

    train_ds, test_ds = build_datasets(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.seed,
                                       augment=cfg.augment, shapes_train_per_class=cfg.shapes_train_per_class,
                                       shapes_test_per_class=cfg.shapes_test_per_class,
                                       shapes_nuisance=cfg.shapes_nuisance)
    if ctx.distributed:
        try:
            sampler = DistributedPKSampler(train_ds.labels, cfg.classes_per_batch, cfg.samples_per_class,
                                           rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    else:
        sampler = PKSampler(train_ds.labels, cfg.classes_per_batch, cfg.samples_per_class, seed=cfg.seed)
    if main:
        _say(f"{cfg.dataset}: {len(train_ds)} training images of {train_ds.num_classes} classes, "
             f"{len(test_ds)} test images of {test_ds.num_classes} held-out classes; device {device}")
    if ctx.distributed:
        _say(f"joined {ctx.world_size} processes ({ctx.backend}) on {device}: global batch "
             f"{sampler.p}x{sampler.k} = {sampler.global_batch_size}, {sampler.batch_size} images on this rank"
             + ("" if main else "; rank 0 evaluates and writes the outputs"))
    model = build_model(cfg, announce=main and not ctx.distributed).to(device)
    if main and ctx.distributed and not cfg.weights:
        _say(NO_WEIGHTS_NOTE)
    criterion = build_criterion(cfg.loss, train_ds.num_classes, cfg.embedding_dim, daal=cfg.daal,
                                loss_kwargs=cfg.loss_kwargs, backend=_loss_backend(cfg.loss_backend, device)).to(device)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda",
                                         persistent_workers=cfg.num_workers > 0)
    steps = len(sampler) if cfg.steps_per_epoch is None else min(len(sampler), cfg.steps_per_epoch)
    optimizer = make_optimizer(model, criterion, lr=cfg.lr, loss_lr=cfg.loss_lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.epochs * steps, int(round(cfg.warmup_epochs * steps)))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    bank = MemoryBank(cfg.memory_bank, cfg.embedding_dim, device=device) if cfg.memory_bank else None

    history: List[Dict[str, Any]] = []
    start_epoch = 1
    if cfg.resume:  # every rank reads the checkpoint (on several machines: a path they all see)
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
        if "rng" in ck and main:
            torch.set_rng_state(ck["rng"]["torch"])
            np.random.set_state(ck["rng"]["numpy"])
            random.setstate(ck["rng"]["python"])
        if bank is not None:
            saved = ck.get("memory_bank")
            if saved is not None and tuple(saved["embeddings"].shape) == (bank.size, bank.dim):
                bank.load_state_dict(saved)
            elif main:
                _say(f"the checkpoint holds no memory bank of {bank.size} x {bank.dim}; starting an empty one")
        if main:
            _say(f"resumed from {cfg.resume} at epoch {start_epoch}"
                 + (f" with {len(bank)} rows in the memory bank" if bank is not None else ""))

    net: nn.Module = model
    if ctx.distributed:
        broadcast_params(criterion.parameters())  # outside DDP: start every rank from rank 0's segments
        if cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if not main:  # different augmentation draws on every rank (model and segments come from rank 0)
            seed_everything(cfg.seed + 1000003 * ctx.rank)
    elif cfg.sync_bn:
        _say("--sync-bn does nothing in a single process")
    loss_fn = GlobalBatchLoss(bank, build_miner(cfg.miner, cfg.miner_kwargs))

    labels = E.dataset_labels(test_ds)
    modes = test_ds.modes
    fh = None
    if main:
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(dict(cfg.to_dict(), launch=dict(world_size=ctx.world_size, backend=ctx.backend)), f, indent=2)
        fh = open(os.path.join(cfg.out, "metrics.jsonl"), "a" if cfg.resume else "w")
    table: Dict[str, Dict[str, float]] = {}
    emb = None
    epoch = start_epoch - 1
    try:
        def evaluate(epoch: int, name: str, emb: torch.Tensor, extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
            t0 = time.time()
            m = E.all_metrics(emb.to(device), labels.to(device), modes, backend=cfg.knn_backend, seed=cfg.seed)
            rec = dict(epoch=epoch, model=name, **m, **(extra or {}), eval_s=round(time.time() - t0, 2),
                       elapsed_s=round(time.time() - t_start, 2))
            _log(fh, rec)
            history.append(rec)
            return rec

        def embed_test() -> torch.Tensor:  # the bare model: DDP's forward would wait for the other ranks
            return E.embed(model, test_ds, device, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
                           num_workers=cfg.num_workers)

        if main and cfg.baselines and start_epoch == 1:
            t0 = time.time()
            rec = evaluate(0, "raw_pixels", E.pixel_vectors(test_ds))
            table["raw pixels"] = rec
            rec = evaluate(0, "untrained", embed_test(), dict(embed_s=round(time.time() - t0, 2)))
            table["untrained network"] = rec
            _say(f"baselines: raw pixels R@1 {table['raw pixels']['recall@1']:.4f}, "
                 f"untrained network R@1 {rec['recall@1']:.4f} ({time.time() - t0:.1f} s)")
        elif main:
            for rec in history:  # a resumed run keeps its baselines for the final table
                if rec.get("model") == "raw_pixels":
                    table["raw pixels"] = rec
                elif rec.get("model") == "untrained":
                    table["untrained network"] = rec
        ctx.barrier()

        best = max([r["recall@1"] for r in history if r.get("model") == "trained" and "recall@1" in r],
                   default=-1.0)  # epochs without evaluation (--eval-every > 1) have no recall@1
        last_rec: Optional[Dict[str, Any]] = None
        for epoch in range(start_epoch, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            t0 = time.time()
            train_loss = train_one_epoch(net, criterion, loader, optimizer, scheduler, device,
                                         amp_dtype=amp_dtype, scaler=scaler, max_steps=steps,
                                         desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress and main,
                                         loss_fn=loss_fn)
            train_s = time.time() - t0
            if main:
                do_eval = epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0)
                msg = (f"epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f} ({train_s:.1f} s, "
                       f"CPU {time.process_time() - cpu_start:.0f} s so far)")
                if do_eval:
                    emb = embed_test()
                    last_rec = evaluate(epoch, "trained", emb,
                                        dict(train_loss=train_loss, train_s=round(train_s, 2)))
                    msg += "  " + "  ".join(f"{k} {last_rec[k]:.4f}" for k in ("recall@1", "nmi", "map@r")
                                            if k in last_rec)
                else:
                    rec = dict(epoch=epoch, model="trained", train_loss=train_loss, train_s=round(train_s, 2),
                               elapsed_s=round(time.time() - t_start, 2))
                    _log(fh, rec)
                    history.append(rec)
                _say(msg)
                save_checkpoint(os.path.join(cfg.out, "checkpoint_last.pt"), model=model, criterion=criterion,
                                cfg=cfg, epoch=epoch, metrics=history, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, memory_bank=bank, world_size=ctx.world_size)
                if do_eval and last_rec["recall@1"] > best:
                    best = last_rec["recall@1"]
                    save_checkpoint(os.path.join(cfg.out, "checkpoint_best.pt"), model=model, criterion=criterion,
                                    cfg=cfg, epoch=epoch, metrics=history, world_size=ctx.world_size)
            ctx.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
        if main:
            if emb is None:  # nothing trained in this call (resumed at the end): evaluate what we have
                emb = embed_test()
                last_rec = evaluate(epoch, "trained", emb)
            table[f"trained ({cfg.loss}, epoch {epoch})"] = last_rec
    finally:
        if fh is not None:
            fh.close()

    if main:
        _finish(cfg, history, table, emb, labels, test_ds, epoch, t_start, cpu_start)
    else:
        _say(f"done ({time.time() - t_start:.1f} s); rank 0 wrote the outputs to {cfg.out}")
    ctx.barrier()
    return table


def _finish(cfg: TrainConfig, history, table, emb, labels, test_ds, epoch: int, t_start: float,
            cpu_start: float) -> None:
    """Rank 0's end of a run: plots, the final table, results.txt."""
    from . import plots

    try:
        plots.training_curves(history, os.path.join(cfg.out, "training_curves.png"))
    except Exception as e:  # a plot must never lose a finished run
        _say(f"training-curve plot failed: {e}")
    if cfg.tsne:
        t0 = time.time()
        plots.tsne_plot(emb, labels.numpy(), os.path.join(cfg.out, "tsne_test.png"), modes=test_ds.modes,
                        class_names=test_ds.class_names, mode_names=getattr(test_ds, "mode_names", None),
                        max_points=cfg.tsne_max_points, seed=cfg.seed,
                        title=f"{cfg.dataset} test classes, {cfg.arch} + {cfg.loss}, epoch {epoch}")
        _say(f"t-SNE of the test embeddings: {os.path.join(cfg.out, 'tsne_test.png')} ({time.time() - t0:.1f} s)")
    text = E.format_table(table, keys=_table_keys(table))
    total = time.time() - t_start
    text += (f"\n(held-out classes of {cfg.dataset}; wall time {total:.1f} s, process CPU time "
             f"{time.process_time() - cpu_start:.1f} s on {torch.get_num_threads()} threads; outputs in {cfg.out})")
    with open(os.path.join(cfg.out, "results.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


def _table_keys(table: Dict[str, Dict[str, float]]) -> List[str]:
    keys = [f"recall@{k}" for k in E.RECALL_KS] + ["nmi", "map@r", "r_precision", "subcluster_nmi"]
    return [k for k in keys if any(k in r for r in table.values())]


def _loss_backend(name: str, device: torch.device) -> str:
    """DAAL's backend: ``auto`` -> the fused kernels on CUDA, the reference on CPU."""
    if name == "auto":
        return "auto" if device.type == "cuda" else "reference"
    return name
