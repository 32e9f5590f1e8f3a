"""The loss from its terms, fused: one launch forward, one backward (docs/method.md, step 7).

Forward (``_combine_fwd_kernel``), one program walking the B samples in BLOCK_B chunks (a fixed
order: deterministic)::

    line_i = NaN if bad_i else line_i;   with weights: line_i *= w_i, hinge_i *= w_i
    per_sample_i = line_i + lambda_dens hinge_i
    L_dens = sum_i hinge_i / max(#valid, 1)
    total = sum_i line_i / B + lambda_dens L_dens + lambda_len L_len     (L_len = 0 if not given)

Backward (``_combine_bwd_kernel``), from the gradients of ``per_sample`` (B), ``total``, ``L_dens``
and ``L_len`` (each may be absent)::

    dL/dline_i  = [not bad_i] w_i (g_total / B + g_per_i)
    dL/dhinge_i = w_i (lambda_dens g_per_i + (lambda_dens g_total + g_dens) / max(#valid, 1))
    dL/dL_len   = lambda_len g_total + g_len

Memory: the outputs only (forward: B floats and three scalars; backward: 2B floats and a scalar).
Each B-vector is read once, but the backward reads ``valid`` twice (its count comes first).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import KernelConfig, KernelSpec, Launch, config_family, direct, eager, expand


@triton.jit
def _combine_fwd_kernel(line_ptr, hinge_ptr, valid_ptr, bad_ptr, w_ptr, llen_ptr, per_ptr,
                        total_ptr, dens_ptr, len_ptr, B, lambda_dens, lambda_len,
                        BLOCK_B: tl.constexpr, HAS_W: tl.constexpr, HAS_LEN: tl.constexpr):
    """``per_sample``, ``total``, ``L_dens``, ``L_len`` (module docstring); one program.

    Args:
        line_ptr, hinge_ptr: B float32 terms. valid_ptr, bad_ptr: B bool. w_ptr: B float32
            weights (read with HAS_W). llen_ptr: the scalar L_len (read with HAS_LEN).
        per_ptr: B float32 output. total_ptr, dens_ptr, len_ptr: scalar float32 outputs.
        B: samples. lambda_dens, lambda_len: the weights of the terms.
        BLOCK_B: samples per step. HAS_W: weights given. HAS_LEN: L_len given.
    """
    acc_line = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        line = tl.load(line_ptr + rows, mask=rmask, other=0.0)
        hinge = tl.load(hinge_ptr + rows, mask=rmask, other=0.0)
        bad = tl.load(bad_ptr + rows, mask=rmask, other=0) != 0
        valid = tl.load(valid_ptr + rows, mask=rmask, other=0) != 0
        line = tl.where(bad, float("nan"), line)
        if HAS_W:
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
            line = line * w
            hinge = hinge * w
        tl.store(per_ptr + rows, line + lambda_dens * hinge, mask=rmask)
        acc_line += tl.where(rmask, line, 0.0)
        acc_h += hinge
        acc_v += valid.to(tl.float32)
    l_dens = tl.sum(acc_h, 0) / tl.maximum(tl.sum(acc_v, 0), 1.0)
    l_len = 0.0
    if HAS_LEN:
        l_len = tl.load(llen_ptr)
    tl.store(total_ptr, tl.sum(acc_line, 0) / B + lambda_dens * l_dens + lambda_len * l_len)
    tl.store(dens_ptr, l_dens)
    tl.store(len_ptr, l_len)


@triton.jit
def _combine_bwd_kernel(gper_ptr, gtot_ptr, gdens_ptr, glen_ptr, valid_ptr, bad_ptr, w_ptr,
                        gline_ptr, ghinge_ptr, gllen_ptr, B, lambda_dens, lambda_len,
                        BLOCK_B: tl.constexpr, HAS_GPER: tl.constexpr, HAS_GTOT: tl.constexpr,
                        HAS_GDENS: tl.constexpr, HAS_GLEN: tl.constexpr, HAS_W: tl.constexpr):
    """``dL/dline``, ``dL/dhinge`` and ``dL/dL_len`` (module docstring); one program.

    Args:
        gper_ptr: B float32 ``dL/dper_sample``; gtot_ptr, gdens_ptr, glen_ptr: scalar gradients
            of ``total``, ``L_dens``, ``L_len`` (each read only with its HAS_ flag).
        valid_ptr, bad_ptr, w_ptr: as the forward. gline_ptr, ghinge_ptr: B float32 outputs.
        gllen_ptr: the scalar output ``dL/dL_len``.
        B, lambda_dens, lambda_len, BLOCK_B, HAS_W: as the forward.
    """
    acc_v = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        acc_v += (tl.load(valid_ptr + rows, mask=rows < B, other=0) != 0).to(tl.float32)
    nvalid = tl.maximum(tl.sum(acc_v, 0), 1.0)
    g_tot = 0.0
    if HAS_GTOT:
        g_tot = tl.load(gtot_ptr)
    g_dens = 0.0
    if HAS_GDENS:
        g_dens = tl.load(gdens_ptr)
    g_len = 0.0
    if HAS_GLEN:
        g_len = tl.load(glen_ptr)
    tl.store(gllen_ptr, lambda_len * g_tot + g_len)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        gl = tl.zeros([BLOCK_B], dtype=tl.float32) + g_tot / B
        gh = tl.zeros([BLOCK_B], dtype=tl.float32) + (lambda_dens * g_tot + g_dens) / nvalid
        if HAS_GPER:
            gp = tl.load(gper_ptr + rows, mask=rmask, other=0.0)
            gl += gp
            gh += lambda_dens * gp
        if HAS_W:
            w = tl.load(w_ptr + rows, mask=rmask, other=0.0)
            gl = gl * w
            gh = gh * w
        bad = tl.load(bad_ptr + rows, mask=rmask, other=0) != 0
        tl.store(gline_ptr + rows, tl.where(bad, 0.0, gl), mask=rmask)
        tl.store(ghinge_ptr + rows, gh, mask=rmask)


KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _combine_fwd_kernel, "line_ptr hinge_ptr: *fp32; valid_ptr bad_ptr: *i1; w_ptr llen_ptr "
        "per_ptr total_ptr dens_ptr len_ptr: *fp32; B: i32; lambda_dens lambda_len: fp32", gemm=False),
    "bwd": KernelSpec(
        _combine_bwd_kernel, "gper_ptr gtot_ptr gdens_ptr glen_ptr: *fp32; valid_ptr bad_ptr: *i1; "
        "w_ptr gline_ptr ghinge_ptr gllen_ptr: *fp32; B: i32; lambda_dens lambda_len: fp32",
        gemm=False),
}
_ONE = KernelConfig({"BLOCK_B": 1024}, num_warps=4, num_stages=1, block_d=None)
#: ``CONFIGS[family][entry]``: one program of BLOCK_B lanes (the work is O(B)); every input is
#: float32 (the loss's dtype), so one GPU family.
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "fp32": dict(fwd=_ONE, bwd=_ONE),
    "interp": dict(fwd=_ONE, bwd=_ONE),
}


def _gpu_flags(entry: str, dtype: torch.dtype) -> dict:
    if entry == "fwd":
        return {"HAS_W": True, "HAS_LEN": True}
    return {"HAS_GPER": True, "HAS_GTOT": True, "HAS_GDENS": True, "HAS_GLEN": True, "HAS_W": True}


def launches() -> List[Launch]:
    """Every configuration the launchers can pick on a GPU (compile tests)."""
    return expand("combine", CONFIGS, KERNELS, _gpu_flags)


# --------------------------------------------------------------------------- operators
@torch.library.custom_op("daal_triton::combine", mutates_args=())
def _combine_op(per_line: torch.Tensor, hinge: torch.Tensor, valid: torch.Tensor, bad: torch.Tensor,
                weights: Optional[torch.Tensor], l_len: Optional[torch.Tensor], lambda_dens: float,
                lambda_len: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(per_sample, total, L_dens, L_len)`` (module docstring)."""
    B = per_line.shape[0]
    per = torch.empty(B, device=per_line.device, dtype=torch.float32)
    total, dens, length = (torch.empty((), device=per_line.device, dtype=torch.float32) for _ in range(3))
    line, hinge = per_line.float().contiguous(), hinge.float().contiguous()
    w = weights.float().contiguous() if weights is not None else line
    ll = l_len.float() if l_len is not None else line
    cfg = CONFIGS[config_family(torch.float32)]["fwd"]
    _combine_fwd_kernel[(1,)](line, hinge, valid.contiguous(), bad.contiguous(), w, ll, per, total, dens,
                              length, B, float(lambda_dens), float(lambda_len),
                              HAS_W=weights is not None, HAS_LEN=l_len is not None, **cfg.launch())
    return per, total, dens, length


