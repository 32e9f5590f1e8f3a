"""The kNN forward by a threshold instead of a running merge (``DAAL_KNN_SELECT=threshold``;
docs/kernels.md, "Selection by a threshold").

The default forward (kernels/knn.py) merges every tile of distances into a running top-KP per
row: its epilogue, not its GEMM, is most of its time. This path selects the same neighbours with
almost no per-tile merge work, in three steps, each on the device, with no host synchronisation:

1. **An upper bound per row.** The default forward on a strided sample of the references,
   ``r[::STRIDE]`` (N / STRIDE rows: a 1 / STRIDE share of the work), gives each query's k
   nearest sample distances. Their largest, ``e_i``, bounds the query's k-th neighbour over all
   of ``r`` from above (the sample is a subset). With self pairs excluded, a query ``i =
   STRIDE m`` is the sample's row m: its ``e_i`` comes from a second forward, of ``q[::STRIDE]``
   against the sample with self pairs excluded (a 1 / STRIDE^2 share); no other query can meet
   itself in the sample. The threshold adds what the GEMM form may differ from the exact squared
   distance by (float32 rounding over D; see :func:`thresholds`):

       t_i = e_i (1 + 2^-10) + 2^-12 (||q_i||^2 + max_j ||r_j||^2)

2. **A filter.** ``_knn_filter_kernel`` computes every tile of ``s_ij = ||q_i||^2 +
   ||r_j||^2 - 2 q_i . r_j`` (the default forward's GEMM form, the same D-chunks) and appends
   each ``(max(s_ij, eps), j)`` with ``s_ij <= t_i`` (``j != i`` when self pairs are excluded),
   packed in one int64 key (``knn._pair_key``), to row ``i``'s list of :func:`list_cap` slots
   (one atomic per row and tile reserves them). About ``k STRIDE`` entries per row pass (the
   number of points below the k-th smallest of a 1 / STRIDE sample does not depend on the data:
   a negative hypergeometric count), so a tile's epilogue is a compare, a count and about two
   rounds of listing (the most entries of one row in the tile), with no running top-k to keep:
   no KP slots per row in registers, which lets the tiles be 128 x 128 at two programs per SM.
   In a self-search (``r is q``) with ``DAAL_KNN_SELECT=half``, ``_knn_filter_half_kernel``
   computes only the tiles ``J >= I`` and lists from each both directions (``s_ij = s_ji``):
   the same lists from half the GEMM (:func:`halves`; docs/kernels.md, "Half the tiles of a
   self-search").

3. **A selection.** ``_knn_select_kernel`` takes each row's K best listed entries by ``(s, j)``
   (ties: the smaller column), recomputes their squared distances exactly by direct differences
   and writes ``dist = sqrt(max(e, eps))`` and ``index`` sorted by ``(e, j)``: the default
   finish's arithmetic (``knn._exact_key``, ``knn._store_sorted``).

Every one of a row's k best pairs by ``(s, j)`` passes the filter (their clamped ``s``, at
least the unclamped one, is at most ``t_i``), so when a row's list did not overflow the result
is the default forward's. A row whose count passed its slots (duplicates, an unrepresentative
sample) is rescanned: ``_knn_rescan_kernel`` runs the default forward's merge over all columns
for the row blocks that hold one (the other programs return at once) and rewrites those rows:
slow, rare, exact.

Eligible (:func:`eligible`): float16/bfloat16 inputs (the threshold's rounding margin is that of
their float32 GEMM), no labels, ``k <= MAX_K``, a sample of at least ``MIN_SAMPLE`` rows, and the
filter's descriptor loads (sm_90/sm_100, aligned rows: :func:`_tma_ok`).
Memory: :func:`list_cap` x 8 bytes per query row for the lists (4 KB at k <= 8, 8 KB up to 16),
the queries in chunks of at most ``LIST_BYTES``; the sample ``r[::STRIDE]`` copied (N / 16 x D in
the inputs' dtype, and ``q[::STRIDE]`` for a self-search's own bounds) with its kNN's buffers (the
default forward's, on 1/16 of the columns); O(M + N) float32/int32 vectors (norms, bounds, counts).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.language.target_info import cuda_capability_geq
from triton.tools.tensor_descriptor import TensorDescriptor

from ._common import (
    TL_EPS,
    KernelConfig,
    _dot_rows,
    _dot_tile,
    cdiv,
    dot_flags,
    family,
    interpreting,
    next_pow2,
    row_sqnorms,
    wave_split,
)
from .knn import _NO_KEY, _exact_key, _knn_finish_slots, _knn_merge_tile, _pair_key, _store_sorted

#: The sample's row stride: 1 / STRIDE of the references bound the rows' k-th distances.
STRIDE = 16
#: List slots per query row (one int64 key of (s, j) each) for k <= 8, and as many more per 8
#: more (:func:`list_cap`): about k STRIDE entries pass (128 at k = 8, 256 at k = 16); a count
#: above the cap (a Gamma(k) tail beyond 4 times its mean at k = 8 and 16: ~1e-7 and ~1e-13 per
#: row; at 512 slots, k = 16 would send 40 of 60k rows to the rescan) sends the row there.
CAP = 512
#: The most k this path serves (the selection keeps K exact keys per row in registers).
MAX_K = 16
#: The fewest sample rows (smaller reference sets: the default forward).
MIN_SAMPLE = 64
#: The most bytes of lists at once: larger query sets run in row chunks.
LIST_BYTES = 256 << 20
#: Sample strides bench/probe_h200.py times beside STRIDE (:func:`sampled_every`): a larger
#: sample costs more, a smaller one lists more entries per row (more listing rounds per tile).
PROBE_STRIDES = (8, 32)

#: The filter's tiles: 128 x 128 on one warpgroup (4 warps), D-chunks of 64, through tensor
#: descriptors where they apply. The GEMM-only ceiling of 128 x 128 tiles was 571 TFLOP/s on the
#: 2026-12-04-h200-3 run (bench/probe_h200.py), against 407 for the default forward's 64 x 128, which
#: L2 bandwidth bounds. Its sm_90 builds hold 214-239 registers and 98 KB of shared memory, no
#: stack (Triton 3.6 and 3.8): two programs per SM, so one lists while the other multiplies (on
#: 8 warps: 161-188 registers, one per SM; capped at 128, they spill). The selection's rows; the
#: rescan's tiles (64 x 64).
CONFIGS = {
    "filter": KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=3, block_d=(16, 64)),
    "select": KernelConfig({"BLOCK_M": 16, "BLOCK_C": 64}, num_warps=4, num_stages=1, block_d=(16, 64)),
    "rescan": KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2, block_d=(16, 64)),
}
#: Filter programs resident on one SM at once (its sm_90 builds' registers and shared memory:
#: tests/kernels/test_kernel_launched_builds.py, ``test_threshold_filter_fits_two_programs_per_sm``):
#: :func:`filter_splits` counts the grid's waves in as many programs per SM. Until 2026-12-05's
#: fourth session the grid took the forward's waves of one program per SM: at 60k x 60k, S = 7
#: (3,283 programs: 12.4 waves of 264) against S = 5 (2,345: 8.9 waves), a 3.8% longer modelled
#: time. The nearest measurement: the forward's 128 x 128 tiles at two programs per SM (a
#: bench/tune_knn.py candidate, 2026-12-04-h200-3) ran 60k in 10.65 ms at S = 5 against 11.16 at
#: S = 7. 1 restores the old grid; bench/probe_h200.py times both for the filter (no GPU has yet).
PROGRAMS_PER_SM = 2
#: Other tiles for the filter, which bench/probe_h200.py times at the 60k evaluation's shape
#: beside :data:`CONFIGS` (no GPU has timed any of them): ``(BLOCK_M, BLOCK_N, num_warps,
#: num_stages, maxnreg)`` -> the programs per SM their sm_90 builds allow (registers and shared
#: memory, Triton 3.8; ``test_threshold_filter_alternatives_fit_their_residency``), which their
#: grids count waves of (:func:`filter_tiles`):
#:
#: - 128 x 128 on 8 warps capped at 128 registers: two per SM (40 B of stack under Triton 3.8,
#:   80 B under 3.6, outside the K-loop); the forward's tiles of this shape were its fastest at
#:   60k on the 2026-12-04-h200-3 run (10.65 ms against the default's 10.95);
#: - 256 x 128 and 128 x 256 on 8 warps: 85 FLOP per L2 byte instead of 64, one per SM (239 and
#:   254 registers; their GEMM-only ceilings in 2026-12-04-h200-3's probe were 562 and 583
#:   TFLOP/s at 20k (the 128 x 256 the highest), and a row of 256 columns lists about twice the entries per tile).
FILTER_ALTERNATIVES = {(128, 128, 8, 3, 128): 2, (256, 128, 8, 3, None): 1, (128, 256, 8, 3, None): 1}


@triton.jit
def _knn_filter_kernel(
    q_ptr, r_ptr, q_desc, r_desc, qn_ptr, rn_ptr, thr_ptr, count_ptr, list_ptr,
    M, N, D, row0, cols_per_split, stride_q_m, stride_r_n,
    CAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
    TMA: tl.constexpr,
):
    """Append the key of ``(max(s_ij, eps), j)`` (``knn._pair_key``) to row ``i``'s list for
    every ``s_ij = qn_i + rn_j - 2 q_i.r_j <= t_i`` over the columns of split ``program_id(1)``
    (``j != row0 + i`` with EXCLUDE_SELF): slot ``count_i`` (an atomic add), written while below
    CAP; ``count_i`` keeps counting past it (the rescan's cue).

    Args:
        q_ptr, r_ptr: M x D queries (this chunk's) and N x D references, unit column stride.
        q_desc, r_desc: their tensor descriptors (blocks BLOCK_M/BLOCK_N x BLOCK_D) with TMA,
            else None.
        qn_ptr, rn_ptr: squared row norms (float32); masked rows and columns read inf.
        thr_ptr: the rows' thresholds t_i (float32). count_ptr: the rows' counts (int32: 0, or CAP + 1
            for a row without a finite bound, which then goes to the rescan).
        list_ptr: M x CAP list slots (int64 keys).
        M, N, D: sizes. row0: the chunk's first query row (the self mask's). cols_per_split:
            columns per split, a multiple of BLOCK_N. stride_q_m, stride_r_n: row strides.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    row_lo = pid_m * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    q_rows = q_ptr + rows64[:, None] * stride_q_m
    qn = tl.load(qn_ptr + rows, mask=rmask, other=float("inf"))
    thr = tl.load(thr_ptr + rows, mask=rmask, other=-1.0)
    lanes = tl.arange(0, BLOCK_N)
    n_start = pid_s * cols_per_split
    n_end = tl.minimum(N, n_start + cols_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + lanes
        cmask = cols < n_end
        rn = tl.load(rn_ptr + cols, mask=cmask, other=float("inf"))  # in flight during the MMAs
        acc = _dot_tile(q_rows, r_ptr, q_desc, r_desc, row_lo, n0, cols, rmask, cmask, D, stride_r_n,
                        BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, ROUND_TF32, TMA)
        # the default forward's s before its clamp (NaN: never below a threshold): the listed
        # entries are clamped, and a set that may hold more entries below eps selects the same
        s = qn[:, None] + rn[None, :] - 2.0 * acc
        hits = tl.where(s <= thr[:, None], s, float("inf"))
        if EXCLUDE_SELF:  # only a tile that meets the diagonal holds self pairs
            if (n0 < row0 + row_lo + BLOCK_M) & (n0 + BLOCK_N > row0 + row_lo):
                hits = tl.where((rows + row0)[:, None] == cols[None, :], float("inf"), hits)
        n_row = tl.sum(tl.where(hits < float("inf"), 1.0, 0.0), axis=1).to(tl.int32)
        _list_rows(hits, n_row, rows, rows64, lanes, n0, count_ptr, list_ptr, CAP)


@triton.jit
def _block_max(n):
    """The largest of the 1-D ``n`` (a row's or a column's counts)."""
    if cuda_capability_geq(10):  # Blackwell: as the forward's merge (kernels/knn.py), the max
        return tl.max(n)  # through a reshape: the 1-D max fails Triton 3.6's sm_100 build
    else:
        return tl.max(n, axis=0)


@triton.jit
def _list_rows(hits, n_row, rows, rows64, lanes, n0, count_ptr, list_ptr, CAP: tl.constexpr):
    """List each row's ``n_row`` finite entries of ``hits`` (columns ``n0 + lanes``) in its list.

    Each row's entries below its threshold, counted (``n_row``, exact in float32: at most
    BLOCK_N), get their slots reserved by one atomic per row, then are listed one per round,
    smallest first (an atomic per entry returning its slot does not compile for sm_90 under
    Triton 3.8: the layout pass asserts on its 2-D result), each as one (s, j) key: one layout
    conversion per round (rows of the MMA layout to the store's), not one per field."""
    rounds = _block_max(n_row)
    if rounds > 0:
        base = tl.atomic_add(count_ptr + rows, n_row, mask=n_row > 0, sem="relaxed")
        at = list_ptr + rows64 * CAP + base
        # the last round leaves its entry in the tile: each later round first knocks out the
        # one before (R rounds, R - 1 knock-outs)
        vc = _list_round(hits, 0, n_row, base, at, n0, CAP)
        for t in range(1, rounds):
            hits = tl.where(lanes[None, :] == vc[:, None], float("inf"), hits)
            vc = _list_round(hits, t, n_row, base, at, n0, CAP)


@triton.jit
def _list_round(hits, t, n_row, base, at, n0, CAP: tl.constexpr):
    """One round of the filter's listing: each row's smallest remaining entry (any order lists
    the same set: no tie-break) stored as its (max(s, eps), j) key in slot ``base + t`` while
    ``t < n_row`` and the slot is below CAP; returns its lane."""
    v, vc = tl.min(hits, axis=1, return_indices=True, return_indices_tie_break_left=False)
    keep = (t < n_row) & (base + t < CAP)
    tl.store(at + t, _pair_key(tl.maximum(v, TL_EPS), n0 + vc), mask=keep)
    return vc


@triton.jit
def _knn_filter_half_kernel(
    x_ptr, x_desc, xn_ptr, thr_ptr, count_ptr, list_ptr, M, D, tiles_per_split, stride_x_m,
    CAP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, TMA: tl.constexpr,
):
    """The filter of a self-search (``r is q``) on half the tiles: ``s_ij = s_ji`` (the GEMM
    form's ``xn_i + xn_j - 2 x_i.x_j``: the same products over the same D-chunks), so the tile
    ``(I, J)``, ``J >= I``, lists both ``(s_ij, j)`` in row ``i``'s list where ``s_ij <= t_i``
    and ``(s_ij, i)`` in row ``j``'s where ``s_ij <= t_j``: what :func:`_knn_filter_kernel` lists
    from the tiles ``(I, J)`` and ``(J, I)`` (on ``I = J`` only the first, ``j != i`` with
    EXCLUDE_SELF). ``nb (nb + 1) / 2`` tiles of ``nb = cdiv(M, BLOCK)``, half the GEMM.

    Program ``(p, s)`` walks row block ``a = p`` against column blocks ``nb - 1`` down to ``a``
    (tiles ``t < nb - a``: column ``nb - 1 - t``), then row block ``b = nb - 1 - p`` against
    ``b`` up to ``nb - 1`` (column ``t - 1``): ``nb + 1`` tiles per pair (``b = a``: only the
    first), the ``s``-th run of ``tiles_per_split`` of them. A tile's column block depends on
    ``t`` alone, so the programs of a wave share their column blocks (one or two at a time) and
    hold distinct row blocks: the other filter's L2 footprint. (Walking both from the diagonal
    outwards would have a wave read as many distinct column blocks as row blocks: about 68 MB at
    60k, past an H200's 50 MB of L2.)

    One tile of registers holds both directions, the columns' by its sign: ``h = -max(s, eps)``
    where ``s <= t_j``, else ``max(s, eps)`` where ``s <= t_i``, else ``inf`` (so that the
    rounds hold no column thresholds: 32 registers a thread). The columns' entries list first,
    by rows: a round takes each row ``i``'s most negative ``h_ij`` (any order lists the same
    set), appends ``(-h_ij, i)`` to row ``j``'s list (an atomic per row and round returns the
    slot: rows of one round may meet in a column; a column reduction instead took 2,320
    instructions and 33 barriers per warp and round on sm_90) and flips its sign. Then the rows
    list ``|h| <= t_i`` as :func:`_knn_filter_kernel` does.

    Args:
        x_ptr: M x D rows (queries and references), unit column stride; x_desc: its tensor
            descriptor (blocks BLOCK x BLOCK_D) with TMA, else None.
        xn_ptr: squared row norms (float32); thr_ptr: thresholds t_i (float32; -1: none);
        count_ptr: counts (int32); list_ptr: M x CAP list slots (int64 keys).
        M, D: sizes. tiles_per_split: tiles of a program. stride_x_m: row stride.
    """
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    nb = tl.cdiv(M, BLOCK)
    a = pid_p
    b = nb - 1 - pid_p
    first_len = nb - a
    total = first_len + tl.where(b > a, nb - b, 0)
    t_lo = pid_s * tiles_per_split
    t_hi = tl.minimum(total, t_lo + tiles_per_split)
    lanes = tl.arange(0, BLOCK)
    for t in range(t_lo, t_hi):
        in_first = t < first_len
        blk_i = tl.where(in_first, a, b)
        # the column block depends on t alone (nb - 1 - t, then t - 1), not on the pair: the
        # programs running at once read the same one or two, as the other filter's do
        blk_j = tl.where(in_first, nb - 1 - t, t - 1)
        row_lo = blk_i * BLOCK
        n0 = blk_j * BLOCK
        rows = row_lo + lanes
        cols = n0 + lanes
        rmask = rows < M
        cmask = cols < M
        rows64 = rows.to(tl.int64)
        # norms and thresholds in flight during the MMAs
        xn_r = tl.load(xn_ptr + rows, mask=rmask, other=float("inf"))
        xn_c = tl.load(xn_ptr + cols, mask=cmask, other=float("inf"))
        thr_r = tl.load(thr_ptr + rows, mask=rmask, other=-1.0)
        # none on the diagonal (-inf: close rows of large norm round s below -1); a select, not ``cmask &
        # (blk_j != blk_i)``: Triton 3.9's interpreter splats it as int32 and its load refuses the mask
        thr_c = tl.load(thr_ptr + cols, mask=tl.where(blk_j != blk_i, cmask, False), other=float("-inf"))
        acc = _dot_tile(x_ptr + rows64[:, None] * stride_x_m, x_ptr, x_desc, x_desc, row_lo, n0, cols,
                        rmask, cmask, D, stride_x_m, BLOCK, BLOCK, BLOCK_D, INPUT_PRECISION, ROUND_TF32, TMA)
        s = xn_r[:, None] + xn_c[None, :] - 2.0 * acc
        # compared before the clamp (NaN passes neither), clamped after: every listed value > 0
        sc = tl.maximum(s, TL_EPS)
        h = tl.where(s <= thr_c[None, :], -sc, tl.where(s <= thr_r[:, None], sc, float("inf")))
        if EXCLUDE_SELF:  # self pairs: the diagonal tiles' (which list no columns' entries)
            if blk_i == blk_j:
                h = tl.where(lanes[:, None] == lanes[None, :], float("inf"), h)
        n_rev = tl.sum(tl.where(h < 0, 1.0, 0.0), axis=1).to(tl.int32)
        n_row = tl.sum(tl.where(tl.abs(h) <= thr_r[:, None], 1.0, 0.0), axis=1).to(tl.int32)
        rounds = _block_max(n_rev)
        for r in range(0, rounds):  # (its first round before the loop, for R - 1 flips: 64 B of spills under 3.6)
            vc = _list_columns_round(h, r, n_rev, rows, n0, count_ptr, list_ptr, CAP)
            # past a row's count vc may point anywhere: a sign flip no later store reads (rows read |h|)
            h = tl.where(lanes[None, :] == vc[:, None], -h, h)
        h = tl.abs(h)
        _list_rows(tl.where(h <= thr_r[:, None], h, float("inf")), n_row, rows, rows64, lanes, n0,
                   count_ptr, list_ptr, CAP)


@triton.jit
def _list_columns_round(h, r, n_rev, rows, n0, count_ptr, list_ptr, CAP: tl.constexpr):
    """One round of the columns' entries in :func:`_knn_filter_half_kernel`: each row ``i``'s
    most negative ``h_ij`` (any order lists the same set: a plain min, no select) appended as the
    key of ``(-h_ij, i)`` to row ``j = n0 + lane``'s list, its slot from an atomic (rows of one
    round may meet in a column), while ``r < n_rev`` and the slot is below CAP; returns the lane."""
    v, vc = tl.min(h, axis=1, return_indices=True, return_indices_tie_break_left=False)
    col = n0 + vc
    slot = tl.atomic_add(count_ptr + col, 1, mask=r < n_rev, sem="relaxed")
    tl.store(list_ptr + col.to(tl.int64) * CAP + slot, _pair_key(-v, rows), mask=(r < n_rev) & (slot < CAP))
    return vc


@triton.jit
def _knn_select_kernel(
    count_ptr, list_ptr, q_ptr, r_ptr, dist_ptr, index_ptr, M, D, K, cap,
    stride_q_m, stride_r_n, stride_dist_m, stride_index_m,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    KP: tl.constexpr,
):
    """From each row's ``min(count_i, cap)`` listed keys of ``(s, j)`` (``knn._pair_key``), the
    ``K`` best (K rounds of the smallest key above the last), their squared distances
    recomputed exactly ``e = ||q_i - r_j||^2`` (``knn._exact_key``), re-sorted by ``(e, j)`` and
    written as ``dist = sqrt(max(e, eps))``, ``index = j`` (``inf`` / ``-1`` past the row's
    entries; ``knn._store_sorted``). A row over ``cap`` reads no slot (``inf`` / ``-1``: the rescan
    rewrites it).

    Args: count_ptr (M, int32), list_ptr (M x cap, int64), q_ptr / r_ptr (the queries
    of this chunk and the references, unit column stride), dist_ptr / index_ptr (M x K outputs,
    float32 / int64, unit column stride), sizes and row strides (``cap``: the list slots per row,
    a runtime argument here and in the rescan, so that every :func:`list_cap` and probe stride
    shares their builds; the filter's stays a constant of its hot loop); BLOCK_C: list slots per
    load; BLOCK_D: the recompute's D-chunk (the default finish's); KP: next_pow2(K) key slots.
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    rows64 = rows.to(tl.int64)
    # a row over cap (its list full or never written: a row without a bound starts there) is
    # the rescan's: none of its slots is read here
    count = tl.load(count_ptr + rows, mask=rmask, other=0)
    n = tl.where(count > cap, 0, count)
    longest = tl.max(n, axis=0)
    slots = tl.arange(0, KP)
    lanes = tl.arange(0, BLOCK_C)
    exact = tl.full([BLOCK_M, KP], _NO_KEY, tl.int64)
    prev = tl.full([BLOCK_M], -1, tl.int64)
    for t in range(0, K):
        best = tl.full([BLOCK_M], _NO_KEY, tl.int64)
        for c0 in range(0, longest, BLOCK_C):
            c = c0 + lanes
            m = c[None, :] < n[:, None]
            key = tl.load(list_ptr + rows64[:, None] * cap + c[None, :], mask=m, other=_NO_KEY)
            best = tl.minimum(best, tl.min(tl.where(key > prev[:, None], key, _NO_KEY), axis=1))
        prev = best
        e = _exact_key(best, rows64, q_ptr, r_ptr, D, stride_q_m, stride_r_n, BLOCK_M, BLOCK_D)
        exact = tl.where(slots[None, :] == t, e[:, None], exact)
    _store_sorted(exact, rows64, rmask, dist_ptr, index_ptr, K, stride_dist_m, stride_index_m, BLOCK_M)


@triton.jit
def _knn_rescan_kernel(
    q_ptr, r_ptr, qn_ptr, rn_ptr, count_ptr, dist_ptr, index_ptr, M, N, D, K, cap,
    stride_q_m, stride_r_n, stride_dist_m, stride_index_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    KP: tl.constexpr, EXCLUDE_SELF: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ROUND_TF32: tl.constexpr,
):
    """The exact fallback: for a block of BLOCK_M query rows holding one whose count passed ``cap``,
    the default forward's running top-KP over all N columns (``knn._knn_merge_tile``: the counted
    merge, self pairs masked) and its finish (``knn._knn_finish_slots``), written for those rows
    only; a block without one returns at once (one load of its counts)."""
    pid = tl.program_id(0)
    row_lo = pid * BLOCK_M
    rows = row_lo + tl.arange(0, BLOCK_M)
    rmask = rows < M
    over = tl.load(count_ptr + rows, mask=rmask, other=0) > cap
    if tl.max(over.to(tl.int32), axis=0) > 0:
        rows64 = rows.to(tl.int64)
        q_rows = q_ptr + rows64[:, None] * stride_q_m
        qn = tl.load(qn_ptr + rows, mask=rmask, other=float("inf"))
        slots = tl.arange(0, KP)
        topd = tl.zeros([BLOCK_M, KP], dtype=tl.float32) + float("inf")
        topi = tl.zeros([BLOCK_M, KP], dtype=tl.int32) + (-1 - slots)[None, :]
        worst = tl.zeros([BLOCK_M], dtype=tl.float32) + float("inf")
        widx = tl.zeros([BLOCK_M], dtype=tl.int32) - 1
        lanes = tl.arange(0, BLOCK_N)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + lanes
            cmask = cols < N
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            acc = _dot_rows(q_rows, r_ptr + cols.to(tl.int64)[:, None] * stride_r_n, rmask, cmask, D,
                            acc, BLOCK_D, INPUT_PRECISION, ROUND_TF32)
            topd, topi, worst, widx = _knn_merge_tile(
                acc, n0, lanes, cols, cmask, rows, row_lo, qn, 0, rn_ptr, rn_ptr, topd, topi, worst, widx,
                BLOCK_M, BLOCK_N, KP, False, EXCLUDE_SELF, True, False)
        _knn_finish_slots(topd, topi, rows64, rmask & over, slots, q_ptr, r_ptr, dist_ptr, index_ptr, D, K,
                          stride_q_m, stride_r_n, stride_dist_m, stride_index_m, BLOCK_M, BLOCK_D, KP)


@contextlib.contextmanager
def _settings(**values) -> Iterator[None]:
    """Within: this module's globals ``values`` (the probe's other settings); after, even past an
    exception, what they were."""
    saved = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(saved)


def sampled_every(stride: int) -> contextlib.AbstractContextManager:
    """Within: STRIDE = ``stride`` and CAP scaled with it (the lists keep four times the mean
    count of k = 8), for the probe's timings (:data:`PROBE_STRIDES`; the launch recorder builds
    them: tests/kernels/launch_recorder.py)."""
    return _settings(STRIDE=stride, CAP=CAP * stride // STRIDE)


def filter_tiles(blocks: Tuple[int, int, int, int, Optional[int]]) -> contextlib.AbstractContextManager:
    """Within: the filter runs on ``blocks``, a key of :data:`FILTER_ALTERNATIVES`, and its grid
    counts waves of the programs per SM given there (for bench/probe_h200.py's timings; the
    launch recorder builds them: tests/kernels/launch_recorder.py). ``KeyError`` for other
    blocks."""
    bm, bn, warps, stages, maxnreg = blocks
    tiles = CONFIGS["filter"].with_blocks(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                                          maxnreg=maxnreg)
    return _settings(CONFIGS=dict(CONFIGS, filter=tiles), PROGRAMS_PER_SM=FILTER_ALTERNATIVES[blocks])


def filter_splits(m: int, n: int, device: torch.device, programs_per_sm: Optional[int] = None) -> int:
    """Column splits of the filter's grid over ``m`` query rows and ``n`` references: the
    forward's (``knn._num_splits``) with waves of ``programs_per_sm`` (default
    :data:`PROGRAMS_PER_SM`) programs per SM; 1 on the CPU. (The splits append to the same
    lists: none needs a merge.)"""
    from . import knn as kk

    per_sm = PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    bm, bn = CONFIGS["filter"].blocks["BLOCK_M"], CONFIGS["filter"].blocks["BLOCK_N"]
    return kk._num_splits(m, n, bm, bn, device, resident=per_sm)


def half_splits(m: int, device: torch.device, programs_per_sm: Optional[int] = None) -> int:
    """Splits of each pair's ``nb + 1`` tiles in :func:`_knn_filter_half_kernel`'s grid over a
    self-search of ``m`` rows (``nb = cdiv(m, BLOCK)``, ``cdiv(nb, 2)`` pairs): the forward's wave
    model (``_common.wave_split``, its cost per program) in waves of ``programs_per_sm`` (default
    :data:`PROGRAMS_PER_SM`); 1 on the CPU."""
    from . import knn as kk

    if device.type != "cuda":
        return 1
    per_sm = PROGRAMS_PER_SM if programs_per_sm is None else programs_per_sm
    nb = cdiv(m, CONFIGS["filter"].blocks["BLOCK_M"])
    return wave_split(cdiv(nb, 2), nb + 1, kk.sm_count(device) * per_sm, kk.MAX_SPLITS, kk.PROGRAM_OVERHEAD_TILES)


def halves(q: torch.Tensor, r: torch.Tensor, k: int) -> bool:
    """Whether the filter of these prepared inputs can run on half the tiles
    (:func:`_knn_filter_half_kernel`): a self-search (``r is q``), square filter tiles, and every
    row's list at once (a tile writes to its columns' lists too: no query chunks)."""
    blocks = CONFIGS["filter"].blocks
    return r is q and blocks["BLOCK_M"] == blocks["BLOCK_N"] and q.shape[0] * list_cap(k) * 8 <= LIST_BYTES


def list_cap(k: int) -> int:
    """The list slots per query row at this k: :data:`CAP` per 8 neighbours."""
    return CAP * cdiv(k, 8)


def eligible(q: torch.Tensor, r: torch.Tensor, k: int, has_labels: bool) -> bool:
    """Whether the threshold path takes these prepared inputs: float16/bfloat16, no labels,
    ``0 < k <= MAX_K``, a sample of at least ``MIN_SAMPLE`` rows (and more than k + 1), and the
    filter's descriptor loads (:func:`_tma_ok`: sm_90/sm_100, 16-byte-aligned rows; its pointer
    loads would spill on sm_90 and were never tuned: elsewhere the default merge runs)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or has_labels or not 0 < k <= MAX_K:
        return False
    sample = cdiv(r.shape[0], STRIDE)
    return sample >= max(MIN_SAMPLE, k + 2) and q.shape[0] > 0 and q.shape[1] > 0 and _tma_ok(q, r)


