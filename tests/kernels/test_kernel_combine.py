"""The fused final combination (kernels/combine.py) against the reference's ``combine``: values
and gradients of every output, with and without weights, bad labels and L_len, several blocks of
samples; the registrations; the GPU builds."""
import pytest
import torch

from daal_testing import DEV, assert_close, assert_compiled_without_spills, compile_launches

from daal_triton import reference
from daal_triton.kernels import combine as kc


@pytest.mark.parametrize("B", [1, 37, 2500])  # 2500: three blocks of BLOCK_B = 1024
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("with_len", [False, True])
@pytest.mark.parametrize("bad_rate", [0.0, 0.05], ids=["clean", "bad_labels"])
def test_values_and_gradients_match_the_reference(B, weights, with_len, bad_rate):
    """A bad label makes the total NaN, so the clean cases are the ones that check the total and
    its gradient across blocks; the bad ones check the NaN pattern and the other outputs."""
    g = torch.Generator().manual_seed(B)
    line, hinge = torch.rand(B, generator=g), torch.rand(B, generator=g)
    valid = torch.rand(B, generator=g) < 0.8
    bad = torch.rand(B, generator=g) < bad_rate
    w = torch.rand(B, generator=g) if weights else None
    l_len = torch.rand((), generator=g) if with_len else None
    gper, gtot, gdens, glen = torch.randn(B, generator=g), torch.randn(()), torch.randn(()), torch.randn(())
    line, hinge, valid, bad, gper, gtot, gdens, glen = (t.to(DEV) for t in (line, hinge, valid, bad, gper, gtot,
                                                                            gdens, glen))
    w = None if w is None else w.to(DEV)
    l_len = None if l_len is None else l_len.to(DEV)
    kw = dict(weights=w, lambda_dens=0.5, lambda_len=0.3)
    outs = []
    for fn, dtype in ((kc.combine, torch.float32), (reference.combine, torch.float64)):
        ins = [t.to(dtype).requires_grad_() for t in (line, hinge)]
        ll = l_len.to(dtype).requires_grad_() if with_len else None
        kw_d = dict(kw, weights=None if w is None else w.to(dtype))
        per, tot, dens, length = fn(*ins, valid, bad, ll, **kw_d)
        obj = ((per.nan_to_num() * gper.to(dtype)).sum() + tot.nan_to_num() * gtot + dens * gdens
               + length * glen)
        grads = torch.autograd.grad(obj, ins + ([ll] if with_len else []))
        outs.append((per, tot, dens, length, *grads))
    for name, a, b in zip(("per_sample", "total", "L_dens", "L_len", "d line", "d hinge", "d L_len"), *outs):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert_close(a.nan_to_num(), b.nan_to_num(), 1e-6, name)
    assert torch.isnan(outs[0][0][bad]).all() and (outs[0][4][bad] == 0).all()
    if bad_rate == 0:
        assert torch.isfinite(outs[1][1]), "the clean case compares a finite total"
    elif B > 1:
        assert bad.any(), "the bad-label case has a bad label"


@pytest.mark.parametrize("weights", [False, True])
def test_bad_rows_get_no_line_gradient(weights):
    """The line gradient of a bad-label row is exactly 0 under finite upstream gradients of
    ``per_sample`` and ``total`` themselves (no ``nan_to_num``, whose backward would zero the
    NaN entries' gradient before it reached the kernel), and the rest matches the reference.
    Pins the backward's ``where(bad, 0, gl)``: the forward NaN-fills those rows, so the
    reference's masked_fill sends them nothing, while ``gper_i + gtot / B`` is not 0."""
    B = 37
    g = torch.Generator().manual_seed(B)
    line, hinge = torch.rand(B, generator=g), torch.rand(B, generator=g)
    valid = torch.rand(B, generator=g) < 0.8
    bad = torch.zeros(B, dtype=torch.bool)
    bad[[0, 5, 17, 36]] = True
    w = torch.rand(B, generator=g) + 0.5 if weights else None
    gper, gtot = torch.randn(B, generator=g), torch.randn((), generator=g)
    line, hinge, valid, bad, gper, gtot = (t.to(DEV) for t in (line, hinge, valid, bad, gper, gtot))
    w = None if w is None else w.to(DEV)
    outs = []
    for fn, dtype in ((kc.combine, torch.float32), (reference.combine, torch.float64)):
        ins = [t.to(dtype).requires_grad_() for t in (line, hinge)]
        per, tot, _, _ = fn(*ins, valid, bad, None, weights=None if w is None else w.to(dtype),
                            lambda_dens=0.5, lambda_len=0.3)
        assert torch.isnan(per[bad]).all() and torch.isnan(tot), "the bad rows make NaN outputs"
        outs.append(torch.autograd.grad((per, tot), ins, (gper.to(dtype), gtot.to(dtype))))
    (gl, gh), (gl_ref, gh_ref) = outs
    assert (gl[bad] == 0).all(), f"line gradient of bad rows: {gl[bad].tolist()}"
    assert (gl_ref[bad] == 0).all(), "the reference sends the bad rows nothing"
    assert_close(gl, gl_ref, 1e-6, "d line")
    assert_close(gh, gh_ref, 1e-6, "d hinge")


