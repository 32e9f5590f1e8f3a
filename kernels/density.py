"""kNN radius, adaptive margins and density hinge, fused: one launch forward, one backward
(docs/method.md, steps 3-4 and the density term of step 6).

Forward (``_density_fwd_kernel``), one program per BLOCK_B samples ``i``, from the kNN's
``(dist, index)`` (B x K, ``index = -1`` where a neighbour is missing)::

    k_i = #{k : index_ik >= 0},  valid_i = k_i > 0,  r_i = sum_k dist_ik / k_i  (inf if not valid)
    rbar_i = mean of r_j over the valid j with y_j = y_i        (the class's mean radius)
    m_i = clamp(m0 (r_i / max(rbar_i, eps))^gamma, m_min, m_max)  (valid; else m0; no gradient)
    hinge_i = max(0, tau - r_i)                                  (valid; else 0)

The class means are taken over the batch by comparing labels: each program walks all B samples
in BLOCK_J chunks (recomputing their radii from ``dist``), so the work is B^2 label compares (in
B^2 / (BLOCK_B BLOCK_J) block steps),
nothing of size C (the classes can number millions), no atomics: deterministic.

Backward (``_density_bwd_kernel``): with ``g_r_i = g_radius_i - g_hinge_i [valid_i, tau > r_i]``
(the margins carry no gradient)::

    dL/ddist_ik = g_r_i / k_i  where index_ik >= 0, else 0
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import cdiv, next_pow2
from ._common import TL_EPS, KernelConfig, KernelSpec, Launch, config_family, direct, eager, expand


@triton.jit
def _radius_rows(dist_ptr, idx_ptr, rows, rmask, K, stride_dist_b, stride_idx_b, KP: tl.constexpr):
    """``(r, valid, cnt, found)`` of a block of samples from their kNN rows (see the module
    docstring): the radius, whether any neighbour was found, how many (float32), and which slots."""
    ks = tl.arange(0, KP)
    m2 = rmask[:, None] & (ks[None, :] < K)
    rows64 = rows.to(tl.int64)
    d = tl.load(dist_ptr + rows64[:, None] * stride_dist_b + ks[None, :], mask=m2, other=0.0)
    j = tl.load(idx_ptr + rows64[:, None] * stride_idx_b + ks[None, :], mask=m2, other=-1)
    found = j >= 0
    cnt = tl.sum(found.to(tl.float32), 1)
    total = tl.sum(tl.where(found, d, 0.0), 1)
    valid = cnt > 0
    r = tl.where(valid, total / tl.maximum(cnt, 1.0), float("inf"))
    return r, valid, cnt, found


@triton.jit
def _density_fwd_kernel(dist_ptr, idx_ptr, label_ptr, r_ptr, valid_ptr, margin_ptr, hinge_ptr,
                        B, K, stride_dist_b, stride_idx_b, m0, m_min, m_max, gamma, tau,
                        BLOCK_B: tl.constexpr, BLOCK_J: tl.constexpr, KP: tl.constexpr):
    """``r``, ``valid``, ``m`` and ``hinge`` of BLOCK_B samples (module docstring).

    Args:
        dist_ptr: B x K float32 neighbour distances (unit column stride).
        idx_ptr: B x K int64 neighbour indices, -1 where missing (unit column stride).
        label_ptr: B int64 labels (in range). r_ptr, margin_ptr, hinge_ptr: B float32 outputs.
        valid_ptr: B bool output.
        B, K: sizes. stride_dist_b, stride_idx_b: row strides.
        m0, m_min, m_max, gamma, tau: the hyperparameters (docs/method.md).
        BLOCK_B: samples per program. BLOCK_J: samples per step of the class-mean walk.
        KP: next power of two >= K.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r, valid, _cnt, _found = _radius_rows(dist_ptr, idx_ptr, rows, rmask, K, stride_dist_b, stride_idx_b, KP)
    lab = tl.load(label_ptr + rows, mask=rmask, other=-1)
    sum_r = tl.zeros([BLOCK_B], dtype=tl.float32)
    cnt_r = tl.zeros([BLOCK_B], dtype=tl.float32)
    for j0 in range(0, B, BLOCK_J):
        cols = j0 + tl.arange(0, BLOCK_J)
        cmask = cols < B
        rj, vj, _cj, _fj = _radius_rows(dist_ptr, idx_ptr, cols, cmask, K, stride_dist_b, stride_idx_b, KP)
        lj = tl.load(label_ptr + cols, mask=cmask, other=-1)
        same = (lab[:, None] == lj[None, :]) & (vj & cmask)[None, :]
        sum_r += tl.sum(tl.where(same, rj[None, :], 0.0), 1)
        cnt_r += tl.sum(same.to(tl.float32), 1)
    rbar = sum_r / tl.maximum(cnt_r, 1.0)
    s = tl.where(valid, r / tl.maximum(rbar, TL_EPS), 1.0)  # 1: no log2(0) where m0 is kept
    # s^gamma as torch.pow: exp2(gamma log2 s), 0^0 = 1, and a radius of 0 (neighbours at
    # distance 0, reachable by direct calls) gives 0^gamma = 0 (gamma > 0) or inf (gamma < 0);
    # NaN reads as 1, as before
    sg = tl.where(gamma == 0.0, 1.0, tl.exp2(gamma * tl.log2(tl.where(s >= 0.0, s, 1.0))))
    m = tl.minimum(tl.maximum(tl.where(m0 == 0.0, 0.0, m0 * sg), m_min), m_max)  # 0 * inf: no NaN to max
    m = tl.where(valid, m, m0)
    hinge = tl.where(valid, tl.maximum(tau - tl.where(valid, r, 0.0), 0.0), 0.0)
    tl.store(r_ptr + rows, r, mask=rmask)
    tl.store(valid_ptr + rows, valid, mask=rmask)
    tl.store(margin_ptr + rows, m, mask=rmask)
    tl.store(hinge_ptr + rows, hinge, mask=rmask)


