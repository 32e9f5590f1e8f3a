"""DAAL over a global batch gathered across 2 or 3 gloo processes (equal, uneven or empty shares;
float64, float16 or bfloat16 embeddings) equals one process on that batch."""
import contextlib
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import daal_triton as dt
from daal_triton.distributed import broadcast_params, gather_batch, rank0_random, sync_grads, world_size

B, D_IN, D, C = 12, 6, 5, 4


def _problem():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    y = torch.arange(B) % C
    model = torch.nn.Linear(D_IN, D).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(D, D_IN, generator=g))
        model.bias.copy_(torch.randn(D, generator=g))
    loss = dt.DAALLoss(C, D, lambda_pull=0.2, tau=1.5, backend="reference").double()
    with torch.no_grad():
        loss.segments.copy_(torch.randn(C, 2, D, generator=g))
    return x, y, model, loss


@contextlib.contextmanager
def _gloo_group(rank, world, port, timeout_s=None):
    """A worker's gloo process group: joined, then (after a barrier, so that no rank closes its
    connections while another still uses them: gloo aborts) left, whatever happened inside.
    ``timeout_s``: a short one makes a rank left inside a collective fail instead of hang."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **kw)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _worker(rank, world, port, out_dir, shares, same_size, dtype=torch.float64):
    with _gloo_group(rank, world, port):
        x, y, model, loss_fn = _problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        lo = sum(shares[:rank])
        xs, ys = x[lo:lo + shares[rank]], y[lo:lo + shares[rank]]
        emb = ddp(xs)
        emb.retain_grad()
        emb_all, y_all = gather_batch(emb.to(dtype), ys, same_size=same_size)  # AMP's half embeddings
        assert emb_all.dtype == dtype
        assert world_size() == world and torch.equal(y_all, y)
        loss = loss_fn(emb_all, y_all)
        loss.backward()
        sync_grads(loss_fn.parameters())
        own = torch.nn.Parameter(torch.full((3,), float(rank + 1)))  # differs by rank until broadcast
        broadcast_params([own])
        # sync_grads averages: gradients that differ by rank (the loss's are equal on every rank)
        apart, none = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        apart.grad = torch.full((2,), float(rank + 1))
        sync_grads([apart, none])
        torch.save({"loss": loss.detach(), "emb_grad": emb.grad, "seg_grad": loss_fn.segments.grad,
                    "w_grad": model.weight.grad, "b_grad": model.bias.grad, "broadcast": own.detach(),
                    "synced": apart.grad, "synced_none": none.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def _one_process(dtype=torch.float64):
    """The loss and gradients of the whole batch in one process, embeddings cast as the ranks'."""
    x, y, model, loss_fn = _problem()
    emb = model(x)
    emb.retain_grad()
    loss = loss_fn(emb.to(dtype), y)
    loss.backward()
    return loss, emb, model, loss_fn


