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


def _compare(dist, index, y, C, hp, *, grad=True):
    """The kernel's ``(r, valid, margin, hinge)`` and its gradient against the reference's."""
    B = dist.shape[0]
    gh, gr = torch.randn(B, device=DEV), torch.randn(B, device=DEV)
    d1 = dist.detach().clone().requires_grad_() if dist.is_contiguous() else dist.detach().requires_grad_()
    r, valid, m, hinge = kd.density(d1, index, y, C, **hp)
    d2 = dist.detach().double().requires_grad_()
    rr, validr, mr, hinger = reference.density(d2, index, y, C, **hp)
    assert torch.equal(valid, validr)
    assert torch.equal(torch.isinf(r), torch.isinf(rr))
    assert_close(r[valid], rr[validr], 1e-6, "r")
    assert_close(m, mr, 1e-5, "margin")
    assert_close(hinge, hinger, 1e-6, "hinge")
    if grad:
        (g1,) = torch.autograd.grad((hinge * gh).sum() + (torch.where(valid, r, 0) * gr).sum(), d1)
        (g2,) = torch.autograd.grad((hinger * gh.double()).sum() + (torch.where(validr, rr, 0) * gr.double()).sum(), d2)
        assert_close(g1.nan_to_num(posinf=0.0), g2.nan_to_num(posinf=0.0), 1e-6, "d dist")
    return m, mr


@pytest.mark.parametrize("B,C,K", [(37, 11, 3), (300, 7, 5), (1, 1, 1), (130, 200, 8)])
@pytest.mark.parametrize("gamma", [1.0, 0.0, 0.5, -0.7])
def test_values_and_gradients_match_the_reference(B, C, K, gamma):
    dist, index, y = _case(B, C, K, seed=B + K)
    m, _ = _compare(dist, index, y, C, dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=gamma, tau=0.8))
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


@pytest.mark.parametrize("gamma", [1.0, 0.0, -0.7])
def test_a_radius_of_zero_gives_zero_to_the_gamma(gamma):
    """Samples whose neighbours all lie at distance 0 (a direct call: the kNN floors distances at
    1e-6) have ``s = 0``: margin ``clamp(m0 * 0^gamma)``, m_min for gamma > 0, m0 for gamma = 0,
    m_max for gamma < 0, as the reference (it read as s = 1, m0, until 2026-12-03)."""
    dist = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.3, 0.5], [0.4, 0.6]], device=DEV)
    index = torch.tensor([[1, 1], [0, 0], [3, 3], [2, 2]], device=DEV)
    y = torch.tensor([0, 0, 1, 1], device=DEV)
    hp = dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=gamma, tau=0.8)
    m, _ = _compare(dist, index, y, 2, hp, grad=False)
    assert m[:2].tolist() == pytest.approx([{1.0: 0.05, 0.0: 0.2, -0.7: 0.5}[gamma]] * 2)


@pytest.mark.parametrize("gamma", [1.0, -0.7])
def test_class_mean_radius_below_eps_is_floored(gamma):
    """A class whose mean radius is below eps (its samples' neighbours at ~1e-14) divides by
    ``max(rbar, eps)``, not by ``rbar``: ``s = r / eps`` ~ 0.01, so its margins are clamped to
    m_min (gamma > 0) or m_max (gamma < 0), not m0 (``s = r / rbar`` ~ 1)."""
    dist, index, y = _case(37, 5, 3, seed=3)
    tiny = y == 0
    dist[tiny] = torch.where(index[tiny] >= 0, (torch.rand(int(tiny.sum()), 3, device=DEV) + 0.5) * 1e-14,
                             float("inf"))
    hp = dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=gamma, tau=0.8)
    m, mr = _compare(dist, index, y, 5, hp, grad=False)
    v = tiny & (index >= 0).any(1)
    assert v.any() and (mr[v] == (0.05 if gamma > 0 else 0.5)).all()