@triton.jit
def _density_bwd_kernel(gh_ptr, gr_ptr, dist_ptr, idx_ptr, gd_ptr, B, K, stride_dist_b,
                        stride_idx_b, stride_gd_b, tau, BLOCK_B: tl.constexpr, KP: tl.constexpr,
                        HAS_GH: tl.constexpr, HAS_GR: tl.constexpr):
    """``dL/ddist`` (B x K float32) from the gradients of ``hinge`` and ``r``.

    Args:
        gh_ptr: B float32 ``dL/dhinge`` (read with HAS_GH). gr_ptr: B float32 ``dL/dr`` (read
            with HAS_GR).
        dist_ptr, idx_ptr: the forward's inputs (B x K). gd_ptr: B x K float32 output.
        B, K: sizes. stride_dist_b, stride_idx_b, stride_gd_b: row strides. tau: the radius
            below which the hinge acts.
        BLOCK_B: samples per program. KP: next power of two >= K. HAS_GH, HAS_GR: which
            gradients exist.
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    r, valid, cnt, found = _radius_rows(dist_ptr, idx_ptr, rows, rmask, K, stride_dist_b, stride_idx_b, KP)
    g = tl.zeros([BLOCK_B], dtype=tl.float32)
    if HAS_GH:
        gh = tl.load(gh_ptr + rows, mask=rmask, other=0.0)
        g -= tl.where(valid & (tau - tl.where(valid, r, 0.0) > 0.0), gh, 0.0)
    if HAS_GR:
        g += tl.load(gr_ptr + rows, mask=rmask, other=0.0)
    g = tl.where(valid, g / tl.maximum(cnt, 1.0), 0.0)
    ks = tl.arange(0, KP)
    out = tl.where(found, g[:, None], 0.0)
    tl.store(gd_ptr + rows.to(tl.int64)[:, None] * stride_gd_b + ks[None, :], out,
             mask=rmask[:, None] & (ks[None, :] < K))


KERNELS: Dict[str, KernelSpec] = {
    "fwd": KernelSpec(
        _density_fwd_kernel, "dist_ptr: *fp32; idx_ptr label_ptr: *i64; r_ptr: *fp32; valid_ptr: *i1; "
        "margin_ptr hinge_ptr: *fp32; B K: i32; stride_dist_b stride_idx_b: i64; "
        "m0 m_min m_max gamma tau: fp32", other=("stride_dist_b", "stride_idx_b"), gemm=False),
    "bwd": KernelSpec(
        _density_bwd_kernel, "gh_ptr gr_ptr dist_ptr: *fp32; idx_ptr: *i64; gd_ptr: *fp32; B K: i32; "
        "stride_dist_b stride_idx_b stride_gd_b: i64; tau: fp32",
        other=("stride_dist_b", "stride_idx_b", "stride_gd_b"), gemm=False),
}
#: The entries by the largest KP (next_pow2(k), the kNN's k <= 128) they serve: the tiles hold
#: BLOCK x KP distances and indices, so the blocks shrink as KP grows (no spills on sm_90).
KP_ROWS = (16, 128)
#: The largest number of neighbours the kernels take (the kNN kernel's limit too).
MAX_K = KP_ROWS[-1]
_FWD = {16: KernelConfig({"BLOCK_B": 32, "BLOCK_J": 64}, num_warps=4, num_stages=1, block_d=None),
        128: KernelConfig({"BLOCK_B": 16, "BLOCK_J": 8}, num_warps=4, num_stages=1, block_d=None)}
_BWD = {16: KernelConfig({"BLOCK_B": 64}, num_warps=4, num_stages=1, block_d=None),
        128: KernelConfig({"BLOCK_B": 8}, num_warps=4, num_stages=1, block_d=None)}
#: ``CONFIGS[family][entry]`` (``fwd_kp<KP>``, ``bwd_kp<KP>``): every input is float32 (the loss's
#: dtype), so one GPU family; ``"interp"``: the interpreter's (few, large blocks).
CONFIGS: Dict[str, Dict[str, KernelConfig]] = {
    "fp32": {**{f"fwd_kp{kp}": c for kp, c in _FWD.items()}, **{f"bwd_kp{kp}": c for kp, c in _BWD.items()}},
    "interp": {**{f"fwd_kp{kp}": KernelConfig({"BLOCK_B": 256, "BLOCK_J": 256}, 4, 1, None) for kp in KP_ROWS},
               **{f"bwd_kp{kp}": KernelConfig({"BLOCK_B": 256}, 4, 1, None) for kp in KP_ROWS}},
}
_SPEC_OF = {f"{e}_kp{kp}": KERNELS[e] for e in ("fwd", "bwd") for kp in KP_ROWS}


def _entry(kind: str, kp: int) -> str:
    return f"{kind}_kp{next(limit for limit in KP_ROWS if kp <= limit)}"


def _gpu_flags(entry: str, dtype: torch.dtype) -> dict:
    kp = int(entry.split("_kp")[1])
    return {"KP": kp} if entry.startswith("fwd") else {"KP": kp, "HAS_GH": True, "HAS_GR": False}


def launches() -> List[Launch]:
    """Every configuration the launchers can pick on a GPU (compile tests): each entry with the
    largest KP it serves."""
    return expand("density", CONFIGS, _SPEC_OF, _gpu_flags)


def _kp(K: int) -> int:
    return max(2, next_pow2(max(K, 1)))


# --------------------------------------------------------------------------- operators
@torch.library.custom_op("daal_triton::density", mutates_args=())
def _density_op(dist: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, m0: float,
                m_min: float, m_max: float, gamma: float, tau: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(r, valid, margin, hinge)`` (module docstring)."""
    B, K = dist.shape
    r = torch.empty(B, device=dist.device, dtype=torch.float32)
    valid = torch.empty(B, device=dist.device, dtype=torch.bool)
    margin, hinge = torch.empty_like(r), torch.empty_like(r)
    if B:
        dist, index = dist.float().contiguous(), index.contiguous()
        cfg = CONFIGS[config_family(torch.float32)][_entry("fwd", _kp(K))]
        _density_fwd_kernel[(cdiv(B, cfg.blocks["BLOCK_B"]),)](
            dist, index, labels.contiguous(), r, valid, margin, hinge, B, K, dist.stride(0),
            index.stride(0), float(m0), float(m_min), float(m_max), float(gamma), float(tau),
            KP=_kp(K), **cfg.launch())
    return r, valid, margin, hinge