@_combine_op.register_fake
def _combine_fake(per_line, hinge, valid, bad, weights, l_len, lambda_dens, lambda_len):
    scalar = per_line.new_empty((), dtype=torch.float32)
    return (per_line.new_empty(per_line.shape, dtype=torch.float32), scalar, torch.empty_like(scalar),
            torch.empty_like(scalar))


@torch.library.custom_op("daal_triton::combine_backward", mutates_args=())
def _combine_backward_op(g_per: Optional[torch.Tensor], g_total: Optional[torch.Tensor],
                         g_dens: Optional[torch.Tensor], g_len: Optional[torch.Tensor],
                         valid: torch.Tensor, bad: torch.Tensor, weights: Optional[torch.Tensor],
                         lambda_dens: float, lambda_len: float
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dper_line, dL/dhinge, dL/dL_len)``."""
    B = valid.shape[0]
    gline = torch.empty(B, device=valid.device, dtype=torch.float32)
    ghinge = torch.empty_like(gline)
    gllen = torch.empty((), device=valid.device, dtype=torch.float32)
    some = gline  # the pointer passed for an absent tensor (never read)
    cfg = CONFIGS[config_family(torch.float32)]["bwd"]
    _combine_bwd_kernel[(1,)](
        g_per.float().contiguous() if g_per is not None else some,
        g_total.float() if g_total is not None else some, g_dens.float() if g_dens is not None else some,
        g_len.float() if g_len is not None else some, valid.contiguous(), bad.contiguous(),
        weights.float().contiguous() if weights is not None else some, gline, ghinge, gllen, B,
        float(lambda_dens), float(lambda_len), HAS_GPER=g_per is not None, HAS_GTOT=g_total is not None,
        HAS_GDENS=g_dens is not None, HAS_GLEN=g_len is not None, HAS_W=weights is not None, **cfg.launch())
    return gline, ghinge, gllen


@_combine_backward_op.register_fake
def _combine_backward_fake(g_per, g_total, g_dens, g_len, valid, bad, weights, lambda_dens, lambda_len):
    g = valid.new_empty(valid.shape, dtype=torch.float32)
    return g, torch.empty_like(g), valid.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    """Save ``valid``, ``bad`` and the weights (the backward's formulas need no term's value) and
    the lambdas; ``L_len`` is differentiable only when the given one requires a gradient."""
    _, _, valid, bad, weights, l_len, lambda_dens, lambda_len = inputs
    ctx.save_for_backward(valid, bad, weights)
    ctx.lambdas = (lambda_dens, lambda_len)
    ctx.has_len = l_len is not None
    if l_len is None or not l_len.requires_grad:  # L_len depends on nothing else: as the reference's
        ctx.mark_non_differentiable(output[3])
    ctx.set_materialize_grads(False)


_combine_backward_direct = direct(_combine_backward_op)


def _backward(ctx, g_per, g_total, g_dens, g_len):
    """``dL/dline``, ``dL/dhinge``, ``dL/dL_len`` from whichever outputs' gradients came (module
    docstring), in one launch."""
    valid, bad, weights = ctx.saved_tensors
    if g_per is None and g_total is None and g_dens is None and g_len is None:
        return (None,) * 8
    gline, ghinge, gllen = _combine_backward_direct(
        g_per, g_total, g_dens, g_len, valid, bad, weights, *ctx.lambdas)
    # none for a term no given gradient reaches (a backward of L_dens or L_len alone): zeros would
    # run the line margin's backward for nothing and give the segments a zero gradient, which
    # weight decay and momentum then move (the reference leaves them None)
    if g_per is None and g_total is None:
        gline = None
        if g_dens is None:
            ghinge = None
    if g_total is None and g_len is None:
        gllen = None
    return gline, ghinge, None, None, None, gllen if ctx.has_len else None, None, None


_combine_op.register_autograd(_backward, setup_context=_setup_context)
_combine = eager(_combine_op)


def combine(per_line: torch.Tensor, hinge: torch.Tensor, valid: torch.Tensor, bad: torch.Tensor,
            l_len: Optional[torch.Tensor], *, weights: Optional[torch.Tensor], lambda_dens: float,
            lambda_len: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``daal_triton.reference.combine`` in one launch (float32 results)."""
    return _combine(per_line, hinge, valid, bad, weights, l_len, float(lambda_dens), float(lambda_len))
