"""The plain-PyTorch DAAL against docs/method.md: an independent float64 implementation, gradcheck,
cases worked out by hand, and every edge case of docs/method.md."""
import math

import pytest
import torch

from daal_testing import random_problem
from daal_triton import reference as R

EPS = 1e-12
HP = dict(k=3, m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0, alpha=16.0, tau=0.8,
          lambda_pull=0.0, lambda_dens=0.5, lambda_len=0.0, l_max=1.0, normalize=True)


# ------------------------------------------------------------------ an independent oracle
def independent_daal(z, y, seg, *, k, m0, m_min, m_max, gamma, alpha, tau, lambda_pull,
                     lambda_dens, lambda_len, l_max, normalize, reduction="mean", ref=None,
                     ref_labels=None, ref_includes_batch=False):
    """docs/method.md written again, loop by loop, in the difference form (not the GEMM form).

    ``reduction="none"``: the B per-sample values of step 7. ``ref``/``ref_labels``: the kNN radii
    over that reference set ("Memory banks": its rows go through step 1 too; row i is left out
    for sample i only with ``ref_includes_batch``); without one, over the batch, self left out."""
    B, C = z.shape[0], seg.shape[0]

    def project(rows):
        out = []
        for row in rows:
            n = torch.sqrt(torch.clamp((row ** 2).sum(), min=EPS * EPS))
            out.append(row / n if normalize else row)
        return out

    xs = project(z)
    if ref is None:
        refs, ref_y, skip_self = xs, y, True
    else:
        refs, ref_y, skip_self = project(ref), ref_labels, ref_includes_batch
    radius, valid = [], []
    for i in range(B):
        cand = []
        for j in range(len(refs)):
            if not (skip_self and j == i) and int(ref_y[j]) == int(y[i]):
                d = torch.sqrt(torch.clamp(((xs[i] - refs[j]) ** 2).sum(), min=EPS))
                cand.append((d.item(), j, d))
        cand.sort(key=lambda c: (c[0], c[1]))
        chosen = cand[:min(k, len(cand))]
        valid.append(len(chosen) > 0)
        radius.append(sum(c[2] for c in chosen) / len(chosen) if chosen else None)
    margins = []
    for i in range(B):
        if not valid[i]:
            margins.append(m0)
            continue
        same = [radius[j].item() for j in range(B) if valid[j] and int(y[j]) == int(y[i])]
        rbar = sum(same) / len(same)
        s = radius[i].item() / max(rbar, EPS)
        margins.append(min(max(m0 * s ** gamma, m_min), m_max))

    def seg_dist(x, p, q):
        u = q - p
        t = torch.clamp(((x - p) * u).sum() / torch.clamp((u * u).sum(), min=EPS), 0, 1)
        e = x - p - t * u
        return torch.sqrt(torch.clamp((e * e).sum(), min=EPS))

    line, pull = [], []
    for i in range(B):
        yi = int(y[i])
        dpos = seg_dist(xs[i], seg[yi, 0], seg[yi, 1])
        terms = [alpha * (dpos + margins[i] - seg_dist(xs[i], seg[c, 0], seg[c, 1]))
                 for c in range(C) if c != yi]
        if terms:
            lse = torch.logsumexp(torch.stack(terms), 0)
            line.append(torch.nn.functional.softplus(lse) / alpha)
        else:
            line.append(dpos * 0)
        pull.append(dpos ** 2)
    l_line = sum(line) / B
    l_pull = sum(pull) / B
    hinge = [torch.relu(tau - radius[i]) for i in range(B) if valid[i]]
    l_dens = sum(hinge) / len(hinge) if hinge else z.sum() * 0
    lens = []
    for c in range(C):
        u = seg[c, 1] - seg[c, 0]
        lens.append(torch.relu(torch.sqrt(torch.clamp((u * u).sum(), min=EPS * EPS)) - l_max) ** 2)
    l_len = sum(lens) / C
    if reduction == "none":
        return torch.stack([line[i] + lambda_pull * pull[i]
                            + (lambda_dens * torch.relu(tau - radius[i]) if valid[i] else 0 * line[i])
                            for i in range(B)])
    return l_line + lambda_pull * l_pull + lambda_dens * l_dens + lambda_len * l_len


