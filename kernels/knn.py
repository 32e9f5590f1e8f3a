"""Fused k-nearest neighbours: tiled distance GEMM + running top-k, never materialising M x N
(docs/method.md, "The forward pass", step 3).

For each query row ``i`` the kernel finds the ``k`` reference rows ``j`` with the smallest

    s_ij = max(||q_i||^2 + ||r_j||^2 - 2 q_i . r_j, eps)         (eps = 1e-12)

among the candidates (``ref_labels[j] == query_labels[i]`` when labels are given, ``j != i``
with ``exclude_self``), ordered by ``(s_ij, j)`` (ties go to the smaller index); the GEMM form only
*selects*: the ``k`` selected distances are then recomputed by direct differences,
``||q_i - r_j||^2`` in float32 (``_knn_dist_kernel``, M x k x D work; docs/method.md, "Numerics"),
re-sorted by ``(s, j)``, and returned as ``dist = sqrt(max(s, eps))`` (a duplicate reads the clamp
1e-6) with ``index`` (M x k, sorted ascending, padded with ``inf`` / ``-1`` when a row has fewer
than ``k`` candidates) — the semantics of ``daal_triton.reference.knn``, and the same function the
backward differentiates.

Forward kernel (``_knn_fwd_kernel``), one program per BLOCK_M queries (and, when M alone gives
too few programs for the GPU, per one of ``S`` contiguous column ranges of the references):

1. for each BLOCK_N tile of references: ``acc = Q_blk R_tile^T`` with ``tl.dot`` over D in
   BLOCK_D chunks (tensor cores, float32 accumulation; float32 inputs follow
   ``torch.get_float32_matmul_precision()`` on a GPU — 3xTF32 for "highest", single-pass TF32 on
   rounded operands for "high"/"medium" — and IEEE under the interpreter), then the epilogue ``s = qn + rn - 2 acc`` with the masks;
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
nondeterministic. When the references need no gradient (a memory bank: ``ref`` does not require
grad) the backward computes no dRef at all: no N x D buffer, no atomics (``HAS_DR = False``).

Memory: forward O((M + N) + M * S * KP) besides the inputs (the squared norms and the slot
buffers), never M x N; backward float32 buffers dQ (M x D) and dR (N x D, for the atomics; none without a ref
gradient), cast to the input dtypes at the end; nothing of size M x k x D (the exact recompute
reads the k selected rows, it does not gather them).
Inputs are copied once with ``.contiguous()`` only when their rows are not contiguous.

Limits: ``k <= MAX_K`` (128) runs the kernel; larger ``k`` runs ``_select_chunked``, plain
PyTorch over row chunks of at most ``CHUNK_ELEMS`` distances (still never the full M x N).
float64 inputs raise ``ValueError`` (``daal_triton.knn`` routes them to the reference). ``N``
must be below 2^31 (int32 column indices inside the kernel).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    EPS,
    TL_EPS,
    KernelConfig,
    KernelSpec,
    Launch,
    _dot_rows,
    compute_dtype,
    expand,
    family,
    dot_flags,
    gpu_dot_variants,
    prepare,
    row_sqnorms,
)

MAX_K = 128
CHUNK_ELEMS = 1 << 24  # distances per chunk in the PyTorch fallback


# --------------------------------------------------------------------------- kernels
@triton.jit
def _knn_fwd_kernel(
    q_ptr, r_ptr, qn_ptr, rn_ptr, ql_ptr, rl_ptr, top_s_ptr, top_i_ptr, M, N, D, cols_per_split,
    stride_q_m, stride_r_n, stride_top_s, stride_top_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):
    """Running top-KP of ``s_ij = max(qn_i + rn_j - 2 q_i.r_j, eps)`` over the candidate
    columns ``j`` of split ``program_id(1)``; writes the KP (s, j) slots, unsorted, per row.

    Args:
        q_ptr, r_ptr: M x D queries and N x D references (one dtype), unit column stride.
        qn_ptr, rn_ptr: their squared row norms (float32).
        ql_ptr, rl_ptr: query and reference labels (int64; read only with HAS_LABELS).
        top_s_ptr, top_i_ptr: S x M x KP outputs: squared distances (float32) and column
            indices (int32) of the slots, unit slot stride.
        M, N, D: sizes. cols_per_split: reference columns per split (a multiple of BLOCK_N).
        stride_q_m, stride_r_n: row strides of q and r.
        stride_top_s, stride_top_m: split and row strides of both outputs.
        BLOCK_M, BLOCK_N: queries x references per tile. BLOCK_D: D-chunk. KP: slots per row
            (a power of two >= k). HAS_LABELS: same-label candidates only. EXCLUDE_SELF: drop
            ``j == i``. INPUT_PRECISION: ``tl.dot``'s input precision. ROUND_TF32: round float32
            operands to TF32 first (``_common.round_operands``; qn/rn are norms of rounded rows).
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_m * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    q_rows = q_ptr + rows64[:, None] * stride_q_m
    # masked rows and columns read an infinite norm, so their s is inf and never a candidate:
    # the bounds need no mask per tile
    qn = tl.load(qn_ptr + rows, mask=rmask, other=float("inf"))
    if HAS_LABELS:
        ql = tl.load(ql_ptr + rows, mask=rmask, other=0)

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
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _dot_rows(q_rows, r_ptr + cols.to(tl.int64)[:, None] * stride_r_n, rmask, cmask, D,
                        acc, BLOCK_D, INPUT_PRECISION, ROUND_TF32)
        rn = tl.load(rn_ptr + cols, mask=cmask, other=float("inf"))
        if HAS_LABELS:
            rl = tl.load(rl_ptr + cols, mask=cmask, other=0)
        s = tl.maximum(qn[:, None] + rn[None, :] - 2.0 * acc, TL_EPS)
        if HAS_LABELS:
            s = tl.where(ql[:, None] == rl[None, :], s, float("inf"))
        if EXCLUDE_SELF:
            # only a tile that meets the diagonal holds self pairs
            if (n0 < row_lo + BLOCK_M) & (n0 + BLOCK_N > row_lo):
                s = tl.where(rows[:, None] == cols[None, :], float("inf"), s)
        # candidates: entries that beat the row's current worst slot
        sm = tl.where(s < worst[:, None], s, float("inf"))
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

    out = pid_s.to(tl.int64) * stride_top_s + rows64[:, None] * stride_top_m + slots[None, :]
    tl.store(top_s_ptr + out, topd, mask=rmask[:, None])
    tl.store(top_i_ptr + out, topi, mask=rmask[:, None])


