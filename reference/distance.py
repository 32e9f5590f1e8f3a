"""Plain-PyTorch pairwise distances and k-nearest neighbours (the oracles for the Triton kernels).

Both functions materialise the full M x N distance matrix: they are meant to be exact and
readable, not frugal. Arithmetic happens in the inputs' own dtype promoted to at least float32.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch

EPS = 1e-12


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype arithmetic runs in: the promotion of the inputs, and at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def autocast_off(device: torch.device, *, always: bool = False):
    """Autocast switched off for ``device``'s type: it would silently run the GEMMs in half
    precision. (No context at all when autocast is off, unless ``always``: entering one costs ~7 µs
    of host time.)"""
    try:
        if always or torch.is_autocast_enabled(device.type):
            return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, AssertionError):  # a device type autocast does not know (meta, an unregistered backend)
        pass
    return contextlib.nullcontext()


class _MatmulNT(torch.autograd.Function):
    """``a @ b.T`` whose backward, too, runs in the operands' dtype: a ``backward()`` called inside
    an autocast region would otherwise run the two gradient GEMMs in bfloat16/float16
    (docs/method.md, "Precision")."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with autocast_off(a.device):
            return a @ b.T

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, b = ctx.saved_tensors
        # always the context: torch.compile traces this backward where the forward runs (autocast
        # off, so autocast_off would give no context) and AOTAutograd then traces it again in the
        # autocast region the call was compiled in (bfloat16 GEMMs, 4e-3 off)
        with autocast_off(grad.device, always=True):
            # the products autograd forms for a @ b.T (mm's backward, row-major operands): the same
            # bits; through matmul_nt, so that a double backward keeps float32 too
            return (matmul_nt(grad, b.T) if ctx.needs_input_grad[0] else None,
                    matmul_nt(grad.T, a.T) if ctx.needs_input_grad[1] else None)


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in the operands' dtype whatever autocast says, forward and backward (also under
    ``torch.compile``, which traced the backward's GEMMs in the autocast region it compiled in).
    In forward-mode AD the plain product: an autograd.Function would need a ``jvp``, which
    ``torch.compile`` refuses."""
    if (not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad))
            or getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0):
        # no backward to protect (a kNN's selection, the backward's own products without
        # create_graph): the plain product (autograd.Function.apply costs ~20 µs of host time)
        with autocast_off(a.device):
            return a @ b.T
    return _MatmulNT.apply(a, b)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d_ij = sqrt(max(||x_i - y_j||^2, eps))`` for ``x`` (M x D) and ``y`` (N x D) -> M x N.

    Uses the GEMM form ``||x_i||^2 + ||y_j||^2 - 2 x_i.y_j``; the clamp makes the gradient zero
    where it binds (duplicates), never NaN.
    """
    return torch.sqrt(pairwise_distance_sq(x, y))