SETTINGS = [
    dict(),
    dict(lambda_pull=0.7, lambda_len=0.3, l_max=0.2, tau=1.6, gamma=2.0),
    dict(k=1, alpha=4.0, m0=0.4, m_min=0.0, m_max=2.0, normalize=False, tau=3.0),
    dict(k=10, lambda_dens=2.0, tau=1.5, gamma=0.5),
]


@pytest.mark.parametrize("B,C,D", [(13, 5, 4), (9, 3, 7), (17, 11, 3)])
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_matches_independent_implementation(B, C, D, setting):
    hp = {**HP, **SETTINGS[setting]}
    z, y, seg = random_problem(B, C, D)
    z.requires_grad_(True)
    seg.requires_grad_(True)
    out = R.daal_loss(z, y, seg, **hp)
    ref = independent_daal(z, y, seg, **hp)
    assert abs(out.item() - ref.item()) <= 1e-9 * max(1.0, abs(ref.item()))
    g_out = torch.autograd.grad(out, (z, seg))
    g_ref = torch.autograd.grad(ref, (z, seg))
    for a, b in zip(g_out, g_ref):
        assert (a - b).norm() <= 1e-9 * max(1.0, b.norm().item())


# ------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("B,C,D", [(37, 11, 5), (7, 2, 1), (12, 4, 9)])
def test_gradcheck_full_loss(B, C, D):
    """gamma = 0 makes the (detached) margins constant, so finite differences see the same function."""
    z, y, seg = random_problem(B, C, D)
    z.requires_grad_(True)
    seg.requires_grad_(True)
    hp = {**HP, "gamma": 0.0, "tau": 2.5, "lambda_pull": 0.3, "lambda_len": 0.2, "l_max": 0.1}
    assert torch.autograd.gradcheck(lambda a, b: R.daal_loss(a, y, b, **hp), (z, seg))


@pytest.mark.parametrize("B,C,D", [(37, 11, 5), (5, 1, 3)])
def test_gradcheck_line_margin_and_radius(B, C, D):
    z, y, seg = random_problem(B, C, D)
    x = R.normalize_rows(z).requires_grad_(True)
    seg.requires_grad_(True)
    m = torch.rand(B, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: R.line_margin(a, y, b, m, alpha=8.0, lambda_pull=0.4), (x, seg))
    assert torch.autograd.gradcheck(lambda a: R.knn_radius(a, y, 2)[0].nan_to_num(posinf=0.0), (x,))


def test_gradient_matches_spec_envelope_formulas():
    """dL/dx, dL/dp, dL/dq of the line term equal the closed forms of docs/method.md ("Gradients")."""
    B, C, D = 23, 6, 5
    z, y, seg = random_problem(B, C, D)
    x = R.normalize_rows(z).requires_grad_(True)
    seg.requires_grad_(True)
    m = 0.1 + 0.3 * torch.rand(B, dtype=torch.float64)
    alpha, lam = 10.0, 0.35
    R.line_margin(x, y, seg, m, alpha=alpha, lambda_pull=lam).mean().backward()
    with torch.no_grad():
        p, q = seg[:, 0], seg[:, 1]
        u = q - p
        t = torch.clamp(((x[:, None] - p) * u).sum(-1) / (u * u).sum(-1).clamp(min=EPS), 0, 1)
        cpt = p + t[..., None] * u  # B x C x D closest points
        delta = torch.sqrt(((x[:, None] - cpt) ** 2).sum(-1).clamp(min=EPS))
        own = torch.nn.functional.one_hot(y, C).bool()
        logits = alpha * (delta[own][:, None] + m[:, None] - delta)
        logits = logits.masked_fill(own, float("-inf"))
        full = torch.cat([torch.zeros(B, 1, dtype=x.dtype), logits], 1)
        w = torch.softmax(full, 1)[:, 1:]
        g = -w / B
        g[own] = w.sum(1) / B + 2 * lam * delta[own] / B
        h = g / delta
        diff = x[:, None] - cpt
        dx = (h[..., None] * diff).sum(1)
        dp = -(h[..., None] * (1 - t)[..., None] * diff).sum(0)
        dq = -(h[..., None] * t[..., None] * diff).sum(0)
    assert torch.allclose(x.grad, dx, atol=1e-12)
    assert torch.allclose(seg.grad[:, 0], dp, atol=1e-12)
    assert torch.allclose(seg.grad[:, 1], dq, atol=1e-12)


