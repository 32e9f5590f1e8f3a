"""The FIFO cross-batch memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import daal_triton as dt
from daal_triton.memory import MemoryBank


def test_fifo_keeps_the_newest_rows_in_order():
    bank = MemoryBank(5, 2)
    assert len(bank) == 0 and bank.get()[0].shape == (0, 2)
    for start in (0, 3, 6):
        rows = torch.arange(start, start + 3, dtype=torch.float32)
        bank.enqueue(torch.stack([rows, -rows], 1), rows.long())
    emb, lab = bank.get()
    assert lab.tolist() == [4, 5, 6, 7, 8] and emb[:, 0].tolist() == [4, 5, 6, 7, 8]
    assert len(bank) == 5  # full, not 9
    rows = torch.arange(10, 17)
    bank.enqueue(torch.stack([rows, -rows], 1).float(), rows)  # more than it holds: the newest 5
    emb, lab = bank.get()
    assert lab.tolist() == [12, 13, 14, 15, 16] and emb[:, 0].tolist() == [12, 13, 14, 15, 16] and len(bank) == 5


@pytest.mark.parametrize("part", ["all", "tail"])
def test_enqueue_of_the_banks_own_rows(part):
    """Rows of the bank itself (``get()`` returns views of its ring) can be enqueued again: PyTorch
    refused the overlapping copy with a RuntimeError (a layouts probe, 2026-12-07)."""
    bank = MemoryBank(10, 3)
    bank.enqueue(torch.randn(8, 3), torch.arange(8))
    emb, lab = bank.get()
    want_e, want_l = emb.clone(), lab.clone()
    if part == "tail":
        emb, lab, want_e, want_l = emb[3:], lab[3:], want_e[3:], want_l[3:]
    bank.enqueue(emb, lab)
    got_e, got_l = bank.get()
    n = want_e.shape[0]
    assert torch.equal(got_e[-n:], want_e) and torch.equal(got_l[-n:], want_l)
    assert len(bank) == 10


def test_enqueue_detaches_and_validates():
    bank = MemoryBank(4, 3)
    e = torch.randn(2, 3, requires_grad=True)
    bank.enqueue(e * 2, torch.tensor([0, 1]))
    assert not bank.get()[0].requires_grad
    with pytest.raises(ValueError, match="embeddings must have shape"):
        bank.enqueue(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="size must be an integer"):
        MemoryBank(0, 3)


def test_bank_as_reference_set_changes_radii_and_keeps_gradients():
    torch.manual_seed(0)
    loss_fn = dt.DAALLoss(3, 4, backend="reference", tau=2.0)
    bank = MemoryBank(32, 4)
    bank.enqueue(torch.randn(32, 4), torch.arange(32) % 3)
    emb = torch.randn(9, 4, requires_grad=True)
    y = torch.arange(9) % 3
    ref, ref_y = bank.with_batch(emb, y)
    with_bank = loss_fn(emb, y, ref_emb=ref, ref_labels=ref_y, ref_includes_batch=True)
    alone = loss_fn(emb, y)
    assert with_bank.item() != alone.item()
    with_bank.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    state = bank.state_dict()
    other = MemoryBank(32, 4)
    other.load_state_dict(state)
    assert torch.equal(other.get()[0], bank.get()[0])


def test_a_float64_bank_is_never_cast_down():
    """docs/method.md: nothing is cast to a lower precision. A float64 reference set with float32
    embeddings and segments runs in float64 (on the reference backend): its radii equal those of
    the all-float64 problem, which a float32 cast of the bank would miss by ~1e-8."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64)
    seg = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    y = torch.arange(7) % 3
    bank = torch.randn(20, 5, generator=g, dtype=torch.float64)
    bank_y = torch.arange(20) % 3
    z32, seg32 = z.float(), seg.float()
    parts = dt.daal_loss(z32, y, seg32, ref_embeddings=bank, ref_labels=bank_y, return_parts=True)
    exact = dt.daal_loss(z32.double(), y, seg32.double(), ref_embeddings=bank, ref_labels=bank_y,
                         return_parts=True)
    assert parts.loss.dtype == parts.radius.dtype == torch.float64
    assert torch.equal(parts.radius, exact.radius) and torch.equal(parts.loss, exact.loss)
    with pytest.raises(ValueError, match="float64 inputs run on the reference backend"):
        dt.daal_loss(z32, y, seg32, ref_embeddings=bank, ref_labels=bank_y, backend="triton")


