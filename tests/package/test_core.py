"""The loss contract (daal_triton.core): one home for the hyperparameters, checked on construction."""
import dataclasses
import inspect
import math

import pytest
import torch

from daal_testing import needs_kernels
import daal_triton
from daal_triton import reference
from daal_triton.core import Hyperparameters, Operators, compose
from daal_triton.functional import daal_loss

FIELDS = {f.name: f.default for f in dataclasses.fields(Hyperparameters)}


def _keyword_defaults(fn) -> dict:
    params = inspect.signature(fn).parameters
    return {name: p.default for name, p in params.items() if name in FIELDS}


@pytest.mark.parametrize("fn", [daal_loss, daal_triton.DAALLoss.__init__], ids=["daal_loss", "DAALLoss"])
def test_public_signatures_spell_the_dataclass_defaults(fn):
    assert _keyword_defaults(fn) == FIELDS


def test_every_field_has_help_text():
    for f in dataclasses.fields(Hyperparameters):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("name", [n for n, d in FIELDS.items() if isinstance(d, float)])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_hyperparameters_are_refused_at_construction(name, bad):
    with pytest.raises(ValueError, match=name):
        daal_triton.DAALLoss(3, 4, **{name: bad})
    with pytest.raises(ValueError, match=name):
        Hyperparameters(**{name: bad})


@pytest.mark.parametrize("kw, name", [
    (dict(k=0), "k"), (dict(k=2.0), "k"), (dict(k=True), "k"), (dict(alpha=0.0), "alpha"),
    (dict(m_min=0.6), "m_min"), (dict(m0=-0.1), "m0"), (dict(tau=-1.0), "tau"),
    (dict(lambda_dens=-1.0), "lambda_dens"), (dict(reduction="sum"), "reduction"),
    (dict(normalize="yes"), "normalize"), (dict(gamma="1"), "gamma"),
    (dict(m0=1e39, m_max=1e39), "m0"), (dict(alpha=torch.tensor(16.0)), "alpha"),
    (dict(lambda_dens=-4e38), "lambda_dens"),
    # every bound of docs/method.md "Hyperparameters", each on its own
    (dict(m_min=-0.01), "m_min"), (dict(l_max=-0.5), "l_max"), (dict(lambda_pull=-0.1), "lambda_pull"),
    (dict(lambda_len=-0.1), "lambda_len"), (dict(normalize=None), "normalize"),
])
def test_bad_hyperparameters_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        Hyperparameters(**kw)
    with pytest.raises(ValueError, match=name):
        daal_triton.DAALLoss(3, 4, **kw)


def test_numpy_scalars_are_accepted_as_python_numbers():
    """Hyperparameters often come from NumPy (configs, sweeps): its integers and floats count, and
    are stored as Python numbers."""
    np = pytest.importorskip("numpy")
    hp = Hyperparameters(k=np.int64(2), alpha=np.float32(8.0), tau=np.float64(0.5))
    assert hp == Hyperparameters(k=2, alpha=8.0, tau=0.5)
    assert type(hp.k) is int and type(hp.alpha) is float
    loss = daal_triton.DAALLoss(np.int64(3), np.int32(4), init_length=np.float32(0.1), k=np.int64(2))
    assert (loss.num_classes, loss.embedding_dim, loss.hp.k) == (3, 4, 2)
    assert type(loss.num_classes) is int
    with pytest.raises(ValueError, match="check_values must be None, True or False"):
        daal_triton.DAALLoss(3, 4, check_values="no")
    # NumPy's bools as well (np.True_: what a NumPy comparison in a sweep gives), stored as bool
    hp = Hyperparameters(normalize=np.False_)
    assert hp == Hyperparameters(normalize=False) and type(hp.normalize) is bool
    loss = daal_triton.DAALLoss(3, 4, normalize=np.bool_(False), check_values=np.True_, point_proxies=np.False_)
    assert type(loss.hp.normalize) is bool and loss.check_values is True and loss.point_proxies is False
    z, y = torch.randn(5, 4), torch.arange(5) % 3
    assert torch.equal(daal_triton.daal_loss(z, y, loss.segments, return_parts=np.True_, backend="reference").loss,
                       daal_triton.daal_loss(z, y, loss.segments, backend="reference"))
    with pytest.raises(ValueError, match=r"normalize must be True or False, got (np\.int64\()?1"):
        Hyperparameters(normalize=np.int64(1))