@_density_op.register_fake
def _density_fake(dist, index, labels, m0, m_min, m_max, gamma, tau):
    r = dist.new_empty((dist.shape[0],), dtype=torch.float32)
    return r, torch.empty_like(r, dtype=torch.bool), torch.empty_like(r), torch.empty_like(r)


@torch.library.custom_op("daal_triton::density_backward", mutates_args=())
def _density_backward_op(g_hinge: Optional[torch.Tensor], g_r: Optional[torch.Tensor],
                         dist: torch.Tensor, index: torch.Tensor, tau: float) -> torch.Tensor:
    """``dL/ddist`` (B x K float32)."""
    B, K = dist.shape
    gd = torch.empty(B, K, device=dist.device, dtype=torch.float32)
    if B and K:
        dist, index = dist.float().contiguous(), index.contiguous()
        cfg = CONFIGS[config_family(torch.float32)][_entry("bwd", _kp(K))]
        gh = g_hinge.float().contiguous() if g_hinge is not None else dist
        gr = g_r.float().contiguous() if g_r is not None else dist
        _density_bwd_kernel[(cdiv(B, cfg.blocks["BLOCK_B"]),)](
            gh, gr, dist, index, gd, B, K, dist.stride(0), index.stride(0), gd.stride(0), float(tau),
            KP=_kp(K), HAS_GH=g_hinge is not None, HAS_GR=g_r is not None, **cfg.launch())
    return gd


