"""DAALLoss: the module users train with."""
import numpy as np
import pytest
import torch

import daal_triton as dt
from daal_testing import random_problem


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_frozen_segments_or_fixed_embeddings(backend):
    """Freezing the segments (``loss.segments.requires_grad_(False)``: a backbone warm-up against
    fixed classes) or training them on fixed features (embeddings without gradient) leaves the
    other gradient bit for bit what a backward of both gives, and no gradient where none is asked."""
    torch.manual_seed(3)
    z, y, _ = random_problem(37, 11, 33)
    module = dt.DAALLoss(11, 33, backend=backend, lambda_pull=0.3)
    zz = z.float().requires_grad_()
    module(zz, y).backward()
    gz, gs = zz.grad, module.segments.grad
    module.segments.grad = None
    module.segments.requires_grad_(False)
    zz = z.float().requires_grad_()
    module(zz, y).backward()
    assert module.segments.grad is None and torch.equal(zz.grad, gz)
    module.segments.requires_grad_(True)
    module(z.float(), y).backward()
    assert torch.equal(module.segments.grad, gs)


def test_segments_parameter_and_initialisation():
    loss = dt.DAALLoss(7, 16)
    assert isinstance(loss.segments, torch.nn.Parameter) and loss.segments.shape == (7, 2, 16)
    p, q = loss.segments[:, 0].detach(), loss.segments[:, 1].detach()
    mid = (p + q) / 2
    assert torch.allclose(mid.norm(dim=1), torch.ones(7), atol=1e-5)  # midpoints on the sphere
    assert torch.allclose((q - p).norm(dim=1), torch.full((7,), 0.2), atol=1e-5)
    assert ((q - p) * mid).sum(1).abs().max() < 1e-5  # tangent to the sphere
    assert list(dict(loss.named_parameters())) == ["segments"]


def test_forward_equals_functional_and_trains():
    z, y, _ = random_problem(20, 4, 8, dtype=torch.float32)
    loss = dt.DAALLoss(4, 8, lambda_pull=0.1, backend="reference")
    value = loss(z, y)
    same = dt.daal_loss(z, y, loss.segments, lambda_pull=0.1, backend="reference")
    assert value.item() == same.item()
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    before = loss.segments.detach().clone()
    value.backward()
    opt.step()
    assert not torch.equal(before, loss.segments.detach())
    assert loss(z, y).item() < value.item()


