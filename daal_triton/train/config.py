"""A run's configuration (:class:`TrainConfig`, one field per ``daal-train`` flag) and the checks
that refuse, before any work, what cannot run."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from daal_triton.core import Hyperparameters

from .ddp import ConfigError
from .devices import AMP_CHOICES, check_compile, resolve_device

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
    epochs: int = 5
    steps_per_epoch: Optional[int] = None
    classes_per_batch: int = 12
    samples_per_class: int = 4
    arch: str = "vgg19_bn"
    embedding_dim: int = 512
    weights: Optional[str] = None
    loss: str = "daal"
    daal: Dict[str, Any] = field(default_factory=default_daal)
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss_backend: str = "auto"
    lr: float = 1e-3
    loss_lr: float = 5e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/shapes"
    overwrite: bool = False
    save: str = "both"
    resume: Optional[str] = None
    eval_every: int = 1
    eval_batch_size: int = 128
    num_workers: Optional[int] = None  # None: auto (devices.loader_options)
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
    channels_last: Optional[bool] = None  # None: auto (on CUDA)
    compile: bool = False
    log_every: int = 50

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


SAVE_CHOICES = ("both", "last", "best", "none")


# VGG's five 2x2 max-poolings need at least 2**5 pixels a side.
MIN_IMAGE_SIZE = 32


def validate_config(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Refuse what cannot run or would mean nothing (:class:`ConfigError`, a ``ValueError``), in
    a world of ``world_size`` processes on ``device``. Reads no data and writes nothing."""
    _check_numbers(cfg)
    _check_loss(cfg)
    for flag, backend in (("--knn-backend", cfg.knn_backend), ("--loss-backend", cfg.loss_backend)):
        check_backend(flag, backend, device)
    if cfg.weights and not os.path.isfile(cfg.weights):
        raise ConfigError(f"--weights {cfg.weights}: no such file (expected a torchvision VGG state dict, e.g. "
                          f"vgg19_bn-c79401a0.pth; the program never downloads weights)")
    if isinstance(cfg.memory_bank, bool) or not isinstance(cfg.memory_bank, int) or cfg.memory_bank < 0:
        raise ConfigError(f"--memory-bank must be an integer >= 0 (0: off), got {cfg.memory_bank!r}")
    if cfg.memory_bank and cfg.loss != "daal":
        raise ConfigError(f"--memory-bank is for --loss daal (its kNN density takes the bank as reference set); "
                          f"--loss {cfg.loss} cannot use it: pytorch-metric-learning's ref_emb does not take "
                          f"the batch as part of the reference set (wrap the loss in its CrossBatchMemory "
                          f"in your own loop instead)")
    if cfg.save not in SAVE_CHOICES:
        raise ConfigError(f"--save must be one of {', '.join(SAVE_CHOICES)}, got {cfg.save!r}")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite replaces the run in --out, --resume continues it: give one of them")
    if cfg.dist_backend not in ("auto", "nccl", "gloo"):
        raise ConfigError(f"--dist-backend must be auto, nccl or gloo, got {cfg.dist_backend!r}")
    if world_size > 1 and cfg.classes_per_batch % world_size:
        raise ConfigError(f"--classes-per-batch (P) = {cfg.classes_per_batch} must be divisible by the world size "
                          f"{world_size}: each rank takes P / world_size whole classes of every global batch")
    if cfg.sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    if cfg.amp not in AMP_CHOICES:
        raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
    if cfg.compile:
        try:
            check_compile(device)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None


# (flag, field, lowest allowed value, whether that value itself is allowed)
_BOUNDS = (
    ("--epochs", "epochs", 1, True), ("--steps-per-epoch", "steps_per_epoch", 1, True),
    ("--classes-per-batch", "classes_per_batch", 1, True), ("--samples-per-class", "samples_per_class", 1, True),
    ("--image-size", "image_size", MIN_IMAGE_SIZE, True), ("--embedding-dim", "embedding_dim", 1, True),
    ("--lr", "lr", 0.0, False), ("--loss-lr", "loss_lr", 0.0, True), ("--weight-decay", "weight_decay", 0.0, True),
    ("--warmup-epochs", "warmup_epochs", 0.0, True), ("--eval-every", "eval_every", 0, True),
    ("--eval-batch-size", "eval_batch_size", 1, True), ("--num-workers", "num_workers", 0, True),
    ("--shapes-train-per-class", "shapes_train_per_class", 1, True),
    ("--shapes-test-per-class", "shapes_test_per_class", 1, True),
    ("--shapes-nuisance", "shapes_nuisance", 0.0, True), ("--tsne-max-points", "tsne_max_points", 2, True),
    ("--dist-timeout", "dist_timeout", 0.0, False), ("--log-every", "log_every", 1, True),
)


def _check_numbers(cfg: TrainConfig) -> None:
    for flag, name, low, inclusive in _BOUNDS:
        value = getattr(cfg, name)
        if value is None and name in ("steps_per_epoch", "num_workers"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value!r}")
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            why = " (VGG's five poolings need 32 pixels a side)" if name == "image_size" else ""
            raise ConfigError(f"{flag} must be {bound}{why}, got {value}")


def _check_loss(cfg: TrainConfig) -> None:
    """``--loss``, ``--loss-kwargs`` and the DAAL hyperparameters, as far as they can be checked
    without building the loss."""
    if not isinstance(cfg.loss_kwargs, dict):
        raise ConfigError(f"--loss-kwargs must be a JSON object ({{\"name\": value, ...}}), got {cfg.loss_kwargs!r}")
    if cfg.loss == "daal":
        try:
            Hyperparameters(**dict(default_daal(), **cfg.daal))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"DAAL hyperparameters (--daal-*): {e}") from None
        return
    if not cfg.loss.startswith("pml:") or not cfg.loss[4:]:
        raise ConfigError(f"--loss must be 'daal' or 'pml:<LossName>', got {cfg.loss!r}")
    try:
        from pytorch_metric_learning import losses as pml_losses
    except ImportError:
        raise ConfigError(f"--loss {cfg.loss} needs pytorch-metric-learning: pip install 'daal-triton[pml]'") from None
    if not isinstance(getattr(pml_losses, cfg.loss[4:], None), type):
        raise ConfigError(f"--loss {cfg.loss}: pytorch_metric_learning.losses has no loss named {cfg.loss[4:]!r}")


def checked_device(name: str) -> torch.device:
    """``--device`` resolved (:func:`~daal_triton.train.devices.resolve_device`), or :class:`ConfigError`."""
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None


def check_backend(flag: str, backend: str, device: torch.device) -> None:
    """The Triton backends run on CUDA devices; on the CPU Triton has only its interpreter."""
    if backend == "triton" and device.type != "cuda":
        raise ConfigError(f"{flag} triton needs a CUDA device, and this run uses {device.type} "
                          f"(use auto or reference)")


def check_out(cfg: TrainConfig) -> None:
    """Refuse to write a new run into a folder that holds something, unless ``--resume`` (continue
    the run there) or ``--overwrite`` (replace it) says what to do with it."""
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if cfg.resume or cfg.overwrite or not os.path.isdir(out):
        return
    held = sorted(os.listdir(out))
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        last = os.path.join(out, "checkpoint_last.pt")
        raise ConfigError(f"--out {out} is not empty ({shown}): pass --resume {last} to continue that run, "
                          f"--overwrite to replace it, or another --out")
