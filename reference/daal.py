"""DAAL in plain PyTorch: every step of docs/method.md, readable and float64-capable.

This module is the oracle of every parity test and the fallback wherever Triton cannot run. It
supplies the step functions and the reference operators (kNN, line margin); the composition of the
steps is the package's (``daal_triton.core.compose``), shared with the Triton backend, so the two
backends cannot drift apart in their glue.

Inputs are not validated here (``daal_triton.validation`` does that for the public API).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .distance import EPS, knn, matmul_nt

KnnFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
LineMarginFn = Callable[..., torch.Tensor]


# ---------------------------------------------------------------- step 1
#: The scale of the second sum of squares that :func:`normalize_rows` keeps for finite rows whose
#: ``||z||^2`` overflows (``||z|| > 1.8e19`` in float32): ``(2^-96 z)^2`` cannot overflow.
NORM_SCALE = 2.0 ** -96
#: float64's (``||z|| > 1.3e154``): ``2^-96`` left rows of norm beyond ``2^608`` infinite (then 0)
NORM_SCALE_64 = 2.0 ** -600


def normalize_rows(z: torch.Tensor) -> torch.Tensor:
    """``x_i = z_i / max(||z_i||, eps)``, written as ``sqrt(max(||z||^2, eps^2))`` so the
    gradient at a zero row is finite rather than NaN: there ``x = z / eps`` and the Jacobian is
    ``I / eps`` (docs/method.md, "Gradients"). A finite row whose ``||z||^2`` overflows is
    normalised at scale ``2^-96``: ``2^-96 z / ||2^-96 z||`` (it used to read as infinite: the
    row became 0; and its norm itself can exceed float32: dividing ``z`` by it gave 0 too).
    One expression for both: every row is scaled by ``s`` (``2^-96`` where ``||z||^2`` is
    infinite, else 1: the same bits) and divided by its scaled norm, so no sync and no second
    full-size branch (60,180 x 512 rows, 1 thread, 2026-12-07: 0.555 s with the two branches and
    a ``where``, 0.301 s now; ``F.normalize`` 0.073 s)."""
    ss = (z * z).sum(1, keepdim=True)
    scale = NORM_SCALE_64 if z.dtype == torch.float64 else NORM_SCALE
    s = torch.where(torch.isinf(ss), ss.new_full((), scale), ss.new_ones(()))
    zs = z * s
    return zs / torch.sqrt(torch.clamp((zs * zs).sum(1, keepdim=True), min=EPS * EPS))


def prepare(
    embeddings: torch.Tensor,
    labels: Optional[torch.Tensor],
    num_classes: int,
    *,
    dtype: torch.dtype,
    normalize: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Step 1 and the label range: ``(x, labels, bad)``. ``x`` = the rows in ``dtype``, normalised
    when ``normalize``; ``labels`` clamped into ``[0, C)`` (int64) so no operator indexes out of
    bounds, and ``bad`` where they were not (those samples' losses become NaN, docs/method.md
    "Bad input"). Without labels (a memory bank) only ``x`` is computed."""
    x = embeddings.to(dtype)
    x = normalize_rows(x) if normalize else x
    if labels is None:
        return x, None, None
    labels = labels.long()
    bad = (labels < 0) | (labels >= num_classes)
    return x, labels.clamp(0, num_classes - 1), bad


