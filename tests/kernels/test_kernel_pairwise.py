"""Parity of ``daal_triton.kernels.pairwise`` (forward and backward) with the float64 reference,
and compilation of its configurations for sm_80 / sm_90 (``mma`` / ``wgmma`` in the PTX)."""
import os

import pytest
import torch

from daal_testing import (DEV, assert_close, assert_floors_keep_nan, compile_launches, compiler_fact, spy_launches,
                           tolerance)

from daal_triton import reference
from daal_triton.kernels import pairwise as kp
from daal_triton.kernels._common import POINTER, family, triton_release



def _check(x, y, *, tol, grad=True):
    """Forward and both gradients against the reference run in float64 on the same values."""
    x = x.detach().requires_grad_(grad)
    y = y.detach().requires_grad_(grad)
    d = kp.pairwise_distance(x, y)
    assert d.dtype == torch.float32 and d.shape == (x.shape[0], y.shape[0])
    xr = x.detach().double().requires_grad_(grad)
    yr = y.detach().double().requires_grad_(grad)
    dr = reference.pairwise_distance(xr, yr)
    assert_close(d, dr, tol, "distance")
    if grad:
        g = torch.randn(d.shape, device=d.device)
        (d * g).sum().backward()
        (dr * g.double()).sum().backward()
        assert x.grad.dtype == x.dtype and y.grad.dtype == y.dtype
        # a gradient is returned in its input's dtype, so it carries that dtype's rounding
        assert_close(x.grad, xr.grad, max(tol, tolerance(x.dtype)), "dX")
        assert_close(y.grad, yr.grad, max(tol, tolerance(y.dtype)), "dY")


@pytest.mark.parametrize("M,N,D", [(37, 53, 19), (1, 5, 1), (130, 3, 70), (5, 140, 33), (13, 40, 700)])
def test_pairwise_float32(M, N, D):
    _check(torch.randn(M, D, device=DEV), torch.randn(N, D, device=DEV), tol=tolerance(torch.float32, tf32=DEV == "cuda"))


def test_pairwise_float16():
    x = torch.randn(45, 70, device=DEV).half()
    y = torch.randn(33, 70, device=DEV).half()
    _check(x, y, tol=tolerance(torch.float16))


def test_pairwise_strided_and_mixed():
    """A transposed (non-contiguous) x and a float16 y promote to float32 and still match."""
    x = torch.randn(24, 40, device=DEV).T  # 40 x 24, column-major
    y = torch.randn(17, 24, device=DEV).half()
    _check(x, y, tol=tolerance(torch.float32, tf32=DEV == "cuda"))


def test_pairwise_duplicates_zero_grad():
    """Where the clamp binds (identical rows) the distance is sqrt(eps) and the gradient is 0."""
    x = torch.arange(12.0, device=DEV).reshape(3, 4)
    y = x[[2, 0]].clone()
    x.requires_grad_(True)
    d = kp.pairwise_distance(x, y)
    assert d[2, 0].item() == pytest.approx(1e-6) and d[0, 1].item() == pytest.approx(1e-6)
    d[2, 0].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max().item() == 0.0


def test_pairwise_duplicates_full_gradient():
    """Rows of y copied from x amid random rows, under a full random upstream gradient: dX and dY
    match the float64 reference, whose gradient is 0 on the duplicate pairs. Pins the backward's
    ``d <= thr`` (the clamp itself is where it binds): with ``d < thr`` the duplicates' H reads
    g / 1e-6 and its cancellation in ``diag(rowsum H) X - H Y`` swamps the other pairs' terms.
    Dyadic values (multiples of 1/16, |x| <= 4) keep the GEMM form exact in every precision
    (TF32 included), so a duplicate's distance is exactly the clamp, never cancellation noise."""
    x = torch.randint(-64, 65, (37, 19), device=DEV).float() / 16
    y = torch.cat([x[[2, 11, 30]], torch.randint(-64, 65, (20, 19), device=DEV).float() / 16])
    y = y[torch.randperm(23, device=DEV)]
    d = kp.pairwise_distance(x, y)
    assert (d == d.new_tensor(1e-6)).sum().item() >= 3, "the clamp binds on the duplicates"
    _check(x, y, tol=tolerance(torch.float32, tf32=DEV == "cuda"))


