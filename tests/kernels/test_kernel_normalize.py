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
    torch.library.opcheck(torch.ops.daal_triton.prepare_backward.default,
                          (torch.randn(6, 16), x.detach(), n, z.detach(), True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.build
def test_gpu_builds():
    """Each configuration compiles for sm_80 and sm_90; no spills on the sm_90 hot path."""
    assert_compiled_without_spills(compile_launches(kn.launches()))
