"""Pairwise Euclidean distances as a tiled Triton GEMM with a distance epilogue
(docs/method.md, "The forward pass", step 2).

Forward (``X`` M x D, ``Y`` N x D -> ``d`` M x N, float32)::

    s_ij = ||x_i||^2 + ||y_j||^2 - 2 x_i . y_j          (GEMM form)
    d_ij = sqrt(max(s_ij, eps)),   eps = 1e-12

Backward, with ``g = dL/dd`` and ``h_ij = g_ij / d_ij`` (``h_ij = 0`` where the clamp binds,
i.e. ``d_ij = sqrt(eps)``, so duplicates give a zero gradient, never NaN)::

    dL/dx_i = sum_j h_ij (x_i - y_j) = x_i * (sum_j h_ij) - (H Y)_i
    dL/dy_j = sum_i h_ij (y_j - x_i) = y_j * (sum_i h_ij) - (H^T X)_j

Both are one kernel (``_pairwise_bwd_kernel``) that streams over the other operand's rows,
launched once with ``(G, X, Y)`` and once with the transposed strides of ``G`` and ``(Y, X)``.

Numerics. Half inputs (float16/bfloat16) go to the tensor cores with float32 accumulation;
float32 inputs use TF32 dots on a GPU (relative error ~1e-3) and IEEE float32 dots under
``TRITON_INTERPRET=1`` (``_common.input_precision``). Row norms are computed once per row by
``_common._sqnorm_kernel`` (float32, from the same rounded inputs the dot sees) and passed to the
GEMM kernel, so the main loop only feeds the tensor cores. Mixed input dtypes are promoted (never
lowered) to a common dtype (``_common.compute_dtype``).

Memory. Inputs are read as they are when their rows are contiguous (unit column stride); other
layouts are copied once with ``.contiguous()``. Forward: the M x N float32 output plus
M + N float32 norms. Backward: no M x N temporary: it reads the saved output ``d`` and the
incoming gradient ``g`` in place (any strides) and writes dX (M x D) and dY (N x D) in the
input dtype. All offsets into M x N and M x D / N x D arrays are 64-bit.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    EPS,
    SQNORM,
    SQNORM_CONFIG,
    TL_EPS,
    KernelConfig,
    KernelSpec,
    Launch,
    _dot_rows,
    compute_dtype,
    expand,
    family,
    input_precision,
    prepare,
    row_sqnorms,
)

# The value of d where the clamp binds, exactly as the forward epilogue rounds it (sqrt_rn).
CLAMPED_DIST = float(torch.sqrt(torch.tensor(EPS, dtype=torch.float32)))


# --------------------------------------------------------------------------- kernels
@triton.jit
def _pairwise_fwd_kernel(
    x_ptr, y_ptr, xn_ptr, yn_ptr, out_ptr, M, N, D, stride_x_m, stride_y_n, stride_out_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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
        INPUT_PRECISION: ``tl.dot``'s input precision.
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
                    rmask, cmask, D, acc, BLOCK_D, INPUT_PRECISION)
    xn = tl.load(xn_ptr + rows, mask=rmask, other=0.0)
    yn = tl.load(yn_ptr + cols, mask=cmask, other=0.0)
    sq = xn[:, None] + yn[None, :] - 2.0 * acc
    dist = tl.sqrt_rn(tl.maximum(sq, TL_EPS))
    tl.store(out_ptr + rows64[:, None] * stride_out_m + cols64[None, :], dist,
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _pairwise_bwd_kernel(
    g_ptr, dist_ptr, a_ptr, b_ptr, da_ptr, R, C, D,
    stride_g_r, stride_g_c, stride_dist_r, stride_dist_c, stride_a_r, stride_b_c, stride_da_r,
    thr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """``dA_r = a_r * sum_c h_rc - sum_c h_rc b_c`` with ``h_rc = g_rc / d_rc`` (0 where
    ``d_rc <= thr``, the clamp).

    Program (r-block, d-block) streams over C in BLOCK_C chunks; ``g``/``dist`` are read through
    (row, col) strides, so the same kernel gives dX (rows = M) and dY (rows = N, transposed
    strides). Dots in float32.

    Args:
        g_ptr, dist_ptr: the incoming gradient and the saved distances (float32, R x C via strides).
        a_ptr, b_ptr: R x D and C x D inputs, unit column stride. da_ptr: the R x D output (a's dtype).
        R, C, D: sizes.
        stride_g_r, stride_g_c, stride_dist_r, stride_dist_c: (row, col) strides of g and dist.
        stride_a_r, stride_b_c, stride_da_r: row strides of a, b, da.
        thr: the clamped distance (``sqrt_rn(eps)``); ``d <= thr`` gives ``h = 0``.
        BLOCK_R, BLOCK_C: tile of h. BLOCK_D: D-chunk of the output.
        INPUT_PRECISION: ``tl.dot``'s input precision.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < R
    dmask = dd < D
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    hsum = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        cols64 = cols.to(tl.int64)
        m2 = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows64[:, None] * stride_g_r + cols64[None, :] * stride_g_c,
                    mask=m2, other=0.0)
        d = tl.load(dist_ptr + rows64[:, None] * stride_dist_r + cols64[None, :] * stride_dist_c,
                    mask=m2, other=1.0)
        h = tl.where(m2 & (d > thr), g.to(tl.float32) / d, 0.0)
        hsum += tl.sum(h, axis=1)
        b = tl.load(b_ptr + cols64[:, None] * stride_b_c + dd[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(h, b, acc, input_precision=INPUT_PRECISION)
    a = tl.load(a_ptr + rows64[:, None] * stride_a_r + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    out = a * hsum[:, None] - acc
    tl.store(da_ptr + rows64[:, None] * stride_da_r + dd[None, :], out.to(da_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _pairwise_fwd_kernel,
        "x_ptr y_ptr: *x; xn_ptr yn_ptr out_ptr: *fp32; M N D: i32; "
        "stride_x_m stride_y_n stride_out_m: i64",
        rows=("stride_x_m", "stride_y_n"), other=("stride_out_m",)),
    "bwd": KernelSpec(
        _pairwise_bwd_kernel,
        "g_ptr dist_ptr: *fp32; a_ptr b_ptr da_ptr: *x; R C D: i32; stride_g_r stride_g_c "
        "stride_dist_r stride_dist_c stride_a_r stride_b_c stride_da_r: i64; thr: fp32",
        unit=("stride_g_c", "stride_dist_c"), rows=("stride_a_r", "stride_b_c", "stride_da_r"),
        other=("stride_g_r", "stride_dist_r")),
    "sqnorm": SQNORM,
}


# --------------------------------------------------------------------------- configurations
_BWD = KernelConfig({"BLOCK_R": 64, "BLOCK_C": 64}, num_warps=4, num_stages=2, block_d=(16, 64))
#: ``CONFIGS[family][kernel]``: what the launchers use for inputs of that dtype family.
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "half": {"fwd": KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8,
                                 num_stages=3, block_d=(16, 64)),
             "bwd": _BWD, "sqnorm": SQNORM_CONFIG},
    "fp32": {"fwd": KernelConfig({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8,
                                 num_stages=3, block_d=(16, 32)),
             "bwd": _BWD, "sqnorm": SQNORM_CONFIG},
}


def _gpu_flags(entry: str, dtype: torch.dtype) -> dict:
    if entry == "sqnorm":
        return {}
    return {"INPUT_PRECISION": input_precision(torch.float32 if entry == "bwd" else dtype, gpu=True)}


def launches() -> List[Launch]:
    """Every configuration the launchers of this module can pick on a GPU (compile tests)."""
    return expand("pairwise", CONFIGS, KERNELS, _gpu_flags)


# --------------------------------------------------------------------------- launchers
def _forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    M, D = x.shape
    N = y.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    xn, yn = row_sqnorms(x), row_sqnorms(y)
    cfg = CONFIGS[family(x.dtype)]["fwd"]
    grid = (triton.cdiv(M, cfg.blocks["BLOCK_M"]) * triton.cdiv(N, cfg.blocks["BLOCK_N"]),)
    _pairwise_fwd_kernel[grid](
        x, y, xn, yn, out, M, N, D, x.stride(0), y.stride(0), out.stride(0),
        INPUT_PRECISION=input_precision(x.dtype), **cfg.launch(D))
    return out


def _backward_one(g: torch.Tensor, dist: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  transpose: bool) -> torch.Tensor:
    """``dA`` for ``d = dist(a, b)`` (``transpose``: ``g``/``dist`` are b-rows x a-rows)."""
    R, D = a.shape
    C = b.shape[0]
    da = torch.empty(R, D, dtype=a.dtype, device=a.device)
    if R == 0 or D == 0:
        return da
    if C == 0:
        return da.zero_()
    sgr, sgc = g.stride()
    sdr, sdc = dist.stride()
    if transpose:
        sgr, sgc, sdr, sdc = sgc, sgr, sdc, sdr
    cfg = CONFIGS[family(a.dtype)]["bwd"]
    grid = (triton.cdiv(R, cfg.blocks["BLOCK_R"]), triton.cdiv(D, cfg.block_d_for(D)))
    _pairwise_bwd_kernel[grid](
        g, dist, a, b, da, R, C, D, sgr, sgc, sdr, sdc, a.stride(0), b.stride(0), da.stride(0),
        CLAMPED_DIST, INPUT_PRECISION=input_precision(torch.float32), **cfg.launch(D))
    return da


# Registered with torch.library: torch.compile(fullgraph=True) sees opaque forward/backward ops.
@torch.library.custom_op("daal_triton::pairwise_distance", mutates_args=())
def _pairwise_op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d = pairwise_distance(x, y)`` (see the module docstring), float32."""
    dtype = compute_dtype("pairwise_distance", x, y)
    return _forward(prepare(x, dtype), prepare(y, dtype))


@_pairwise_op.register_fake
def _pairwise_fake(x, y):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=torch.float32)


@torch.library.custom_op("daal_triton::pairwise_distance_backward", mutates_args=())
def _pairwise_backward_op(g: torch.Tensor, dist: torch.Tensor, x: torch.Tensor,
                          y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dy)`` from ``g = dL/dd`` and the saved output ``d``."""
    dtype = compute_dtype("pairwise_distance", x, y)
    xc, yc = prepare(x, dtype), prepare(y, dtype)
    g = g.to(torch.float32)
    dx = _backward_one(g, dist, xc, yc, transpose=False).to(x.dtype)
    dy = _backward_one(g, dist, yc, xc, transpose=True).to(y.dtype)
    return dx, dy


@_pairwise_backward_op.register_fake
def _pairwise_backward_fake(g, dist, x, y):
    return torch.empty_like(x), torch.empty_like(y)


def _pairwise_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], output)


def _pairwise_autograd_backward(ctx, g):
    x, y, dist = ctx.saved_tensors
    return torch.ops.daal_triton.pairwise_distance_backward(g, dist, x, y)


_pairwise_op.register_autograd(_pairwise_autograd_backward, setup_context=_pairwise_setup_context)


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d_ij = sqrt(max(||x_i - y_j||^2, 1e-12))``: ``x`` M x D, ``y`` N x D -> M x N float32.

    Inputs float32/float16/bfloat16 with any strides (copied once with ``.contiguous()`` when
    the rows are not contiguous), on CUDA or, under ``TRITON_INTERPRET=1``, on the CPU.
    Differentiable in ``x`` and ``y`` (Triton backward). float64 inputs raise ``ValueError``
    (``daal_triton.pairwise_distance`` routes them to the reference).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be M x D and N x D, got {tuple(x.shape)} and {tuple(y.shape)}")
    compute_dtype("pairwise_distance", x, y)
    return _pairwise_op(x, y)