@pytest.mark.parametrize("m0,m_min,m_max", [(0.6, 0.05, 0.5), (0.01, 0.05, 0.5)])
def test_samples_without_neighbours_keep_m0_outside_the_clamp(m0, m_min, m_max):
    """m0 need not lie in [m_min, m_max] (the hyperparameters only ask m0 >= 0): a sample
    without neighbours gets m0 itself, unclamped, the others the clamped margin."""
    dist, index, y = _case(37, 11, 3, seed=5)
    index[[1, 8, 20]], dist[[1, 8, 20]] = -1, float("inf")
    hp = dict(m0=m0, m_min=m_min, m_max=m_max, gamma=1.0, tau=0.8)
    m, mr = _compare(dist, index, y, 11, hp, grad=False)
    lost = (index < 0).all(1)
    assert lost.any() and torch.allclose(m[lost], torch.full_like(m[lost], m0))


def test_hinge_gradient_is_zero_where_the_radius_equals_tau():
    """At ``r = tau`` exactly the hinge ``max(0, tau - r)`` is at its kink: its gradient is 0 (as
    torch.relu's), only the radius term's reaches ``dist`` (``tau - r > 0``, not ``>= 0``)."""
    B, K, tau = 37, 2, 0.75
    g = torch.Generator().manual_seed(7)
    dist = (torch.rand(B, K, generator=g) + 0.05).to(DEV)
    index, y = torch.randint(0, B, (B, K), generator=g).to(DEV), torch.randint(0, 4, (B,), generator=g).to(DEV)
    kink = torch.arange(B, device=DEV) % 3 == 0
    dist[kink] = torch.tensor([0.5, 1.0], device=DEV)  # r = 0.75 = tau, exactly in float32 and float64
    hp = dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0, tau=tau)
    _compare(dist, index, y, 4, hp)
    d1 = dist.clone().requires_grad_()
    (g,) = torch.autograd.grad(kd.density(d1, index, y, 4, **hp)[3].sum(), d1)
    assert (g[kink] == 0).all() and (g[~kink] != 0).any()


def test_column_major_distances_and_strided_labels():
    """A column-major ``(dist, index)`` (the kNN of a transposed problem) and labels that are every
    other element of a tensor: read through their strides or a contiguous copy, as the reference."""
    B, C, K = 37, 11, 5
    dist, index, y = _case(B, C, K, seed=11)
    dist_t, index_t = dist.T.contiguous().T, index.T.contiguous().T
    y_s = torch.stack([y, torch.randint(0, C, (B,), device=DEV)], 1).reshape(-1)[::2]
    assert not dist_t.is_contiguous() and not index_t.is_contiguous() and not y_s.is_contiguous()
    assert torch.equal(y_s, y)
    _compare(dist_t, index_t, y_s, C, dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=0.5, tau=0.8))


def test_the_most_neighbours():
    """``MAX_K`` neighbours (the kNN's limit) are taken, by the entry of the largest KP; one more is
    a ValueError. Each K maps to the smallest entry that holds next_pow2(K)."""
    B, C, K = 37, 5, kd.MAX_K
    dist, index, y = _case(B, C, K, seed=13)
    _compare(dist, index, y, C, dict(m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0, tau=0.8))
    with pytest.raises(ValueError, match="at most"):
        kd.density(torch.rand(3, K + 1, device=DEV), torch.zeros(3, K + 1, dtype=torch.long, device=DEV),
                   torch.zeros(3, dtype=torch.long, device=DEV), 1, m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0,
                   tau=0.8)
    assert [kd._entry("fwd", kd._kp(k)) for k in (1, 2, 16, 17, kd.MAX_K)] == \
        ["fwd_kp16", "fwd_kp16", "fwd_kp16", "fwd_kp128", "fwd_kp128"]


def test_custom_ops_opcheck():
    dist, index, y = _case(9, 3, 2)
    dist = dist.requires_grad_()
    torch.library.opcheck(torch.ops.daal_triton.density.default, (dist, index, y, 0.2, 0.05, 0.5, 1.0, 0.8),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    for d in (dist.detach(), dist.detach().t().contiguous().t()):  # the fake copied a transposed dist's strides
        torch.library.opcheck(torch.ops.daal_triton.density_backward.default,
                              (torch.randn(9, device=DEV), None, d, index, 0.8),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.build
def test_gpu_builds():
    assert_compiled_without_spills(compile_launches(kd.launches()))