def test_state_dict_round_trip_and_repr():
    a, b = dt.DAALLoss(3, 5), dt.DAALLoss(3, 5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.segments, b.segments)
    assert "alpha=16.0" in repr(a) and "num_classes=3" in repr(a)
    assert "reduction='mean'" in repr(a) and "init_length=0.2" in repr(a)
    assert "check_values=True" in repr(dt.DAALLoss(3, 5, check_values=True))


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_hyperparameters_are_attributes_that_take_effect(backend):
    """``loss.alpha = 32.0`` (a schedule's step) is checked and changes the next call as building
    the module with it does; before, it set an attribute nothing read (a user's-eye probe)."""
    z, y, _ = random_problem(11, 3, 5, dtype=torch.float32)
    loss = dt.DAALLoss(3, 5, backend=backend, lambda_pull=0.1)
    assert {n: getattr(loss, n) for n in dt.Hyperparameters.names()} == loss.hparams
    changes = {"alpha": 32.0, "k": 2, "m0": 0.3, "tau": 1.5, "gamma": 0.5, "lambda_pull": 0.0,
               "lambda_len": 0.2, "l_max": 0.1, "normalize": False, "reduction": "none"}
    for name, value in changes.items():
        setattr(loss, name, value)
        assert getattr(loss, name) == value and getattr(loss.hp, name) == value
        built = dt.DAALLoss(3, 5, backend=backend, **{**loss.hparams})
        built.load_state_dict(loss.state_dict())
        assert torch.equal(loss(z, y), built(z, y)), name
    assert loss(z, y).shape == (11,)  # reduction "none"
    assert "alpha=32.0" in repr(loss) and "k=2" in repr(loss)
    before = loss.hp
    for name, value, message in (("alpha", 0.0, "alpha must be > 0"), ("k", 0, "k must be an integer"),
                                 ("m_min", 0.9, "m_min and m_max must satisfy"), ("reduction", "sum", "reduction must be"),
                                 ("tau", float("nan"), "tau must be a finite number")):
        with pytest.raises(ValueError, match=message):
            setattr(loss, name, value)
        assert loss.hp is before  # unchanged by a refused value
    loss.hp = loss.hp.replace(m_min=0.6, m_max=0.9)  # several at once
    assert (loss.m_min, loss.m_max) == (0.6, 0.9)
    assert set(loss.state_dict()) == {"segments"}  # hyperparameters are not state
    # hp itself is checked too: a dict (the natural slip) was taken, then failed at the next call
    # with an AttributeError ('dict' object has no attribute 'k'); hp stays as it was
    for wrong in (loss.hparams | {"alpha": 3.0}, None, "alpha=3"):
        with pytest.raises(ValueError, match="hp must be a daal_triton.Hyperparameters"):
            loss.hp = wrong
        assert loss.hp == dt.Hyperparameters(**loss.hparams) and loss.m_min == 0.6
    loss.hp = dt.Hyperparameters(**(loss.hparams | {"alpha": 3.0}))
    assert loss.alpha == 3.0 and loss(z, y).shape == (11,)
    # a module pickled while hp was a plain attribute still loads, with its hyperparameters
    import pickle

    state = dict(loss.__dict__)
    state["hp"] = state.pop("_hp")
    old = dt.DAALLoss.__new__(dt.DAALLoss)
    old.__setstate__(state)
    assert old.hp == loss.hp and torch.equal(old(z, y), loss(z, y))
    assert pickle.loads(pickle.dumps(loss)).hp == loss.hp
    assert not hasattr(dt.DAALLoss.__new__(dt.DAALLoss), "hp")  # unbuilt: AttributeError, not KeyError


@pytest.mark.parametrize("point_proxies", [False, True])
def test_what_the_segments_shape_fixes_is_read_only(point_proxies):
    """``num_classes``, ``embedding_dim`` and ``point_proxies`` are the segments' shape: an
    assigned ``num_classes`` did nothing, and an assigned ``point_proxies`` failed at the next call
    with "segments must have shape (C, 2, D) ..., got (11, 4, 16)" (noticed 2026-12-07). Assigning
    one is an AttributeError naming it, and the module stays usable; old pickles still load."""
    import pickle

    loss = dt.DAALLoss(11, 129, k=2, point_proxies=point_proxies)
    z, y = torch.randn(37, 129), torch.arange(37) % 11
    expected = loss(z, y)
    for name, value in (("num_classes", 5), ("embedding_dim", 7), ("point_proxies", not point_proxies)):
        with pytest.raises(AttributeError, match=f"DAALLoss.{name} is fixed when the loss is built"):
            setattr(loss, name, value)
    assert (loss.num_classes, loss.embedding_dim, loss.point_proxies) == (11, 129, point_proxies)
    assert torch.equal(loss(z, y), expected)
    loss.reset_parameters()
    assert loss.segments.shape == (11, 1 if point_proxies else 2, 129)
    # pickled while they were plain attributes (and, for the oldest, before point_proxies existed)
    state = {k: v for k, v in loss.__dict__.items() if k not in ("_num_classes", "_embedding_dim", "_point_proxies")}
    state.update(num_classes=11, embedding_dim=129, **({"point_proxies": True} if point_proxies else {}))
    old = dt.DAALLoss.__new__(dt.DAALLoss)
    old.__setstate__(state)
    assert (old.num_classes, old.embedding_dim, old.point_proxies) == (11, 129, point_proxies)
    assert "num_classes" not in old.__dict__ and torch.equal(old(z, y), loss(z, y))
    class Early(dt.DAALLoss):  # assigns before the module is built: the same message, not "no segments"
        def __init__(self):
            self.num_classes = 3
            super().__init__(3, 4)

    with pytest.raises(AttributeError, match="^DAALLoss.num_classes is fixed when the loss is built; build"):
        Early()
    back = pickle.loads(pickle.dumps(loss))
    assert (back.num_classes, back.embedding_dim, back.point_proxies) == (11, 129, point_proxies)
    assert not hasattr(dt.DAALLoss.__new__(dt.DAALLoss), "num_classes")


