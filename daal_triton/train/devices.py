"""Where a run computes: the device, mixed precision, which backend of the package's operators
to use there, and the seeds."""
from __future__ import annotations

import os
import random
import shutil
import sys
from typing import Callable, Optional, cast

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
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def resolve_amp(amp: str, device: torch.device, log: Optional[Callable[[str], None]] = None) -> Optional[torch.dtype]:
    """The autocast dtype of the network's forward, or None (float32).

    ``auto`` (the default) -> bf16 on CUDA (float32 where the GPU has no bf16, with a note), float32
    on the CPU; ``bf16``/``fp16`` -> that dtype on CUDA (on the CPU: float32, with a note to ``log``);
    ``none`` -> float32 everywhere. bf16 needs no gradient scaler; fp16 gets one (run.py). The loss
    itself always computes in float32 (it turns autocast off inside)."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if amp == "none":
        return None
    if device.type != "cuda":
        if log is not None and amp != "auto":
            log(f"--amp {amp} is for GPUs; running in float32 on {device.type}")
        return None
    if amp == "auto":
        # the run's own GPU, and its hardware: torch.cuda.is_bf16_supported() asks the current
        # device and answers True where bfloat16 is only emulated (a V100, a T4: slow, and cuDNN
        # has no bfloat16 convolutions there)
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            if log is not None:
                log(f"--amp auto: this GPU (sm_{major}{minor}) has no bfloat16; running in float32 "
                    "(--amp fp16 for mixed precision)")
            return None
        return torch.bfloat16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def use_channels_last(setting: Optional[bool], device: torch.device) -> bool:
    """``--channels-last``: None (auto) -> on CUDA only (cuDNN's fast convolutions, bf16 tensor
    cores, take NHWC); on the CPU the default stays the contiguous layout (the CPU results of the
    default run stay what they were)."""
    return device.type == "cuda" if setting is None else bool(setting)


def place_model(model: torch.nn.Module, device: torch.device, channels_last: Optional[bool] = None) -> torch.nn.Module:
    """``model`` moved to ``device``, its 4-d weights in channels_last where
    :func:`use_channels_last` says so (the step then feeds it channels_last images)."""
    if use_channels_last(channels_last, device):
        # torch's stubs list the two keywords in separate overloads; Module.to takes them together
        return model.to(device=device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model.to(device)


def input_memory_format(model: torch.nn.Module) -> torch.memory_format:
    """The layout to give ``model``'s input images: channels_last when its first 4-d weight is
    (:func:`place_model`), else the contiguous layout. Works through DDP and torch.compile
    wrappers (they share the parameters)."""
    for p in model.parameters():
        if p.ndim == 4:
            if p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
                return torch.channels_last
            break
    return torch.contiguous_format


def prepare_device(device: torch.device) -> None:
    """Process-wide settings of a training run on ``device``: on CUDA, cuDNN picks the fastest
    convolution algorithm for the (fixed) batch shape (``cudnn.benchmark``, as the training-step
    benchmark does). Nothing on the CPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def loader_options(num_workers: Optional[int], device: torch.device, *, persistent: bool = True) -> dict:
    """DataLoader keywords for ``--num-workers`` on ``device``.

    ``None`` (auto) -> ``min(8, CPUs available)`` worker processes on CUDA, so that decoding and
    augmentation run beside the GPU (the CPUs shared among torchrun's ``LOCAL_WORLD_SIZE``
    processes of the machine), 0 on the CPU (there the workers would take cores from the step; the
    default CPU run is unchanged). On CUDA batches go to pinned memory (asynchronous
    ``non_blocking`` copies); with workers, each keeps 4 batches ready (``prefetch_factor``) and,
    with ``persistent``, lives for the whole run."""
    if num_workers is None:
        given = os.environ.get("LOCAL_WORLD_SIZE", "1")
        local_world = max(1, int(given)) if given.isdigit() else 1
        num_workers = min(8, max(1, available_cpus() // local_world)) if device.type == "cuda" else 0
    opts = dict(num_workers=int(num_workers), pin_memory=device.type == "cuda")
    if num_workers > 0:
        opts.update(persistent_workers=persistent, prefetch_factor=4)
    return opts


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def check_compile(device: torch.device) -> None:
    """``--compile``: raise ``RuntimeError`` saying why torch.compile (inductor) cannot work here:
    no TorchDynamo for this Python, no Triton for a CUDA device, no C++ compiler for the CPU."""
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"--compile needs torch >= 2.0 (this is {torch.__version__})")
    import torch._dynamo as dynamo  # binds only ``dynamo`` (a bare ``import torch._dynamo`` would shadow torch)

    if not dynamo.is_dynamo_supported():
        raise RuntimeError(f"--compile: torch.compile does not support Python {sys.version.split()[0]} "
                           f"with torch {torch.__version__}")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise RuntimeError("--compile on CUDA needs Triton (torch.compile's inductor generates Triton "
                               "kernels); install triton or drop --compile") from None
    elif not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        raise RuntimeError("--compile on the CPU needs a C++ compiler (g++ or clang++) for torch.compile's "
                           "inductor; install one or drop --compile")


def compile_network(net: torch.nn.Module) -> torch.nn.Module:
    """``--compile``: ``torch.compile(net)`` (default mode). The parameters stay those of ``net``
    (the bare network is what is evaluated and saved). The loss is not compiled: its custom
    operators already trace, and it runs outside the compiled graph."""
    return cast(torch.nn.Module, torch.compile(net))  # an OptimizedModule, typed as a callable


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