def test_loss_module_keeps_one_hyperparameter_object():
    loss = daal_triton.DAALLoss(3, 4, alpha=8.0, k=2)
    assert loss.hp == Hyperparameters(alpha=8.0, k=2)
    assert loss.hparams == dict(FIELDS, alpha=8.0, k=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        loss.hp.alpha = 1.0


def test_bad_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="backend"):
        daal_triton.DAALLoss(3, 4, backend="cuda")


def test_compose_runs_the_operators_it_is_given():
    """The composition uses exactly the operators plugged in: a spy sees each called once."""
    calls = []

    def knn(*a, **kw):
        calls.append("knn")
        return reference.knn(*a, **kw)

    def line_margin(*a, **kw):
        calls.append("line_margin")
        return reference.line_margin(*a, **kw)

    z = torch.randn(9, 5, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    seg = torch.randn(3, 2, 5, dtype=torch.float64)
    parts = compose(z, y, seg, Hyperparameters(), Operators(knn=knn, line_margin=line_margin))
    assert calls == ["knn", "line_margin"]
    expected = reference.daal_loss(z, y, seg)
    assert torch.equal(parts.loss, expected)


def _own_distance_sq(z: torch.Tensor, y: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """delta_{i,y_i}^2 by docs/method.md step 5, written out in float64 (normalised rows)."""
    x = z / z.norm(dim=1, keepdim=True)
    p, q = seg[y, 0], seg[y, 1]
    u = q - p
    t = (((x - p) * u).sum(1) / (u * u).sum(1)).clamp(0, 1)
    e = x - p - t[:, None] * u
    return (e * e).sum(1).clamp_min(1e-12)


# the Triton backend computes in float32 (float64 inputs run on the reference)
BACKEND_DTYPES = [("reference", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)]


@pytest.mark.parametrize("backend, dtype, tol", BACKEND_DTYPES, ids=["reference", "triton"])
def test_parts_with_sample_weights_weigh_line_and_pull(backend, dtype, tol):
    """With a miner's sample weights, ``pull`` is mean(w delta_own^2) and ``line`` the weighted
    mean of the line terms: written out from the unweighted per-sample values (a ``pull`` left
    unweighted still added up to the loss, through ``line``)."""
    from daal_triton.functional import loss_with

    g = torch.Generator().manual_seed(5)
    B, D, C = 21, 7, 4
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.arange(B) % C
    seg = torch.randn(C, 2, D, generator=g, dtype=torch.float64) * 0.5
    w = torch.rand(B, generator=g, dtype=torch.float64)
    z, seg = z.to(dtype), seg.to(dtype)  # the float64 expectations below start from the same values
    hp = Hyperparameters(lambda_pull=0.3, lambda_len=0.2, l_max=0.5)
    parts = loss_with(z, y, seg, hp, return_parts=True, sample_weights=w.to(dtype), backend=backend)
    plain = loss_with(z, y, seg, dataclasses.replace(hp, reduction="none"), return_parts=True, backend=backend)
    own = _own_distance_sq(z.double(), y, seg.double())
    hinge = torch.where(plain.valid, torch.relu(hp.tau - plain.radius.double()), torch.zeros_like(own))
    line = plain.per_sample.double() - hp.lambda_pull * own - hp.lambda_dens * hinge
    torch.testing.assert_close(parts.pull.double(), (w * own).mean(), rtol=tol, atol=0)
    torch.testing.assert_close(parts.line.double(), (w * line).mean(), rtol=tol, atol=tol)
    total = parts.line + hp.lambda_pull * parts.pull + hp.lambda_dens * parts.density + hp.lambda_len * parts.length
    torch.testing.assert_close(total, parts.loss, rtol=tol, atol=0)


@pytest.mark.parametrize("backend, dtype, tol", BACKEND_DTYPES, ids=["reference", "triton"])
def test_parts_report_the_length_term_when_it_does_not_count(backend, dtype, tol):
    """``length`` is L_len = mean_c max(0, ||u_c|| - l_max)^2 even at lambda_len = 0 (the
    default): it is read, not added."""
    g = torch.Generator().manual_seed(6)
    z, y = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.arange(10) % 3
    seg = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)  # lengths ~ 3 > l_max = 1
    z, seg = z.to(dtype), seg.to(dtype)
    lengths = (seg[:, 1] - seg[:, 0]).double().norm(dim=1)
    expected = (torch.relu(lengths - 1.0) ** 2).mean()
    assert expected > 1.0
    parts = daal_loss(z, y, seg, return_parts=True, backend=backend)
    torch.testing.assert_close(parts.length.double(), expected, rtol=tol, atol=0)
    assert torch.equal(parts.loss, daal_loss(z, y, seg, backend=backend))  # not added at lambda_len = 0


def test_parts_line_and_pull_are_read_only():
    """The line/pull split is computed for reading: it carries no autograd graph (it would keep the
    own-class distances' graph alive), while the loss does."""
    z, y, seg = torch.randn(9, 5, requires_grad=True), torch.arange(9) % 3, torch.randn(3, 2, 5, requires_grad=True)
    parts = daal_loss(z, y, seg, return_parts=True, lambda_pull=0.3, backend="reference")
    assert parts.loss.requires_grad
    assert not parts.line.requires_grad and not parts.pull.requires_grad


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("segments_grad", [False, True])
def test_parts_carry_a_graph_only_where_the_loss_has_one(backend, segments_grad):
    """``length`` (L_len) depends on the segments alone: it needs a gradient on either backend
    exactly when they do (the Triton combine step used to mark it differentiable whenever the
    embeddings were, a graph with nothing behind it); ``density`` always does."""
    z, y = torch.randn(9, 5, requires_grad=True), torch.arange(9) % 3
    seg = torch.randn(3, 2, 5).requires_grad_(segments_grad)
    parts = daal_loss(z, y, seg, return_parts=True, backend=backend)
    assert parts.length.requires_grad == segments_grad
    assert parts.density.requires_grad and parts.loss.requires_grad
    # as DAALParts' docstring says: the radius and the per-sample values carry the graph, the rest not
    assert parts.radius.requires_grad and parts.per_sample.requires_grad
    assert not (parts.margin.requires_grad or parts.valid.requires_grad or parts.neighbors.requires_grad)
    parts.loss.backward()
    assert z.grad is not None and (seg.grad is not None) == segments_grad


def test_sample_weights_keep_the_loss_dtype():
    """Weights in another dtype neither raise nor lower the loss's: float64 weights on a float32
    loss are taken in float32 (the same bits as float32 weights)."""
    from daal_triton.functional import loss_with

    z, y, seg = torch.randn(9, 5), torch.arange(9) % 3, torch.randn(3, 2, 5)
    w = torch.rand(9, dtype=torch.float64)
    hp = Hyperparameters(reduction="none")
    out = loss_with(z, y, seg, hp, sample_weights=w, backend="reference")
    assert out.dtype == torch.float32
    assert torch.equal(out, loss_with(z, y, seg, hp, sample_weights=w.float(), backend="reference"))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_k_beyond_the_reference_rows_costs_no_padding(backend):
    """No row has more than N neighbours (N: the reference set's rows): a larger k selects N and
    allocates nothing B x k (at k = 2**31 - 1 the padding alone would be 13 x 2**31 int64)."""
    g = torch.Generator().manual_seed(5)
    B, C, D = 13, 3, 7
    z, y, seg = torch.randn(B, D, generator=g), torch.arange(B) % C, torch.randn(C, 2, D, generator=g)
    bank, bank_y = torch.randn(20, D, generator=g), torch.arange(20) % C
    for ref in ({}, {"ref_embeddings": bank, "ref_labels": bank_y}):
        n = B if not ref else 20
        exact = daal_loss(z, y, seg, k=n, return_parts=True, backend=backend, **ref)
        huge = daal_loss(z, y, seg, k=2**31 - 1, return_parts=True, backend=backend, **ref)
        assert huge.neighbors.shape == (B, n)
        assert torch.equal(huge.loss, exact.loss) and torch.equal(huge.radius, exact.radius)
        assert torch.equal(huge.neighbors, exact.neighbors)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_parts_line_is_exact_where_it_is_known(backend):
    """``line`` is the mean of the per-sample line terms, not the total less the other terms (whose
    rounding came through: +-3e-7, negative in 36 of 200 seeds): with one class it is 0 (no other
    segment: docs/method.md, step 6), exactly without a pull term, within the pull's rounding with
    one, and never negative (a mean of softplus values)."""
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(1, 6, generator=g) + 0.2 * torch.randn(11, 6, generator=g)  # radii < tau
        seg, y = torch.randn(1, 2, 6, generator=g), torch.zeros(11, dtype=torch.long)
        parts = daal_loss(z, y, seg, return_parts=True, backend=backend)
        assert parts.line.item() == 0.0 and parts.density.item() > 0
        parts = daal_loss(z, y, seg, return_parts=True, backend=backend, lambda_pull=0.7)
        assert 0.0 <= parts.line.item() <= 1e-6 * parts.pull.item()
        z, seg = torch.randn(11, 6, generator=g), torch.randn(4, 2, 6, generator=g) * 5  # far segments
        for lambda_pull in (0.0, 0.7):
            parts = daal_loss(z, torch.arange(11) % 4, seg, return_parts=True, backend=backend,
                              lambda_pull=lambda_pull)
            assert parts.line.item() >= 0.0


@needs_kernels
def test_the_kernels_run_on_the_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device: tensors on cuda:1 while cuda:0 is current
    must make cuda:1 current for the call (else "Pointer argument cannot be accessed from
    Triton"). ``_on_device`` enters ``torch.cuda.device`` exactly then (the device calls are
    recorded: no GPU needed), and the loss, the pairwise distance and the kNN take the guard with
    their inputs' device. (On two GPUs, tests/package/test_fast_path.py runs them on cuda:1.)"""
    import contextlib

    from daal_triton import core, functional

    entered = []

    class Guard:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    for dev, guarded in (("cuda:1", True), ("cuda:0", False), ("cuda", False), ("cpu", False)):
        with core._on_device(torch.device(dev)):
            pass
        assert entered == ([torch.device(dev)] if guarded else []), dev
        entered.clear()
    seen = []

    def recording(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(core, "_on_device", recording)
    monkeypatch.setattr(functional, "_on_device", recording)
    z, y = torch.randn(12, 8), torch.arange(12) % 3
    functional.daal_loss(z, y, torch.randn(3, 2, 8), backend="reference")
    functional.knn(z, z, 2, backend="reference")
    functional.pairwise_distance(z, z, backend="triton")
    assert seen == [z.device] * 3


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_knn_index_may_be_changed_in_place_before_backward(backend):
    """The public ``knn``'s index belongs to the caller: ``index.clamp_(min=0)`` (to gather labels
    of padded rows) before ``backward`` raised PyTorch's in-place error on the Triton backend, whose
    backward had saved that very tensor (a layouts probe, 2026-12-07); the gradients are the
    untouched call's."""
    torch.manual_seed(5)
    q, r = torch.randn(13, 9), torch.randn(6, 9)
    ql, rl = torch.arange(13) % 4, torch.arange(6) % 4
    grads = []
    for change in (False, True):
        qq, rr = q.clone().requires_grad_(), r.clone().requires_grad_()
        dist, index = daal_triton.knn(qq, rr, 3, query_labels=ql, ref_labels=rl, backend=backend)
        assert (index == -1).any()  # padded rows: what the clamp is for
        if change:
            index.clamp_(min=0)
        dist.masked_fill(torch.isinf(dist), 0).sum().backward()
        grads.append((qq.grad, rr.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert daal_triton.knn(q, r, 3, backend=backend)[1].data_ptr() != 0  # no gradient: no copy needed (still a result)