def test_pairwise_row_strided_inputs_and_strided_upstream_gradient():
    """Aligned rows with a wider row stride (width 32 of 64 columns: read in place, no copy) in
    the forward GEMM and the backward GEMMs, and an upstream gradient that is a transposed view
    (``d.t()`` downstream: ``g`` has strides (1, M)), which the H kernel reads in place: value and
    both gradients against the float64 reference. Contiguous inputs and gradients cannot tell a
    row stride from the width, nor ``g``'s strides from (N, 1)."""
    from daal_triton.kernels._common import aligned

    x = torch.randn(37, 64, device=DEV)[:, :32]
    y = torch.randn(41, 64, device=DEV)[:, 16:48]
    assert aligned(x) and aligned(y) and x.stride(0) == y.stride(0) == 64
    x.requires_grad_(True)
    y.requires_grad_(True)
    d = kp.pairwise_distance(x, y)
    xr = x.detach().double().requires_grad_(True)
    yr = y.detach().double().requires_grad_(True)
    dr = reference.pairwise_distance(xr, yr)
    tol = tolerance(torch.float32, tf32=DEV == "cuda")
    assert_close(d, dr, tol, "distance")
    G = torch.randn(41, 37, device=DEV)
    (d.t() * G).sum().backward()
    (dr.t() * G.double()).sum().backward()
    assert_close(x.grad, xr.grad, tol, "dX")
    assert_close(y.grad, yr.grad, tol, "dY")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_pairwise_non_finite_rows_stay_nan(bad):
    """NaN/inf in a row gives non-finite distances in its row and column where the reference does,
    and NaN in its gradient: the floor propagates NaN, it never turns it into 1e-6."""
    x = torch.randn(9, 20, device=DEV)
    y = torch.randn(6, 20, device=DEV)
    x[4, 7] = float(bad)
    y[2, 0] = float("nan")
    x.requires_grad_(True)
    y.requires_grad_(True)
    d = kp.pairwise_distance(x, y)
    ref = reference.pairwise_distance(x.detach().double(), y.detach().double())
    # which of NaN or inf an inf row gives depends on signs and, on tensor cores, on 3xTF32's
    # split of inf (its low part is NaN): the non-finite entries are the same ones
    assert torch.equal(torch.isfinite(d), torch.isfinite(ref.to(d.device)))
    assert not torch.isfinite(d[4]).any() and torch.isnan(d[:, 2]).all()
    rows, cols = [i for i in range(9) if i != 4], [j for j in range(6) if j != 2]
    assert_close(d[rows][:, cols], ref[rows][:, cols], tolerance(torch.float32, tf32=DEV == "cuda"),
                 "finite entries")
    d.sum().backward()
    assert torch.isnan(x.grad[4]).any() and torch.isnan(y.grad[2]).any()


def test_pairwise_float64_is_refused():
    """float64 is routed to the reference by daal_triton.backend, never lowered by a kernel."""
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 inputs run on the reference backend"):
        kp.pairwise_distance(x, y)