def sample_bounds(q: torch.Tensor, r: torch.Tensor, k: int, exclude_self: bool) -> torch.Tensor:
    """Step 1's ``e_i`` (M, float32): the squared distance of each query's k-th nearest row of
    the sample ``r[::STRIDE]`` (exact, as the default forward gives it), self pairs excluded
    where asked; an upper bound of its k-th over all of ``r``."""
    from . import knn as kk

    sample = r[::STRIDE].contiguous()
    e_sample = kk._knn_merge_path(q, sample, k, None, None, False, None)[0][:, k - 1].square()
    if exclude_self:  # rows i = STRIDE m meet themselves in the sample (column m): their bound
        # is the sample's own kNN without self pairs (a 1 / STRIDE^2 share); no other row can
        own = sample if r is q else q[::STRIDE].contiguous()
        e_sample[::STRIDE] = kk._knn_merge_path(own, sample, k, None, None, True, None)[0][:, k - 1].square()
    return e_sample


def thresholds(e_sample: torch.Tensor, qn: torch.Tensor, rn: torch.Tensor, d: int) -> torch.Tensor:
    """``t_i = e_i (1 + 2^-10) + c_D (qn_i + max_j rn_j)`` (float32), ``c_D = 2^-12 max(1, D / 2^10)``,
    from the sample's largest kept squared distance ``e_i`` (exact, by direct differences) and the
    rows' width ``d``: above every ``s_ij`` of the GEMM form whose exact value is at most ``e_i``.
    The GEMM form's error, for inputs rounded to float16/bfloat16 (exact products, float32 sums
    over D terms), is at most about ``2 D 2^-24 (qn_i + rn_j) + 2^-22 (qn_i + rn_j)`` (the dot's
    and the norms' sums, the last additions): ``c_D`` covers it at every D with a factor of about
    two (2^-12 up to D = 2^10, then growing with D), and the relative term the direct differences'
    own rounding (docs/kernels.md, "Selection by a threshold")."""
    rn_max = torch.where(torch.isfinite(rn), rn, 0.0).amax()  # on the device: no host sync
    return e_sample * (1.0 + 2.0 ** -10) + (qn + rn_max) * (2.0 ** -12 * max(1.0, d / 2.0 ** 10))


