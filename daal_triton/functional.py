"""The functional API: validate, pick a backend, run the loss composition (``daal_triton.core``).

The Triton backend plugs its fused operators into the composition (``daal_triton.kernels``:
``normalize``, ``knn``, ``density``, ``line_margin``, ``combine``); the reference backend plugs in
the plain-PyTorch operators of ``daal_triton.reference``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Optional, Tuple, TypedDict, Union, overload

import torch

from . import reference
from .backend import choose_backend, refuse_torchscript, refuse_vmap
from .core import DAALParts, Hyperparameters, Operators, _no_autocast, _on_device, compose
from .validation import (
    check_flag,
    check_float_matrix,
    check_same_device,
    distance_rows,
    validate_knn_inputs,
    validate_loss_inputs,
    value_checks_on,
)

if TYPE_CHECKING:  # PEP 692's ``**options: Unpack[...]`` (typing has it from Python 3.11; read by checkers only)
    from typing_extensions import Unpack


#: Environment switch of the Triton backend's glue (internal; the GPU runs decided for "fused",
#: bench/README.md "Switches decided"; "aten" stays selectable, no longer timed):
#: "fused" (default: the fused prepare / density / combine kernels) or "aten" (the reference's
#: PyTorch step functions around the fused kNN and line margin, the design before issue 13).
GLUE_ENV = "DAAL_GLUE"
GLUE_POLICIES = ("fused", "aten")


def _ops(backend: str) -> Operators:
    """The operators of a resolved backend (``ValueError`` naming ``DAAL_GLUE`` for a value not in
    :data:`GLUE_POLICIES`, as the kernels' switches do)."""
    if backend == "triton":
        from .kernels._common import env_choice

        glue = env_choice(GLUE_ENV, GLUE_POLICIES)
    if backend == "triton" and glue == "aten":
        from .kernels import knn, line_margin

        return Operators(knn=knn.knn, line_margin=line_margin.line_margin)
    if backend == "triton":
        from .kernels import combine, density, knn, line_margin, normalize

        def fused_density(dist, index, labels, num_classes, **hp):
            fn = density.density if dist.shape[1] <= density.MAX_K else reference.density
            return fn(dist, index, labels, num_classes, **hp)

        return Operators(knn=knn.knn, line_margin=line_margin.line_margin, prepare=normalize.prepare,
                         density=fused_density, combine=combine.combine)
    return Operators()


class LossOptions(TypedDict, total=False):
    """The keyword arguments of :func:`daal_loss` other than ``return_parts``, for the type of
    its overloads (a ``return_parts=True`` call returns :class:`DAALParts`, any other a tensor)."""

    k: int
    m0: float
    m_min: float
    m_max: float
    gamma: float
    alpha: float
    tau: float
    lambda_pull: float
    lambda_dens: float
    lambda_len: float
    l_max: float
    normalize: bool
    reduction: str
    ref_embeddings: Optional[torch.Tensor]
    ref_labels: Optional[torch.Tensor]
    ref_includes_batch: bool
    backend: str
    check_values: Optional[bool]


@overload
def daal_loss(embeddings: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor, *,
              return_parts: Literal[False] = False, **options: Unpack[LossOptions]) -> torch.Tensor: ...


@overload
def daal_loss(embeddings: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor, *,
              return_parts: Literal[True], **options: Unpack[LossOptions]) -> DAALParts: ...


@overload
def daal_loss(embeddings: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor, *,
              return_parts: bool, **options: Unpack[LossOptions]) -> Union[torch.Tensor, DAALParts]: ...


def daal_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    *,
    k: int = 3,
    m0: float = 0.2,
    m_min: float = 0.05,
    m_max: float = 0.5,
    gamma: float = 1.0,
    alpha: float = 16.0,
    tau: float = 0.8,
    lambda_pull: float = 0.0,
    lambda_dens: float = 0.5,
    lambda_len: float = 0.0,
    l_max: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    return_parts: bool = False,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    ref_includes_batch: bool = False,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> Union[torch.Tensor, DAALParts]:
    """DAAL loss (docs/method.md). ``embeddings`` B x D, ``labels`` B ints in [0, C), ``segments`` C x 2 x D.

    Returns a scalar (``reduction="mean"``) or B per-sample values (``"none"``) in the promotion
    of the embeddings', segments' and ``ref_embeddings``' dtypes, raised to float32 at least
    (float16/bfloat16 inputs give float32, a float64 one float64), or a
    :class:`daal_triton.DAALParts` with ``return_parts=True``.

    ``ref_embeddings``/``ref_labels`` (a memory bank): the kNN radius of each sample is taken over
    the reference rows of its class instead of the other batch rows. Nothing is excluded there,
    unless ``ref_includes_batch=True``, which says that ``ref_embeddings[:B]`` are the batch's own
    rows (e.g. ``torch.cat([embeddings, bank])``): then row ``i`` is not its own neighbour.

    ``check_values``: the value checks (NaN/inf in the tensors, labels in ``[0, C)``) run on CPU
    tensors (not while ``torch.compile`` traces). On a GPU they would synchronise the host with it
    on every call, so they run only when ``check_values=True`` or ``DAAL_CHECK_VALUES=1``; without
    them a label outside ``[0, C)`` gives that sample a NaN loss, never an out-of-bounds access,
    and NaN/inf in the tensors makes the loss NaN.
    """
    hp = Hyperparameters(k=k, m0=m0, m_min=m_min, m_max=m_max, gamma=gamma, alpha=alpha, tau=tau,
                         lambda_pull=lambda_pull, lambda_dens=lambda_dens, lambda_len=lambda_len,
                         l_max=l_max, normalize=normalize, reduction=reduction)
    return loss_with(embeddings, labels, segments, hp, return_parts=return_parts,
                     ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                     ref_includes_batch=ref_includes_batch, backend=backend,
                     check_values=check_values)


def _beside(labels, embeddings):
    """``labels`` on the embeddings' device, as pytorch-metric-learning's losses take them (CPU
    labels beside CUDA embeddings: one copy, the miner's indices too). Labels on the meta device
    have no values to move, and anything that is not two tensors is left to the validation."""
    if (isinstance(labels, torch.Tensor) and isinstance(embeddings, torch.Tensor)
            and labels.device != embeddings.device and labels.device.type != "meta"):
        return labels.to(embeddings.device)
    return labels


def inputs_dtype(embeddings: torch.Tensor, segments: torch.Tensor,
                 ref_embeddings: Optional[torch.Tensor] = None) -> torch.dtype:
    """The promoted dtype of the loss's float inputs: a float64 reference set (memory bank)
    makes it float64, never cast down (docs/method.md, "Precision")."""
    dtype = torch.promote_types(embeddings.dtype, segments.dtype)
    if isinstance(ref_embeddings, torch.Tensor):
        dtype = torch.promote_types(dtype, ref_embeddings.dtype)
    return dtype


def loss_with(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    hp: Hyperparameters,
    *,
    return_parts: bool = False,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    ref_includes_batch: bool = False,
    backend: str = "auto",
    check_values: Optional[bool] = None,
    sample_weights: Optional[torch.Tensor] = None,
    ref_name: str = "ref_embeddings",
):
    """:func:`daal_loss` with its hyperparameters given as one :class:`Hyperparameters` object;
    ``sample_weights`` (B values) scale each sample's terms (``DAALLoss`` derives them from a
    miner's ``indices_tuple``); ``ref_name``: the reference set's argument name in error messages."""
    refuse_vmap("the DAAL loss (daal_loss, DAALLoss)")
    refuse_torchscript("the DAAL loss (daal_loss, DAALLoss)")
    check_flag(return_parts, "return_parts", optional=False)
    labels, ref_labels = (_beside(t, embeddings) for t in (labels, ref_labels))
    validate_loss_inputs(embeddings, labels, segments, k=hp.k,
                         ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                         ref_includes_batch=ref_includes_batch, check_values=check_values,
                         ref_name=ref_name, normalize=hp.normalize)
    ops = _ops(choose_backend(backend, embeddings.device, inputs_dtype(embeddings, segments, ref_embeddings)))
    parts = compose(embeddings, labels, segments, hp, ops, ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_includes_batch=ref_includes_batch,
                    split_line_pull=return_parts, sample_weights=sample_weights)
    return parts if return_parts else parts.loss


def pairwise_distance(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto",
                      check_values: Optional[bool] = None) -> torch.Tensor:
    """``d_ij = sqrt(max(||x_i - y_j||^2, 1e-12))``: ``x`` M x D, ``y`` N x D -> M x N, float32
    for float16/bfloat16/float32 inputs (float64 for float64); the gradients in the inputs' dtypes.

    Computed in the GEMM form ``||x_i||^2 + ||y_j||^2 - 2 x_i.y_j``, as ``torch.cdist`` computes
    large inputs: its absolute error is about ``sqrt(eps) * max(||x_i||, ||y_j||)`` (float32: ~1e-2
    at norms ~10, ~1e-3 for unit rows), so close pairs, a row's distance to itself included, are
    not resolved. :func:`knn` takes the distances it returns by direct differences: exact there.
    Its squares overflow for rows of norm beyond ``2^62`` (float32; ``2^510`` in float64): the
    value check refuses them (docs/method.md, "Bad input")."""
    refuse_vmap("pairwise_distance", "its checks of the inputs' values are data-dependent")
    refuse_torchscript("pairwise_distance")
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_same_device(x=x, y=y)
    values = value_checks_on(x.device, check_values)
    check_float_matrix(x, "x", values=False)
    check_float_matrix(y, "y", values=False)
    if values:  # finite, and within the GEMM form's range: one read of each
        distance_rows(("x", x), ("y", y))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of columns, got {x.shape[1]} and {y.shape[1]}")
    if choose_backend(backend, x.device, torch.promote_types(x.dtype, y.dtype), own_dots=True) == "triton":
        from .kernels.pairwise import pairwise_distance as kernel

        with _on_device(x.device):
            return kernel(x, y)
    with _no_autocast(x.device):  # an enclosing autocast would run the reference's GEMM in half precision
        return reference.pairwise_distance(x, y)


def knn(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    *,
    query_labels: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
    backend: str = "auto",
    check_values: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest ``ref`` rows of each ``query`` row: ``(dist, index)``, M x k each.

    With labels only same-label references count; ``exclude_self`` drops ``j == i``; missing
    neighbours are ``inf`` / ``-1``; ties go to the smaller index (float32's ties: distances equal
    in exact arithmetic may differ in the last bit, docs/method.md "Numerics"). The Triton backend never
    builds the M x N matrix. ``dist`` is float32 for float16/bfloat16/float32 inputs (float64 for
    float64), ``index`` int64; the gradients come back in the inputs' dtypes. Rows of norm beyond
    ``2^62`` (float32; ``2^510`` in float64) are refused by the value check: their squared
    distances would overflow (docs/method.md, "Bad input").
    """
    refuse_vmap("knn")
    refuse_torchscript("knn")
    validate_knn_inputs(query, ref, k, query_labels, ref_labels, check_values=check_values)
    check_flag(exclude_self, "exclude_self", optional=False)
    dtype = torch.promote_types(query.dtype, ref.dtype)
    knn_fn = _ops(choose_backend(backend, query.device, dtype, own_dots=True)).knn
    # as the loss: the distances in the inputs' precision, on the inputs' device
    with _no_autocast(query.device), _on_device(query.device):
        dist, index = knn_fn(query, ref, int(k), query_labels=query_labels, ref_labels=ref_labels,
                             exclude_self=exclude_self)
    # the Triton backward reads the index its forward returned: the caller's is a copy, free to
    # change in place (``index.clamp_(min=0)``) before ``backward``, as on the reference backend
    # (M x k int64: one copy, where a gradient can follow)
    return dist, index.clone() if dist.requires_grad else index