def _spawn(worker, args, world, out_dir, suffix):
    """``mp.spawn`` of ``world`` ranks that each write ``rank<r><suffix>`` in ``out_dir``. gloo can
    abort a process in its own teardown, after the work, under load ("terminate called without an
    active exception": seen 1 in ~20 runs on 2 busy cores); that is tolerated when every rank
    wrote its result first, any other failure is not."""
    try:
        mp.spawn(worker, args=args, nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        written = all(os.path.exists(os.path.join(out_dir, f"rank{r}{suffix}")) for r in range(world))
        if not (written and e.signal_name == "SIGABRT"):
            raise


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("shares,same_size", [((6, 6), False), ((6, 6), True), ((5, 4, 3), False),
                                              ((6, 6, 0), False)])
def test_gloo_ranks_match_one_process(tmp_path, shares, same_size):
    # Equal shares (with and without the same_size promise), uneven ones (a short last batch)
    # and a rank with no rows: the global batch, its loss and gradients are one process's.
    world = len(shares)
    _spawn(_worker, (world, _free_port(), str(tmp_path), shares, same_size), world, str(tmp_path), ".pt")
    loss, emb, model, loss_fn = _one_process()
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.allclose(got["loss"], loss.detach(), rtol=1e-12, atol=0)
        assert torch.allclose(got["seg_grad"], loss_fn.segments.grad, rtol=1e-10, atol=1e-14)
        # DDP averages the ranks' world x gradients: the single-process gradient
        assert torch.allclose(got["w_grad"], model.weight.grad, rtol=1e-10, atol=1e-14)
        assert torch.allclose(got["b_grad"], model.bias.grad, rtol=1e-10, atol=1e-14)
        assert got["broadcast"].tolist() == [1.0, 1.0, 1.0]  # rank 0's values everywhere
        assert got["synced"].tolist() == [(world + 1) / 2] * 2 and got["synced_none"] is None  # mean of 1..world
        # every rank's copy of the loss reaches this rank's rows: world x the single-process gradient
        lo = sum(shares[:r])
        assert got["emb_grad"].shape == (shares[r], D)
        assert torch.allclose(got["emb_grad"] / world, emb.grad[lo:lo + shares[r]], rtol=1e-10, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gloo_ranks_match_one_process_in_half_precision(tmp_path, dtype):
    # embeddings as autocast gives them: the gather carries them (and their gradients) in half
    # precision; the global batch is bit for bit one process's, so the loss and the segments'
    # gradient are too, and the network's gradient within the rounding of the half-precision
    # gradient sums (DDP's all-reduce adds the ranks' shares in another order)
    shares = (7, 5)
    _spawn(_worker, (2, _free_port(), str(tmp_path), shares, False, dtype), 2, str(tmp_path), ".pt")
    loss, emb, model, loss_fn = _one_process(dtype)
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-4)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert torch.equal(got["loss"], loss.detach())
        assert torch.equal(got["seg_grad"], loss_fn.segments.grad)
        lo = sum(shares[:r])
        assert got["emb_grad"].dtype == torch.float64  # cast back by autograd, through the half gather
        assert torch.allclose(got["emb_grad"] / 2, emb.grad[lo:lo + shares[r]], **tol)
        assert torch.allclose(got["w_grad"], model.weight.grad, **tol)
        assert torch.allclose(got["b_grad"], model.bias.grad, **tol)


def _mismatch_worker(rank, world, port, out_dir, case):
    with _gloo_group(rank, world, port):
        emb, ys = torch.randn(3 + rank, 5), torch.arange(3 + rank)
        if rank == 1 and case == "labels":
            ys = ys.to(torch.int32)
        if rank == 1 and case == "embeddings":
            emb = torch.randn(4, 6)
        try:
            gather_batch(emb, ys)
            msg = "no error"
        except ValueError as exc:
            msg = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(msg)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["labels", "embeddings"])
def test_gather_rejects_ranks_that_disagree(tmp_path, case):
    # int32 labels on one rank, or another embedding width: every rank gets the same ValueError
    # naming the argument (gloo used to abort the processes inside the row gather).
    _spawn(_mismatch_worker, (2, _free_port(), str(tmp_path), case), 2, str(tmp_path), ".txt")
    for r in range(2):
        msg = (tmp_path / f"rank{r}.txt").read_text()
        assert msg.startswith(f"{case} differ across ranks"), msg


_BYTE_LABELS = ((torch.int16, -(2**15)),
                (torch.uint16, 2**16 - 1), (torch.uint32, 2**32 - 1), (torch.uint64, 2**64 - 1))


def _byte_labels_worker(rank, world, port, out_dir):
    with _gloo_group(rank, world, port):
        got = {}
        for dtype, top in _BYTE_LABELS:
            ys = torch.tensor([top, rank, 7][:3 - rank], dtype=dtype)  # uneven shares, the top bit set
            _, y_all = gather_batch(torch.randn(3 - rank, 5), ys)
            got[str(dtype)] = (str(y_all.dtype), y_all.tolist())
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_gather_carries_labels_gloo_has_no_type_for(tmp_path):
    # the loss takes any integer labels; gloo gathers no int16 and no uint16/32/64 ("Invalid scalar
    # type", then an abort at shutdown): they travel as bytes
    _spawn(_byte_labels_worker, (2, _free_port(), str(tmp_path)), 2, str(tmp_path), ".pt")
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for dtype, top in _BYTE_LABELS:
            assert got[str(dtype)] == (str(dtype), [top, 0, 7, top, 1])


def test_gather_is_identity_without_process_group():
    e, y = torch.randn(3, 2), torch.arange(3)
    assert gather_batch(e, y)[0] is e and world_size() == 1


