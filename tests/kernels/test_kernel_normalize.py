"""The fused step 1 + label range (kernels/normalize.py) against the reference's ``prepare``:
values and gradients on odd shapes, zero rows, labels out of range, no labels (a memory bank),
input dtypes; the custom operators' registrations; the GPU builds."""
import pytest
import torch

from daal_testing import DEV, assert_close, assert_compiled_without_spills, compile_launches, tolerance

from daal_triton import reference
from daal_triton.kernels import normalize as kn


@pytest.fixture(autouse=True)
def _on_the_test_device():
    """Tensors made without a device go to DEV (the GPU where there is one)."""
    with torch.device(DEV):
        yield


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float16's zero row
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B", [37, 181])  # 181: several row blocks (64 in the interpreter, 16 on a GPU)
def test_values_and_gradients_match_the_reference(normalize, dtype, B):
    C, D = 11, 129
    z = torch.randn(B, D).to(dtype)
    z[3] = 0.0  # a zero row: the clamp binds
    z[5] *= 1e-3 if dtype == torch.float16 else 1e-8  # float16 cannot hold the 1e8-times gradient
    y = torch.randint(-3, C + 3, (B,))
    gx = torch.randn(B, D)
    z1 = z.clone().requires_grad_()
    x, lab, bad = kn.prepare(z1, y, C, dtype=torch.float32, normalize=normalize)
    (gz,) = torch.autograd.grad(x, z1, gx)
    z2 = z.double().requires_grad_()
    xr, labr, badr = reference.prepare(z2, y, C, dtype=torch.float64, normalize=normalize)
    (gzr,) = torch.autograd.grad(xr, z2, gx.double())
    assert x.dtype == torch.float32 and gz.dtype == dtype
    assert torch.equal(lab, labr) and torch.equal(bad, badr)
    assert bad.any() and (lab >= 0).all() and (lab < C).all()
    ok = torch.ones(B, dtype=torch.bool)
    ok[3] = False  # the zero row's gradient is dx / eps: compared on its own below
    assert_close(x, xr, 1e-6, "x")
    assert_close(gz[ok].float(), gzr[ok], tolerance(dtype), "dz")
    if dtype != torch.float16:  # float16 overflows the zero row's 1e12-times gradient (inf)
        assert torch.allclose(gz[3].double(), gzr[3], rtol=max(1e-3, tolerance(dtype)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_of_rows_below_the_clamp(dtype):
    """A row with ``0 < |z| < eps`` (not exactly zero: there ``x = 0`` and the projection vanishes
    anyway) gets ``dz = dx / eps``, without the projection ``x (x . dx)`` (``|x|`` ~ 0.5 here, so
    keeping it is a 25 % error); a row just above the clamp keeps it. Pins the negated ``n`` of
    the forward and the backward's ``where(n > 0, dot, 0)``."""
    B, C, D = 37, 11, 129
    z = torch.randn(B, D)
    tiny = [2, 9, 30]  # |z| ~ 0.5 eps: the clamp binds
    z[tiny] = torch.nn.functional.normalize(torch.randn(len(tiny), D), dim=1) * 0.5e-12
    z[11] = torch.nn.functional.normalize(torch.randn(D), dim=0) * 3e-12  # just above: the projection stays
    z = z.to(dtype)
    gx = torch.randn(B, D)
    z1 = z.clone().requires_grad_()
    x, _, _ = kn.prepare(z1, torch.randint(0, C, (B,)), C, dtype=torch.float32, normalize=True)
    (gz,) = torch.autograd.grad(x, z1, gx)
    z2 = z.double().requires_grad_()
    xr = reference.normalize_rows(z2)
    (gzr,) = torch.autograd.grad(xr, z2, gx.double())
    assert_close(x, xr, 1e-6, "x")
    for rows in (tiny, [11], [0, 1, 36]):
        assert_close(gz[rows].float(), gzr[rows], max(1e-5, tolerance(dtype)), f"dz of rows {rows}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in the interpreter
def test_nan_and_inf_rows():
    """NaN in a row makes that row's x and gradient NaN (the clamp keeps a NaN: docs/method.md
    "Bad input"), inf its x NaN/0 as the reference; the other rows are unaffected."""
    B, D = 37, 129
    z = torch.randn(B, D)
    z[4, 17] = float("nan")
    z[20, 0] = float("inf")
    gx = torch.randn(B, D)
    z1 = z.clone().requires_grad_()
    x, _, _ = kn.prepare(z1, None, 3, dtype=torch.float32, normalize=True)
    (gz,) = torch.autograd.grad(x, z1, gx)
    z2 = z.double().requires_grad_()
    xr = reference.normalize_rows(z2)
    (gzr,) = torch.autograd.grad(xr, z2, gx.double())
    assert torch.isnan(x[4]).all() and torch.isnan(gz[4]).all()
    assert torch.equal(torch.isnan(x), torch.isnan(xr)) and torch.equal(torch.isnan(gz), torch.isnan(gzr))
    ok = torch.ones(B, dtype=torch.bool)
    ok[[4, 20]] = False
    assert_close(x[ok], xr[ok], 1e-6, "x")
    assert_close(gz[ok], gzr[ok], 1e-5, "dz")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_whose_squared_norm_overflows(dtype):
    """A finite row beyond |z| = 1.8e19 (float32 and bfloat16 hold it; a diverging network makes
    it) has |z|^2 = inf in float32: it is normalised by its true norm, as float64 does, in the
    kernel and the float32 reference alike (both read it as 0 before), with its gradient; a NaN/inf
    row stays NaN; the other rows are unaffected."""
    assert kn.NORM_SCALE.value == reference.daal.NORM_SCALE
    B, D = 37, 129
    g = torch.Generator().manual_seed(3)
    z = torch.randn(B, D, generator=g)
    z[3] *= 1e20
    z[5] *= 3e36  # near float32's largest
    z[7] = torch.full((D,), 1e38)  # |z| = 1.1e39: beyond float32 itself (dividing by it gave 0)
    z[9] = z[9] * 1e20
    z[9, 4] = float("inf")
    z = z.to(dtype)
    gx = torch.randn(B, D, generator=g)
    z1 = z.clone().requires_grad_()
    x, _, _ = kn.prepare(z1, None, 3, dtype=torch.float32, normalize=True)
    (gz,) = torch.autograd.grad(x, z1, gx)
    z3 = z.float().requires_grad_()
    x32 = reference.normalize_rows(z3)
    (gz32,) = torch.autograd.grad(x32, z3, gx)
    z2 = z.double().requires_grad_()
    xr = reference.normalize_rows(z2)
    (gzr,) = torch.autograd.grad(xr, z2, gx.double())
    ok = torch.ones(B, dtype=torch.bool)
    ok[9] = False
    assert torch.isnan(x[9]).any() and torch.isnan(x32[9]).any()
    for got, grad in ((x, gz), (x32, gz32)):
        assert_close(got[ok], xr[ok], 1e-6, "x")
        assert got[[3, 5, 7]].norm(dim=1).sub(1).abs().max() < 1e-5
        # dz = (dx - x (x . dx)) / |z|: about 1e-20 of dx, 1e-36 for row 5 (subnormal or 0 in bfloat16)
        assert_close(grad[ok].double(), gzr[ok], 1e-5 if dtype == torch.float32 else 1e-2, "dz")


@pytest.mark.parametrize("layout", ["row_view", "column_major"])
def test_strided_embeddings_labels_and_gradients(layout):
    """Embeddings that are a view (rows of a wider tensor: row stride > D; or column-major), labels
    that are every other element, and an incoming gradient with either layout: the kernels read
    them through their strides (or a contiguous copy) and match the reference."""
    B, C, D = 37, 11, 129
    base = torch.randn(B, D + 7, requires_grad=True) if layout == "row_view" else torch.randn(D, B, requires_grad=True)
    z1 = base[:, 3:D + 3] if layout == "row_view" else base.T  # a view: the strides are the input's
    z = z1.detach()
    gx = torch.randn(B, D + 5)[:, :D] if layout == "row_view" else torch.randn(D, B).T
    y = torch.randint(-2, C + 2, (2 * B,))[::2]
    assert not z1.is_contiguous() and not gx.is_contiguous() and not y.is_contiguous()
    x, lab, bad = kn.prepare(z1, y, C, dtype=torch.float32, normalize=True)
    (gz,) = torch.autograd.grad(x, z1, gx)
    z2 = z.double().requires_grad_()
    xr, labr, badr = reference.prepare(z2, y, C, dtype=torch.float64, normalize=True)
    (gzr,) = torch.autograd.grad(xr, z2, gx.double())
    assert torch.equal(lab, labr) and torch.equal(bad, badr)
    assert_close(x, xr, 1e-6, "x")
    assert_close(gz, gzr, 1e-5, "dz")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_embeddings_without_a_kernel_dtype_are_refused(dtype):
    """float64 (or integer) embeddings never reach the kernel, whatever ``dtype`` asks for: float64
    runs on the reference backend, integers nowhere (``compute_dtype``)."""
    z = torch.randn(5, 8).to(dtype)
    match = "reference backend" if dtype == torch.float64 else "float16, bfloat16 or float32"
    with pytest.raises(ValueError, match=match):
        kn.prepare(z, None, 2, dtype=torch.float32, normalize=True)


def test_without_labels_only_rows():
    z = torch.randn(20, 33)
    x, lab, bad = kn.prepare(z, None, 5, dtype=torch.float32, normalize=True)
    assert lab is None and bad is None
    assert_close(x, reference.normalize_rows(z.double()), 1e-6, "x")


def test_empty_batch():
    x, lab, bad = kn.prepare(torch.randn(0, 8), torch.zeros(0, dtype=torch.long), 3,
                             dtype=torch.float32, normalize=True)
    assert x.shape == (0, 8) and lab.shape == (0,) and bad.shape == (0,)


def test_float64_is_refused():
    with pytest.raises(ValueError, match="float32"):
        kn.prepare(torch.randn(3, 4), None, 2, dtype=torch.float64, normalize=True)


def test_custom_ops_opcheck():
    z = torch.randn(6, 16, requires_grad=True)
    y = torch.tensor([0, 1, 2, 5, -1, 3])
    torch.library.opcheck(torch.ops.daal_triton.prepare.default, (z, y, 4, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    x, n, _, _ = torch.ops.daal_triton.prepare(z, y, 4, True)
    for xb in (x.detach(), x.detach().t().contiguous().t()):  # the fake copied a transposed x's strides
        torch.library.opcheck(torch.ops.daal_triton.prepare_backward.default,
                              (torch.randn(6, 16), xb, n, z.dtype, True),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_backward_keeps_the_input_s_dtype_not_the_input(dtype):
    """Autograd keeps x and the norms, not z: a memory bank's ``cat([emb, bank])`` (N x D) is not
    held until the backward for its dtype; the gradient still comes in z's dtype and matches the
    float64 normalisation's."""
    torch.manual_seed(3)
    z = (torch.randn(37, 129) * 3).to(dtype).requires_grad_()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        x, _, _ = kn.prepare(z, None, 4, dtype=torch.float32, normalize=True)
    assert not any(t.data_ptr() == z.data_ptr() for t in kept), [tuple(t.shape) for t in kept]
    g = torch.randn_like(x)
    (gz,) = torch.autograd.grad(x, z, g)
    z64 = z.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference.normalize_rows(z64), z64, g.double())
    assert gz.dtype == dtype
    assert_close(gz.double(), want.to(dtype).double(), 1e-2 if dtype != torch.float32 else 1e-5, "dz")


@pytest.mark.build
def test_gpu_builds():
    """Each configuration compiles for sm_80 and sm_90; no spills on the sm_90 hot path."""
    assert_compiled_without_spills(compile_launches(kn.launches()))
