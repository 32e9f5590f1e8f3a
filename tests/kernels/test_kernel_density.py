"""The fused kNN radius, adaptive margins and density hinge (kernels/density.py) against the
reference's ``density``: values and gradients on odd shapes, missing neighbours, classes of one
sample, gamma 0 / fractional / negative, several row blocks; the registrations; the GPU builds."""
import pytest
import torch

from daal_testing import DEV, assert_close, assert_compiled_without_spills, compile_launches

from daal_triton import reference
from daal_triton.kernels import density as kd


def _case(B, C, K, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(B, K, generator=g) + 0.05
    index = torch.randint(0, B, (B, K), generator=g)
    missing = torch.rand(B, K, generator=g) < 0.3
    missing[:, 0] &= torch.rand(B, generator=g) < 0.3  # some rows lose every neighbour
    index[missing] = -1
    dist[missing] = float("inf")
    y = torch.randint(0, C, (B,), generator=g)
    return dist.to(DEV), index.to(DEV), y.to(DEV)


@pytest.mark.parametrize("B,C,K", [(37, 11, 3), (300, 7, 5), (1, 1, 1), (130, 200, 8)])
@pytest.mark.parametrize("gamma", [1.0, 0.0, 0.5, -0.7])
def test_values_and_gradients_match_the_reference(B, C, K, gamma):
    dist, index, y = _case(B, C, K, seed=B + K)
    hp = dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=gamma, tau=0.8)
    gh, gr = torch.randn(B, device=DEV), torch.randn(B, device=DEV)
    d1 = dist.clone().requires_grad_()
    r, valid, m, hinge = kd.density(d1, index, y, C, **hp)
    loss = (hinge * gh).sum() + (torch.where(valid, r, 0) * gr).sum()
    (g1,) = torch.autograd.grad(loss, d1)
    d2 = dist.double().requires_grad_()
    rr, validr, mr, hinger = reference.density(d2, index, y, C, **hp)
    loss_r = (hinger * gh.double()).sum() + (torch.where(validr, rr, 0) * gr.double()).sum()
    (g2,) = torch.autograd.grad(loss_r, d2)
    assert torch.equal(valid, validr)
    assert torch.equal(torch.isinf(r), torch.isinf(rr))
    assert_close(r[valid], rr[validr], 1e-6, "r")
    assert_close(m, mr, 1e-5, "margin")
    assert_close(hinge, hinger, 1e-6, "hinge")
    assert_close(g1.nan_to_num(posinf=0.0), g2.nan_to_num(posinf=0.0), 1e-6, "d dist")
    assert not m.requires_grad or m.grad_fn is None


def test_hinge_gradient_alone():
    """Only the hinge is differentiated (the radius gradient absent)."""
    dist, index, y = _case(50, 4, 3)
    d1 = dist.clone().requires_grad_()
    _, _, _, hinge = kd.density(d1, index, y, 4, m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0, tau=2.0)
    (g1,) = torch.autograd.grad(hinge.sum(), d1)
    d2 = dist.double().requires_grad_()
    (g2,) = torch.autograd.grad(reference.density(d2, index, y, 4, m0=0.2, m_min=0.05, m_max=0.5,
                                                  gamma=1.0, tau=2.0)[3].sum(), d2)
    assert_close(g1, g2.nan_to_num(posinf=0.0), 1e-6, "d dist")
    assert (g1 != 0).any()


def test_custom_ops_opcheck():
    dist, index, y = _case(9, 3, 2)
    dist = dist.requires_grad_()
    torch.library.opcheck(torch.ops.daal_triton.density.default, (dist, index, y, 0.2, 0.05, 0.5, 1.0, 0.8),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(torch.ops.daal_triton.density_backward.default,
                          (torch.randn(9, device=DEV), None, dist.detach(), index, 0.8),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.build
def test_gpu_builds():
    assert_compiled_without_spills(compile_launches(kd.launches()))
