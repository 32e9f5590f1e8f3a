"""Checkpoints: what a run saves (``checkpoint_last.pt``, ``checkpoint_best.pt``) and loads
(``--resume``, ``daal-eval``)."""
from __future__ import annotations

import os
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn

import daal_triton
from daal_triton.memory import MemoryBank

from .config import TrainConfig


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


def restore_rng(rng: Dict[str, Any]) -> None:
    """Set the torch, numpy and Python generators to a checkpoint's ``rng`` states."""
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