# ------------------------------------------------------------------ worked by hand
def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_point_on_its_own_segment_two_classes_in_2d():
    seg = torch.stack([_t([0.0, 0.0], [2.0, 0.0]), _t([0.0, 3.0], [0.0, 3.0])])  # class 1: a point
    z = _t([1.0, 0.0])
    out = R.daal_loss(z, torch.tensor([0]), seg, normalize=False, return_parts=True)
    alpha, m0 = 16.0, 0.2
    expected = math.log1p(math.exp(alpha * (1e-6 + m0 - math.sqrt(10.0)))) / alpha
    assert not out.valid[0] and out.margin[0] == m0  # one sample: invalid density, margin m0
    assert abs(out.loss.item() - expected) < 1e-15
    assert out.density.item() == 0.0


def test_segment_distances_by_hand():
    seg = torch.stack([_t([0.0, 0.0], [2.0, 0.0]), _t([1.0, 1.0], [1.0, 1.0])])
    x = _t([3.0, 1.0], [1.0, -2.0], [-1.0, 0.0], [1.0, 1.0])
    d = R.line_distances(x, seg)
    expected = _t([math.sqrt(2), 2.0], [2.0, 3.0], [1.0, math.sqrt(5)], [1.0, 1e-6])
    assert torch.allclose(d, expected, atol=1e-12)


def test_knn_radius_margins_and_density_by_hand():
    z = _t([0.0], [1.0], [3.0], [10.0])
    y = torch.tensor([0, 0, 0, 1])
    seg = torch.zeros(2, 2, 1, dtype=torch.float64)
    parts = R.daal_loss(z, y, seg, k=2, normalize=False, tau=2.2, return_parts=True)
    assert torch.allclose(parts.radius[:3], _t(2.0, 1.5, 2.5))
    assert torch.isinf(parts.radius[3]) and parts.valid.tolist() == [True, True, True, False]
    assert torch.allclose(parts.margin, _t(0.2, 0.15, 0.25, 0.2))  # rbar = 2, m = 0.2 r / 2
    assert abs(parts.density.item() - (0.2 + 0.7 + 0.0) / 3) < 1e-12


def test_length_term_by_hand():
    seg = torch.stack([_t([0.0, 0.0], [3.0, 0.0]), _t([0.0, 0.0], [0.0, 0.5])])
    assert abs(R.length_term(seg, 1.0).item() - 2.0) < 1e-15  # ((3 - 1)^2 + 0) / 2 (unsquared: 1)


def test_margins_average_only_the_valid_radii_by_hand():
    """rbar_c is the mean over the class's *valid* samples: an invalid one (radius 9, as a row
    without neighbours could carry) counts neither in the sum nor in the count, and gets m0."""
    r = _t(0.2, 0.4, 9.0, 0.3, 0.6)
    valid = torch.tensor([True, True, False, True, True])
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = R.adaptive_margins(r, valid, labels, 2, m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0)
    # class 0: rbar = 0.3 -> 0.2 * 0.2 / 0.3, 0.2 * 0.4 / 0.3; class 1: rbar = 0.45
    assert torch.allclose(m, _t(0.4 / 3, 0.8 / 3, 0.2, 0.2 / 1.5, 0.4 / 1.5), rtol=1e-15, atol=0)
    m2 = R.adaptive_margins(r, valid, labels, 2, m0=0.2, m_min=0.15, m_max=0.25, gamma=2.0)
    # gamma 2: 0.2 * (2/3)^2 = 0.089 -> m_min, 0.2 * (4/3)^2 = 0.356 -> m_max, 0.2 * (2/3)^2, 0.2 * (4/3)^2
    assert torch.allclose(m2, _t(0.15, 0.25, 0.2, 0.15, 0.25), rtol=1e-15, atol=0)