def pairwise_distance_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max(||x_i - y_j||^2, eps)`` in the GEMM form: what :func:`pairwise_distance` takes the root
    of, and what :func:`knn` selects on (as the kernels do: a root would merge squared distances a
    unit in the last place apart into ties)."""
    dtype = compute_dtype(x, y)
    x = x.to(dtype)
    y = y.to(dtype)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * matmul_nt(x, y)
    return torch.clamp(sq, min=EPS)


def knn(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    *,
    query_labels: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
    batch_rows: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``ref`` for each row of ``query``: ``(dist, index)``, each M x k.

    - With labels, only references with ``ref_labels[j] == query_labels[i]`` are candidates.
    - ``exclude_self`` drops ``j == i`` (query row i and reference row i are the same point).
    - Neighbours are sorted by their exact (direct-difference) distance; ties go to the smaller
      index.
    - Rows with fewer than ``k`` candidates are padded with ``inf`` distance and index ``-1``.
    - A pair whose distance is NaN or inf (NaN/inf in the inputs) is no candidate.
    ``dist`` is differentiable with respect to ``query`` and ``ref``; the neighbours are selected
    on the GEMM form and their distances computed by direct differences.

    ``batch_rows`` (``0 <= batch_rows <= min(M, N)``) declares that the first ``batch_rows`` rows
    of ``ref`` *are* the first rows of ``query`` (a memory bank's ``cat([batch, bank])``): their
    reference-role gradient (as neighbours of other rows) is added to ``query``'s, and those
    rows of ``ref`` receive none. Here a selected neighbour below ``batch_rows`` is simply read
    from ``query`` (:func:`selected_distance_sq`), so autograd does it.
    """
    if (query_labels is None) != (ref_labels is None):
        raise ValueError("query_labels and ref_labels must be given together")
    batch_rows = check_batch_rows(batch_rows, query, ref)
    d = pairwise_distance_sq(query.detach(), ref.detach())  # selection only: no M x N graph recorded
    m, n = d.shape
    invalid = torch.zeros(m, n, dtype=torch.bool, device=d.device)
    if query_labels is not None and ref_labels is not None:  # both or neither (checked above)
        # as int64: PyTorch has no promotion of uint16/32/64 with the other integer types
        invalid |= query_labels.long()[:, None] != ref_labels.long()[None, :]
    if exclude_self:
        idx = torch.arange(min(m, n), device=d.device)
        invalid[idx, idx] = True
    # A NaN or inf distance (NaN/inf in the inputs) is no candidate: such a row has no neighbours
    # and is no one's, as in the kernels (its NaN still reaches the loss through the line margin).
    invalid |= ~torch.isfinite(d)
    masked = d.masked_fill(invalid, float("inf"))
    order = smallest(masked, min(k, n))  # ties go to the smaller index
    found = torch.gather(~invalid, 1, order)
    # The GEMM form selected the neighbours; their distances are taken by direct differences
    # (docs/method.md, "Numerics"): exact for close points, in the value and the gradient alike.
    # The selected pairs are then re-sorted by those exact squared distances, floored as the
    # distances returned are (pairs below the floor are equal), ties to the smaller index, padding
    # last, as the kernels' finish does (the GEMM form may order close pairs differently).
    sq = selected_distance_sq(query, ref, order, found, batch_rows=batch_rows)
    by_index = torch.argsort(order.masked_fill(~found, n), dim=1)
    exact = torch.gather(sq.detach().clamp(min=EPS).masked_fill(~found, float("inf")), 1, by_index)
    perm = torch.gather(by_index, 1, torch.sort(exact, dim=1, stable=True).indices)
    order, found, sq = (torch.gather(t, 1, perm) for t in (order, found, sq))
    index = order.masked_fill(~found, -1)
    dist = torch.sqrt(torch.clamp(sq, min=EPS)).masked_fill(~found, float("inf"))
    if order.shape[1] < k:  # fewer references than k
        pad = k - order.shape[1]
        dist = torch.cat([dist, dist.new_full((m, pad), float("inf"))], 1)
        index = torch.cat([index, index.new_full((m, pad), -1)], 1)
    return dist, index


def check_batch_rows(batch_rows, query: torch.Tensor, ref: torch.Tensor) -> int:
    """``batch_rows`` of :func:`knn` as an int, ``ValueError`` unless ``0 <= batch_rows <= min(M, N)``."""
    limit = min(query.shape[0], ref.shape[0])
    if (isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, torch.SymInt))
            or not 0 <= batch_rows <= limit):
        raise ValueError(f"batch_rows must be an integer in [0, min(M, N)] = [0, {limit}] (the reference rows "
                         f"that are the query's first rows), got {batch_rows!r}")
    return batch_rows  # type: ignore[return-value]  # a SymInt is an int to its callers


#: Rows of at most this many columns are sorted whole (fewer operators: a loss's batch); wider ones
#: (an evaluation's chunks, a memory bank) go through ``topk``.
SORT_COLUMNS = 512


def smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The columns of each row's ``k`` smallest ``values`` (M x N, no NaN: :func:`knn` makes them
    inf), in ``(value, column)`` order: ``torch.sort(values, dim=1, stable=True).indices[:, :k]``.
    Wide rows are not sorted whole (a stable sort of 2,048 x 20,000 distances took 5.7 s on a CPU,
    ``topk`` 0.24 s): the k-th smallest value ``v`` (``topk``) splits a row: every column below
    ``v``, then the columns at ``v`` in index order until there are ``k``; those ``k`` columns,
    ascending, are sorted stably by value. Narrow rows, and symbolic sizes (``torch.export`` with
    a dynamic batch: ``topk``'s ``k <= N`` would be a guard it cannot prove), take the sort
    (its first ``k`` columns by ``index_select``, a copy: a view's contiguity would guard
    ``B != k``)."""
    m, n = values.shape
    if isinstance(n, torch.SymInt) or isinstance(k, torch.SymInt) or n <= SORT_COLUMNS:
        order = torch.sort(values, dim=1, stable=True).indices
        return order.index_select(1, torch.arange(k, device=values.device))
    if k == 0:
        return torch.zeros(m, 0, dtype=torch.long, device=values.device)
    kth = values.topk(k, dim=1, largest=False).values[:, -1:]
    below, at = values < kth, values == kth
    # int32 throughout: an int64 sum or comparison made two M x N int64 copies, the largest blocks
    # of a 512 x 20,000 kNN (a memory probe, 2026-12-07)
    need = k - below.sum(1, keepdim=True, dtype=torch.int32)
    take = below | (at & (at.cumsum(1, dtype=torch.int32) <= need))
    # the k taken columns, ascending (exactly k a row): the largest of n - column where taken
    rank = torch.arange(n, 0, -1, device=values.device, dtype=torch.int32)
    columns = torch.topk(torch.where(take, rank, 0), k, dim=1).indices
    by_value = torch.sort(torch.gather(values, 1, columns), dim=1, stable=True).indices
    return torch.gather(columns, 1, by_value)


def selected_distance_sq(query: torch.Tensor, ref: torch.Tensor, index: torch.Tensor,
                         found: Optional[torch.Tensor] = None, *, batch_rows: int = 0) -> torch.Tensor:
    """``||query_i - ref_{index_ij}||^2`` by direct differences (M x k, O(M k D), no clamp);
    ``index`` must hold valid rows of ``ref``. Where ``found`` is False the pair is 0 and sends no
    gradient (not even a NaN one: a padding pair of a NaN row must not reach the row it names).
    ``batch_rows`` (:func:`knn`): rows of ``ref`` below it are read from ``query``, where their
    gradient goes (a detached memory bank then gets no (B + N) x D gradient at all)."""
    dtype = compute_dtype(query, ref)
    # the query's view first, then the rows: the order autograd records them in is the order their
    # gradients are summed in (where ``ref`` is ``query``), and so the bits of a training run
    query = query.to(dtype)
    q = query[:, None, :]
    rows = ref.to(dtype)[index]
    if batch_rows:
        rows = torch.where((index < batch_rows)[..., None], query[index.clamp(max=batch_rows - 1)], rows)
    diff = q - rows
    if found is not None:
        diff = torch.where(found[..., None], diff, diff.new_zeros(()))
    return (diff * diff).sum(-1)


def selected_distance(query: torch.Tensor, ref: torch.Tensor, index: torch.Tensor,
                      found: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sqrt(max(||query_i - ref_{index_ij}||^2, eps))`` by direct differences (M x k, O(M k D));
    ``index`` must hold valid rows of ``ref``; pairs where ``found`` is False read the floor and
    send no gradient (``selected_distance_sq``)."""
    return torch.sqrt(torch.clamp(selected_distance_sq(query, ref, index, found), min=EPS))