# ---------------------------------------------------------------- step 3
def radius(dist: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(r, valid)`` from a kNN's ``(dist, index)``: ``r_i`` = the mean of the ``k_i`` found
    distances (``index >= 0``), ``inf`` where ``k_i = 0`` (``valid`` false)."""
    found = index >= 0
    count = found.sum(1)
    valid = count > 0
    total = torch.where(found, dist, torch.zeros_like(dist)).sum(1)
    r = torch.where(valid, total / count.clamp(min=1).to(total.dtype), torch.full_like(total, float("inf")))
    return r, valid


def knn_radius(
    x: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    ref: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    ref_includes_batch: bool = False,
    knn_fn: KnnFn = knn,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """kNN radius ``r_i`` = mean distance to the ``k_i = min(k, |S_i|)`` nearest same-class points.

    Without ``ref`` the candidates are the other rows of the batch (self excluded); with ``ref``
    they are the rows of ``ref`` with the same label, excluding ``ref[i]`` for batch row ``i``
    only when ``ref_includes_batch`` (the batch occupies ``ref[:B]``).
    Returns ``(r, valid, index)``; ``r_i = inf`` where invalid (``k_i = 0``).

    Both kNN operators return the selected distances by direct differences (docs/method.md,
    "Numerics"), so the radius and its gradient are exact for close points.
    """
    if ref is None:
        ref, ref_labels, ref_includes_batch = x, labels, True
    dist, index = knn_fn(x, ref, k, query_labels=labels, ref_labels=ref_labels,
                         exclude_self=ref_includes_batch)
    r, valid = radius(dist, index)
    return r, valid, index


def density(
    dist: torch.Tensor,
    index: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    m0: float,
    m_min: float,
    m_max: float,
    gamma: float,
    tau: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 3-4 and the density hinge from a kNN's ``(dist, index)``: ``(r, valid, margin,
    hinge)`` (:func:`radius`, :func:`adaptive_margins`, :func:`density_hinge`)."""
    r, valid = radius(dist, index)
    margin = adaptive_margins(r, valid, labels, num_classes, m0=m0, m_min=m_min, m_max=m_max, gamma=gamma)
    return r, valid, margin, density_hinge(r, valid, tau)


# ---------------------------------------------------------------- step 4
def adaptive_margins(
    r: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    m0: float,
    m_min: float,
    m_max: float,
    gamma: float,
) -> torch.Tensor:
    """``m_i = clamp(m0 * (r_i / rbar_{y_i})^gamma, m_min, m_max)`` for valid i, else ``m0``;
    ``rbar_c`` is the mean radius of the valid samples of class c. No gradient."""
    r = r.detach()
    r0 = torch.where(valid, r, torch.zeros_like(r))
    total = r.new_zeros(num_classes).index_add_(0, labels, r0)
    count = r.new_zeros(num_classes).index_add_(0, labels, valid.to(r.dtype))
    rbar = total / count.clamp(min=1)
    s = r0 / torch.clamp(rbar[labels], min=EPS)
    # m0 = 0: the margin is m_min whatever s^gamma is (in float32 s^gamma overflows at |gamma| large
    # enough, and 0 * inf would be NaN, a loss of NaN for finite inputs)
    m = m0 * s.pow(_filled(s, gamma)) if m0 else torch.zeros_like(s)
    m = torch.minimum(torch.maximum(m, _filled(m, m_min)), _filled(m, m_max))  # clamp(m, m_min, m_max)
    return torch.where(valid, m, _filled(m, m0)).detach()


def _filled(like: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` everywhere, shaped and typed like ``like`` (``torch.full_like``). Built by an addition,
    and taken by the operators above in place of a Python float, so that ``torch.compile`` keeps a
    hyperparameter symbolic: ``clamp``, ``pow`` and ``full_like`` with a float recompile for each new
    value (a schedule of ``m_max`` or ``gamma`` recompiled every step, and ran uncompiled after 8)."""
    return torch.zeros_like(like) + value


# ---------------------------------------------------------------- step 5
def line_distances(x: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """``delta_ic`` = distance from ``x_i`` to the segment ``[p_c, q_c]`` (B x C), GEMM form."""
    p, q = segments[:, 0], segments[:, 1]
    u = q - p
    xu, xp = matmul_nt(x, u), matmul_nt(x, p)
    pu, uu, pp = (p * u).sum(1), (u * u).sum(1), (p * p).sum(1)
    xx = (x * x).sum(1)[:, None]
    proj = xu - pu
    t = torch.clamp(proj / torch.clamp(uu, min=EPS), 0.0, 1.0)
    e2 = xx - 2.0 * xp + pp - 2.0 * t * proj + t * t * uu
    return torch.sqrt(torch.clamp(e2, min=EPS))


# ---------------------------------------------------------------- step 6 (line + pull)
def line_margin(
    x: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    margins: torch.Tensor,
    *,
    alpha: float,
    lambda_pull: float,
) -> torch.Tensor:
    """Per-sample ``softplus(logsumexp_{c != y_i} alpha(delta_iy + m_i - delta_ic)) / alpha
    + lambda_pull delta_iy^2`` (B values). ``softplus(lse(v)) = lse({0} U v)``, which is also
    finite (zero) for ``C = 1``."""
    delta = line_distances(x, segments)
    # The own-class distance by direct differences (docs/method.md, "Numerics"); the negatives
    # keep the GEMM form.
    d_pos = torch.sqrt(own_distance_sq(x, labels, segments))[:, None]  # B x 1
    own = labels[:, None] == torch.arange(delta.shape[1], device=labels.device)[None, :]
    logits = alpha * (d_pos + margins[:, None].to(delta.dtype) - delta)
    logits = logits.masked_fill(own, float("-inf"))
    line = softplus_logsumexp(logits) / alpha
    return line + lambda_pull * d_pos[:, 0] ** 2


def softplus_logsumexp(v: torch.Tensor) -> torch.Tensor:
    """``log(1 + sum_c exp(v_c))`` per row (= ``logsumexp({0} U v)``; 0 for a row of -inf) at the
    dtype's accuracy also when every ``v_c`` is well below 0 (docs/method.md, "Numerics"): with
    ``top = max(0, max_c v_c)`` (no gradient: the result does not depend on it) and ``rest =
    sum_c exp(v_c - top)``, ``top + log(exp(-top) + rest)`` where ``top > 0``, else ``log1p(rest)``;
    ``torch.logsumexp`` takes ``log(1 + rest)``, which rounds off rest's digits (a line term of
    3e-8 read 5% off in float32)."""
    top = v.amax(1).clamp_min(0).detach()  # max(0, max v); an all -inf row: 0; a NaN row: NaN, its result too
    rest = torch.exp(v - top[:, None]).sum(1)
    # both branches finite where not taken (rest >= 1 where top > 0): no NaN gradient leaks through
    return torch.where(top > 0, top + torch.log(torch.exp(-top) + rest), torch.log1p(rest))


# ---------------------------------------------------------------- step 6 (density, length)
def density_hinge(r: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """``max(0, tau - r_i)`` for valid i, 0 otherwise (B values)."""
    # -(r - tau), not tau - r (the same value): a float on the left recompiles under torch.compile per tau
    return torch.where(valid, torch.relu(-(torch.where(valid, r, torch.zeros_like(r)) - tau)), torch.zeros_like(r))


def length_term(segments: torch.Tensor, l_max: float) -> torch.Tensor:
    """``L_len = mean_c max(0, ||u_c|| - l_max)^2`` (zero-length segments have zero gradient)."""
    u = segments[:, 1] - segments[:, 0]
    norm = torch.sqrt(torch.clamp((u * u).sum(1), min=EPS * EPS))
    return (torch.relu(norm - l_max) ** 2).mean()


# ---------------------------------------------------------------- step 7
def combine(
    per_line: torch.Tensor,
    hinge: torch.Tensor,
    valid: torch.Tensor,
    bad: torch.Tensor,
    l_len: Optional[torch.Tensor],
    *,
    weights: Optional[torch.Tensor],
    lambda_dens: float,
    lambda_len: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss from its terms: ``(per_sample, total, L_dens, L_len)``.

    ``per_line`` (line + pull, B) is NaN where ``bad``; ``weights`` (B, optional) scale each
    sample's line and hinge; ``per_sample = line + lambda_dens hinge``; ``L_dens`` = the hinges'
    sum over the number of valid samples (at least 1); ``total = mean(line) + lambda_dens L_dens +
    lambda_len L_len`` (``l_len`` None: not computed, taken as 0)."""
    per_line = per_line.masked_fill(bad, float("nan"))
    if weights is not None:
        per_line, hinge = per_line * weights, hinge * weights
    l_dens = hinge.sum() / valid.sum().clamp(min=1).to(hinge.dtype)
    if l_len is None:
        l_len = per_line.new_zeros(())
    per_sample = per_line + lambda_dens * hinge
    total = per_line.mean() + lambda_dens * l_dens + lambda_len * l_len
    return per_sample, total, l_dens, l_len


def own_distance_sq(x: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """``delta_{i,y_i}^2`` (B values): distance of each sample to its own class's segment, O(B D)."""
    own = segments[labels]  # B x 2 x D
    p, q = own[:, 0], own[:, 1]
    u = q - p
    proj = ((x - p) * u).sum(1)
    t = torch.clamp(proj / torch.clamp((u * u).sum(1), min=EPS), 0.0, 1.0)
    e = x - p - t[:, None] * u
    return torch.clamp((e * e).sum(1), min=EPS)


def daal_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    *,
    return_parts: bool = False,
    ref_embeddings: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    ref_includes_batch: bool = False,
    **hyperparameters,
):
    """DAAL (docs/method.md, steps 1-7) on this module's operators: the oracle of every parity test.

    ``embeddings`` B x D, ``labels`` B (int, in [0, C)), ``segments`` C x 2 x D
    (``segments[:, 0]`` = p, ``segments[:, 1]`` = q); ``hyperparameters`` are the fields of
    ``daal_triton.core.Hyperparameters`` (``k``, ``m0``, ..., ``reduction``). Returns the loss (a
    scalar for ``reduction="mean"``, B values for ``"none"``) in the promoted dtype of embeddings,
    segments and ``ref_embeddings`` (at least float32), or a ``DAALParts`` when ``return_parts``. With
    ``ref_embeddings``/``ref_labels`` the kNN radii are taken over that reference set (a memory
    bank); ``ref_includes_batch=True`` says its first B rows are the batch itself.
    """
    from daal_triton.core import Hyperparameters, Operators, compose  # the contract; imported late (cycle)

    parts = compose(embeddings, labels, segments, Hyperparameters(**hyperparameters),
                    Operators(), ref_embeddings=ref_embeddings,
                    ref_labels=ref_labels, ref_includes_batch=ref_includes_batch,
                    split_line_pull=return_parts)
    return parts if return_parts else parts.loss
