"""Where a run computes: the device, mixed precision, which backend of the package's operators
to use there, and the seeds."""
from __future__ import annotations

import random
from typing import Callable, Optional

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device, log: Optional[Callable[[str], None]] = None) -> Optional[torch.dtype]:
    """``bf16``/``fp16`` autocast dtype on CUDA; ``none`` (or any AMP on CPU, with a note to
    ``log``) -> None."""
    if amp not in ("none", "bf16", "fp16"):
        raise ValueError(f"--amp must be none, bf16 or fp16, got {amp!r}")
    if amp == "none":
        return None
    if device.type != "cuda":
        if log is not None:
            log(f"--amp {amp} is for GPUs; running in float32 on {device.type}")
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend of :func:`daal_triton.knn` and of DAAL's loss for ``--knn-backend`` /
    ``--loss-backend``: ``auto`` -> the fused Triton kernels on CUDA, the PyTorch reference on
    the CPU (there Triton only has its interpreter, a testing tool far too slow for training or
    a whole test set); an explicit choice is kept."""
    if name == "auto":
        return "auto" if device.type == "cuda" else "reference"
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