def test_an_invalid_sample_keeps_m0_outside_the_clamp_range():
    """docs/method.md: an invalid sample's margin is m0 itself, not clamped to [m_min, m_max]
    (here m0 = 0.9 > m_max): pinned on the reference too, not only through the kernels' test.
    The valid ones are clamped as usual; so is a whole loss's one-sample class."""
    r = _t(0.2, 0.4, 9.0, 0.3, 0.6)
    valid = torch.tensor([True, True, False, True, True])
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = R.adaptive_margins(r, valid, labels, 2, m0=0.9, m_min=0.05, m_max=0.5, gamma=1.0)
    assert torch.equal(m, _t(0.5, 0.5, 0.9, 0.5, 0.5))
    m = R.adaptive_margins(r, valid, labels, 2, m0=0.01, m_min=0.05, m_max=0.5, gamma=1.0)
    assert torch.allclose(m, _t(0.05, 0.05, 0.01, 0.05, 0.05), rtol=1e-15, atol=0)
    z, y, seg = random_problem(9, 3, 5)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])  # class 2: one sample, invalid
    import daal_triton as dt
    parts = dt.daal_loss(z, y, seg, m0=0.9, m_max=0.5, backend="reference", return_parts=True)
    assert parts.margin[8].item() == 0.9 and bool((parts.margin[:8] <= 0.5).all())


def test_margins_of_zero_radii_divide_by_the_floored_mean():
    """s_i = r_i / max(rbar, eps): a class whose valid radii are all 0 gets s = 0, so m = m_min
    (a 0 / 0 would make its margins NaN)."""
    r = _t(0.0, 0.0, 0.5, 0.7)
    valid = torch.tensor([True, True, True, True])
    labels = torch.tensor([0, 0, 1, 1])
    m = R.adaptive_margins(r, valid, labels, 2, m0=0.2, m_min=0.05, m_max=0.5, gamma=1.0)
    assert torch.allclose(m, _t(0.05, 0.05, 0.2 * 0.5 / 0.6, 0.2 * 0.7 / 0.6), rtol=1e-15, atol=0)


