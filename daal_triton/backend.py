"""Which implementation runs: ``"triton"`` (the fused kernels) or ``"reference"`` (plain PyTorch).

``"auto"`` picks Triton for tensors on an NVIDIA GPU of compute capability 8.0 or later (Ampere,
the oldest Triton supports), and for CPU tensors when ``TRITON_INTERPRET=1`` (Triton's
interpreter, used by the tests), and the reference otherwise. A forced ``"triton"`` also runs on
sm_70/sm_75 GPUs (Volta, Turing: the kernels are built for them by the tests, never run there);
where it cannot run it raises a ``ValueError`` that says why.
"""
from __future__ import annotations

import importlib.util
import os
import re

import torch

BACKENDS = ("auto", "triton", "reference")


# Looked up once, without importing triton (TRITON_INTERPRET must be set before that import).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

#: The oldest Triton the kernels run on: 3.5 (torch 2.9's) first has the modules they import
#: (``triton.experimental.gluon``, ``triton.language.target_info``). torch 2.4-2.8 bring 3.0-3.4:
#: with those, ``"auto"`` runs the reference. The suite runs with 3.6 and 3.8.
MIN_TRITON = (3, 5)


def read_triton_version() -> tuple[int, int] | None:
    """The installed Triton's (major, minor), read from its distribution's metadata without
    importing it; ``None`` when it cannot be read (a build from source: then it is trusted)."""
    return read_version(("triton", "pytorch-triton"))


def read_version(dists: tuple[str, ...]) -> tuple[int, int] | None:
    """The (major, minor) of the first installed distribution of ``dists``, from its metadata
    (nothing imported); ``None`` when none is installed or its version cannot be read."""
    from importlib import metadata

    for dist in dists:
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        match = re.match(r"(\d+)\.(\d+)", version)
        return (int(match[1]), int(match[2])) if match else None
    return None


#: Read once, here: reading it takes ~150 µs, and every call of the loss asks (as a constant,
#: ``torch.compile`` traces nothing of it).
TRITON_VERSION = read_triton_version() if _TRITON_INSTALLED else None

#: Triton's interpreter before 3.7 takes a loop bound as ``int()`` of a one-element array, which
#: NumPy 2.4 and later refuse ("only 0-dimensional arrays can be converted to Python scalars"):
#: every kernel fails there. Triton 3.7 fixed it. Only the CPU interpreter is concerned.
INTERPRETER_NUMPY_FIX = (3, 7)
NUMPY_REFUSES = (2, 4)
NUMPY_VERSION = read_version(("numpy",))


def triton_available() -> bool:
    return _TRITON_INSTALLED


#: The values of ``TRITON_INTERPRET`` that turn Triton's interpreter on, as Triton (3.4 and later,
#: ``triton.knobs``) reads them, case aside: ``0``, ``false``, ``off``, ``no`` and anything else are off.
INTERPRET_ON = ("1", "true", "on", "yes", "y")


def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in INTERPRET_ON


_interpreter_ready = False


def interpreter_set_too_late() -> bool:
    """``TRITON_INTERPRET=1`` is set now, but triton was imported without it: its own library
    functions (``tl.sum``, ...) were then built for a GPU and fail inside the interpreter with
    "Cannot call @triton.jit'd outside of the scope of a kernel". Imports triton (the caller is
    about to run it on the CPU); a good answer is remembered."""
    global _interpreter_ready
    if _interpreter_ready:
        return False
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction
    library_fn = getattr(standard, "zeros_like", None)
    if library_fn is not None and not isinstance(library_fn, InterpretedFunction):
        return True
    _interpreter_ready = True
    return False


#: The oldest NVIDIA GPUs ``"auto"`` runs the kernels on: sm_80 (Ampere), the oldest Triton supports.
AUTO_CAPABILITY = (8, 0)
#: The oldest the kernels build for (sm_70, Volta; tests/kernels/test_kernel_launched_builds.py):
#: a forced ``"triton"`` runs there. Older GPUs lack instructions they use (ptxas refuses them).
MIN_CAPABILITY = (7, 0)


def _gpu_reason(device: torch.device, forced: bool) -> str:
    """Why the kernels do not run on the CUDA ``device`` (``forced``: for ``backend="triton"``)."""
    if getattr(torch.version, "hip", None):
        return ("ROCm GPUs run the reference backend (the kernels are written and built for NVIDIA GPUs: "
                "inline PTX, 3xTF32 dots)")
    from .kernels._common import device_capability  # imports triton: on a GPU, the kernels' next step

    cap = device_capability(device)
    sm = f"sm_{cap[0]}{cap[1]}"
    if cap < MIN_CAPABILITY:
        return (f"the GPU is {sm}; the kernels need sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or later "
                "(instructions older GPUs lack)")
    if cap < AUTO_CAPABILITY and not forced:
        return (f"the GPU is {sm}: backend='auto' runs the kernels on sm_{AUTO_CAPABILITY[0]}{AUTO_CAPABILITY[1]} "
                "or later (Triton's supported GPUs); backend='triton' runs them here too (built for sm_70+, "
                "float32 dots without TF32)")
    return ""


#: torch.compile traces the functorch query below from torch 2.5 on (checked: 2.5.1, 2.6.0, 2.7.1,
#: 2.8, 2.9 and later); torch 2.4's refuses it ("torch.* op returned non-Tensor bool"), which broke
#: ``torch.compile(fullgraph=True)`` of the reference there.
TRACES_FUNCTORCH_QUERY = (2, 5)
TORCH_VERSION = read_version(("torch",))


