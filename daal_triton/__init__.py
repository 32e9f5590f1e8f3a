"""daal-triton: the DAAL deep-metric-learning loss, fast on GPUs through Triton.

Public API: :class:`DAALLoss`, :func:`daal_loss`, :func:`knn`, :func:`pairwise_distance`,
:class:`MemoryBank`, :class:`Hyperparameters`, :class:`DAALParts`, :func:`init_segments`, and
:class:`NonFiniteError` (the ``ValueError`` of a value check that finds NaN/inf: a diverged network).
The plain-PyTorch oracle is :mod:`daal_triton.reference`; the kernels are :mod:`daal_triton.kernels`.
"""
from .functional import daal_loss, knn, pairwise_distance
from .loss import DAALLoss, init_segments
from .memory import MemoryBank
from .core import DAALParts, Hyperparameters
from .validation import NonFiniteError

__version__ = "0.1.0"
__all__ = ["DAALLoss", "DAALParts", "Hyperparameters", "MemoryBank", "NonFiniteError", "daal_loss", "init_segments",
           "knn", "pairwise_distance"]
