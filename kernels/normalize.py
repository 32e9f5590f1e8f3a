"""Step 1 and the label range, fused: one launch forward, one backward (docs/method.md, steps 1
and "Bad input").

Forward (``_prepare_fwd_kernel``), one program per BLOCK_B rows::

    n_i = sqrt(max(|z_i|^2, eps^2)),   x_i = z_i / n_i             (NORMALIZE; else x_i = z_i)
    (a finite row whose |z_i|^2 overflows float32: x_i = 2^-96 z_i / |2^-96 z_i|, from a second
    sum, and n_i = |2^-96 z_i| 2^96, inf where |z_i| itself is beyond float32: dz_i = 0 there)
    bad_i = y_i < 0 or y_i >= C,       y_i <- clamp(y_i, 0, C - 1)  (HAS_LABELS)

in float32 (``x`` is float32 whatever ``z``'s dtype: the loss computes in float32). ``n`` is saved
for the backward, negated where the clamp binds (a zero row), so the backward knows.

Backward (``_prepare_bwd_kernel``)::

    dz_i = (dx_i - x_i (x_i . dx_i)) / n_i     (|z_i| >= eps; where the clamp binds dz_i = dx_i / n_i)

written in ``z``'s dtype. Memory: the B x D float32 output, B floats (``n``) and, with labels,
B int64 labels and B flags (a label's int64 copy too when it comes in another integer dtype);
``z`` is read in place when its rows have unit stride (else copied once); two passes over each row.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    TL_EPS,
    KernelConfig,
    KernelSpec,
    Launch,
    compute_dtype,
    config_family,
    direct,
    eager,
    expand,
    prepare as prepare_rows,
)


#: The second sum of squares' scale (``reference.daal.NORM_SCALE``, which the tests compare).
NORM_SCALE = tl.constexpr(2.0 ** -96)


@triton.jit
def _prepare_fwd_kernel(z_ptr, x_ptr, n_ptr, label_ptr, label_out_ptr, bad_ptr, B, D, C, stride_z_b,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
                        HAS_LABELS: tl.constexpr):
    """``x_i = z_i / max(|z_i|, eps)`` (or ``z_i``), ``n_i`` (negated where the clamp binds), and
    the clamped labels with their out-of-range flags.

    Args:
        z_ptr: B x D embeddings (unit column stride, any float dtype).
        x_ptr: B x D float32 output (contiguous).
        n_ptr: B float32 outputs: the norms, ``-n`` where ``|z|^2 < eps^2`` (read with NORMALIZE).
        label_ptr: B int64 labels (read with HAS_LABELS). label_out_ptr: B int64, the labels
            clamped into ``[0, C)``. bad_ptr: B bool, where they were not.
        B, D: sizes. C: the number of classes. stride_z_b: row stride of z.
        BLOCK_B: rows per program. BLOCK_D: D-chunk. NORMALIZE: divide by the norm.
        HAS_LABELS: labels given.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    zrow = z_ptr + rows64[:, None] * stride_z_b
    xrow = x_ptr + rows64[:, None] * D
    n = tl.full([BLOCK_B], 1.0, dtype=tl.float32)
    if NORMALIZE:
        ss = tl.zeros([BLOCK_B], dtype=tl.float32)
        scaled = tl.zeros([BLOCK_B], dtype=tl.float32)  # of 2^-96 z: finite for every finite row
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            z = tl.load(zrow + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
            ss += tl.sum(z * z, 1)
            zs = z * NORM_SCALE
            scaled += tl.sum(zs * zs, 1)
        n = tl.sqrt(tl.maximum(ss, TL_EPS * TL_EPS, propagate_nan=tl.PropagateNan.ALL))  # a NaN/inf row becomes NaN
        big = (ss == float("inf")) & (scaled < float("inf"))  # finite, |z|^2 beyond float32
        pre = tl.where(big, NORM_SCALE, 1.0)  # such a row is divided at scale 2^-96: its norm may be inf
        div = tl.where(big, tl.sqrt(scaled), n)
        n = tl.where(big, div * (1.0 / NORM_SCALE), n)
        tl.store(n_ptr + rows, tl.where(ss < TL_EPS * TL_EPS, -n, n), mask=rmask)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (dd[None, :] < D)
        z = tl.load(zrow + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        if NORMALIZE:
            z = (z * pre[:, None]) / div[:, None]
        tl.store(xrow + dd[None, :], z, mask=m2)
    if HAS_LABELS:
        lab = tl.load(label_ptr + rows, mask=rmask, other=0)
        bad = (lab < 0) | (lab >= C)
        tl.store(label_out_ptr + rows, tl.minimum(tl.maximum(lab, 0), C - 1), mask=rmask)
        tl.store(bad_ptr + rows, bad, mask=rmask)


@triton.jit
def _prepare_bwd_kernel(gx_ptr, x_ptr, n_ptr, gz_ptr, B, D, stride_gx_b, stride_gz_b,
                        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr):
    """``dz_i = (dx_i - x_i (x_i . dx_i)) / n_i`` (the projection dropped where ``n_i < 0``: the
    clamp binds), or ``dz_i = dx_i`` without NORMALIZE, in z's dtype.

    Args:
        gx_ptr: B x D float32 incoming gradient (unit column stride).
        x_ptr: B x D float32 forward output (contiguous). n_ptr: B norms of the forward.
        gz_ptr: B x D output in z's dtype (unit column stride).
        B, D: sizes. stride_gx_b, stride_gz_b: row strides.
        BLOCK_B: rows per program. BLOCK_D: D-chunk. NORMALIZE: as the forward.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    grow = gx_ptr + rows64[:, None] * stride_gx_b
    xrow = x_ptr + rows64[:, None] * D
    orow = gz_ptr + rows64[:, None] * stride_gz_b
    odt = gz_ptr.dtype.element_ty
    if NORMALIZE:
        n = tl.load(n_ptr + rows, mask=rmask, other=1.0)
        dot = tl.zeros([BLOCK_B], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (dd[None, :] < D)
            g = tl.load(grow + dd[None, :], mask=m2, other=0.0)
            x = tl.load(xrow + dd[None, :], mask=m2, other=0.0)
            dot += tl.sum(g * x, 1)
        dot = tl.where(n > 0, dot, 0.0)
        inv = 1.0 / tl.abs(n)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (dd[None, :] < D)
        g = tl.load(grow + dd[None, :], mask=m2, other=0.0)
        if NORMALIZE:
            x = tl.load(xrow + dd[None, :], mask=m2, other=0.0)
            g = (g - x * dot[:, None]) * inv[:, None]
        tl.store(orow + dd[None, :], g.to(odt), mask=m2)


KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _prepare_fwd_kernel, "z_ptr: *x; x_ptr n_ptr: *fp32; label_ptr label_out_ptr: *i64; "
        "bad_ptr: *i1; B D C: i32; stride_z_b: i64", rows=("stride_z_b",), gemm=False),
    "bwd": KernelSpec(
        _prepare_bwd_kernel, "gx_ptr x_ptr n_ptr: *fp32; gz_ptr: *x; B D: i32; "
        "stride_gx_b stride_gz_b: i64", rows=("stride_gx_b", "stride_gz_b"), gemm=False),
}
_ROWS = KernelConfig({"BLOCK_B": 16}, num_warps=4, num_stages=1, block_d=(64, 64))
#: ``CONFIGS[family][entry]``; ``"interp"``: the interpreter's (large blocks, BLOCK_D fitted to D).
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "half": dict(fwd=_ROWS, bwd=_ROWS),
    "fp32": dict(fwd=_ROWS, bwd=_ROWS),
    "interp": dict(fwd=KernelConfig({"BLOCK_B": 64}, 4, 1, (16, 256)),
                   bwd=KernelConfig({"BLOCK_B": 64}, 4, 1, (16, 256))),
}


def _gpu_flags(entry: str, dtype: torch.dtype) -> dict:
    return {"NORMALIZE": True, "HAS_LABELS": True} if entry == "fwd" else {"NORMALIZE": True}


def launches() -> List[Launch]:
    """Every configuration the launchers can pick on a GPU (compile tests)."""
    return expand("normalize", CONFIGS, KERNELS, _gpu_flags)


# --------------------------------------------------------------------------- operators
@torch.library.custom_op("daal_triton::prepare", mutates_args=())
def _prepare_op(z: torch.Tensor, labels: Optional[torch.Tensor], num_classes: int, normalize: bool
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, n, labels, bad)``; without labels the last two are empty."""
    z = prepare_rows(z, z.dtype)
    B, D = z.shape
    x = torch.empty(B, D, device=z.device, dtype=torch.float32)
    n = torch.empty(B if normalize else 0, device=z.device, dtype=torch.float32)
    rows = B if labels is not None else 0
    lab = torch.empty(rows, device=z.device, dtype=torch.int64)
    bad = torch.empty(rows, device=z.device, dtype=torch.bool)
    if B:
        cfg = CONFIGS[config_family(z.dtype)]["fwd"]
        lab_in = labels.to(torch.int64).contiguous() if labels is not None else lab
        _prepare_fwd_kernel[(cdiv(B, cfg.blocks["BLOCK_B"]),)](
            z, x, n if normalize else x, lab_in, lab, bad, B, D, num_classes, z.stride(0),
            NORMALIZE=bool(normalize), HAS_LABELS=labels is not None, **cfg.launch(D))
    return x, n, lab, bad


@_prepare_op.register_fake
def _prepare_fake(z, labels, num_classes, normalize):
    B, D = z.shape
    rows = B if labels is not None else 0
    return (z.new_empty((B, D), dtype=torch.float32), z.new_empty((B if normalize else 0,), dtype=torch.float32),
            z.new_empty((rows,), dtype=torch.int64), z.new_empty((rows,), dtype=torch.bool))


@torch.library.custom_op("daal_triton::prepare_backward", mutates_args=())
def _prepare_backward_op(gx: torch.Tensor, x: torch.Tensor, n: torch.Tensor, dtype: torch.dtype,
                         normalize: bool) -> torch.Tensor:
    """``dL/dz`` in z's ``dtype`` (the forward's input itself is not kept for the backward: a
    memory bank's ``cat([emb, bank])`` is not held alive until the backward for its dtype)."""
    B, D = x.shape
    gz = torch.empty(B, D, device=x.device, dtype=dtype)
    if B:
        # the forward's results as it wrote them: a saved-tensor hook may relayout them (the
        # kernel reads x as rows * D and n with unit stride); free when it did not
        x, n = x.contiguous(), n.contiguous()
        gx = prepare_rows(gx, torch.float32)
        cfg = CONFIGS[config_family(dtype)]["bwd"]
        _prepare_bwd_kernel[(cdiv(B, cfg.blocks["BLOCK_B"]),)](
            gx, x, n if normalize else x, gz, B, D, gx.stride(0), gz.stride(0),
            NORMALIZE=bool(normalize), **cfg.launch(D))
    return gz


@_prepare_backward_op.register_fake
def _prepare_backward_fake(gx, x, n, dtype, normalize):
    return x.new_empty(x.shape, dtype=dtype)  # contiguous, as the kernel's (any input strides)


def _setup_context(ctx, inputs, output):
    """Save ``x`` and ``n`` (the signed norms) for the backward, not ``z``; ``n``, the labels and
    the flags carry no gradient."""
    z, _, _, normalize = inputs
    x, n, lab, bad = output
    ctx.save_for_backward(x, n)
    ctx.dtype = z.dtype  # z itself is not saved: the backward needs its dtype only
    ctx.normalize = normalize
    ctx.mark_non_differentiable(n, lab, bad)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for n, labels, bad


_prepare_backward_direct = direct(_prepare_backward_op)


def _backward(ctx, gx, _gn, _glab, _gbad):
    """``dz_i = (dx_i - x_i (x_i . dx_i)) / n_i`` (``dx_i / n_i`` where the clamp bound; module
    docstring) in one launch, in ``z``'s dtype; nothing for the labels."""
    if gx is None:
        return None, None, None, None
    x, n = ctx.saved_tensors
    return _prepare_backward_direct(gx, x, n, ctx.dtype, ctx.normalize), None, None, None


_prepare_op.register_autograd(_backward, setup_context=_setup_context)
_prepare = eager(_prepare_op)


def prepare(embeddings: torch.Tensor, labels: Optional[torch.Tensor], num_classes: int, *,
            dtype: torch.dtype, normalize: bool
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``daal_triton.reference.prepare`` in one launch: ``(x, labels, bad)``; ``x`` float32
    (``dtype`` must be float32: float64 runs on the reference)."""
    if dtype != torch.float32:
        raise ValueError(f"prepare: the kernels compute in float32, got dtype {dtype}")
    compute_dtype("prepare", embeddings)
    x, _, lab, bad = _prepare(embeddings, labels, int(num_classes), bool(normalize))
    return (x, None, None) if labels is None else (x, lab, bad)