def test_pairwise_bfloat16_cpu_skip():
    if DEV == "cpu":
        pytest.skip("Triton's interpreter cannot run bfloat16 dots; bf16 parity runs in the gpu tests")
    _check(torch.randn(45, 70, device=DEV).bfloat16(), torch.randn(33, 70, device=DEV).bfloat16(),
           tol=tolerance(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pairwise_gpu(dtype):
    x = torch.randn(300, 515, device="cuda").to(dtype)
    y = torch.randn(257, 515, device="cuda").to(dtype)
    _check(x, y, tol=tolerance(dtype, tf32=True))


# ------------------------------------------------------------------------- compile for GPUs
@pytest.fixture(scope="module")
def compiled():
    return compile_launches(kp.launches())


@pytest.mark.build
def test_pairwise_floor_keeps_nan(compiled):
    assert_floors_keep_nan(compiled, ("fwd",))


@pytest.mark.build
def test_pairwise_configs_compile(compiled):
    """Generic, and the D = 512 configurations also with the hot-path specialisation."""
    assert any(spec == "aligned" for (_, _, spec), _ in compiled)
    for (cfg, cap, spec), res in compiled:
        what = f"{cfg.name} sm_{cap} {spec}"
        assert not res.get("error"), f"{what}:\n{res.get('error')}"
        ptx = res["ptx"]
        if cfg.gemm:
            want = "wgmma.mma_async" if cap == 90 else "mma.sync"
            assert want in ptx, f"{what}: no {want} in the PTX"


# Measured exceptions, by Triton release: Triton 3.6 (the GPU image's) gives the float32 3xTF32
# forward 255 registers and 16 bytes of stack where 3.8 gives 244 and none (docs/kernels.md,
# "Triton 3.6"); nothing else may spill, and this one no more than that. A compiler fact
# (tests/daal_testing.py, compiler_fact): Triton 3.7 keeps 200 B in the float16 and bfloat16
# forwards (BLOCK_D 64) besides 3.6's 16 B, a skip there.
KNOWN_SPILLS = {"3.6": {"pairwise_fwd-fp32-bd16": 16}}


@pytest.mark.build
def test_pairwise_hot_path_does_not_spill(compiled):
    """sm_90, specialised as a contiguous D = 512 launch: no local memory (cuobjdump STACK 0),
    but for the measured exceptions of an older Triton (``KNOWN_SPILLS``). The builds are the
    ``compiled`` fixture's, checked by test_pairwise_configs_compile under every Triton; the
    stack is a compiler fact (:func:`compiler_fact`)."""
    hot = [(c, r) for c, r in compiled if c[1] == 90 and c[2] == "aligned"]
    assert {c[0].spec for c, _ in hot} == set(kp.KERNELS.values())
    spills = {f"{c[0].name}": r.get("stack", "no cuobjdump report") for c, r in hot if r.get("stack") != 0}
    allowed = KNOWN_SPILLS.get(triton_release(), {})
    over = {n: st for n, st in spills.items() if not (isinstance(st, int) and st <= allowed.get(n, 0))}
    compiler_fact(not over, f"local memory (bytes per thread) on the hot path: {over}")


@pytest.mark.build
def test_pairwise_backward_loads_are_vector_loads(compiled):
    """sm_90 builds as a launch at M = N = 1,000 specialises them (D = 512; M and N no multiple of
    16; H's row stride, its stored width, and the pointers multiples of 16: the "aligned" builds): the
    backward GEMMs copy H and the rows into shared memory 16 bytes at a time (``cp.async.cg``; no
    ``cp.async.ca``, which copies 4 or 8 bytes, no synchronous 16-bit global load), and the H
    kernel stores H in vectors, never 16-bit scalars. Masked at N instead, H's loads were scalar:
    16 synchronous ``ld.global.b16`` per thread and K-step for bfloat16 H, 16 four-byte copies
    (``cp.async.ca``) for float32 (sm_90 SASS; kernels/pairwise.py, ``_pairwise_bwd_kernel``)."""
    import re

    builds = [(c[0], r) for c, r in compiled if c[1] == 90 and c[2] == "aligned" and c[0].entry in ("bwd_dx", "bwd_dy", "h")]
    assert {la.entry for la, _ in builds} == {"bwd_dx", "bwd_dy", "h"}
    for la, res in builds:
        ptx = res["ptx"]
        if la.entry == "h":
            stores = re.findall(r"\bst\.global(?:\.\w+)*", ptx)
            compiler_fact("st.global.b16" not in stores and any(".v" in st for st in stores),
                          f"{la.name}: H stored as {sorted(set(stores))}")
        else:
            scalar = re.findall(r"\bcp\.async\.ca\.\S+|\bld\.global(?:\.\w+)*\.[bu]16\b", ptx)
            assert "cp.async.cg" in ptx, la.name
            compiler_fact(not scalar, f"{la.name}: scalar loads in the backward GEMM: {sorted(set(scalar))}")


def test_launches_cover_the_launcher():
    """Every configuration the launcher picks on a GPU is one the compile tests build."""
    names = {la.name for la in kp.launches()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        fp32 = dtype == torch.float32
        variants = ("", "-tf32") if fp32 else ("",)
        for D in (1, 16, 17, 100, 512):
            for entry in ("fwd", "bwd_dx", "bwd_dy", "sqnorm"):
                bd = kp.CONFIGS[family(dtype)][entry].block_d_for(D)
                # float16's backward runs single-pass TF32 on a float32 H (kp.bwd_flags)
                vs = ("-tf32",) if entry.startswith("bwd") and dtype == torch.float16 else variants
                for v in vs:
                    name = f"pairwise_{entry}-{POINTER[dtype][1:]}-bd{bd}{v}"
                    assert name in names, name
        for v in {torch.float32: ("", "-tf32"), torch.float16: ("-tf32",)}.get(dtype, ("",)):
            assert f"pairwise_h-{POINTER[dtype][1:]}{v}" in names
    assert os.environ.get("TRITON_INTERPRET") or torch.cuda.is_available()


def test_self_distance_computes_the_norms_once(monkeypatch):
    """``pairwise_distance(x, x)`` launches one squared-norm kernel (two for distinct inputs), with
    the same distances, bit for bit, as for a copy of ``x``, and the float64 reference's gradient."""
    from daal_triton.kernels import _common

    x = torch.randn(37, 129, device=DEV, requires_grad=True)
    calls = spy_launches(monkeypatch, _common, ("_sqnorm_kernel",))
    d_self = kp.pairwise_distance(x, x)
    assert calls == ["_sqnorm_kernel"]
    d_copy = kp.pairwise_distance(x, x.detach().clone())
    assert calls == ["_sqnorm_kernel"] * 3
    assert torch.equal(d_self, d_copy)
    g = torch.randn_like(d_self)
    (dx,) = torch.autograd.grad(d_self, x, g)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(reference.pairwise_distance(x64, x64), x64, g.double())
    assert_close(dx, dx64, 1e-3, "dX")


def test_backward_h_formed_once(monkeypatch):
    """The backward reads g and d once (one H kernel launch) and runs two GEMM launches; H and
    the sums are of one rounding (bfloat16 H for bfloat16 inputs)."""
    calls = spy_launches(monkeypatch, kp, ("_pairwise_h_kernel", "_pairwise_bwd_kernel"))
    x = torch.randn(70, 20, device=DEV, requires_grad=True)
    y = torch.randn(90, 20, device=DEV, requires_grad=True)
    kp.pairwise_distance(x, y).sum().backward()
    assert calls == ["_pairwise_h_kernel", "_pairwise_bwd_kernel", "_pairwise_bwd_kernel"]
    assert kp.h_dtype(torch.bfloat16) == torch.bfloat16
    assert kp.h_dtype(torch.float16) == kp.h_dtype(torch.float32) == torch.float32


def test_backward_h_is_stored_16_wide_with_zeros_past_n(monkeypatch):
    """At N = 37 (no multiple of 16) ``H`` is stored 48 columns wide, its columns past N zero, and
    the GEMMs read it masked at 48 (vector loads: test_pairwise_backward_loads_are_vector_loads):
    every new float tensor starts as NaN here, so a pad column left unwritten by the H kernel would
    make dX NaN (NaN x the masked row of Y), and a GEMM reading past 48 columns or a store past N
    would show in the gradients against the float64 reference."""
    formed = []
    form_h = kp._form_h

    def spy(*args, **kwargs):
        out = form_h(*args, **kwargs)
        formed.append(out[0])
        return out

    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(kp, "_form_h", spy)
    monkeypatch.setattr(torch, "empty", poisoned)
    x = torch.randn(29, 21, device=DEV)
    y = torch.randn(37, 21, device=DEV)
    _check(x, y, tol=tolerance(torch.float32, tf32=DEV == "cuda"))
    (h,) = formed
    assert h.shape == (29, 48) and h.stride(0) % kp.H_ALIGN == 0
    assert torch.isfinite(h).all() and h[:, 37:].abs().max().item() == 0.0


@pytest.mark.interpreter  # registrations: the CPU's to check; GPU time goes to the kernels
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "empty"])
def test_custom_ops_opcheck(layout):
    """Schema, fake (shapes and strides: the backward's results are contiguous whatever the
    inputs' layout, as its fake says) and autograd registration of the pairwise ops."""
    def rows(n, d):
        t = torch.randn(d, n, device="cpu").t() if layout == "transposed" else torch.randn(n, d, device="cpu")
        return t.requires_grad_(True)

    x, y = rows(0 if layout == "empty" else 6, 5), rows(9, 5)
    torch.library.opcheck(torch.ops.daal_triton.pairwise_distance.default, (x, y),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    d = torch.ops.daal_triton.pairwise_distance(x, y)
    torch.library.opcheck(torch.ops.daal_triton.pairwise_distance_backward.default,
                          (torch.randn(d.shape, device="cpu"), d.detach(), x.detach(), y.detach()),
                          test_utils=("test_schema", "test_faketensor"))