def test_float64_rows_whose_squared_norm_overflows_are_normalised():
    """float64 rows of norm beyond 2^512 are normalised at their own scale, 2^-600 (2^-96 left
    those beyond 2^608 infinite, then zero: a review, 2026-12-07); float32's scale is unchanged."""
    z = torch.tensor([[1e300, 2e300, 0.0], [3e200, 0.0, -4e200], [1.0, 2.0, 2.0]], dtype=torch.float64,
                     requires_grad=True)
    x = R.normalize_rows(z)
    want = torch.tensor([[1, 2, 0], [0.6, 0, -0.8], [1 / 3, 2 / 3, 2 / 3]], dtype=torch.float64)
    want[0] /= 5 ** 0.5
    assert torch.allclose(x, want, rtol=1e-12, atol=0)
    (g,) = torch.autograd.grad((x * torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).sum(), z)
    assert torch.isfinite(g).all() and g[0].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_margins_with_m0_zero_where_s_to_the_gamma_overflows(dtype):
    """m0 = 0 gives m_min whatever s^gamma is: in float32 a duplicate's floored radius (s ~ 1e-6)
    to the power -7 overflows, and 0 * inf was NaN, the loss NaN for finite inputs (a numerical
    probe, 2026-12-06); the float64 loss is finite, and the float32 one now matches it."""
    r = _t(1e-6, 0.5, 0.7, 1.0).to(torch.float32)
    valid, labels = torch.ones(4, dtype=torch.bool), torch.tensor([0, 0, 1, 1])
    m = R.adaptive_margins(r, valid, labels, 2, m0=0.0, m_min=0.05, m_max=0.5, gamma=-7.0)
    assert torch.equal(m, torch.full((4,), 0.05))
    big = R.adaptive_margins(r, valid, labels, 2, m0=0.2, m_min=0.05, m_max=0.5, gamma=-7.0)
    assert big[0].item() == 0.5  # m0 > 0: an overflowing s^gamma still clamps to m_max
    torch.manual_seed(0)
    z, y, seg = torch.randn(32, 16), torch.randint(0, 6, (32,)), torch.randn(6, 2, 16)
    for c in range(6):  # a duplicate pair in each class: radius floor 1e-6
        i = (y == c).nonzero().flatten()
        z[i[1]] = z[i[0]]
    hp = {**HP, "m0": 0.0, "gamma": -7.0, "k": 1}
    exact = R.daal_loss(z.double(), y, seg.double(), **hp)
    low = R.daal_loss(z.to(dtype), y, seg, **hp)
    assert torch.isfinite(exact) and abs(low.item() - exact.item()) <= 1e-3 * abs(exact.item())


def test_knn_radius_by_hand():
    """knn_radius: without a reference set the other rows of the class (self excluded); with one,
    its rows of the class, excluding row i only when ref_includes_batch."""
    x = _t([0.0], [1.0], [3.0], [10.0])
    y = torch.tensor([0, 0, 0, 1])
    r, valid, index = R.knn_radius(x, y, 2)
    assert torch.allclose(r[:3], _t(2.0, 1.5, 2.5), rtol=1e-15, atol=0) and torch.isinf(r[3])
    assert valid.tolist() == [True, True, True, False] and index[0].tolist() == [1, 2]
    ref, ref_y = _t([0.0], [1.0], [4.0], [6.0]), torch.tensor([0, 0, 0, 1])
    r, valid, _ = R.knn_radius(x, y, 1, ref=ref, ref_labels=ref_y)  # nothing excluded: x_0 = ref_0
    assert torch.allclose(r, _t(1e-6, 1e-6, 1.0, 4.0), rtol=1e-12, atol=0) and valid.all()
    r, valid, _ = R.knn_radius(x, y, 1, ref=ref, ref_labels=ref_y, ref_includes_batch=True)  # ref_i is x_i's
    assert torch.allclose(r[:3], _t(1.0, 1.0, 2.0), rtol=1e-12, atol=0) and torch.isinf(r[3])
    assert valid.tolist() == [True, True, True, False]


# ------------------------------------------------------------------ docs/method.md "Edge cases"
def _finite_grads(z, y, seg, **hp):
    z = z.clone().requires_grad_(True)
    seg = seg.clone().requires_grad_(True)
    loss = R.daal_loss(z, y, seg, **hp)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(z.grad).all() and torch.isfinite(seg.grad).all()
    return loss, z.grad, seg.grad


def test_class_with_one_sample_gets_margin_m0_and_no_density():
    z, _, seg = random_problem(6, 3, 4)
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    parts = R.daal_loss(z, y, seg, m0=0.33, return_parts=True)
    assert not parts.valid[5] and parts.margin[5].item() == 0.33
    assert parts.valid[:5].all()
    _finite_grads(z, y, seg)


