"""Fused k-nearest neighbours: tiled distance GEMM + running top-k, never materialising M x N.

For each query row ``i`` the kernel finds the ``k`` reference rows ``j`` with the smallest

    s_ij = max(||q_i||^2 + ||r_j||^2 - 2 q_i . r_j, eps)         (eps = 1e-12)

among the candidates (``ref_labels[j] == query_labels[i]`` when labels are given, ``j != i``
with ``exclude_self``), ordered by ``(s_ij, j)`` (ties go to the smaller index); it returns
``dist = sqrt(s)`` and ``index`` (M x k, sorted ascending, padded with ``inf`` / ``-1`` when a
row has fewer than ``k`` candidates) — exactly the semantics of ``daal_triton.reference.knn``.

Forward kernel (``_knn_fwd_kernel``), one program per BLOCK_M queries (and, when M alone gives
too few programs for the GPU, per one of ``S`` contiguous column ranges of the references):

1. for each BLOCK_N tile of references: ``acc = Q_blk R_tile^T`` with ``tl.dot`` over D in
   BLOCK_D chunks (tensor cores, float32 accumulation; float32 inputs use TF32 on a GPU and
   IEEE under the interpreter), then the epilogue ``s = qn + rn - 2 acc`` with the masks;
2. merge into a running top-k held in registers: ``KP = next_pow2(k)`` slots per row
   (distance, index), *unsorted*, with the row's worst entry ``(worst, widx)`` (the largest in
   ``(s, j)`` order). Tile entries with ``s < worst`` are candidates; while any row of the
   block has one, each row extracts its smallest candidate (ties -> smaller column, via
   ``min(where(s == min, col, BIG))``), overwrites its worst slot, recomputes its worst and
   drops candidates no longer below it. A tile none of whose entries beats its row's worst —
   most tiles after the first few — costs one masked row-min. Columns arrive in increasing
   order within a program, so a tie with the worst never displaces it (it has the smaller
   index). Empty slots hold ``(inf, -1 - slot)`` so every slot is distinct.
3. the KP slots (per column range) are written out (M x S x KP, small); the launcher sorts
   them by ``(s, j)`` and keeps the first ``k`` — this also merges the S column ranges.

Backward (``_knn_bwd_kernel``): ``dist_ik = d(q_i, r_j)`` with ``j = index_ik``, so with
``h_ik = g_ik / sqrt(||q_i - r_j||^2)`` (0 where ``j = -1`` or the clamp binds; the squared
distance is recomputed from direct differences, one extra pass over the k selected rows,
because the GEMM form loses digits exactly for the close pairs a kNN selects)::

    dL/dq_i = sum_k h_ik (q_i - r_j)          (accumulated per row in registers)
    dL/dr_j = -sum_{(i,k): index_ik = j} h_ik (q_i - r_j)   (atomic adds, fp32 buffer)

a scatter over the M x k selected pairs; atomics make dRef's summation order (last bits)
nondeterministic.

Memory: forward O((M + N) + M * S * KP) besides the inputs (the squared norms and the slot
buffers), never M x N; backward float32 buffers dQ (M x D) and dR (N x D, for the atomics),
cast to the input dtypes at the end; nothing of size M x k x D.
Inputs are copied once with ``.contiguous()`` only when their rows are not contiguous.

Limits: ``k <= MAX_K`` (128) runs the kernel; larger ``k``, and float64 inputs (the kernel
computes in float32, and nothing is lowered silently), run ``_select_chunked``, plain PyTorch
over row chunks of at most ``CHUNK_ELEMS`` distances (still never the full M x N). ``N`` must
be below 2^31 (int32 column indices inside the kernel).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .pairwise import (
    EPS,
    TL_DTYPE,
    KernelConfig,
    block_d,
    common_dtype,
    interpreting,
    prepare,
    row_sqnorms,
    use_tf32,
)

MAX_K = 128
CHUNK_ELEMS = 1 << 24  # distances per chunk in the PyTorch fallback


# --------------------------------------------------------------------------- kernels
@triton.jit
def _knn_fwd_kernel(
    Q, R, Qn, Rn, QL, RL, OutS, OutI, M, N, D, cols_per_split,
    stride_q, stride_r, stride_os, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, USE_TF32: tl.constexpr,
):
    """Running top-KP of ``s_ij = max(qn_i + rn_j - 2 q_i.r_j, 1e-12)`` over the candidate
    columns ``j`` of split ``program_id(1)``; writes the KP (s, j) slots, unsorted, per row."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    qbase = Q + rows64[:, None] * stride_q
    qn = tl.load(Qn + rows, mask=rmask, other=0.0)
    if HAS_LABELS:
        ql = tl.load(QL + rows, mask=rmask, other=0)

    slots = tl.arange(0, KP)
    topd = tl.zeros([BLOCK_M, KP], dtype=tl.float32) + float("inf")
    topi = tl.zeros([BLOCK_M, KP], dtype=tl.int32) + (-1 - slots)[None, :]
    worst = tl.zeros([BLOCK_M], dtype=tl.float32) + float("inf")
    widx = tl.zeros([BLOCK_M], dtype=tl.int32) - 1

    n_start = pid_s * cols_per_split
    n_end = tl.minimum(N, n_start + cols_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        rbase = R + cols.to(tl.int64)[:, None] * stride_r
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            dmask = dd < D
            a = tl.load(qbase + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
            b = tl.load(rbase + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            if USE_TF32:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32")
            else:
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        rn = tl.load(Rn + cols, mask=cmask, other=0.0)
        s = tl.maximum(qn[:, None] + rn[None, :] - 2.0 * acc, 1e-12)
        ok = rmask[:, None] & cmask[None, :]
        if HAS_LABELS:
            rl = tl.load(RL + cols, mask=cmask, other=0)
            ok = ok & (ql[:, None] == rl[None, :])
        if EXCLUDE_SELF:
            ok = ok & (rows[:, None] != cols[None, :])
        # candidates: entries that beat the row's current worst slot
        sm = tl.where(ok & (s < worst[:, None]), s, float("inf"))
        v = tl.min(sm, axis=1)
        while tl.min(v, axis=0) < float("inf"):
            c = tl.min(tl.where(sm == v[:, None], cols[None, :], 2147483647), axis=1)
            take = v < worst
            rep = (topi == widx[:, None]) & take[:, None]
            topd = tl.where(rep, v[:, None], topd)
            topi = tl.where(rep, c[:, None], topi)
            worst = tl.max(topd, axis=1)
            widx = tl.max(tl.where(topd == worst[:, None], topi, -2147483647), axis=1)
            sm = tl.where((sm < worst[:, None]) & (cols[None, :] != c[:, None]), sm, float("inf"))
            v = tl.min(sm, axis=1)

    out = pid_s.to(tl.int64) * stride_os + rows64[:, None] * stride_om + slots[None, :]
    tl.store(OutS + out, topd, mask=rmask[:, None])
    tl.store(OutI + out, topi, mask=rmask[:, None])


@triton.jit
def _knn_bwd_kernel(
    G, Idx, Q, R, dQ, dR, M, D, K,
    stride_gm, stride_gk, stride_im, stride_q, stride_r, stride_dq, stride_dr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For each selected pair ``(i, j = index_ik)``: ``e_ik = ||q_i - r_j||^2`` recomputed by
    direct differences (no GEMM-form cancellation), ``h_ik = g_ik / sqrt(e_ik)`` (0 for
    ``j = -1`` or ``e_ik <= 1e-12``, the clamp); ``dQ_i += h_ik (q_i - r_j)`` (this program owns
    rows i) and ``dR_j -= h_ik (q_i - r_j)`` by atomic adds. Arithmetic in dR's dtype (float32,
    or float64 for float64 inputs); dQ is a buffer of that dtype."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    for kk in range(0, K):
        j = tl.load(Idx + rows64 * stride_im + kk, mask=rmask, other=-1).to(tl.int64)
        g = tl.load(G + rows64 * stride_gm + kk * stride_gk, mask=rmask, other=0.0).to(dR.dtype.element_ty)
        found = rmask & (j >= 0)
        sq = tl.zeros([BLOCK_M], dtype=dR.dtype.element_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = found[:, None] & (dd[None, :] < D)
            q = tl.load(Q + rows64[:, None] * stride_q + dd[None, :], mask=m2, other=0.0).to(dR.dtype.element_ty)
            r = tl.load(R + j[:, None] * stride_r + dd[None, :], mask=m2, other=0.0).to(dR.dtype.element_ty)
            sq += tl.sum((q - r) * (q - r), axis=1)
        ok = found & (sq > 1e-12)
        h = tl.where(ok, g / tl.sqrt(tl.where(ok, sq, 1.0)), 0.0)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = ok[:, None] & (dd[None, :] < D)
            q = tl.load(Q + rows64[:, None] * stride_q + dd[None, :], mask=m2, other=0.0).to(dR.dtype.element_ty)
            r = tl.load(R + j[:, None] * stride_r + dd[None, :], mask=m2, other=0.0).to(dR.dtype.element_ty)
            contrib = h[:, None] * (q - r)
            tl.atomic_add(dR + j[:, None] * stride_dr + dd[None, :], -contrib, mask=m2)
            pq = dQ + rows64[:, None] * stride_dq + dd[None, :]
            tl.store(pq, tl.load(pq, mask=m2, other=0.0) + contrib, mask=m2)


# --------------------------------------------------------------------------- configurations
# largest KP -> (BLOCK_M, BLOCK_N, num_warps): the running top-k costs 2 * BLOCK_M * KP
# registers per program, so BLOCK_M shrinks as k grows.
KP_TABLE = [
    (16, (128, 128, 8)),
    (32, (64, 128, 4)),
    (64, (64, 64, 4)),
    (128, (32, 64, 4)),
]
BLOCK_D_MAX = {True: 64, False: 32}  # half inputs / float32 inputs
NUM_STAGES = 3
BWD_BLOCKS = (64, 64, 4)  # BLOCK_M, BLOCK_D, num_warps


def fwd_config(dtype: torch.dtype, D: int, kp: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the forward kernel."""
    for limit, (bm, bn, w) in KP_TABLE:
        if kp <= limit:
            return bm, bn, block_d(D, BLOCK_D_MAX[dtype != torch.float32]), w, NUM_STAGES
    raise ValueError(f"k padded to {kp} exceeds MAX_K={MAX_K}")


def _build_configs() -> List[KernelConfig]:
    configs = []
    for dtype, ptr in TL_DTYPE.items():
        half = dtype != torch.float32
        for limit, (bm, bn, w) in KP_TABLE:
            # the largest KP of the row (most registers) with every D-chunk
            bd, bdmax = 16, BLOCK_D_MAX[half]
            while bd <= bdmax:
                configs.append(KernelConfig(
                    f"knn_fwd-{ptr[1:]}-kp{limit}-bd{bd}", _knn_fwd_kernel,
                    {"Q": ptr, "R": ptr, "Qn": "*fp32", "Rn": "*fp32", "QL": "*i64", "RL": "*i64",
                     "OutS": "*fp32", "OutI": "*i32", "M": "i32", "N": "i32", "D": "i32",
                     "cols_per_split": "i32", "stride_q": "i64", "stride_r": "i64",
                     "stride_os": "i64", "stride_om": "i64"},
                    {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "KP": limit, "HAS_LABELS": True,
                     "EXCLUDE_SELF": True, "USE_TF32": not half}, w, NUM_STAGES))
                bd *= 2
        bm, bd, w = BWD_BLOCKS
        configs.append(KernelConfig(
            f"knn_bwd-{ptr[1:]}", _knn_bwd_kernel,
            {"G": "*fp32", "Idx": "*i64", "Q": ptr, "R": ptr, "dQ": "*fp32", "dR": "*fp32",
             "M": "i32", "D": "i32", "K": "i32", "stride_gm": "i64", "stride_gk": "i64",
             "stride_im": "i64", "stride_q": "i64", "stride_r": "i64", "stride_dq": "i64",
             "stride_dr": "i64"},
            {"BLOCK_M": bm, "BLOCK_D": bd}, w, 1, gemm=False))
    return configs


#: Every configuration the launchers in this module can choose (for compile tests).
CONFIGS: List[KernelConfig] = _build_configs()


# --------------------------------------------------------------------------- selection
def _num_splits(M: int, N: int, bm: int, bn: int, device: torch.device) -> int:
    """Column ranges per query block: enough programs for ~2 waves on the GPU (1 on the CPU)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    blocks_m = triton.cdiv(M, bm)
    return max(1, min(triton.cdiv(N, bn), triton.cdiv(2 * sms, blocks_m)))


def _finish(s: torch.Tensor, idx: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sort candidate slots (M x C, unsorted) by (s, j), keep ``k``, pad, return (s, index)."""
    idx = idx.to(torch.int64)
    order = torch.argsort(idx, dim=1)  # by index, then a stable sort by distance
    s, idx = torch.gather(s, 1, order), torch.gather(idx, 1, order)
    s, order = torch.sort(s, dim=1, stable=True)
    idx = torch.gather(idx, 1, order)
    s, idx = s[:, :k], idx[:, :k]
    missing = idx < 0
    return s.masked_fill(missing, float("inf")), idx.masked_fill(missing, -1)


def _select_kernel(q, r, k, ql, rl, exclude_self, splits: Optional[int] = None):
    """(squared distance, index), M x k, from the Triton kernel (q, r prepared, same dtype)."""
    M, D = q.shape
    N = r.shape[0]
    kp = triton.next_power_of_2(k)
    bm, bn, bd, w, st = fwd_config(q.dtype, D, kp)
    S = splits or _num_splits(M, N, bm, bn, q.device)
    cols = triton.cdiv(triton.cdiv(N, S), bn) * bn
    S = triton.cdiv(N, cols)
    out_s = torch.empty(S, M, kp, dtype=torch.float32, device=q.device)
    out_i = torch.empty(S, M, kp, dtype=torch.int32, device=q.device)
    qn, rn = row_sqnorms(q), row_sqnorms(r)
    has_labels = ql is not None
    _knn_fwd_kernel[(triton.cdiv(M, bm), S)](
        q, r, qn, rn, ql if has_labels else qn, rl if has_labels else rn, out_s, out_i,
        M, N, D, cols, q.stride(0), r.stride(0), out_s.stride(0), out_s.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, KP=kp, HAS_LABELS=has_labels,
        EXCLUDE_SELF=bool(exclude_self), USE_TF32=use_tf32(q.dtype), num_warps=w, num_stages=st)
    s = out_s.permute(1, 0, 2).reshape(M, S * kp)
    i = out_i.permute(1, 0, 2).reshape(M, S * kp)
    return _finish(s, i, k)


def _select_chunked(q, r, k, ql, rl, exclude_self):
    """Plain-PyTorch selection over row chunks (float64, or k > MAX_K): (squared distance, index)."""
    M, N = q.shape[0], r.shape[0]
    rn = (r * r).sum(1)
    step = max(1, CHUNK_ELEMS // max(N, 1))
    out_s, out_i = [], []
    cols = torch.arange(N, device=q.device)
    for i0 in range(0, M, step):
        qc = q[i0:i0 + step]
        s = ((qc * qc).sum(1)[:, None] + rn[None, :] - 2.0 * (qc @ r.T)).clamp_(min=EPS)
        bad = torch.zeros_like(s, dtype=torch.bool)
        if ql is not None:
            bad |= ql[i0:i0 + step, None] != rl[None, :]
        if exclude_self:
            bad |= (i0 + torch.arange(qc.shape[0], device=q.device))[:, None] == cols[None, :]
        s = s.masked_fill_(bad, float("inf"))
        s, idx = torch.sort(s, dim=1, stable=True)
        s, idx = s[:, :k], idx[:, :k]
        idx = idx.masked_fill(torch.isinf(s), -1)
        out_s.append(s)
        out_i.append(idx)
    s = torch.cat(out_s) if out_s else q.new_empty(0, min(k, N))
    i = torch.cat(out_i) if out_i else torch.empty(0, min(k, N), dtype=torch.int64, device=q.device)
    if s.shape[1] < k:
        s = torch.cat([s, s.new_full((M, k - s.shape[1]), float("inf"))], 1)
        i = torch.cat([i, i.new_full((M, k - i.shape[1]), -1)], 1)
    return s, i


# --------------------------------------------------------------------------- autograd
def _knn_backward(g, index, q, r):
    M, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(M, D, dtype=acc, device=q.device)
    dr = torch.zeros(r.shape[0], D, dtype=acc, device=q.device)
    if M == 0 or D == 0 or index.shape[1] == 0 or r.shape[0] == 0:
        return dq.to(q.dtype), dr.to(r.dtype)
    g = g.to(acc)
    bm, bd, w = BWD_BLOCKS
    bd = min(bd, max(16, triton.next_power_of_2(D)))
    _knn_bwd_kernel[(triton.cdiv(M, bm),)](
        g, index, q, r, dq, dr, M, D, index.shape[1],
        g.stride(0), g.stride(1), index.stride(0), q.stride(0), r.stride(0),
        dq.stride(0), dr.stride(0), BLOCK_M=bm, BLOCK_D=bd, num_warps=w)
    return dq.to(q.dtype), dr.to(r.dtype)


# The operators are registered with torch.library so that torch.compile(fullgraph=True) sees
# two opaque ops (forward selection, backward scatter) instead of tracing the launchers.
@torch.library.custom_op("daal_triton::knn", mutates_args=())
def _knn_op(query: torch.Tensor, ref: torch.Tensor, k: int, query_labels: Optional[torch.Tensor],
            ref_labels: Optional[torch.Tensor], exclude_self: bool, splits: Optional[int]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dist, index)`` of the kNN (see :func:`knn`)."""
    dtype = common_dtype(query, ref)
    q, r = prepare(query, dtype), prepare(ref, dtype)
    ql = rl = None
    if query_labels is not None:
        ql = query_labels.to(torch.int64).contiguous()
        rl = ref_labels.to(torch.int64).contiguous()
    M, N = q.shape[0], r.shape[0]
    if M == 0 or N == 0:
        s = torch.full((M, k), float("inf"), dtype=_dist_dtype(dtype), device=q.device)
        index = torch.full((M, k), -1, dtype=torch.int64, device=q.device)
    elif dtype == torch.float64 or k > MAX_K:
        s, index = _select_chunked(q.to(torch.promote_types(dtype, torch.float32)),
                                   r.to(torch.promote_types(dtype, torch.float32)),
                                   k, ql, rl, exclude_self)
    else:
        s, index = _select_kernel(q, r, k, ql, rl, exclude_self, splits)
    return torch.sqrt(s).contiguous(), index.contiguous()


def _dist_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@_knn_op.register_fake
def _knn_fake(query, ref, k, query_labels, ref_labels, exclude_self, splits):
    M = query.shape[0]
    dist = query.new_empty((M, k), dtype=_dist_dtype(common_dtype(query, ref)))
    return dist, query.new_empty((M, k), dtype=torch.int64)


@torch.library.custom_op("daal_triton::knn_backward", mutates_args=())
def _knn_backward_op(g: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                     ref: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter of ``g`` (M x k) over the selected pairs: ``(dL/dquery, dL/dref)``."""
    dtype = common_dtype(query, ref)
    dq, dr = _knn_backward(g, index, prepare(query, dtype), prepare(ref, dtype))
    return dq.to(query.dtype), dr.to(ref.dtype)


@_knn_backward_op.register_fake
def _knn_backward_fake(g, index, query, ref):
    return torch.empty_like(query), torch.empty_like(ref)


def _knn_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.mark_non_differentiable(output[1])


def _knn_autograd_backward(ctx, g, _g_index):
    query, ref, index = ctx.saved_tensors
    dq, dr = torch.ops.daal_triton.knn_backward(g.contiguous(), index, query, ref)
    return dq, dr, None, None, None, None, None


_knn_op.register_autograd(_knn_autograd_backward, setup_context=_knn_setup_context)


def knn(
    query: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    *,
    query_labels: Optional[torch.Tensor] = None,
    ref_labels: Optional[torch.Tensor] = None,
    exclude_self: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest rows of ``ref`` (N x D) for each row of ``query`` (M x D).

    Returns ``(dist, index)``, each M x k: ``dist`` float32 (float64 for float64 inputs),
    ``index`` int64, sorted ascending with ties to the smaller index; with labels only
    ``ref_labels[j] == query_labels[i]`` counts; ``exclude_self`` drops ``j == i``; rows with
    fewer than ``k`` candidates are padded with ``inf`` / ``-1``. ``dist`` is differentiable in
    ``query`` and ``ref``; ``index`` is not. Never allocates an M x N buffer.
    """
    return _knn(query, ref, k, query_labels=query_labels, ref_labels=ref_labels,
                exclude_self=exclude_self)


def _knn(query, ref, k, *, query_labels=None, ref_labels=None, exclude_self=False, splits=None):
    if (query_labels is None) != (ref_labels is None):
        raise ValueError("query_labels and ref_labels must be given together")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if query.ndim != 2 or ref.ndim != 2 or query.shape[1] != ref.shape[1]:
        raise ValueError(f"query and ref must be M x D and N x D, got {tuple(query.shape)} and {tuple(ref.shape)}")
    dtype = common_dtype(query, ref)
    if dtype not in TL_DTYPE and dtype != torch.float64:
        raise ValueError(f"knn takes float16, bfloat16, float32 or float64 inputs, got {dtype}")
    if ref.shape[0] >= 2**31:
        raise ValueError(f"ref has {ref.shape[0]} rows; the kernel's column indices are int32 (< 2^31)")
    return _knn_op(query, ref, k, query_labels, ref_labels, bool(exclude_self), splits)
