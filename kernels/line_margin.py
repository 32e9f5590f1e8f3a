"""Fused adaptive line margin (docs/method.md, steps 5-6 and "Gradients"): forward and backward
in Triton.

Operator
--------
``line_margin(x, labels, segments, margins, *, alpha, lambda_pull) -> (B,)``, the same signature
and semantics as ``daal_triton.reference.line_margin``::

    out_i = softplus( logsumexp_{c != y_i} alpha (delta_iy + m_i - delta_ic) ) / alpha
            + lambda_pull * delta_iy^2
          = lse_i / alpha + lambda_pull * delta_iy^2,
    lse_i = logsumexp( {0} U { alpha (delta_iy + m_i - delta_ic) : c != y_i } )

with ``delta_ic`` the distance of ``x_i`` to the segment ``[p_c, q_c]`` (``segments[:, 0]`` = p,
``segments[:, 1]`` = q), ``u_c = q_c - p_c``,
``t_ic = clamp((x_i.u_c - p_c.u_c) / max(|u_c|^2, eps), 0, 1)``,
``|e_ic|^2 = |x_i|^2 - 2 x_i.p_c + |p_c|^2 - 2 t_ic (x_i.u_c - p_c.u_c) + t_ic^2 |u_c|^2``
(GEMM form), ``delta_ic = sqrt(max(|e_ic|^2, eps))``, ``eps = 1e-12``. Margins get no gradient.
Output dtype: float32 for float16/bfloat16/float32 inputs. float64 inputs raise ``ValueError``
(``daal_triton``'s loss routes them to the reference).

The split
---------
* ``delta_iy`` (own class) is computed in the *direct* form ``|x_i - p_y - t u_y|`` (O(B D),
  float32), exact for points lying on their own segment (where the GEMM form cancels
  catastrophically): a kernel does it (``_lm2_own_kernel``); in the backward
  ``_lm2_ownseg_kernel`` writes its exact derivative for the own classes' dP, dQ per sample (the
  ``g_iy`` term of docs/method.md "Gradients" and the pull term), which ``_lm2_dseg_kernel`` sums
  per class through class lists (no atomics), and the last kernel (``_lm2_finish_kernel``) adds
  it to dX. The fused kernels mask the own class ``c == y_i`` out of every tile.
* the custom operators ``daal_triton::line_margin2`` / ``line_margin2_backward``
  (``torch.library``, with a registered autograd formula) take the rest: the logsumexp over the
  other classes in the forward, and the envelope-theorem gradients of the ``c != y_i`` terms in
  the backward. (The "2": a first design, v1, was removed after the 2026-11-30 H200 run measured
  it 4.1x slower; docs/kernels.md, "Measured results".)

The kernels (docs/kernels.md, "Fused line margin")
--------------------------------------------------
16 BCD GEMM flops, no global read-modify-write inside any loop, pipelined K-loops; four launches
forward (own-class rows, class statistics, logsumexp, merge), 4 per class chunk + 2 backward (5
per chunk where several chunks copy the segments: ``DAAL_LM_COPY``); with
``DAAL_LAUNCHES=merged`` (the default) two forward (the rows with the statistics,
``_lm2_own_prep_kernel``; the logsumexp with the merge where one class split does) and one fewer
backward (the last chunk's epilogue with dX, ``_lm2_dseg_finish_kernel``).
``_lm2_prep_kernel`` computes the class statistics (4 x C) once per call, of the segments rounded
to x's dtype, and their contiguous copy ``sx`` in x's dtype holding ``[p~, u~]`` (``u~ = q~ - p~``
rounded once; ``DAAL_LM_XU=difference``: ``[p~, q~]``, and only when the segments are not already
it); the forward saves the statistics for the backward, and the copy where the backward runs
one class chunk (with more, the backward rounds each chunk's again into one Cc x 2 x D buffer:
``DAAL_LM_COPY``, :data:`COPY_ENV`). ``_lm2_fwd_kernel`` is the streaming online-logsumexp
kernel whose K-loop is plain tile loads of x, p, u (``difference``: x, p, q, and
``x.u = x.q - x.p`` in the epilogue); its (row
tiles x splits) grid is sized in whole waves of the device's SMs (:func:`wave_split`). The
backward runs per chunk of Cc classes (``B Cc <= CHUNK_ELEMENTS``, :func:`chunk_classes`):
``_lm2_bwd_kernel`` recomputes the chunk's GEMMs once and writes ``a~ = -h(1 - t)``,
``b~ = -h t`` (B x 2Cc, x's dtype, interleaved per class; with ``[p~, u~]`` it holds ``a~ + b~``
in ``a~``'s place) with deterministic row / column partials; ``torch.mm`` (cuBLAS) gives
``AB [P_c; Q_c]`` (``[P_c; U_c]``: the same sum; into the float32 dX accumulator) and
``G = AB^T X``; ``_lm2_dseg_kernel`` adds the rank-1 corrections and the own-class rows
(``_lm2_ownseg_kernel``, before the chunks) and writes dP, dQ in the segments' dtype, rounded
once; ``_lm2_finish_kernel`` forms dX with its own-class term.

Mixed precision
---------------
All dots run in ``x``'s precision with float32 accumulation: the segments (of any float dtype)
are rounded to ``x.dtype`` once per call (``sx``), and the class statistics are taken of those
rounded values, so the GEMM form is consistent with what the dots see; the backward's ``a~``,
``b~`` are cast to ``x.dtype`` too (for float16 they are clamped to +-6e4 first: only a point
within ~1e-5 of a negative segment with ``grad_out ~ 1`` reaches that). Row/column statistics,
t, e^2, the logsumexp and every accumulator are float32. float32 dots run at float32 accuracy
(3xTF32 on a GPU, IEEE under ``TRITON_INTERPRET=1``: :func:`_precision`). All pointer offsets
into B x D and C x 2 x D are 64-bit (they may pass 2^31).

Memory (beyond inputs and outputs)
----------------------------------
The forward saves x, segments, labels, lse (B), the row statistics ``rs`` (3 x B), the class
statistics ``st`` (4 x C) and, where the backward runs one class chunk (or with
``DAAL_LM_COPY=whole``), the rounded copy ``sx`` (C x 2 x D in x's dtype; with
``DAAL_LM_XU=difference`` only when the segments are not contiguous in x's dtype). The backward's
temporaries are O(B Cc + (B + C) D): the chunk's copy (Cc x 2 x D), ``a~ b~`` (B x 2Cc),
``G`` (2Cc x D float32), the partials, the B x D float32 dX accumulator, the own-class rows
(B x 3 x D float32: dP, dQ and the dX term) and their class lists (B + C int32); the segment
gradient is written once in the segments' dtype (``DAAL_LM_OWN_SEG=atomic``, the earlier design,
still selectable after the GPU runs decided for the lists, accumulates it in float32 C x 2 x D).
Nothing is ever B x C.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv,
    EPS,
    FAMILY_DTYPES,
    KernelConfig,
    KernelSpec,
    Launch,
    MAX_GRID_YZ,
    compute_dtype,
    config_family,
    direct,
    env_choice,
    eager,
    expand,
    input_precision,
    merged_launches,
    sm_count,
    _log1p,
    _one_minus_exp_neg,
)
from ._common import wave_split as _wave_split

__all__ = ["line_margin", "CONFIGS", "KERNELS", "config_family", "launches"]

# ----------------------------------------------------------------------------- kernels
# The segments reach the GEMM kernels as ``sx``: a
# contiguous C x 2 x D tensor in x's dtype holding ``[p~, u~]`` (``u~ = q~ - p~``, rounded once), so
# every GEMM K-step is three plain tile loads (x, p, u) the software pipeline can prefetch; nothing
# is formed between the loads and the dots, and ``x.u`` is one dot (``DAAL_LM_XU=difference``: the
# segments themselves when they are contiguous in x's dtype, and ``x.u = x.q - x.p`` from two fp32
# accumulators, noise for a segment shorter than ~1e-3). The class statistics are taken of the
# values the dots see. Class statistics ``st`` (4 x C float32: |p|^2, p.u, |u|^2,
# 1 / max(|u|^2, eps)) are computed once per call and saved for the backward.
@triton.jit
def _lm2_prep_kernel(seg_ptr, sx_ptr, st_ptr, C, D, stride_seg_c, stride_seg_v, stride_seg_d, xu,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, CAST: tl.constexpr):
    """``st[0] = |p~|^2``, ``st[1] = p~.u~``, ``st[2] = |u~|^2``, ``st[3] = 1 / max(|u~|^2, eps)``
    with ``p~``, ``q~`` the segments rounded to the dtype of ``sx`` and ``u~`` the difference: with
    ``xu = 1`` (the default) ``q~ - p~`` taken in float32 and rounded to ``sx``'s dtype (what the
    copy holds, and the dots see), with ``xu = 0`` (``DAAL_LM_XU=difference``) ``q~ - p~`` in
    float32; zero exactly for a zero-length segment either way. With ``CAST`` also writes ``sx``
    (contiguous C x 2 x D: ``[p~, u~]`` with ``xu = 1``, ``[p~, q~]`` with 0).

    Args:
        seg_ptr: C x 2 x D segments (``[:, 0]`` = p, ``[:, 1]`` = q), any float dtype.
        sx_ptr: C x 2 x D contiguous, x's dtype (written only with ``CAST``; its dtype is read).
        st_ptr: 4 x C float32 statistics (contiguous).
        C, D: sizes.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments (class, p/q, feature).
        xu: 1.0 (``DAAL_LM_XU=dot``, the default): ``sx[:, 1]`` holds ``u~``, ``q~ - p~`` rounded
            to x's dtype (the statistics are of that ``u~``), so the dots give ``x.u`` itself;
            0.0 (``difference``): ``sx[:, 1]`` holds ``q~``. With 1.0, ``CAST`` must be set.
        BLOCK_C: classes per program. BLOCK_D: D-chunk. CAST: write ``sx``.
    """
    _class_stats(tl.program_id(0), seg_ptr, sx_ptr, st_ptr, C, D, stride_seg_c, stride_seg_v,
                 stride_seg_d, xu, BLOCK_C, BLOCK_D, CAST)


@triton.jit
def _class_stats(pid, seg_ptr, sx_ptr, st_ptr, C, D, stride_seg_c, stride_seg_v, stride_seg_d, xu,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, CAST: tl.constexpr):
    """``_lm2_prep_kernel``'s program ``pid`` (the classes ``[pid BLOCK_C, (pid + 1) BLOCK_C)``)."""
    cls = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    base = seg_ptr + cls.to(tl.int64)[:, None] * stride_seg_c
    xrow = sx_ptr + cls.to(tl.int64)[:, None] * (2 * D)
    xdt = sx_ptr.dtype.element_ty
    pp = tl.zeros([BLOCK_C], dtype=tl.float32)
    pu = tl.zeros([BLOCK_C], dtype=tl.float32)
    uu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        m = cmask[:, None] & (offs_d[None, :] < D)
        od = offs_d.to(tl.int64)[None, :] * stride_seg_d
        p = tl.load(base + od, mask=m, other=0.0).to(xdt)
        q = tl.load(base + stride_seg_v + od, mask=m, other=0.0).to(xdt)
        pf = p.to(tl.float32)
        v = (q.to(tl.float32) - xu * pf).to(xdt)  # xu = 0: q~ itself; 1: u~ = q~ - p~, rounded
        if CAST:
            tl.store(xrow + offs_d[None, :], p, mask=m)
            tl.store(xrow + D + offs_d[None, :], v, mask=m)
        u = v.to(tl.float32) - (1.0 - xu) * pf
        pp += tl.sum(pf * pf, 1)
        pu += tl.sum(pf * u, 1)
        uu += tl.sum(u * u, 1)
    tl.store(st_ptr + cls, pp, mask=cmask)
    tl.store(st_ptr + C + cls, pu, mask=cmask)
    tl.store(st_ptr + 2 * C + cls, uu, mask=cmask)
    tl.store(st_ptr + 3 * C + cls, 1.0 / tl.maximum(uu, 1e-12, propagate_nan=tl.PropagateNan.ALL), mask=cmask)