def test_k_larger_than_every_class_uses_all_members():
    z, _, seg = random_problem(7, 2, 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    big = R.daal_loss(z, y, seg, k=50, return_parts=True)
    exact = R.daal_loss(z, y, seg, k=3, return_parts=True)  # |S_i| = 2 or 3
    assert torch.allclose(big.radius, exact.radius)
    x = R.normalize_rows(z)
    d01, d02 = (x[0] - x[1]).norm(), (x[0] - x[2]).norm()
    assert abs(big.radius[0].item() - (d01 + d02).item() / 2) < 1e-12


def test_single_class_has_no_line_term():
    z, _, seg = random_problem(5, 1, 3)
    y = torch.zeros(5, dtype=torch.long)
    parts = R.daal_loss(z, y, seg, tau=5.0, return_parts=True)
    assert parts.line.item() == 0.0
    assert abs(parts.loss.item() - 0.5 * parts.density.item()) < 1e-15
    _, _, gseg = _finite_grads(z, y, seg, tau=5.0, lambda_pull=0.0)
    assert gseg.abs().max() == 0.0  # C = 1, no pull: segments do not act


def test_absent_class_still_acts_as_negative():
    z, _, seg = random_problem(8, 4, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])  # class 3 never appears
    _, _, gseg = _finite_grads(z, y, seg, alpha=2.0)
    assert gseg[3].abs().max() > 0


def test_zero_length_segment_is_distance_to_a_point():
    z, y, seg = random_problem(9, 3, 4)
    seg[1, 1] = seg[1, 0]
    x = R.normalize_rows(z)
    d = R.line_distances(x, seg)
    assert torch.allclose(d[:, 1], (x - seg[1, 0]).norm(dim=1), atol=1e-12)
    _finite_grads(z, y, seg)


def test_duplicate_embeddings_have_finite_gradients():
    z, _, seg = random_problem(6, 2, 3)
    z[1] = z[0]
    z[2] = z[0]
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    parts = R.daal_loss(z, y, seg, k=1, return_parts=True)
    assert abs(parts.radius[0].item() - 1e-6) < 1e-12  # clamped: sqrt(eps)
    _finite_grads(z, y, seg, k=1)


def test_zero_embeddings_with_normalize():
    z, _, seg = random_problem(4, 2, 3)
    z[0] = 0.0
    z[2] = 0.0
    y = torch.tensor([0, 0, 1, 1])
    _finite_grads(z, y, seg)  # x = z / eps there: a finite (large) Jacobian I / eps, never NaN
    x = R.normalize_rows(z)
    assert x[0].abs().max() == 0.0 and x[2].abs().max() == 0.0
    # the Jacobian there is exactly I / eps (eps = 1e-12): the clamp is on ||z||^2 at eps^2
    zz = z.clone().requires_grad_(True)
    w = torch.randn_like(z)
    (R.normalize_rows(zz) * w).sum().backward()
    torch.testing.assert_close(zz.grad[0], w[0] / 1e-12, rtol=1e-15, atol=0)
    torch.testing.assert_close(zz.grad[2], w[2] / 1e-12, rtol=1e-15, atol=0)
    parts = R.daal_loss(z, y, seg, return_parts=True)
    assert parts.valid.all() and torch.isfinite(parts.radius).all()


def test_batch_of_one():
    z, _, seg = random_problem(1, 3, 5)
    y = torch.tensor([2])
    parts = R.daal_loss(z, y, seg, return_parts=True)
    assert not parts.valid[0] and parts.density.item() == 0.0
    _finite_grads(z, y, seg)


def _edge_one_sample_class():
    z, _, seg = random_problem(9, 4, 33)
    return z, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 3]), seg, {}  # class 3: one sample


def _edge_k_beyond_every_class():
    z, _, seg = random_problem(11, 3, 33)
    return z, torch.arange(11) % 3, seg, dict(k=50)


def _edge_one_class():
    z, _, seg = random_problem(7, 1, 33)
    return z, torch.zeros(7, dtype=torch.long), seg, dict(tau=3.0, lambda_pull=0.3)


def _edge_absent_class():
    z, _, seg = random_problem(10, 5, 33)
    return z, torch.tensor([0, 1, 2, 4, 0, 1, 2, 4, 0, 1]), seg, dict(alpha=2.0)  # no class 3