def test_default_dtype_and_reset_parameters():
    # segments follow the default dtype as nn.Linear's weights do, and a module built on the meta
    # device gets real segments back with to_empty() + reset_parameters()
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert dt.DAALLoss(3, 5).segments.dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
    with torch.device("meta"):
        meta = dt.DAALLoss(4, 6, init_length=0.3)
    loss = meta.to_empty(device="cpu")
    loss.reset_parameters(generator=torch.Generator().manual_seed(0))
    expect = dt.init_segments(4, 6, length=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss.segments, expect) and loss.segments.requires_grad
    points = dt.DAALLoss(4, 6, point_proxies=True)
    points.reset_parameters()
    assert points.segments.shape == (4, 1, 6) and torch.allclose(points.segments.norm(dim=2), torch.ones(4, 1))


def test_ref_emb_that_is_the_batch_means_no_reference_set():
    # pytorch-metric-learning's convention: ref_emb=embeddings (the same tensor) is no reference
    # set; the sample is not its own neighbour and a miner's tuple counts every index
    z, y, _ = random_problem(12, 3, 5, dtype=torch.float32)
    loss = dt.DAALLoss(3, 5, backend="reference", tau=2.0)
    plain = loss(z, y)
    assert loss(z, y, None, z, y).item() == plain.item() == loss(z, y, ref_emb=z).item()
    assert loss(z, y, ref_emb=z, ref_labels=y, ref_includes_batch=True).item() == plain.item()
    tup = (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8]))
    assert loss(z, y, tup, z, y).item() == loss(z, y, tup).item()
    other = loss(z, y, None, z.clone(), y)  # another tensor: a reference set, nothing excluded
    assert other.item() != plain.item()


def test_ref_emb_that_is_the_batch_stays_so_under_a_module_backward_hook():
    """A full backward hook on the module hands forward new tensor objects over the same memory:
    ``ref_emb=embeddings`` silently became a reference set (each sample its own neighbour), and
    ``ref_emb`` alone a "must be given together" error (a user-loop probe, 2026-12-07). A copy or
    a detached view still is a reference set."""
    z, y, _ = random_problem(12, 3, 5, dtype=torch.float32)
    loss = dt.DAALLoss(3, 5, backend="reference", tau=2.0)
    e = z.clone().requires_grad_()
    plain = loss(e, y)
    (g_plain,) = torch.autograd.grad(plain, e)
    seen = []
    loss.register_full_backward_hook(lambda m, gi, go: seen.append(1))
    for value in (loss(e, y, None, e, y), loss(e, y, ref_emb=e)):
        (g,) = torch.autograd.grad(value, e)
        assert value.item() == plain.item() and torch.equal(g, g_plain)
    assert len(seen) == 2
    assert loss(e, y, None, e.clone(), y).item() != plain.item()
    assert loss(e, y, None, e.detach(), y).item() != plain.item()  # no gradient through it: a reference set
    # without gradients, a detached view of the embeddings is another tensor too: the loss was the
    # batch's alone, unlike the same call in training (a probe, 2026-12-07)
    d = e.detach()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert loss(d, y, None, d.detach(), y).item() == loss(d, y, None, d.clone(), y).item() != plain.item()
            assert loss(d, y, None, d, y).item() == plain.item()


