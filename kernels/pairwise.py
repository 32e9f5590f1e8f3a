"""Pairwise Euclidean distances as a tiled Triton GEMM with a distance epilogue.

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
float32 inputs use TF32 dots on a GPU (``ALLOW_TF32``, relative error ~1e-3) and IEEE float32
dots under ``TRITON_INTERPRET=1`` (and when ``ALLOW_TF32`` is False). Row norms are computed
once per row by ``_sqnorm_kernel`` (float32, from the same rounded inputs the dot sees) and
passed to the GEMM kernel, so the main loop only feeds the tensor cores. Mixed input dtypes
are promoted (never lowered) to a common dtype; float64 inputs run the plain-PyTorch reference
(float64 result) because the kernels compute in float32.

Memory. Inputs are read as they are when their rows are contiguous (unit column stride); other
layouts are copied once with ``.contiguous()``. Forward: the M x N float32 output plus
M + N float32 norms. Backward: no M x N temporary — it reads the saved output ``d`` and the
incoming gradient ``g`` in place (any strides) and writes dX (M x D) and dY (N x D) in the
input dtype. All offsets into M x N and M x D / N x D arrays are 64-bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
import triton
import triton.language as tl

EPS = 1e-12
# The value of d where the clamp binds, exactly as the forward epilogue rounds it (sqrt_rn).
CLAMPED_DIST = float(torch.sqrt(torch.tensor(EPS, dtype=torch.float32)))

#: float32 inputs use TF32 tensor-core dots on a GPU (never under the interpreter).
ALLOW_TF32 = True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_tf32(dtype: torch.dtype) -> bool:
    """TF32 dots for float32 operands on a real GPU only: the interpreter stays IEEE."""
    return dtype == torch.float32 and ALLOW_TF32 and not interpreting()


TL_DTYPE = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


# --------------------------------------------------------------------------- kernels
@triton.jit
def _sqnorm_kernel(X, Out, M, D, stride_x, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out_i = sum_d x_id^2`` in float32 (``X`` M x D, unit column stride)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    base = X + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(Out + rows, acc, mask=rmask)


@triton.jit
def _pairwise_fwd_kernel(
    X, Y, Xn, Yn, Out, M, N, D, stride_x, stride_y, stride_o,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_M: tl.constexpr, USE_TF32: tl.constexpr,
):
    """``out_ij = sqrt_rn(max(xn_i + yn_j - 2 sum_d x_id y_jd, 1e-12))``.

    One BLOCK_M x BLOCK_N output tile per program (grouped launch order for L2 reuse); the dot
    runs over D in BLOCK_D chunks with float32 accumulation; ``Xn``/``Yn`` are the squared row
    norms (float32).
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
    xbase = X + rows64[:, None] * stride_x
    ybase = Y + cols64[:, None] * stride_y
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(xbase + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(ybase + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if USE_TF32:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="tf32")
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
    xn = tl.load(Xn + rows, mask=rmask, other=0.0)
    yn = tl.load(Yn + cols, mask=cmask, other=0.0)
    sq = xn[:, None] + yn[None, :] - 2.0 * acc
    dist = tl.sqrt_rn(tl.maximum(sq, 1e-12))
    tl.store(Out + rows64[:, None] * stride_o + cols64[None, :], dist,
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _pairwise_bwd_kernel(
    G, Dist, A, B, dA, R, C, D,
    stride_gr, stride_gc, stride_dr, stride_dc, stride_a, stride_b, stride_da, thr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, USE_TF32: tl.constexpr,
):
    """``dA_r = a_r * sum_c h_rc - sum_c h_rc b_c`` with ``h_rc = g_rc / d_rc`` (0 where
    ``d_rc <= thr``, the clamp). Program (r-block, d-block) streams over C in BLOCK_C chunks;
    ``G``/``Dist`` are read through (row, col) strides, so the same kernel gives dX (rows = M)
    and dY (rows = N, transposed strides). Dots in float32 (TF32 on a GPU when allowed)."""
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
        g = tl.load(G + rows64[:, None] * stride_gr + cols64[None, :] * stride_gc, mask=m2, other=0.0)
        d = tl.load(Dist + rows64[:, None] * stride_dr + cols64[None, :] * stride_dc, mask=m2, other=1.0)
        h = tl.where(m2 & (d > thr), g.to(tl.float32) / d, 0.0)
        hsum += tl.sum(h, axis=1)
        b = tl.load(B + cols64[:, None] * stride_b + dd[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if USE_TF32:
            acc = tl.dot(h, b, acc, input_precision="tf32")
        else:
            acc = tl.dot(h, b, acc, input_precision="ieee")
    a = tl.load(A + rows64[:, None] * stride_a + dd[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    out = a * hsum[:, None] - acc
    tl.store(dA + rows64[:, None] * stride_da + dd[None, :], out.to(dA.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration a launcher can choose: the kernel, its pointer dtypes, its
    constexprs and launch options. ``CONFIGS`` lists all of them (the compile tests use it)."""

    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    num_warps: int
    num_stages: int
    gemm: bool = field(default=True)  # whether the kernel's hot loop is a tensor-core dot


# (dtype is half?) -> (BLOCK_M, BLOCK_N, largest BLOCK_D, num_warps, num_stages)
FWD_TABLE = {
    True: (128, 128, 64, 8, 3),
    False: (128, 128, 32, 8, 3),
}
BWD_BLOCKS = (64, 64, 64, 4, 2)  # BLOCK_R, BLOCK_C, largest BLOCK_D, num_warps, num_stages
SQNORM_BLOCKS = (64, 64, 4)  # BLOCK_M, BLOCK_D, num_warps
GROUP_M = 8


def block_d(D: int, largest: int) -> int:
    """The D-chunk: the next power of two >= D (at least 16, tl.dot's minimum), at most ``largest``."""
    return min(largest, max(16, triton.next_power_of_2(max(int(D), 1))))


def _block_d_choices(largest: int) -> List[int]:
    out, b = [], 16
    while b <= largest:
        out.append(b)
        b *= 2
    return out


def fwd_config(dtype: torch.dtype, D: int) -> Tuple[int, int, int, int, int]:
    bm, bn, bd, w, s = FWD_TABLE[dtype != torch.float32]
    return bm, bn, block_d(D, bd), w, s


def _build_configs() -> List[KernelConfig]:
    configs = []
    for dtype, ptr in TL_DTYPE.items():
        half = dtype != torch.float32
        bm, bn, bdmax, w, s = FWD_TABLE[half]
        for bd in _block_d_choices(bdmax):
            configs.append(KernelConfig(
                f"pairwise_fwd-{ptr[1:]}-bd{bd}", _pairwise_fwd_kernel,
                {"X": ptr, "Y": ptr, "Xn": "*fp32", "Yn": "*fp32", "Out": "*fp32", "M": "i32",
                 "N": "i32", "D": "i32", "stride_x": "i64", "stride_y": "i64", "stride_o": "i64"},
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "GROUP_M": GROUP_M,
                 "USE_TF32": not half}, w, s))
        br, bc, bdmax, w, s = BWD_BLOCKS
        for bd in _block_d_choices(bdmax):
            configs.append(KernelConfig(
                f"pairwise_bwd-{ptr[1:]}-bd{bd}", _pairwise_bwd_kernel,
                {"G": "*fp32", "Dist": "*fp32", "A": ptr, "B": ptr, "dA": ptr, "R": "i32", "C": "i32",
                 "D": "i32", "stride_gr": "i64", "stride_gc": "i64", "stride_dr": "i64",
                 "stride_dc": "i64", "stride_a": "i64", "stride_b": "i64", "stride_da": "i64",
                 "thr": "fp32"},
                {"BLOCK_R": br, "BLOCK_C": bc, "BLOCK_D": bd, "USE_TF32": True}, w, s))
        bm, bd, w = SQNORM_BLOCKS
        configs.append(KernelConfig(
            f"sqnorm-{ptr[1:]}", _sqnorm_kernel,
            {"X": ptr, "Out": "*fp32", "M": "i32", "D": "i32", "stride_x": "i64"},
            {"BLOCK_M": bm, "BLOCK_D": bd}, w, 1, gemm=False))
    return configs


#: Every configuration the launchers in this module can choose (for compile tests).
CONFIGS: List[KernelConfig] = _build_configs()


# --------------------------------------------------------------------------- launchers
def prepare(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with unit column stride (one copy at most)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.stride(-1) != 1 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        t = t.contiguous()
    return t


def common_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The inputs' promotion (float16 + bfloat16 -> float32); never a lower precision."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2`` in float32 for a prepared ``x`` (M x D, unit column stride)."""
    M, D = x.shape
    out = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    bm, bd, w = SQNORM_BLOCKS
    _sqnorm_kernel[(triton.cdiv(M, bm),)](x, out, M, D, x.stride(0), BLOCK_M=bm, BLOCK_D=bd, num_warps=w)
    return out


def _forward(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    M, D = x.shape
    N = y.shape[0]
    out = torch.empty(M, N, dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        return out
    xn, yn = row_sqnorms(x), row_sqnorms(y)
    bm, bn, bd, w, s = fwd_config(x.dtype, D)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _pairwise_fwd_kernel[grid](
        x, y, xn, yn, out, M, N, D, x.stride(0), y.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP_M=GROUP_M, USE_TF32=use_tf32(x.dtype),
        num_warps=w, num_stages=s)
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
    br, bc, bdmax, w, s = BWD_BLOCKS
    bd = block_d(D, bdmax)
    grid = (triton.cdiv(R, br), triton.cdiv(D, bd))
    _pairwise_bwd_kernel[grid](
        g, dist, a, b, da, R, C, D, sgr, sgc, sdr, sdc, a.stride(0), b.stride(0), da.stride(0),
        CLAMPED_DIST, BLOCK_R=br, BLOCK_C=bc, BLOCK_D=bd,
        USE_TF32=ALLOW_TF32 and not interpreting(), num_warps=w, num_stages=s)
    return da


# Registered with torch.library: torch.compile(fullgraph=True) sees opaque forward/backward ops.
@torch.library.custom_op("daal_triton::pairwise_distance", mutates_args=())
def _pairwise_op(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``d = pairwise_distance(x, y)`` (see the module docstring), float32."""
    dtype = common_dtype(x, y)
    return _forward(prepare(x, dtype), prepare(y, dtype))


@_pairwise_op.register_fake
def _pairwise_fake(x, y):
    return x.new_empty((x.shape[0], y.shape[0]), dtype=torch.float32)


@torch.library.custom_op("daal_triton::pairwise_distance_backward", mutates_args=())
def _pairwise_backward_op(g: torch.Tensor, dist: torch.Tensor, x: torch.Tensor,
                          y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dx, dL/dy)`` from ``g = dL/dd`` and the saved output ``d``."""
    dtype = common_dtype(x, y)
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
    Differentiable in ``x`` and ``y`` (Triton backward). float64 inputs return the float64
    plain-PyTorch result (the kernels compute in float32 and nothing is lowered silently).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be M x D and N x D, got {tuple(x.shape)} and {tuple(y.shape)}")
    dtype = common_dtype(x, y)
    if dtype == torch.float64:
        from daal_triton.reference import pairwise_distance as ref

        return ref(x, y)
    if dtype not in TL_DTYPE:
        raise ValueError(f"pairwise_distance takes float16, bfloat16, float32 or float64, got {dtype}")
    return _pairwise_op(x, y)