@triton.jit
def _lm2_tile(x_ptr, sx_ptr, st_ptr, rows, cls, rmask, cmask, xx, C, D, stride_x_b, xu, sx_c0,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One BLOCK_B x BLOCK_C tile of ``t`` and ``|e|^2`` (GEMM form, docs/method.md step 5).

    K-loop over D, tile loads only: ``XP += X_k P_k^T``, ``XV += X_k V_k^T`` (fp32 accumulate;
    ``V`` is ``sx[:, 1]``: ``U`` with ``xu = 1``, ``Q`` with ``xu = 0``).
    Epilogue: ``proj = XV - (1 - xu) XP - pu`` (``x.u - p.u``; with ``xu = 0`` the difference
    ``x.q - x.p`` of two O(|x||p|) dots, which loses ``t`` for a segment shorter than ~1e-3),
    ``t = clamp(proj inv, 0, 1)``, ``e2 = xx - 2 XP + pp - 2 t proj + t^2 uu``.

    Args:
        x_ptr, sx_ptr, st_ptr, C, D, stride_x_b, BLOCK_*, INPUT_PRECISION: as ``_lm2_fwd_kernel``.
        rows, cls, rmask, cmask: the tile's rows and classes and which of them exist.
        xx: the rows' ``|x|^2``. xu: the layout of ``sx`` (``_lm2_prep_kernel``).
        sx_c0: the first class ``sx`` holds (0: every class; the backward: its chunk's first).
    """
    xp = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xq = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    prow = sx_ptr + (cls - sx_c0).to(tl.int64)[:, None] * (2 * D)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        xt = tl.load(xrow + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        cm = cmask[:, None] & dmask[None, :]
        p = tl.load(prow + offs_d[None, :], mask=cm, other=0.0)
        q = tl.load(prow + D + offs_d[None, :], mask=cm, other=0.0)
        xp = tl.dot(xt, tl.trans(p), xp, input_precision=INPUT_PRECISION)
        xq = tl.dot(xt, tl.trans(q), xq, input_precision=INPUT_PRECISION)
    pp = tl.load(st_ptr + cls, mask=cmask, other=0.0)
    pu = tl.load(st_ptr + C + cls, mask=cmask, other=0.0)
    uu = tl.load(st_ptr + 2 * C + cls, mask=cmask, other=0.0)
    inv = tl.load(st_ptr + 3 * C + cls, mask=cmask, other=0.0)
    proj = xq - (1.0 - xu) * xp - pu[None, :]
    # a NaN t (NaN in x, p or u) need not survive the clamp: e2 is then NaN through proj, xx, xp or
    # uu anyway, and the plain clamp folds into the product (mul.sat: 128 SASS instructions fewer
    # per bf16 fwd2 tile than a NaN-keeping clamp)
    t = tl.minimum(tl.maximum(proj * inv[None, :], 0.0), 1.0)
    e2 = xx[:, None] - 2.0 * xp + pp[None, :] - 2.0 * t * proj + t * t * uu[None, :]
    return t, e2


@triton.jit
def _lm2_fwd_kernel(x_ptr, sx_ptr, label_ptr, rs_ptr, st_ptr, m_ptr, s_ptr,
                    B, C, D, stride_x_b, nsplit, alpha, eps, lambda_pull, xu, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    LSE: tl.constexpr):
    """Online logsumexp over the class tiles of split ``pid(1)`` (split s owns tiles
    ``[s T / nsplit, (s + 1) T / nsplit)`` of the ``T = cdiv(C, BLOCK_C)``) for row tile ``pid(0)``.

    ``logit_ic = base_i - alpha delta_ic``, ``base_i = alpha (delta_iy + m_i)``, masked for
    ``c == y_i`` and padding; running ``(M, S)`` from ``(0, 0)``; writes ``m[split, i]``,
    ``s[split, i]``. With ``LSE`` (one split, ``DAAL_LAUNCHES=merged``) writes what
    ``_lm2_lse_kernel`` would, ``lse_i = M + log(e^-M + S)`` and the output, instead (one launch
    fewer; the same arithmetic).

    Args:
        x_ptr: B x D embeddings (unit column stride).
        sx_ptr: C x 2 x D contiguous segments in x's dtype.
        label_ptr: B labels (int64). rs_ptr: 3 x B float32 row statistics (``_lm2_own_kernel``:
            ``delta_iy``, ``|x_i|^2``, ``alpha (delta_iy + m_i)``).
        st_ptr: 4 x C class statistics (``_lm2_prep_kernel``).
        m_ptr, s_ptr: nsplit x B float32 outputs: running max and sum per split (``LSE``: B
            values each, ``lse`` and the operator's output).
        B, C, D: sizes. stride_x_b: row stride of x. nsplit: class splits (grid axis 1).
        alpha: the logit scale. eps: the floor of squared distances. lambda_pull: the pull
            weight (read with ``LSE``). xu: the layout of ``sx`` (``_lm2_prep_kernel``).
        BLOCK_B, BLOCK_C: rows x classes per tile. BLOCK_D: the K step.
        INPUT_PRECISION: ``tl.dot``'s input precision. LSE: see above.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
    base = tl.load(rs_ptr + 2 * B + rows, mask=rmask, other=0.0)
    xx = tl.load(rs_ptr + B + rows, mask=rmask, other=0.0)
    run_m = tl.zeros([BLOCK_B], dtype=tl.float32)
    run_s = tl.zeros([BLOCK_B], dtype=tl.float32)
    ntiles = tl.cdiv(C, BLOCK_C)
    t_start = pid_s * ntiles // nsplit
    t_end = (pid_s + 1) * ntiles // nsplit
    for ct in range(t_start, t_end):
        cls = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cls < C
        t, e2 = _lm2_tile(x_ptr, sx_ptr, st_ptr, rows, cls, rmask, cmask, xx, C, D, stride_x_b, xu, 0,
                          BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
        delta = tl.sqrt(tl.maximum(e2, eps, propagate_nan=tl.PropagateNan.ALL))  # NaN reaches the sum (tl.max skips it)
        valid = cmask[None, :] & (cls[None, :] != lab[:, None])
        logit = tl.where(valid, base[:, None] - alpha * delta, float("-inf"))
        new_m = tl.maximum(run_m, tl.max(logit, 1))
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(logit - new_m[:, None]), 1)
        run_m = new_m
    if LSE:
        d = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
        lse, val = _lse_out(run_m, run_s, d, alpha, lambda_pull)
        tl.store(m_ptr + rows, lse, mask=rmask)
        tl.store(s_ptr + rows, val, mask=rmask)
    else:
        out = pid_s.to(tl.int64) * B + rows
        tl.store(m_ptr + out, run_m, mask=rmask)
        tl.store(s_ptr + out, run_s, mask=rmask)


@triton.jit
def _lse_out(top, rest, d, alpha, lambda_pull):
    """``lse = top + log(exp(-top) + rest)`` (``top = max(0, max_c v_c)``, ``rest = sum_c exp(v_c -
    top)``: the logsumexp over ``{0} U v``) and the operator's output ``lse / alpha + lambda_pull
    d^2``. Where ``top = 0`` (every logit at most 0, the usual case once classes are apart) it is
    ``log1p(rest)``: ``log(1 + rest)`` would round off rest's digits (a line term of 1e-7 read 20%
    off, its gradients 7%)."""
    lse = tl.where(top > 0.0, top + tl.log(tl.exp(-top) + rest), _log1p(rest))
    return lse, lse / alpha + lambda_pull * d * d


@triton.jit
def _lm2_bwd_kernel(x_ptr, sx_ptr, label_ptr, rs_ptr, lse_ptr, go_ptr, st_ptr,
                    ab_ptr, rowp_ptr, colp_ptr, B, C, D, c0, Cc, stride_x_b, alpha, eps, hmax, xu,
                    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """Backward of one chunk of classes ``[c0, c0 + Cc)``, tile ``(pid(0), pid(1))``: the GEMMs of
    the forward once, then with ``h_ic = -grad_out_i exp(logit_ic - lse_i) / delta_ic`` (0 for
    padding, ``c == y_i`` and where the eps clamp binds)::

        a_ic = -h_ic (1 - t_ic),   b_ic = -h_ic t_ic       (cast to x's dtype: a~, b~)

    stored interleaved, ``ab[i, 2 (c - c0) + (0, 1)] = (a~, b~)`` (B x 2Cc), so that with the
    segments' own interleaved rows ``[p_c; q_c]`` two plain GEMMs finish the gradients::

        dX_i  = -(sum_c a~ + b~) x_i + [AB  [P; Q]]_i
        dP_c  = [A~^T X]_c - (sum_i a~ (1 - t)) p_c - (sum_i a~ t) q_c
        dQ_c  = [B~^T X]_c - (sum_i b~ (1 - t)) p_c - (sum_i b~ t) q_c

    (docs/method.md "Gradients": ``dX_i = sum_c h (x_i - c_ic)``, ``c_ic = (1 - t) p_c + t q_c``,
    ``dP_c = -sum_i h (1 - t)(x_i - c_ic)``, ``dQ_c = -sum_i h t (x_i - c_ic)``; the sums are taken
    of the rounded a~, b~, so the identities hold for the values the GEMMs see). Writes the row
    partial ``rowp[pid(1), i] = -sum_c (a~ + b~)`` and the column partials
    ``colp[pid(0), 0..3, c - c0]`` (the four sums above); no accumulator leaves the program.

    Args:
        x_ptr, label_ptr, rs_ptr, st_ptr: as ``_lm2_fwd_kernel``.
        sx_ptr: the chunk's rows of ``sx`` (classes ``[c0, c0 + Cc)``, contiguous, x's dtype): of
            the forward's copy, or of the chunk's own (``DAAL_LM_COPY=chunks``).
        lse_ptr: B values ``lse_i`` of the forward. go_ptr: B incoming gradients (float32).
        ab_ptr: B x 2Cc output in x's dtype (contiguous). rowp_ptr: cdiv(Cc, BLOCK_C) x B
        float32. colp_ptr: cdiv(B, BLOCK_B) x 4 x Cc float32.
        B, C, D: sizes. c0, Cc: the chunk's first class and its width. stride_x_b: row stride of x.
        alpha: the logit scale. eps: the floor of squared distances. hmax: the clamp of a, b
        before the cast to x's dtype (6e4 for float16). xu: the layout of ``sx``
        (``_lm2_prep_kernel``): with 1, ``ab`` holds ``(a~ + b~, b~)``, the coefficients of
        ``[p_c; u_c]`` (the sums below are of the implied ``a~``).
        BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION: as ``_lm2_fwd_kernel``.
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lcls = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cls = c0 + lcls
    cmask = (lcls < Cc) & (cls < C)
    lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
    base = tl.load(rs_ptr + 2 * B + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
    xx = tl.load(rs_ptr + B + rows, mask=rmask, other=0.0)
    t, e2 = _lm2_tile(x_ptr, sx_ptr, st_ptr, rows, cls, rmask, cmask, xx, C, D, stride_x_b, xu, c0,
                      BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
    delta = tl.sqrt(tl.maximum(e2, eps, propagate_nan=tl.PropagateNan.ALL))
    # 0 where the floor binds; a NaN e2 keeps its NaN (not `e2 >= eps`, false for NaN)
    valid = rmask[:, None] & cmask[None, :] & (cls[None, :] != lab[:, None]) & ~(e2 < eps)
    w = tl.exp(tl.where(valid, base[:, None] - alpha * delta - lse[:, None], 0.0))
    hn = tl.where(valid, go[:, None] * w / delta, 0.0)  # -h
    xdt = x_ptr.dtype.element_ty
    # the coefficients of [p; v] (v = sx[:, 1]): xu = 1, [-h, -h t] (-h (p + t u)); xu = 0,
    # [-h (1 - t), -h t] (-h ((1 - t) p + t q)); af below is p's coefficient in the second form
    a = tl.clamp(hn * (1.0 - (1.0 - xu) * t), -hmax, hmax, propagate_nan=tl.PropagateNan.ALL).to(xdt)
    b = tl.clamp(hn * t, -hmax, hmax, propagate_nan=tl.PropagateNan.ALL).to(xdt)
    bf = b.to(tl.float32)
    af = a.to(tl.float32) - xu * bf
    ab = tl.reshape(tl.join(a, b), (BLOCK_B, 2 * BLOCK_C))
    col2 = pid_c * (2 * BLOCK_C) + tl.arange(0, 2 * BLOCK_C)
    c2mask = (col2 // 2 < Cc) & (c0 + col2 // 2 < C)
    tl.store(ab_ptr + rows.to(tl.int64)[:, None] * (2 * Cc) + col2[None, :], ab,
             mask=rmask[:, None] & c2mask[None, :])
    tl.store(rowp_ptr + pid_c.to(tl.int64) * B + rows, -tl.sum(af + bf, 1), mask=rmask)
    cp = colp_ptr + pid_b.to(tl.int64) * 4 * Cc + lcls
    tl.store(cp, tl.sum(af * (1.0 - t), 0), mask=cmask)
    tl.store(cp + Cc, tl.sum(af * t, 0), mask=cmask)
    tl.store(cp + 2 * Cc, tl.sum(bf * (1.0 - t), 0), mask=cmask)
    tl.store(cp + 3 * Cc, tl.sum(bf * t, 0), mask=cmask)


@triton.jit
def _lm2_dseg_kernel(g_ptr, seg_ptr, colp_ptr, out_ptr, label_ptr, own_ptr, next_ptr, slot_ptr,
                     n, D, Cc, R, B, c0,
                     stride_seg_c, stride_seg_v, stride_seg_d,
                     stride_out_c, stride_out_v, stride_out_d, xu,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, HAS_OWN: tl.constexpr):
    """dP, dQ of the ``n`` classes of a chunk from ``G = AB^T X`` (2n x D float32: rows
    ``2c, 2c + 1`` = ``[A~^T X]_c``, ``[B~^T X]_c``) and the column partials of the ``R`` row tiles
    (summed here in a fixed order: deterministic)::

        dP_c = G[2c] - s0 p_c - s1 q_c + sum_{i: y_i = c} own_i[0]
        dQ_c = G[2c + 1] - s2 p_c - s3 q_c + sum_{i: y_i = c} own_i[1]

    written once, in the segments' dtype (no float32 gradient copy, one rounding). With
    ``HAS_OWN`` the own-class rows ``own_i`` (``_lm2_ownseg_kernel``) of the class's samples are
    added in row order: the class's first row is ``slot[c]`` when ``labels[slot[c]] == c`` (the
    slot map is never initialised: any other value means "no sample of c"), then ``next[i]``
    until -1. Deterministic: no atomics.

    Args:
        g_ptr: 2n x D float32 (contiguous). seg_ptr: the chunk's segments (any float dtype).
        colp_ptr: R x 4 x Cc float32 partials (``_lm2_bwd_kernel``). out_ptr: the chunk's rows of
        the segment gradient (segments' dtype).
        label_ptr: B int64 labels. own_ptr: B x 3 x D float32 own-class rows (contiguous; rows 0
        and 1 are dP, dQ).
        next_ptr: B int32, the next row of the same label (-1: none). slot_ptr: C int32 (global
        class index), the first row of each present class (``HAS_OWN`` only, all four).
        n, D: classes in the chunk, features. Cc: the partials' row length. R: row tiles.
        B: rows. c0: the chunk's first class.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments.
        stride_out_c, stride_out_v, stride_out_d: strides of the gradient.
        xu: the layout of ``sx`` the GEMMs read (``_lm2_prep_kernel``): with 1, G's rows are
        ``[(A~ + B~)^T X]_c``, ``[B~^T X]_c``.
        BLOCK_C: classes per program. BLOCK_D: D-chunk. HAS_OWN: add the own-class rows (else the
        launcher adds them with atomics: ``DAAL_LM_OWN_SEG=atomic``).
    """
    _dseg_classes(tl.program_id(0), g_ptr, seg_ptr, colp_ptr, out_ptr, label_ptr, own_ptr, next_ptr,
                  slot_ptr, n, D, Cc, R, B, c0, stride_seg_c, stride_seg_v, stride_seg_d,
                  stride_out_c, stride_out_v, stride_out_d, xu, BLOCK_C, BLOCK_D, HAS_OWN)


@triton.jit
def _dseg_classes(pid, g_ptr, seg_ptr, colp_ptr, out_ptr, label_ptr, own_ptr, next_ptr, slot_ptr,
                  n, D, Cc, R, B, c0, stride_seg_c, stride_seg_v, stride_seg_d,
                  stride_out_c, stride_out_v, stride_out_d, xu,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, HAS_OWN: tl.constexpr):
    """``_lm2_dseg_kernel``'s program ``pid`` (the chunk's classes ``[pid BLOCK_C, (pid + 1) BLOCK_C)``)."""
    lc = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = lc < n
    s0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(0, R):
        cp = colp_ptr + r * 4 * Cc + lc
        s0 += tl.load(cp, mask=cmask, other=0.0)
        s1 += tl.load(cp + Cc, mask=cmask, other=0.0)
        s2 += tl.load(cp + 2 * Cc, mask=cmask, other=0.0)
        s3 += tl.load(cp + 3 * Cc, mask=cmask, other=0.0)
    grow = g_ptr + lc.to(tl.int64)[:, None] * (2 * D)
    srow = seg_ptr + lc.to(tl.int64)[:, None] * stride_seg_c
    orow = out_ptr + lc.to(tl.int64)[:, None] * stride_out_c
    odt = out_ptr.dtype.element_ty
    head = tl.full([BLOCK_C], -1, dtype=tl.int32)
    if HAS_OWN:  # the class's first row, if the (uninitialised) slot map holds a valid one
        r = tl.load(slot_ptr + c0 + lc, mask=cmask, other=-1)
        ok = cmask & (r >= 0) & (r < B)
        lr = tl.load(label_ptr + r, mask=ok, other=-1)
        head = tl.where(ok & (lr == c0 + lc), r, -1)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        m = cmask[:, None] & (offs_d[None, :] < D)
        od = offs_d.to(tl.int64)[None, :]
        p = tl.load(srow + od * stride_seg_d, mask=m, other=0.0).to(tl.float32)
        q = tl.load(srow + stride_seg_v + od * stride_seg_d, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(grow + D + od, mask=m, other=0.0)
        # xu = 1: G's rows are [(A~ + B~)^T X]_c, [B~^T X]_c
        gp = tl.load(grow + od, mask=m, other=0.0) - xu * gv - s0[:, None] * p - s1[:, None] * q
        gq = gv - s2[:, None] * p - s3[:, None] * q
        if HAS_OWN:  # walk each class's rows (most classes of a large C have none: no step)
            r = head
            while tl.max(r, 0) >= 0:
                live = r >= 0
                m3 = live[:, None] & m
                own = own_ptr + r.to(tl.int64)[:, None] * (3 * D) + od
                gp += tl.load(own, mask=m3, other=0.0)
                gq += tl.load(own + D, mask=m3, other=0.0)
                r = tl.load(next_ptr + r, mask=live, other=-1)
        tl.store(orow + od * stride_out_d, gp.to(odt), mask=m)
        tl.store(orow + stride_out_v + od * stride_out_d, gq.to(odt), mask=m)


@triton.jit
def _own_chunk(xrow, prow, qrow, rmask, dd, D):
    """One D-chunk ``dd`` of the rows' ``x``, own ``p`` and ``u = q - p`` (float32), and its mask."""
    m2 = rmask[:, None] & (dd[None, :] < D)
    x = tl.load(xrow + dd[None, :], mask=m2, other=0.0).to(tl.float32)
    p = tl.load(prow + dd[None, :], mask=m2, other=0.0).to(tl.float32)
    u = tl.load(qrow + dd[None, :], mask=m2, other=0.0).to(tl.float32) - p
    return x, p, u, m2


@triton.jit
def _own_geometry(xrow, prow, qrow, rmask, D, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row of a block: ``a = (x - p).u``, ``uu = |u|^2``, ``t = clamp(a / max(uu, eps), 0, 1)``
    and, in a second pass, ``e2 = |x - p - t u|^2``, ``eu = (x - p - t u).u``, ``xx = |x|^2`` (the
    direct form of the own-class distance, float32; ``p``, ``q`` are the rows' own segments)."""
    a = tl.zeros([BLOCK_B], dtype=tl.float32)
    uu = tl.zeros([BLOCK_B], dtype=tl.float32)
    xx = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, p, u, _m = _own_chunk(xrow, prow, qrow, rmask, d0 + tl.arange(0, BLOCK_D), D)
        a += tl.sum((x - p) * u, 1)
        uu += tl.sum(u * u, 1)
        xx += tl.sum(x * x, 1)
    b = tl.maximum(uu, 1e-12, propagate_nan=tl.PropagateNan.ALL)
    tt = a / b
    t = tl.minimum(tl.maximum(tt, 0.0), 1.0)  # NaN: e below is NaN through x - p or u anyway
    e2 = tl.zeros([BLOCK_B], dtype=tl.float32)
    eu = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, p, u, _m = _own_chunk(xrow, prow, qrow, rmask, d0 + tl.arange(0, BLOCK_D), D)
        e = x - p - t[:, None] * u
        e2 += tl.sum(e * e, 1)
        eu += tl.sum(e * u, 1)
    return a, uu, b, tt, t, e2, eu, xx


@triton.jit
def _lm2_own_kernel(x_ptr, seg_ptr, label_ptr, m_ptr, rs_ptr, B, D,
                    stride_x_b, stride_seg_c, stride_seg_v, alpha, eps,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The own-class distance by direct differences (docs/method.md, "Numerics") and the row
    inputs of the forward kernel::

        d_i = sqrt(max(|x_i - p_y - t u_y|^2, eps)),  xx_i = |x_i|^2,  base_i = alpha (d_i + m_i)

    Args:
        x_ptr: B x D embeddings (unit column stride). seg_ptr: C x 2 x D segments (unit feature
            stride, any float dtype). label_ptr: B int64 labels in ``[0, C)``.
        m_ptr: B float32 margins. rs_ptr: 3 x B float32 output (``d``, ``xx``, ``base``).
        B, D: sizes. stride_x_b: row stride of x. stride_seg_c, stride_seg_v: class and p/q
            strides of the segments. alpha: the logit scale. eps: the floor of squared distances.
        BLOCK_B: rows per program. BLOCK_D: D-chunk.
    """
    _own_distance_rows(tl.program_id(0), x_ptr, seg_ptr, label_ptr, m_ptr, rs_ptr, B, D, stride_x_b,
                       stride_seg_c, stride_seg_v, alpha, eps, BLOCK_B, BLOCK_D)


@triton.jit
def _own_distance_rows(pid, x_ptr, seg_ptr, label_ptr, m_ptr, rs_ptr, B, D, stride_x_b, stride_seg_c,
                       stride_seg_v, alpha, eps, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """``_lm2_own_kernel``'s program ``pid`` (the rows ``[pid BLOCK_B, (pid + 1) BLOCK_B)``)."""
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lab = tl.load(label_ptr + rows, mask=rmask, other=0)
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    prow = seg_ptr + lab[:, None] * stride_seg_c
    _, _, _, _, _, e2, _, xx = _own_geometry(xrow, prow, prow + stride_seg_v, rmask, D, BLOCK_B, BLOCK_D)
    d = tl.sqrt(tl.maximum(e2, eps, propagate_nan=tl.PropagateNan.ALL))
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    tl.store(rs_ptr + rows, d, mask=rmask)
    tl.store(rs_ptr + B + rows, xx, mask=rmask)
    tl.store(rs_ptr + 2 * B + rows, alpha * (d + m), mask=rmask)


@triton.jit
def _lm2_own_prep_kernel(x_ptr, seg_ptr, label_ptr, m_ptr, rs_ptr, sx_ptr, st_ptr, B, C, D,
                         stride_x_b, stride_seg_c, stride_seg_v, alpha, eps, row_programs, xu,
                         BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                         CAST: tl.constexpr):
    """``_lm2_own_kernel`` and ``_lm2_prep_kernel`` in one launch (they are independent): programs
    ``[0, row_programs)`` compute the own-class rows of ``BLOCK_B`` samples each, the others the
    class statistics of ``BLOCK_C`` classes each (``DAAL_LAUNCHES=merged``, the default).

    Args:
        x_ptr, seg_ptr, label_ptr, m_ptr, rs_ptr, B, D, stride_x_b,
            stride_seg_c, stride_seg_v, alpha, eps, BLOCK_B: as ``_lm2_own_kernel``.
        sx_ptr, st_ptr, C, BLOCK_C, CAST, xu: as ``_lm2_prep_kernel`` (the segments' feature stride is
            1, as ``_lm2_own_kernel`` requires).
        row_programs: ``cdiv(B, BLOCK_B)``. BLOCK_D: the D-chunk of both.
    """
    pid = tl.program_id(0)
    if pid < row_programs:
        _own_distance_rows(pid, x_ptr, seg_ptr, label_ptr, m_ptr, rs_ptr, B, D, stride_x_b,
                           stride_seg_c, stride_seg_v, alpha, eps, BLOCK_B, BLOCK_D)
    else:
        _class_stats(pid - row_programs, seg_ptr, sx_ptr, st_ptr, C, D, stride_seg_c, stride_seg_v, 1,
                     xu, BLOCK_C, BLOCK_D, CAST)


@triton.jit
def _lm2_lse_kernel(m_ptr, s_ptr, dpos_ptr, lse_ptr, out_ptr, B, nsplit, alpha, lambda_pull,
                    BLOCK_B: tl.constexpr):
    """The splits' running ``(max, sum)`` merged: ``lse_i = log(e^0 + sum_s s_si e^{m_si})``
    (every ``m_si >= 0``: the running max starts at the ``{0}`` element; ``log1p`` of the sum where
    every ``m_si = 0``, see ``_lse_out``), and the operator's
    output ``out_i = lse_i / alpha + lambda_pull d_i^2``.

    Args:
        m_ptr, s_ptr: nsplit x B float32 partials (``_lm2_fwd_kernel``). dpos_ptr: B own-class
            distances. lse_ptr, out_ptr: B float32 outputs.
        B: rows. nsplit: the splits. alpha: the logit scale. lambda_pull: the pull weight.
        BLOCK_B: rows per program.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    top = tl.zeros([BLOCK_B], dtype=tl.float32)
    for s in range(0, nsplit):
        top = tl.maximum(top, tl.load(m_ptr + s * B + rows, mask=rmask, other=0.0))
    rest = tl.zeros([BLOCK_B], dtype=tl.float32)
    for s in range(0, nsplit):
        m = tl.load(m_ptr + s * B + rows, mask=rmask, other=0.0)
        rest += tl.load(s_ptr + s * B + rows, mask=rmask, other=0.0) * tl.exp(m - top)
    d = tl.load(dpos_ptr + rows, mask=rmask, other=0.0)
    lse, val = _lse_out(top, rest, d, alpha, lambda_pull)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(out_ptr + rows, val, mask=rmask)


@triton.jit
def _own_coeffs(xrow, prow, qrow, rows, rmask, lse_ptr, go_ptr, dpos_ptr, D, lambda_pull, eps,
                BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The per-row factors of the own-class derivative: with ``g_i = grad_out_i (1 - exp(-lse_i))
    + 2 lambda_pull d_i grad_out_i`` (``d line_i / d d_i``), ``c_i = g_i / d_i`` where
    ``|e_i|^2 >= eps`` (else 0), ``e = x - p - t u``, ``eu = e.u``, ``b = max(|u|^2, eps)``,
    ``tt = (x - p).u / b``, ``s = [0 <= tt <= 1] eu / b`` (the path through t) and ``tt2 = 2 tt``
    where ``|u|^2 >= eps`` (else 0). Returns ``(t, c, s, tt2)``."""
    _, uu, b, tt, t, e2, eu, _ = _own_geometry(xrow, prow, qrow, rmask, D, BLOCK_B, BLOCK_D)
    go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    d = tl.load(dpos_ptr + rows, mask=rmask, other=1.0)
    g = go * _one_minus_exp_neg(lse) + 2.0 * lambda_pull * d * go
    c = tl.where(rmask & ~(e2 < eps), g / d, 0.0)  # a NaN e2 keeps its NaN
    s = tl.where((tt >= 0.0) & (tt <= 1.0), eu / b, 0.0)
    tt2 = tl.where(~(uu < eps), 2.0 * tt, 0.0)
    return t, c, s, tt2


@triton.jit
def _own_terms(x, p, u, t, c, s, tt2):
    """One D-chunk of the own-class terms of dX and of the own segment's dP, dQ
    (``_own_coeffs``' factors; the exact derivative of ``d = sqrt(max(|e|^2, eps))``)::

        dX_i += c (e - s u)
        dP_y += c (-(1 - t) e + s (u + w)),   dQ_y += c (-t e - s w),   w = x - p - tt2 u

    (``tt2 = 2 tt``, or 0 where ``|u|^2 < eps``: ``_own_coeffs``.)
    """
    xp = x - p
    e = xp - t[:, None] * u
    w = xp - tt2[:, None] * u
    gx = c[:, None] * (e - s[:, None] * u)
    gp = c[:, None] * (-(1.0 - t[:, None]) * e + s[:, None] * (u + w))
    gq = c[:, None] * (-t[:, None] * e - s[:, None] * w)
    return gx, gp, gq


@triton.jit
def _lm2_ownseg_kernel(x_ptr, seg_ptr, label_ptr, lse_ptr, go_ptr, dpos_ptr, own_ptr, next_ptr,
                       slot_ptr, B, C, D, stride_x_b, stride_seg_c, stride_seg_v, lambda_pull, eps,
                       BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """The own-class terms of the gradients, per sample, and the lists that let
    ``_lm2_dseg_kernel`` sum the segment rows per class without atomics::

        own_i = (dP_y, dQ_y, dX_i) own-class terms of sample i (``_own_terms``; B x 3 x D float32;
                _lm2_finish_kernel adds dX_i: the own geometry is computed once per backward)
        next_i = min {j > i : y_j = y_i}  (-1 if none)
        slot[y_i] = i  where i = min {j : y_j = y_i}  (one writer per class)

    The lists cost O(B^2) label compares (B = 1024: 1M, a few microseconds) and nothing of size C
    but the C int32 slot map, which is never initialised (the reader validates a slot by
    ``labels[slot[c]] == c``: no fill launch).

    Args:
        x_ptr, seg_ptr, label_ptr: as ``_lm2_own_kernel``. lse_ptr, go_ptr, dpos_ptr: B float32
            (``lse``, incoming gradient, own-class distance).
        own_ptr: B x 3 x D float32 output (contiguous). next_ptr: B int32 output. slot_ptr: C int32.
        B, C, D: sizes. stride_x_b, stride_seg_c, stride_seg_v: as ``_lm2_own_kernel``.
        lambda_pull, eps: as the forward. BLOCK_B: rows per program. BLOCK_J: labels compared per
        step. BLOCK_D: D-chunk.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    lab = tl.load(label_ptr + rows, mask=rmask, other=0)
    first = tl.full([BLOCK_B], B, dtype=tl.int32)
    nxt = tl.full([BLOCK_B], B, dtype=tl.int32)
    for j0 in range(0, B, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        lj = tl.load(label_ptr + js, mask=js < B, other=0)
        same = (lab[:, None] == lj[None, :]) & (js[None, :] < B)
        first = tl.minimum(first, tl.min(tl.where(same, js[None, :], B), 1))
        nxt = tl.minimum(nxt, tl.min(tl.where(same & (js[None, :] > rows[:, None]), js[None, :], B), 1))
    tl.store(next_ptr + rows, tl.where(nxt < B, nxt, -1), mask=rmask)
    tl.store(slot_ptr + lab, rows, mask=rmask & (first == rows) & (lab >= 0) & (lab < C))
    xrow = x_ptr + rows64[:, None] * stride_x_b
    prow = seg_ptr + lab[:, None] * stride_seg_c
    qrow = prow + stride_seg_v
    t, c, s, tt2 = _own_coeffs(xrow, prow, qrow, rows, rmask, lse_ptr, go_ptr, dpos_ptr, D,
                               lambda_pull, eps, BLOCK_B, BLOCK_D)
    orow = own_ptr + rows64[:, None] * (3 * D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x, p, u, m2 = _own_chunk(xrow, prow, qrow, rmask, dd, D)
        gx, gp, gq = _own_terms(x, p, u, t, c, s, tt2)
        tl.store(orow + dd[None, :], gp, mask=m2)
        tl.store(orow + D + dd[None, :], gq, mask=m2)
        tl.store(orow + 2 * D + dd[None, :], gx, mask=m2)


@triton.jit
def _lm2_finish_kernel(acc_ptr, rowp_ptr, x_ptr, seg_ptr, label_ptr, lse_ptr, go_ptr, dpos_ptr,
                       own_ptr, gx_ptr, gseg_ptr, B, D, R, stride_x_b, stride_seg_c, stride_seg_v,
                       stride_gseg_c, stride_gseg_v, alpha, lambda_pull, eps,
                       BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr):
    """dX of the line margin: the GEMM part ``acc_i + (sum_r rowp_ri) x_i`` plus the own-class
    term ``c_i (e - s u)`` (``_own_terms``, direct differences), read from the rows
    ``_lm2_ownseg_kernel`` wrote. ``ATOMIC`` (``DAAL_LM_OWN_SEG=atomic``, the design before the
    class lists, which has no such rows): computes the own geometry here (``_own_coeffs``) and
    also adds the own classes' dP, dQ rows into the float32 segment gradient with atomics.

    Args:
        acc_ptr: B x D float32 ``[AB [P; Q]]`` (contiguous). rowp_ptr: R x B float32 row partials.
        x_ptr, seg_ptr, label_ptr: as ``_lm2_own_kernel``. lse_ptr, go_ptr, dpos_ptr: B float32.
        own_ptr: B x 3 x D float32 own-class terms (``_lm2_ownseg_kernel``; not read with ATOMIC).
        gx_ptr: B x D output in x's dtype (contiguous). gseg_ptr: C x 2 x D float32 (ATOMIC).
        B, D, R: sizes. stride_x_b, stride_seg_c, stride_seg_v: as ``_lm2_own_kernel``.
        stride_gseg_c, stride_gseg_v: strides of gseg (class, p/q).
        alpha, lambda_pull, eps: as the forward. BLOCK_B: rows per program. BLOCK_D: D-chunk.
        ATOMIC: see above.
    """
    _finish_rows(tl.program_id(0), acc_ptr, rowp_ptr, x_ptr, seg_ptr, label_ptr, lse_ptr, go_ptr,
                 dpos_ptr, own_ptr, gx_ptr, gseg_ptr, B, D, R, stride_x_b, stride_seg_c, stride_seg_v,
                 stride_gseg_c, stride_gseg_v, alpha, lambda_pull, eps, BLOCK_B, BLOCK_D, ATOMIC)


@triton.jit
def _finish_rows(pid, acc_ptr, rowp_ptr, x_ptr, seg_ptr, label_ptr, lse_ptr, go_ptr, dpos_ptr,
                 own_ptr, gx_ptr, gseg_ptr, B, D, R, stride_x_b, stride_seg_c, stride_seg_v,
                 stride_gseg_c, stride_gseg_v, alpha, lambda_pull, eps,
                 BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr):
    """``_lm2_finish_kernel``'s program ``pid`` (the rows ``[pid BLOCK_B, (pid + 1) BLOCK_B)``)."""
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    xrow = x_ptr + rows64[:, None] * stride_x_b
    if ATOMIC:
        lab = tl.load(label_ptr + rows, mask=rmask, other=0)
        prow = seg_ptr + lab[:, None] * stride_seg_c
        qrow = prow + stride_seg_v
        t, c, s, tt2 = _own_coeffs(xrow, prow, qrow, rows, rmask, lse_ptr, go_ptr, dpos_ptr, D,
                                   lambda_pull, eps, BLOCK_B, BLOCK_D)
        grow = gseg_ptr + lab[:, None] * stride_gseg_c
    hr = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r in range(0, R):
        hr += tl.load(rowp_ptr + r * B + rows, mask=rmask, other=0.0)
    odt = gx_ptr.dtype.element_ty
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        if ATOMIC:
            x, p, u, m2 = _own_chunk(xrow, prow, qrow, rmask, dd, D)
            own, gp, gq = _own_terms(x, p, u, t, c, s, tt2)
            tl.atomic_add(grow + dd[None, :], gp, mask=m2)
            tl.atomic_add(grow + stride_gseg_v + dd[None, :], gq, mask=m2)
        else:
            m2 = rmask[:, None] & (dd[None, :] < D)
            x = tl.load(xrow + dd[None, :], mask=m2, other=0.0).to(tl.float32)
            own = tl.load(own_ptr + rows64[:, None] * (3 * D) + 2 * D + dd[None, :], mask=m2, other=0.0)
        acc = tl.load(acc_ptr + rows64[:, None] * D + dd[None, :], mask=m2, other=0.0)
        gx = acc + hr[:, None] * x + own
        tl.store(gx_ptr + rows64[:, None] * D + dd[None, :], gx.to(odt), mask=m2)


@triton.jit
def _lm2_dseg_finish_kernel(g_ptr, seg_ptr, colp_ptr, out_ptr, label_ptr, own_ptr, next_ptr, slot_ptr,
                            acc_ptr, rowp_ptr, x_ptr, gx_ptr, n, D, Cc, R, B, c0, Rf, stride_x_b,
                            stride_seg_c, stride_seg_v, stride_out_c, stride_out_v, class_programs, xu,
                            BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """The last chunk's ``_lm2_dseg_kernel`` and ``_lm2_finish_kernel`` in one launch (with the
    class lists they are independent; ``DAAL_LAUNCHES=merged``, the default): programs
    ``[0, class_programs)`` write dP, dQ of ``BLOCK_C`` classes each, the others dX of
    ``BLOCK_B`` rows each.

    Args:
        g_ptr, seg_ptr, colp_ptr, out_ptr, label_ptr, own_ptr, next_ptr, slot_ptr, n, D, Cc, R, B,
            c0, stride_seg_c, stride_seg_v, stride_out_c, stride_out_v, BLOCK_C: as
            ``_lm2_dseg_kernel`` (``HAS_OWN``; unit feature strides).
        acc_ptr, rowp_ptr, x_ptr, gx_ptr, stride_x_b, BLOCK_B: as ``_lm2_finish_kernel`` (not
            ``ATOMIC``); Rf: its row partials (its ``R``).
        class_programs: ``cdiv(n, BLOCK_C)``. xu: as ``_lm2_dseg_kernel``. BLOCK_D: the D-chunk of both.
    """
    pid = tl.program_id(0)
    if pid < class_programs:
        _dseg_classes(pid, g_ptr, seg_ptr, colp_ptr, out_ptr, label_ptr, own_ptr, next_ptr, slot_ptr,
                      n, D, Cc, R, B, c0, stride_seg_c, stride_seg_v, 1, stride_out_c, stride_out_v, 1,
                      xu, BLOCK_C, BLOCK_D, True)
    else:  # the lists' dX rows read nothing of the segments, the incoming gradient or the scalars
        _finish_rows(pid - class_programs, acc_ptr, rowp_ptr, x_ptr, seg_ptr, label_ptr, rowp_ptr,
                     rowp_ptr, rowp_ptr, own_ptr, gx_ptr, g_ptr, B, D, Rf, stride_x_b, 0, 0, 0, 0,
                     0.0, 0.0, 0.0, BLOCK_B, BLOCK_D, False)


KERNELS: Dict[str, KernelSpec] = {
    "prep2": KernelSpec(
        _lm2_prep_kernel, "seg_ptr: *seg; sx_ptr: *x; st_ptr: *fp32; C D: i32; "
        "stride_seg_c stride_seg_v stride_seg_d: i32; xu: fp32",
        unit=("stride_seg_d",), rows=("stride_seg_c", "stride_seg_v"), gemm=False),
    "fwd2": KernelSpec(
        _lm2_fwd_kernel, "x_ptr sx_ptr: *x; label_ptr: *i64; rs_ptr st_ptr m_ptr s_ptr: "
        "*fp32; B C D: i32; stride_x_b: i32; nsplit: i32; alpha eps lambda_pull xu: fp32",
        rows=("stride_x_b",)),
    "bwd2": KernelSpec(
        _lm2_bwd_kernel, "x_ptr sx_ptr: *x; label_ptr: *i64; rs_ptr lse_ptr go_ptr "
        "st_ptr: *fp32; ab_ptr: *x; rowp_ptr colp_ptr: *fp32; B C D c0 Cc: i32; stride_x_b: i32; "
        "alpha eps hmax xu: fp32", rows=("stride_x_b",)),
    "dseg2": KernelSpec(
        _lm2_dseg_kernel, "g_ptr: *fp32; seg_ptr: *seg; colp_ptr: *fp32; out_ptr: *seg; "
        "label_ptr: *i64; own_ptr: *fp32; next_ptr slot_ptr: *i32; "
        "n D Cc R B c0: i32; stride_seg_c stride_seg_v stride_seg_d: i32; "
        "stride_out_c stride_out_v stride_out_d: i32; xu: fp32",
        unit=("stride_seg_d", "stride_out_d"),
        rows=("stride_seg_c", "stride_seg_v", "stride_out_c", "stride_out_v"), gemm=False),
    "own2": KernelSpec(
        _lm2_own_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; m_ptr rs_ptr: "
        "*fp32; B D: i32; stride_x_b stride_seg_c stride_seg_v: i32; alpha eps: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v"), gemm=False),
    "lse2": KernelSpec(
        _lm2_lse_kernel, "m_ptr s_ptr dpos_ptr lse_ptr out_ptr: *fp32; B nsplit: i32; "
        "alpha lambda_pull: fp32", gemm=False),
    "ownseg2": KernelSpec(
        _lm2_ownseg_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; lse_ptr go_ptr dpos_ptr: *fp32; "
        "own_ptr: *fp32; next_ptr slot_ptr: *i32; B C D: i32; "
        "stride_x_b stride_seg_c stride_seg_v: i32; lambda_pull eps: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v"), gemm=False),
    "finish2": KernelSpec(
        _lm2_finish_kernel, "acc_ptr rowp_ptr: *fp32; x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; "
        "lse_ptr go_ptr dpos_ptr own_ptr: *fp32; gx_ptr: *x; gseg_ptr: *fp32; B D R: i32; "
        "stride_x_b stride_seg_c stride_seg_v stride_gseg_c stride_gseg_v: i32; "
        "alpha lambda_pull eps: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v", "stride_gseg_c", "stride_gseg_v"), gemm=False),
    # DAAL_LAUNCHES=merged (the default): two independent kernels in one launch each
    "ownprep2": KernelSpec(
        _lm2_own_prep_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; m_ptr rs_ptr: *fp32; "
        "sx_ptr: *x; st_ptr: *fp32; B C D: i32; stride_x_b stride_seg_c stride_seg_v: i32; "
        "alpha eps: fp32; row_programs: i32; xu: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v"), gemm=False),
    "dsegfin2": KernelSpec(
        _lm2_dseg_finish_kernel, "g_ptr: *fp32; seg_ptr: *seg; colp_ptr: *fp32; out_ptr: *seg; "
        "label_ptr: *i64; own_ptr: *fp32; next_ptr slot_ptr: *i32; acc_ptr rowp_ptr: *fp32; "
        "x_ptr gx_ptr: *x; n D Cc R B c0 Rf: i32; stride_x_b stride_seg_c stride_seg_v "
        "stride_out_c stride_out_v: i32; class_programs: i32; xu: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v", "stride_out_c", "stride_out_v"), gemm=False),
}
_HMAX = {torch.float16: 6.0e4, torch.bfloat16: 3.0e38, torch.float32: 3.0e38}


# ----------------------------------------------------------------------------- configurations
def _family_configs(*, prep2, dseg2, fwd2, bwd2, rows, lse2) -> Dict[str, KernelConfig]:
    """One family's entries: ``prep2`` / ``dseg2`` (BLOCK_C, warps, stages, block_d), ``fwd2`` /
    ``bwd2`` (BLOCK_B, BLOCK_C, warps, stages, block_d), and the row kernels (4 warps, one stage):
    ``own2`` / ``finish2`` / ``ownseg2`` from ``rows`` (BLOCK_B, block_d; ``ownseg2`` compares
    4096 labels per step: BLOCK_J = 4096 / BLOCK_B), ``lse2`` (BLOCK_B, no D loop); the merged
    launches ``ownprep2`` (own2 + prep2) and ``dsegfin2`` (dseg2 + finish2) take their parts'
    tiles and the row kernels' D-chunk."""
    out = {}
    for name, (bc, w, st, bd) in (("prep2", prep2), ("dseg2", dseg2)):
        out[name] = KernelConfig({"BLOCK_C": bc}, w, st, bd)
    for name, (bb, bc, w, st, bd) in (("fwd2", fwd2), ("bwd2", bwd2)):
        out[name] = KernelConfig({"BLOCK_B": bb, "BLOCK_C": bc}, w, st, bd)
    for name, (bb, bd) in (("own2", rows), ("finish2", rows), ("lse2", lse2)):  # O(B D) or O(B)
        out[name] = KernelConfig({"BLOCK_B": bb}, 4, 1, None if name == "lse2" else bd)
    bb, bd = rows  # the own-class rows and lists: O(B D + B^2 / BLOCK_J) steps
    out["ownseg2"] = KernelConfig({"BLOCK_B": bb, "BLOCK_J": 4096 // bb}, 4, 1, bd)
    # the merged launches: each part keeps its tile, the D-chunk is the row kernels'
    out["ownprep2"] = KernelConfig({"BLOCK_B": bb, "BLOCK_C": prep2[0]}, 4, 1, bd)
    out["dsegfin2"] = KernelConfig({"BLOCK_B": bb, "BLOCK_C": dseg2[0]}, 4, 1, bd)
    return out


#: ``CONFIGS[family][kernel]``: ``"half"`` (float16/bfloat16 x) and ``"fp32"`` on a GPU;
#: ``"interp"`` only under ``TRITON_INTERPRET=1`` (few, large blocks, BLOCK_D fitted to D: the
#: interpreter's cost is per program and per padded element). Why these sizes: docs/kernels.md.
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "half": _family_configs(prep2=(32, 4, 1, (64, 64)), dseg2=(32, 4, 1, (64, 64)),
                            fwd2=(128, 64, 4, 3, (64, 64)), bwd2=(128, 32, 4, 4, (64, 64)),
                            rows=(16, (64, 64)), lse2=(256, None)),
    "fp32": _family_configs(prep2=(32, 4, 1, (64, 64)), dseg2=(32, 4, 1, (64, 64)),
                            fwd2=(128, 64, 8, 4, (16, 16)), bwd2=(128, 32, 4, 4, (16, 16)),
                            rows=(16, (64, 64)), lse2=(256, None)),
    "interp": _family_configs(prep2=(128, 4, 1, (16, 128)), dseg2=(128, 4, 1, (16, 128)),
                              fwd2=(128, 128, 4, 1, (16, 128)), bwd2=(128, 128, 4, 1, (16, 128)),
                              rows=(64, (16, 256)), lse2=(256, None)),
}
assert set(CONFIGS) - {"interp"} == set(FAMILY_DTYPES)
#: The B x Cc elements of one class chunk of the backward (a~, b~ are 2 B Cc values in x's
#: dtype); the largest temporaries of the backward are O(B Cc).
CHUNK_ELEMENTS = 1 << 24
#: The most class splits of the forward grid.
MAX_SPLITS_V2 = 1024


def _precision(dtype: torch.dtype, *, gpu: bool | None = None, device: torch.device | None = None) -> str:
    """The line margin's ``tl.dot`` input precision: float32 accuracy for float32 inputs whatever
    ``torch.get_float32_matmul_precision()`` says (3xTF32 on a GPU, IEEE under the interpreter).
    "high"/"medium" allow single-pass TF32 (docs/method.md, "Numerics") but do not require it, and
    these kernels do not round their operands to TF32 as a single pass would need. A GPU without
    TF32 (``device`` before sm_80) runs IEEE FMAs."""
    return input_precision(dtype, gpu=gpu, matmul_precision="highest", device=device)


def _gpu_flags(entry: str, dtype: torch.dtype):
    if entry == "prep2":
        return {"CAST": True}
    if entry == "finish2":  # the own-class segment rows by the class lists, or with atomics
        return [{"ATOMIC": False}, {"ATOMIC": True}]  # (DAAL_LM_OWN_SEG=atomic)
    if entry == "dseg2":
        return [{"HAS_OWN": True}, {"HAS_OWN": False}]
    if entry == "ownprep2":
        return {"CAST": True}
    if entry in ("own2", "lse2", "ownseg2", "dsegfin2"):
        return {}
    if entry == "fwd2":  # LSE: one split, the merge in the same launch (DAAL_LAUNCHES=merged)
        prec = _precision(dtype, gpu=True)
        return [{"INPUT_PRECISION": prec, "LSE": False}, {"INPUT_PRECISION": prec, "LSE": True}]
    return {"INPUT_PRECISION": _precision(dtype, gpu=True)}


def launches() -> List[Launch]:
    """Every configuration the launchers of this module can pick on a GPU (compile tests), with
    float32 segments (the dtype of ``DAALLoss``'s parameters)."""
    return expand("line_margin", CONFIGS, KERNELS, _gpu_flags)


# ----------------------------------------------------------------------------- launchers
def wave_split(row_tiles: int, class_tiles: int, sms: int, max_splits: int = MAX_SPLITS_V2) -> int:
    """``_common.wave_split`` with the forward's cap on class splits."""
    return _wave_split(row_tiles, class_tiles, sms, max_splits)


def chunk_classes(B: int, C: int, block_b: int, block_c: int, sms: int,
                  elements: Optional[int] = None) -> int:
    """Cc, the classes per chunk of the backward: a multiple of ``block_c`` with
    ``B Cc <= elements`` (``CHUNK_ELEMENTS``; at least one class tile) and at most ``MAX_GRID_YZ``
    class tiles (the grid's second axis), preferring, among the
    widths down to 3/4 of the largest, one whose grid (row tiles x Cc / block_c) is whole waves
    (narrower chunks would mean more launches: at C = 1M they cost more than a partial wave)."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    most = max(1, elements // max(1, B * block_c))
    # a chunk's class tiles are the backward grid's second axis (at B = 1, C = 3M: 93,720 tiles)
    most = min(most, cdiv(C, block_c), MAX_GRID_YZ)
    rt = cdiv(B, block_b)
    if sms > 1:
        for ct in range(most, max(1, (3 * most) // 4) - 1, -1):
            if (rt * ct) % sms == 0:
                return ct * block_c
    return most * block_c


#: The internal switch of step 5's ``x.u``: "dot" (the default: ``sx`` holds ``[p~, u~]``, so
#: one dot gives ``x.u``, as docs/method.md's GEMM form writes it; ``sx`` is then always a copy)
#: or "difference" (the design the H200 runs of 2026-11-30 and 2026-12-04 timed: ``sx`` holds
#: ``[p~, q~]``, the segments themselves when they are contiguous in x's dtype, and
#: ``x.u = x.q - x.p``: two O(|x||p|) dots whose float32 rounding (~1e-6) is all of ``x.u`` for a
#: segment shorter than ~1e-3, so ``t`` and the split of a segment's gradient between p and q
#: were noise there: 38% off at a length of 1e-4). The same kernels, one runtime scalar apart
#: (``xu``); read by every forward (the backward follows its forward); gpu_check.sh times both.
XU_ENV = "DAAL_LM_XU"
XU_POLICIES = ("dot", "difference")


def xu_dot() -> bool:
    """``DAAL_LM_XU`` is "dot" (the default); ``ValueError`` naming it for another value."""
    return env_choice(XU_ENV, XU_POLICIES) == "dot"


def _copies(seg: torch.Tensor, x_dtype: torch.dtype, xu: bool) -> bool:
    """The GEMMs read a copy ``sx`` of the segments: with ``xu`` (it holds ``u~``), or when the
    segments are not already contiguous in x's dtype."""
    return xu or seg.dtype != x_dtype or not seg.is_contiguous()


def _cast_segments(seg: torch.Tensor, x_dtype: torch.dtype, xu: bool = True
                   ) -> Tuple[torch.Tensor, torch.Tensor, bool]:
    """``(st, sx, cast)``: the 4 x C class statistics (uninitialised), and, where the GEMMs read a
    copy (``cast``, :func:`_copies`), room for it, contiguous in x's dtype (else an empty tensor:
    ``sx`` is ``seg``)."""
    C, _, D = seg.shape
    cast = _copies(seg, x_dtype, xu)
    st = torch.empty(4, C, device=seg.device, dtype=torch.float32)
    sx = torch.empty((C, 2, D) if cast else (0,), device=seg.device, dtype=x_dtype)
    return st, sx, cast


#: The internal switch of the copy ``sx`` between the forward and the backward: "chunks" (the
#: default: where the backward runs more than one class chunk the forward's whole copy is dropped,
#: and the backward rounds each chunk's segments again into a Cc x 2 x D buffer, one launch of
#: ``_lm2_prep_kernel`` per chunk: nothing C x 2 x D in x's dtype is held from the forward to the
#: backward, 205 MB at C = 100k, D = 512 in bfloat16) or "whole" (the forward's copy saved for
#: the backward, as from 2026-12-06's ``[p~, u~]`` until this switch; no GPU has timed either).
#: Read by every forward (the backward follows what it was given); gpu_check.sh times both.
COPY_ENV = "DAAL_LM_COPY"
COPY_POLICIES = ("chunks", "whole")


def copy_policy() -> str:
    """``DAAL_LM_COPY`` (default "chunks"); ``ValueError`` naming it for another value."""
    return env_choice(COPY_ENV, COPY_POLICIES)


def _backward_chunk(x: torch.Tensor, C: int) -> int:
    """Cc, the classes per chunk of the backward of ``x`` (B x D) against C classes."""
    cfg = CONFIGS[config_family(x.dtype)]["bwd2"]
    return chunk_classes(x.shape[0], C, cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"], sm_count(x.device))


def _kept_copy(sx: torch.Tensor, x: torch.Tensor, C: int) -> torch.Tensor:
    """What the forward saves of its copy ``sx`` for the backward: all of it with
    ``DAAL_LM_COPY=whole``, where the backward runs one chunk (the chunk's copy would be as large)
    or where the shapes are symbolic (``torch.compile(dynamic=True)``: no guard on them); else an
    empty tensor, and the backward copies chunk by chunk (:data:`COPY_ENV`)."""
    whole = copy_policy() == "whole"  # read (and checked) on every forward, as the other switches
    if whole or sx.numel() == 0 or not isinstance(x.shape[0], int) or not isinstance(C, int):
        return sx
    if C <= _backward_chunk(x, C):
        return sx
    return sx.new_empty(0)


def _unit_feature_stride(seg: torch.Tensor) -> torch.Tensor:
    return seg if seg.stride(2) == 1 else seg.contiguous()


def forward_splits(row_tiles: int, class_tiles: int, sms: int, merged: bool = True) -> int:
    """The forward's class splits: :func:`wave_split`'s, or, with ``merged``, 1 when that costs at
    most one class tile more (waves x tiles per program): one split needs no merge launch
    (``_lm2_fwd_kernel`` with ``LSE``), which the model counts as one tile."""
    return _wave_split(row_tiles, class_tiles, sms, MAX_SPLITS_V2, 0.0, 1.0 if merged else 0.0)


@torch.library.custom_op("daal_triton::line_margin2", mutates_args=())
def _line_margin2_op(x: torch.Tensor, seg: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor,
                     alpha: float, lambda_pull: float, merged: bool = True, xu: bool = True
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, rs, st, sx)``: the forward: the own-class rows (``rs``: 3 x B, ``d_pos``,
    ``|x|^2``, ``alpha (d_pos + m)``) and the class statistics (``st``: 4 x C, and ``sx``, the
    segments in x's dtype: ``[p~, u~]``, or with ``difference`` ``[p~, q~]`` or empty when they already
    are), the streaming logsumexp, the merge
    of its class splits. ``out_i = lse_i / alpha + lambda_pull d_i^2``. ``merged``
    (``DAAL_LAUNCHES``): two launches (the rows with the statistics, the logsumexp with the merge
    where one split does), else four. ``xu`` (``DAAL_LM_XU=dot``): ``sx`` holds ``[p~, u~]`` (else
    ``[p~, q~]``, :data:`XU_ENV`). ``rs``, ``st``, ``sx`` and ``lse`` go to the backward."""
    cfgs = CONFIGS[config_family(x.dtype)]
    x = x if x.stride(1) == 1 else x.contiguous()
    seg = _unit_feature_stride(seg)
    B, D = x.shape
    C = seg.shape[0]
    rs = torch.empty(3, B, device=x.device, dtype=torch.float32)
    st, sx, cast = _cast_segments(seg, x.dtype, xu)
    m = margins.detach().float().contiguous()
    xuf = 1.0 if xu else 0.0
    if merged and B and C:
        cfg = cfgs["ownprep2"]
        rp = cdiv(B, cfg.blocks["BLOCK_B"])
        _lm2_own_prep_kernel[(rp + cdiv(C, cfg.blocks["BLOCK_C"]),)](
            x, seg, labels, m, rs, sx if cast else seg, st, B, C, D, x.stride(0), seg.stride(0),
            seg.stride(1), float(alpha), EPS, rp, xuf, CAST=cast, **cfg.launch(D))
    else:
        if B:
            cfg = cfgs["own2"]
            _lm2_own_kernel[(cdiv(B, cfg.blocks["BLOCK_B"]),)](
                x, seg, labels, m, rs, B, D, x.stride(0), seg.stride(0), seg.stride(1), float(alpha),
                EPS, **cfg.launch(D))
        if C:
            cfg = cfgs["prep2"]
            _lm2_prep_kernel[(cdiv(C, cfg.blocks["BLOCK_C"]),)](
                seg, sx if cast else seg, st, C, D, seg.stride(0), seg.stride(1), seg.stride(2), xuf,
                CAST=cast, **cfg.launch(D))
    s2 = sx if cast else seg
    cfg = cfgs["fwd2"]
    bb, bc = cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"]
    row_tiles = cdiv(B, bb)
    nsplit = forward_splits(row_tiles, cdiv(C, bc), sm_count(x.device), merged)
    lse = torch.empty(B, device=x.device, dtype=torch.float32)
    out = torch.empty_like(lse)
    if B:
        one = nsplit == 1 and merged
        if one:  # the merge in the same launch: the kernel writes lse and out
            m_part, s_part = lse, out
        else:
            m_part = torch.empty(nsplit, B, device=x.device, dtype=torch.float32)
            s_part = torch.empty_like(m_part)
        _lm2_fwd_kernel[(row_tiles, nsplit)](
            x, s2, labels, rs, st, m_part, s_part, B, C, D, x.stride(0), nsplit, float(alpha), EPS,
            float(lambda_pull), xuf, INPUT_PRECISION=_precision(x.dtype, device=x.device), LSE=one,
            **cfg.launch(D))
        if not one:
            lcfg = cfgs["lse2"]
            _lm2_lse_kernel[(cdiv(B, lcfg.blocks["BLOCK_B"]),)](
                m_part, s_part, rs, lse, out, B, nsplit, float(alpha), float(lambda_pull), **lcfg.launch())
    return out, lse, rs, st, sx


@_line_margin2_op.register_fake
def _line_margin2_fake(x, seg, labels, margins, alpha, lambda_pull, merged=True, xu=True):
    out = x.new_empty((x.shape[0],), dtype=torch.float32)
    st, sx, _ = _cast_segments(seg, x.dtype, xu)  # the forward's rule for the copy
    return out, torch.empty_like(out), x.new_empty((3, x.shape[0]), dtype=torch.float32), st, sx


_MM_OUT_DTYPE: Dict[Tuple[str, torch.dtype], bool] = {}


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (torch.mm: cuBLAS on a GPU) with a float32 result: ``out_dtype=float32`` where
    this PyTorch supports it for ``a``'s dtype on CUDA (fp32 accumulation straight to the
    output), else the result rounded to ``a``'s dtype then widened; on the CPU (the interpreter
    tests) the product of the widened operands."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.device.type == "cpu":  # no mm.dtype kernel on the CPU: exact float32 products there
        return torch.mm(a.float(), b.float())
    key = (a.device.type, a.dtype)
    if key not in _MM_OUT_DTYPE:  # the first call asks this PyTorch (an out-of-memory error answers nothing)
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
        else:
            _MM_OUT_DTYPE[key] = True
            return out
    if _MM_OUT_DTYPE[key]:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


@torch.library.custom_op("daal_triton::line_margin2_backward", mutates_args=())
def _line_margin2_backward_op(grad_out: torch.Tensor, x: torch.Tensor, seg: torch.Tensor,
                              sx: torch.Tensor, st: torch.Tensor, labels: torch.Tensor,
                              lse: torch.Tensor, rs: torch.Tensor, alpha: float,
                              lambda_pull: float, atomic: bool = False, merged: bool = True,
                              xu: bool = True, need_x: bool = True,
                              need_seg: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dX, dSegments)``: the own-class rows of dP, dQ per sample and their class lists
    (``_lm2_ownseg_kernel``; skipped when ``atomic``, the design kept selectable by
    ``DAAL_LM_OWN_SEG=atomic``), then chunk by chunk of Cc classes one fused kernel (the forward
    GEMMs once, ``a~``, ``b~`` and the row/column partials), two GEMMs (``torch.mm``) and the
    segment-gradient epilogue; last, ``_lm2_finish_kernel`` forms dX with its own-class terms
    (direct form; ``merged`` with the class lists: in the last chunk's epilogue launch,
    ``_lm2_dseg_finish_kernel``). Autocast is off inside (a backward run under autocast must not
    lower the float32 GEMM outputs the epilogue reads). ``xu``: the forward's layout of ``sx``.
    ``need_x`` / ``need_seg`` False (that input needs no gradient: frozen segments, fixed
    embeddings): its gradient is not computed (neither its GEMM nor its kernels run) and comes back
    with 0 rows."""
    args = (grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull, atomic, merged, xu, need_x, need_seg)
    if not torch.is_autocast_enabled(x.device.type):  # entering a context costs ~7 µs per call
        return _line_margin2_backward(*args)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _line_margin2_backward(*args)


#: The internal switch of the own-class rows of the segment gradient: "lists" (the default:
#: ``_lm2_ownseg_kernel`` writes them per sample and ``_lm2_dseg_kernel`` adds them, per class,
#: before its one rounding: deterministic, the gradient written once in the segments' dtype) or
#: "atomic" (the design the 2026-11-30 H200 run timed: float32 atomics into a float32 C x 2 x D
#: gradient, then a cast for half segments). Read by every forward (the backward follows the choice
#: of its forward); decided by the GPU runs for the default (bench/README.md, "Switches decided"),
#: still selectable, no longer timed (the benchmarks' ``triton_atomic_own`` provider).
OWN_SEG_ENV = "DAAL_LM_OWN_SEG"
OWN_SEG_POLICIES = ("lists", "atomic")


def own_seg_policy() -> str:
    """``DAAL_LM_OWN_SEG`` (default "lists"), read when the forward records its autograd node
    (the backward follows that choice; "atomic" falls back to the lists under
    ``torch.use_deterministic_algorithms(True)``)."""
    return env_choice(OWN_SEG_ENV, OWN_SEG_POLICIES)


def _slot_map(C: int, device) -> torch.Tensor:
    """The C int32 slot map of the class lists: uninitialised (``_lm2_ownseg_kernel``)."""
    return torch.empty(C, device=device, dtype=torch.int32)


def _line_margin2_backward(grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull, atomic, merged, xu,
                           need_x=True, need_seg=True):
    """``(dX, dSeg)`` of the line margin (docs/method.md, "Gradients"; the module docstring's
    kernels): per chunk of Cc classes, ``h_ic = g_ic / delta_ic`` from the recomputed GEMMs and the
    saved ``lse``, ``AB = [a~ = -h (1 - t), b~ = -h t]``, ``dX += AB [P_c; Q_c]`` and
    ``[dP_c; dQ_c] = AB^T X`` plus the rank-1 corrections; the own class's exact terms
    (``_own_terms``) by the class lists (or float32 atomics with ``atomic``). Memory: O(B Cc) per
    chunk besides dSeg (C x 2 x D) and the float32 dX (B x D); without ``need_seg`` no dSeg (and no
    ``A~^T X`` GEMM or segment epilogue), without ``need_x`` no dX (no ``AB [P; Q]`` GEMM, no
    finish): 0-row results. The atomic design's finish adds the own classes' dSeg rows: there dX is
    computed (and dropped) whenever dSeg is, and the lists run when it is not."""
    cfgs = CONFIGS[config_family(x.dtype)]
    x = x if x.stride(1) == 1 else x.contiguous()
    seg = _unit_feature_stride(seg)
    # the forward's own results, read as it wrote them (contiguous): a saved-tensor hook
    # (torch.autograd.graph.saved_tensors_hooks: offload, compression) may give them back in
    # another layout, and the kernels take no strides for them; free when it did not
    sx, st, labels, lse, rs = (t.contiguous() for t in (sx, st, labels, lse, rs))
    B, D = x.shape
    C = seg.shape[0]
    # the forward's copy, the segments themselves, or (the forward kept no copy: _kept_copy) a
    # copy per chunk, rounded by the forward's kernel into one Cc x 2 x D buffer
    rebuild = sx.numel() == 0 and _copies(seg, x.dtype, xu)
    s2 = seg if sx.numel() == 0 else sx
    go = grad_out.float().contiguous()
    atomic = atomic and need_seg and not torch.are_deterministic_algorithms_enabled()
    want_x, need_x = need_x, need_x or atomic
    gseg = torch.empty(C if need_seg else 0, 2, D, device=x.device, dtype=torch.float32 if atomic else seg.dtype)
    if atomic:  # typed placeholders: HAS_OWN = False reads none of them
        none = torch.empty(0, device=x.device, dtype=torch.int32)
        lists = (labels, torch.empty(0, device=x.device), none, none)
    else:  # the own-class rows per sample and their class lists, before any chunk
        own = torch.empty(B, 3, D, device=x.device, dtype=torch.float32)
        nxt = torch.empty(B, device=x.device, dtype=torch.int32)
        slot = _slot_map(C, x.device)
        lists = (labels, own, nxt, slot)
        if B:
            ocfg = cfgs["ownseg2"]
            _lm2_ownseg_kernel[(cdiv(B, ocfg.blocks["BLOCK_B"]),)](
                x, seg, labels, lse, go, rs, own, nxt, slot, B, C, D, x.stride(0),
                seg.stride(0), seg.stride(1), float(lambda_pull), EPS, **ocfg.launch(D))
    cfg, dcfg = cfgs["bwd2"], cfgs["dseg2"]
    bb, bc = cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"]
    row_tiles = cdiv(B, bb)
    cc = _backward_chunk(x, C)
    ctiles = cc // bc
    if rebuild:  # the chunk's copy and its statistics (the same values as the forward's st)
        pcfg = cfgs["prep2"]
        sxc = torch.empty(min(cc, C), 2, D, device=x.device, dtype=x.dtype)
        stc = torch.empty(4, min(cc, C), device=x.device, dtype=torch.float32)
    ab = torch.empty(B, 2 * cc, device=x.device, dtype=x.dtype)
    rowp = torch.empty(ctiles, B, device=x.device, dtype=torch.float32)
    colp = torch.empty(row_tiles, 4, cc, device=x.device, dtype=torch.float32)
    prec, hmax = _precision(x.dtype, device=x.device), _HMAX[x.dtype]
    xuf = 1.0 if xu else 0.0
    acc, hr, rows_p = None, None, 0
    gx = torch.empty(B if need_x else 0, D, device=x.device, dtype=x.dtype)
    for c0 in range(0, C, cc):
        n = min(cc, C - c0)
        if rebuild:
            _lm2_prep_kernel[(cdiv(n, pcfg.blocks["BLOCK_C"]),)](
                seg[c0: c0 + n], sxc, stc, n, D, seg.stride(0), seg.stride(1), seg.stride(2), xuf,
                CAST=True, **pcfg.launch(D))
            s2c = sxc[:n]
        else:
            s2c = s2[c0: c0 + n]
        _lm2_bwd_kernel[(row_tiles, cdiv(n, bc))](
            x, s2c, labels, rs, lse, go, st, ab, rowp, colp, B, C, D, c0, cc, x.stride(0),
            float(alpha), EPS, hmax, xuf, INPUT_PRECISION=prec, **cfg.launch(D))
        nt = cdiv(n, bc)
        abn = ab[:, : 2 * n]
        if need_x:
            part = mm_f32(abn, s2c.reshape(2 * n, D))  # sum_c a~ p_c + b~ q_c (xu: (a~ + b~) p_c + b~ u_c)
            if acc is None and C <= cc:  # one chunk: the partials go to the finish kernel as they are
                acc, hr, rows_p = part, rowp, nt
            else:
                acc = part if acc is None else acc + part
                hr = rowp[:nt].sum(0) if hr is None else hr + rowp[:nt].sum(0)
                rows_p = 1
            del part  # summed into acc (or acc itself): not alive beside the next chunk's
        if not need_seg:
            continue
        g = mm_f32(abn.t(), x).contiguous()  # rows 2c, 2c + 1: [A~^T X]_c (xu: [(A~ + B~)^T X]_c), [B~^T X]_c
        gs, ss = gseg[c0: c0 + n], seg[c0: c0 + n]
        if merged and not atomic and B and need_x and c0 + n == C:  # the last chunk's epilogue and dX at once
            mcfg = cfgs["dsegfin2"]
            cp = cdiv(n, mcfg.blocks["BLOCK_C"])
            _lm2_dseg_finish_kernel[(cp + cdiv(B, mcfg.blocks["BLOCK_B"]),)](
                g, ss, colp, gs, *lists, acc.contiguous(),
                hr.reshape(-1, B).contiguous(), x, gx, n, D, cc, row_tiles, B, c0, rows_p, x.stride(0),
                ss.stride(0), ss.stride(1), gs.stride(0), gs.stride(1), cp, xuf, **mcfg.launch(D))
            return gx, gseg
        _lm2_dseg_kernel[(cdiv(n, dcfg.blocks["BLOCK_C"]),)](
            g, ss, colp, gs, *lists, n, D, cc, row_tiles, B, c0,
            ss.stride(0), ss.stride(1), ss.stride(2), gs.stride(0), gs.stride(1), gs.stride(2), xuf,
            HAS_OWN=not atomic, **dcfg.launch(D))
        # one chunk's G at a time: bound to g, it lived on through the next chunk's GEMM (2 Cc x D
        # float32: 67 MB at B = 1024, C = 100k, about what the runs' 418 MB peak had over the
        # model's 355 MB: bench/work_model.py extra_bytes)
        del g
    if B and need_x:
        if acc is None:  # no classes
            acc, hr, rows_p = torch.zeros(B, D, device=x.device), torch.zeros(1, B, device=x.device), 1
        fcfg = cfgs["finish2"]
        _lm2_finish_kernel[(cdiv(B, fcfg.blocks["BLOCK_B"]),)](
            acc.contiguous(), hr.reshape(-1, B).contiguous(), x, seg, labels, lse, go, rs, lists[1],
            gx, gseg, B, D,
            rows_p, x.stride(0), seg.stride(0), seg.stride(1), gseg.stride(0), gseg.stride(1),
            float(alpha), float(lambda_pull), EPS, ATOMIC=atomic, **fcfg.launch(D))
    return gx if want_x else gx[:0].clone(), gseg.to(seg.dtype)


@_line_margin2_backward_op.register_fake
def _line_margin2_backward_fake(grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull,
                                atomic=False, merged=True, xu=True, need_x=True, need_seg=True):
    # contiguous, as the kernels' (any input strides); 0 rows where not needed
    return (x.new_empty((x.shape[0] if need_x else 0, x.shape[1])),
            seg.new_empty((seg.shape[0] if need_seg else 0, *seg.shape[1:])))


def _line_margin2_setup_context(ctx, inputs, output):
    x, seg, labels, margins, alpha, lambda_pull, merged, xu = inputs
    _, lse, rs, st, sx = output
    ctx.save_for_backward(x, seg, _kept_copy(sx, x, seg.shape[0]), st, labels, lse, rs)
    ctx.alpha, ctx.lambda_pull, ctx.merged, ctx.xu = alpha, lambda_pull, merged, xu
    ctx.atomic = own_seg_policy() == "atomic"  # the switch as the forward saw it
    ctx.mark_non_differentiable(lse, rs, st, sx)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved statistics


_line_margin2_backward_direct = direct(_line_margin2_backward_op)


def _line_margin2_autograd_backward(ctx, grad_out, _g_lse, _g_rs, _g_st, _g_sx):
    if grad_out is None:
        return (None,) * 8
    x, seg, sx, st, labels, lse, rs = ctx.saved_tensors
    need_x, need_seg = (bool(ctx.needs_input_grad[i]) for i in (0, 1))
    gx, gseg = _line_margin2_backward_direct(
        grad_out, x, seg, sx, st, labels, lse, rs, ctx.alpha, ctx.lambda_pull, ctx.atomic, ctx.merged,
        ctx.xu, need_x, need_seg)
    return gx if need_x else None, gseg if need_seg else None, None, None, None, None, None, None


_line_margin2_op.register_autograd(_line_margin2_autograd_backward, setup_context=_line_margin2_setup_context)
_line_margin2 = eager(_line_margin2_op)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def line_margin(x: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor,
                margins: torch.Tensor, *, alpha: float, lambda_pull: float) -> torch.Tensor:
    """Per-sample ``softplus(logsumexp_{c != y_i} alpha(delta_iy + m_i - delta_ic)) / alpha
    + lambda_pull delta_iy^2`` (B values), fused: nothing B x C is ever stored.

    ``x`` B x D (already normalised), ``labels`` B ints in [0, C), ``segments`` C x 2 x D,
    ``margins`` B (no gradient). Differentiable w.r.t. ``x`` and ``segments``. Returns float32 for
    float16/bfloat16/float32 inputs; float64 inputs raise ``ValueError`` (the loss routes them to
    the reference). The own-class distance is computed inside (direct form, exact).
    """
    compute_dtype("line_margin", x, segments)
    if x.dtype not in _SUPPORTED or segments.dtype not in _SUPPORTED:
        raise ValueError(f"x and segments must be float16/bfloat16/float32, got {x.dtype} and "
                         f"{segments.dtype}")
    if x.ndim != 2 or segments.ndim != 3 or segments.shape[1] != 2 or segments.shape[2] != x.shape[1]:
        raise ValueError(f"x must be B x D and segments C x 2 x D, got {tuple(x.shape)} and "
                         f"{tuple(segments.shape)}")
    if segments.shape[0] == 0:  # no class for any label: the kernels' own-class rows would not exist
        raise ValueError("segments must hold at least one class (C >= 1), got C = 0")
    labels = labels.long().contiguous()
    return _line_margin2(x, segments, labels, margins, float(alpha), float(lambda_pull),
                         merged_launches(), xu_dot())[0]