def test_a_view_the_caller_made_is_a_reference_set_in_every_mode():
    """``ref_emb=embeddings[:]`` (a view the caller made, not a hook's wrapper) is a reference set
    with or without gradients and with or without a backward hook: in grad mode it was taken for
    the batch (any same-memory tensor counted while an input required a gradient), so the same
    call's loss differed between training and evaluation (a layouts probe, 2026-12-07). The hook's
    own wrapper of ``ref_emb=embeddings`` still means no reference set."""
    z, y, _ = random_problem(12, 3, 5, dtype=torch.float32)
    loss = dt.DAALLoss(3, 5, backend="reference", tau=2.0)
    e = z.clone().requires_grad_()
    plain, as_set = loss(e, y).item(), loss(e, y, ref_emb=e.clone(), ref_labels=y).item()
    assert as_set != plain
    v = (z * 1.0).requires_grad_()[:, :]  # embeddings that are themselves a view (as model(x).flatten(1) is)
    for hook in (False, True):
        if hook:
            loss.register_full_backward_hook(lambda m, gi, go: None)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                assert loss(e, y, ref_emb=e[:], ref_labels=y).item() == as_set, (hook, grad)
                assert loss(e, y, ref_emb=e[:], ref_labels=y[:]).item() == as_set, (hook, grad)
                assert loss(e, y, ref_emb=e).item() == plain, (hook, grad)
                # the hook's wrapper of a view is a view of its root: still the batch (a review, 2026-12-07)
                assert loss(v, y, ref_emb=v, ref_labels=y).item() == plain, (hook, grad)
                assert loss(v, y, None, v, y).item() == plain, (hook, grad)
                assert loss(v, y, None, v[:], y).item() == as_set, (hook, grad)  # positional: told apart too
                if not hook:  # a label view is the labels only as a hook's wrapper (README: under a hook, it counts)
                    assert loss(e, y, ref_emb=e, ref_labels=y[:]).item() == as_set, grad


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_ref_emb_that_is_the_batch_under_reentrant_checkpointing(backend):
    """``checkpoint(loss, emb, y, None, emb, y, use_reentrant=True)``: the recomputation inside the
    backward gets each input detached on its own (two objects over one memory), and took them for
    a reference set: the loss was right, its gradients 15% off (a machinery probe, 2026-12-07).
    Now the same gradients as a plain call; outside a backward two such leaves stay two tensors."""
    import torch.utils.checkpoint as cp

    z, y, _ = random_problem(37, 11, 33, dtype=torch.float32)
    loss = dt.DAALLoss(11, 33, backend=backend, tau=2.0)
    grads = []
    for reentrant in (None, True, False):
        e = z.clone().requires_grad_()
        value = loss(e, y, None, e, y) if reentrant is None else cp.checkpoint(loss, e, y, None, e, y,
                                                                               use_reentrant=reentrant)
        loss.segments.grad = None
        value.backward()  # (reentrant checkpointing refuses autograd.grad)
        grads.append((value.item(), e.grad, loss.segments.grad))
    for other in grads[1:]:
        assert other[0] == grads[0][0] and all(torch.equal(a, b) for a, b in zip(other[1:], grads[0][1:]))
    a, b = z.clone().requires_grad_(), None
    b = a.detach().requires_grad_()
    assert loss(a, y, None, b, y).item() != grads[0][0]  # two leaves outside a backward: a reference set


def test_module_errors_name_its_arguments():
    z, y, _ = random_problem(6, 3, 5, dtype=torch.float32)
    loss = dt.DAALLoss(3, 5, backend="reference")
    with pytest.raises(ValueError, match="^ref_emb and ref_labels must be given together"):
        loss(z, y, ref_emb=torch.randn(4, 5))
    with pytest.raises(ValueError, match="^ref_emb must have 5 columns"):
        loss(z, y, ref_emb=torch.randn(4, 3), ref_labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="ref_emb contains NaN"):
        loss(z, y, ref_emb=torch.full((4, 5), float("nan")), ref_labels=torch.zeros(4, dtype=torch.long))


