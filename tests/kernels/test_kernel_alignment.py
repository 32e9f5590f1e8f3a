"""Rows padded to a multiple of 16 columns for the GEMM-form kernels (kernels/_common.py, ``ALIGN``).

At a width D that is no multiple of 16 the kNN and pairwise kernels get ``ceil(D / 16) * 16``
columns, the extra ones zeros, where ``DAAL_ALIGN_D`` asks for it ("auto", the default: the kNN
pads, the pairwise distance does not, as the H200 runs decided; "pad": both; "off": neither): the
results must be those of the unpadded rows bit for bit, match the float64 reference, and the
gradients come back M x D in the inputs' dtypes. tests/kernels/test_kernel_launched_builds.py
checks what the padding is for: the padded launches are the builds that keep no stack.
"""
import pytest
import torch

from daal_testing import DEV, assert_close, tolerance

from daal_triton import reference
from daal_triton.kernels import _common
from daal_triton.kernels import knn as kk
from daal_triton.kernels import pairwise as kp


@pytest.mark.parametrize("D", [1, 15, 19, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prepare_pads_odd_widths_with_zero_columns(D, dtype):
    t = torch.randn(7, D, device=DEV)
    p = _common.prepare(t, dtype, align=True)
    width = -(-D // 16) * 16
    assert p.shape == (7, width) and p.dtype == dtype and p.is_contiguous()
    assert _common.aligned(p)
    assert torch.equal(p[:, :D], t.to(dtype)) and not p[:, D:].any()
    assert torch.equal(_common.columns(p, D, t.dtype), t.to(dtype).to(t.dtype))


def test_prepare_keeps_aligned_rows_and_copies_misaligned_ones():
    t = torch.randn(9, 32, device=DEV)
    assert _common.prepare(t, torch.float32, align=True) is t  # nothing to do: no copy
    view = torch.randn(9, 33, device=DEV)[:, 1:]  # width 32, row stride 33, start 4 bytes in
    assert not _common.aligned(view)
    p = _common.prepare(view, torch.float32, align=True)
    assert p.shape == (9, 32) and _common.aligned(p) and torch.equal(p, view)
    shifted = torch.randn(10 * 32 + 1, device=DEV)[1:].view(10, 32)  # contiguous, start not 16-byte aligned
    assert not _common.aligned(shifted) and _common.aligned(_common.prepare(shifted, torch.float32, align=True))
    # without align (the other kernels) only the unit column stride is asked for
    assert _common.prepare(view, torch.float32) is view
    # every other column of 64: width 32, row stride 64, but no unit column stride: copied
    strided = torch.randn(9, 64, device=DEV)[:, ::2]
    assert not _common.aligned(strided)
    p = _common.prepare(strided, torch.float32, align=True)
    assert p.shape == (9, 32) and _common.aligned(p) and torch.equal(p, strided)


def test_a_row_stride_off_the_alignment_is_not_aligned():
    """Width 32 and a 16-byte aligned start, but a row stride of 40: not aligned (the row stride
    must be a multiple of 16 too), so the padded launch gets a copy with stride 32."""
    view = torch.randn(9, 40, device=DEV)[:, :32]
    assert view.data_ptr() % 16 == 0 and view.stride() == (40, 1)
    assert not _common.aligned(view)
    p = _common.prepare(view, torch.float32, align=True)
    assert p is not view and p.stride() == (32, 1) and _common.aligned(p) and torch.equal(p, view)


def test_prepare_and_columns_return_the_asked_dtype():
    """``prepare`` casts with or without align; ``columns`` casts back to the input's dtype (the
    gradients of a float16 input computed in float32, the float32 ones of half rows)."""
    t = torch.randn(7, 19, device=DEV).half()
    for align in (False, True):
        p = _common.prepare(t, torch.float32, align=align)
        assert p.dtype == torch.float32 and torch.equal(p[:, :19], t.float())
    wide = _common.prepare(t, torch.float32, align=True)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        c = _common.columns(wide, 19, dtype)
        assert c.dtype == dtype and c.shape == (7, 19) and c.is_contiguous()
        assert torch.equal(c, t.float().to(dtype))
    same = torch.randn(7, 16, device=DEV)
    assert _common.columns(same, 16, torch.float16).dtype == torch.float16


def test_prepare_casts_and_lays_out_in_one_copy():
    """A transposed float16 tensor asked for in float32: one copy, cast and laid out at once (a
    plain ``.to()`` keeps a transposed tensor's strides, so a ``.contiguous()`` after it had made a
    second copy of the size of the input)."""
    from daal_triton.launch_count import LaunchCount

    for t in (torch.randn(40, 24, device=DEV).half().t(), torch.randn(24, 80, device=DEV).half()[:, ::2]):
        with LaunchCount() as n:
            p = _common.prepare(t, torch.float32)
        assert p.dtype == torch.float32 and p.is_contiguous() and torch.equal(p, t.float())
        assert n.launches == 1, dict(n.ops)
    same = torch.randn(40, 24, device=DEV).t()  # only laid out
    with LaunchCount() as n:
        p = _common.prepare(same, torch.float32)
    assert p.is_contiguous() and torch.equal(p, same) and n.launches == 1, dict(n.ops)


def test_row_sqnorms_of_rows_with_a_wider_stride():
    """``row_sqnorms`` of a prepared view whose rows are longer than D (what ``prepare`` keeps
    without align: unit column stride, row stride 40 > D = 19) reads each row at its stride."""
    x = torch.randn(70, 40, device=DEV)[:, 3:22]  # 70 rows: two programs of 64
    assert _common.prepare(x, torch.float32) is x
    out = _common.row_sqnorms(x)
    assert out.dtype == torch.float32 and out.shape == (70,)
    assert_close(out, (x.double() ** 2).sum(1), 1e-6, "squared norms")


def test_compute_dtype_promotes_and_refuses():
    """The inputs' promotion, in any order (float16 + bfloat16 -> float32), never a lower precision;
    float64 and integers refused by name."""
    h, b, f = (torch.zeros(2, 2, dtype=dt, device=DEV) for dt in (torch.float16, torch.bfloat16, torch.float32))
    assert _common.compute_dtype("op", h) == torch.float16
    assert _common.compute_dtype("op", b, b) == torch.bfloat16
    assert _common.compute_dtype("op", h, f) == torch.float32
    assert _common.compute_dtype("op", h, b) == torch.float32
    assert _common.compute_dtype("op", b, h, h) == torch.float32
    with pytest.raises(ValueError, match="op: float64 inputs run on the reference backend"):
        _common.compute_dtype("op", h, f.double())
    with pytest.raises(ValueError, match="op takes float16, bfloat16 or float32"):
        _common.compute_dtype("op", h.long())


def test_align_policy_is_checked(monkeypatch):
    """``DAAL_ALIGN_D`` is "auto" by default (the kNN pads, the pairwise distance does not), "pad"
    and "off" for every operator, anything else a ValueError naming it (read at every call, only
    where a copy is at stake)."""
    monkeypatch.delenv(_common.ALIGN_ENV, raising=False)
    assert _common.align_rows("knn") and not _common.align_rows("pairwise")
    for policy, pads in (("auto", True), ("pad", True), ("off", False)):
        monkeypatch.setenv(_common.ALIGN_ENV, policy)
        assert _common.align_rows("knn") == pads
        assert _common.align_rows("pairwise") == (policy == "pad")
    t = torch.randn(5, 19, device=DEV)
    monkeypatch.setenv(_common.ALIGN_ENV, "yes")
    with pytest.raises(ValueError, match=_common.ALIGN_ENV):
        kp.pairwise_distance(t, t)
    with pytest.raises(ValueError, match=_common.ALIGN_ENV):
        kk.knn(t, t, 2)


def _same(a: torch.Tensor, b: torch.Tensor, atomics: bool = False) -> None:
    """Bit for bit; a gradient summed by float atomics on a GPU (the kNN's dRef) in any order."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if atomics and a.is_cuda:
        assert_close(a, b, 1e-6, "atomic sums")
    else:
        assert torch.equal(a, b)


def _both(monkeypatch, call):
    """``call()``'s tensors with the padded rows (``DAAL_ALIGN_D=pad``) and unpadded (``off``)."""
    out = {}
    for policy in ("pad", "off"):
        monkeypatch.setenv(_common.ALIGN_ENV, policy)
        out[policy] = call()
    return out["pad"], out["off"]


@pytest.mark.parametrize("M,N,D", [(37, 53, 129), (20, 9, 19)])
def test_knn_on_padded_rows_is_the_unpadded_knn(monkeypatch, M, N, D):
    torch.manual_seed(D)
    q0, r0 = torch.randn(M, D, device=DEV), torch.randn(N, D, device=DEV)
    ql, rl = torch.randint(0, 3, (M,), device=DEV), torch.randint(0, 3, (N,), device=DEV)
    g = torch.randn(M, 4, device=DEV)

    def run():
        q, r = q0.clone().requires_grad_(True), r0.clone().requires_grad_(True)
        dist, index = kk.knn(q, r, 4, query_labels=ql, ref_labels=rl)
        dist.backward(torch.where(torch.isfinite(dist), g, 0.0))
        return dist.detach(), index, q.grad, r.grad

    padded, unpadded = _both(monkeypatch, run)
    for i, (a, b) in enumerate(zip(padded, unpadded)):
        _same(a, b, atomics=i == 3)
    assert padded[2].shape == (M, D) and padded[3].shape == (N, D)
    # and the float64 reference agrees (the gradients where both selected the same neighbours)
    qd, rd = q0.double().requires_grad_(True), r0.double().requires_grad_(True)
    ref_dist, ref_index = reference.knn(qd, rd, 4, query_labels=ql, ref_labels=rl)
    assert torch.equal(padded[1], ref_index)
    found = ref_index >= 0  # rows with fewer than k same-label candidates: inf / -1 in both
    assert torch.equal(torch.isinf(padded[0]), ~found)
    assert_close(padded[0][found], ref_dist.detach()[found], tolerance(torch.float32, tf32=DEV == "cuda"), "dist")
    ref_dist.backward(torch.where(torch.isfinite(ref_dist), g.double(), 0.0))
    assert_close(padded[2], qd.grad, tolerance(torch.float32, tf32=DEV == "cuda"), "dq")
    assert_close(padded[3], rd.grad, tolerance(torch.float32, tf32=DEV == "cuda"), "dr")


def test_knn_self_search_with_a_half_bank_on_padded_rows(monkeypatch):
    """``ref is query`` (one padded copy serves both), float16 rows, exclude_self, and a reference
    set without gradient (a memory bank): the same as unpadded, gradients in float16."""
    torch.manual_seed(1)
    x0 = torch.randn(40, 23, device=DEV).half()
    bank = torch.randn(50, 23, device=DEV).half()

    def run():
        x = x0.clone().requires_grad_(True)
        d1, i1 = kk.knn(x, x, 3, exclude_self=True)
        d2, i2 = kk.knn(x, bank, 5)
        (d1.sum() + d2.square().sum()).backward()
        return d1.detach(), i1, d2.detach(), i2, x.grad

    padded, unpadded = _both(monkeypatch, run)
    for i, (a, b) in enumerate(zip(padded, unpadded)):
        _same(a, b, atomics=i == 4)  # x.grad: its dRef part by atomics
    assert padded[-1].dtype == torch.float16 and padded[-1].shape == (40, 23)


@pytest.mark.parametrize("M,N,D", [(37, 53, 129), (5, 140, 33)])
def test_pairwise_on_padded_rows_is_the_unpadded_pairwise(monkeypatch, M, N, D):
    torch.manual_seed(M)
    x0, y0 = torch.randn(M, D, device=DEV), torch.randn(N, D, device=DEV)
    g = torch.randn(M, N, device=DEV)

    def run():
        x, y = x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)
        d = kp.pairwise_distance(x, y)
        d.backward(g)
        return d.detach(), x.grad, y.grad

    padded, unpadded = _both(monkeypatch, run)
    for a, b in zip(padded, unpadded):
        _same(a, b)
    xd, yd = x0.double().requires_grad_(True), y0.double().requires_grad_(True)
    dd = reference.pairwise_distance(xd, yd)
    dd.backward(g.double())
    tol = tolerance(torch.float32, tf32=DEV == "cuda")
    assert_close(padded[0], dd, tol, "distance")
    assert_close(padded[1], xd.grad, tol, "dX")
    assert_close(padded[2], yd.grad, tol, "dY")


def _widths(monkeypatch, module, names, seen):
    """Record in ``seen`` the ``D`` argument of every launch of ``module``'s kernels ``names``."""
    import inspect

    from daal_testing import spy_launches

    at = {name: list(inspect.signature(getattr(module, name).fn).parameters).index("D") for name in names}
    spy_launches(monkeypatch, module, names, lambda name, args, _kw: (name, args[at[name]]), launched=seen)


def test_the_kernels_see_padded_widths_forward_and_backward(monkeypatch):
    """What the padding is for, checked where it happens: at D = 129 every padded kNN and pairwise
    launch, forward and backward, gets D = 144 (a backward that stopped padding would still give
    the same numbers, which the tests above compare), every unpadded one 129, in the backward too
    when the variable is set around the forward only (the benchmarks' ``triton_unaligned``
    provider: the backward follows the forward's choice). By default ("auto") the kNN pads and
    the pairwise distance does not."""
    x = torch.randn(20, 129, device=DEV, requires_grad=True)
    y = torch.randn(30, 129, device=DEV, requires_grad=True)
    seen = []
    _widths(monkeypatch, kk, ("_knn_fwd_kernel", "_knn_finish_kernel", "_knn_bwd_kernel"), seen)
    _widths(monkeypatch, kp, ("_pairwise_fwd_kernel", "_pairwise_bwd_kernel"), seen)
    for policy, knn_width, pairwise_width in (("pad", 144, 144), ("off", 129, 129), (None, 144, 129)):
        seen.clear()
        if policy is None:
            monkeypatch.delenv(_common.ALIGN_ENV, raising=False)
        else:
            monkeypatch.setenv(_common.ALIGN_ENV, policy)
        dist, _ = kk.knn(x, y, 3)
        d = kp.pairwise_distance(x, y)
        monkeypatch.setenv(_common.ALIGN_ENV, "off" if policy == "pad" else "pad")  # not the backward's choice
        dist.sum().backward()
        d.sum().backward()
        kernels = {name for name, _ in seen}
        assert {"_knn_fwd_kernel", "_knn_bwd_kernel", "_pairwise_fwd_kernel", "_pairwise_bwd_kernel"} <= kernels
        assert {d for name, d in seen if name.startswith("_knn")} == {knn_width}, (policy, seen)
        assert {d for name, d in seen if name.startswith("_pairwise")} == {pairwise_width}, (policy, seen)


def test_unpadded_pairwise_launches_no_copies(monkeypatch):
    """The cost the default pairwise distance avoids, counted: at D = 129 its forward and backward
    launch 8 kernels (6 Triton, 2 sums of partial row sums) and copy nothing unpadded (its rows
    contiguous), 18 padded (a zero fill and a copy per input, forward and backward, and each
    gradient's D columns)."""
    from daal_triton.launch_count import LaunchCount

    x = torch.randn(20, 129, device=DEV, requires_grad=True)
    y = torch.randn(30, 129, device=DEV, requires_grad=True)
    counts = {}
    for policy in (None, "pad"):
        if policy is None:
            monkeypatch.delenv(_common.ALIGN_ENV, raising=False)
        else:
            monkeypatch.setenv(_common.ALIGN_ENV, policy)
        g = torch.ones(20, 30, device=DEV)
        with LaunchCount() as n:
            d = kp._pairwise_op(x, y)
            kp._pairwise_backward_op(g, d, x.detach(), y.detach(), _common.align_rows("pairwise"))
        counts[policy] = n.launches
    assert counts == {None: 8, "pad": 18}, counts