def test_gather_checks_one_label_per_row(monkeypatch):
    import daal_triton.distributed as dd

    monkeypatch.setattr(dd, "is_distributed", lambda: True)
    monkeypatch.setattr(dd, "world_size", lambda: 2)
    # with same_size=True the local checks raise before any collective (without it they travel in
    # the gather of the shares: test_gather_refuses_a_bad_share_on_every_rank)
    with pytest.raises(ValueError, match="embeddings has 3 rows but labels has 2"):
        gather_batch(torch.randn(3, 2), torch.arange(2), same_size=True)
    # 0-dim tensors have no rows (their shape[:1] agree, and shape[0] raised IndexError)
    with pytest.raises(ValueError, match=r"gather_batch needs rows: .* got shapes \(\) and \(\)"):
        gather_batch(torch.tensor(1.0), torch.tensor(0), same_size=True)
    with pytest.raises(ValueError, match=r"got shapes \(3, 2\) and \(\)"):
        gather_batch(torch.randn(3, 2), torch.tensor(0), same_size=True)


def test_gather_checks_devices_before_any_collective(monkeypatch):
    """Labels on another device than the embeddings, or CPU tensors under NCCL, get the loss's
    ValueError, not an error from inside the collective (NCCL's, on every rank)."""
    import daal_triton.distributed as dd

    monkeypatch.setattr(dd, "is_distributed", lambda: True)
    monkeypatch.setattr(dd, "world_size", lambda: 2)
    monkeypatch.setattr(dd.dist, "get_backend", lambda *a: "nccl")
    with pytest.raises(ValueError, match="one device: embeddings on meta, labels on cpu"):
        gather_batch(torch.randn(3, 2, device="meta"), torch.arange(3), same_size=True)
    with pytest.raises(ValueError, match="backend is NCCL, which gathers CUDA tensors only: .* on cpu"):
        gather_batch(torch.randn(3, 2), torch.arange(3), same_size=True)


def _bad_share_worker(rank, world, port, out_dir, case):
    with _gloo_group(rank, world, port, timeout_s=30):  # a rank left inside the gather fails, not hangs
        got = []
        for step in range(2):  # a loop that skips a refused batch and goes on
            emb = torch.full((3, 2), float(10 * step + rank), requires_grad=True)
            y = torch.full((3,), 10 * step + rank)
            bad = rank == 1 and step == 0
            try:
                if bad and case == "rows":
                    gather_batch(emb, y[:-1])
                elif bad and case == "no_grad":
                    with torch.no_grad():
                        gather_batch(emb, y)
                else:
                    got.append(gather_batch(emb, y)[1].tolist())
            except ValueError:
                got.append("ValueError")
        torch.save(got, os.path.join(out_dir, f"rank{rank}.bad"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rows", "no_grad"])
def test_gather_refuses_a_bad_share_on_every_rank(tmp_path, case):
    # one rank's share is refused (a label short; no gradient where the others have one): every rank
    # raises, so the next step's gathers pair up again (rank 0 used to be left inside the collective,
    # which then took rank 1's next batch: a silent misalignment, then a hang)
    _spawn(_bad_share_worker, (2, _free_port(), str(tmp_path), case), 2, str(tmp_path), ".bad")
    for r in range(2):
        assert torch.load(tmp_path / f"rank{r}.bad") == ["ValueError", [10] * 3 + [11] * 3]


def _rank0_random_worker(rank, world, port, out_dir):
    torch.manual_seed(100 + rank)  # ranks seeded differently, as a user's might be
    with _gloo_group(rank, world, port):
        with rank0_random(torch.device("cpu")):
            shared = torch.rand(4)
        own = torch.rand(4)
        torch.save((shared, own), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_rank0_random_draws_rank_0s_numbers_on_every_rank(tmp_path):
    """Inside, every rank draws what rank 0 draws (and rank 0 what it would alone); afterwards each
    rank's own generator goes on as if nothing had been drawn. Nothing happens in one process."""
    _spawn(_rank0_random_worker, (2, _free_port(), str(tmp_path)), 2, str(tmp_path), ".pt")
    (s0, o0), (s1, o1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    alone = torch.Generator().manual_seed(100)
    assert torch.equal(s0, torch.rand(4, generator=alone)) and torch.equal(s1, s0)
    assert torch.equal(o0, torch.rand(4, generator=alone))
    assert torch.equal(o1, torch.rand(4, generator=torch.Generator().manual_seed(101)))
    before = torch.get_rng_state()
    with rank0_random(torch.device("cpu")):
        assert torch.equal(torch.get_rng_state(), before)