def _edge_zero_length_segment():
    z, _, seg = random_problem(9, 3, 129)
    seg[1, 1] = seg[1, 0]
    return z, torch.arange(9) % 3, seg, dict(lambda_pull=0.3)


def _edge_duplicates():
    z, _, seg = random_problem(9, 3, 33)
    z[1] = z[0]
    z[2] = z[0]
    z[7] = 2 * z[4]  # the same row once normalised (the scale is a power of 2: exact)
    return z, torch.tensor([0, 0, 0, 1, 1, 2, 2, 1, 2]), seg, dict(k=1)


def _edge_zero_embeddings():
    z, _, seg = random_problem(8, 3, 33)
    z[0] = 0.0
    z[3] = 0.0
    return z, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), seg, {}


def _edge_batch_of_one():
    z, _, seg = random_problem(1, 3, 129)
    return z, torch.tensor([2]), seg, {}


def _edge_bank(includes_batch):
    def make():
        z, _, seg = random_problem(7, 4, 33)
        y = torch.tensor([0, 1, 2, 0, 1, 2, 3])
        bank = torch.randn(10, 33, dtype=torch.float64)
        bank_y = torch.tensor([0, 1, 1, 2, 3, 3, 1, 0, 5, 2])  # 5: no sample's label
        return z, y, seg, dict(bank=bank, bank_labels=bank_y, includes_batch=includes_batch, k=2)
    return make


