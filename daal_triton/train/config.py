"""A run's configuration (:class:`TrainConfig`, one field per ``daal-train`` flag) and the checks
that refuse, before any work, what cannot run."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

from daal_triton.core import Hyperparameters

from .ddp import ConfigError

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
    amp: str = "none"
    device: str = "auto"
    seed: int = 0
    out: str = "runs/shapes"
    overwrite: bool = False
    save: str = "both"
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


SAVE_CHOICES = ("both", "last", "best", "none")


def validate_config(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Refuse what cannot run (:class:`ConfigError`, a ``ValueError``), in a world of
    ``world_size`` processes on ``device``."""
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