def _functorch_active() -> bool:
    """Whether a ``torch.func`` transform is active (the kernels cannot run inside one); False
    while torch.compile traces on a torch that cannot trace the query."""
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    if check is None:
        return False
    if (TORCH_VERSION is not None and TORCH_VERSION < TRACES_FUNCTORCH_QUERY
            and torch.compiler.is_compiling()):
        return False
    return bool(check())


def _forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (dual tensors exist only there):
    the kernels' operators have no forward-mode formula."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def _vmap_active() -> bool:
    """Whether a ``torch.func.vmap`` is running (alone or inside another transform)."""
    if not _functorch_active():
        return False
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())
    except (ImportError, AttributeError):  # pragma: no cover - a torch without these internals
        return False


def refuse_vmap(function: str, why: str = "its checks and the kNN selection are data-dependent") -> None:
    """``NotImplementedError`` inside ``torch.func.vmap``: the value checks and the kNN's selection
    read values, which vmap forbids, and the reference's masks are written in place; a batch of
    problems is a loop (``torch.stack([f(e) for e in batch])``). ``grad``/``vjp``/``jacrev`` run
    on the reference. ``why``: what in ``function`` reads values."""
    if _vmap_active():
        raise NotImplementedError(f"{function} cannot run under torch.func.vmap ({why}), which jacfwd and "
                                  "hessian use too: call it once per problem in a loop, torch.stack([... for ... in "
                                  "batch]); torch.func.grad, vjp and jacrev work (a Hessian: jacrev(jacrev(f)), or "
                                  "torch.autograd.functional.hessian with backend='reference': the Triton backward "
                                  "has no second derivative)")


#: What TorchScript gets instead of a wrong graph (a machinery probe, 2026-12-07: ``torch.jit.script``
#: failed on ``**kwargs`` deep inside, ``torch.jit.trace`` turned a size into a tensor the Triton
#: launch took for a pointer, and a trace of the reference dropped the value checks silently).
TORCHSCRIPT_REFUSAL = ("{what} cannot be compiled by TorchScript (torch.jit.script / torch.jit.trace): its checks, "
                       "backend choice and kernel launches are Python that TorchScript would drop or misread; "
                       "torch.compile and torch.export.export take it on both backends")


def refuse_torchscript(function: str) -> None:
    """``NotImplementedError`` while ``torch.jit.trace`` records (see :data:`TORCHSCRIPT_REFUSAL`)."""
    if torch.jit.is_tracing():
        raise NotImplementedError(TORCHSCRIPT_REFUSAL.format(what=function))


def triton_reason(device: torch.device, dtype: torch.dtype = torch.float32, *, forced: bool = False,
                  own_dots: bool = False) -> str:
    """Why Triton does not run on ``device`` for ``dtype`` inputs (empty when it does); ``forced``:
    why ``backend="triton"`` cannot (a GPU older than sm_80 runs it only then); ``own_dots``: the
    kernels take dots of the inputs in their own dtype (``knn``, ``pairwise_distance``; the loss
    computes in float32), which Triton's interpreter cannot do in bfloat16."""
    if dtype == torch.float64:
        return "float64 inputs run on the reference backend (the kernels compute in float32)"
    if _functorch_active():
        return ("torch.func transforms (grad, vjp, jacrev, vmap, ...) run on the reference backend (the "
                "kernels read the tensors' storage, which a transform's wrapped tensors do not expose)")
    if _forward_ad_active():
        return ("forward-mode AD (torch.autograd.forward_ad) runs on the reference backend (the kernels "
                "have no forward-mode formula)")
    if not triton_available():
        return "triton is not installed"
    version = TRITON_VERSION
    if version is not None and version < MIN_TRITON:
        return (f"triton {version[0]}.{version[1]} is installed; the kernels need Triton "
                f"{MIN_TRITON[0]}.{MIN_TRITON[1]} or later (torch 2.9 and later bring it)")
    if device.type == "cuda":
        return _gpu_reason(device, forced)
    if device.type == "cpu" and interpreter_on():
        if interpreter_set_too_late():
            return (f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} is set but Triton's interpreter is "
                    "not active: it is chosen when triton is imported, so set TRITON_INTERPRET=1 before "
                    "importing triton (or daal_triton)")
        if (TRITON_VERSION is not None and TRITON_VERSION < INTERPRETER_NUMPY_FIX and NUMPY_VERSION is not None
                and NUMPY_VERSION >= NUMPY_REFUSES):
            return (f"Triton {TRITON_VERSION[0]}.{TRITON_VERSION[1]}'s interpreter fails with NumPy "
                    f"{NUMPY_VERSION[0]}.{NUMPY_VERSION[1]} (NumPy 2.4 and later; Triton 3.7 fixed it): install "
                    "'numpy<2.4' or Triton 3.7 or later to run the kernels on the CPU")
        if own_dots and dtype == torch.bfloat16:
            return ("Triton's interpreter cannot run bfloat16 dots (it returned wrong distances): bfloat16 "
                    "inputs on the CPU run on the reference backend (on a GPU, the kernels)")
        return ""
    return (f"tensors are on {device.type!r}: Triton runs CUDA tensors, or CPU tensors under "
            "TRITON_INTERPRET=1 set before triton is imported")


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, *,
                   own_dots: bool = False) -> str:
    """Resolve ``backend`` (``"auto"``, ``"triton"`` or ``"reference"``) for ``dtype`` tensors on
    ``device`` (``own_dots``: see :func:`triton_reason`). Float64 always runs on the reference: the
    kernels would lower its precision."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = triton_reason(device, dtype, forced=backend == "triton", own_dots=own_dots)
    if backend == "triton" and reason:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    return "reference" if reason else "triton"
