"""daal-triton: the DAAL deep-metric-learning loss, fast on GPUs through Triton.

Public API: :class:`DAALLoss`, :func:`daal_loss`, :func:`knn`, :func:`pairwise_distance`,
:class:`MemoryBank`, :class:`Hyperparameters`, :class:`DAALParts`, :func:`init_segments`, and
:class:`NonFiniteError` (the ``ValueError`` of a value check that finds NaN/inf: a diverged network).
The plain-PyTorch oracle is :mod:`daal_triton.reference`; the kernels are :mod:`daal_triton.kernels`.

The names are loaded on first use (PEP 562): ``import daal_triton`` alone does not import torch, so
that the console scripts (``daal_triton.train.console``) hold a Ctrl-C during torch's import, which
an interrupt could otherwise leave half-done (numpy without its attributes, a lost interrupt).
"""
import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {"daal_loss": "functional", "knn": "functional", "pairwise_distance": "functional",
            "DAALLoss": "loss", "init_segments": "loss", "MemoryBank": "memory", "DAALParts": "core",
            "Hyperparameters": "core", "NonFiniteError": "validation"}
_SUBMODULES = ("backend", "core", "distributed", "functional", "kernels", "launch_count", "loss", "memory",
               "reference", "train", "validation")

if TYPE_CHECKING:  # what type checkers and IDEs see (py.typed marks the package as typed)
    from . import backend, core, distributed, functional, kernels, launch_count, loss, memory, reference, validation
    from .core import DAALParts, Hyperparameters
    from .functional import daal_loss, knn, pairwise_distance
    from .loss import DAALLoss, init_segments
    from .memory import MemoryBank
    from .validation import NonFiniteError


def _check_subpackages() -> None:
    """``kernels/`` and ``reference/`` sit at the repository's top and install *inside* the package
    (setup.py's ``package_dir``); the source folder ``daal_triton/`` alone lacks them. With a
    non-editable install, ``python -m ...``, ``python -c`` or a script run from a clone's root
    imported that folder (the current directory comes first on ``sys.path``) and failed later
    with "No module named 'daal_triton.reference'"."""
    from importlib.util import find_spec

    if find_spec(f"{__name__}.reference") is None:
        raise ImportError(
            f"daal_triton was imported from {__path__[0]}, a source folder without the subpackages "
            "kernels/ and reference/ (they install inside the package): the current directory, a "
            "clone of daal-triton, hides the installed package. Run from another directory, or "
            "install the clone with `pip install -e .`")


_check_subpackages()

__all__ = ["DAALLoss", "DAALParts", "Hyperparameters", "MemoryBank", "NonFiniteError", "daal_loss", "init_segments",
           "knn", "pairwise_distance"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