EDGE_CASES = {
    "one_sample_class": _edge_one_sample_class,
    "k_beyond_every_class": _edge_k_beyond_every_class,
    "C1": _edge_one_class,
    "absent_class": _edge_absent_class,
    "zero_length_segment": _edge_zero_length_segment,
    "duplicates": _edge_duplicates,
    "zero_embeddings": _edge_zero_embeddings,
    "B1": _edge_batch_of_one,
    "bank_includes_batch": _edge_bank(True),
    "bank_apart": _edge_bank(False),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_cases_match_independent_implementation(case, reduction):
    """docs/method.md "Edge cases": each case, loss and gradients (embeddings, segments, and a
    memory bank's rows), against the independent float64 implementation of the page above; with
    ``reduction="none"`` the gradient is that of a random weighting of the B values, so that each
    sample's gradient counts."""
    z, y, seg, extra = EDGE_CASES[case]()
    bank = extra.pop("bank", None)
    bank_y = extra.pop("bank_labels", None)
    includes_batch = extra.pop("includes_batch", False)
    hp = {**HP, "tau": 1.5, "lambda_len": 0.2, "l_max": 0.3, **extra, "reduction": reduction}
    z.requires_grad_(True)
    seg.requires_grad_(True)
    leaves = (z, seg)
    kw, ind_kw = {}, {}
    if bank is not None:
        bank.requires_grad_(True)
        leaves = (z, seg, bank)
        ref = torch.cat([z, bank]) if includes_batch else bank
        ref_y = torch.cat([y, bank_y]) if includes_batch else bank_y
        kw = dict(ref_embeddings=ref, ref_labels=ref_y, ref_includes_batch=includes_batch)
        ind_kw = dict(ref=ref, ref_labels=ref_y, ref_includes_batch=includes_batch)
    out = R.daal_loss(z, y, seg, **hp, **kw)
    expected = independent_daal(z, y, seg, **hp, **ind_kw)
    assert out.shape == expected.shape and torch.isfinite(out).all()
    assert ((out - expected).abs() <= 1e-9 * expected.abs().clamp(min=1.0)).all(), (out, expected)
    w = torch.rand(out.shape, dtype=out.dtype) + 0.5
    g_out = torch.autograd.grad(out, leaves, w)
    g_ref = torch.autograd.grad(expected, leaves, w)
    for name, a, b in zip(("embeddings", "segments", "bank"), g_out, g_ref):
        # row by row: a zero embedding's row is ~1e12 (the Jacobian I / eps) and would hide the others'
        err, size = (a - b).flatten(1).norm(dim=1), b.flatten(1).norm(dim=1)
        assert torch.isfinite(a).all() and (err <= 1e-9 * size.clamp(min=1.0)).all(), (name, err, size)


# ------------------------------------------------------------------ reduction, dtypes
def test_reduction_none_mean_equals_loss_minus_length():
    z, _, seg = random_problem(12, 3, 4)
    y = torch.arange(12) % 3
    hp = dict(lambda_pull=0.4, lambda_len=0.7, l_max=0.1, tau=1.9)
    per = R.daal_loss(z, y, seg, reduction="none", **hp)
    parts = R.daal_loss(z, y, seg, return_parts=True, **hp)
    assert per.shape == (12,)
    assert abs(per.mean().item() - (parts.loss - 0.7 * parts.length).item()) < 1e-12
    assert abs(parts.loss.item() - (parts.line + 0.4 * parts.pull + 0.5 * parts.density
                                    + 0.7 * parts.length).item()) < 1e-12


@pytest.mark.parametrize("zdt,sdt,expected", [
    (torch.float16, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.float32, torch.float32, torch.float32),
    (torch.float32, torch.float64, torch.float64),
])
def test_loss_dtype_never_below_inputs_or_float32(zdt, sdt, expected):
    z, y, seg = random_problem(10, 3, 6)
    z = z.to(zdt).requires_grad_(True)
    seg = seg.to(sdt).requires_grad_(True)
    loss = R.daal_loss(z, y, seg)
    assert loss.dtype == expected
    loss.backward()
    assert z.grad.dtype == zdt and seg.grad.dtype == sdt


def test_autocast_does_not_lower_the_loss_precision():
    z, y, seg = random_problem(10, 3, 6, dtype=torch.float32)
    plain = R.daal_loss(z, y, seg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = R.daal_loss(z, y, seg)
    assert cast.dtype == torch.float32
    assert abs(cast.item() - plain.item()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_backward_inside_autocast_keeps_the_gradients_exact(dtype):
    """``backward()`` called inside the autocast region (as many training loops do) ran the
    reference's gradient GEMMs in half precision: float32 gradients 1.8e-3 off float64 (bfloat16),
    and inf/NaN under a GradScaler's 2**24. They now run in the operands' dtype: the same bits as a
    backward outside the region, for the loss and for the distances."""
    z, y, seg = random_problem(37, 11, 129, dtype=torch.float32)
    other = torch.randn(13, 129)

    def grads(inside):
        zz, ss, oo = (t.clone().requires_grad_(True) for t in (z, seg, other))
        with torch.autocast("cpu", dtype=dtype):
            total = R.daal_loss(zz, y, ss) * 2.0 ** 24 + R.pairwise_distance(zz, oo).sum()
            if inside:
                total.backward()
        if not inside:
            total.backward()
        return zz.grad, ss.grad, oo.grad

    for inside, outside in zip(grads(True), grads(False)):
        assert inside.dtype == torch.float32 and bool(torch.isfinite(inside).all())
        assert torch.equal(inside, outside)


def test_compiled_under_autocast_the_gradients_stay_exact():
    """``torch.compile`` of a step that calls the loss inside a bfloat16 autocast region traced
    the backward of the reference's GEMMs in that region (AOTAutograd traces the backward where
    the call was compiled; the loss switches autocast off only around its forward): bfloat16
    GEMMs, embedding gradients 4e-3 off. Now the bits of the eager call, whose backward runs
    outside the region."""
    import daal_triton as dt

    z, y, seg = random_problem(37, 11, 129, dtype=torch.float32)

    def grads(fn):
        zz, ss = z.clone().requires_grad_(True), seg.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(zz, y, ss)
        loss.backward()
        return loss, zz.grad, ss.grad

    def step(a, labels, s):
        return dt.daal_loss(a, labels, s, backend="reference")

    eager = grads(step)
    compiled = grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    for name, a, b in zip(("loss", "d/dembeddings", "d/dsegments"), compiled, eager):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), name