@_density_backward_op.register_fake
def _density_backward_fake(g_hinge, g_r, dist, index, tau):
    return dist.new_empty(dist.shape, dtype=torch.float32)  # contiguous, as the kernel's (any input strides)


def _setup_context(ctx, inputs, output):
    """Save ``dist`` and ``index`` (the backward recomputes ``k_i``, ``r_i`` and the hinge's
    activity from them) and ``tau``; ``valid`` and the margins carry no gradient."""
    dist, index = inputs[0], inputs[1]
    ctx.save_for_backward(dist, index)
    ctx.tau = inputs[7]
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


_density_backward_direct = direct(_density_backward_op)


def _backward(ctx, g_r, _g_valid, _g_margin, g_hinge):
    """``dL/ddist_ik = (g_radius_i - g_hinge_i [valid_i, tau > r_i]) / k_i`` where ``index_ik >= 0``,
    else 0 (module docstring), in one launch; ``dist`` is the only differentiable input."""
    dist, index = ctx.saved_tensors
    if g_r is None and g_hinge is None:
        return (None,) * 8
    gd = _density_backward_direct(g_hinge, g_r, dist, index, ctx.tau)
    return (gd,) + (None,) * 7


_density_op.register_autograd(_backward, setup_context=_setup_context)
_density = eager(_density_op)


def density(dist: torch.Tensor, index: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
            m0: float, m_min: float, m_max: float, gamma: float, tau: float
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``daal_triton.reference.density`` in one launch (``num_classes`` is not needed: the class
    means compare labels). Float32 results; differentiable in ``dist`` through ``r`` and ``hinge``.
    At most ``MAX_K`` neighbours (``ValueError`` beyond: the loss then runs the reference's)."""
    if dist.shape[1] > MAX_K:
        raise ValueError(f"density: at most {MAX_K} neighbours per sample, got {dist.shape[1]}")
    return _density(dist, index, labels, float(m0), float(m_min), float(m_max), float(gamma), float(tau))