@triton.jit
def _knn_dist_kernel(
    idx_ptr, q_ptr, r_ptr, out_ptr, M, D, K, stride_idx_m, stride_q_m, stride_r_n, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out_ik = ||q_i - r_j||^2`` with ``j = index_ik``, by direct differences in float32 (the
    exact recompute of the selected distances; ``inf`` where ``j = -1``). The same arithmetic
    (float32 differences, BLOCK_D chunks) as the backward's recompute, so value and gradient
    are one function.

    Args:
        idx_ptr: M x K selected columns (int64, -1 for none), unit column stride.
        q_ptr, r_ptr: M x D queries and N x D references, unit column stride.
        out_ptr: M x K float32 output, unit column stride.
        M, D, K: sizes. stride_idx_m, stride_q_m, stride_r_n, stride_out_m: row strides.
        BLOCK_M: queries per program. BLOCK_D: D-chunk.
    """
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    for kk in range(0, K):
        j = tl.load(idx_ptr + rows64 * stride_idx_m + kk, mask=rmask, other=-1).to(tl.int64)
        found = rmask & (j >= 0)
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = found[:, None] & (dd[None, :] < D)
            q = tl.load(q_ptr + rows64[:, None] * stride_q_m + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + j[:, None] * stride_r_n + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            sq += tl.sum((q - r) * (q - r), axis=1)
        sq = tl.where(found, sq, float("inf"))
        tl.store(out_ptr + rows64 * stride_out_m + kk, sq, mask=rmask)


@triton.jit
def _knn_bwd_kernel(
    g_ptr, idx_ptr, q_ptr, r_ptr, dq_ptr, dr_ptr, M, D, K,
    stride_g_m, stride_g_k, stride_idx_m, stride_q_m, stride_r_n, stride_dq_m, stride_dr_n,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DR: tl.constexpr,
):
    """For each selected pair ``(i, j = index_ik)``: ``e_ik = ||q_i - r_j||^2`` recomputed by
    direct differences (no GEMM-form cancellation), ``h_ik = g_ik / sqrt(e_ik)`` (0 for
    ``j = -1`` or ``e_ik <= eps``, the clamp); ``dQ_i += h_ik (q_i - r_j)`` (this program owns
    rows i) and ``dR_j -= h_ik (q_i - r_j)`` by atomic adds. Arithmetic in float32.

    Args:
        g_ptr: M x K incoming gradient of the distances (float32).
        idx_ptr: M x K selected columns (int64, -1 for none), unit column stride.
        q_ptr, r_ptr: M x D queries and N x D references, unit column stride.
        dq_ptr, dr_ptr: float32 M x D and N x D gradient buffers, zero-filled, unit column stride.
        M, D, K: sizes.
        stride_g_m, stride_g_k: strides of g. stride_idx_m: row stride of idx.
        stride_q_m, stride_r_n, stride_dq_m, stride_dr_n: row strides of q, r, dq, dr.
        BLOCK_M: queries per program. BLOCK_D: D-chunk. HAS_DR: accumulate dR (false when the
            references need no gradient, e.g. a memory bank: no atomics, dr_ptr unused).
    """
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    acc_ty = dr_ptr.dtype.element_ty
    for kk in range(0, K):
        j = tl.load(idx_ptr + rows64 * stride_idx_m + kk, mask=rmask, other=-1).to(tl.int64)
        g = tl.load(g_ptr + rows64 * stride_g_m + kk * stride_g_k, mask=rmask, other=0.0).to(acc_ty)
        found = rmask & (j >= 0)
        sq = tl.zeros([BLOCK_M], dtype=acc_ty)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = found[:, None] & (dd[None, :] < D)
            q = tl.load(q_ptr + rows64[:, None] * stride_q_m + dd[None, :], mask=m2, other=0.0).to(acc_ty)
            r = tl.load(r_ptr + j[:, None] * stride_r_n + dd[None, :], mask=m2, other=0.0).to(acc_ty)
            sq += tl.sum((q - r) * (q - r), axis=1)
        ok = found & (sq > TL_EPS)
        h = tl.where(ok, g / tl.sqrt(tl.where(ok, sq, 1.0)), 0.0)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = ok[:, None] & (dd[None, :] < D)
            q = tl.load(q_ptr + rows64[:, None] * stride_q_m + dd[None, :], mask=m2, other=0.0).to(acc_ty)
            r = tl.load(r_ptr + j[:, None] * stride_r_n + dd[None, :], mask=m2, other=0.0).to(acc_ty)
            contrib = h[:, None] * (q - r)
            if HAS_DR:
                tl.atomic_add(dr_ptr + j[:, None] * stride_dr_n + dd[None, :], -contrib, mask=m2)
            pq = dq_ptr + rows64[:, None] * stride_dq_m + dd[None, :]
            tl.store(pq, tl.load(pq, mask=m2, other=0.0) + contrib, mask=m2)


KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _knn_fwd_kernel,
        "q_ptr r_ptr: *x; qn_ptr rn_ptr: *fp32; ql_ptr rl_ptr: *i64; top_s_ptr: *fp32; "
        "top_i_ptr: *i32; M N D cols_per_split: i32; "
        "stride_q_m stride_r_n stride_top_s stride_top_m: i64",
        rows=("stride_q_m", "stride_r_n"), other=("stride_top_s", "stride_top_m")),
    "bwd": KernelSpec(
        _knn_bwd_kernel,
        "g_ptr: *fp32; idx_ptr: *i64; q_ptr r_ptr: *x; dq_ptr dr_ptr: *fp32; M D K: i32; "
        "stride_g_m stride_g_k stride_idx_m stride_q_m stride_r_n stride_dq_m stride_dr_n: i64",
        unit=("stride_g_k",), rows=("stride_q_m", "stride_r_n", "stride_dq_m", "stride_dr_n"),
        other=("stride_g_m", "stride_idx_m"), gemm=False),
    "dist": KernelSpec(
        _knn_dist_kernel,
        "idx_ptr: *i64; q_ptr r_ptr: *x; out_ptr: *fp32; M D K: i32; "
        "stride_idx_m stride_q_m stride_r_n stride_out_m: i64",
        rows=("stride_q_m", "stride_r_n"), other=("stride_idx_m", "stride_out_m"), gemm=False),
}


# --------------------------------------------------------------------------- configurations
#: The forward's entries by the largest KP they serve -> (BLOCK_M, BLOCK_N, num_warps): the
#: running top-k costs 2 * BLOCK_M * KP registers per program, so BLOCK_M shrinks as k grows.
_FWD_BLOCKS = {16: (128, 128, 8), 32: (64, 128, 4), 64: (64, 64, 4), 128: (32, 64, 4)}
KP_ROWS = tuple(_FWD_BLOCKS)


def _fwd_configs(largest_block_d: int, stages: Optional[Dict[int, int]] = None) -> Dict[str, KernelConfig]:
    stages = stages or {}
    return {f"fwd_kp{kp}": KernelConfig({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w,
                                        num_stages=stages.get(kp, 3), block_d=(16, largest_block_d))
            for kp, (bm, bn, w) in _FWD_BLOCKS.items()}


_BWD = KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1, block_d=(16, 64))
#: ``CONFIGS[family][entry]``: ``fwd_kp<KP>`` (the forward for padded k up to KP), ``dist`` (the
#: exact recompute of the selected distances), ``bwd`` and ``bwd_noref`` (the backward without
#: dRef: the references need no gradient).
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "half": dict(_fwd_configs(64), dist=_BWD, bwd=_BWD, bwd_noref=_BWD),
    # float32: BLOCK_D 16 and 4 stages at KP 32 keep the 3xTF32 builds' sm_90 stack at or below
    # what the single-pass build had (docs/kernels.md, "Compile facts")
    "fp32": dict(_fwd_configs(16, {32: 4}), dist=_BWD, bwd=_BWD, bwd_noref=_BWD),
}
_SPEC_OF = {**{f"fwd_kp{kp}": KERNELS["fwd"] for kp in KP_ROWS}, "dist": KERNELS["dist"],
            "bwd": KERNELS["bwd"], "bwd_noref": KERNELS["bwd"]}


def fwd_entry(kp: int) -> str:
    """The ``CONFIGS`` entry of the forward for ``kp`` slots."""
    for limit in KP_ROWS:
        if kp <= limit:
            return f"fwd_kp{limit}"
    raise ValueError(f"k padded to {kp} exceeds MAX_K={MAX_K}")


def _gpu_flags(entry: str, dtype: torch.dtype):
    if entry == "dist":
        return {}
    if entry.startswith("bwd"):
        return {"HAS_DR": entry == "bwd"}
    base = {"KP": int(entry[len("fwd_kp"):]), "HAS_LABELS": True, "EXCLUDE_SELF": True}
    return [dict(base, **fl) for fl in gpu_dot_variants(dtype)]


def launches() -> List[Launch]:
    """Every configuration the launchers of this module can pick on a GPU (compile tests); the
    forward with the largest KP of each entry (the most registers), in each float32 precision
    variant (``_common.gpu_dot_variants``)."""
    return expand("knn", CONFIGS, _SPEC_OF, _gpu_flags)


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
    cfg = CONFIGS[family(q.dtype)][fwd_entry(kp)]
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    S = splits or _num_splits(M, N, bm, bn, q.device)
    cols = triton.cdiv(triton.cdiv(N, S), bn) * bn
    S = triton.cdiv(N, cols)
    out_s = torch.empty(S, M, kp, dtype=torch.float32, device=q.device)
    out_i = torch.empty(S, M, kp, dtype=torch.int32, device=q.device)
    flags = dot_flags(q.dtype)
    qn, rn = row_sqnorms(q, flags["INPUT_PRECISION"]), row_sqnorms(r, flags["INPUT_PRECISION"])
    has_labels = ql is not None
    _knn_fwd_kernel[(triton.cdiv(M, bm), S)](
        q, r, qn, rn, ql if has_labels else qn, rl if has_labels else rn, out_s, out_i,
        M, N, D, cols, q.stride(0), r.stride(0), out_s.stride(0), out_s.stride(1),
        KP=kp, HAS_LABELS=has_labels, EXCLUDE_SELF=bool(exclude_self), **flags, **cfg.launch(D))
    s = out_s.permute(1, 0, 2).reshape(M, S * kp)
    i = out_i.permute(1, 0, 2).reshape(M, S * kp)
    return _finish(s, i, k)


def _select_chunked(q, r, k, ql, rl, exclude_self):
    """Plain-PyTorch selection over row chunks (k > MAX_K): (squared distance, index)."""
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


# --------------------------------------------------------------------------- exact distances
def _exact(index: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dist, index)`` of the selected pairs: ``||q_i - r_j||^2`` recomputed by direct differences
    (``_knn_dist_kernel``, M x k x D work), re-sorted by ``(s, j)`` (the selection's GEMM form may
    order close pairs differently), ``dist = sqrt(max(s, eps))`` (duplicates: the clamp, 1e-6) and
    ``inf`` / ``-1`` padding kept."""
    M, K = index.shape
    s = torch.empty(M, K, dtype=torch.float32, device=q.device)
    if M and K:
        cfg = CONFIGS[family(q.dtype)]["dist"]
        _knn_dist_kernel[(triton.cdiv(M, cfg.blocks["BLOCK_M"]),)](
            index, q, r, s, M, q.shape[1], K, index.stride(0), q.stride(0), r.stride(0), s.stride(0),
            **cfg.launch(q.shape[1]))
    s, index = _sort_pairs(s, index)
    return torch.sqrt(s.clamp(min=EPS)), index


def _sort_pairs(s: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s, idx)`` rows sorted by ``(s, j)``: ties to the smaller index; padding (``inf``,
    ``-1``) stays last."""
    key = torch.where(idx < 0, torch.iinfo(torch.int64).max, idx)
    order = torch.argsort(key, dim=1)  # by index, then a stable sort by distance
    s, idx = torch.gather(s, 1, order), torch.gather(idx, 1, order)
    s, order = torch.sort(s, dim=1, stable=True)
    return s, torch.gather(idx, 1, order)


# --------------------------------------------------------------------------- autograd
def _knn_backward(g, index, q, r, ref_grad: bool = True):
    M, D = q.shape
    dq = torch.zeros(M, D, dtype=torch.float32, device=q.device)
    dr = torch.zeros(r.shape[0] if ref_grad else 0, D, dtype=torch.float32, device=q.device)
    if M == 0 or D == 0 or index.shape[1] == 0 or r.shape[0] == 0:
        return dq.to(q.dtype), dr.to(r.dtype)
    g = g.to(torch.float32)
    cfg = CONFIGS[family(q.dtype)]["bwd" if ref_grad else "bwd_noref"]
    _knn_bwd_kernel[(triton.cdiv(M, cfg.blocks["BLOCK_M"]),)](
        g, index, q, r, dq, dr if ref_grad else dq, M, D, index.shape[1],
        g.stride(0), g.stride(1), index.stride(0), q.stride(0), r.stride(0),
        dq.stride(0), dr.stride(0) if ref_grad else dq.stride(0), HAS_DR=ref_grad, **cfg.launch(D))
    return dq.to(q.dtype), dr.to(r.dtype)


# The operators are registered with torch.library so that torch.compile(fullgraph=True) sees
# two opaque ops (forward selection, backward scatter) instead of tracing the launchers.
@torch.library.custom_op("daal_triton::knn", mutates_args=())
def _knn_op(query: torch.Tensor, ref: torch.Tensor, k: int, query_labels: Optional[torch.Tensor],
            ref_labels: Optional[torch.Tensor], exclude_self: bool, splits: Optional[int]
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dist, index)`` of the kNN (see :func:`knn`)."""
    dtype = compute_dtype("knn", query, ref)
    q, r = prepare(query, dtype), prepare(ref, dtype)
    ql = rl = None
    if query_labels is not None:
        ql = query_labels.to(torch.int64).contiguous()
        rl = ref_labels.to(torch.int64).contiguous()
    M, N = q.shape[0], r.shape[0]
    if M == 0 or N == 0:
        dist = torch.full((M, k), float("inf"), dtype=torch.float32, device=q.device)
        index = torch.full((M, k), -1, dtype=torch.int64, device=q.device)
        return dist, index
    if k > MAX_K:
        _, index = _select_chunked(q.float(), r.float(), k, ql, rl, exclude_self)
    else:
        _, index = _select_kernel(q, r, k, ql, rl, exclude_self, splits)
    dist, index = _exact(index.contiguous(), q, r)
    return dist.contiguous(), index.contiguous()


@_knn_op.register_fake
def _knn_fake(query, ref, k, query_labels, ref_labels, exclude_self, splits):
    M = query.shape[0]
    dist = query.new_empty((M, k), dtype=torch.float32)
    return dist, query.new_empty((M, k), dtype=torch.int64)


@torch.library.custom_op("daal_triton::knn_backward", mutates_args=())
def _knn_backward_op(g: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                     ref: torch.Tensor, ref_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter of ``g`` (M x k) over the selected pairs: ``(dL/dquery, dL/dref)``; without
    ``ref_grad`` dL/dref is not computed (an empty 0 x D tensor: no N x D buffer, no atomics)."""
    dtype = compute_dtype("knn", query, ref)
    dq, dr = _knn_backward(g, index, prepare(query, dtype), prepare(ref, dtype), ref_grad)
    return dq.to(query.dtype), dr.to(ref.dtype)


@_knn_backward_op.register_fake
def _knn_backward_fake(g, index, query, ref, ref_grad):
    rows = ref.shape[0] if ref_grad else 0
    return torch.empty_like(query), ref.new_empty((rows, ref.shape[1]))


def _knn_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the index


def _knn_autograd_backward(ctx, g, _g_index):
    query, ref, index = ctx.saved_tensors
    if g is None:
        return (None,) * 7
    ref_grad = bool(ctx.needs_input_grad[1])
    dq, dr = torch.ops.daal_triton.knn_backward(g.contiguous(), index, query, ref, ref_grad)
    return dq, dr if ref_grad else None, None, None, None, None, None


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

    Returns ``(dist, index)``, each M x k: ``dist`` float32 (float64 inputs raise ``ValueError``),
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
    compute_dtype("knn", query, ref)
    if ref.shape[0] >= 2**31:
        raise ValueError(f"ref has {ref.shape[0]} rows; the kernel's column indices are int32 (< 2^31)")
    return _knn_op(query, ref, k, query_labels, ref_labels, bool(exclude_self), splits)
