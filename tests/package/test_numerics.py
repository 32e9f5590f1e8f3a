"""docs/method.md "Numerics": close points get exact float32 distances and gradients.

The GEMM form loses every digit of a float32 distance below ~1e-3; the own-class distance and the
selected neighbours' distances are therefore taken by direct differences, on both backends. Each
case compares the float32 gradients with the float64 reference on the same inputs.
"""
import pytest
import torch

from daal_triton import daal_loss
from daal_testing import rel_err, tolerance

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]  # CPU tensors
B, C, D = 24, 5, 64


def clustered(scale: float):
    """Each class a tight cluster: samples ``scale`` apart around a random centre (float32)."""
    y = torch.arange(B) % C
    centre = torch.randn(C, D, dtype=torch.float64)
    z = centre[y] + scale * torch.randn(B, D, dtype=torch.float64)
    mid = torch.nn.functional.normalize(torch.randn(C, D, dtype=torch.float64), dim=1)
    seg = torch.stack([mid - 0.1 * torch.randn(C, D, dtype=torch.float64) / D ** 0.5,
                       mid + 0.1 * torch.randn(C, D, dtype=torch.float64) / D ** 0.5], 1)
    return z.float(), y, seg.float()


def gradients(z, y, seg, dtype, backend, **hp):
    z = z.to(dtype).detach().requires_grad_()
    s = seg.to(dtype).detach().requires_grad_()
    daal_loss(z, y, s, backend=backend if dtype != torch.float64 else "reference", **hp).backward()
    return z.grad, s.grad


def float32_error(z, y, seg, backend, **hp):
    g32 = gradients(z, y, seg, torch.float32, backend, **hp)
    g64 = gradients(z, y, seg, torch.float64, backend, **hp)
    return [rel_err(a, b) for a, b in zip(g32, g64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-4, 1e-5, 1e-6])
def test_near_duplicates_give_float64_gradients(backend, scale):
    """k covers each class, so selection cannot differ: what is left is the distances' accuracy."""
    z, y, seg = clustered(scale)
    d_emb, d_seg = float32_error(z, y, seg, backend, k=8, normalize=False)
    assert d_emb <= 1e-3 and d_seg <= 1e-3, (d_emb, d_seg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_duplicates_normalized(backend):
    """With normalize=True the float32 rounding of the normalised rows bounds the accuracy
    (about 1e-8 sqrt(D) / separation); at 1e-4 apart it is within 1e-3."""
    z, y, seg = clustered(1e-4)
    d_emb, d_seg = float32_error(z, y, seg, backend, k=8)
    assert d_emb <= 1e-3 and d_seg <= 1e-3, (d_emb, d_seg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_close_to_its_own_segment(backend):
    z, y, seg = clustered(1e-2)
    p, q = seg[y[0], 0].double(), seg[y[0], 1].double()
    direction = torch.nn.functional.normalize(torch.randn(D, dtype=torch.float64), dim=0)
    z[0] = (0.5 * (p + q) + 1e-4 * direction).float()  # 1e-4 from the segment's midpoint
    g32 = gradients(z, y, seg, torch.float32, backend, normalize=False, lambda_pull=1.0)
    g64 = gradients(z, y, seg, torch.float64, backend, normalize=False, lambda_pull=1.0)
    assert rel_err(g32[0][0], g64[0][0]) <= 1e-3  # the row next to its segment
    assert rel_err(g32[0], g64[0]) <= 1e-3 and rel_err(g32[1], g64[1]) <= 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_read_the_clamp(backend):
    """Exact duplicates: the radius is the clamp sqrt(1e-12) = 1e-6, not a rounding residue."""
    z = torch.randn(2, D).repeat(3, 1)  # three copies of two points
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    seg = torch.randn(2, 2, D)
    parts = daal_loss(z, y, seg, backend=backend, return_parts=True)
    assert torch.allclose(parts.radius, torch.full((6,), 1e-6), rtol=1e-3, atol=0)


def separated(alpha_gap_seed: int = 0):
    """Four classes on orthogonal axes, samples 0.05 around them, segments of length 0.1 through
    the centres: every logit ``alpha (delta_iy + m_i - delta_ic)`` is about ``-1.2 alpha``, so the
    line terms ``log(1 + sum exp(v))`` are ~3 exp(-1.2 alpha): 3e-2 to 1e-8 for alpha 4 to 16."""
    g = torch.Generator().manual_seed(alpha_gap_seed)
    Bs, Cs, Ds = 12, 4, 16
    y = torch.arange(Bs) % Cs
    centre = torch.eye(Cs, Ds, dtype=torch.float64)
    z = centre[y] + 0.05 * torch.randn(Bs, Ds, generator=g, dtype=torch.float64)
    side = 0.05 * torch.roll(centre, 1, 1)
    seg = torch.stack([centre - side, centre + side], 1)
    return z.float(), y, seg.float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [4.0, 8.0, 16.0, 24.0])
def test_small_line_terms_keep_float32_accuracy(backend, alpha):
    """Once the classes are apart the line term is a softplus of a very negative logsumexp:
    ``log(1 + s)`` with ``s`` from 3e-2 down to 1e-12 here. Taken as ``log(1 + s)`` in float32 it
    lost s's digits (a loss of 3e-8 read 1.2% off on the Triton backend, 5% on the reference), and
    the backward's own-class weight ``1 - exp(-lse)`` cancelled (gradients 7% off): both backends
    must stay within the float32 parity bound of the float64 reference (density term off, so that
    the line term is the loss)."""
    z, y, seg = separated(int(alpha))
    hp = dict(lambda_dens=0.0, alpha=alpha)
    out = {}
    for dtype in (torch.float32, torch.float64):
        zz = z.to(dtype).detach().requires_grad_()
        ss = seg.to(dtype).detach().requires_grad_()
        loss = daal_loss(zz, y, ss, backend=backend if dtype == torch.float32 else "reference", **hp)
        loss.backward()
        out[dtype] = (loss, zz.grad, ss.grad)
    assert 1e-14 < out[torch.float64][0].item() < 0.1, out[torch.float64][0]  # the regime meant
    errors = [rel_err(a, b) for a, b in zip(out[torch.float32], out[torch.float64])]
    assert max(errors) < tolerance(torch.float32), errors


@pytest.mark.gpu
@pytest.mark.parametrize("alpha", [8.0, 16.0, 24.0])
def test_small_line_terms_on_gpu(alpha):
    """The same on a GPU (bench/gpu_check.sh runs it): the compiled kernels' series (their ``tl.log``
    and ``tl.exp`` lower to other instructions than the interpreter's NumPy) within the TF32 bound
    of the float64 reference, where ``log(1 + s)`` read 0 or far off at s = 1e-12."""
    z, y, seg = separated(int(alpha))
    hp = dict(lambda_dens=0.0, alpha=alpha)
    out = {}
    for dtype in (torch.float32, torch.float64):
        zz = z.to("cuda", dtype).requires_grad_()
        ss = seg.to("cuda", dtype).requires_grad_()
        loss = daal_loss(zz, y.cuda(), ss, backend="triton" if dtype == torch.float32 else "reference", **hp)
        loss.backward()
        out[dtype] = (loss, zz.grad, ss.grad)
    errors = [rel_err(a, b) for a, b in zip(out[torch.float32], out[torch.float64])]
    assert max(errors) < tolerance(torch.float32, tf32=True), errors