def test_miner_weights_in_the_loss_dtype():
    # a float64 loss weighs its samples in float64 (1/3 is not rounded to float32's 0.33333334)
    from daal_triton.loss import miner_weights

    tup = (torch.tensor([0, 0, 0, 1]), torch.tensor([2, 2, 2, 2]))
    w = miner_weights(tup, 3, dtype=torch.float64)
    assert w.dtype == torch.float64 and w.tolist() == [3 / 4, 1 / 4, 1.0]
    with pytest.raises(ValueError, match="indices_tuple must index the batch's 3 rows"):
        miner_weights((torch.tensor([-1]), torch.tensor([1])), 3)  # CPU tensors: always checked
    with pytest.raises(ValueError, match="indices_tuple must index the batch's 3 rows"):
        miner_weights((torch.tensor([0]), torch.tensor([3])), 3)  # one past the last row
    z, y, seg = random_problem(3, 2, 4)
    per = dt.DAALLoss(2, 4, backend="reference", reduction="none").double()
    with torch.no_grad():
        per.segments.copy_(seg)
    assert torch.equal(per(z, y, tup), per(z, y) * torch.tensor([3 / 4, 1 / 4, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("backend,dtype,tol", [("reference", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)])
def test_a_miner_tuple_weighs_the_terms_as_the_method_says(backend, dtype, tol):
    """docs/method.md step 7, "With a miner's tuple": ``L = (1/B) sum_i w_i (line_i + pull_i) +
    lambda_dens (1/|V|) sum_{i in V} w_i max(0, tau - r_i) + lambda_len L_len``: the means keep
    their denominators, the length term is not weighted (uneven weights, an invalid sample, every
    term on)."""
    B, C, D = 16, 4, 8
    z, _, seg = random_problem(B, C, D)
    y = torch.cat([torch.tensor([3]), torch.arange(B - 1) % 3])  # class 3: one sample, invalid
    hp = dict(tau=1.5, lambda_len=1.0, l_max=0.05, lambda_pull=0.3, lambda_dens=0.5)
    tup = (torch.tensor([0, 0, 1, 3, 0]), torch.tensor([5, 6, 7, 8, 2]), torch.tensor([9, 10, 11, 12, 2]))
    count = torch.bincount(torch.cat(tup), minlength=B).double()
    w = count / count.max()
    loss = dt.DAALLoss(C, D, backend=backend, **hp).to(dtype)
    with torch.no_grad():
        loss.segments.copy_(3 * seg)
    parts = dt.daal_loss(z.to(dtype), y, loss.segments, reduction="none", return_parts=True, backend=backend, **hp)
    hinge = torch.where(parts.valid, (hp["tau"] - parts.radius).clamp_min(0), torch.zeros_like(parts.radius))
    line_pull = parts.per_sample - hp["lambda_dens"] * hinge
    assert not parts.valid[0] and parts.valid[1:].all()
    line_pull, hinge, length = line_pull.detach(), hinge.detach(), parts.length.detach()
    want = ((w * line_pull.double()).sum() / B + hp["lambda_dens"] * (w * hinge.double()).sum() / parts.valid.sum()
            + hp["lambda_len"] * length.double())
    got = loss(z.to(dtype), y, tup).detach()
    assert abs(float(got) - float(want)) <= tol * abs(float(want)), (float(got), float(want))
    assert length > 0 and hinge.sum() > 0 and len(set(w.tolist())) > 2  # every term counts


@pytest.mark.parametrize("bad", [(torch.tensor([True, False]), torch.tensor([False, True])),
                                 (torch.tensor([[0, 1]]), torch.tensor([[2, 0]]))], ids=["bool", "2-D"])
def test_indices_tuple_of_bools_or_matrices_is_refused(bad):
    """A miner's tuple holds 1-D integer index tensors: boolean masks (read as indices 0 and 1) or
    2-D tensors are a ValueError naming the argument, not a silent misreading or a RuntimeError."""
    from daal_triton.loss import miner_weights

    with pytest.raises(ValueError, match="indices_tuple must hold 1-D integer tensors"):
        miner_weights(bad, 3)


def test_indices_tuple_on_the_meta_device_is_refused():
    """Index tensors with no values (the meta device) beside real embeddings: a ValueError naming
    ``indices_tuple``, not torch's NotImplementedError from copying them."""
    loss = dt.DAALLoss(2, 4, backend="reference")
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    tup = (torch.tensor([0, 1], device="meta"), torch.tensor([2, 3]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="indices_tuple must hold real tensors"):
        loss(z, y, tup)


def test_init_length_bounds():
    """``init_length`` >= 0: 0 gives zero-length segments (points on the sphere), < 0 is refused."""
    loss = dt.DAALLoss(3, 5, init_length=0.0)
    assert torch.equal(loss.segments[:, 0], loss.segments[:, 1])
    assert torch.allclose(loss.segments[:, 0].norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="init_length must be >= 0"):
        dt.DAALLoss(3, 5, init_length=-0.1)


@pytest.mark.parametrize("args,kw,message", [
    ((0, 4), {}, "num_classes must be an integer >= 1"),
    ((-1, 4), {}, "num_classes must be an integer >= 1"),
    ((2.5, 4), {}, "num_classes must be an integer >= 1"),
    ((3, 0), {}, "embedding_dim must be an integer >= 1"),
    ((3, True), {}, "embedding_dim must be an integer >= 1"),
    ((3, 4), {"length": float("nan")}, "length must be a finite number"),
    ((3, 4), {"length": "0.2"}, "length must be a finite number"),
    ((3, 4), {"length": -1.0}, "length must be >= 0"),
    ((3, 4), {"generator": 0}, "generator must be a torch.Generator or None"),
])
def test_init_segments_names_a_bad_argument(args, kw, message):
    """The public ``init_segments`` checks what ``DAALLoss`` checks: a NaN length would otherwise
    give NaN segments silently, a negative count torch's "negative dimension"."""
    with pytest.raises(ValueError, match=message):
        dt.init_segments(*args, **kw)
    assert dt.init_segments(np.int64(3), np.int32(4), length=np.float32(0.0)).shape == (3, 2, 4)


def test_unchecked_miner_indices_outside_the_batch_count_for_no_sample(monkeypatch):
    """With the value checks off (the CUDA default; on CPU tensors only while torch.compile
    traces), an index outside the batch, negative or too large, weighs no sample."""
    from daal_triton import loss as loss_module

    monkeypatch.setattr(loss_module, "value_checks_on", lambda device, check_values=None: False)
    w = loss_module.miner_weights((torch.tensor([-1, -1, 2, 5]), torch.tensor([1, 1, 1, 3])), 3,
                                  dtype=torch.float64)
    assert w.tolist() == [0.0, 1.0, 1 / 3]
    assert loss_module.miner_weights((torch.tensor([-2]), torch.tensor([7])), 3).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.interpreter
def test_compile_fullgraph_with_a_miner_tuple():
    # the tuple's index-range check must not run while torch.compile traces (a data-dependent read)
    z, y, _ = random_problem(12, 3, 8, dtype=torch.float32)
    tup = (torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9, 10, 11]))
    for backend in ("reference", "triton"):
        loss = dt.DAALLoss(3, 8, backend=backend)
        eager = loss(z, y, tup)
        compiled = torch.compile(lambda a, b, t: loss(a, b, t), fullgraph=True, backend="aot_eager")(z, y, tup)
        assert torch.allclose(compiled, eager, rtol=1e-6, atol=0), backend


def test_memory_bank_reference_set():
    z, y, seg = random_problem(8, 2, 4, dtype=torch.float32)
    bank, bank_y = torch.randn(30, 4), torch.arange(30) % 2
    loss = dt.DAALLoss(2, 4, backend="reference")
    with torch.no_grad():
        loss.segments.copy_(seg)
    parts = dt.daal_loss(z, y, seg, ref_embeddings=bank, ref_labels=bank_y, return_parts=True,
                         backend="reference")
    x = torch.nn.functional.normalize(z, dim=1)
    xb = torch.nn.functional.normalize(bank, dim=1)
    d = torch.cdist(x.double(), xb.double())
    d[y[:, None] != bank_y[None, :]] = float("inf")
    expected = d.topk(3, largest=False).values.mean(1)
    assert torch.allclose(parts.radius.double(), expected, atol=1e-5)
    assert torch.allclose(loss(z, y, ref_emb=bank, ref_labels=bank_y), parts.loss)


def test_memory_bank_rows_are_left_unnormalised_with_normalize_false():
    """docs/method.md "Memory banks": the reference rows go through step 1 like the batch, so with
    normalize=False neither is normalised (radii over the raw rows, far from the unit sphere's)."""
    z, y, seg = random_problem(8, 2, 4, dtype=torch.float64)
    bank, bank_y = 3.0 * torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 2
    parts = dt.daal_loss(z, y, seg, ref_embeddings=bank, ref_labels=bank_y, normalize=False, k=2,
                         return_parts=True, backend="reference")
    d = torch.cdist(z, bank)
    d[y[:, None] != bank_y[None, :]] = float("inf")
    torch.testing.assert_close(parts.radius, d.topk(2, largest=False).values.mean(1), rtol=1e-10, atol=0)


def test_miner_weights_follow_a_float64_bank():
    """A float64 reference set makes the loss float64 (docs/method.md "Precision"), its miner
    weights included: 1/3 and 2/3 are not rounded to float32 on the way (float32 embeddings and
    segments)."""
    z, y, seg = random_problem(6, 2, 4, dtype=torch.float32)
    bank, bank_y = torch.randn(10, 4, dtype=torch.float64), torch.arange(10) % 2
    per = dt.DAALLoss(2, 4, backend="reference", reduction="none")
    with torch.no_grad():
        per.segments.copy_(seg)
    # triplets mined against the bank: the anchors 0 (three times), 1 (twice) and 2 weigh the batch
    tup = (torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([3, 3, 3, 4, 4, 5]), torch.tensor([7, 7, 7, 7, 7, 7]))
    w = torch.tensor([3, 2, 1, 0, 0, 0], dtype=torch.float64) / 3
    out = per(z, y, tup, bank, bank_y)
    assert out.dtype == torch.float64
    assert torch.equal(out, per(z, y, None, bank, bank_y) * w)


def test_memory_bank_that_starts_with_the_batch_excludes_self():
    z, y, seg = random_problem(8, 2, 4, dtype=torch.float64)
    bank, bank_y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 2
    ref, ref_y = torch.cat([z, bank]), torch.cat([y, bank_y])
    parts = dt.daal_loss(z, y, seg, ref_embeddings=ref, ref_labels=ref_y, ref_includes_batch=True,
                         return_parts=True, k=2)
    x = torch.nn.functional.normalize(torch.cat([z, bank]), dim=1)
    d = torch.cdist(x[:8], x)
    d[y[:, None] != ref_y[None, :]] = float("inf")
    d[torch.arange(8), torch.arange(8)] = float("inf")
    assert torch.allclose(parts.radius, d.topk(2, largest=False).values.mean(1), atol=1e-10)
    assert (parts.neighbors != torch.arange(8)[:, None]).all()
    with pytest.raises(ValueError, match="ref_includes_batch=True needs ref_embeddings"):
        dt.daal_loss(z, y, seg, ref_includes_batch=True)


def test_point_proxies_hold_zero_length_segments():
    """The ablation: one learnable point per class; the loss sees p = q, and training keeps it so."""
    loss = dt.DAALLoss(4, 6, point_proxies=True, backend="reference", lambda_len=1.0)
    assert loss.segments.shape == (4, 1, 6)
    # built on the unit sphere as reset_parameters() draws them (a 0.2 segment's end is not)
    assert torch.allclose(loss.segments.norm(dim=2), torch.ones(4, 1))
    z, y = torch.randn(10, 6), torch.arange(10) % 4
    # the point's gradient is the sum of its two ends' (at p = q, t = 0: q's is zero)
    point = loss.segments.detach().clone()
    ends = torch.cat([point, point], 1).requires_grad_(True)
    dt.daal_loss(z, y, ends, backend="reference", lambda_len=1.0).backward()
    loss(z, y).backward()
    torch.testing.assert_close(loss.segments.grad[:, 0], ends.grad.sum(1), rtol=1e-6, atol=1e-7)
    assert loss.segments.grad.abs().max() > 1e-3
    loss.segments.grad = None
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out = loss(z, y)
        out.backward()
        opt.step()
    seg = loss.endpoints()
    assert torch.equal(seg[:, 0], seg[:, 1])
    same = dt.daal_loss(z, y, seg.detach(), backend="reference", lambda_len=1.0)
    assert torch.allclose(loss(z, y), same)
    with pytest.raises(ValueError, match="point_proxies"):
        dt.DAALLoss(4, 6, point_proxies=1)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_triton_gradients_are_reproducible(deterministic):
    """On a GPU, two forward+backward passes of DAALLoss (Triton backend) give the same bits for
    the segments' gradient (the line margin's backward has no atomics); under
    ``torch.use_deterministic_algorithms(True)`` for the embeddings' gradient too (the kNN's
    reference-set gradient is then summed per pair in a fixed order). Assumes cuBLAS repeats its
    GEMMs bit for bit in one stream (warn_only: no CUBLAS_WORKSPACE_CONFIG needed)."""
    z, y, _ = random_problem(180, 100, 512, dtype=torch.float32, device="cuda")
    module = dt.DAALLoss(100, 512, backend="triton").cuda()
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            zz = z.clone().requires_grad_()
            runs.append(torch.autograd.grad(module(zz, y), (zz, module.segments)))
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
    assert torch.equal(runs[0][1], runs[1][1]), "segment gradient"
    if deterministic:
        assert torch.equal(runs[0][0], runs[1][0]), "embedding gradient"


@pytest.mark.interpreter
def test_second_derivatives_on_triton_say_where_they_run():
    """create_graph=True through the Triton backend: the backward's operators refuse to be
    differentiated by name, pointing at the reference backend (not PyTorch's "no autograd formula
    was registered"), and the reference backend computes them."""
    torch.manual_seed(0)
    emb = torch.randn(12, 16, requires_grad=True)
    labels = torch.arange(12) % 3
    for backend in ("triton", "reference"):
        loss_fn = dt.DAALLoss(3, 16, backend=backend)
        (g,) = torch.autograd.grad(loss_fn(emb, labels), emb, create_graph=True)
        if backend == "triton":
            with pytest.raises(NotImplementedError, match="backend='reference'"):
                g.square().sum().backward()
        else:
            g.square().sum().backward()
            assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_half_precision_point_proxies_under_the_other_autocast_type():
    """A ``.half()`` point-proxy module under a bfloat16 autocast region (and ``.bfloat16()`` under
    float16) duplicated its points with autocast's ``cat``, which refuses the other half type: a
    RuntimeError from PyTorch's type promotion. The loss is now what it is outside the region."""
    for module_dtype, cast in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        loss_fn = dt.DAALLoss(3, 8, point_proxies=True, backend="reference").to(module_dtype)
        emb, labels = torch.randn(12, 8), torch.arange(12) % 3
        with torch.autocast("cpu", dtype=cast):
            inside = loss_fn(emb, labels)
        assert inside.dtype == torch.float32 and torch.equal(inside, loss_fn(emb, labels))
        inside.backward()
        assert loss_fn.segments.grad.dtype == module_dtype and bool(torch.isfinite(loss_fn.segments.grad).all())
