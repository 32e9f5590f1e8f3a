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
  catastrophically). In v2 a kernel does it (``_lm2_own_kernel``) and the backward's last kernel
  (``_lm2_finish_kernel``) adds its exact derivative (the ``g_iy`` term of docs/method.md
  "Gradients" and the pull term) to dX and to the own classes' dP, dQ; in v1 it is
  :func:`own_distance_sq` in PyTorch, differentiated by autograd. The fused kernels mask the own
  class ``c == y_i`` out of every tile.
* the custom operator ``daal_triton::line_lse`` (``torch.library``, with a registered autograd
  formula and backward operator ``daal_triton::line_lse_backward``) takes ``delta_iy`` as an input
  and returns ``lse_i / alpha``; its backward gives
  ``d/d delta_iy = grad_out_i (1 - exp(-lse_i))`` (the total softmax weight of the classes, the
  ``{0}`` excluded) plus, through the kernels, dX, dP, dQ of the ``c != y_i`` terms.

Two designs (docs/kernels.md, "Fused line margin")
--------------------------------------------------
``line_margin`` runs ``DESIGN`` ("v2" unless ``DAAL_LINE_MARGIN_DESIGN=v1``):

* **v2** (default; operators ``daal_triton::line_margin2`` / ``line_margin2_backward``): 16 BCD
  GEMM flops, no global read-modify-write inside any loop, pipelined K-loops; four launches
  forward (own-class rows, class statistics, logsumexp, merge), 4 per class chunk + 1 backward.
  ``_lm2_prep_kernel`` computes the class statistics (4 x C) once per call, of the segments rounded
  to x's dtype (and that rounded contiguous copy ``sx`` when the segments are not already it); the
  forward saves both for the backward. ``_lm2_fwd_kernel`` is the streaming online-logsumexp kernel
  whose K-loop is plain tile loads of x, p, q (``x.u = x.q - x.p`` in the epilogue); its (row
  tiles x splits) grid is sized in whole waves of the device's SMs (:func:`wave_split`). The
  backward runs per chunk of Cc classes (``B Cc <= CHUNK_ELEMENTS``, :func:`chunk_classes`):
  ``_lm2_bwd_kernel`` recomputes the chunk's GEMMs once and writes ``a~ = -h(1 - t)``,
  ``b~ = -h t`` (B x 2Cc, x's dtype, interleaved per class) with deterministic row / column
  partials; ``torch.mm`` (cuBLAS) gives ``AB [P_c; Q_c]`` (into the float32 dX accumulator) and
  ``G = AB^T X``; ``_lm2_dseg_kernel`` adds the rank-1 corrections and writes dP, dQ in the
  segments' dtype. Memory beyond inputs and outputs: O(B Cc + (B + C) D) (tested).
* **v1** (operators ``daal_triton::line_lse`` / ``line_lse_backward``), described below.

Kernels of v1 (formulas beside each kernel)
-------------------------------------------
* ``_lm_class_stats_kernel``: ``pp_c = |p_c|^2``, ``pu_c = p_c.u_c``, ``uu_c = |u_c|^2`` in float32.
* ``_lm_fwd_kernel``: grid (row tiles, class splits). Each program streams the class tiles of its
  split; per tile it runs the K-loop over D with two ``tl.dot`` (``x.p`` and ``x.u``), forms t, e^2,
  delta and the logits in registers and folds them into an online (max, sum) pair per row, which
  starts at (0, 0). It writes only ``m[s, i]``, ``s[s, i]`` (NSPLIT x B); PyTorch then combines
  ``lse_i = log(exp(0) + sum_s s_si exp(m_si))`` (the ``{0}`` element is the ``+ exp(0)``).
  Splitting C (flash-decoding style) is what fills the GPU: B = 1024 rows are only 8 row tiles.
* ``_lm_bwd_dpq_kernel`` (class-tile parallel, like flash attention's dK/dV pass): each program
  owns BLOCK_C classes and streams over all row tiles, recomputing the tile and
  ``h_ic = g_ic / delta_ic``, ``g_ic = -grad_out_i exp(logit_ic - lse_i)`` (0 where the clamp
  binds, for padding, and for c == y_i). With ``e_ic = x_i - p_c - t_ic u_c``::

      A_c = sum_i h_ic e_ic     = [H^T X]_c      - (sum_i h_ic) p_c     - (sum_i h_ic t_ic) u_c
      B_c = sum_i h_ic t_ic e_ic = [(Ht)^T X]_c  - (sum_i h_ic t_ic) p_c - (sum_i h_ic t_ic^2) u_c
      dP_c = -(A_c - B_c) = B_c - A_c,   dQ_c = -B_c

  The two GEMMs go through ``tl.dot``; their BLOCK_C x D accumulators are too large for registers
  at D = 512, so they live in the float32 output buffer (C x 2 x D), which the program owns
  exclusively and updates read-modify-write per row tile. No atomics: the result is
  deterministic. The last loop applies the rank-1 column-sum corrections in place.
* ``_lm_bwd_dx_kernel`` (row-tile parallel, class split like the forward): ``dX_i = sum_c h_ic e_ic
  = (sum_c h_ic) x_i - [H P]_i - [(Ht) U]_i``, each program accumulating into its own slice of a
  float32 NSPLIT x B x D workspace (read-modify-write per class tile, no atomics), summed over the
  splits in PyTorch. (Why not atomics: docs/kernels.md.)

Mixed precision
---------------
All dots run in ``x``'s precision with float32 accumulation: segment tiles (of any float dtype) are
loaded, ``u = q - p`` is formed in float32, then both are cast to ``x.dtype``; the backward's
``h`` tiles are cast to ``x.dtype`` too (for float16 they are clamped to +-6e4 first: only a
point within ~1e-5 of a negative segment with ``grad_out ~ 1`` reaches that). Row/column
statistics, t, e^2, the logsumexp and every accumulator are float32. float32 dots use TF32 on a
GPU and IEEE under ``TRITON_INTERPRET=1`` (``_common.input_precision``). All pointer offsets are
64-bit (C x D and B x D may pass 2^31).

Memory (beyond inputs and outputs)
----------------------------------
Forward saves x, segments, labels, delta_iy, margins, lse (B) and the class stats (3C floats);
it writes 2 x NSPLIT x B floats of partial stats. Backward: dP/dQ in a float32 C x 2 x D buffer
(the gradient itself for float32 segments), a float32 NSPLIT_X x B x D dX workspace. Nothing is
ever B x C.
"""
from __future__ import annotations

import os
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
    compute_dtype,
    config_family,
    direct,
    eager,
    expand,
    input_precision,
    sm_count,
)
from ._common import wave_split as _wave_split

__all__ = ["line_margin", "own_distance_sq", "CONFIGS", "KERNELS", "config_family", "launches"]

# ----------------------------------------------------------------------------- kernels
@triton.jit
def _lm_class_stats_kernel(seg_ptr, pp_ptr, pu_ptr, uu_ptr, C, D,
                           stride_seg_c, stride_seg_v, stride_seg_d,
                           BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """``pp_c = |p_c|^2``, ``pu_c = p_c.(q_c - p_c)``, ``uu_c = |q_c - p_c|^2`` (float32; ``u`` is
    formed in float32, so ``uu = 0`` exactly for a zero-length segment).

    Args:
        seg_ptr: C x 2 x D segments (``[:, 0]`` = p, ``[:, 1]`` = q), any float dtype.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments (class, p/q, feature).
        pp_ptr, pu_ptr, uu_ptr: the C float32 outputs.
        C, D: sizes.
        BLOCK_C: classes per program. BLOCK_D: D-chunk.
    """
    cls = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    base = seg_ptr + cls.to(tl.int64)[:, None] * stride_seg_c
    pp = tl.zeros([BLOCK_C], dtype=tl.float32)
    pu = tl.zeros([BLOCK_C], dtype=tl.float32)
    uu = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        m = cmask[:, None] & (offs_d[None, :] < D)
        od = offs_d.to(tl.int64)[None, :] * stride_seg_d
        p = tl.load(base + od, mask=m, other=0.0).to(tl.float32)
        q = tl.load(base + stride_seg_v + od, mask=m, other=0.0).to(tl.float32)
        u = q - p
        pp += tl.sum(p * p, 1)
        pu += tl.sum(p * u, 1)
        uu += tl.sum(u * u, 1)
    tl.store(pp_ptr + cls, pp, mask=cmask)
    tl.store(pu_ptr + cls, pu, mask=cmask)
    tl.store(uu_ptr + cls, uu, mask=cmask)


@triton.jit
def _tile_geometry(x_ptr, seg_ptr, rows, cls, rmask, cmask, D,
                   stride_x_b, stride_x_d, stride_seg_c, stride_seg_v, stride_seg_d,
                   xx, pp, pu, uu, eps, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One BLOCK_B x BLOCK_C tile of ``t`` and ``|e|^2`` (GEMM form, docs/method.md step 5).

    K-loop over D: ``XP += X_k P_k^T``, ``XU += X_k U_k^T`` (dots in x's dtype, fp32 accumulate);
    ``proj = XU - pu``, ``t = clamp(proj / max(uu, eps), 0, 1)``,
    ``e2 = xx - 2 XP + pp - 2 t proj + t^2 uu``.

    Args:
        x_ptr, seg_ptr, strides, eps, BLOCK_*, INPUT_PRECISION: as in ``_lm_fwd_kernel``.
        rows, cls, rmask, cmask: the tile's row and class indices and which of them exist.
        D: the feature size. xx, pp, pu, uu: the tile's row and class statistics.
    """
    xp = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xu = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    crow = seg_ptr + cls.to(tl.int64)[:, None] * stride_seg_c
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        od = offs_d.to(tl.int64)[None, :]
        xt = tl.load(xrow + od * stride_x_d, mask=rmask[:, None] & dmask[None, :], other=0.0)
        cm = cmask[:, None] & dmask[None, :]
        p = tl.load(crow + od * stride_seg_d, mask=cm, other=0.0).to(tl.float32)
        q = tl.load(crow + stride_seg_v + od * stride_seg_d, mask=cm, other=0.0).to(tl.float32)
        u = q - p
        xp = tl.dot(xt, tl.trans(p.to(xt.dtype)), xp, input_precision=INPUT_PRECISION)
        xu = tl.dot(xt, tl.trans(u.to(xt.dtype)), xu, input_precision=INPUT_PRECISION)
    proj = xu - pu[None, :]
    t = tl.minimum(tl.maximum(proj / tl.maximum(uu, eps)[None, :], 0.0), 1.0)
    e2 = xx[:, None] - 2.0 * xp + pp[None, :] - 2.0 * t * proj + t * t * uu[None, :]
    return t, e2


@triton.jit
def _tile_h(x_ptr, seg_ptr, rows, cls, rmask, cmask, lab, base, lse, go, D,
            stride_x_b, stride_x_d, stride_seg_c, stride_seg_v, stride_seg_d,
            xx, pp, pu, uu, alpha, eps, BLOCK_B: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Backward tile: ``h_ic = -grad_out_i w_ic / delta_ic`` with ``w_ic = exp(logit_ic - lse_i)``,
    zero for padding, ``c == y_i`` and where ``|e|^2 < eps`` (the clamp binds); returns (h, t).

    Args:
        as ``_tile_geometry``, and the tile rows' labels ``lab``, ``base``, ``lse`` and
        incoming gradient ``go``; ``alpha``: the logit scale.
    """
    t, e2 = _tile_geometry(x_ptr, seg_ptr, rows, cls, rmask, cmask, D, stride_x_b, stride_x_d,
                           stride_seg_c, stride_seg_v, stride_seg_d, xx, pp, pu, uu, eps,
                           BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
    delta = tl.sqrt(tl.maximum(e2, eps))
    valid = rmask[:, None] & cmask[None, :] & (cls[None, :] != lab[:, None]) & (e2 >= eps)
    logit = base[:, None] - alpha * delta
    w = tl.exp(tl.where(valid, logit - lse[:, None], 0.0))
    h = tl.where(valid, -go[:, None] * w / delta, 0.0)
    return h, t


@triton.jit
def _lm_fwd_kernel(x_ptr, seg_ptr, label_ptr, base_ptr, xx_ptr, pp_ptr, pu_ptr, uu_ptr,
                   m_ptr, s_ptr, B, C, D, stride_x_b, stride_x_d,
                   stride_seg_c, stride_seg_v, stride_seg_d, classes_per_split,
                   alpha, eps, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online logsumexp over the classes of split ``pid(1)`` for rows of tile ``pid(0)``.

    ``logit_ic = base_i - alpha delta_ic`` with ``base_i = alpha (delta_iy + m_i)``, masked to -inf
    for ``c == y_i`` and padding; running ``M_i = max(M_i, max_c logit)``, ``S_i = S_i e^{M_old - M}
    + sum_c e^{logit - M}`` from ``(M, S) = (0, 0)``. Writes ``m[split, i]``, ``s[split, i]``.

    Args:
        x_ptr: B x D embeddings (float32/float16/bfloat16).
        seg_ptr: C x 2 x D segments (``[:, 0]`` = p, ``[:, 1]`` = q), any float dtype.
        label_ptr: B labels (int64).
        base_ptr: B values ``alpha (delta_iy + m_i)`` (float32).
        xx_ptr: B values ``|x_i|^2`` (float32).
        pp_ptr, pu_ptr, uu_ptr: the C class statistics (float32, ``_lm_class_stats_kernel``).
        m_ptr, s_ptr: NSPLIT x B float32 outputs, contiguous: running max and sum per split.
        B, C, D: sizes.
        stride_x_b, stride_x_d: strides of x.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments (class, p/q, feature).
        classes_per_split: classes per split (a multiple of BLOCK_C).
        alpha: the logit scale. eps: the floor of squared distances and lengths.
        BLOCK_B, BLOCK_C: rows x classes per tile. BLOCK_D: D-chunk of every GEMM.
        INPUT_PRECISION: ``tl.dot``'s input precision (operands in x's dtype).
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
    base = tl.load(base_ptr + rows, mask=rmask, other=0.0)
    xx = tl.load(xx_ptr + rows, mask=rmask, other=0.0)
    run_m = tl.zeros([BLOCK_B], dtype=tl.float32)
    run_s = tl.zeros([BLOCK_B], dtype=tl.float32)
    c_start = pid_s * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < c_end
        pp = tl.load(pp_ptr + cls, mask=cmask, other=0.0)
        pu = tl.load(pu_ptr + cls, mask=cmask, other=0.0)
        uu = tl.load(uu_ptr + cls, mask=cmask, other=0.0)
        t, e2 = _tile_geometry(x_ptr, seg_ptr, rows, cls, rmask, cmask, D, stride_x_b, stride_x_d,
                               stride_seg_c, stride_seg_v, stride_seg_d, xx, pp, pu, uu, eps,
                               BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
        delta = tl.sqrt(tl.maximum(e2, eps))
        valid = cmask[None, :] & (cls[None, :] != lab[:, None])
        logit = tl.where(valid, base[:, None] - alpha * delta, float("-inf"))
        new_m = tl.maximum(run_m, tl.max(logit, 1))
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(logit - new_m[:, None]), 1)
        run_m = new_m
    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_ptr + out, run_m, mask=rmask)
    tl.store(s_ptr + out, run_s, mask=rmask)


@triton.jit
def _lm_bwd_dpq_kernel(x_ptr, seg_ptr, label_ptr, base_ptr, lse_ptr, go_ptr, xx_ptr, pp_ptr,
                       pu_ptr, uu_ptr, g_ptr, B, C, D, stride_x_b, stride_x_d,
                       stride_seg_c, stride_seg_v, stride_seg_d, stride_g_c, stride_g_v, stride_g_d,
                       alpha, eps, hmax, BLOCK_B: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """dP, dQ for the classes of tile ``pid(0)``, streaming all row tiles.

    Per row tile: ``G[:, 0] += H^T X``, ``G[:, 1] += (H t)^T X`` (read-modify-write of this
    program's own rows of G); column sums ``hs = sum_i h``, ``hts = sum_i h t``,
    ``htts = sum_i h t^2``. Then in place: ``A = G0 - hs p - hts u``, ``Bc = G1 - hts p - htts u``,
    ``dP = Bc - A``, ``dQ = -Bc``.

    Args:
        x_ptr: B x D embeddings (float32/float16/bfloat16).
        seg_ptr: C x 2 x D segments (``[:, 0]`` = p, ``[:, 1]`` = q), any float dtype.
        label_ptr: B labels (int64).
        base_ptr: B values ``alpha (delta_iy + m_i)`` (float32).
        lse_ptr: B values ``lse_i`` of the forward. go_ptr: B incoming gradients (float32).
        xx_ptr: B values ``|x_i|^2`` (float32).
        pp_ptr, pu_ptr, uu_ptr: the C class statistics (float32, ``_lm_class_stats_kernel``).
        g_ptr: the C x 2 x D float32 output (dP, dQ).
        B, C, D: sizes.
        stride_x_b, stride_x_d: strides of x.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments (class, p/q, feature).
        stride_g_c, stride_g_v, stride_g_d: strides of g.
        hmax: the clamp of h before it is cast to x's dtype (6e4 for float16).
        alpha: the logit scale. eps: the floor of squared distances and lengths.
        BLOCK_B, BLOCK_C: rows x classes per tile. BLOCK_D: D-chunk of every GEMM.
        INPUT_PRECISION: ``tl.dot``'s input precision (operands in x's dtype).
    """
    cls = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cls < C
    pp = tl.load(pp_ptr + cls, mask=cmask, other=0.0)
    pu = tl.load(pu_ptr + cls, mask=cmask, other=0.0)
    uu = tl.load(uu_ptr + cls, mask=cmask, other=0.0)
    hs = tl.zeros([BLOCK_C], dtype=tl.float32)
    hts = tl.zeros([BLOCK_C], dtype=tl.float32)
    htts = tl.zeros([BLOCK_C], dtype=tl.float32)
    grow = g_ptr + cls.to(tl.int64)[:, None] * stride_g_c
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < B
        lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
        base = tl.load(base_ptr + rows, mask=rmask, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
        xx = tl.load(xx_ptr + rows, mask=rmask, other=0.0)
        h, t = _tile_h(x_ptr, seg_ptr, rows, cls, rmask, cmask, lab, base, lse, go, D, stride_x_b,
                       stride_x_d, stride_seg_c, stride_seg_v, stride_seg_d, xx, pp, pu, uu, alpha,
                       eps, BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
        ht = h * t
        hs += tl.sum(h, 0)
        hts += tl.sum(ht, 0)
        htts += tl.sum(ht * t, 0)
        xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
        xdt = x_ptr.dtype.element_ty
        h_d = tl.trans(tl.minimum(tl.maximum(h, -hmax), hmax).to(xdt))
        ht_d = tl.trans(tl.minimum(tl.maximum(ht, -hmax), hmax).to(xdt))
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            xt = tl.load(xrow + offs_d.to(tl.int64)[None, :] * stride_x_d,
                         mask=rmask[:, None] & dmask[None, :], other=0.0)
            gm = cmask[:, None] & dmask[None, :]
            gp = grow + offs_d.to(tl.int64)[None, :] * stride_g_d
            acc0 = tl.load(gp, mask=gm & (r0 > 0), other=0.0)
            acc1 = tl.load(gp + stride_g_v, mask=gm & (r0 > 0), other=0.0)
            acc0 = tl.dot(h_d, xt, acc0, input_precision=INPUT_PRECISION)
            acc1 = tl.dot(ht_d, xt, acc1, input_precision=INPUT_PRECISION)
            tl.store(gp, acc0, mask=gm)
            tl.store(gp + stride_g_v, acc1, mask=gm)
    crow = seg_ptr + cls.to(tl.int64)[:, None] * stride_seg_c
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        gm = cmask[:, None] & (offs_d[None, :] < D)
        od = offs_d.to(tl.int64)[None, :]
        gp = grow + od * stride_g_d
        p = tl.load(crow + od * stride_seg_d, mask=gm, other=0.0).to(tl.float32)
        q = tl.load(crow + stride_seg_v + od * stride_seg_d, mask=gm, other=0.0).to(tl.float32)
        u = q - p
        a = tl.load(gp, mask=gm, other=0.0) - hs[:, None] * p - hts[:, None] * u
        b = tl.load(gp + stride_g_v, mask=gm, other=0.0) - hts[:, None] * p - htts[:, None] * u
        tl.store(gp, b - a, mask=gm)
        tl.store(gp + stride_g_v, -b, mask=gm)


@triton.jit
def _lm_bwd_dx_kernel(x_ptr, seg_ptr, label_ptr, base_ptr, lse_ptr, go_ptr, xx_ptr, pp_ptr,
                      pu_ptr, uu_ptr, w_ptr, B, C, D, stride_x_b, stride_x_d,
                      stride_seg_c, stride_seg_v, stride_seg_d,
                      classes_per_split, alpha, eps, hmax, BLOCK_B: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Partial dX of row tile ``pid(0)`` over the classes of split ``pid(1)``. Per class tile:
    ``W += H P + (H t) U`` (read-modify-write of this program's own slice), ``hr += sum_c h``;
    then in place ``W = hr x - W``.

    Args:
        x_ptr: B x D embeddings (float32/float16/bfloat16).
        seg_ptr: C x 2 x D segments (``[:, 0]`` = p, ``[:, 1]`` = q), any float dtype.
        label_ptr: B labels (int64).
        base_ptr: B values ``alpha (delta_iy + m_i)`` (float32).
        lse_ptr: B values ``lse_i`` of the forward. go_ptr: B incoming gradients (float32).
        xx_ptr: B values ``|x_i|^2`` (float32).
        pp_ptr, pu_ptr, uu_ptr: the C class statistics (float32, ``_lm_class_stats_kernel``).
        w_ptr: the NSPLIT x B x D float32 workspace (contiguous): partial dX per split.
        B, C, D: sizes.
        stride_x_b, stride_x_d: strides of x.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments (class, p/q, feature).
        classes_per_split: classes per split (a multiple of BLOCK_C).
        hmax: the clamp of h before it is cast to x's dtype (6e4 for float16).
        alpha: the logit scale. eps: the floor of squared distances and lengths.
        BLOCK_B, BLOCK_C: rows x classes per tile. BLOCK_D: D-chunk of every GEMM.
        INPUT_PRECISION: ``tl.dot``'s input precision (operands in x's dtype).
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
    base = tl.load(base_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
    xx = tl.load(xx_ptr + rows, mask=rmask, other=0.0)
    hr = tl.zeros([BLOCK_B], dtype=tl.float32)
    wrow = w_ptr + (pid_s.to(tl.int64) * B + rows.to(tl.int64))[:, None] * D
    xdt = x_ptr.dtype.element_ty
    c_start = pid_s * classes_per_split
    c_end = tl.minimum(c_start + classes_per_split, C)
    for c0 in range(c_start, c_end, BLOCK_C):
        cls = c0 + tl.arange(0, BLOCK_C)
        cmask = cls < c_end
        pp = tl.load(pp_ptr + cls, mask=cmask, other=0.0)
        pu = tl.load(pu_ptr + cls, mask=cmask, other=0.0)
        uu = tl.load(uu_ptr + cls, mask=cmask, other=0.0)
        h, t = _tile_h(x_ptr, seg_ptr, rows, cls, rmask, cmask, lab, base, lse, go, D, stride_x_b,
                       stride_x_d, stride_seg_c, stride_seg_v, stride_seg_d, xx, pp, pu, uu, alpha,
                       eps, BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
        hr += tl.sum(h, 1)
        h_d = tl.minimum(tl.maximum(h, -hmax), hmax).to(xdt)
        ht_d = tl.minimum(tl.maximum(h * t, -hmax), hmax).to(xdt)
        crow = seg_ptr + cls.to(tl.int64)[:, None] * stride_seg_c
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            od = offs_d.to(tl.int64)[None, :]
            cm = cmask[:, None] & dmask[None, :]
            p = tl.load(crow + od * stride_seg_d, mask=cm, other=0.0).to(tl.float32)
            q = tl.load(crow + stride_seg_v + od * stride_seg_d, mask=cm, other=0.0).to(tl.float32)
            u = q - p
            wm = rmask[:, None] & dmask[None, :]
            acc = tl.load(wrow + od, mask=wm & (c0 > c_start), other=0.0)
            acc = tl.dot(h_d, p.to(xdt), acc, input_precision=INPUT_PRECISION)
            acc = tl.dot(ht_d, u.to(xdt), acc, input_precision=INPUT_PRECISION)
            tl.store(wrow + od, acc, mask=wm)
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        wm = rmask[:, None] & (offs_d[None, :] < D)
        od = offs_d.to(tl.int64)[None, :]
        xt = tl.load(xrow + od * stride_x_d, mask=wm, other=0.0).to(tl.float32)
        acc = tl.load(wrow + od, mask=wm, other=0.0)
        tl.store(wrow + od, hr[:, None] * xt - acc, mask=wm)


# ----------------------------------------------------------------------------- design v2 kernels
# (docs/kernels.md, "Line margin, second design"). The segments reach these kernels as ``sx``: a
# contiguous C x 2 x D tensor in x's dtype (the segments themselves when they already are), so
# every GEMM K-step is three plain tile loads (x, p, q) the software pipeline can prefetch; nothing
# is formed between the loads and the dots. ``x.u`` is ``x.q - x.p`` from the two fp32
# accumulators (the dots see p~, q~, the values rounded to x's dtype; the class statistics are
# taken of the same values). Class statistics ``st`` (4 x C float32: |p|^2, p.u, |u|^2,
# 1 / max(|u|^2, eps)) are computed once per call and saved for the backward.
@triton.jit
def _lm2_prep_kernel(seg_ptr, sx_ptr, st_ptr, C, D, stride_seg_c, stride_seg_v, stride_seg_d,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, CAST: tl.constexpr):
    """``st[0] = |p~|^2``, ``st[1] = p~.u~``, ``st[2] = |u~|^2``, ``st[3] = 1 / max(|u~|^2, eps)``
    with ``p~``, ``q~`` the segments rounded to the dtype of ``sx`` and ``u~ = q~ - p~`` (float32:
    zero exactly for a zero-length segment); with ``CAST`` also writes ``sx`` (the rounded
    segments, contiguous C x 2 x D).

    Args:
        seg_ptr: C x 2 x D segments (``[:, 0]`` = p, ``[:, 1]`` = q), any float dtype.
        sx_ptr: C x 2 x D contiguous, x's dtype (written only with ``CAST``; its dtype is read).
        st_ptr: 4 x C float32 statistics (contiguous).
        C, D: sizes.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments (class, p/q, feature).
        BLOCK_C: classes per program. BLOCK_D: D-chunk. CAST: write ``sx``.
    """
    cls = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
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
        if CAST:
            tl.store(xrow + offs_d[None, :], p, mask=m)
            tl.store(xrow + D + offs_d[None, :], q, mask=m)
        pf = p.to(tl.float32)
        u = q.to(tl.float32) - pf
        pp += tl.sum(pf * pf, 1)
        pu += tl.sum(pf * u, 1)
        uu += tl.sum(u * u, 1)
    tl.store(st_ptr + cls, pp, mask=cmask)
    tl.store(st_ptr + C + cls, pu, mask=cmask)
    tl.store(st_ptr + 2 * C + cls, uu, mask=cmask)
    tl.store(st_ptr + 3 * C + cls, 1.0 / tl.maximum(uu, 1e-12), mask=cmask)


@triton.jit
def _lm2_tile(x_ptr, sx_ptr, st_ptr, rows, cls, rmask, cmask, xx, C, D, stride_x_b,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One BLOCK_B x BLOCK_C tile of ``t`` and ``|e|^2`` (GEMM form, docs/method.md step 5).

    K-loop over D, tile loads only: ``XP += X_k P_k^T``, ``XQ += X_k Q_k^T`` (fp32 accumulate).
    Epilogue: ``proj = XQ - XP - pu``, ``t = clamp(proj inv, 0, 1)``,
    ``e2 = xx - 2 XP + pp - 2 t proj + t^2 uu``.

    Args:
        x_ptr, sx_ptr, st_ptr, C, D, stride_x_b, BLOCK_*, INPUT_PRECISION: as ``_lm2_fwd_kernel``.
        rows, cls, rmask, cmask: the tile's rows and classes and which of them exist.
        xx: the rows' ``|x|^2``.
    """
    xp = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xq = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    prow = sx_ptr + cls.to(tl.int64)[:, None] * (2 * D)
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
    proj = xq - xp - pu[None, :]
    t = tl.minimum(tl.maximum(proj * inv[None, :], 0.0), 1.0)
    e2 = xx[:, None] - 2.0 * xp + pp[None, :] - 2.0 * t * proj + t * t * uu[None, :]
    return t, e2


@triton.jit
def _lm2_fwd_kernel(x_ptr, sx_ptr, label_ptr, base_ptr, xx_ptr, st_ptr, m_ptr, s_ptr,
                    B, C, D, stride_x_b, nsplit, alpha, eps, BLOCK_B: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Online logsumexp over the class tiles of split ``pid(1)`` (split s owns tiles
    ``[s T / nsplit, (s + 1) T / nsplit)`` of the ``T = cdiv(C, BLOCK_C)``) for row tile ``pid(0)``.

    ``logit_ic = base_i - alpha delta_ic``, ``base_i = alpha (delta_iy + m_i)``, masked for
    ``c == y_i`` and padding; running ``(M, S)`` from ``(0, 0)``; writes ``m[split, i]``,
    ``s[split, i]``.

    Args:
        x_ptr: B x D embeddings (unit column stride).
        sx_ptr: C x 2 x D contiguous segments in x's dtype.
        label_ptr: B labels (int64). base_ptr: B values ``alpha (delta_iy + m_i)`` (float32).
        xx_ptr: B values ``|x_i|^2`` (float32). st_ptr: 4 x C class statistics (``_lm2_prep_kernel``).
        m_ptr, s_ptr: nsplit x B float32 outputs: running max and sum per split.
        B, C, D: sizes. stride_x_b: row stride of x. nsplit: class splits (grid axis 1).
        alpha: the logit scale. eps: the floor of squared distances.
        BLOCK_B, BLOCK_C: rows x classes per tile. BLOCK_D: the K step.
        INPUT_PRECISION: ``tl.dot``'s input precision.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
    base = tl.load(base_ptr + rows, mask=rmask, other=0.0)
    xx = tl.load(xx_ptr + rows, mask=rmask, other=0.0)
    run_m = tl.zeros([BLOCK_B], dtype=tl.float32)
    run_s = tl.zeros([BLOCK_B], dtype=tl.float32)
    ntiles = tl.cdiv(C, BLOCK_C)
    t_start = pid_s * ntiles // nsplit
    t_end = (pid_s + 1) * ntiles // nsplit
    for ct in range(t_start, t_end):
        cls = ct * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cls < C
        t, e2 = _lm2_tile(x_ptr, sx_ptr, st_ptr, rows, cls, rmask, cmask, xx, C, D, stride_x_b,
                          BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
        delta = tl.sqrt(tl.maximum(e2, eps))
        valid = cmask[None, :] & (cls[None, :] != lab[:, None])
        logit = tl.where(valid, base[:, None] - alpha * delta, float("-inf"))
        new_m = tl.maximum(run_m, tl.max(logit, 1))
        run_s = run_s * tl.exp(run_m - new_m) + tl.sum(tl.exp(logit - new_m[:, None]), 1)
        run_m = new_m
    out = pid_s.to(tl.int64) * B + rows
    tl.store(m_ptr + out, run_m, mask=rmask)
    tl.store(s_ptr + out, run_s, mask=rmask)


@triton.jit
def _lm2_bwd_kernel(x_ptr, sx_ptr, label_ptr, base_ptr, lse_ptr, go_ptr, xx_ptr, st_ptr,
                    ab_ptr, rowp_ptr, colp_ptr, B, C, D, c0, Cc, stride_x_b, alpha, eps, hmax,
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
        x_ptr, sx_ptr, label_ptr, base_ptr, xx_ptr, st_ptr: as ``_lm2_fwd_kernel``.
        lse_ptr: B values ``lse_i`` of the forward. go_ptr: B incoming gradients (float32).
        ab_ptr: B x 2Cc output in x's dtype (contiguous). rowp_ptr: cdiv(Cc, BLOCK_C) x B
        float32. colp_ptr: cdiv(B, BLOCK_B) x 4 x Cc float32.
        B, C, D: sizes. c0, Cc: the chunk's first class and its width. stride_x_b: row stride of x.
        alpha: the logit scale. eps: the floor of squared distances. hmax: the clamp of a, b
        before the cast to x's dtype (6e4 for float16).
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
    base = tl.load(base_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
    xx = tl.load(xx_ptr + rows, mask=rmask, other=0.0)
    t, e2 = _lm2_tile(x_ptr, sx_ptr, st_ptr, rows, cls, rmask, cmask, xx, C, D, stride_x_b,
                      BLOCK_B, BLOCK_C, BLOCK_D, INPUT_PRECISION)
    delta = tl.sqrt(tl.maximum(e2, eps))
    valid = rmask[:, None] & cmask[None, :] & (cls[None, :] != lab[:, None]) & (e2 >= eps)
    w = tl.exp(tl.where(valid, base[:, None] - alpha * delta - lse[:, None], 0.0))
    hn = tl.where(valid, go[:, None] * w / delta, 0.0)  # -h
    xdt = x_ptr.dtype.element_ty
    a = tl.minimum(tl.maximum(hn * (1.0 - t), -hmax), hmax).to(xdt)
    b = tl.minimum(tl.maximum(hn * t, -hmax), hmax).to(xdt)
    af = a.to(tl.float32)
    bf = b.to(tl.float32)
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
def _lm2_dseg_kernel(g_ptr, seg_ptr, colp_ptr, out_ptr, n, D, Cc, R,
                     stride_seg_c, stride_seg_v, stride_seg_d,
                     stride_out_c, stride_out_v, stride_out_d,
                     BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """dP, dQ of the ``n`` classes of a chunk from ``G = AB^T X`` (2n x D float32: rows
    ``2c, 2c + 1`` = ``[A~^T X]_c``, ``[B~^T X]_c``) and the column partials of the ``R`` row tiles
    (summed here in a fixed order: deterministic)::

        dP_c = G[2c] - s0 p_c - s1 q_c,   dQ_c = G[2c + 1] - s2 p_c - s3 q_c

    written once, in the segments' dtype (no float32 gradient copy).

    Args:
        g_ptr: 2n x D float32 (contiguous). seg_ptr: the chunk's segments (any float dtype).
        colp_ptr: R x 4 x Cc float32 partials (``_lm2_bwd_kernel``). out_ptr: the chunk's rows of
        the segment gradient (segments' dtype).
        n, D: classes in the chunk, features. Cc: the partials' row length. R: row tiles.
        stride_seg_c, stride_seg_v, stride_seg_d: strides of segments.
        stride_out_c, stride_out_v, stride_out_d: strides of the gradient.
        BLOCK_C: classes per program. BLOCK_D: D-chunk.
    """
    lc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
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
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        m = cmask[:, None] & (offs_d[None, :] < D)
        od = offs_d.to(tl.int64)[None, :]
        p = tl.load(srow + od * stride_seg_d, mask=m, other=0.0).to(tl.float32)
        q = tl.load(srow + stride_seg_v + od * stride_seg_d, mask=m, other=0.0).to(tl.float32)
        gp = tl.load(grow + od, mask=m, other=0.0)
        gq = tl.load(grow + D + od, mask=m, other=0.0)
        tl.store(orow + od * stride_out_d, (gp - s0[:, None] * p - s1[:, None] * q).to(odt), mask=m)
        tl.store(orow + stride_out_v + od * stride_out_d,
                 (gq - s2[:, None] * p - s3[:, None] * q).to(odt), mask=m)


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
    b = tl.maximum(uu, 1e-12)
    tt = a / b
    t = tl.minimum(tl.maximum(tt, 0.0), 1.0)
    e2 = tl.zeros([BLOCK_B], dtype=tl.float32)
    eu = tl.zeros([BLOCK_B], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, p, u, _m = _own_chunk(xrow, prow, qrow, rmask, d0 + tl.arange(0, BLOCK_D), D)
        e = x - p - t[:, None] * u
        e2 += tl.sum(e * e, 1)
        eu += tl.sum(e * u, 1)
    return a, uu, b, tt, t, e2, eu, xx


@triton.jit
def _lm2_own_kernel(x_ptr, seg_ptr, label_ptr, m_ptr, dpos_ptr, xx_ptr, base_ptr, B, D,
                    stride_x_b, stride_seg_c, stride_seg_v, alpha, eps,
                    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The own-class distance by direct differences (docs/method.md, "Numerics") and the row
    inputs of the forward kernel::

        d_i = sqrt(max(|x_i - p_y - t u_y|^2, eps)),  xx_i = |x_i|^2,  base_i = alpha (d_i + m_i)

    Args:
        x_ptr: B x D embeddings (unit column stride). seg_ptr: C x 2 x D segments (unit feature
            stride, any float dtype). label_ptr: B int64 labels in ``[0, C)``.
        m_ptr: B float32 margins. dpos_ptr, xx_ptr, base_ptr: B float32 outputs.
        B, D: sizes. stride_x_b: row stride of x. stride_seg_c, stride_seg_v: class and p/q
            strides of the segments. alpha: the logit scale. eps: the floor of squared distances.
        BLOCK_B: rows per program. BLOCK_D: D-chunk.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    lab = tl.load(label_ptr + rows, mask=rmask, other=0)
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    prow = seg_ptr + lab[:, None] * stride_seg_c
    _, _, _, _, _, e2, _, xx = _own_geometry(xrow, prow, prow + stride_seg_v, rmask, D, BLOCK_B, BLOCK_D)
    d = tl.sqrt(tl.maximum(e2, eps))
    m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
    tl.store(dpos_ptr + rows, d, mask=rmask)
    tl.store(xx_ptr + rows, xx, mask=rmask)
    tl.store(base_ptr + rows, alpha * (d + m), mask=rmask)


@triton.jit
def _lm2_lse_kernel(m_ptr, s_ptr, dpos_ptr, lse_ptr, out_ptr, B, nsplit, alpha, lambda_pull,
                    BLOCK_B: tl.constexpr):
    """The splits' running ``(max, sum)`` merged: ``lse_i = log(e^0 + sum_s s_si e^{m_si})``
    (every ``m_si >= 0``: the running max starts at the ``{0}`` element), and the operator's
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
    total = tl.exp(-top)
    for s in range(0, nsplit):
        m = tl.load(m_ptr + s * B + rows, mask=rmask, other=0.0)
        total += tl.load(s_ptr + s * B + rows, mask=rmask, other=0.0) * tl.exp(m - top)
    lse = top + tl.log(total)
    d = tl.load(dpos_ptr + rows, mask=rmask, other=0.0)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(out_ptr + rows, lse / alpha + lambda_pull * d * d, mask=rmask)


@triton.jit
def _lm2_finish_kernel(acc_ptr, rowp_ptr, x_ptr, seg_ptr, label_ptr, lse_ptr, go_ptr, dpos_ptr,
                       gx_ptr, gseg_ptr, B, D, R, stride_x_b, stride_seg_c, stride_seg_v,
                       stride_gseg_c, stride_gseg_v, alpha, lambda_pull, eps,
                       BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr):
    """dX of the line margin: the GEMM part ``acc_i + (sum_r rowp_ri) x_i`` plus the own-class
    part by direct differences; and the own-class segment gradients.

    With ``g_i = grad_out_i (1 - exp(-lse_i)) + 2 lambda_pull d_i grad_out_i`` (``d line_i / d d_i``),
    ``c_i = g_i / d_i`` where ``|e_i|^2 >= eps`` (else 0), ``e = x - p - t u``, ``eu = e.u``,
    ``b = max(|u|^2, eps)``, ``tt = (x - p).u / b``, ``s = [0 <= tt <= 1] eu / b`` (the path
    through t; ``2 tt u`` only where ``|u|^2 >= eps``)::

        dX_i += c_i (e - s u)
        dP_y += c_i (-(1 - t) e + s (u + x - p - 2 tt u))
        dQ_y += c_i (-t e - s (x - p - 2 tt u))

    (the exact derivative of ``d = sqrt(max(|e|^2, eps))``, as autograd takes it). ``ATOMIC``:
    added into the segment gradient with float32 atomics; else written per row into
    ``gseg_ptr`` as B x 2 x D (the launcher sums them by label, deterministically).

    Args:
        acc_ptr: B x D float32 ``[AB [P; Q]]`` (contiguous). rowp_ptr: R x B float32 row partials.
        x_ptr, seg_ptr, label_ptr: as ``_lm2_own_kernel``. lse_ptr, go_ptr, dpos_ptr: B float32.
        gx_ptr: B x D output in x's dtype (contiguous). gseg_ptr: C x 2 x D float32 (ATOMIC) or
            B x 2 x D float32.
        B, D, R: sizes. stride_x_b, stride_seg_c, stride_seg_v: as ``_lm2_own_kernel``.
        stride_gseg_c, stride_gseg_v: strides of gseg (class or row, p/q).
        alpha, lambda_pull, eps: as the forward. BLOCK_B: rows per program. BLOCK_D: D-chunk.
        ATOMIC: see above.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    lab = tl.load(label_ptr + rows, mask=rmask, other=0)
    xrow = x_ptr + rows64[:, None] * stride_x_b
    prow = seg_ptr + lab[:, None] * stride_seg_c
    qrow = prow + stride_seg_v
    _, uu, b, tt, t, e2, eu, _ = _own_geometry(xrow, prow, qrow, rmask, D, BLOCK_B, BLOCK_D)
    hr = tl.zeros([BLOCK_B], dtype=tl.float32)
    for r in range(0, R):
        hr += tl.load(rowp_ptr + r * B + rows, mask=rmask, other=0.0)
    go = tl.load(go_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    d = tl.load(dpos_ptr + rows, mask=rmask, other=1.0)
    g = go * (1.0 - tl.exp(-lse)) + 2.0 * lambda_pull * d * go
    c = tl.where(rmask & (e2 >= eps), g / d, 0.0)
    s = tl.where((tt >= 0.0) & (tt <= 1.0), eu / b, 0.0)
    tt2 = tl.where(uu >= eps, 2.0 * tt, 0.0)
    if ATOMIC:
        grow = gseg_ptr + lab[:, None] * stride_gseg_c
    else:
        grow = gseg_ptr + rows64[:, None] * stride_gseg_c
    odt = gx_ptr.dtype.element_ty
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x, p, u, m2 = _own_chunk(xrow, prow, qrow, rmask, dd, D)
        xp = x - p
        e = xp - t[:, None] * u
        w = xp - tt2[:, None] * u
        acc = tl.load(acc_ptr + rows64[:, None] * D + dd[None, :], mask=m2, other=0.0)
        gx = acc + hr[:, None] * x + c[:, None] * (e - s[:, None] * u)
        tl.store(gx_ptr + rows64[:, None] * D + dd[None, :], gx.to(odt), mask=m2)
        gp = c[:, None] * (-(1.0 - t[:, None]) * e + s[:, None] * (u + w))
        gq = c[:, None] * (-t[:, None] * e - s[:, None] * w)
        if ATOMIC:
            tl.atomic_add(grow + dd[None, :], gp, mask=m2)
            tl.atomic_add(grow + stride_gseg_v + dd[None, :], gq, mask=m2)
        else:
            tl.store(grow + dd[None, :], gp, mask=m2)
            tl.store(grow + stride_gseg_v + dd[None, :], gq, mask=m2)

_ROWS_X = ("stride_x_b", "stride_seg_c", "stride_seg_v")
_UNIT_X = ("stride_x_d", "stride_seg_d")
_STRIDES = "stride_x_b stride_x_d stride_seg_c stride_seg_v stride_seg_d: i32"
KERNELS: Dict[str, KernelSpec] = {
    "stats": KernelSpec(
        _lm_class_stats_kernel, "seg_ptr: *seg; pp_ptr pu_ptr uu_ptr: *fp32; C D: i32; "
        "stride_seg_c stride_seg_v stride_seg_d: i32",
        unit=("stride_seg_d",), rows=("stride_seg_c", "stride_seg_v"), gemm=False),
    "fwd": KernelSpec(
        _lm_fwd_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; base_ptr xx_ptr pp_ptr pu_ptr "
        f"uu_ptr m_ptr s_ptr: *fp32; B C D: i32; {_STRIDES}; classes_per_split: i32; "
        "alpha eps: fp32", unit=_UNIT_X, rows=_ROWS_X),
    "dpq": KernelSpec(
        _lm_bwd_dpq_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; base_ptr lse_ptr go_ptr "
        f"xx_ptr pp_ptr pu_ptr uu_ptr g_ptr: *fp32; B C D: i32; {_STRIDES}; "
        "stride_g_c stride_g_v stride_g_d: i32; alpha eps hmax: fp32",
        unit=(*_UNIT_X, "stride_g_d"), rows=(*_ROWS_X, "stride_g_c", "stride_g_v")),
    "dx": KernelSpec(
        _lm_bwd_dx_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; base_ptr lse_ptr go_ptr "
        f"xx_ptr pp_ptr pu_ptr uu_ptr w_ptr: *fp32; B C D: i32; {_STRIDES}; "
        "classes_per_split: i32; alpha eps hmax: fp32", unit=_UNIT_X, rows=_ROWS_X),
    # design v2 (docs/kernels.md, "Line margin, second design")
    "prep2": KernelSpec(
        _lm2_prep_kernel, "seg_ptr: *seg; sx_ptr: *x; st_ptr: *fp32; C D: i32; "
        "stride_seg_c stride_seg_v stride_seg_d: i32",
        unit=("stride_seg_d",), rows=("stride_seg_c", "stride_seg_v"), gemm=False),
    "fwd2": KernelSpec(
        _lm2_fwd_kernel, "x_ptr sx_ptr: *x; label_ptr: *i64; base_ptr xx_ptr st_ptr m_ptr s_ptr: "
        "*fp32; B C D: i32; stride_x_b: i32; nsplit: i32; alpha eps: fp32", rows=("stride_x_b",)),
    "bwd2": KernelSpec(
        _lm2_bwd_kernel, "x_ptr sx_ptr: *x; label_ptr: *i64; base_ptr lse_ptr go_ptr xx_ptr "
        "st_ptr: *fp32; ab_ptr: *x; rowp_ptr colp_ptr: *fp32; B C D c0 Cc: i32; stride_x_b: i32; "
        "alpha eps hmax: fp32", rows=("stride_x_b",)),
    "dseg2": KernelSpec(
        _lm2_dseg_kernel, "g_ptr: *fp32; seg_ptr: *seg; colp_ptr: *fp32; out_ptr: *seg; "
        "n D Cc R: i32; stride_seg_c stride_seg_v stride_seg_d: i32; "
        "stride_out_c stride_out_v stride_out_d: i32",
        unit=("stride_seg_d", "stride_out_d"),
        rows=("stride_seg_c", "stride_seg_v", "stride_out_c", "stride_out_v"), gemm=False),
    "own2": KernelSpec(
        _lm2_own_kernel, "x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; m_ptr dpos_ptr xx_ptr base_ptr: "
        "*fp32; B D: i32; stride_x_b stride_seg_c stride_seg_v: i32; alpha eps: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v"), gemm=False),
    "lse2": KernelSpec(
        _lm2_lse_kernel, "m_ptr s_ptr dpos_ptr lse_ptr out_ptr: *fp32; B nsplit: i32; "
        "alpha lambda_pull: fp32", gemm=False),
    "finish2": KernelSpec(
        _lm2_finish_kernel, "acc_ptr rowp_ptr: *fp32; x_ptr: *x; seg_ptr: *seg; label_ptr: *i64; "
        "lse_ptr go_ptr dpos_ptr: *fp32; gx_ptr: *x; gseg_ptr: *fp32; B D R: i32; "
        "stride_x_b stride_seg_c stride_seg_v stride_gseg_c stride_gseg_v: i32; "
        "alpha lambda_pull eps: fp32",
        rows=("stride_x_b", "stride_seg_c", "stride_seg_v", "stride_gseg_c", "stride_gseg_v"), gemm=False),
}
#: The kernels of each design (``DESIGN``); "stats" is v1's.
DESIGN_KERNELS = {"v1": ("stats", "fwd", "dpq", "dx"),
                  "v2": ("own2", "prep2", "fwd2", "lse2", "bwd2", "dseg2", "finish2")}
_HMAX = {torch.float16: 6.0e4, torch.bfloat16: 3.0e38, torch.float32: 3.0e38}


# ----------------------------------------------------------------------------- configurations
def _family_configs(stats, fwd, dpq, dx, block_d, v2) -> Dict[str, KernelConfig]:
    """One family's entries from (BLOCK_B, BLOCK_C, num_warps, num_stages) tuples (stats: no B);
    ``v2``: the second design's ``prep2`` / ``dseg2`` (BLOCK_C, warps, stages, block_d) and
    ``fwd2`` / ``bwd2`` (BLOCK_B, BLOCK_C, warps, stages, block_d)."""
    out = {"stats": KernelConfig({"BLOCK_C": stats[0]}, stats[1], stats[2], block_d)}
    for name, (bb, bc, w, st) in (("fwd", fwd), ("dpq", dpq), ("dx", dx)):
        out[name] = KernelConfig({"BLOCK_B": bb, "BLOCK_C": bc}, w, st, block_d)
    for name in ("prep2", "dseg2"):
        bc, w, st, bd = v2[name]
        out[name] = KernelConfig({"BLOCK_C": bc}, w, st, bd)
    for name in ("fwd2", "bwd2"):
        bb, bc, w, st, bd = v2[name]
        out[name] = KernelConfig({"BLOCK_B": bb, "BLOCK_C": bc}, w, st, bd)
    for name in ("own2", "finish2", "lse2"):  # row kernels: O(B D) or O(B)
        bb, bd = v2.get(name, v2["rows"])
        out[name] = KernelConfig({"BLOCK_B": bb}, 4, 1, None if name == "lse2" else bd)
    return out


#: ``CONFIGS[family][kernel]``: ``"half"`` (float16/bfloat16 x) and ``"fp32"`` on a GPU;
#: ``"interp"`` only under ``TRITON_INTERPRET=1`` (few, large blocks, BLOCK_D fitted to D: the
#: interpreter's cost is per program and per padded element). Why these sizes: docs/kernels.md.
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "half": _family_configs((64, 4, 2), fwd=(128, 64, 8, 3), dpq=(64, 64, 8, 2),
                            dx=(64, 64, 8, 3), block_d=(64, 64),
                            v2=dict(prep2=(32, 4, 1, (64, 64)), dseg2=(32, 4, 1, (64, 64)),
                                    rows=(16, (64, 64)), lse2=(256, None),
                                    fwd2=(128, 128, 8, 3, (64, 64)),
                                    bwd2=(128, 32, 4, 4, (64, 64)))),
    "fp32": _family_configs((64, 4, 2), fwd=(64, 128, 8, 2), dpq=(64, 64, 8, 3),
                            dx=(64, 64, 8, 3), block_d=(64, 64),
                            v2=dict(prep2=(32, 4, 1, (64, 64)), dseg2=(32, 4, 1, (64, 64)),
                                    rows=(16, (64, 64)), lse2=(256, None),
                                    fwd2=(128, 64, 8, 4, (16, 16)),
                                    bwd2=(128, 32, 4, 4, (16, 16)))),
    "interp": _family_configs((128, 4, 1), fwd=(128, 128, 4, 1), dpq=(128, 128, 4, 1),
                              dx=(128, 128, 4, 1), block_d=(16, 128),
                              v2=dict(prep2=(128, 4, 1, (16, 128)), dseg2=(128, 4, 1, (16, 128)),
                                      rows=(64, (16, 256)), lse2=(256, None),
                                      fwd2=(128, 128, 4, 1, (16, 128)),
                                      bwd2=(128, 128, 4, 1, (16, 128)))),
}
assert set(CONFIGS) - {"interp"} == set(FAMILY_DTYPES)
TARGET_PROGRAMS = 264  # v1: ~2 waves on 132 SMs
MAX_SPLITS = 64
#: v2: the B x Cc elements of one class chunk of the backward (a~, b~ are 2 B Cc values in x's
#: dtype); the largest temporaries of the backward are O(B Cc).
CHUNK_ELEMENTS = 1 << 24
#: v2: the most class splits of the forward grid.
MAX_SPLITS_V2 = 1024
#: The design ``line_margin`` runs: "v2" (default) or "v1" (``DAAL_LINE_MARGIN_DESIGN``).
DESIGN = os.environ.get("DAAL_LINE_MARGIN_DESIGN", "v2")


def _precision(dtype: torch.dtype, *, gpu: bool | None = None) -> str:
    """The line margin's ``tl.dot`` input precision: float32 accuracy for float32 inputs whatever
    ``torch.get_float32_matmul_precision()`` says (3xTF32 on a GPU, IEEE under the interpreter).
    "high"/"medium" allow single-pass TF32 (docs/method.md, "Numerics") but do not require it, and
    these kernels do not round their operands to TF32 as a single pass would need."""
    return input_precision(dtype, gpu=gpu, matmul_precision="highest")


def _gpu_flags(entry: str, dtype: torch.dtype):
    if entry == "prep2":
        return {"CAST": True}
    if entry == "finish2":  # atomics by default; per-row output under deterministic algorithms
        return [{"ATOMIC": True}, {"ATOMIC": False}]
    if entry in ("stats", "dseg2", "own2", "lse2"):
        return {}
    return {"INPUT_PRECISION": _precision(dtype, gpu=True)}


def launches() -> List[Launch]:
    """Every configuration the launchers of this module can pick on a GPU (compile tests), with
    float32 segments (the dtype of ``DAALLoss``'s parameters)."""
    return expand("line_margin", CONFIGS, KERNELS, _gpu_flags)


# ----------------------------------------------------------------------------- launchers
def own_distance_sq(x: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``|x_i - p_i - t_i u_i|^2`` (B values, floored at eps) for rows ``x``, ``p``, ``q`` (B x D),
    ``u = q - p``, ``t = clamp((x - p).u / max(|u|^2, eps), 0, 1)``: the direct form."""
    u = q - p
    proj = ((x - p) * u).sum(1)
    t = torch.clamp(proj / torch.clamp((u * u).sum(1), min=EPS), 0.0, 1.0)
    e = x - p - t[:, None] * u
    return torch.clamp((e * e).sum(1), min=EPS)


def _split(C: int, row_tiles: int, block_c: int):
    """(classes_per_split, nsplit): about TARGET_PROGRAMS programs, every split non-empty."""
    tiles = cdiv(C, block_c)
    want = max(1, min(MAX_SPLITS, cdiv(TARGET_PROGRAMS, row_tiles), tiles))
    per = cdiv(tiles, want) * block_c
    return per, cdiv(C, per)


def _class_stats(seg: torch.Tensor, cfgs: Dict[str, KernelConfig]):
    C, _, D = seg.shape
    pp = torch.empty(C, device=seg.device, dtype=torch.float32)
    pu = torch.empty_like(pp)
    uu = torch.empty_like(pp)
    cfg = cfgs["stats"]
    _lm_class_stats_kernel[(cdiv(C, cfg.blocks["BLOCK_C"]),)](
        seg, pp, pu, uu, C, D, seg.stride(0), seg.stride(1), seg.stride(2), **cfg.launch(D))
    return pp, pu, uu


def _forward_lse(x, seg, labels, base, xx, stats, cfgs, alpha):
    B, D = x.shape
    C = seg.shape[0]
    cfg = cfgs["fwd"]
    row_tiles = cdiv(B, cfg.blocks["BLOCK_B"])
    per, nsplit = _split(C, row_tiles, cfg.blocks["BLOCK_C"])
    m = torch.empty(nsplit, B, device=x.device, dtype=torch.float32)
    s = torch.empty_like(m)
    _lm_fwd_kernel[(row_tiles, nsplit)](
        x, seg, labels, base, xx, *stats, m, s, B, C, D, x.stride(0), x.stride(1),
        seg.stride(0), seg.stride(1), seg.stride(2), per, float(alpha), EPS,
        INPUT_PRECISION=_precision(x.dtype), **cfg.launch(D))
    # lse = log(e^0 + sum_s s_s e^{m_s}); every m_s >= 0 (the running max starts at 0).
    top = m.max(0).values
    total = torch.exp(-top) + (s * torch.exp(m - top)).sum(0)
    return top + torch.log(total)


def _prepare(x, seg, d_pos, margins, alpha):
    """Per-call O(B + C) inputs of the kernels: configs, alpha(d_pos + m), |x|^2, class stats."""
    cfgs = CONFIGS[config_family(x.dtype)]
    base = (alpha * (d_pos.detach().float() + margins.detach().float())).contiguous()
    xx = (x.float() * x.float()).sum(1).contiguous()
    return cfgs, base, xx, _class_stats(seg, cfgs)


# Registered with torch.library so torch.compile(fullgraph=True) sees two opaque operators.
# Only x, segments, labels, d_pos, margins and the B-vector lse are saved for the backward;
# the O(B + C) statistics are recomputed there.
@torch.library.custom_op("daal_triton::line_lse", mutates_args=())
def _line_lse_op(x: torch.Tensor, seg: torch.Tensor, d_pos: torch.Tensor, labels: torch.Tensor,
                 margins: torch.Tensor, alpha: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lse_i / alpha, lse_i)``, lse over ``{0} U {alpha(d_pos_i + m_i - delta_ic)}_{c != y_i}``."""
    cfgs, base, xx, stats = _prepare(x, seg, d_pos, margins, alpha)
    lse = _forward_lse(x, seg, labels, base, xx, stats, cfgs, alpha)
    return lse / alpha, lse


@_line_lse_op.register_fake
def _line_lse_fake(x, seg, d_pos, labels, margins, alpha):
    out = x.new_empty((x.shape[0],), dtype=torch.float32)
    return out, torch.empty_like(out)


@torch.library.custom_op("daal_triton::line_lse_backward", mutates_args=())
def _line_lse_backward_op(grad_out: torch.Tensor, x: torch.Tensor, seg: torch.Tensor,
                          d_pos: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor,
                          lse: torch.Tensor, alpha: float
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dX, dSegments, dD_pos)`` by the envelope-theorem formulas, tiles recomputed."""
    cfgs, base, xx, (pp, pu, uu) = _prepare(x, seg, d_pos, margins, alpha)
    B, D = x.shape
    C = seg.shape[0]
    go = grad_out.float().contiguous()
    prec = _precision(x.dtype)
    hmax = _HMAX[x.dtype]
    grad_dpos = go * (1.0 - torch.exp(-lse))
    cfg = cfgs["dpq"]
    g = torch.empty(C, 2, D, device=x.device, dtype=torch.float32)
    _lm_bwd_dpq_kernel[(cdiv(C, cfg.blocks["BLOCK_C"]),)](
        x, seg, labels, base, lse, go, xx, pp, pu, uu, g, B, C, D,
        x.stride(0), x.stride(1), seg.stride(0), seg.stride(1), seg.stride(2),
        g.stride(0), g.stride(1), g.stride(2), float(alpha), EPS, hmax,
        INPUT_PRECISION=prec, **cfg.launch(D))
    cfg = cfgs["dx"]
    row_tiles = cdiv(B, cfg.blocks["BLOCK_B"])
    per, nsplit = _split(C, row_tiles, cfg.blocks["BLOCK_C"])
    w = torch.empty(nsplit, B, D, device=x.device, dtype=torch.float32)
    _lm_bwd_dx_kernel[(row_tiles, nsplit)](
        x, seg, labels, base, lse, go, xx, pp, pu, uu, w, B, C, D,
        x.stride(0), x.stride(1), seg.stride(0), seg.stride(1), seg.stride(2),
        per, float(alpha), EPS, hmax, INPUT_PRECISION=prec, **cfg.launch(D))
    grad_x = (w[0] if nsplit == 1 else w.sum(0)).to(x.dtype)
    return grad_x, g.to(seg.dtype), grad_dpos.to(d_pos.dtype)


@_line_lse_backward_op.register_fake
def _line_lse_backward_fake(grad_out, x, seg, d_pos, labels, margins, lse, alpha):
    return torch.empty_like(x), torch.empty_like(seg), torch.empty_like(d_pos)


def _line_lse_setup_context(ctx, inputs, output):
    x, seg, d_pos, labels, margins, alpha = inputs
    ctx.save_for_backward(x, seg, d_pos, labels, margins, output[1])
    ctx.alpha = alpha
    ctx.mark_non_differentiable(output[1])


_line_lse_backward_direct = direct(_line_lse_backward_op)


def _line_lse_autograd_backward(ctx, grad_out, _grad_lse):
    x, seg, d_pos, labels, margins, lse = ctx.saved_tensors
    gx, gseg, gpos = _line_lse_backward_direct(
        grad_out, x, seg, d_pos, labels, margins, lse, ctx.alpha)
    return gx, gseg, gpos, None, None, None


_line_lse_op.register_autograd(_line_lse_autograd_backward, setup_context=_line_lse_setup_context)
_line_lse = eager(_line_lse_op)


# ----------------------------------------------------------------------------- design v2 launchers
def wave_split(row_tiles: int, class_tiles: int, sms: int, max_splits: int = MAX_SPLITS_V2) -> int:
    """``_common.wave_split`` with the forward's cap on class splits."""
    return _wave_split(row_tiles, class_tiles, sms, max_splits)


def chunk_classes(B: int, C: int, block_b: int, block_c: int, sms: int,
                  elements: Optional[int] = None) -> int:
    """Cc, the classes per chunk of the v2 backward: a multiple of ``block_c`` with
    ``B Cc <= elements`` (``CHUNK_ELEMENTS``; at least one class tile), preferring, among the
    widths down to 3/4 of the largest, one whose grid (row tiles x Cc / block_c) is whole waves
    (narrower chunks would mean more launches: at C = 1M they cost more than a partial wave)."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    most = max(1, elements // max(1, B * block_c))
    most = min(most, cdiv(C, block_c))
    rt = cdiv(B, block_b)
    if sms > 1:
        for ct in range(most, max(1, (3 * most) // 4) - 1, -1):
            if (rt * ct) % sms == 0:
                return ct * block_c
    return most * block_c


def _cast_segments(seg: torch.Tensor, x_dtype: torch.dtype, cfgs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(st, sx)``: the 4 x C class statistics and, when the segments are not already contiguous
    in x's dtype, their contiguous copy in x's dtype (else an empty tensor: ``sx`` is ``seg``)."""
    C, _, D = seg.shape
    cast = seg.dtype != x_dtype or not seg.is_contiguous()
    st = torch.empty(4, C, device=seg.device, dtype=torch.float32)
    sx = torch.empty((C, 2, D) if cast else (0,), device=seg.device, dtype=x_dtype)
    cfg = cfgs["prep2"]
    if C:
        _lm2_prep_kernel[(cdiv(C, cfg.blocks["BLOCK_C"]),)](
            seg, sx if cast else seg, st, C, D, seg.stride(0), seg.stride(1), seg.stride(2),
            CAST=cast, **cfg.launch(D))
    return st, sx


def _own_rows(x, seg, labels, margins, alpha, cfgs) -> torch.Tensor:
    """``rs`` (3 x B float32): the own-class distances ``d_pos`` (direct form), ``|x|^2`` and
    ``alpha (d_pos + m)`` (``_lm2_own_kernel``, one launch)."""
    B, D = x.shape
    rs = torch.empty(3, B, device=x.device, dtype=torch.float32)
    d_pos, xx, base = rs[0], rs[1], rs[2]
    if B:
        cfg = cfgs["own2"]
        _lm2_own_kernel[(cdiv(B, cfg.blocks["BLOCK_B"]),)](
            x, seg, labels, margins.detach().float().contiguous(), d_pos, xx, base, B, D, x.stride(0),
            seg.stride(0), seg.stride(1), float(alpha), EPS, **cfg.launch(D))
    return rs


def _unit_feature_stride(seg: torch.Tensor) -> torch.Tensor:
    return seg if seg.stride(2) == 1 else seg.contiguous()


@torch.library.custom_op("daal_triton::line_margin2", mutates_args=())
def _line_margin2_op(x: torch.Tensor, seg: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor,
                     alpha: float, lambda_pull: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, lse, rs, st, sx)``: the forward of design v2, four launches (own-class rows,
    class statistics, the streaming logsumexp, the merge). ``out_i = lse_i / alpha + lambda_pull
    d_i^2``; ``rs`` (3 x B: ``d_pos``, ``|x|^2``, ``alpha (d_pos + m)``), ``st`` (4 x C class
    statistics) and ``sx`` (the segments in x's dtype, or empty when they already are) are
    computed once per call and handed to the backward with ``lse``."""
    cfgs = CONFIGS[config_family(x.dtype)]
    x = x if x.stride(1) == 1 else x.contiguous()
    seg = _unit_feature_stride(seg)
    B, D = x.shape
    C = seg.shape[0]
    rs = _own_rows(x, seg, labels, margins, alpha, cfgs)
    d_pos, xx, base = rs[0], rs[1], rs[2]
    st, sx = _cast_segments(seg, x.dtype, cfgs)
    s2 = seg if sx.numel() == 0 else sx
    cfg = cfgs["fwd2"]
    bb, bc = cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"]
    row_tiles = cdiv(B, bb)
    nsplit = wave_split(row_tiles, cdiv(C, bc), sm_count(x.device))
    m = torch.empty(nsplit, B, device=x.device, dtype=torch.float32)
    s = torch.empty_like(m)
    lse = torch.empty(B, device=x.device, dtype=torch.float32)
    out = torch.empty_like(lse)
    if B:
        _lm2_fwd_kernel[(row_tiles, nsplit)](
            x, s2, labels, base, xx, st, m, s, B, C, D, x.stride(0), nsplit, float(alpha), EPS,
            INPUT_PRECISION=_precision(x.dtype), **cfg.launch(D))
        lcfg = cfgs["lse2"]
        _lm2_lse_kernel[(cdiv(B, lcfg.blocks["BLOCK_B"]),)](
            m, s, d_pos, lse, out, B, nsplit, float(alpha), float(lambda_pull), **lcfg.launch())
    return out, lse, rs, st, sx


@_line_margin2_op.register_fake
def _line_margin2_fake(x, seg, labels, margins, alpha, lambda_pull):
    out = x.new_empty((x.shape[0],), dtype=torch.float32)
    C, _, D = seg.shape
    cast = seg.dtype != x.dtype or not seg.is_contiguous()
    sx = x.new_empty((C, 2, D) if cast else (0,))
    return (out, torch.empty_like(out), x.new_empty((3, x.shape[0]), dtype=torch.float32),
            x.new_empty((4, C), dtype=torch.float32), sx)


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
    if _MM_OUT_DTYPE.get(key, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE[key] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[key] = False
    return torch.mm(a, b).float()


@torch.library.custom_op("daal_triton::line_margin2_backward", mutates_args=())
def _line_margin2_backward_op(grad_out: torch.Tensor, x: torch.Tensor, seg: torch.Tensor,
                              sx: torch.Tensor, st: torch.Tensor, labels: torch.Tensor,
                              lse: torch.Tensor, rs: torch.Tensor, alpha: float,
                              lambda_pull: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(dX, dSegments)`` of design v2, chunk by chunk of Cc classes: one fused kernel (the
    forward GEMMs once, ``a~``, ``b~`` and the row/column partials), then two GEMMs
    (``torch.mm``) and the segment-gradient epilogue; last, ``_lm2_finish_kernel`` forms dX and
    adds the own-class terms (direct form). Autocast is off inside (a backward run under autocast
    must not lower the float32 GEMM outputs the epilogue reads)."""
    if not torch.is_autocast_enabled(x.device.type):  # entering a context costs ~7 µs per call
        return _line_margin2_backward(grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _line_margin2_backward(grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull)


def _line_margin2_backward(grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull):
    cfgs = CONFIGS[config_family(x.dtype)]
    x = x if x.stride(1) == 1 else x.contiguous()
    seg = _unit_feature_stride(seg)
    B, D = x.shape
    C = seg.shape[0]
    s2 = seg if sx.numel() == 0 else sx
    go = grad_out.float().contiguous()
    # the own-class segment rows are added with float32 atomics, unless PyTorch is asked for
    # deterministic algorithms: then summed by label with index_put_ (sorted, deterministic)
    atomic = not torch.are_deterministic_algorithms_enabled()
    gseg = torch.empty(C, 2, D, device=x.device, dtype=torch.float32 if atomic else seg.dtype)
    cfg, dcfg = cfgs["bwd2"], cfgs["dseg2"]
    bb, bc = cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"]
    row_tiles = cdiv(B, bb)
    cc = chunk_classes(B, C, bb, bc, sm_count(x.device))
    ctiles = cc // bc
    ab = torch.empty(B, 2 * cc, device=x.device, dtype=x.dtype)
    rowp = torch.empty(ctiles, B, device=x.device, dtype=torch.float32)
    colp = torch.empty(row_tiles, 4, cc, device=x.device, dtype=torch.float32)
    s2rows = s2.view(2 * C, D)
    prec, hmax = _precision(x.dtype), _HMAX[x.dtype]
    d_pos, xx, base = rs[0], rs[1], rs[2]
    acc, hr, rows_p = None, None, 0
    for c0 in range(0, C, cc):
        n = min(cc, C - c0)
        _lm2_bwd_kernel[(row_tiles, cdiv(n, bc))](
            x, s2, labels, base, lse, go, xx, st, ab, rowp, colp, B, C, D, c0, cc, x.stride(0),
            float(alpha), EPS, hmax, INPUT_PRECISION=prec, **cfg.launch(D))
        nt = cdiv(n, bc)
        abn = ab[:, : 2 * n]
        part = mm_f32(abn, s2rows[2 * c0: 2 * (c0 + n)])  # sum_c a~ p_c + b~ q_c
        if acc is None and C <= cc:  # one chunk: the partials go to the finish kernel as they are
            acc, hr, rows_p = part, rowp, nt
        else:
            acc = part if acc is None else acc + part
            hr = rowp[:nt].sum(0) if hr is None else hr + rowp[:nt].sum(0)
            rows_p = 1
        g = mm_f32(abn.t(), x).contiguous()  # rows 2c, 2c + 1: [A~^T X]_c, [B~^T X]_c
        gs, ss = gseg[c0: c0 + n], seg[c0: c0 + n]
        _lm2_dseg_kernel[(cdiv(n, dcfg.blocks["BLOCK_C"]),)](
            g, ss, colp, gs, n, D, cc, row_tiles, ss.stride(0), ss.stride(1), ss.stride(2),
            gs.stride(0), gs.stride(1), gs.stride(2), **dcfg.launch(D))
    gx = torch.empty(B, D, device=x.device, dtype=x.dtype)
    if B:
        if acc is None:  # no classes
            acc, hr, rows_p = torch.zeros(B, D, device=x.device), torch.zeros(1, B, device=x.device), 1
        own = gseg if atomic else torch.empty(B, 2, D, device=x.device, dtype=torch.float32)
        fcfg = cfgs["finish2"]
        _lm2_finish_kernel[(cdiv(B, fcfg.blocks["BLOCK_B"]),)](
            acc.contiguous(), hr.reshape(-1, B).contiguous(), x, seg, labels, lse, go, d_pos, gx, own, B, D,
            rows_p, x.stride(0), seg.stride(0), seg.stride(1), own.stride(0), own.stride(1),
            float(alpha), float(lambda_pull), EPS, ATOMIC=atomic, **fcfg.launch(D))
        if not atomic:
            gseg.index_put_((labels,), own.to(gseg.dtype), accumulate=True)
    return gx, gseg.to(seg.dtype)


@_line_margin2_backward_op.register_fake
def _line_margin2_backward_fake(grad_out, x, seg, sx, st, labels, lse, rs, alpha, lambda_pull):
    return torch.empty_like(x), torch.empty_like(seg, memory_format=torch.contiguous_format)


def _line_margin2_setup_context(ctx, inputs, output):
    x, seg, labels, margins, alpha, lambda_pull = inputs
    _, lse, rs, st, sx = output
    ctx.save_for_backward(x, seg, sx, st, labels, lse, rs)
    ctx.alpha, ctx.lambda_pull = alpha, lambda_pull
    ctx.mark_non_differentiable(lse, rs, st, sx)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved statistics


_line_margin2_backward_direct = direct(_line_margin2_backward_op)


def _line_margin2_autograd_backward(ctx, grad_out, _g_lse, _g_rs, _g_st, _g_sx):
    if grad_out is None:
        return (None,) * 6
    x, seg, sx, st, labels, lse, rs = ctx.saved_tensors
    gx, gseg = _line_margin2_backward_direct(
        grad_out, x, seg, sx, st, labels, lse, rs, ctx.alpha, ctx.lambda_pull)
    return gx, gseg, None, None, None, None


_line_margin2_op.register_autograd(_line_margin2_autograd_backward, setup_context=_line_margin2_setup_context)
_line_margin2 = eager(_line_margin2_op)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def line_margin(x: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor,
                margins: torch.Tensor, *, alpha: float, lambda_pull: float,
                design: Optional[str] = None) -> torch.Tensor:
    """Per-sample ``softplus(logsumexp_{c != y_i} alpha(delta_iy + m_i - delta_ic)) / alpha
    + lambda_pull delta_iy^2`` (B values), fused: nothing B x C is ever stored.

    ``x`` B x D (already normalised), ``labels`` B ints in [0, C), ``segments`` C x 2 x D,
    ``margins`` B (no gradient). Differentiable w.r.t. ``x`` and ``segments``. Returns float32 for
    float16/bfloat16/float32 inputs; float64 inputs raise ``ValueError`` (the loss routes them to
    the reference). ``design``: "v1" or "v2" (internal; default ``DESIGN``).
    """
    compute_dtype("line_margin", x, segments)
    if x.dtype not in _SUPPORTED or segments.dtype not in _SUPPORTED:
        raise ValueError(f"x and segments must be float16/bfloat16/float32, got {x.dtype} and "
                         f"{segments.dtype}")
    if x.ndim != 2 or segments.ndim != 3 or segments.shape[1] != 2 or segments.shape[2] != x.shape[1]:
        raise ValueError(f"x must be B x D and segments C x 2 x D, got {tuple(x.shape)} and "
                         f"{tuple(segments.shape)}")
    labels = labels.long().contiguous()
    if _design(design) == "v2":  # the own-class distance inside (direct form, exact)
        return _line_margin2(x, segments, labels, margins, float(alpha), float(lambda_pull))[0]
    # v1: own class, direct form, float32: exact on the segment, gradient via autograd (O(B D)).
    own = segments[labels].float()
    d_pos = torch.sqrt(own_distance_sq(x.float(), own[:, 0], own[:, 1]))
    line, _ = _line_lse(x, segments, d_pos, labels, margins, float(alpha))
    if lambda_pull:
        line = line + lambda_pull * d_pos * d_pos
    return line


def _design(design: Optional[str]) -> str:
    design = DESIGN if design is None else design
    if design not in DESIGN_KERNELS:
        raise ValueError(f"line-margin design must be one of {sorted(DESIGN_KERNELS)}, got {design!r}")
    return design


def line_margin_v1(x, labels, segments, margins, *, alpha, lambda_pull):
    """``line_margin`` with the first design (the benchmarks' ``triton_v1`` provider)."""
    return line_margin(x, labels, segments, margins, alpha=alpha, lambda_pull=lambda_pull, design="v1")
