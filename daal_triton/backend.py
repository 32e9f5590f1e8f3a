"""Which implementation runs: ``"triton"`` (the fused kernels) or ``"reference"`` (plain PyTorch).

``"auto"`` picks Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the tests), and the reference otherwise. A forced ``"triton"`` that cannot run
raises a ``ValueError`` that says why.
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")


# Looked up once, without importing triton (TRITON_INTERPRET must be set before that import).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_reason(device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Why Triton cannot run on ``device`` for ``dtype`` inputs (empty when it can)."""
    if dtype == torch.float64:
        return "float64 inputs run on the reference backend (the kernels compute in float32)"
    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return ""
    if device.type == "cpu" and interpreter_on():
        return ""
    return (f"tensors are on {device.type!r}: Triton runs CUDA tensors, or CPU tensors under "
            "TRITON_INTERPRET=1 set before triton is imported")


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """Resolve ``backend`` (``"auto"``, ``"triton"`` or ``"reference"``) for ``dtype`` tensors on
    ``device``. Float64 always runs on the reference: the kernels would lower its precision."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = triton_reason(device, dtype)
    if backend == "triton" and reason:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    return "reference" if reason else "triton"
