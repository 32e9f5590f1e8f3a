"""Fused k-nearest neighbours: tiled distance GEMM + running top-k, never materialising M x N
(docs/method.md, "The forward pass", step 3).

For each query row ``i`` the kernel finds the ``k`` reference rows ``j`` with the smallest

    s_ij = max(||q_i||^2 + ||r_j||^2 - 2 q_i . r_j, eps)         (eps = 1e-12)

among the candidates (``ref_labels[j] == query_labels[i]`` when labels are given, ``j != i``
with ``exclude_self``), ordered by ``(s_ij, j)`` (ties go to the smaller index); the GEMM form only
*selects*: the ``k`` selected distances are then recomputed by direct differences,
``||q_i - r_j||^2`` in float32 (M x k x D work; docs/method.md, "Numerics"), re-sorted by
``(s, j)``, and returned as ``dist = sqrt(max(s, eps))`` (a duplicate reads the clamp 1e-6) with
``index`` (M x k, sorted ascending, padded with ``inf`` / ``-1`` when a row has fewer than ``k``
candidates) — the semantics of ``daal_triton.reference.knn``, and the same function the backward
differentiates.

Launches of one forward (``k <= MAX_K``): the squared row norms (once when ``query is ref``, as
in the loss), ``_knn_fwd_kernel`` (selection) and ``_knn_finish_kernel`` (everything after it);
no other operation but the output allocations.

Forward kernel (``_knn_fwd_kernel``), one program per BLOCK_M queries (and, when M alone gives
too few programs for the GPU, per one of ``S`` contiguous column ranges of the references):

1. for each BLOCK_N tile of references: ``acc = Q_blk R_tile^T`` with ``tl.dot`` over D in
   BLOCK_D chunks (tensor cores, float32 accumulation; float32 inputs follow
   ``torch.get_float32_matmul_precision()`` on a GPU — 3xTF32 for "highest", single-pass TF32 on
   rounded operands for "high"/"medium" — and IEEE under the interpreter), then the epilogue ``s = qn + rn - 2 acc`` with the masks;
   the chunks arrive through pointer loads or, with ``DAAL_KNN_LOADS=tma`` where eligible
   (:func:`_tma_eligible`), through tensor descriptors (Hopper's TMA unit): the same dots;
   by default (``DAAL_KNN_TILES=narrow``) a float16/bfloat16 forward with k <= 16 on a GPU with
   TMA (sm_90, sm_100) and enough query rows to fill it (``NARROW_MIN_WAVES``) runs on 64 x 128
   tiles, 4 warps, through descriptors (``fwd_narrow``:
   three programs per SM, so one program's merge overlaps another's MMAs; the 2026-12-04 H200
   run timed it 1.36-1.37x faster than the 128 x 128 table entry at 20k and 60k rows:
   :data:`NARROW_ENTRY`); ``DAAL_KNN_TILES=table`` keeps the table's ``fwd_kp*`` entries (the
   default before), and with ``DAAL_KNN_TILES=wide`` a retrieval's forward (k <= 8, no labels,
   where the descriptors apply: :func:`forward_entry`) runs on 256 x 128 tiles (``fwd_wide``),
   and with ``DAAL_KNN_TILES=gluon`` (``gluon128``) on sm_90 the Gluon forward of
   kernels/knn_gluon.py (its queries resident in shared memory, 64 (128) rows per program;
   candidates no GPU has timed: :data:`GLUON_ENTRIES`);
2. merge into a running top-k held in registers: ``KP = next_pow2(k)`` slots per row
   (distance, index), *unsorted*, with the row's worst entry ``(worst, widx)`` (the largest in
   ``(s, j)`` order). Tile entries with ``s < worst`` are candidates, counted per row once
   per tile (``c_i``); the merge runs ``R = min(KP, max_i c_i)`` rounds (the counted merge): each row's
   smallest remaining candidate and its column come from one reduction (``tl.min(...,
   return_indices=True)``, ties -> the smaller column); rows where it beats the worst overwrite
   their worst slot with it and recompute the worst, and every row masks the entry it just
   looked at. No block-wide reduction inside the rounds; a tile without candidates runs none.
   (The checked merge, ``DAAL_KNN_MERGE=checked``, selectable for k <= 16 (the GPU runs
   decided for the counted one), runs rounds while any row's smallest beats its worst: a
   block-wide test each, and one more round that finds nothing; the same slots, bit for bit.) Columns arrive in increasing
   order within a program, so a tie with the worst never displaces it (it has the smaller
   index). Empty slots hold ``(inf, -1 - slot)`` so every slot is distinct. The float16/bfloat16
   forward's epilogue is the lean one by default (``DAAL_KNN_EPILOGUE=lean``, ``LEAN``: the
   reference norms padded with ``inf`` to whole tiles and read unmasked, the counts summed in
   float32, the first round peeled out of the rounds loop, and, in the narrow entry, the self
   mask only in a branch for the tiles that meet the diagonal): the same slots bit for bit with
   fewer instructions per tile (docs/kernels.md, "A leaner epilogue"); ``plain`` keeps the
   earlier one (float32's, whose 3xTF32 build spills with the lean one).
3. the KP slots (per column range) are written out (S x M x KP, small), unsorted.

Finish (``_knn_finish_kernel``), one program per BLOCK_M queries: ``k`` rounds of
min-extraction over the int64 key ``bits(s) << 32 | j`` (``s >= 0``, so its bits order like its
value; empty slots sort last) pick the row's ``k`` best of its ``S x KP`` slots in ``(s, j)``
order — this also merges the S column ranges; each pick's ``||q_i - r_j||^2`` is recomputed
by direct differences (float32, BLOCK_D chunks, the arithmetic of the backward's recompute); ``k``
more rounds over the exact keys (in registers) re-sort them by ``(s, j)``; ``dist =
sqrt_rn(max(s, eps))`` (``inf`` for padding) and ``index`` (int64, ``-1`` for padding) are stored
in their final M x k form. With one column split and ``KP <= FUSED_FINISH_KP``
(``DAAL_LAUNCHES=merged``, the default) the forward kernel does this itself (``FINISH``): its
program holds its rows' final slots, so the first selection runs over them in registers; each
family's forward and finish (and backward) take the same D-chunk, so the result is the same bit
for bit and one launch is saved (the loss's B = 180 batch: docs/kernels.md, "Fewer launches").

(``DAAL_KNN_SELECT=threshold``, a candidate: float16/bfloat16 searches without labels select
the same neighbours without the running merge instead: a bound from a 1 / 16 sample, a filter
that lists the few entries below it, a selection among them; kernels/knn_threshold.py.)

(An earlier finish of PyTorch sorts, the recompute alone and a re-sort, ~20 launches more, was
removed after the 2026-11-30 H200 run measured the fused one 1.45-3.3x faster; docs/kernels.md,
"Measured results".)

Backward (``_knn_bwd_kernel``): ``dist_ik = d(q_i, r_j)`` with ``j = index_ik``, so with
``h_ik = g_ik / sqrt(||q_i - r_j||^2)`` (0 where ``j = -1`` or the clamp binds; the squared
distance is recomputed from direct differences, one extra pass over the k selected rows,
because the GEMM form loses digits exactly for the close pairs a kNN selects)::

    dL/dq_i = sum_k h_ik (q_i - r_j)          (accumulated by the row's one program)
    dL/dr_j = -sum_{(i,k): index_ik = j} h_ik (q_i - r_j)   (atomic adds, fp32 buffer)

a scatter over the M x k selected pairs; atomics make dRef's summation order (last bits)
nondeterministic. Under ``torch.use_deterministic_algorithms(True)`` the kernel stores each
pair's term instead (an M k x D float32 buffer, ``DR_PAIRS``) and ``index_put_(accumulate=True)``
sums them by reference row (sorted: deterministic). When the references need no gradient
(``ref`` does not require grad: a bank passed alone, or ``MemoryBank.with_batch``'s detached
``cat([emb, bank])``) the backward computes no dRef at all: no N x D buffer, no atomics
(``HAS_DR = False``). With ``batch_rows = b`` (the loss's ``ref_includes_batch=True`` on such
a reference set: ``ref[:b]`` *are* the query's first rows) the b batch rows' reference-role
term still reaches dQ: the same launch scatters the pairs with ``j < b`` (``N_DR = b``) into a
b x D dR that is added to ``dQ[:b]``: O(M + b) x D float32, never N x D (under deterministic
algorithms its per-pair buffer, M x k x D float32, as below).

Memory: forward O((M + N) + M * S * KP) besides the inputs (the squared norms and the slot
buffers), never M x N; backward float32 buffers dQ (M x D; not zero-filled: the row's program
stores its first pair's term, then adds) and dR (N x D, zero-filled for the atomics; none
without a ref gradient, b x D with ``batch_rows``), cast to the input dtypes at the end (no
cast when they are float32);
nothing of size M x k x D (the exact recompute reads the k selected rows, it does not gather
them) but the per-pair dRef buffer under deterministic algorithms.
Inputs are read in place when their rows are contiguous and 16-aligned (width, row stride and
start: ``_common.ALIGN``); other rows are copied once, padded with zero columns to a multiple of
16 where the width is not one (``DAAL_ALIGN_D=off``: unpadded, copied only when not contiguous).

Limits: ``k <= MAX_K`` (128) runs the kernels; larger ``k`` runs ``_select_chunked``, plain
PyTorch over row chunks of at most ``CHUNK_ELEMS`` distances (still never the full M x N),
then the exact recompute alone (``_knn_dist_kernel``), a PyTorch re-sort (``_sort_pairs``) and
the square root (``_exact``).
float64 inputs raise ``ValueError`` (``daal_triton.knn`` routes them to the reference). ``N``
must be below 2^31 (int32 column indices inside the kernel).
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.experimental.gluon import language as gl
from triton.language.target_info import cuda_capability_geq
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (
    cdiv,
    next_pow2,
    EPS,
    TL_EPS,
    KernelConfig,
    KernelSpec,
    Launch,
    _dot_chunk,
    _dot_desc_chunk,
    _dot_tile,
    align_rows,
    columns,
    compute_dtype,
    device_capability,
    direct,
    eager,
    expand,
    family,
    dot_flags,
    env_choice,
    triton_release,
    gpu_dot_variants,
    interpreting,
    merged_launches,
    prepare,
    row_sqnorms,
    SQNORM_CONFIG,
    sm_count,
    wave_split,
)

MAX_K = 128
CHUNK_ELEMS = 1 << 24  # distances per chunk in the PyTorch fallback


# --------------------------------------------------------------------------- kernels
@triton.jit
def _knn_merge_tile(acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr,
                    topd, topi, worst, widx, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    KP: tl.constexpr, HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
                    COUNTED: tl.constexpr, LEAN: tl.constexpr, GLUON: tl.constexpr = False):
    """One tile's epilogue: ``s = max(qn + rn - 2 acc, eps)`` (label and self masks), merged
    into the running top-KP ``(topd, topi)`` of each row (``worst``/``widx``: the row's worst
    slot and its column). Returns the updated ``(topd, topi, worst, widx)``.

    Each round, every row extracts its smallest remaining candidate (``s`` below the row's
    worst at the tile's start; ties: smaller column) and, if it beats the current worst, puts
    it in the worst slot. How many rounds:

    - ``COUNTED`` (the default): ``R = min(KP, max_i c_i)``, ``c_i`` the row's candidates
      counted once per tile (one row sum and one block-wide max per tile). ``R`` is enough: a
      row's extractions ascend, so after ``c_i`` of them (or ``KP``, when all its slots hold
      this tile's entries) nothing of the row can enter. No block-wide reduction inside the
      rounds, and a tile without candidates runs none.
    - checked (``DAAL_KNN_MERGE=checked``): rounds while any row's extraction beats its worst,
      a block-wide reduction per round and one more round that finds nothing.

    Both extract the same entries in the same order: the same slots, bit for bit.

    ``GLUON``: called from the Gluon forward (``kernels/knn_gluon.py``), whose tensors carry
    explicit layouts (:func:`_row_argmin`).

    ``LEAN`` (``DAAL_KNN_EPILOGUE=lean``, the default for float16/bfloat16): the same slots with
    fewer instructions per tile: the reference norms are read without a bounds mask (the
    launcher pads them with ``inf`` to whole tiles: ``row_sqnorms(pad=BLOCK_N)``), the counts
    are summed in float32 (exact: at most BLOCK_N; two sm_90 instructions per entry instead of
    three), and the first round is peeled out of the loop, whose spent-entry mask (if-converted
    by the compiler: every round paid it) then runs from the second round on (docs/kernels.md,
    "A leaner epilogue")."""
    # loaded after the K-loop: hoisted above it, the norms stay live across the MMAs and the
    # sm_90 builds spill (bf16 KP 16: 199 -> 255 registers + 56 B of stack; fp32 3xTF32: 264 B)
    if LEAN:  # padded with inf to whole tiles: no mask, and the pairs load as one 8-byte access
        rn = tl.load(rn_ptr + cols)
    else:
        rn = tl.load(rn_ptr + cols, mask=cmask, other=float("inf"))
    # NaN stays NaN (never a candidate: NaN < worst is false); a non-propagating max would make
    # a NaN row everyone's nearest neighbour at the floor
    s = tl.maximum(qn[:, None] + rn[None, :] - 2.0 * acc, TL_EPS, propagate_nan=tl.PropagateNan.ALL)
    if HAS_LABELS:
        rl = tl.load(rl_ptr + cols, mask=cmask, other=0)
        s = tl.where(ql[:, None] == rl[None, :], s, float("inf"))
    if EXCLUDE_SELF:
        # only a tile that meets the diagonal holds self pairs
        if (n0 < row_lo + BLOCK_M) & (n0 + BLOCK_N > row_lo):
            s = tl.where(rows[:, None] == cols[None, :], float("inf"), s)
    # candidates: entries that beat the row's current worst slot; the row's smallest one and
    # its column come from one reduction (ties -> the smaller column)
    sm = tl.where(s < _layout_of(worst, qn, GLUON)[:, None], s, float("inf"))
    if COUNTED:
        # each row's candidates, counted from sm (from the comparison instead, the sm_90 build
        # of Triton 3.6 spills 16 B: the 64 predicates stay live beside sm)
        if LEAN:
            counts = tl.sum(tl.where(sm < float("inf"), 1.0, 0.0), axis=1).to(tl.int32)
        else:
            counts = tl.sum((sm < float("inf")).to(tl.int32), axis=1)
        if cuda_capability_geq(10):
            # Blackwell: their max through a reshape (axis=None); the plain 1-D max after the row
            # sum made Triton 3.6's OptimizeTMemLayouts fail without labels or self pairs ("parent
            # layout must have at least rank >= 2"). Elsewhere the reshape would add a layout
            # conversion (two barriers per tile on sm_90), so the other targets keep axis=0.
            rounds = tl.minimum(tl.max(counts), KP)
        else:
            rounds = tl.minimum(tl.max(counts, axis=0), KP)
        if LEAN:
            # the first round peeled: the loop's spent-entry mask runs from the second on (in
            # the loop, its test is if-converted: every round paid it)
            if rounds > 0:
                v, vc = _row_argmin(sm, lanes, GLUON)
                topd, topi, worst, widx = _knn_take(v, n0 + vc, topd, topi, worst, widx, GLUON)
                for r in range(1, rounds):
                    sm = tl.where(lanes[None, :] == vc[:, None], float("inf"), sm)
                    v, vc = _row_argmin(sm, lanes, GLUON)
                    topd, topi, worst, widx = _knn_take(v, n0 + vc, topd, topi, worst, widx, GLUON)
        else:
            vc = tl.zeros([BLOCK_M], dtype=tl.int32)
            for r in range(rounds):
                if r > 0:  # the entry the last round looked at is spent
                    sm = tl.where(lanes[None, :] == vc[:, None], float("inf"), sm)
                v, vc = _row_argmin(sm, lanes, GLUON)
                topd, topi, worst, widx = _knn_take(v, n0 + vc, topd, topi, worst, widx, GLUON)
    else:
        v, vc = _row_argmin(sm, lanes, GLUON)
        while tl.max((v < worst).to(tl.int32), axis=0) > 0:
            topd, topi, worst, widx = _knn_take(v, n0 + vc, topd, topi, worst, widx, GLUON)
            sm = tl.where(lanes[None, :] == vc[:, None], float("inf"), sm)
            v, vc = _row_argmin(sm, lanes, GLUON)
    return topd, topi, worst, widx


@triton.jit
def _layout_of(x, like, GLUON: tl.constexpr):
    """``x`` in ``like``'s layout under Gluon (explicit layouts: the Gluon forward keeps its
    slots in a narrower MMA layout than the tile's, ``kernels/knn_gluon.py``; the two row layouts
    are the same map of rows to threads, so the conversion moves nothing); ``x`` elsewhere."""
    if GLUON:
        return gl.convert_layout(x, like.type.layout)
    else:
        return x


@triton.jit
def _argmin_left(v1, i1, v2, i2):
    """Combine of :func:`_row_argmin`: the smaller value; ties -> the smaller index."""
    lt = (v1 < v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(lt, v1, v2), tl.where(lt, i1, i2)


@triton.jit
def _row_argmin(sm, lanes, GLUON: tl.constexpr):
    """Each row's smallest entry of ``sm`` and its lane (ties -> the smaller lane): ``tl.min``
    with indices; with ``GLUON`` the same reduction over ``(sm, lanes)`` pairs spelled out, since
    ``tl.min`` builds its indices with an ``arange`` that has no layout, which Gluon refuses."""
    if GLUON:
        return tl.reduce((sm, tl.broadcast_to(lanes[None, :], sm.shape)), 1, _argmin_left)
    else:
        return tl.min(sm, axis=1, return_indices=True, return_indices_tie_break_left=True)


@triton.jit
def _knn_take(v, j, topd, topi, worst, widx, GLUON: tl.constexpr = False):
    """Rows whose extracted ``(v, j)`` beats their worst slot put it there; the new worst (the
    largest slot in ``(s, j)`` order: ties -> the larger column) and its column. ``GLUON``: the
    slots' layout is not the tile's (:func:`_layout_of`)."""
    v = _layout_of(v, worst, GLUON)
    j = _layout_of(j, worst, GLUON)
    rep = (topi == widx[:, None]) & (v < worst)[:, None]
    topd = tl.where(rep, v[:, None], topd)
    topi = tl.where(rep, j[:, None], topi)
    worst = tl.max(topd, axis=1)
    widx = tl.max(tl.where(topd == worst[:, None], topi, -2147483647), axis=1)
    return topd, topi, worst, widx


@triton.jit
def _knn_fwd_kernel(
    q_ptr, r_ptr, q_desc, r_desc, qn_ptr, rn_ptr, ql_ptr, rl_ptr, top_s_ptr, top_i_ptr, dist_ptr, index_ptr,
    M, N, D, K, cols_per_split, stride_q_m, stride_r_n, stride_top_s, stride_top_m, stride_dist_m,
    stride_index_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    HAS_LABELS: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr, FLAT: tl.constexpr, COUNTED: tl.constexpr, FINISH: tl.constexpr,
    TMA: tl.constexpr, LEAN: tl.constexpr, DIAG_BRANCH: tl.constexpr,
):
    """Running top-KP of ``s_ij = max(qn_i + rn_j - 2 q_i.r_j, eps)`` over the candidate
    columns ``j`` of split ``program_id(1)``; writes the KP (s, j) slots, unsorted, per row.
    ``FINISH`` (one split, ``DAAL_LAUNCHES=merged``): the slots are the rows' final candidates,
    so the program finishes them itself as ``_knn_finish_kernel`` would (the K best by
    ``(s, j)``, exact recompute in BLOCK_D chunks, re-sort, square root) and writes ``dist`` and
    ``index`` instead: one launch fewer, the same arithmetic (each family's forward and finish
    take the same D-chunk).

    Loops: ``FLAT = False``, a loop over the split's tiles with the K-loop over D inside (the
    software pipeline fills and drains once per tile); ``FLAT = True``, one loop over the
    (tile, D-chunk) pairs with the tile's merge (:func:`_knn_merge_tile`) under an ``if`` on
    its last chunk, so the pipeline loads the next tile's chunks while this tile merges
    (docs/kernels.md, "Pipelining across tiles"). Same arithmetic, same result.

    Args:
        q_ptr, r_ptr: M x D queries and N x D references (one dtype), unit column stride.
        qn_ptr, rn_ptr: their squared row norms (float32).
        ql_ptr, rl_ptr: query and reference labels (int64; read only with HAS_LABELS).
        top_s_ptr, top_i_ptr: S x M x KP outputs: squared distances (float32) and column
            indices (int32) of the slots, unit slot stride (not written with FINISH).
        dist_ptr, index_ptr: M x K outputs of FINISH (float32, int64), unit column stride.
        M, N, D: sizes. K: the neighbours (FINISH). cols_per_split: reference columns per
            split (a multiple of BLOCK_N).
        stride_q_m, stride_r_n: row strides of q and r.
        stride_top_s, stride_top_m: split and row strides of both slot outputs.
        stride_dist_m, stride_index_m: row strides of dist and index.
        BLOCK_M, BLOCK_N: queries x references per tile. BLOCK_D: D-chunk. KP: slots per row
            (a power of two >= k). HAS_LABELS: same-label candidates only. EXCLUDE_SELF: drop
            ``j == i``. INPUT_PRECISION: ``tl.dot``'s input precision. ROUND_TF32: round float32
            operands to TF32 first (``_common.round_operands``; qn/rn are norms of rounded rows).
            FLAT: the loop structure (above). COUNTED: the merge (``_knn_merge_tile``).
            FINISH: see above. LEAN: the epilogue of ``DAAL_KNN_EPILOGUE=lean`` (the default):
            ``rn_ptr`` padded with ``inf`` to whole BLOCK_N tiles, read unmasked; the counts
            summed in float32; the first round peeled (:func:`_knn_merge_tile`). The same slots
            as without, bit for bit.
            DIAG_BRANCH (a configuration's choice; with LEAN, EXCLUDE_SELF and FLAT = False):
            the tiles that meet the diagonal merge in a branch of their own, the others without
            the self mask (a second copy of the merge: the narrow entry's; the 128-row builds
            spill with it).
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
    else:
        ql = 0  # unused

    slots = tl.arange(0, KP)
    topd = tl.zeros([BLOCK_M, KP], dtype=tl.float32) + float("inf")
    topi = tl.zeros([BLOCK_M, KP], dtype=tl.int32) + (-1 - slots)[None, :]
    worst = tl.zeros([BLOCK_M], dtype=tl.float32) + float("inf")
    widx = tl.zeros([BLOCK_M], dtype=tl.int32) - 1

    n_start = pid_s * cols_per_split
    n_end = tl.minimum(N, n_start + cols_per_split)
    lanes = tl.arange(0, BLOCK_N)
    if FLAT:
        k_steps = tl.cdiv(D, BLOCK_D)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for it in range(0, tl.cdiv(n_end - n_start, BLOCK_N) * k_steps):
            t = it // k_steps
            kk = it - t * k_steps
            n0 = n_start + t * BLOCK_N
            cols = n0 + lanes
            cmask = cols < n_end
            if TMA:
                acc = _dot_desc_chunk(q_desc, r_desc, row_lo, n0, kk * BLOCK_D, acc, INPUT_PRECISION,
                                      ROUND_TF32)
            else:
                acc = _dot_chunk(q_rows, r_ptr + cols.to(tl.int64)[:, None] * stride_r_n, rmask, cmask,
                                 kk * BLOCK_D, D, acc, BLOCK_D, INPUT_PRECISION, ROUND_TF32)
            if kk == k_steps - 1:
                topd, topi, worst, widx = _knn_merge_tile(
                    acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi,
                    worst, widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, EXCLUDE_SELF, COUNTED, LEAN)
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        for n0 in range(n_start, n_end, BLOCK_N):
            cols = n0 + lanes
            cmask = cols < n_end
            acc = _dot_tile(q_rows, r_ptr, q_desc, r_desc, row_lo, n0, cols, rmask, cmask, D, stride_r_n,
                            BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, ROUND_TF32, TMA)
            if EXCLUDE_SELF and LEAN and DIAG_BRANCH:
                # the self mask on the tiles that meet the diagonal alone, a branch per tile: under
                # one merge the compiler if-converts the mask's test, and every tile pays it
                if (n0 < row_lo + BLOCK_M) & (n0 + BLOCK_N > row_lo):
                    topd, topi, worst, widx = _knn_merge_tile(
                        acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi,
                        worst, widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, True, COUNTED, LEAN)
                else:
                    topd, topi, worst, widx = _knn_merge_tile(
                        acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi,
                        worst, widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, False, COUNTED, LEAN)
            else:
                topd, topi, worst, widx = _knn_merge_tile(
                    acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi, worst,
                    widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, EXCLUDE_SELF, COUNTED, LEAN)

    if FINISH:  # one split: these slots are the rows' final candidates
        _knn_finish_slots(topd, topi, rows64, rmask, slots, q_ptr, r_ptr, dist_ptr, index_ptr, D, K,
                          stride_q_m, stride_r_n, stride_dist_m, stride_index_m, BLOCK_M, BLOCK_D, KP)
    else:
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
        sq = _pair_sq(found, rows64, j, q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M, BLOCK_D)
        sq = tl.where(found, sq, float("inf"))
        tl.store(out_ptr + rows64 * stride_out_m + kk, sq, mask=rmask)


#: The key of an empty slot: above every real ``(s, j)`` key (``s`` >= 0 has sign bit 0, so
#: ``bits(s) << 32 | j`` < 2^63 - 1 for any non-negative float32 ``s`` and ``0 <= j < 2^31``).
_NO_KEY = tl.constexpr(2**63 - 1)


@triton.jit
def _pair_key(s, j):
    """``bits(s) << 32 | j`` (int64) for ``s >= 0`` (float32) and ``j`` (int32): ordered like
    ``(s, j)``; ``_NO_KEY`` where ``j < 0`` (an empty slot)."""
    key = (s.to(tl.int32, bitcast=True).to(tl.int64) << 32) | j.to(tl.int64)
    return tl.where(j >= 0, key, _NO_KEY)


@triton.jit
def _knn_finish_kernel(
    top_s_ptr, top_i_ptr, q_ptr, r_ptr, dist_ptr, index_ptr, M, D, K, S,
    stride_top_s, stride_top_m, stride_q_m, stride_r_n, stride_dist_m, stride_index_m,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    """The forward's finish, one launch: from the ``S x KP`` candidate slots of each row (the
    forward kernel's output) the ``K`` best by ``(s, j)``, their squared distances recomputed
    exactly by direct differences ``e_ik = ||q_i - r_j||^2`` (float32, BLOCK_D chunks: the
    arithmetic of ``_knn_dist_kernel`` and of the backward's recompute), re-sorted by
    ``(e, j)``, and written in final form: ``dist_ik = sqrt(max(e_ik, eps))`` (round to nearest)
    and ``index_ik = j`` (``inf`` / ``-1`` where the row has fewer than ``K`` candidates).

    Both selections are ``K`` rounds of min-extraction over the int64 key ``bits(s) << 32 | j``
    (``_pair_key``: ``s >= 0``, so its bits order like its value; ties go to the smaller ``j``;
    empty slots ``j < 0`` key ``2^63 - 1``, after every real one): round ``t`` takes the smallest
    key above round ``t - 1``'s (real keys of a row are distinct: each column is one slot of one
    split). The first selection scans the ``S x KP`` slots each round (from cache), the second
    the ``K`` exact keys held in registers (``KP`` slots).

    Args:
        top_s_ptr, top_i_ptr: S x M x KP candidate slots from ``_knn_fwd_kernel``: squared
            distances (float32; ``inf`` when empty) and columns (int32; ``< 0`` when empty),
            unit slot stride.
        q_ptr, r_ptr: M x D queries and N x D references (one dtype), unit column stride.
        dist_ptr, index_ptr: M x K outputs (float32, int64), unit column stride.
        M, D, K: sizes (``K <= KP``). S: column splits of the forward.
        stride_top_s, stride_top_m: split and row strides of both slot buffers.
        stride_q_m, stride_r_n, stride_dist_m, stride_index_m: row strides of q, r, dist, index.
        BLOCK_M: queries per program. BLOCK_D: D-chunk of the recompute. KP: slots per row.
    """
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, KP)
    top_rows = rows64[:, None] * stride_top_m + slots[None, :]
    exact = tl.full([BLOCK_M, KP], _NO_KEY, tl.int64)
    prev = tl.full([BLOCK_M], -1, tl.int64)
    for t in range(0, K):
        # the t-th best slot by (s, j): the smallest key above the last one, over the S splits
        best = tl.full([BLOCK_M], _NO_KEY, tl.int64)
        ps = top_s_ptr + top_rows
        pi = top_i_ptr + top_rows
        for sp in range(0, S):
            s = tl.load(ps, mask=rmask[:, None], other=float("inf"))
            j = tl.load(pi, mask=rmask[:, None], other=-1)
            key = _pair_key(s, j)
            best = tl.minimum(best, tl.min(tl.where(key > prev[:, None], key, _NO_KEY), axis=1))
            ps += stride_top_s
            pi += stride_top_s
        prev = best
        e = _exact_key(best, rows64, q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M, BLOCK_D)
        exact = tl.where(slots[None, :] == t, e[:, None], exact)
    _store_sorted(exact, rows64, rmask, dist_ptr, index_ptr, K, stride_dist_m, stride_index_m, BLOCK_M)


@triton.jit
def _knn_finish_slots(topd, topi, rows64, rmask, slots, q_ptr, r_ptr, dist_ptr, index_ptr, D, K,
                      stride_q_m, stride_r_n, stride_dist_m, stride_index_m, BLOCK_M: tl.constexpr,
                      BLOCK_D: tl.constexpr, KP: tl.constexpr):
    """A program's KP final slots per row (``topd``, ``topi``) in final form, as
    ``_knn_finish_kernel`` writes them from one split: the K best by ``(s, j)``, recomputed
    exactly, re-sorted, square root; rows outside ``rmask`` are not written (the forward's
    ``FINISH``, and kernels/knn_threshold.py's rescan)."""
    key = _pair_key(topd, topi)
    exact = tl.full([BLOCK_M, KP], _NO_KEY, tl.int64)
    prev = tl.full([BLOCK_M], -1, tl.int64)
    for t in range(0, K):
        best = tl.min(tl.where(key > prev[:, None], key, _NO_KEY), axis=1)
        prev = best
        e = _exact_key(best, rows64, q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M, BLOCK_D)
        exact = tl.where(slots[None, :] == t, e[:, None], exact)
    _store_sorted(exact, rows64, rmask, dist_ptr, index_ptr, K, stride_dist_m, stride_index_m, BLOCK_M)


@triton.jit
def _exact_key(best, rows64, q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The key ``_pair_key(max(e, eps), j)`` of each row's selected key ``best`` (``_NO_KEY``: none):
    ``e = ||q_i - r_j||^2`` by direct differences (float32, BLOCK_D chunks, as ``_knn_dist_kernel``
    and the backward), floored as the distance returned: pairs below the floor go in index order."""
    found = best != _NO_KEY
    col = tl.where(found, best.to(tl.int32), 0)  # the low 32 bits: j
    sq = _pair_sq(found, rows64, col.to(tl.int64), q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M, BLOCK_D)
    return _pair_key(tl.maximum(sq, TL_EPS), tl.where(found, col, -1))  # floored: equal distances, index order


@triton.jit
def _pair_sq(found, rows64, j64, q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M: tl.constexpr,
             BLOCK_D: tl.constexpr):
    """``||q_i - r_j||^2`` per row (``j = j64``) by direct differences in float32, BLOCK_D chunks
    (0 where not ``found``): the exact recompute of a selected pair."""
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = found[:, None] & (dd[None, :] < D)
        q = tl.load(q_ptr + rows64[:, None] * stride_q_m + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + j64[:, None] * stride_r_n + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        sq += tl.sum((q - r) * (q - r), axis=1)
    return sq


@triton.jit
def _store_sorted(exact, rows64, rmask, dist_ptr, index_ptr, K, stride_dist_m, stride_index_m,
                  BLOCK_M: tl.constexpr):
    """The K exact keys of each row (``_exact_key``; KP slots, ``_NO_KEY`` in the others)
    re-sorted by ``(e, j)`` and written in final form: ``dist = sqrt(max(e, eps))`` (round to
    nearest), ``index = j`` (``inf`` / ``-1`` where the row has fewer than K candidates)."""
    prev = tl.full([BLOCK_M], -1, tl.int64)
    for t in range(0, K):
        best = tl.min(tl.where(exact > prev[:, None], exact, _NO_KEY), axis=1)
        prev = best
        found = best != _NO_KEY
        e = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        floor = tl.maximum(tl.where(found, e, 1.0), TL_EPS, propagate_nan=tl.PropagateNan.ALL)
        dist = tl.where(found, tl.sqrt_rn(floor), float("inf"))
        index = tl.where(found, best.to(tl.int32).to(tl.int64), -1)
        tl.store(dist_ptr + rows64 * stride_dist_m + t, dist, mask=rmask)
        tl.store(index_ptr + rows64 * stride_index_m + t, index, mask=rmask)


@triton.jit
def _knn_bwd_pair(kk, rows64, rmask, g_ptr, idx_ptr, q_ptr, r_ptr, dq_ptr, dr_ptr, D, K, N_DR,
                  stride_g_m, stride_g_k, stride_idx_m, stride_q_m, stride_r_n, stride_dq_m,
                  stride_dr_n, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DR: tl.constexpr,
                  DR_PAIRS: tl.constexpr, FIRST: tl.constexpr):
    """Column ``kk`` of the backward for the rows ``rows64`` (``_knn_bwd_kernel``'s arguments);
    ``FIRST``: the row's first pair, which stores ``0 + h (q_i - r_j)`` into dQ (every element of
    the rows, 0 where the pair contributes nothing) instead of adding to it."""
    acc_ty = dr_ptr.dtype.element_ty
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
            to_dr = (j < N_DR)[:, None]  # the rows dR holds (N, or the batch rows' b)
            if DR_PAIRS:  # every element of the pair's row (0 where it contributes nothing)
                tl.store(dr_ptr + (rows64[:, None] * K + kk) * stride_dr_n + dd[None, :],
                         tl.where(to_dr, -contrib, 0.0), mask=rmask[:, None] & (dd[None, :] < D))
            else:
                tl.atomic_add(dr_ptr + j[:, None] * stride_dr_n + dd[None, :], -contrib, mask=m2 & to_dr)
        pq = dq_ptr + rows64[:, None] * stride_dq_m + dd[None, :]
        if FIRST:
            tl.store(pq, contrib + 0.0, mask=rmask[:, None] & (dd[None, :] < D))
        else:
            tl.store(pq, tl.load(pq, mask=m2, other=0.0) + contrib, mask=m2)


@triton.jit
def _knn_bwd_kernel(
    g_ptr, idx_ptr, q_ptr, r_ptr, dq_ptr, dr_ptr, M, D, K, N_DR,
    stride_g_m, stride_g_k, stride_idx_m, stride_q_m, stride_r_n, stride_dq_m, stride_dr_n,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DR: tl.constexpr, DR_PAIRS: tl.constexpr,
):
    """For each selected pair ``(i, j = index_ik)``: ``e_ik = ||q_i - r_j||^2`` recomputed by
    direct differences (no GEMM-form cancellation), ``h_ik = g_ik / sqrt(e_ik)`` (0 for
    ``j = -1`` or ``e_ik <= eps``, the clamp); ``dQ_i += h_ik (q_i - r_j)`` (this program owns
    rows i) and, where ``j < N_DR``, ``dR_j -= h_ik (q_i - r_j)`` by atomic adds, or, with
    ``DR_PAIRS`` (under ``torch.use_deterministic_algorithms(True)``), ``-h_ik (q_i - r_j)`` (0
    where ``j >= N_DR``) stored per pair into an (M k) x D buffer that the launcher sums by ``j``
    in a fixed order. Arithmetic in float32.

    Args:
        g_ptr: M x K incoming gradient of the distances (float32).
        idx_ptr: M x K selected columns (int64, -1 for none), unit column stride.
        q_ptr, r_ptr: M x D queries and N x D references, unit column stride.
        dq_ptr, dr_ptr: float32 M x D and N_DR x D gradient buffers, unit column stride; dr
            zero-filled (atomics), dq not (each row is written by its one program: stored by
            the pair ``kk = 0``, the ``FIRST`` instance of ``_knn_bwd_pair``, then added to;
            K >= 1). With ``DR_PAIRS`` dr is the (M K) x D per-pair buffer (not zero-filled).
        M, D, K: sizes. N_DR: the reference rows dR holds (N; ``batch_rows``' b when only the
            rows that are the query's own need theirs: pairs with ``j >= N_DR`` reach dQ only).
        stride_g_m, stride_g_k: strides of g. stride_idx_m: row stride of idx.
        stride_q_m, stride_r_n, stride_dq_m, stride_dr_n: row strides of q, r, dq, dr.
        BLOCK_M: queries per program. BLOCK_D: D-chunk. HAS_DR: accumulate dR (false when the
            references need no gradient, e.g. a memory bank: no atomics, dr_ptr unused).
        DR_PAIRS: dR per pair instead of atomics (see above).
    """
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    # dQ needs no zero-fill: the first pair stores every element of the program's rows (0 where
    # it contributes nothing), the later ones add to it
    _knn_bwd_pair(0, rows64, rmask, g_ptr, idx_ptr, q_ptr, r_ptr, dq_ptr, dr_ptr, D, K, N_DR,
                  stride_g_m, stride_g_k, stride_idx_m, stride_q_m, stride_r_n, stride_dq_m,
                  stride_dr_n, BLOCK_M, BLOCK_D, HAS_DR, DR_PAIRS, True)
    for kk in range(1, K):
        _knn_bwd_pair(kk, rows64, rmask, g_ptr, idx_ptr, q_ptr, r_ptr, dq_ptr, dr_ptr, D, K, N_DR,
                      stride_g_m, stride_g_k, stride_idx_m, stride_q_m, stride_r_n, stride_dq_m,
                      stride_dr_n, BLOCK_M, BLOCK_D, HAS_DR, DR_PAIRS, False)


KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _knn_fwd_kernel,
        "q_ptr r_ptr: *x; q_desc: desc[BLOCK_M]; r_desc: desc[BLOCK_N]; qn_ptr rn_ptr: *fp32; "
        "ql_ptr rl_ptr: *i64; top_s_ptr: *fp32; "
        "top_i_ptr: *i32; dist_ptr: *fp32; index_ptr: *i64; M N D K cols_per_split: i32; "
        "stride_q_m stride_r_n stride_top_s stride_top_m stride_dist_m stride_index_m: i64",
        rows=("stride_q_m", "stride_r_n"),
        other=("stride_top_s", "stride_top_m", "stride_dist_m", "stride_index_m")),
    "bwd": KernelSpec(
        _knn_bwd_kernel,
        "g_ptr: *fp32; idx_ptr: *i64; q_ptr r_ptr: *x; dq_ptr dr_ptr: *fp32; M D K N_DR: i32; "
        "stride_g_m stride_g_k stride_idx_m stride_q_m stride_r_n stride_dq_m stride_dr_n: i64",
        unit=("stride_g_k",), rows=("stride_q_m", "stride_r_n", "stride_dq_m", "stride_dr_n"),
        other=("stride_g_m", "stride_idx_m"), gemm=False),
    "finish": KernelSpec(
        _knn_finish_kernel,
        "top_s_ptr: *fp32; top_i_ptr: *i32; q_ptr r_ptr: *x; dist_ptr: *fp32; index_ptr: *i64; "
        "M D K S: i32; stride_top_s stride_top_m stride_q_m stride_r_n stride_dist_m stride_index_m: i64",
        rows=("stride_q_m", "stride_r_n"),
        other=("stride_top_s", "stride_top_m", "stride_dist_m", "stride_index_m"), gemm=False),
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
#: Alternatives to the half family's ``fwd_kp16`` entry (k <= 16), which ``bench/tune_knn.py``
#: times against it on a GPU, most promising first: ``(BLOCK_M, BLOCK_N, num_warps, num_stages,
#: FLAT)`` -> the programs per SM their sm_90 builds allow (registers x threads within 64K
#: registers, shared memory within 228 KB; tests/kernels/test_kernel_knn.py compiles them and
#: asserts it, and no spills). The entry itself (~200 registers x 256 threads) allows one: no
#: program's merge overlaps another's tensor-core work. ``FLAT``: the loop over (tile, D-chunk)
#: pairs (``_knn_fwd_kernel``), whose pipeline prefetches across tiles; its 128 x 128 / 8-warp
#: build spilled with the checked merge (255 registers + 56 B) and, since the counted merge,
#: does not (255 registers; last, as the least promising). A sixth field, where present, caps the
#: registers per thread (Triton's ``maxnreg``): the entry's own tiles capped at 128 registers
#: fit two programs per SM with no more L2 traffic per FLOP than the entry, at the price of
#: spills (bf16 KP 8: 128 B per thread under Triton 3.8, 200 B under 3.6, none in the K-loop:
#: asserted by the same test; docs/kernels.md, "Two programs per SM at 128 × 128"). A seventh
#: field "tma" loads the tiles through tensor descriptors (``DAAL_KNN_LOADS=tma``; the sixth is
#: then the cap or None): no per-thread addresses, so fewer registers: the capped entry spills
#: 32 B instead of 128 B, and the 4-warp tiles fit three programs per SM (docs/kernels.md,
#: "Tensor-descriptor loads"). Their residency is that of the 60k benchmark's build (KP 8, no
#: labels), which the test compiles. First (2026-12-01, day): the wide tiles 256 x 128 and
#: 128 x 256 on 8 warps with descriptor loads (252-255 registers, no spill, one program per SM;
#: with pointer loads they spill 168 B and 48 B): a tile loads (BLOCK_M + BLOCK_N) x D elements
#: for 2 BLOCK_M BLOCK_N D FLOP, so 85 FLOP per L2 byte instead of the entry's 64 (the 4-warp
#: tiles: 43). If the forward's ceiling is L2 bandwidth, they lift it by a third (an estimate:
#: docs/kernels.md, "Wider tiles"; bench/probe_h200.py's ``tiles`` section measures it). 256 x 128
#: first: its merge runs fewer rounds per tile (bench/knn_merge_model.py). Since 2026-12-04, first
#: of all: two variants of the default narrow tiles (``fwd_narrow``: 64 x 128, 4 warps, 3 stages,
#: descriptors, three programs per SM), for the pipeline that drains at every tile boundary: the
#: flat loop through descriptors (208 registers, no spill: two programs per SM) and 4 stages
#: (98 KB of shared memory: two per SM). Since 2026-12-04's evening, first: an eighth field True
#: runs the lean epilogue's diagonal branch (``DIAG_BRANCH``, the narrow entry's), and the 128-row
#: tiles on one warpgroup: 128 x 128 on 4 warps (240 registers, no spill: two programs per SM at
#: the L2 traffic per FLOP of the table's 128 x 128, two thirds of the narrow tiles') and
#: 128 x 64 on 4 warps (three per SM); docs/kernels.md, "A leaner epilogue".
FWD_ALTERNATIVES = {(128, 128, 4, 3, False, None, "tma", True): 2, (128, 64, 4, 3, False, None, "tma", True): 3,
                    (64, 128, 4, 3, True, None, "tma"): 2, (64, 128, 4, 4, False, None, "tma"): 2,
                    (256, 128, 8, 3, False, None, "tma"): 1, (128, 256, 8, 3, False, None, "tma"): 1,
                    (64, 128, 4, 3, False): 2, (128, 128, 8, 3, False, 128, "tma"): 2,
                    (64, 128, 4, 3, False, None, "tma"): 3, (64, 128, 4, 3, True): 2,
                    (128, 128, 8, 3, False, 128): 2, (128, 64, 4, 3, False): 2,
                    (128, 64, 4, 3, False, None, "tma"): 3, (128, 64, 4, 3, True): 2,
                    (128, 64, 8, 3, True): 2, (64, 128, 4, 4, False): 2, (128, 128, 8, 2, False): 1,
                    (128, 64, 8, 3, False): 1, (128, 128, 8, 3, True): 1}
#: Where a Triton release's sm_90 builds fit fewer programs per SM than :data:`FWD_ALTERNATIVES`
#: says (its counts are Triton 3.8's): under 3.6, the GPU image's, 128 x 64 on 4 warps with the
#: diagonal branch keeps 196 registers (two per SM, not three) and 128 x 64 flat on 8 warps 159
#: (one, not two); under 3.7 (torch 2.12's and 2.13's) the flat one keeps 156 (one, not two).
#: :func:`fwd_alternatives` applies them.
FWD_ALTERNATIVES_BY_TRITON: Dict[str, Dict[tuple, int]] = {
    "3.6": {(128, 64, 4, 3, False, None, "tma", True): 2, (128, 64, 8, 3, True): 1},
    "3.7": {(128, 64, 8, 3, True): 1}}


def fwd_alternatives() -> Dict[tuple, int]:
    """:data:`FWD_ALTERNATIVES` with the programs per SM of the running Triton's builds
    (:data:`FWD_ALTERNATIVES_BY_TRITON`): what bench/tune_knn.py sizes their grids for."""
    return {**FWD_ALTERNATIVES, **FWD_ALTERNATIVES_BY_TRITON.get(triton_release(), {})}


def _fwd_configs(largest_block_d: int, stages: Optional[Dict[int, int]] = None,
                 warps: Optional[Dict[int, int]] = None) -> Dict[str, KernelConfig]:
    stages, warps = stages or {}, warps or {}
    return {f"fwd_kp{kp}": KernelConfig({"BLOCK_M": bm, "BLOCK_N": bn, "FLAT": False, "DIAG_BRANCH": False},
                                        num_warps=warps.get(kp, w), num_stages=stages.get(kp, 3),
                                        block_d=(16, largest_block_d))
            for kp, (bm, bn, w) in _FWD_BLOCKS.items()}


#: The fused finish's entries by the largest KP they serve -> BLOCK_M: its registers hold the
#: K exact keys (int64) and one split's KP slots per row, so BLOCK_M * KP stays at 1024.
_FINISH_BLOCKS = {16: 64, 32: 32, 64: 16, 128: 8}


def _recompute_configs(block_d: Tuple[int, int]) -> Dict[str, KernelConfig]:
    """The finish, ``dist``, ``bwd`` and ``bwd_noref`` entries, with the D-chunk range of the
    family's forward: the exact recompute then sums in the same chunks wherever it runs (the
    finish, the forward that finishes its one split, the k > MAX_K path, the backward), so value
    and gradient are one function bit for bit."""
    bwd = KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1, block_d=block_d)
    return dict({f"finish_kp{kp}": KernelConfig({"BLOCK_M": bm}, num_warps=4, num_stages=1, block_d=block_d)
                 for kp, bm in _FINISH_BLOCKS.items()}, dist=bwd, bwd=bwd, bwd_noref=bwd)


#: ``CONFIGS[family][entry]``: ``fwd_kp<KP>`` (the forward for padded k up to KP),
#: ``finish_kp<KP>`` (the fused finish: selection of the k best slots, exact recompute, final
#: sort and square root), ``dist`` (the exact recompute alone, for k > MAX_K), ``bwd`` and
#: ``bwd_noref`` (the backward without dRef: the references need no gradient).
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    # + ``fwd_wide``: the retrieval forward's wide tiles (``DAAL_KNN_TILES=wide``, a switch: see
    # WIDE_ENTRY), 64-wide D-chunks only (it runs where the table's entry takes them)
    # + ``fwd_narrow``: the default forward where descriptors apply (``DAAL_KNN_TILES=narrow``:
    # see NARROW_ENTRY), 64-wide D-chunks only (it runs where the table's entry takes them)
    "half": dict(_fwd_configs(64), fwd_wide=KernelConfig({"BLOCK_M": 256, "BLOCK_N": 128, "FLAT": False,
                                                          "DIAG_BRANCH": False},
                                                         num_warps=8, num_stages=3, block_d=(64, 64)),
                 fwd_narrow=KernelConfig({"BLOCK_M": 64, "BLOCK_N": 128, "FLAT": False, "DIAG_BRANCH": True},
                                         num_warps=4, num_stages=3, block_d=(64, 64)),
                 **_recompute_configs((16, 64))),
    # float32: BLOCK_D 16, and 4 stages with 8 warps at KP 32, keep the 3xTF32 builds' sm_90
    # stack at 0 (4 warps: 40 bytes since the one-reduction merge; docs/kernels.md, "Compile facts");
    # the recompute's chunk is the forward's 16 too (before 2026-12-01's evening: 16-64)
    "fp32": dict(_fwd_configs(16, {32: 4}, {32: 8}), **_recompute_configs((16, 16))),
}
_FINISH = [f"finish_kp{kp}" for kp in _FINISH_BLOCKS]
_SPEC_OF = {**{f"fwd_kp{kp}": KERNELS["fwd"] for kp in KP_ROWS}, "fwd_wide": KERNELS["fwd"],
            "fwd_narrow": KERNELS["fwd"],
            **{entry: KERNELS["finish"] for entry in _FINISH}, "dist": KERNELS["dist"],
            "bwd": KERNELS["bwd"], "bwd_noref": KERNELS["bwd"]}


def fwd_entry(kp: int) -> str:
    """The ``CONFIGS`` entry of the forward for ``kp`` slots."""
    for limit in KP_ROWS:
        if kp <= limit:
            return f"fwd_kp{limit}"
    raise ValueError(f"k padded to {kp} exceeds MAX_K={MAX_K}")


def finish_entry(kp: int) -> str:
    """The ``CONFIGS`` entry of the fused finish for ``kp`` slots."""
    return "finish" + fwd_entry(kp)[len("fwd"):]


def _forward_flags(entry: str, dtype: torch.dtype) -> List[Dict]:
    """The forward builds of ``entry``, each with the default epilogue (``LEAN``: :func:`lean_epilogue`)."""
    lean = lean_epilogue(dtype, entry, EPILOGUE_POLICIES[0])
    if entry == WIDE_ENTRY:  # the retrieval case: KP <= 8, no labels, descriptor loads, counted
        return [dict(KP=WIDE_KP, HAS_LABELS=False, EXCLUDE_SELF=True, FINISH=finish, TMA=True, COUNTED=True,
                     LEAN=lean, **fl) for finish in (False, True) for fl in gpu_dot_variants(dtype)]
    if entry == NARROW_ENTRY:  # the table's k <= 16 forward, through descriptors, counted
        return [dict(KP=16, HAS_LABELS=True, EXCLUDE_SELF=True, FINISH=finish, TMA=True, COUNTED=True, LEAN=lean,
                     **fl) for finish in (False, True) for fl in gpu_dot_variants(dtype)]
    kp = int(entry[len("fwd_kp"):])
    base = {"KP": kp, "HAS_LABELS": True, "EXCLUDE_SELF": True, "FINISH": False, "TMA": False, "LEAN": lean}
    # the counted merge (the default) and, for the entry it is kept for, the checked one
    merges = (True, False) if entry == CHECKED_ENTRY else (True,)
    out = [dict(base, COUNTED=counted, **fl) for counted in merges for fl in gpu_dot_variants(dtype)]
    if kp <= FUSED_FINISH_KP:  # one split: the finish in the same launch
        out += [dict(base, COUNTED=True, FINISH=True, **fl) for fl in gpu_dot_variants(dtype)]
    return out


def _gpu_flags(entry: str, dtype: torch.dtype):
    if entry == "dist":
        return {}
    if entry.startswith("finish_kp"):
        return {"KP": int(entry[len("finish_kp"):])}
    if entry == "bwd":  # atomics by default; per pair under deterministic algorithms
        return [{"HAS_DR": True, "DR_PAIRS": False}, {"HAS_DR": True, "DR_PAIRS": True}]
    if entry == "bwd_noref":
        return {"HAS_DR": False, "DR_PAIRS": False}
    return _forward_flags(entry, dtype)


def launches() -> List[Launch]:
    """Every configuration the launchers of this module can pick on a GPU (compile tests); the
    forward with the largest KP of each entry (the most registers), in each float32 precision
    variant (``_common.gpu_dot_variants``); and the forward's tensor-descriptor builds
    (``DAAL_KNN_LOADS=tma``: :func:`_tma_eligible`; the narrow entry's, the default where they
    apply; and the wide entry's, ``DAAL_KNN_TILES=wide``),
    which the tests build for sm_90 "aligned" alone (``Launch.aligned_hopper_only``)."""
    out = expand("knn", CONFIGS, _SPEC_OF, _gpu_flags)
    out += [replace(la, flags=dict(la.flags, TMA=True)) for la in out
            if la.entry == TMA_ENTRY and la.family == "half" and la.block_d == TMA_BLOCK_D
            and la.flags["COUNTED"]]
    # DAAL_KNN_EPILOGUE=plain (kept until a GPU times both): the forward builds with the earlier
    # epilogue, at the D-chunk a D = 512 launch takes (the largest of each family)
    largest = {fam: max(la.block_d or 0 for la in out if la.family == fam and la.spec is KERNELS["fwd"])
               for fam in CONFIGS}
    return out + [replace(la, flags=dict(la.flags, LEAN=False)) for la in out
                  if la.spec is KERNELS["fwd"] and la.flags["LEAN"] and la.block_d == largest[la.family]]


# --------------------------------------------------------------------------- selection
#: The most column splits of the forward grid (each adds KP candidate slots per row to finish).
MAX_SPLITS = 1024
#: The fixed cost of one program of the forward, in column tiles: its first tile fills the KP
#: slots (KP rounds of the merge where a later tile takes ~1-2), its slots are written and merged
#: again by the finish. Fitted to the first H200 run (bench/results/2026-11-30-h200/probe, M = N =
#: 20000, bf16, k = 8: S = 1, 2 waves of 157 tiles, 2.92 ms; S = 157, 187 waves of one tile,
#: 3.85 ms; a later tile ~9 µs per SM, a one-tile program ~20.6 µs, and the finish of 157
#: splits ~0.9 ms): ~1.3 tiles per program, ~2 with the finish.
PROGRAM_OVERHEAD_TILES = 2.0
#: The cost of the finish's own launch, in column tiles, when one split would make it
#: unnecessary (``DAAL_LAUNCHES=merged``: the forward finishes its rows itself, ``FINISH``): a
#: launch and a pass over S x KP slots per row, about one tile of ~9 µs per SM on the H200 (the
#: first run: a later tile ~9 µs). :func:`_num_splits` takes one split where that costs no more.
FINISH_LAUNCH_TILES = 1.0
#: The largest KP whose forward finishes its rows itself (``FINISH``): the ``fwd_kp16`` entry
#: (k <= 16; DAAL's k is 3 by default). Its registers then also hold the K exact keys (int64)
#: beside the slots (no local memory on sm_90: tests/kernels/test_kernel_knn.py); the larger
#: entries keep the finish's launch (and the compile tests fewer builds).
FUSED_FINISH_KP = 16
#: How the forward's column splits are chosen: ``"model"`` (default: :func:`_num_splits` with
#: :data:`PROGRAM_OVERHEAD_TILES`), or ``"waves"`` (``DAAL_KNN_SPLITS=waves``: whole waves and the
#: fewest tiles per program, no cost per program: the first run's choice, S = 157 above; decided by
#: the GPU runs for the default (bench/README.md, "Switches decided"), still selectable, no longer
#: timed: the benchmarks' ``triton_wave_splits`` provider).
SPLIT_POLICIES = ("model", "waves")
SPLIT_POLICY = os.environ.get("DAAL_KNN_SPLITS", "model")


#: How the forward merges a tile into the running top-k (:func:`_knn_merge_tile`): "counted" (the
#: default: as many rounds as the tile's most candidates in a row, counted once) or "checked"
#: (``DAAL_KNN_MERGE=checked``: rounds while any row takes, a block-wide check each; the merge
#: before 2026-12-01; decided by the GPU runs for the default (bench/README.md, "Switches decided"),
#: still selectable, no longer timed: the benchmarks' ``triton_checked_merge`` provider, k = 8).
#: Read at every forward; the checked merge is kept (and compiled by the tests) for the
#: ``CHECKED_ENTRY`` forward only (k <= 16), the others always count.
MERGE_ENV = "DAAL_KNN_MERGE"
MERGE_POLICIES = ("counted", "checked")
CHECKED_ENTRY = "fwd_kp16"


#: How the table entries' forward (``DAAL_KNN_TILES=table``; the narrow and wide entries always
#: take descriptors) loads its Q and R tiles: "pointer" (the default: ``tl.load`` of pointer
#: blocks, ``cp.async`` on sm_80/sm_90) or "tma" (``DAAL_KNN_LOADS=tma``: host tensor descriptors,
#: the Hopper Tensor Memory Accelerator: one thread issues a tile's copy, no per-thread
#: addresses or masks; rows and columns past the tensor read 0). The same dots in the same
#: order: the same result bit for bit. "tma" applies where :func:`_tma_eligible` says so (else
#: the pointer loads run). The 2026-12-04 H200 run timed the table's 128 x 128 tiles through
#: descriptors 0.94x (60k) and 1.09x (memory bank) of the pointer loads' time; the switch stays
#: for ``bench/tune_knn.py``'s candidates (docs/kernels.md, "Tensor-descriptor loads").
LOADS_ENV = "DAAL_KNN_LOADS"
LOADS_POLICIES = ("pointer", "tma")
#: The forward entry and D-chunk that take tensor-descriptor loads (k <= 16: DAAL's k = 3 and the
#: 60k benchmark's k = 8; D > 32: the 64-wide chunk), bfloat16/float16 with the counted merge.
TMA_ENTRY = "fwd_kp16"
TMA_BLOCK_D = 64


def loads_policy() -> str:
    """``DAAL_KNN_LOADS`` (default "pointer"); ``ValueError`` for anything else."""
    return env_choice(LOADS_ENV, LOADS_POLICIES)


#: Which tiles the forward takes: "narrow" (the default since 2026-12-04: :data:`NARROW_ENTRY`
#: where tensor descriptors apply, else the table's), "table" (``DAAL_KNN_TILES=table``: the
#: ``fwd_kp*`` entries, the default before, whose loads ``DAAL_KNN_LOADS`` chooses) or "wide"
#: (``DAAL_KNN_TILES=wide``: :data:`WIDE_ENTRY`, 256 x 128 tiles on 8 warps, loaded through
#: tensor descriptors, where :func:`forward_entry` says so). Wide tiles read 85 FLOP per L2
#: byte instead of 64; table and wide stay selectable beside the narrow tiles, which two GPU runs
#: decided for (the ``triton_table`` and ``triton_wide`` providers, no longer timed;
#: docs/kernels.md, "Narrow tiles through descriptors", "Wider tiles"). "gluon"
#: (``DAAL_KNN_TILES=gluon``, since 2026-12-04's night: :data:`GLUON_ENTRY`, the Gluon forward of
#: kernels/knn_gluon.py, its queries resident in shared memory, 64 rows per program, where
#: :func:`knn_gluon.eligible` and the narrow tiles' row rule hold; elsewhere the narrow default)
#: and "gluon128" (``DAAL_KNN_TILES=gluon128``, since 2026-12-05: :data:`GLUON128_ENTRY`, the
#: same with 128 rows on two warpgroups, half the L2 traffic, one program per SM): candidates no
#: GPU has timed yet (the ``triton_gluon`` and ``triton_gluon128`` providers).
TILES_ENV = "DAAL_KNN_TILES"
TILES_POLICIES = ("narrow", "table", "wide", "gluon", "gluon128")
#: The Gluon forwards' entry names (not ``CONFIGS`` entries: kernels/knn_gluon.py holds their
#: blocks, ``VARIANTS``); :func:`forward_entry` returns them under ``DAAL_KNN_TILES=gluon`` and
#: ``gluon128``. :data:`GLUON_ENTRIES` maps each to its variant (and policy) name.
GLUON_ENTRY = "fwd_gluon"
GLUON128_ENTRY = "fwd_gluon128"
GLUON_ENTRIES = {GLUON_ENTRY: "gluon", GLUON128_ENTRY: "gluon128"}
GLUON_POLICIES = {policy: entry for entry, policy in GLUON_ENTRIES.items()}
#: The default forward where descriptors apply (:func:`_tma_eligible`: float16/bfloat16, k <= 16,
#: the 64-wide D-chunk, the counted merge, 16-byte-aligned rows, sm_90/sm_100 or the
#: interpreter): 64 x 128 tiles, 4 warps, 3 stages. bench/tune_knn.py on the 2026-12-04 H200 run
#: (bf16, D = 512, k = 8, self-kNN; bench/results/2026-12-04-h200/tune_knn.json): 1.73 ms at
#: 20k rows and 11.28 ms at 60k (the model's splits) against the table entry's 2.34 ms and
#: 15.48 ms, i.e. 1.36x and 1.37x; the best of 15 candidates at 60k (128 x 128 capped at 128
#: registers, through descriptors) was 10.95 ms, within 3%, but spills and ran 1.935 ms at 20k.
#: Its sm_90 build: three programs per SM, no spill (tests/kernels/test_kernel_knn.py).
NARROW_ENTRY = "fwd_narrow"
#: The narrow tiles run where the table entry's row tiles alone make at least this many waves of
#: the GPU's SMs (``cdiv(M, 128) >= NARROW_MIN_WAVES * SMs``: M >= 16,769 rows on an H200; any M on
#: the CPU, where the SM count is 1). The 2026-12-04 second H200 run (bench/results/2026-12-04-h200-2)
#: timed them 1.38x faster than the table's at 60k rows, but 9% slower on the memory bank
#: (1024 x 65,536: fwd 702 vs 637 us, fwd+bwd 847 vs 771 us) and 7% slower on the loss batch's
#: kNN (180 x 180: 190 vs 177 us), where the grid is made of column splits, not rows.
NARROW_MIN_WAVES = 1.0
#: The wide entry of ``CONFIGS["half"]`` and the largest KP it serves: its sm_90 builds (KP 8,
#: no labels, with and without ``FINISH``) hold 249-255 registers and no stack (Triton 3.6 and
#: 3.8); with labels or at KP 16 they spill (tests/kernels/test_kernel_knn.py compiles them).
WIDE_ENTRY = "fwd_wide"
WIDE_KP = 8


#: The float16/bfloat16 forward's epilogue (an internal switch): "lean" (the default since
#: 2026-12-04's evening: the norms padded to whole tiles and read unmasked, the counts summed in
#: float32, and in the narrow entry the self mask only on the tiles that meet the diagonal) or
#: "plain" (before; float32 keeps it: :func:`lean_epilogue`). The same slots bit for bit, with
#: fewer instructions per tile in the sm_90 builds (docs/kernels.md, "A leaner epilogue"). Kept
#: until a GPU run times both (the benchmarks' provider ``triton_plain``).
EPILOGUE_ENV = "DAAL_KNN_EPILOGUE"
EPILOGUE_POLICIES = ("lean", "plain")


def epilogue_policy() -> str:
    """The forward's epilogue, ``DAAL_KNN_EPILOGUE`` (:data:`EPILOGUE_POLICIES`)."""
    return env_choice(EPILOGUE_ENV, EPILOGUE_POLICIES)


def lean_epilogue(dtype: torch.dtype, entry: str = "", policy: Optional[str] = None) -> bool:
    """Whether a forward of ``dtype`` inputs on ``entry`` runs the lean epilogue: float16/bfloat16
    under ``DAAL_KNN_EPILOGUE=lean`` (``policy``: that setting, read when None; "lean" is the
    default), on every entry but the wide tiles. float32 keeps the plain one: its 3xTF32 build
    that finishes its split spills 16 B per thread on sm_90 with the lean one; so do the wide
    tiles (``DAAL_KNN_TILES=wide``, an alternative under test): their sm_90 builds spill 8 B per
    thread with it under Triton 3.6."""
    policy = epilogue_policy() if policy is None else policy
    return dtype != torch.float32 and entry != WIDE_ENTRY and policy == "lean"


def tiles_policy() -> str:
    """``DAAL_KNN_TILES`` (default "narrow"); ``ValueError`` for anything else."""
    return env_choice(TILES_ENV, TILES_POLICIES)


def forward_entry(q: torch.Tensor, r: torch.Tensor, kp: int, has_labels: bool) -> str:
    """The ``CONFIGS`` entry of the forward for these inputs: by default :data:`NARROW_ENTRY`
    where the descriptor loads' rules hold (:func:`_tma_eligible`, with the table's D-chunk: the
    table's ``fwd_kp16``, D-chunk 64, the counted merge) and the query rows fill the GPU
    (:data:`NARROW_MIN_WAVES`); with ``DAAL_KNN_TILES=wide``
    :data:`WIDE_ENTRY` where its builds apply (KP <= :data:`WIDE_KP`, no labels, and the same
    rules); with ``DAAL_KNN_TILES=gluon`` (``gluon128``) :data:`GLUON_ENTRY`
    (:data:`GLUON128_ENTRY`) where the narrow tiles would run and :func:`knn_gluon.eligible`
    holds (sm_90), else what the default chooses; elsewhere, and
    with ``DAAL_KNN_TILES=table``, the table's :func:`fwd_entry`."""
    entry = fwd_entry(kp)
    policy = tiles_policy()
    if policy == "table" or merge_policy() != "counted" or (policy == "wide" and (kp > WIDE_KP or has_labels)):
        return entry
    table = CONFIGS[family(q.dtype)]
    alternative = WIDE_ENTRY if policy == "wide" else NARROW_ENTRY
    if alternative == NARROW_ENTRY and (
            cdiv(q.shape[0], table[entry].blocks["BLOCK_M"]) < NARROW_MIN_WAVES * sm_count(q.device)):
        return entry  # few query rows: the table's tiles (see NARROW_MIN_WAVES)
    if policy in GLUON_POLICIES and knn_gluon().eligible(q, r, kp):
        return GLUON_POLICIES[policy]
    if alternative in table and _tma_eligible(q, r, entry, table[entry].block_d_for(q.shape[1]), True):
        return alternative
    return entry


#: How the forward selects: "merge" (the default: the running top-KP of every tile, above) or
#: "threshold" (``DAAL_KNN_SELECT=threshold``: kernels/knn_threshold.py, a bound from a 1 / 16
#: sample, a filter that lists the few entries below it, a selection among them; where
#: :func:`knn_threshold.eligible` holds: float16/bfloat16, no labels, k <= 16, references of at
#: least 1,009 rows). A candidate no GPU has timed (the benchmarks' ``triton_threshold``).
#: "half" (``DAAL_KNN_SELECT=half``): the same, with a self-search's filter on half the tiles
#: (``s_ij = s_ji``: :func:`knn_threshold.halves`), another (``triton_threshold_half``).
SELECT_ENV = "DAAL_KNN_SELECT"
SELECT_POLICIES = ("merge", "threshold", "half")


def select_policy() -> str:
    """``DAAL_KNN_SELECT`` (default "merge"); ``ValueError`` for anything else."""
    return env_choice(SELECT_ENV, SELECT_POLICIES)


def knn_threshold():
    """kernels/knn_threshold.py (imported on first use: it imports this module's helpers)."""
    from . import knn_threshold as module
    return module


def knn_gluon():
    """kernels/knn_gluon.py (imported on first use: it imports this module's merge)."""
    from . import knn_gluon as module

    return module


def _tma_eligible(q: torch.Tensor, r: torch.Tensor, entry: str, block_d: int, counted: bool) -> bool:
    """Whether this forward can load through tensor descriptors: the entry, D-chunk, dtypes and
    merge of the compiled descriptor builds (:data:`TMA_ENTRY`), 16-byte-aligned base pointers
    and row strides (the TMA unit's rule), rows on both sides, and a device with TMA (sm_90+), or
    Triton's CPU interpreter (which emulates descriptors: the tests)."""
    if entry != TMA_ENTRY or block_d != TMA_BLOCK_D or not counted:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[0] == 0 or r.shape[0] == 0:  # a descriptor's shape must be positive
        return False
    size = q.element_size()
    # a single row may have any row stride (0: a broadcast row): PyTorch keeps it, a descriptor's
    # row stride must be a real one (16-byte multiple, and no less than the row: unverified on a GPU)
    if any(t.data_ptr() % 16 or (t.stride(0) * size) % 16 or t.stride(0) < t.shape[1] for t in (q, r)):
        return False
    if q.device.type == "cuda":
        return tma_device(q.device)
    return interpreting()


def tma_device(device: torch.device) -> bool:
    """Whether the descriptor builds fit ``device``: TMA and a data-centre GPU's 227 KB of shared
    memory per program (sm_90, sm_100; the wide tiles take 144 KB). The sm_120 consumer GPUs have
    TMA but 99 KB, and older GPUs no TMA."""
    return (9, 0) <= device_capability(device) < (12, 0)


def merge_policy() -> str:
    """``DAAL_KNN_MERGE`` (default "counted"); ``ValueError`` for anything else."""
    return env_choice(MERGE_ENV, MERGE_POLICIES)


def _num_splits(M: int, N: int, bm: int, bn: int, device: torch.device, policy: Optional[str] = None,
                fused_finish: bool = False, resident: int = 1) -> int:
    """Column ranges per query block: the S minimising waves x (column tiles of the longest
    program + :data:`PROGRAM_OVERHEAD_TILES`) (``_common.wave_split``; fewest splits among
    equals; ``policy="waves"``: without the cost per program); 1 on the CPU. A wave is
    ``resident`` programs per SM (the programs a build fits on one at once: 1 for the table's
    entries; bench/tune_knn.py's candidates, the threshold filter's 2). With ``fused_finish``
    (the forward can finish one split itself) and the model policy: 1 where that costs at most
    :data:`FINISH_LAUNCH_TILES` more than S."""
    policy = SPLIT_POLICY if policy is None else policy
    if policy not in SPLIT_POLICIES:
        raise ValueError(f"DAAL_KNN_SPLITS (the kNN's split policy) must be one of {SPLIT_POLICIES}, got {policy!r}")
    if device.type != "cuda":
        return 1
    wave = sm_count(device) * resident
    if policy == "waves":
        return wave_split(cdiv(M, bm), cdiv(N, bn), wave, MAX_SPLITS)
    return wave_split(cdiv(M, bm), cdiv(N, bn), wave, MAX_SPLITS, PROGRAM_OVERHEAD_TILES,
                      FINISH_LAUNCH_TILES if fused_finish else 0.0)


def _candidates(q, r, k, ql, rl, exclude_self, splits: Optional[int] = None, finish: bool = False,
                entry: Optional[str] = None):
    """The forward kernel's ``(out_s, out_i)``: S x M x KP candidate slots (q, r prepared, same
    dtype; ``r is q`` computes the squared norms once); with ``finish`` (one split, KP <=
    :data:`FUSED_FINISH_KP`) the kernel finishes them itself: ``(dist, index)`` in final form.
    ``entry``: :func:`forward_entry`'s choice when the caller has made it."""
    M, D = q.shape
    N = r.shape[0]
    kp = next_pow2(k)
    has_labels = ql is not None
    entry = entry or forward_entry(q, r, kp, has_labels)
    if entry in GLUON_ENTRIES:  # its own launcher; it never finishes a split itself
        if finish:
            raise ValueError("the Gluon forward does not finish its split: call it with finish=False")
        gl_fwd = knn_gluon()
        variant = GLUON_ENTRIES[entry]
        S = splits or _num_splits(M, N, gl_fwd.VARIANTS[variant].block_m, gl_fwd.BLOCK_N, q.device)
        return gl_fwd.candidates(q, r, k, ql, rl, exclude_self, S, variant=variant)
    descriptors = entry in (WIDE_ENTRY, NARROW_ENTRY)  # entries that always load through them
    cfg = CONFIGS[family(q.dtype)][entry]
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    S = splits or _num_splits(M, N, bm, bn, q.device)
    cols = cdiv(cdiv(N, S), bn) * bn
    S = cdiv(N, cols)
    if finish:  # the outputs in final form; the slot buffers are neither read nor written
        if S != 1 or kp > FUSED_FINISH_KP:
            raise ValueError(f"the forward finishes one split of KP <= {FUSED_FINISH_KP}, got {S} and {kp}")
        out_s = dist = torch.empty(M, k, dtype=torch.float32, device=q.device)
        index = torch.empty(M, k, dtype=torch.int64, device=q.device)
        out_i = index.view(torch.int32)  # typed for the unused slot pointer, never touched
    else:
        out_s = torch.empty(S, M, kp, dtype=torch.float32, device=q.device)
        out_i = torch.empty(S, M, kp, dtype=torch.int32, device=q.device)
        dist, index = out_s, out_i  # typed placeholders: FINISH = False writes neither
    flags = dot_flags(q.dtype, device=q.device)
    lean = lean_epilogue(q.dtype, entry)
    # the lean epilogue reads whole tiles of norms: inf past N (in whole sqnorm blocks of 64 rows)
    pad = max(bn, SQNORM_CONFIG.blocks["BLOCK_M"]) if lean else 1
    qn = row_sqnorms(q, flags["INPUT_PRECISION"], pad=pad if r is q else 1)
    rn = qn if r is q else row_sqnorms(r, flags["INPUT_PRECISION"], pad=pad)
    counted = merge_policy() == "counted" or entry != CHECKED_ENTRY  # the setting checked always
    launch = cfg.launch(D)
    q_desc = r_desc = None
    if (loads_policy() == "tma" and _tma_eligible(q, r, entry, launch["BLOCK_D"], counted)) or descriptors:
        # block shapes: the tile's rows x the D-chunk (the kernel's loads)
        q_desc = TensorDescriptor(q, [M, D], [q.stride(0), 1], [bm, launch["BLOCK_D"]])
        r_desc = TensorDescriptor(r, [N, D], [r.stride(0), 1], [bn, launch["BLOCK_D"]])
    _knn_fwd_kernel[(cdiv(M, bm), S)](
        q, r, q_desc, r_desc, qn, rn, ql if has_labels else qn, rl if has_labels else rn, out_s, out_i,
        dist, index,
        M, N, D, k, cols, q.stride(0), r.stride(0), out_s.stride(0), out_s.stride(1), dist.stride(0),
        index.stride(0), KP=kp, HAS_LABELS=has_labels, EXCLUDE_SELF=bool(exclude_self),
        COUNTED=counted, FINISH=finish, TMA=q_desc is not None, LEAN=lean, **flags, **launch)
    return (dist, index) if finish else (out_s, out_i)


def _finish_fused(out_s: torch.Tensor, out_i: torch.Tensor, q: torch.Tensor, r: torch.Tensor,
                  k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dist, index)``, M x k, in final form from the S x M x KP candidate slots, in one launch
    of ``_knn_finish_kernel`` (selection by ``(s, j)``, exact recompute, re-sort, square root)."""
    S, M, kp = out_s.shape
    D = q.shape[1]
    dist = torch.empty(M, k, dtype=torch.float32, device=q.device)
    index = torch.empty(M, k, dtype=torch.int64, device=q.device)
    cfg = CONFIGS[family(q.dtype)][finish_entry(kp)]
    _knn_finish_kernel[(cdiv(M, cfg.blocks["BLOCK_M"]),)](
        out_s, out_i, q, r, dist, index, M, D, k, S,
        out_s.stride(0), out_s.stride(1), q.stride(0), r.stride(0), dist.stride(0), index.stride(0),
        KP=kp, **cfg.launch(D))
    return dist, index


def _select_chunked(q, r, k, ql, rl, exclude_self):
    """Plain-PyTorch selection over row chunks (MAX_K < k <= N): (squared distance, index)."""
    M, N = q.shape[0], r.shape[0]
    rn = (r * r).sum(1)
    step = max(1, CHUNK_ELEMS // max(N, 1))
    out_s, out_i = [], []
    cols = torch.arange(N, device=q.device)
    for i0 in range(0, M, step):
        qc = q[i0:i0 + step]
        s = ((qc * qc).sum(1)[:, None] + rn[None, :] - 2.0 * (qc @ r.T)).clamp_(min=EPS)
        bad = ~torch.isfinite(s)  # NaN/inf in the inputs: no candidate (as in the kernel)
        if ql is not None:
            bad |= ql[i0:i0 + step, None] != rl[None, :]
        if exclude_self:
            bad |= (i0 + torch.arange(qc.shape[0], device=q.device))[:, None] == cols[None, :]
        s = s.masked_fill_(bad, float("inf"))
        s, idx = torch.sort(s, dim=1, stable=True)
        # copies of the k columns (masked_fill copies the indices): views kept each chunk's whole
        # sorted distances alive until the cat below (M x N float32 by the end, the chunking undone)
        s = s[:, :k].contiguous()
        idx = idx[:, :k].masked_fill(torch.isinf(s), -1)
        out_s.append(s)
        out_i.append(idx)
    return torch.cat(out_s), torch.cat(out_i).contiguous()


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
        _knn_dist_kernel[(cdiv(M, cfg.blocks["BLOCK_M"]),)](
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
def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _knn_backward(g, index, q, r, ref_grad: bool = True, cast: bool = True, dr_rows: int = -1):
    """``(dq, dr)`` in the dtypes of q and r (float32 without ``cast``: the op casts its columns
    once); dq needs no zero-fill (the kernel writes each row once before accumulating), dr is
    zero-filled for the atomics (``0 x D`` without ``ref_grad``); ``dr_rows >= 0``: dr holds
    only the first ``dr_rows`` reference rows' gradients (``batch_rows``)."""
    M, D = q.shape
    rows_r = (r.shape[0] if dr_rows < 0 else dr_rows) if ref_grad else 0
    if M == 0 or D == 0 or index.shape[1] == 0 or r.shape[0] == 0:
        return (torch.zeros(M, D, dtype=q.dtype, device=q.device),
                torch.zeros(rows_r, D, dtype=r.dtype, device=q.device))
    K = index.shape[1]
    dq = torch.empty(M, D, dtype=torch.float32, device=q.device)
    pairs = ref_grad and torch.are_deterministic_algorithms_enabled()
    if ref_grad:
        dr = torch.zeros(rows_r, D, dtype=torch.float32, device=q.device)
    else:  # the op's 0 x D placeholder, already in r's dtype
        dr = torch.empty(0, D, dtype=r.dtype, device=q.device)
    # under deterministic algorithms dR is written per pair, then summed by index in a fixed order
    out = torch.empty(M * K, D, dtype=torch.float32, device=q.device) if pairs else dr if ref_grad else dq
    g = _cast(g, torch.float32)
    cfg = CONFIGS[family(q.dtype)]["bwd" if ref_grad else "bwd_noref"]
    _knn_bwd_kernel[(cdiv(M, cfg.blocks["BLOCK_M"]),)](
        g, index, q, r, dq, out, M, D, K, rows_r, g.stride(0), g.stride(1), index.stride(0), q.stride(0),
        r.stride(0), dq.stride(0), out.stride(0), HAS_DR=ref_grad, DR_PAIRS=pairs, **cfg.launch(D))
    if pairs:  # index -1 (no neighbour) and rows beyond dr's contribute zeros: any row will do
        dr.index_put_((index.reshape(-1).clamp(0, rows_r - 1),), out, accumulate=True)
    return (_cast(dq, q.dtype), _cast(dr, r.dtype)) if cast else (dq, dr)


# The operators are registered with torch.library so that torch.compile(fullgraph=True) sees
# two opaque ops (forward selection, backward scatter) instead of tracing the launchers.
@torch.library.custom_op("daal_triton::knn", mutates_args=())
def _knn_op(query: torch.Tensor, ref: torch.Tensor, k: int, query_labels: Optional[torch.Tensor],
            ref_labels: Optional[torch.Tensor], exclude_self: bool, splits: Optional[int],
            batch_rows: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dist, index)`` of the kNN (see :func:`knn`; ``splits``: the forward's column ranges,
    ``None`` for the launcher's choice; ``batch_rows`` changes only the backward)."""
    return _knn_forward(query, ref, k, query_labels, ref_labels, exclude_self, splits)


def _knn_forward(query, ref, k, query_labels, ref_labels, exclude_self, splits):
    """The body of ``daal_triton::knn`` (a plain function: the launch-count test calls it)."""
    dtype = compute_dtype("knn", query, ref)
    M, N = query.shape[0], ref.shape[0]
    if M == 0 or N == 0:  # nothing to search (and no bank to copy)
        dist = torch.full((M, k), float("inf"), dtype=torch.float32, device=query.device)
        index = torch.full((M, k), -1, dtype=torch.int64, device=query.device)
        return dist, index
    if k > N:  # at most N neighbours: select N, pad the rest (a bank of 6 rows at k = 20,000: 6 columns of work)
        dist, index = _knn_forward(query, ref, N, query_labels, ref_labels, exclude_self, splits)
        return (torch.cat([dist, dist.new_full((M, k - N), float("inf"))], 1),
                torch.cat([index, index.new_full((M, k - N), -1)], 1))
    pad = align_rows("knn")
    q = prepare(query, dtype, align=pad)
    r = q if ref is query else prepare(ref, dtype, align=pad)
    ql = rl = None
    if query_labels is not None:
        ql = query_labels.to(torch.int64).contiguous()
        rl = ql if ref_labels is query_labels else ref_labels.to(torch.int64).contiguous()
    policy = select_policy() if splits is None else "merge"
    if policy != "merge" and knn_threshold().eligible(q, r, k, ql is not None):
        return knn_threshold().select(q, r, k, exclude_self, half=policy == "half")
    return _knn_merge_path(q, r, k, ql, rl, exclude_self, splits)


def _knn_merge_path(q, r, k, ql, rl, exclude_self, splits):
    """``(dist, index)`` of the prepared inputs by the running merge (the default forward, its
    finish, or the k > MAX_K path): ``_knn_forward``'s work after the preparation."""
    M, N = q.shape[0], r.shape[0]
    if k <= MAX_K:
        kp = next_pow2(k)
        entry = forward_entry(q, r, kp, ql is not None)
        if kp <= FUSED_FINISH_KP and merged_launches() and entry not in GLUON_ENTRIES:
            cfg = CONFIGS[family(q.dtype)][entry]
            S = splits or _num_splits(M, N, cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], q.device,
                                      fused_finish=True)
            if S == 1:  # one launch of the forward selects and finishes
                return _candidates(q, r, k, ql, rl, exclude_self, 1, finish=True, entry=entry)
            splits = S
        out_s, out_i = _candidates(q, r, k, ql, rl, exclude_self, splits, entry=entry)
        return _finish_fused(out_s, out_i, q, r, k)
    # k > MAX_K (and k <= N): PyTorch selects, then the exact recompute and re-sort
    _, index = _select_chunked(q.float(), r.float(), k, ql, rl, exclude_self)
    dist, index = _exact(index, q, r)
    return dist.contiguous(), index.contiguous()


@_knn_op.register_fake
def _knn_fake(query, ref, k, query_labels, ref_labels, exclude_self, splits, batch_rows=0):
    M = query.shape[0]
    dist = query.new_empty((M, k), dtype=torch.float32)
    return dist, query.new_empty((M, k), dtype=torch.int64)


@torch.library.custom_op("daal_triton::knn_backward", mutates_args=())
def _knn_backward_op(g: torch.Tensor, index: torch.Tensor, query: torch.Tensor,
                     ref: torch.Tensor, ref_grad: bool, align: bool = True,
                     ref_rows: int = -1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scatter of ``g`` (M x k) over the selected pairs: ``(dL/dquery, dL/dref)``; without
    ``ref_grad`` dL/dref is not computed (an empty 0 x D tensor: no N x D buffer, no atomics);
    ``ref_rows >= 0``: dL/dref of the first ``ref_rows`` rows only (``ref_rows`` x D; the
    ``batch_rows`` backward). ``align``: rows padded to 16 columns as the forward's were
    (``_common.align_rows``)."""
    dtype = compute_dtype("knn", query, ref)
    q = prepare(query, dtype, align=align)
    r = q if ref is query else prepare(ref, dtype, align=align)
    # index.contiguous(): the forward's result as it wrote it (a saved-tensor hook may relayout it)
    dq, dr = _knn_backward(g, index.contiguous(), q, r, ref_grad, cast=False, dr_rows=ref_rows)  # float32 (dr: r's dtype when empty)
    D = query.shape[1]
    return columns(dq, D, query.dtype), columns(dr, D, ref.dtype)


@_knn_backward_op.register_fake
def _knn_backward_fake(g, index, query, ref, ref_grad, align=True, ref_rows=-1):
    rows = (ref.shape[0] if ref_rows < 0 else ref_rows) if ref_grad else 0
    return query.new_empty(query.shape), ref.new_empty((rows, ref.shape[1]))  # contiguous, as the kernel's


def _knn_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output[1])
    ctx.batch_rows = inputs[7] if len(inputs) > 7 else 0  # ref[:batch_rows] are the query's first rows
    ctx.align = align_rows("knn")  # the forward's rows: the backward pads (or not) as it did
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the index


_knn_backward_direct = direct(_knn_backward_op)


def _knn_autograd_backward(ctx, g, _g_index):
    """``dQ_i = sum_k h_ik (q_i - r_j)``, ``dR_j = -sum_{(i,k): idx_ik = j} h_ik (q_i - r_j)``,
    ``h_ik = g_ik / d_ik`` (0 where the floor binds; ``_knn_backward_op``); with ``batch_rows = b``
    the rows ``ref[:b]`` are ``query[:b]``, so their dR rows are added to dQ's first b rows."""
    query, ref, index = ctx.saved_tensors
    if g is None:
        return (None,) * 8
    ref_grad = bool(ctx.needs_input_grad[1])
    g = g.contiguous()
    b = ctx.batch_rows
    # ref[:b] are query[:b]: their reference-role gradient goes to the query's rows (in place: both
    # are this backward's own buffers). Without a ref gradient, dR holds those b rows alone (b x D,
    # no N x D buffer), scattered by the same launch that computes dQ
    dq, dr = _knn_backward_direct(g, index, query, ref, ref_grad or b > 0, ctx.align,
                                  -1 if ref_grad else b)
    if b:
        dq[:b] += dr[:b]
        if ref_grad:  # moved from dr's first b rows to dq's
            dr[:b] = 0
    return dq, dr if ref_grad else None, None, None, None, None, None, None


_knn_op.register_autograd(_knn_autograd_backward, setup_context=_knn_setup_context)
_knn_call = eager(_knn_op)


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
    """The ``k`` nearest rows of ``ref`` (N x D) for each row of ``query`` (M x D).

    Returns ``(dist, index)``, each M x k: ``dist`` float32 (float64 inputs raise ``ValueError``),
    ``index`` int64, sorted ascending with ties to the smaller index; with labels only
    ``ref_labels[j] == query_labels[i]`` counts; ``exclude_self`` drops ``j == i``; rows with
    fewer than ``k`` candidates are padded with ``inf`` / ``-1``. ``dist`` is differentiable in
    ``query`` and ``ref``; ``index`` is not. Never allocates an M x N buffer.

    ``batch_rows`` (``0 <= batch_rows <= min(M, N)``): the first ``batch_rows`` rows of ``ref``
    are the first rows of ``query`` (a memory bank's ``cat([batch, bank])``); their
    reference-role gradient is added to ``query``'s and those rows of ``ref`` receive none (as
    ``daal_triton.reference.knn``). The loss passes it for ``ref_includes_batch=True`` when the
    reference set carries no gradient: the backward then builds no N x D buffer (module
    docstring, "Backward").
    """
    return _knn(query, ref, k, query_labels=query_labels, ref_labels=ref_labels,
                exclude_self=exclude_self, batch_rows=batch_rows)


def knn_wave_splits(query: torch.Tensor, ref: torch.Tensor, k: int, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn` (same keyword arguments) with the forward's splits chosen as before the first
    GPU run (``DAAL_KNN_SPLITS=waves``; the benchmarks' ``triton_wave_splits`` provider)."""
    splits = None
    if k <= MAX_K and query.is_cuda:
        cfg = CONFIGS[family(compute_dtype("knn", query, ref))][fwd_entry(next_pow2(k))]
        splits = _num_splits(query.shape[0], ref.shape[0], cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"],
                             query.device, "waves")
    return _knn(query, ref, k, splits=splits, **kwargs)


#: The most query or reference rows: the kernels index rows and columns in int32 (program id x
#: block, a split's end ``n_start + cols``), and the last tile and split reach up to 1024 x 256
#: columns past the last row (a bounds probe, 2026-12-07: at 2^31 - 1 rows a split's end wrapped
#: negative and skipped its columns; at 2^31 query rows the last program's rows did, reading and
#: writing out of bounds).
ROWS_MAX = 2**31 - 2**18


def _knn(query, ref, k, *, query_labels=None, ref_labels=None, exclude_self=False, splits=None, batch_rows=0):
    if (query_labels is None) != (ref_labels is None):
        raise ValueError("query_labels and ref_labels must be given together")
    if isinstance(k, torch.SymInt):  # torch.export with a dynamic batch: the loss's k = min(hp.k, N) is
        k = int(k)  # symbolic; the kernels' KP needs a number: specialised (a guard on N, e.g. N >= 3)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if query.ndim != 2 or ref.ndim != 2 or query.shape[1] != ref.shape[1]:
        raise ValueError(f"query and ref must be M x D and N x D, got {tuple(query.shape)} and {tuple(ref.shape)}")
    compute_dtype("knn", query, ref)
    for name, rows in (("query", query.shape[0]), ("ref", ref.shape[0])):  # export: no guard on a symbolic size
        if not isinstance(rows, torch.SymInt) and rows > ROWS_MAX:
            raise ValueError(f"{name} has {rows} rows; the kernels' row and column indices are int32: at most "
                             f"{ROWS_MAX} (2^31 less room for the last tile and column split)")
    limit = min(query.shape[0], ref.shape[0])
    if (isinstance(batch_rows, bool) or not isinstance(batch_rows, (int, torch.SymInt))
            or not 0 <= batch_rows <= limit):
        raise ValueError(f"batch_rows must be an integer in [0, min(M, N)] = [0, {limit}] (the reference rows "
                         f"that are the query's first rows), got {batch_rows!r}")
    return _knn_call(query, ref, k, query_labels, ref_labels, bool(exclude_self), splits, batch_rows)
