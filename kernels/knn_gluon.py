"""The kNN forward's selection in Gluon, with the queries resident in shared memory (tuning
candidates for Hopper, ``DAAL_KNN_TILES=gluon`` and ``gluon128``; docs/kernels.md, "Queries
resident in shared memory: a Gluon forward").

The same selection as ``_knn_fwd_kernel`` (kernels/knn.py): for each query row ``i`` of the
program's BLOCK_M rows, the running top-KP of

    s_ij = max(||q_i||^2 + ||r_j||^2 - 2 q_i . r_j, eps)

over the columns ``j`` of the program's split (labels and self pairs masked), merged tile by tile
by the same code (``knn._knn_merge_tile``, the lean, counted merge), written out as S x M x KP
unsorted slots for ``_knn_finish_kernel``. What differs is how the GEMM is fed:

- the program's query rows, all of D (D <= 512: at most 64 KB of bfloat16 per 64 rows), are
  loaded once by TMA into shared memory and stay there: each tile then reads only its 128
  reference rows from L2: 64 FLOP per byte at 64 rows, 128 at 128, against the Triton forward's
  43 (it re-reads the query chunks for every tile: its pipeliner gives each unrolled load its own
  buffers, docs/kernels.md);
- the reference rows stream through one ring of STAGES buffers of 128 x 64 chunks, loaded
  STAGES - 1 chunks ahead across tile boundaries: while a tile merges, the next tile's first
  chunks are in flight (the Triton forward's software pipeline drains at every tile);
- two shapes (:data:`VARIANTS`): "gluon", 64 rows on one warpgroup (4 warps), 64 KB + STAGES x
  16 KB of shared memory (112 KB at three stages) and about 200 registers per thread, so two
  programs fit per SM and one merges while the other multiplies; "gluon128", 128 rows on two
  warpgroups that share a ring of 5 buffers (208 KB, one program per SM): half the L2 traffic,
  no overlap of one program's merge with another's MMAs.

Gluon kernels run only on a GPU (sm_90: ``warpgroup_mma`` is Hopper's instruction); Triton's
interpreter cannot run them. So this entry is chosen only on sm_90, where the inputs allow
(:func:`eligible`), and only when asked for; the tests compile it for sm_90 under the Triton of
the machine (tests/kernels/test_kernel_knn_gluon.py) and check it against the float64 reference on
a GPU (marked ``gpu``).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from ._common import TL_EPS, cdiv, device_capability, next_pow2, row_sqnorms
from .knn import _knn_merge_tile

#: TMA's copy of a block from global to shared memory: ``tma.async_load`` from Triton 3.7 on (3.8
#: keeps the old name as an alias; 3.9 removed it: a RuntimeError at the first build), its old
#: name ``tma.async_copy_global_to_shared`` before (3.5, 3.6). Same arguments in both.
tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

BLOCK_N = 128  # reference rows per tile
BLOCK_D = 64  # the D-chunk of a TMA load and of the ring's buffers (128 bytes of bfloat16: the swizzle)
MAX_D = 512  # the queries' block must fit beside the ring (64 rows: two programs per SM)
MAX_KP = 16


class Variant(NamedTuple):
    """One shape of the Gluon forward: ``block_m`` query rows per program on ``warps`` warps
    (one warpgroup per 64 rows, all sharing the program's one reference ring of ``stages``
    buffers), ``per_sm`` programs resident per SM (what its sm_90 builds must fit)."""

    name: str  # the DAAL_KNN_TILES policy that asks for it (kernels/knn.py)
    block_m: int
    warps: int
    stages: int
    per_sm: int


#: "gluon": 64 query rows on one warpgroup, 112 KB of shared memory, two programs per SM, each
#: 64 x 128 tile reading 128 KB from L2 (64 FLOP per byte); one program merges while the other
#: multiplies. "gluon128": 128 rows on two warpgroups sharing a ring of 5 buffers, 208 KB, one
#: program per SM, each 128 x 128 tile reading 128 KB (128 FLOP per byte: half the L2 traffic),
#: but the two warpgroups merge at the same time, the tensor cores idle meanwhile (the deeper
#: ring has 4 chunks of the next tile loaded by the merge's end; docs/kernels.md,
#: "Queries resident in shared memory: a Gluon forward"). Candidates no GPU has timed yet.
VARIANTS = {"gluon": Variant("gluon", 64, 4, 3, 2), "gluon128": Variant("gluon128", 128, 8, 5, 1)}
#: Ring depths bench/probe_h200.py times besides a variant's own (its bf16, KP 8, self-excluded
#: build at D = 512): a depth that divides D = 512's 8 chunks makes every chunk's buffer index and
#: barrier phase a compile-time constant, at one chunk less loaded ahead. "gluon128" at 4 buffers
#: (sm_90, instructions per warp per tile outside the merge rounds: 12% fewer than at 5 under
#: Triton 3.8, 5% under 3.6); "gluon" at 2 (fewer than at 3; with one chunk ahead, whether two
#: programs per SM hide the loads' latency is what its time says). A GPU test checks that each
#: selects bit for bit what the variant's own depth does.
PROBE_STAGES = {"gluon128": (4,), "gluon": (2,)}
GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


@gluon.jit
def _load_chunk(r_desc, r_smem, ready, c, n_start, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                ND: gl.constexpr, STAGES: gl.constexpr):
    """Start the TMA load of reference chunk ``c`` (tile ``c // ND``, D-chunk ``c % ND``) into
    ring buffer ``c % STAGES``; ``ready[c % STAGES]`` completes when it has arrived."""
    slot = c % STAGES
    tile = c // ND
    mbarrier.expect(ready.index(slot), r_desc.block_type.nbytes)
    tma_load(r_desc, [n_start + tile * BLOCK_N, (c - tile * ND) * BLOCK_D], ready.index(slot),
             r_smem.index(slot))


@gluon.jit
def _knn_fwd_gluon_kernel(
    q_desc, r_desc, qn_ptr, rn_ptr, ql_ptr, rl_ptr, top_s_ptr, top_i_ptr,
    M, N, cols_per_split, stride_top_s, stride_top_m,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, ND: gl.constexpr,
    STAGES: gl.constexpr, KP: gl.constexpr, HAS_LABELS: gl.constexpr, EXCLUDE_SELF: gl.constexpr,
    GEMM_ONLY: gl.constexpr = False, WARPS: gl.constexpr = 4,
):
    """Running top-KP of ``s_ij = max(qn_i + rn_j - 2 q_i.r_j, eps)`` over the columns of split
    ``program_id(1)`` for rows ``program_id(0) * BLOCK_M + [0, BLOCK_M)``; writes the KP
    ``(s, j)`` slots, unsorted, per row (as ``_knn_fwd_kernel`` without ``FINISH``).

    Args:
        q_desc, r_desc: Gluon tensor descriptors of the M x D queries and N x D references
            (float16/bfloat16), blocks BLOCK_M x BLOCK_D and BLOCK_N x BLOCK_D; rows and columns
            past their shapes read 0 (TMA's bounds).
        qn_ptr, rn_ptr: squared row norms (float32); ``rn`` padded with ``inf`` to whole BLOCK_N
            tiles (``row_sqnorms(pad=...)``: the lean merge reads it unmasked).
        ql_ptr, rl_ptr: labels (int64; read only with HAS_LABELS).
        top_s_ptr, top_i_ptr: S x M x KP slots (float32 distances, int32 columns), unit slot
            stride.
        M, N: sizes. cols_per_split: columns per split, a multiple of BLOCK_N.
        stride_top_s, stride_top_m: the slots' split and row strides.
        ND: D-chunks (``cdiv(D, BLOCK_D)``). STAGES: ring buffers. KP: slots per row.
        WARPS: the program's warps (``num_warps``), 4 per 64 rows.
        GEMM_ONLY: bench/probe_h200.py's ceiling of these tiles: each tile's ``s`` and one row-min
            instead of the merge (slot 0 gets each row's smallest ``s``; no selection).
    """
    # WARPS / 4 warpgroups, each 64 rows of the tile (wgmma's height)
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, BLOCK_N, 16])
    # the slots in the accumulator layout of an n = 8 wgmma: the tile's row map, KP columns
    # without replicas (in the tile's own layout a 64 x 8 tensor repeats over 128 columns: the
    # registers of 16 copies)
    slot_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                     instr_shape=[16, 8, 16])
    rows_l: gl.constexpr = gl.SliceLayout(1, mma)
    pid_m = gl.program_id(0)
    pid_s = gl.program_id(1)
    row_lo = pid_m * BLOCK_M
    n_start = pid_s * cols_per_split
    n_end = gl.minimum(N, n_start + cols_per_split)
    n_tiles = gl.cdiv(n_end - n_start, BLOCK_N)
    total = n_tiles * ND  # reference chunks of this program, in (tile, D-chunk) order

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [ND, BLOCK_M, BLOCK_D], q_desc.layout)
    r_smem = gl.allocate_shared_memory(r_desc.dtype, [STAGES, BLOCK_N, BLOCK_D], r_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    mbarrier.expect(q_bar, ND * q_desc.block_type.nbytes)
    for i in gl.static_range(ND):
        tma_load(q_desc, [row_lo, i * BLOCK_D], q_bar, q_smem.index(i))
    for c0 in gl.static_range(STAGES - 1):
        if c0 < total:
            _load_chunk(r_desc, r_smem, ready, c0, n_start, BLOCK_N, BLOCK_D, ND, STAGES)

    # masked rows read an infinite norm: their s is inf, never a candidate
    rows = row_lo + gl.arange(0, BLOCK_M, layout=rows_l)
    qn = gl.load(qn_ptr + rows, mask=rows < M, other=float("inf"))
    if HAS_LABELS:
        ql = gl.load(ql_ptr + rows, mask=rows < M, other=0)
    else:
        ql = 0  # unused
    lanes = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    slots = gl.arange(0, KP, layout=gl.SliceLayout(0, slot_l))
    topd = gl.full([BLOCK_M, KP], float("inf"), gl.float32, layout=slot_l)
    topi = gl.full([BLOCK_M, KP], -1, gl.int32, layout=slot_l) - slots[None, :]
    worst = gl.full([BLOCK_M], float("inf"), gl.float32, layout=gl.SliceLayout(1, slot_l))
    widx = gl.full([BLOCK_M], -1, gl.int32, layout=gl.SliceLayout(1, slot_l))
    mbarrier.wait(q_bar, 0)

    for t in range(n_tiles):
        n0 = n_start + t * BLOCK_N
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma)
        for kk in gl.static_range(ND):
            c = t * ND + kk
            mbarrier.wait(ready.index(c % STAGES), (c // STAGES) & 1)
            acc = warpgroup_mma(q_smem.index(kk), r_smem.index(c % STAGES).permute((1, 0)), acc,
                                is_async=True)
            # chunk c - 1's MMA is done: its buffer, (c - 1) % STAGES, takes chunk c + STAGES - 1
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            if c + STAGES - 1 < total:
                _load_chunk(r_desc, r_smem, ready, c + STAGES - 1, n_start, BLOCK_N, BLOCK_D, ND, STAGES)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        cols = n0 + lanes
        cmask = cols < n_end
        if GEMM_ONLY:  # the probe's ceiling: the distance epilogue and a row-min, no merge
            rn = gl.load(rn_ptr + cols)
            dist = gl.maximum(qn[:, None] + rn[None, :] - 2.0 * acc, TL_EPS)
            worst = gl.minimum(worst, gl.convert_layout(gl.min(dist, axis=1), worst.type.layout))
        elif EXCLUDE_SELF and not HAS_LABELS:
            # the self mask in a branch for the tiles that meet the diagonal (as the narrow
            # entry's DIAG_BRANCH): under one merge the compiler if-converts its test. With labels
            # the second copy of the merge spills under Triton 3.8 (float16: 255 registers + 8 B)
            if (n0 < row_lo + BLOCK_M) & (n0 + BLOCK_N > row_lo):
                topd, topi, worst, widx = _knn_merge_tile(
                    acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi, worst,
                    widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, True, True, True, True)
            else:
                topd, topi, worst, widx = _knn_merge_tile(
                    acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi, worst,
                    widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, False, True, True, True)
        else:
            topd, topi, worst, widx = _knn_merge_tile(
                acc, n0, lanes, cols, cmask, rows, row_lo, qn, ql, rn_ptr, rl_ptr, topd, topi, worst,
                widx, BLOCK_M, BLOCK_N, KP, HAS_LABELS, EXCLUDE_SELF, True, True, True)

    mbarrier.invalidate(q_bar)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    if GEMM_ONLY:
        topd = gl.where(slots[None, :] == 0, worst[:, None], topd)
    out_rows = gl.convert_layout(rows, gl.SliceLayout(1, slot_l)).to(gl.int64)
    out = pid_s.to(gl.int64) * stride_top_s + out_rows[:, None] * stride_top_m + slots[None, :]
    gl.store(top_s_ptr + out, topd, mask=(out_rows < M)[:, None])
    gl.store(top_i_ptr + out, topi, mask=(out_rows < M)[:, None])


def eligible(q: torch.Tensor, r: torch.Tensor, kp: int) -> bool:
    """Whether the Gluon forward can take these prepared inputs: float16/bfloat16 on an sm_90 GPU
    (``warpgroup_mma``), KP <= :data:`MAX_KP`, 0 < D <= :data:`MAX_D`, rows on both sides, and
    16-byte-aligned base pointers and row strides (TMA's rule)."""
    if q.device.type != "cuda" or q.dtype not in GL_DTYPES or device_capability(q.device) != (9, 0):
        return False
    if kp > MAX_KP or not 0 < q.shape[1] <= MAX_D or q.shape[0] == 0 or r.shape[0] == 0:
        return False
    size = q.element_size()
    return not any(t.data_ptr() % 16 or (t.stride(0) * size) % 16 for t in (q, r))


def descriptor(x: torch.Tensor, rows: int):
    """The Gluon tensor descriptor of a prepared M x D ``x`` with blocks ``rows x BLOCK_D`` (the
    swizzled shared layout wgmma reads)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    layout = gl.NVMMASharedLayout.get_default_for([rows, BLOCK_D], GL_DTYPES[x.dtype])
    return TensorDescriptor(x, list(x.shape), [x.stride(0), 1], [rows, BLOCK_D], layout)


def candidates(q: torch.Tensor, r: torch.Tensor, k: int, ql: Optional[torch.Tensor],
               rl: Optional[torch.Tensor], exclude_self: bool, splits: int,
               gemm_only: bool = False, variant: str = "gluon",
               stages: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out_s, out_i)``: S x M x KP candidate slots of the prepared ``q``, ``r`` (as
    ``knn._candidates`` without ``finish``) from ``splits`` column ranges, by the
    :data:`VARIANTS` entry ``variant``; the caller has checked :func:`eligible`. ``gemm_only``:
    the probe's ceiling instead (``GEMM_ONLY``; no selection); ``stages``: another ring depth
    (:data:`PROBE_STAGES`) than the variant's."""
    v = VARIANTS[variant]
    stages = stages or v.stages
    M, D = q.shape
    N = r.shape[0]
    kp = max(8, next_pow2(k))  # at least the slot layout's 8 columns (the finish takes the k best)
    cols = cdiv(cdiv(N, splits), BLOCK_N) * BLOCK_N
    S = cdiv(N, cols)
    out_s = torch.empty(S, M, kp, dtype=torch.float32, device=q.device)
    out_i = torch.empty(S, M, kp, dtype=torch.int32, device=q.device)
    qn = row_sqnorms(q, pad=BLOCK_N if r is q else 1)
    rn = qn if r is q else row_sqnorms(r, pad=BLOCK_N)
    has_labels = ql is not None
    _knn_fwd_gluon_kernel[(cdiv(M, v.block_m), S)](
        descriptor(q, v.block_m), descriptor(r, BLOCK_N), qn, rn, ql if has_labels else qn,
        rl if has_labels else rn, out_s, out_i, M, N, cols, out_s.stride(0), out_s.stride(1),
        BLOCK_M=v.block_m, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, ND=cdiv(D, BLOCK_D), STAGES=stages, KP=kp,
        HAS_LABELS=has_labels, EXCLUDE_SELF=bool(exclude_self), GEMM_ONLY=gemm_only, WARPS=v.warps,
        num_warps=v.warps)
    return out_s, out_i


def signature(dtype: torch.dtype, has_labels: bool, variant: str = "gluon") -> dict:
    """The kernel's argument types for ``dtype`` inputs, as Triton's JIT derives them at a launch
    of :func:`candidates` (the descriptors' types carry their shared layouts; without labels the
    label pointers are the norms'): what a compile job for this kernel without a GPU needs."""
    from triton.runtime.jit import mangle_type

    x = torch.empty(BLOCK_N, BLOCK_D, dtype=dtype)
    labels = "*i64" if has_labels else "*fp32"
    return {"q_desc": mangle_type(descriptor(x, VARIANTS[variant].block_m)), "r_desc": mangle_type(descriptor(x, BLOCK_N)),
            "qn_ptr": "*fp32", "rn_ptr": "*fp32", "ql_ptr": labels, "rl_ptr": labels, "top_s_ptr": "*fp32",
            "top_i_ptr": "*i32", "M": "i32", "N": "i32", "cols_per_split": "i32", "stride_top_s": "i32",
            "stride_top_m": "i32"}


def builds() -> List[dict]:
    """The builds a launch can ask for, as compile jobs' facts: ``{"variant", "dtype", "KP",
    "HAS_LABELS", "EXCLUDE_SELF", "ND", "GEMM_ONLY", "STAGES"}`` for each of :data:`VARIANTS`,
    float16/bfloat16, KP 8 and 16, with and without labels and self pairs, at the largest ND
    (D = 512), at the variant's ring depth; the same in bfloat16 at every smaller ND (D = 1..448:
    ND = cdiv(D, 64) chunks; the register allocation differs with ND, not only the shared memory:
    at ND = 6 the 64-row build with labels keeps stack, 2026-12-06; float16 differs from bfloat16
    only in the MMA's operand type); each variant's ``GEMM_ONLY`` build for the probe (bfloat16);
    and the probe's other ring depths (:data:`PROBE_STAGES`: bfloat16, KP 8, self pairs excluded)."""
    nd = cdiv(MAX_D, BLOCK_D)
    out = []
    for variant, v in VARIANTS.items():
        out += [{"variant": variant, "dtype": dtype, "KP": kp, "HAS_LABELS": labels, "EXCLUDE_SELF": self_, "ND": n,
                 "GEMM_ONLY": False, "STAGES": v.stages}
                for n in range(1, nd + 1) for dtype in (GL_DTYPES if n == nd else (torch.bfloat16,))
                for kp in (8, 16) for labels in (False, True) for self_ in (True, False)]
        out.append({"variant": variant, "dtype": torch.bfloat16, "KP": 8, "HAS_LABELS": False, "EXCLUDE_SELF": False,
                    "ND": nd, "GEMM_ONLY": True, "STAGES": v.stages})
        out += [{"variant": variant, "dtype": torch.bfloat16, "KP": 8, "HAS_LABELS": False, "EXCLUDE_SELF": True,
                 "ND": nd, "GEMM_ONLY": False, "STAGES": st} for st in PROBE_STAGES.get(variant, ())]
    return out
