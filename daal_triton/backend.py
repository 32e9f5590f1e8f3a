"""Which implementation runs: ``"triton"`` (the fused kernels) or ``"reference"`` (plain PyTorch).

``"auto"`` picks Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the tests), and the reference otherwise. A forced ``"triton"`` that cannot run
raises a ``ValueError`` that says why.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_reason(device: torch.device) -> str:
    """Why Triton cannot run on ``device`` (empty when it can)."""
    if not triton_available():
        return "triton is not installed"
    if device.type == "cuda":
        return ""
    if device.type == "cpu" and interpreter_on():
        return ""
    return (f"tensors are on {device.type!r}: Triton runs CUDA tensors, or CPU tensors under "
            "TRITON_INTERPRET=1 set before triton is imported")


def choose_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` (``"auto"``, ``"triton"`` or ``"reference"``) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = triton_reason(device)
    if backend == "triton" and reason:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    return "reference" if reason else "triton"