def _descriptor(t: torch.Tensor, rows: int, bd: int, tma: bool):
    """The filters' tensor descriptor of ``t`` (blocks ``rows x bd``) with ``tma``, else None."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [rows, bd]) if tma else None


#: The steps of :func:`select`, in order (its ``until``).
STEPS = ("bounds", "filter", "select")


def select(q: torch.Tensor, r: torch.Tensor, k: int, exclude_self: bool, *, until: str = "select",
           half: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dist, index)`` (M x k, float32 / int64) of the prepared ``q``, ``r`` (same dtype, unit
    column stride; ``r is q`` for a self-kNN) by the three steps of this module; the caller has
    checked :func:`eligible`. The same result as the default forward's (``knn._knn_merge_path``).

    ``until`` (one of :data:`STEPS`): "bounds" or "filter" stops after that step and returns the
    outputs unwritten: bench/probe_h200.py times the steps so. ``half``: the filter on half the
    tiles where :func:`halves` holds (``DAAL_KNN_SELECT=half``), else on all."""
    from . import knn as kk

    if until not in STEPS:
        raise ValueError(f"until must be one of {STEPS}, got {until!r}")
    M, D = q.shape
    N = r.shape[0]
    e_sample = sample_bounds(q, r, k, exclude_self)
    flags = dot_flags(q.dtype, device=q.device)
    qn = row_sqnorms(q, flags["INPUT_PRECISION"])
    rn = qn if r is q else row_sqnorms(r, flags["INPUT_PRECISION"])
    thr = thresholds(e_sample, qn, rn, D)
    # a row without a finite bound (fewer than k' finite distances in the sample: non-finite
    # inputs) lists nothing and starts over CAP: the rescan selects it exactly
    finite = torch.isfinite(thr)
    cap = list_cap(k)
    count = torch.where(finite, 0, cap + 1).to(torch.int32)
    thr = torch.where(finite, thr, -1.0)
    dist = torch.empty(M, k, dtype=torch.float32, device=q.device)
    index = torch.empty(M, k, dtype=torch.int64, device=q.device)
    if until == "bounds":
        return dist, index
    kp = next_pow2(k)
    scfg, rcfg = CONFIGS["select"], CONFIGS["rescan"]
    on_half = half and halves(q, r, k)
    bm = CONFIGS["filter"].blocks["BLOCK_M"]
    chunk = M if on_half else max(bm, (LIST_BYTES // (cap * 8)) // bm * bm)
    S = None if on_half else filter_splits(min(M, chunk), N, q.device)
    # the recompute sums in the default finish's D-chunks: the same exact distances
    slaunch = scfg.launch(D)
    slaunch["BLOCK_D"] = kk.CONFIGS[family(q.dtype)][kk.finish_entry(kp)].block_d_for(D)
    for i0 in range(0, M, chunk):
        qc = q[i0:i0 + chunk]
        m = qc.shape[0]
        lists = None  # the last chunk's lists go before this chunk's come: LIST_BYTES at once, not twice
        lists = torch.empty(m, cap, dtype=torch.int64, device=q.device)
        if on_half:
            _filter_half(q, qn, thr, count, lists, exclude_self, flags)
        else:
            _filter(qc, r, i0, qn[i0:], rn, thr[i0:], count[i0:], lists, exclude_self, flags, S)
        if until == "filter":
            continue
        _knn_select_kernel[(cdiv(m, scfg.blocks["BLOCK_M"]),)](
            count[i0:], lists, qc, r, dist[i0:], index[i0:], m, D, k, cap,
            qc.stride(0), r.stride(0), dist.stride(0), index.stride(0), KP=kp, **slaunch)
    if until == "filter":
        return dist, index
    rlaunch = rcfg.launch(D)
    rlaunch["BLOCK_D"] = slaunch["BLOCK_D"]
    _knn_rescan_kernel[(cdiv(M, rcfg.blocks["BLOCK_M"]),)](
        q, r, qn, rn, count, dist, index, M, N, D, k, cap, q.stride(0), r.stride(0), dist.stride(0),
        index.stride(0), KP=kp, EXCLUDE_SELF=bool(exclude_self), **flags, **rlaunch)
    return dist, index


def _filter(qc, r, i0, qn, rn, thr, count, lists, exclude_self, flags, S):
    """Step 2 on the query chunk ``qc`` (rows ``i0`` on) against all of ``r``:
    :func:`_knn_filter_kernel` on every tile, in ``S`` column splits."""
    cfg = CONFIGS["filter"]
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    (m, D), N = qc.shape, r.shape[0]
    launch = cfg.launch(D)
    cols = cdiv(cdiv(N, S), bn) * bn
    tma = _tma_ok(qc, r)
    q_desc, r_desc = _descriptor(qc, bm, launch["BLOCK_D"], tma), _descriptor(r, bn, launch["BLOCK_D"], tma)
    _knn_filter_kernel[(cdiv(m, bm), cdiv(N, cols))](
        qc, r, q_desc, r_desc, qn, rn, thr, count, lists, m, N, D, i0, cols, qc.stride(0), r.stride(0),
        CAP=lists.shape[1], EXCLUDE_SELF=bool(exclude_self), TMA=tma, **flags, **launch)


def _filter_half(x, xn, thr, count, lists, exclude_self, flags):
    """Step 2 of a self-search on half the tiles: :func:`_knn_filter_half_kernel` (the caller
    has checked :func:`halves`)."""
    cfg = CONFIGS["filter"]
    bm = cfg.blocks["BLOCK_M"]
    M, D = x.shape
    launch = {name: v for name, v in cfg.launch(D).items() if name not in ("BLOCK_M", "BLOCK_N")}
    nb = cdiv(M, bm)
    per = cdiv(nb + 1, half_splits(M, x.device))
    tma = _tma_ok(x, x)
    x_desc = _descriptor(x, bm, launch["BLOCK_D"], tma)
    _knn_filter_half_kernel[(cdiv(nb, 2), cdiv(nb + 1, per))](
        x, x_desc, xn, thr, count, lists, M, D, per, x.stride(0),
        CAP=lists.shape[1], BLOCK=bm, EXCLUDE_SELF=bool(exclude_self), TMA=tma, **flags, **launch)


def _tma_ok(q: torch.Tensor, r: torch.Tensor) -> bool:
    """Tensor-descriptor loads for the filter: 16-byte-aligned base pointers and row strides, a
    device with TMA (sm_90, sm_100) or the interpreter (``knn.tma_device``)."""
    from . import knn as kk

    size = q.element_size()
    if any(t.data_ptr() % 16 or (t.stride(0) * size) % 16 for t in (q, r)):
        return False
    return kk.tma_device(q.device) if q.device.type == "cuda" else interpreting()