@pytest.mark.parametrize("B", [10, 2500])
def test_only_the_total_is_differentiated(B):
    line, hinge = torch.rand(B, device=DEV, requires_grad=True), torch.rand(B, device=DEV, requires_grad=True)
    valid, bad = torch.ones(B, dtype=torch.bool, device=DEV), torch.zeros(B, dtype=torch.bool, device=DEV)
    _, tot, _, _ = kc.combine(line, hinge, valid, bad, None, weights=None, lambda_dens=2.0, lambda_len=0.0)
    assert torch.allclose(tot, line.mean() + 2.0 * hinge.mean())
    gl, gh = torch.autograd.grad(tot, (line, hinge))
    assert torch.allclose(gl, torch.full((B,), 1.0 / B, device=DEV))
    assert torch.allclose(gh, torch.full((B,), 2.0 / B, device=DEV))


def _both(line, hinge, valid, bad, l_len, w, grads):
    """Outputs and gradients (of line, hinge, L_len) of the kernel and of the float64 reference."""
    outs = []
    for fn, dtype in ((kc.combine, torch.float32), (reference.combine, torch.float64)):
        ins = [t.detach().to(dtype).requires_grad_() for t in (line, hinge)]
        ll = l_len.detach().to(dtype).requires_grad_()
        res = fn(*ins, valid, bad, ll, weights=None if w is None else w.to(dtype), lambda_dens=0.5, lambda_len=0.3)
        gs = torch.autograd.grad(res, ins + [ll], [gr.to(dtype) for gr in grads])
        outs.append((*res, *gs))
    return outs


@pytest.mark.parametrize("B", [37, 2500])
def test_no_valid_sample(B):
    """Without a valid sample L_dens divides by max(#valid, 1) = 1, forward and backward: finite,
    the hinges' sum and a gradient of ``g_dens`` (not 0 / 0, not inf)."""
    g = torch.Generator().manual_seed(B)
    line, hinge = torch.rand(B, generator=g).to(DEV), torch.rand(B, generator=g).to(DEV)
    valid, bad = torch.zeros(B, dtype=torch.bool, device=DEV), torch.zeros(B, dtype=torch.bool, device=DEV)
    l_len = torch.rand((), generator=g).to(DEV)
    grads = [torch.randn(B, generator=g).to(DEV)] + [torch.randn((), generator=g).to(DEV) for _ in range(3)]
    ker, ref = _both(line, hinge, valid, bad, l_len, None, grads)
    for name, a, b in zip(("per_sample", "total", "L_dens", "L_len", "d line", "d hinge", "d L_len"), ker, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, 1e-6, name)
    assert torch.allclose(ker[2], hinge.sum())


def test_strided_inputs():
    """line, hinge, valid, bad and weights that are every other element of a tensor (views with
    stride 2): read through a contiguous copy, as the reference reads them."""
    B = 37
    g = torch.Generator().manual_seed(3)
    line, hinge, w = (torch.rand(2 * B, generator=g).to(DEV)[::2] for _ in range(3))
    valid = (torch.rand(2 * B, generator=g) < 0.6).to(DEV)[::2]
    bad = (torch.rand(2 * B, generator=g) < 0.2).to(DEV)[1::2]
    assert not any(t.is_contiguous() for t in (line, hinge, w, valid, bad)) and bad.any()
    l_len = torch.rand((), generator=g).to(DEV)
    grads = [torch.randn(B, generator=g).to(DEV)] + [torch.zeros(()).to(DEV)] + \
        [torch.randn((), generator=g).to(DEV) for _ in range(2)]  # total is NaN (a bad row): no gradient of it
    ker, ref = _both(line, hinge, valid, bad, l_len, w, grads)
    for name, a, b in zip(("per_sample", "total", "L_dens", "L_len", "d line", "d hinge", "d L_len"), ker, ref):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert_close(a.nan_to_num(), b.nan_to_num(), 1e-6, name)


def test_custom_ops_opcheck():
    line, hinge = torch.rand(7, device=DEV, requires_grad=True), torch.rand(7, device=DEV, requires_grad=True)
    valid, bad = torch.rand(7, device=DEV) < 0.7, torch.rand(7, device=DEV) < 0.2
    torch.library.opcheck(torch.ops.daal_triton.combine.default,
                          (line, hinge, valid, bad, torch.rand(7, device=DEV), torch.rand((), device=DEV), 0.5, 0.1),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.daal_triton.combine_backward.default,
                          (torch.randn(7, device=DEV), torch.randn((), device=DEV), None, None, valid, bad, None, 0.5, 0.1),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.build
def test_gpu_builds():
    assert_compiled_without_spills(compile_launches(kc.launches()))