def test_bank_inputs_are_checked_and_meet_the_batch():
    bank = MemoryBank(6, 3)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        bank.enqueue(torch.randn(2, 3), torch.tensor([0.0, 1.7]))
    with pytest.raises(ValueError, match="labels must be a torch.Tensor"):
        bank.enqueue(torch.randn(2, 3), [0, 1])
    with pytest.raises(ValueError, match="embeddings must be float16, bfloat16, float32 or float64"):
        bank.enqueue(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    rows = torch.randn(4, 3)
    bank.enqueue(rows, torch.arange(4))
    batch = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    ref, ref_y = bank.with_batch(batch, torch.tensor([1, 2]))
    assert ref.dtype == torch.float32 and torch.equal(ref[2:], rows), "the bank is not rounded to bf16"
    assert not ref.requires_grad, "the loss routes the batch rows' gradient itself (ref_includes_batch=True)"
    assert torch.equal(ref[:2], batch.detach().float()) and ref_y.tolist() == [1, 2, 0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"state\['embeddings'\] must be a tensor of shape \(6, 3\)"):
        bank.load_state_dict(MemoryBank(5, 3).state_dict())
    # with_batch checks the batch as enqueue does (a torch.cat error, or a reference set with more
    # labels than rows that the loss would blame on ref_labels, before)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(n, 3\)"):
        bank.with_batch(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must have 2 entries"):
        bank.with_batch(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dtype must be torch.float16, bfloat16, float32 or float64"):
        MemoryBank(4, 3, dtype=torch.long)  # stored 0.4, 1.7, -2.9 as 0, 1, -2
    with pytest.raises(ValueError, match="device must be a torch.device or a device string such as 'cuda:0', "
                                         "got 'cuda0'"):
        MemoryBank(4, 3, device="cuda0")


def test_enqueue_refuses_rows_that_would_poison_the_bank():
    """A NaN row, or a row that float16 storage turns into inf, is refused before anything is
    written (it would otherwise stay for ``size`` rows, and every loss call given the bank would be
    refused); ``check_values=False`` applies to GPU tensors only: CPU ones are always checked.
    Labels are free (-1, an unlabelled row, is never a neighbour)."""
    bank = MemoryBank(6, 3)
    bank.enqueue(torch.randn(2, 3), torch.tensor([0, 1]))
    before = [t.clone() for t in bank.get()]
    nan = torch.randn(3, 3)
    nan[1, 2] = float("nan")
    for emb, lab, words in ((nan, torch.arange(3), "embeddings contains NaN or inf"),
                            (torch.full((2, 3), float("inf")), torch.arange(2), "embeddings contains NaN")):
        with pytest.raises(ValueError, match=words):
            bank.enqueue(emb, lab)
        assert len(bank) == 2 and bank.ptr == 2
        assert all(torch.equal(a, b) for a, b in zip(bank.get(), before))
    with pytest.raises(dt.NonFiniteError):
        bank.enqueue(nan, torch.arange(3), check_values=False)  # on the CPU the checks always run
    half = MemoryBank(4, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"embeddings \(stored as float16\) contains NaN or inf"):
        half.enqueue(torch.tensor([[1.0, 7e4, 0.0]]), torch.tensor([0]))
    assert len(half) == 0
    half.enqueue(torch.tensor([[1.0, 6e4, 0.0]]), torch.tensor([0]))  # within float16's range
    assert len(half) == 1
    bank.enqueue(torch.randn(2, 3), torch.tensor([-1, 7]))
    assert bank.get()[1].tolist() == [0, 1, -1, 7]
    with pytest.raises(ValueError, match="check_values must be None, True or False"):
        bank.enqueue(torch.randn(1, 3), torch.tensor([0]), check_values="no")


def test_bank_state_is_checked_and_carries_no_gradient():
    bank = MemoryBank(5, 2)
    bank.enqueue(torch.randn(3, 2), torch.arange(3))
    state = bank.state_dict()
    live = dict(state, embeddings=state["embeddings"].clone().requires_grad_(True))
    other = MemoryBank(5, 2)
    other.load_state_dict(live)
    assert not other.embeddings.requires_grad and not other.get()[0].requires_grad
    assert torch.equal(other.get()[0], bank.get()[0]) and (other.ptr, other.filled) == (3, 3)
    assert torch.equal(other.get()[1], bank.get()[1])  # the labels come back too
    empty = MemoryBank(5, 2)
    empty.load_state_dict(MemoryBank(5, 2).state_dict())  # a bank saved before its first enqueue
    assert len(empty) == 0 and empty.ptr == 0
    for change, words in (({"ptr": 7, "filled": 2}, r"state\['ptr'\] must be the next row"),
                          ({"ptr": 5, "filled": 5}, r"state\['ptr'\] must be the next row"),
                          ({"ptr": 1, "filled": 3}, r"state\['ptr'\] must be the next row"),
                          ({"filled": 9}, r"state\['filled'\] must be <= the bank's size 5"),
                          ({"filled": -3}, r"state\['filled'\] must be an integer >= 0"),
                          ({"ptr": None}, r"state\['ptr'\] must be an integer >= 0"),
                          ({"labels": torch.tensor([0.5, 1.7, 2.2, 3.9, -0.5])},
                           r"state\['labels'\] must be an integer tensor"),
                          ({"embeddings": torch.full((5, 2), float("nan"))},
                           r"state\['embeddings'\] contains NaN or inf"),
                          ({"embeddings": torch.zeros(5, 2, dtype=torch.int64)},
                           r"state\['embeddings'\] must be")):
        fresh = MemoryBank(5, 2)
        with pytest.raises(ValueError, match=words):
            fresh.load_state_dict(dict(state, **change))
        assert len(fresh) == 0 and fresh.ptr == 0  # nothing half-loaded
    # checked as stored, as enqueue checks (a memory probe, 2026-12-07: a float32 state's 1e5 became
    # inf in a float16 bank, and every later loss call refused its ref_emb)
    half = MemoryBank(5, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"state\['embeddings'\] \(stored as float16\) contains NaN or inf"):
        half.load_state_dict(dict(state, embeddings=torch.full((5, 2), 1e5)))
    assert len(half) == 0
    half.load_state_dict(dict(state, embeddings=torch.full((5, 2), 6e4)))  # within float16's range
    assert torch.equal(half.get()[0], torch.full((3, 2), 6e4, dtype=torch.float16))
    full = dict(state, ptr=2, filled=5)  # a full ring may wrap anywhere
    other.load_state_dict(full)
    assert len(other) == 5 and other.ptr == 2
    # a state is a snapshot: the bank moving on does not change one kept in memory
    kept = bank.state_dict()
    bank.enqueue(torch.randn(4, 2), torch.arange(4) + 50)
    again = MemoryBank(5, 2)
    again.load_state_dict(kept)
    assert torch.equal(again.get()[1], torch.arange(3)) and again.ptr == 3


@pytest.mark.interpreter
@pytest.mark.parametrize("bank_rows", [0, 3, 50], ids=["empty", "fewer-than-k", "full"])
def test_bank_loss_matches_float64_on_odd_shapes(bank_rows):
    """DAAL with a bank on the Triton backend (float32) against the float64 reference on odd
    shapes: the loss and the gradients of the embeddings and segments; the bank gets none. Bank
    labels include -1 (an unfilled slot's) and a class absent from the batch."""
    from daal_testing import assert_close, tolerance

    g = torch.Generator().manual_seed(bank_rows)
    B, D, C, k = 37, 129, 11, 5
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C - 1, (B,), generator=g)
    seg = torch.randn(C, 2, D, generator=g, dtype=torch.float64)
    bank = torch.randn(bank_rows, D, generator=g, dtype=torch.float64)
    bank_y = torch.randint(-1, C, (bank_rows,), generator=g)
    out = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        zz = z.to(dtype).requires_grad_(True)
        ss = seg.to(dtype).requires_grad_(True)
        mem = MemoryBank(max(bank_rows, 1), D, dtype=dtype)
        if bank_rows:
            mem.enqueue(bank.to(dtype), bank_y)
        ref, ref_y = mem.with_batch(zz, y)
        loss = dt.daal_loss(zz, y, ss, k=k, ref_embeddings=ref, ref_labels=ref_y, ref_includes_batch=True,
                            backend=backend)
        loss.backward()
        assert not mem.embeddings.requires_grad
        out[backend] = (loss.detach().double(), zz.grad.double(), ss.grad.double())
    tol = tolerance(torch.float32)
    for what, a, b in zip(("loss", "d embeddings", "d segments"), out["triton"], out["reference"]):
        assert_close(a, b, tol, what)


@pytest.mark.interpreter
def test_an_empty_reference_set_gives_no_neighbours_on_both_backends():
    """A bank read before its first enqueue with ``get()`` (not ``with_batch``): no sample has a
    neighbour, so every margin is m0 and the density term is 0, on both backends against float64
    (the Triton backend raised "k must be an integer >= 1, got 0", a k the user never gave)."""
    from daal_testing import assert_close, tolerance

    g = torch.Generator().manual_seed(11)
    B, D, C = 37, 129, 11
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    seg = torch.randn(C, 2, D, generator=g, dtype=torch.float64)
    out = {}
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        zz = z.to(dtype).requires_grad_(True)
        ss = seg.to(dtype).requires_grad_(True)
        ref, ref_y = MemoryBank(64, D, dtype=dtype).get()
        parts = dt.daal_loss(zz, y, ss, ref_embeddings=ref, ref_labels=ref_y, backend=backend, return_parts=True)
        assert parts.neighbors.shape == (B, 0) and not parts.valid.any()
        assert torch.all(parts.margin == 0.2) and parts.density.item() == 0  # m0; no hinge
        parts.loss.backward()
        out[backend, dtype] = (parts.loss.detach().double(), zz.grad.double(), ss.grad.double())
    tol = tolerance(torch.float32)
    for key in (("triton", torch.float32), ("reference", torch.float32)):
        for what, a, b in zip(("loss", "d embeddings", "d segments"), out[key], out["reference", torch.float64]):
            assert_close(a, b, tol, f"{key[0]}: {what}")


class _BankOps(TorchDispatchMode):
    """Records each aten op's name and the elements of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.ops.append((str(func.overloadpacket), sum(t.numel() for t in outs if isinstance(t, torch.Tensor))))
        return out

    def copies(self, at_least: int) -> list:
        """The ops that wrote at least ``at_least`` elements (views write none)."""
        return [name for name, n in self.ops if n >= at_least and name not in VIEW_OPS]


VIEW_OPS = {"aten.slice", "aten.view", "aten.alias", "aten.detach"}


@pytest.mark.parametrize("writes", [[3], [5], [4, 3], [6, 3, 4], [2, 2, 2, 2, 2, 2]],
                         ids=["filling", "full-at-0", "wrapped-1", "wrapped-3", "wrapped-2"])
def test_the_ring_is_read_oldest_first_with_one_copy(writes):
    """Wherever the ring's oldest row stands, ``get`` and ``with_batch`` give the rows oldest first,
    and ``with_batch`` copies the bank once: one ``torch.cat`` of the batch and the ring's slices
    (it used to gather the ring into order, then copy that again: two bank-sized copies a step, an
    arange and an index). ``enqueue`` writes at most two slices (no index tensor, no scatter)."""
    size, dim = 5, 3
    bank = MemoryBank(size, dim)
    written = []
    for n in writes:
        rows = torch.arange(len(written), len(written) + n)
        written += rows.tolist()
        with _BankOps() as rec:
            bank.enqueue(torch.stack([rows, -rows, rows * 2], 1).float(), rows)
        names = [name for name, _ in rec.ops]
        assert not {"aten.arange", "aten.remainder", "aten.index_put", "aten.index_put_"} & set(names), names
        assert names.count("aten.copy_") <= 4, names  # rows and labels, at most two slices each
    newest = written[-size:]
    emb, lab = bank.get()
    assert lab.tolist() == newest and emb[:, 0].tolist() == newest and emb[:, 1].tolist() == [-v for v in newest]
    batch = torch.randn(2, dim, dtype=torch.bfloat16, requires_grad=True)
    with _BankOps() as rec:
        ref, ref_y = bank.with_batch(batch, torch.tensor([7, 8], dtype=torch.int32))
    assert rec.copies(len(newest) * dim) == ["aten.cat"], rec.ops  # one copy of the bank: the cat's
    assert rec.copies(len(newest)) == ["aten.cat", "aten.cat"], rec.ops  # and the labels'
    assert ref.dtype == torch.float32 and ref_y.dtype == torch.long
    assert torch.equal(ref[:2], batch.float()) and torch.equal(ref[2:], emb) and ref_y.tolist() == [7, 8] + newest
    assert not ref.requires_grad  # detached: the loss passes the batch rows' gradient (ref_includes_batch)


def _bank_problem(seed: int = 3, B: int = 37, D: int = 33, N: int = 50, C: int = 5):
    """Odd shapes: a batch, segments and a bank whose labels overlap the batch's (every bank row
    is some batch sample's possible neighbour), float64."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    seg = torch.randn(C, 2, D, generator=g, dtype=torch.float64)
    bank = torch.randn(N, D, generator=g, dtype=torch.float64)
    bank_y = torch.randint(0, C, (N,), generator=g)
    return z, y, seg, bank, bank_y


def _bank_loss(z, y, seg, bank, bank_y, *, style, backend, dtype, k=4, tau=2.0, bank_grad=False):
    """The loss, its density term and the gradients of the embeddings, segments and (``bank_grad``)
    the bank, with the reference set built by ``style``: ``"with_batch"`` (MemoryBank's detached
    cat), ``"cat"`` (a grad-carrying ``torch.cat([emb, bank])``, the README's usage before) or
    ``"detached"`` (``torch.cat([emb.detach(), bank])`` by hand)."""
    zz = z.to(dtype).clone().requires_grad_(True)
    ss = seg.to(dtype).clone().requires_grad_(True)
    bb = bank.to(dtype).clone().requires_grad_(bank_grad)
    if style == "with_batch":
        mem = MemoryBank(bank.shape[0], bank.shape[1], dtype=dtype)
        mem.enqueue(bb, bank_y)
        ref, ref_y = mem.with_batch(zz, y)
        assert not ref.requires_grad, "with_batch's reference set carries no gradient"
    else:
        ref = torch.cat([zz if style == "cat" else zz.detach(), bb])
        ref_y = torch.cat([y, bank_y])
    parts = dt.daal_loss(zz, y, ss, k=k, tau=tau, ref_embeddings=ref, ref_labels=ref_y, ref_includes_batch=True,
                         backend=backend, return_parts=True)
    parts.loss.backward()
    out = [parts.loss.detach().double(), parts.density.detach().double(), zz.grad.double(), ss.grad.double()]
    return out + [bb.grad.double()] if bank_grad else out


BANK_BACKENDS = [pytest.param("triton", torch.float32, marks=pytest.mark.interpreter, id="triton"),
                 pytest.param("reference", torch.float32, id="reference-float32"),
                 pytest.param("reference", torch.float64, id="reference-float64")]
# and the Triton backend's "aten" glue (DAAL_GLUE=aten: the reference's steps around the fused kNN)
GLUE_BACKENDS = BANK_BACKENDS + [pytest.param("triton-aten", torch.float32, marks=pytest.mark.interpreter,
                                              id="triton-aten-glue")]


@pytest.mark.parametrize("backend, dtype", GLUE_BACKENDS)
def test_with_batch_gives_the_gradients_of_a_grad_carrying_cat(backend, dtype, monkeypatch):
    """``with_batch``'s reference set carries no gradient, yet with ``ref_includes_batch=True`` the
    batch rows' reference-role (density) gradient still reaches the embeddings: the loss and the
    embeddings' and segments' gradients equal those of a grad-carrying ``cat([emb, bank])`` (the
    old usage) and of a detached cat built by hand, on both backends, and the float64
    reference's. The batch rows' term is not negligible here (without it the embeddings'
    gradient is off by far more than the tolerance)."""
    from daal_testing import assert_close, tolerance

    if backend == "triton-aten":
        from daal_triton.functional import GLUE_ENV
        monkeypatch.setenv(GLUE_ENV, "aten")
        backend = "triton"

    problem = _bank_problem()
    exact = _bank_loss(*problem, style="cat", backend="reference", dtype=torch.float64)
    assert exact[1] > 0, "the density term is active"
    tol = 1e-12 if dtype == torch.float64 else tolerance(torch.float32)
    names = ("loss", "L_dens", "d embeddings", "d segments")
    for style in ("with_batch", "detached", "cat"):
        got = _bank_loss(*problem, style=style, backend=backend, dtype=dtype)
        for what, a, b in zip(names, got, exact):
            assert_close(a, b, tol, f"{backend} {style}: {what}")
    # the batch rows' reference-role term is what with_batch's detached cat must not lose
    z, y, seg, bank, bank_y = problem
    zz = z.clone().requires_grad_(True)
    ref = torch.cat([zz.detach(), bank])
    ops = dt.core.Operators()
    lone = dt.core.compose(zz, y, seg, dt.core.Hyperparameters(k=4, tau=2.0), ops, ref_embeddings=ref,
                           ref_labels=torch.cat([y, bank_y]), ref_includes_batch=True)
    # the same call with the query role only (a knn that drops batch_rows)
    def query_role_only(*a, batch_rows=0, **kw):
        return dt.reference.knn(*a, **kw)
    zq = z.clone().requires_grad_(True)
    only = dt.core.compose(zq, y, seg, dt.core.Hyperparameters(k=4, tau=2.0), ops._replace(knn=query_role_only),
                           ref_embeddings=ref, ref_labels=torch.cat([y, bank_y]), ref_includes_batch=True)
    (g_all,), (g_query,) = torch.autograd.grad(lone.loss, [zz]), torch.autograd.grad(only.loss, [zq])
    assert (g_all - g_query).norm() > 1e-3 * g_all.norm(), "the batch rows' reference-role term matters here"


@pytest.mark.parametrize("backend, dtype", BANK_BACKENDS)
def test_a_grad_carrying_reference_set_keeps_its_gradient(backend, dtype):
    """docs/method.md: a reference set that requires grad receives the density's gradient. A
    user's own ``cat([emb, bank])`` with a bank that requires grad: the bank rows get theirs (the
    float64 reference's), and the embeddings get the batch rows' term once, through the cat (the
    same gradient as with_batch's detached reference set: no double count)."""
    from daal_testing import assert_close, tolerance

    problem = _bank_problem(seed=4)
    exact = _bank_loss(*problem, style="cat", backend="reference", dtype=torch.float64, bank_grad=True)
    got = _bank_loss(*problem, style="cat", backend=backend, dtype=dtype, bank_grad=True)
    assert exact[4].abs().max() > 0, "the bank rows receive a gradient"
    tol = 1e-12 if dtype == torch.float64 else tolerance(torch.float32)
    for what, a, b in zip(("loss", "L_dens", "d embeddings", "d segments", "d bank"), got, exact):
        assert_close(a, b, tol, f"{backend}: {what}")
    bank_free = _bank_loss(*problem, style="with_batch", backend=backend, dtype=dtype)
    assert_close(got[2], bank_free[2], tol, f"{backend}: d embeddings, grad-carrying cat vs with_batch")


@pytest.mark.interpreter
def test_with_batch_backward_builds_nothing_of_the_reference_sets_size():
    """The Triton backend's backward for ``with_batch``'s reference set allocates no (B + N) x D
    buffer: the kNN's dRef (zero-filled, atomics) and the normalisation's gradient of the
    reference set were both that size (2 x 134 MB at N = 65,536, D = 512, float32), only for
    the cat's backward to drop the bank rows. Peak live bytes of the backward (tensors it made,
    custom operators' bodies included), against the grad-carrying cat's, which has them (the test
    can tell the difference). D = 64: aligned rows, which the kNN's backward reads in place."""
    from daal_testing import peak_live_cpu_bytes

    B, D, N, C = 16, 64, 1024, 4
    z, y, seg, bank, bank_y = _bank_problem(seed=6, B=B, D=D, N=N, C=C)
    full = (B + N) * D * 4  # one float32 gradient of the reference set
    peak = {}
    for style in ("with_batch", "cat"):
        zz = z.float().requires_grad_(True)
        ss = seg.float().requires_grad_(True)
        if style == "with_batch":
            mem = MemoryBank(N, D)
            mem.enqueue(bank.float(), bank_y)
            ref, ref_y = mem.with_batch(zz, y)
        else:
            ref, ref_y = torch.cat([zz, bank.float()]), torch.cat([y, bank_y])
        loss = dt.daal_loss(zz, y, ss, k=4, tau=2.0, ref_embeddings=ref, ref_labels=ref_y,
                            ref_includes_batch=True, backend="triton")
        peak[style] = peak_live_cpu_bytes(loss.backward)
        assert zz.grad is not None and zz.grad.abs().sum() > 0
    assert peak["cat"] >= 2 * full, peak  # the test sees the two buffers
    assert peak["with_batch"] < full // 4, peak


@pytest.mark.interpreter
def test_with_batch_under_torch_compile():
    """``torch.compile(fullgraph=True)`` of a step with ``with_batch``: the kNN's custom operator
    takes ``batch_rows`` (traced as a constant) and the compiled step's loss and gradients equal
    the eager ones, and the grad-carrying cat's."""
    from daal_testing import assert_close

    torch.manual_seed(0)
    B, D, N = 12, 16, 30
    model = torch.nn.Linear(10, D)
    loss_fn = dt.DAALLoss(4, D, backend="triton", tau=2.0)
    bank = MemoryBank(N, D)
    bank.enqueue(torch.randn(N, D), torch.arange(N) % 4)
    x, y = torch.randn(B, 10), torch.arange(B) % 4

    def step(inp, lab, own_cat=False):
        emb = model(inp)
        if own_cat:
            ref, ref_y = torch.cat([emb, bank.get()[0]]), torch.cat([lab, bank.get()[1]])
        else:
            ref, ref_y = bank.with_batch(emb, lab)
        return loss_fn(emb, lab, ref_emb=ref, ref_labels=ref_y, ref_includes_batch=True)

    params = [*model.parameters(), loss_fn.segments]
    results = {}
    for name, fn in (("eager", step), ("cat", lambda a, b: step(a, b, True)),
                     ("compiled", torch.compile(step, fullgraph=True, backend="aot_eager"))):
        loss = fn(x, y)
        results[name] = (loss, *torch.autograd.grad(loss, params))
    for name in ("compiled", "cat"):
        for i, (a, b) in enumerate(zip(results[name], results["eager"])):
            assert_close(a, b, 1e-6, f"{name} vs eager: output {i}")


def test_half_precision_banks_meet_a_batch_of_the_other_half_type_under_autocast():
    """Inside a bfloat16 autocast region a float16 bank (and the other way round) met the batch in
    autocast's ``cat``, which refuses the other half type: a RuntimeError from PyTorch's type
    promotion instead of the promoted reference set it gives outside the region."""
    for bank_dtype, cast in ((torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)):
        bank = MemoryBank(32, 8, dtype=bank_dtype)
        rows = torch.randn(12, 8)
        bank.enqueue(rows, torch.arange(12) % 3)
        with torch.autocast("cpu", dtype=cast):
            batch = torch.nn.functional.linear(torch.randn(5, 8), torch.eye(8))
            ref, ref_labels = bank.with_batch(batch, torch.arange(5) % 3)
        assert ref.dtype == torch.float32 and ref.shape == (17, 8) and ref_labels.shape == (17,)
        assert torch.equal(ref[:5], batch.float()) and torch.equal(ref[5:], rows.to(bank_dtype).float())
