"""Pairwise Euclidean distances as a tiled Triton GEMM with a distance epilogue
(docs/method.md, "The forward pass", step 2).

Forward (``X`` M x D, ``Y`` N x D -> ``d`` M x N, float32)::

    s_ij = ||x_i||^2 + ||y_j||^2 - 2 x_i . y_j          (GEMM form)
    d_ij = sqrt(max(s_ij, eps)),   eps = 1e-12

Backward, with ``g = dL/dd`` and ``h_ij = g_ij / d_ij`` (``h_ij = 0`` where the clamp binds,
i.e. ``d_ij = sqrt(eps)``, so duplicates give a zero gradient, never NaN)::

    dL/dx_i = sum_j h_ij (x_i - y_j) = x_i * (sum_j h_ij) - (H Y)_i
    dL/dy_j = sum_i h_ij (y_j - x_i) = y_j * (sum_i h_ij) - (H^T X)_j

The backward forms ``H`` once (``_pairwise_h_kernel``: one pass over ``g`` and ``d``, writing
``H`` in the GEMM operand dtype and per-tile partial row / column sums of the stored values), then
runs two GEMMs with a row-scaling epilogue (``_pairwise_bwd_kernel``): ``dX = diag(rowsum H) X - H Y``
and, reading ``H`` transposed, ``dY = diag(colsum H) Y - H^T X``. The sums are taken of the values
the GEMMs see, so each pair's contribution is ``h_ij (x_i - y_j)`` with one ``h_ij``.

Numerics (docs/method.md, "Numerics"). Half inputs go to the tensor cores with float32
accumulation. float32 inputs follow ``torch.get_float32_matmul_precision()`` on a GPU
(``_common.input_precision``): ``"highest"`` (the default) gives 3xTF32 dots (float32 accuracy),
``"high"``/``"medium"`` single-pass TF32 on operands rounded to TF32 (``cvt.rna``, never the
hardware's truncation), with the row norms taken of the same rounded values; under
``TRITON_INTERPRET=1`` IEEE float32 dots. Row norms are computed once per row by
``_common._sqnorm_kernel`` and passed to the GEMM kernel, so the main loop only feeds the tensor
cores. The backward's operand ``H`` is bfloat16 for bfloat16 inputs (bf16 dots) and float32
otherwise (``h_dtype``): float32 inputs follow the matmul precision as the forward does; float16
inputs (exact in TF32) use single-pass TF32 on ``H`` rounded to TF32 (float16's range cannot hold
``g / d`` near the clamp). Mixed input dtypes are promoted (never lowered) to a common dtype
(``_common.compute_dtype``). The forward's GEMM form loses digits for pairs closer than ~1e-3 in
float32 (docs/method.md, "Numerics"): callers that need close distances exactly (the loss's kNN
radii) recompute them by direct differences.

Memory. Inputs of the compute dtype are read in place when each row is contiguous (unit column
stride, any row stride, any width: the H200 runs timed rows padded to a multiple of 16 columns
slower, ``_common.ALIGN_DEFAULT``); others are copied once (``DAAL_ALIGN_D=pad``: rows padded with
zero columns to a multiple of 16, copied too when not 16-aligned: ``_common.ALIGN``). Forward: the M x N float32 output plus
M + N float32 norms. Backward: ``H`` (M x N_PAD, N rounded up to 16 columns so that its loads are
vector loads at any N; 2 bytes per element for bfloat16 inputs, else 4)
and H's partial row and column sums, one per 64 x 64 tile (ceil(N / 64) x M + ceil(M / 64) x N
float32: 2 M N / 64 floats, 1/32 of H's elements); it reads ``g`` and ``d`` once, in place (any
strides), and writes dX (M x D) and dY (N x D) in the input dtype. All offsets into M x N and
M x D / N x D arrays are 64-bit.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    EPS,
    FP32_DOT,
    SQNORM,
    SQNORM_CONFIG,
    TL_EPS,
    KernelConfig,
    KernelSpec,
    Launch,
    _dot_rows,
    _round_tf32,
    align_rows,
    columns,
    compute_dtype,
    dot_flags,
    direct,
    eager,
    expand,
    family,
    gpu_dot_variants,
    prepare,
    row_sqnorms,
)

# The value of d where the clamp binds, exactly as the forward epilogue rounds it (sqrt_rn).
CLAMPED_DIST = float(torch.sqrt(torch.tensor(EPS, dtype=torch.float32)))
# H's columns are stored in multiples of this (Triton specialises sizes divisible by 16).
H_ALIGN = 16


# --------------------------------------------------------------------------- kernels
@triton.jit
def _pairwise_fwd_kernel(
    x_ptr, y_ptr, xn_ptr, yn_ptr, out_ptr, M, N, D, stride_x_m, stride_y_n, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """``out_ij = sqrt_rn(max(xn_i + yn_j - 2 sum_d x_id y_jd, eps))``.

    One BLOCK_M x BLOCK_N output tile per program (grouped launch order for L2 reuse); the dot
    runs over D in BLOCK_D chunks with float32 accumulation.

    Args:
        x_ptr, y_ptr: M x D and N x D inputs (one dtype), unit column stride.
        xn_ptr, yn_ptr: their squared row norms (float32, M and N).
        out_ptr: the M x N float32 output, unit column stride.
        M, N, D: sizes.
        stride_x_m, stride_y_n, stride_out_m: row strides of x, y, out.
        BLOCK_M, BLOCK_N: output tile. BLOCK_D: D-chunk. GROUP_M: row tiles per launch group.
        INPUT_PRECISION: ``tl.dot``'s input precision. ROUND_TF32: round float32 operands to TF32
            first (``_common.round_operands``; xn/yn are then norms of the rounded rows).
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _dot_rows(x_ptr + rows64[:, None] * stride_x_m, y_ptr + cols64[:, None] * stride_y_n,
                    rmask, cmask, D, acc, BLOCK_D, INPUT_PRECISION, ROUND_TF32)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    yn = tl.load(yn_ptr + cols, mask=cmask, other=0.0)
    sq = xn[:, None] + yn[None, :] - 2.0 * acc
    dist = tl.sqrt_rn(tl.maximum(sq, TL_EPS, propagate_nan=tl.PropagateNan.ALL))  # NaN in, NaN out (torch.clamp's rule)
    tl.store(out_ptr + rows64[:, None] * stride_out_m + cols64[None, :], dist,
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _pairwise_h_kernel(
    g_ptr, dist_ptr, h_ptr, hrow_ptr, hcol_ptr, M, N,
    stride_g_m, stride_g_n, stride_dist_m, stride_dist_n, stride_h_m, stride_hrow_s, stride_hcol_s,
    thr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """``H = g / d`` (0 where ``d <= thr``, the clamp) in ``h_ptr``'s dtype, formed once, and the
    partial row and column sums of the stored (rounded) ``H`` per tile. ``H`` is stored
    ``stride_h_m`` columns wide (N rounded up to 16, ``_form_h``): its columns past N are written as
    zeros (the GEMMs read them: see ``_pairwise_bwd_kernel``).

    Args:
        g_ptr, dist_ptr: the incoming gradient and the saved distances (float32, M x N, any strides).
        h_ptr: the M x stride_h_m output (the backward GEMMs' operand dtype), contiguous.
        hrow_ptr: (N / BLOCK_N) x M float32 partial row sums (one row per column tile).
        hcol_ptr: (M / BLOCK_M) x N float32 partial column sums (one row per row tile).
        M, N: sizes. stride_g_m, stride_g_n, stride_dist_m, stride_dist_n: strides of g and dist.
        stride_h_m: row stride of h, its stored width (a multiple of 16, <= the tiles' columns).
        stride_hrow_s, stride_hcol_s: row strides of hrow, hcol.
        thr: the clamped distance (``sqrt_rn(eps)``).
        BLOCK_M, BLOCK_N: tile. ROUND_TF32: round H to TF32 (the values a single-pass TF32 dot sees).
    """
    # one grid axis (tiles of M x N: either count can pass CUDA's 65535 of a second axis)
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // tiles_n
    pid_n = tl.program_id(0) % tiles_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    m2 = rmask[:, None] & cmask[None, :]
    g = tl.load(g_ptr + rows64[:, None] * stride_g_m + cols64[None, :] * stride_g_n, mask=m2, other=0.0)
    d = tl.load(dist_ptr + rows64[:, None] * stride_dist_m + cols64[None, :] * stride_dist_n,
                mask=m2, other=1.0)
    h = tl.where(m2 & ~(d <= thr), g.to(tl.float32) / d, 0.0)  # a NaN d keeps its NaN
    h = _round_tf32(h, ROUND_TF32).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows64[:, None] * stride_h_m + cols64[None, :], h,
             mask=rmask[:, None] & (cols < stride_h_m)[None, :])  # h is 0 past N
    hf = h.to(tl.float32)
    tl.store(hrow_ptr + pid_n.to(tl.int64) * stride_hrow_s + rows64, tl.sum(hf, axis=1), mask=rmask)
    tl.store(hcol_ptr + pid_m.to(tl.int64) * stride_hcol_s + cols64, tl.sum(hf, axis=0), mask=cmask)


@triton.jit
def _pairwise_bwd_kernel(
    h_ptr, hsum_ptr, a_ptr, b_ptr, da_ptr, R, C, D, stride_h_m, stride_a_r, stride_b_c, stride_da_r,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, TRANS_H: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr,
):
    """``dA = diag(hsum) A - H B``: one GEMM with the row-scaling epilogue (float32 accumulation,
    operands in ``h_ptr``'s dtype).

    Program (r-block, d-block) computes one BLOCK_R x BLOCK_D tile of dA, streaming over C in
    BLOCK_C steps. ``TRANS_H``: read ``H`` (stored M x N) transposed, i.e. rows r are H's columns
    (dY = diag(colsum H) Y - H^T X). ``H`` is stored contiguous, ``stride_h_m`` (a multiple of 16)
    columns wide, zeros past N, and its loads are masked at ``stride_h_m`` along its unit-stride
    axis (the true sizes mask ``b`` and the output): a mask at N, in general no multiple of 16
    (M = N = 1,000), would make those loads scalar and, for 16-bit H, synchronous (sm_90 SASS:
    LDG.E.U16 against LDGSTS.128; tests/kernels/test_kernel_pairwise.py).

    Args:
        h_ptr: H, M x stride_h_m, contiguous (the dot's operand dtype). hsum_ptr: its R row sums
            (column sums with TRANS_H), float32.
        a_ptr, b_ptr: R x D and C x D inputs, unit column stride. da_ptr: the R x D output (a's dtype).
        R, C, D: sizes. stride_h_m: row stride of H, its stored width (see above).
        stride_a_r, stride_b_c, stride_da_r: row strides of a, b, da.
        BLOCK_R, BLOCK_C: tile of H. BLOCK_D: columns of the dA tile. TRANS_H: see above.
        INPUT_PRECISION: ``tl.dot``'s input precision. ROUND_TF32: round float32 operands to TF32.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = dd < D
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cols64 = cols.to(tl.int64)
        if TRANS_H:
            hp = h_ptr + cols64[None, :] * stride_h_m + rows64[:, None]
            hmask = (rows < stride_h_m)[:, None] & cmask[None, :]
        else:
            hp = h_ptr + rows64[:, None] * stride_h_m + cols64[None, :]
            hmask = rmask[:, None] & (cols < stride_h_m)[None, :]
        h = tl.load(hp, mask=hmask, other=0.0)
        b = tl.load(b_ptr + cols64[:, None] * stride_b_c + dd[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(h.dtype)
        h = _round_tf32(h, ROUND_TF32)
        b = _round_tf32(b, ROUND_TF32)
        acc = tl.dot(h, b, acc, input_precision=INPUT_PRECISION)
    hsum = tl.load(hsum_ptr + rows, mask=rmask, other=0.0)
    a = tl.load(a_ptr + rows64[:, None] * stride_a_r + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    out = a * hsum[:, None] - acc
    tl.store(da_ptr + rows64[:, None] * stride_da_r + dd[None, :], out.to(da_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


def h_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``H = G / Dist``, the backward GEMMs' operand: bfloat16 for bfloat16 inputs
    (bf16 tensor-core dots); float32 otherwise (float16's range cannot hold ``g / d`` near the
    clamp; its values are exact in TF32, so its dots are single-pass TF32 on rounded ``H``)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


_BWD_SIG = ("h_ptr: *h; hsum_ptr: *fp32; a_ptr b_ptr da_ptr: *x; R C D: i32; "
            "stride_h_m stride_a_r stride_b_c stride_da_r: i64")
# H's row stride, its stored width, is a multiple of 16 at every launch (_form_h)
_BWD_SPEC = KernelSpec(_pairwise_bwd_kernel, _BWD_SIG, rows=("stride_a_r", "stride_b_c", "stride_da_r", "stride_h_m"),
                       h_dtype=h_dtype)
KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _pairwise_fwd_kernel,
        "x_ptr y_ptr: *x; xn_ptr yn_ptr out_ptr: *fp32; M N D: i32; "
        "stride_x_m stride_y_n stride_out_m: i64",
        rows=("stride_x_m", "stride_y_n"), other=("stride_out_m",)),
    "h": KernelSpec(
        _pairwise_h_kernel,
        "g_ptr dist_ptr: *fp32; h_ptr: *h; hrow_ptr hcol_ptr: *fp32; M N: i32; "
        "stride_g_m stride_g_n stride_dist_m stride_dist_n stride_h_m stride_hrow_s "
        "stride_hcol_s: i64; thr: fp32",
        unit=("stride_g_n", "stride_dist_n"), rows=("stride_h_m",),
        other=("stride_g_m", "stride_dist_m", "stride_hrow_s", "stride_hcol_s"),
        gemm=False, h_dtype=h_dtype),
    "bwd": _BWD_SPEC,
    "sqnorm": SQNORM,
}


def bwd_flags(dtype: torch.dtype, *, gpu=None, matmul_precision=None, device=None) -> dict:
    """``INPUT_PRECISION`` / ``ROUND_TF32`` of the backward for inputs of ``dtype`` on ``device``:
    float32 follows the matmul precision (``_common.dot_flags``); float16 (operands float32 ``H``
    and float16 rows, exact in TF32) single-pass TF32 on rounded ``H`` on a GPU with TF32;
    bfloat16 bf16 dots."""
    if dtype == torch.float16:
        return dot_flags(torch.float32, gpu=gpu, matmul_precision="high", device=device)
    return dot_flags(h_dtype(dtype), gpu=gpu, matmul_precision=matmul_precision, device=device)


# --------------------------------------------------------------------------- configurations
_H = KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1, block_d=None)
_FWD_HALF = KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8,
                         num_stages=3, block_d=(16, 64))
#: ``CONFIGS[family][kernel]``: what the launchers use for inputs of that dtype family. The
#: backward GEMM has two entries (dX, and dY reading H transposed) of one configuration.
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "half": {"fwd": _FWD_HALF, "h": _H,
             "bwd_dx": KernelConfig({"BLOCK_R": 128, "BLOCK_C": 32}, num_warps=8, num_stages=3,
                                    block_d=(16, 128)),
             "sqnorm": SQNORM_CONFIG},
    # BLOCK_D 16: the 3xTF32 build with a 32-wide D-chunk keeps 8 bytes of stack on sm_90
    "fp32": {"fwd": KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8,
                                 num_stages=3, block_d=(16, 16)),
             "h": _H,
             "bwd_dx": KernelConfig({"BLOCK_R": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3,
                                    block_d=(16, 64)),
             "sqnorm": SQNORM_CONFIG},
}
for _fam in CONFIGS.values():
    _fam["bwd_dy"] = _fam["bwd_dx"]
    # the H kernel's column tiles cover H's stored width (it writes the pad columns' zeros)
    assert _fam["h"].blocks["BLOCK_N"] % H_ALIGN == 0
_SPEC_OF = {"fwd": KERNELS["fwd"], "h": KERNELS["h"], "bwd_dx": _BWD_SPEC, "bwd_dy": _BWD_SPEC,
            "sqnorm": SQNORM}


def _gpu_flags(entry: str, dtype: torch.dtype):
    if entry == "fwd":
        return gpu_dot_variants(dtype)
    if entry == "sqnorm":
        # PAD_INF: the kNN forward's padded norms (knn.py's lean epilogue: float16/bfloat16)
        return [{"ROUND_TF32": fl["ROUND_TF32"], "PAD_INF": pad} for fl in gpu_dot_variants(dtype)
                for pad in ((False,) if dtype == torch.float32 else (False, True))]
    variants = [bwd_flags(dtype, gpu=True, matmul_precision=p) for p in FP32_DOT]
    variants = [v for i, v in enumerate(variants) if v not in variants[:i]]
    if entry == "h":
        return [{"ROUND_TF32": v["ROUND_TF32"]} for v in variants]
    return [dict(v, TRANS_H=entry == "bwd_dy") for v in variants]


def launches() -> List[Launch]:
    """Every configuration the launchers of this module can pick on a GPU (compile tests): each
    float32 precision variant (``_common.gpu_dot_variants``)."""
    return expand("pairwise", CONFIGS, _SPEC_OF, _gpu_flags)


# --------------------------------------------------------------------------- launchers
def _forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d_ij = sqrt(max(|x_i|^2 + |y_j|^2 - 2 x_i . y_j, eps))`` (M x N float32; the GEMM form,
    ``_pairwise_fwd_kernel``) from prepared rows; memory: the output and M + N squared norms (M
    and one launch fewer when ``y`` is ``x``)."""
    M, D = x.shape
    N = y.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    flags = dot_flags(x.dtype, device=x.device)
    xn = row_sqnorms(x, flags["INPUT_PRECISION"])
    yn = xn if y is x else row_sqnorms(y, flags["INPUT_PRECISION"])
    cfg = CONFIGS[family(x.dtype)]["fwd"]
    grid = (cdiv(M, cfg.blocks["BLOCK_M"]) * cdiv(N, cfg.blocks["BLOCK_N"]),)
    _pairwise_fwd_kernel[grid](
        x, y, xn, yn, out, M, N, D, x.stride(0), y.stride(0), out.stride(0),
        **flags, **cfg.launch(D))
    return out


def _form_h(g: torch.Tensor, dist: torch.Tensor, dtype: torch.dtype, round_tf32: bool):
    """``(H, rowsum H, colsum H)``: H = g / dist (0 at the clamp) in ``h_dtype(dtype)``, stored
    ``H_ALIGN``-aligned: ``H`` is a contiguous M x N_PAD (N rounded up to ``H_ALIGN`` columns, zeros
    past N: the kernels take its row stride for N_PAD), so the GEMMs' loads of it are vector loads at
    any N (``_pairwise_bwd_kernel``)."""
    M, N = dist.shape
    h = torch.empty(M, cdiv(N, H_ALIGN) * H_ALIGN, dtype=h_dtype(dtype), device=dist.device)
    cfg = CONFIGS[family(dtype)]["h"]
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    tm, tn = cdiv(M, bm), cdiv(N, bn)
    hrow = torch.empty(tn, M, dtype=torch.float32, device=dist.device)
    hcol = torch.empty(tm, N, dtype=torch.float32, device=dist.device)
    _pairwise_h_kernel[(tm * tn,)](
        g, dist, h, hrow, hcol, M, N, g.stride(0), g.stride(1), dist.stride(0), dist.stride(1),
        h.stride(0), hrow.stride(0), hcol.stride(0), CLAMPED_DIST, ROUND_TF32=round_tf32,
        **cfg.launch())
    return h, hrow.sum(0), hcol.sum(0)


def _backward_gemm(h: torch.Tensor, hsum: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   transpose: bool, flags: dict) -> torch.Tensor:
    """``dA = diag(hsum) a - H b`` (``transpose``: ``H^T``)."""
    R, D = a.shape
    C = b.shape[0]
    da = torch.empty(R, D, dtype=a.dtype, device=a.device)
    if R == 0 or D == 0:
        return da
    if C == 0:
        return da.zero_()
    cfg = CONFIGS[family(a.dtype)]["bwd_dy" if transpose else "bwd_dx"]
    grid = (cdiv(R, cfg.blocks["BLOCK_R"]), cdiv(D, cfg.block_d_for(D)))
    _pairwise_bwd_kernel[grid](
        h, hsum, a, b, da, R, C, D, h.stride(0), a.stride(0), b.stride(0), da.stride(0),
        TRANS_H=transpose, **flags, **cfg.launch(D))
    return da


# Registered with torch.library: torch.compile(fullgraph=True) sees opaque forward/backward ops.
@torch.library.custom_op("daal_triton::pairwise_distance", mutates_args=())
def _pairwise_op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d = pairwise_distance(x, y)`` (see the module docstring), float32."""
    dtype = compute_dtype("pairwise_distance", x, y)
    pad = align_rows("pairwise")
    xc = prepare(x, dtype, align=pad)
    return _forward(xc, xc if y is x else prepare(y, dtype, align=pad))


@_pairwise_op.register_fake
def _pairwise_fake(x, y):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=torch.float32)


@torch.library.custom_op("daal_triton::pairwise_distance_backward", mutates_args=())
def _pairwise_backward_op(g: torch.Tensor, dist: torch.Tensor, x: torch.Tensor,
                          y: torch.Tensor, align: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dy)`` from ``g = dL/dd`` and the saved output ``d``; ``align``: rows padded
    to 16 columns as the forward's were (``_common.align_rows``)."""
    dtype = compute_dtype("pairwise_distance", x, y)
    xc = prepare(x, dtype, align=align)
    yc = xc if y is x else prepare(y, dtype, align=align)
    g = g.to(torch.float32)
    M, N = dist.shape
    if M == 0 or N == 0:  # contiguous, as the kernels' results (and the fake) are
        return x.new_zeros(x.shape), y.new_zeros(y.shape)
    flags = bwd_flags(dtype, device=x.device)
    h, hrow, hcol = _form_h(g, dist, dtype, flags["ROUND_TF32"])
    dx = columns(_backward_gemm(h, hrow, xc, yc, False, flags), x.shape[1], x.dtype)
    dy = columns(_backward_gemm(h, hcol, yc, xc, True, flags), y.shape[1], y.dtype)
    return dx, dy


@_pairwise_backward_op.register_fake
def _pairwise_backward_fake(g, dist, x, y, align=True):
    return x.new_empty(x.shape), y.new_empty(y.shape)  # contiguous, whatever x's and y's strides


def _pairwise_setup_context(ctx, inputs, output):
    """Save ``x``, ``y`` and ``d`` (``H = g / d`` is formed from them) and the forward's row rule."""
    ctx.save_for_backward(inputs[0], inputs[1], output)
    ctx.align = align_rows("pairwise")  # the forward's rows: the backward pads (or not) as it did


_pairwise_distance_backward_direct = direct(_pairwise_backward_op)


def _pairwise_autograd_backward(ctx, g):
    """``dX = diag(rowsum H) X - H Y``, ``dY = diag(colsum H) Y - H^T X`` with ``h_ij = g_ij / d_ij``
    (0 where the clamp binds; module docstring): ``H`` and its partial sums formed once, then two GEMMs."""
    x, y, dist = ctx.saved_tensors
    return _pairwise_distance_backward_direct(g, dist, x, y, ctx.align)


_pairwise_op.register_autograd(_pairwise_autograd_backward, setup_context=_pairwise_setup_context)
_pairwise = eager(_pairwise_op)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d_ij = sqrt(max(||x_i - y_j||^2, 1e-12))``: ``x`` M x D, ``y`` N x D -> M x N float32.

    Inputs float32/float16/bfloat16 with any strides (copied once when the rows are not
    contiguous), on CUDA or, under ``TRITON_INTERPRET=1``, on the CPU.
    Differentiable in ``x`` and ``y`` (Triton backward). float64 inputs raise ``ValueError``
    (``daal_triton.pairwise_distance`` routes them to the reference).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be M x D and N x D, got {tuple(x.shape)} and {tuple(y.shape)}")
    compute_dtype("pairwise_distance", x, y)
    return _pairwise(x, y)
