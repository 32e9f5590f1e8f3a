"""The loss contract: DAAL's hyperparameters, its result type, and *the* composition of its steps.

Both backends run :func:`compose`; they differ only in the operators they plug in (the five steps of
:class:`Operators`: prepare, kNN, density, line margin, combine): plain PyTorch in
``daal_triton.reference``, the fused Triton kernels in ``daal_triton.kernels``. The steps and their numbers are those of ``docs/method.md``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch

from . import reference
from .reference import compute_dtype, length_term, own_distance_sq
from .validation import as_float, check_flag, check_k

#: ``knn(query, ref, k, *, query_labels, ref_labels, exclude_self[, batch_rows]) -> (dist, index)``
#: (:class:`Operators`; ``batch_rows`` is passed only when it is not 0)
KnnFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
LineMarginFn = Callable[..., torch.Tensor]
REDUCTIONS = ("mean", "none")


def _help(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Hyperparameters:
    """DAAL's hyperparameters (docs/method.md, "Hyperparameters"), validated on construction.

    Every consumer (``daal_loss``, ``DAALLoss``, the training program and its ``--daal-*`` flags)
    takes its names, defaults and checks from here.
    """

    k: int = field(default=3, metadata=_help("neighbours for the kNN radius (density)"))
    m0: float = field(default=0.2, metadata=_help("base margin"))
    m_min: float = field(default=0.05, metadata=_help("smallest adaptive margin"))
    m_max: float = field(default=0.5, metadata=_help("largest adaptive margin"))
    gamma: float = field(default=1.0, metadata=_help("exponent of the relative sparsity in the margin (0: fixed "
                                                     "m0; below 0, allowed: sparser samples get smaller margins)"))
    alpha: float = field(default=16.0, metadata=_help("scale of the soft-max over negative classes"))
    tau: float = field(default=0.8, metadata=_help("radius below which the density term pushes apart"))
    lambda_pull: float = field(default=0.0, metadata=_help("weight of the pull to the own segment"))
    lambda_dens: float = field(default=0.5, metadata=_help("weight of the density-preservation term"))
    lambda_len: float = field(default=0.0, metadata=_help("weight of the segment-length penalty"))
    l_max: float = field(default=1.0, metadata=_help("segment length above which the penalty applies"))
    normalize: bool = field(default=True, metadata=_help("L2-normalise the embeddings first"))
    reduction: str = field(default="mean", metadata=_help("'mean' (a scalar) or 'none' (one value per sample)"))

    def __post_init__(self) -> None:
        # NumPy scalars are accepted and stored as Python numbers (a frozen dataclass: __setattr__
        # of object)
        object.__setattr__(self, "k", check_k(self.k))
        for f in dataclasses.fields(self):
            if f.type in ("float", float):
                object.__setattr__(self, f.name, as_float(getattr(self, f.name), f.name))
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0 <= self.m_min <= self.m_max:
            raise ValueError(f"m_min and m_max must satisfy 0 <= m_min <= m_max, got {self.m_min}, {self.m_max}")
        for name in ("m0", "lambda_pull", "lambda_dens", "lambda_len", "tau", "l_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "normalize", check_flag(self.normalize, "normalize", optional=False))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'none', got {self.reduction!r}")

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Hyperparameters":
        return dataclasses.replace(self, **changes)


@dataclass
class DAALParts:
    """The loss and everything it is made of (``return_parts=True``).

    ``loss``, ``per_sample``, ``density``, ``length`` and ``radius`` carry the autograd graph
    where what they are made of needs a gradient (``length``: the segments; ``radius`` and
    ``density``: the embeddings, when there are neighbours). One kept from a call that is never
    backpropagated keeps that graph's memory alive: ``.detach()`` what is kept for logging.
    ``line``, ``pull``, ``margin``, ``valid`` and ``neighbors`` never do (for reading only)."""

    loss: torch.Tensor  # the reduced loss (scalar) or the B per-sample values
    line: Optional[torch.Tensor]  # L_line (scalar), detached; None unless the split was asked for
    pull: Optional[torch.Tensor]  # L_pull (scalar), detached; None unless the split was asked for
    density: torch.Tensor  # L_dens (scalar)
    length: torch.Tensor  # L_len (scalar)
    per_sample: torch.Tensor  # B values, what reduction="none" returns
    radius: torch.Tensor  # r_i (B), inf where invalid; differentiable (a density regulariser of one's own)
    valid: torch.Tensor  # k_i >= 1 (B, bool)
    margin: torch.Tensor  # m_i (B), detached
    neighbors: torch.Tensor  # B x min(k, N) indices into the reference set's N rows, -1 padded


try:  # a pytree node, so that torch.export takes it as an output (return_parts=True) and saves it
    torch.export.register_dataclass(DAALParts, serialized_type_name="daal_triton.DAALParts")
except (ValueError, TypeError, AttributeError):  # registered already (this module imported again), or
    pass  # a torch without the function or its keyword: only torch.export of the parts is lost there


class Operators(NamedTuple):
    """The operators a backend supplies, one per step of docs/method.md (each field's reference
    implementation in ``daal_triton.reference`` documents its contract):

    * ``prepare(embeddings, labels, C, *, dtype, normalize) -> (x, labels, bad)``: step 1 and the
      label range (``labels`` None: only ``x``);
    * ``knn(query, ref, k, *, query_labels, ref_labels, exclude_self, batch_rows=0) -> (dist,
      index)``: step 3's neighbours, exact distances; ``batch_rows``: the first ``batch_rows``
      rows of ``ref`` are the query rows, and their reference-role gradient is added to the
      query's (passed, and only then, for ``ref_includes_batch=True`` with a reference set that
      carries no gradient while the embeddings do: ``MemoryBank.with_batch``'s);
    * ``density(dist, index, labels, C, *, m0, m_min, m_max, gamma, tau) -> (r, valid, margin,
      hinge)``: steps 3-4 and the density hinge;
    * ``line_margin(x, labels, segments, margins, *, alpha, lambda_pull) -> B values``: steps 5-6;
    * ``combine(per_line, hinge, valid, bad, l_len, *, weights, lambda_dens, lambda_len) ->
      (per_sample, total, L_dens, L_len)``: step 7.

    Those not given are the reference's. The Triton backend supplies fused kernels for all five
    (one launch or a few each, with hand-written backwards)."""

    knn: KnnFn = reference.knn
    line_margin: LineMarginFn = reference.line_margin
    prepare: Callable[..., Tuple[torch.Tensor, Any, Any]] = reference.prepare
    density: Callable[..., Tuple[torch.Tensor, ...]] = reference.density
    combine: Callable[..., Tuple[torch.Tensor, ...]] = reference.combine


#: Autocast switched off for a device's type (the loss chooses its own dtype; autocast would
#: silently run the GEMMs in half precision): the reference's own helper.
_no_autocast = reference.autocast_off


def _on_device(device: torch.device):
    """Triton launches its kernels on the *current* CUDA device, not on the tensors' (tensors on
    cuda:1 while cuda:0 is current end in Triton's "Pointer argument cannot be accessed from
    Triton"): the tensors' device is made current for the call, as PyTorch's own CUDA operators
    do. (No context where it already is current, on other devices, and while ``torch.compile``
    traces: its generated code guards the device itself.) The backward needs none: autograd runs
    each device's backward on a thread with that device current."""
    if device.type != "cuda" or device.index is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def compose(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    hp: Hyperparameters,
    ops: Operators,
    *,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    ref_includes_batch: bool = False,
    split_line_pull: bool = True,
    sample_weights: Optional[torch.Tensor] = None,
) -> DAALParts:
    """docs/method.md steps 1-7 in order, with the backend's operators (:class:`Operators`).

    Inputs are assumed valid (``daal_triton.validation`` checks the public API's).
    ``split_line_pull`` also reports ``L_line`` and ``L_pull`` apart (one more O(B D) pass for the
    own-class distances); callers that only want the loss turn it off. ``sample_weights`` (B values,
    e.g. from a miner's tuples) scale each sample's line, pull and density terms."""
    # the reference set takes part in the promotion: a float64 bank is never cast down
    dtype = compute_dtype(embeddings, segments, *(() if ref_embeddings is None else (ref_embeddings,)))
    with _no_autocast(embeddings.device), _on_device(embeddings.device):
        seg = segments.to(dtype)
        C = seg.shape[0]
        x, labels, bad_label = ops.prepare(embeddings, labels, C, dtype=dtype, normalize=hp.normalize)
        if ref_embeddings is None:
            ref, ref_labels, ref_includes_batch = x, labels, True
        else:
            ref = ops.prepare(ref_embeddings, None, C, dtype=dtype, normalize=hp.normalize)[0]
            ref_labels = ref_labels.long()  # type: ignore[union-attr]  # given with ref_embeddings
        # no row has more than N neighbours: a k beyond the reference set's N rows costs no B x k padding
        k = min(hp.k, ref.shape[0])
        # ref[:B] declared to be the batch but carrying no gradient (MemoryBank.with_batch's detached
        # cat): the kNN passes those rows' reference-role gradient to x itself, so it reaches the
        # embeddings as through a grad-carrying cat, without a (B + N) x D gradient of the reference
        # set. A reference set that requires grad carries it (no batch_rows: no double count).
        batch = ({"batch_rows": x.shape[0]} if ref_includes_batch and ref is not x and x.requires_grad
                 and not ref.requires_grad else {})
        if k:
            dist, index = ops.knn(x, ref, k, query_labels=labels, ref_labels=ref_labels,
                                  exclude_self=ref_includes_batch, **batch)
        else:  # an empty reference set (a memory bank before its first enqueue): no sample has a neighbour
            dist = x.new_empty((x.shape[0], 0))
            index = torch.empty((x.shape[0], 0), dtype=torch.long, device=x.device)
        r, valid, margin, hinge = ops.density(dist, index, labels, C, m0=hp.m0, m_min=hp.m_min,
                                              m_max=hp.m_max, gamma=hp.gamma, tau=hp.tau)
        per_line = ops.line_margin(x, labels, seg, margin, alpha=hp.alpha, lambda_pull=hp.lambda_pull)
        # L_len only where it counts or is read (its value is 0 otherwise): no O(C D) pass per call
        l_len = length_term(seg, hp.l_max) if hp.lambda_len or split_line_pull else None
        w = None if sample_weights is None else sample_weights.to(per_line.dtype)
        per_sample, total, l_dens, l_len = ops.combine(
            per_line, hinge, valid, bad_label, l_len, weights=w, lambda_dens=hp.lambda_dens,
            lambda_len=hp.lambda_len)
        l_line = l_pull = None
        if split_line_pull:
            with torch.no_grad():  # the line/pull split is for reading only
                own_sq = own_distance_sq(x, labels, seg)
                l_pull = (own_sq if w is None else own_sq * w).mean()
                # per sample, not from the total (whose other terms' rounding came through, +-3e-7),
                # and at least 0 (a softplus; the subtraction's rounding, <= 1e-7 of the pull term,
                # is not): with one class and lambda_pull = 0 it is exactly 0
                line = (per_line - hp.lambda_pull * own_sq).clamp_min(0).masked_fill(bad_label, float("nan"))
                l_line = (line if w is None else line * w).mean()
        return DAALParts(
            loss=total if hp.reduction == "mean" else per_sample,
            line=l_line, pull=l_pull, density=l_dens, length=l_len, per_sample=per_sample,
            radius=r, valid=valid, margin=margin, neighbors=index,
        )
