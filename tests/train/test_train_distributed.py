"""Data-parallel training (torchrun, gloo on the CPU) and the cross-batch memory (--memory-bank).

The loss-level equality of 2 gloo ranks and one process is tests/package/test_distributed.py;
here: the sampler's shares, the step function, config errors, and short real runs.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from daal_triton import DAALLoss  # noqa: E402
from daal_triton.memory import MemoryBank  # noqa: E402
from daal_triton.train import cli  # noqa: E402
from daal_triton.train.data import DistributedPKSampler, PKSampler  # noqa: E402
from daal_triton.train.engine import GlobalBatchLoss, train_one_epoch  # noqa: E402

# P = 4 classes x K = 2: a global batch of 8, 4 images on each of 2 ranks
FLAGS = ["--dataset", "shapes", "--image-size", "32", "--shapes-train-per-class", "4",
         "--shapes-test-per-class", "4", "-P", "4", "-K", "2", "--steps-per-epoch", "2", "--epochs", "1",
         "--embedding-dim", "8", "--eval-batch-size", "64", "--no-progress", "--no-tsne", "--no-baselines",
         "--memory-bank", "64"]
GLOBAL_B = 8


def _ck(out):
    return torch.load(os.path.join(out, "checkpoint_last.pt"), map_location="cpu", weights_only=False)


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, the same flags as the 2-process run."""
    out = str(tmp_path_factory.mktemp("single"))
    assert cli.main(FLAGS + ["--out", out]) == 0
    return out


# ----------------------------------------------------------------------------- sampler

def test_distributed_sampler_splits_each_global_batch_by_class():
    labels = np.repeat(np.arange(10), 5)
    glob = PKSampler(labels, 4, 3, seed=7)
    shares = [DistributedPKSampler(labels, 4, 3, rank=r, world_size=2, seed=7) for r in range(2)]
    for s in [glob] + shares:
        s.set_epoch(3)
    assert all(len(s) == len(glob) for s in shares) and shares[0].batch_size == 6
    for g, b0, b1 in zip(glob, *shares):
        assert len(b0) == len(b1) == 6
        assert sorted(b0 + b1) == sorted(g)  # together: exactly the global batch
        c0, c1 = set(labels[b0]), set(labels[b1])
        assert len(c0) == len(c1) == 2 and not c0 & c1  # whole classes, on one rank each
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        DistributedPKSampler(labels, 4, 3, rank=0, world_size=3)


def test_distributed_sampler_hands_each_image_the_augmentation_seed_one_process_gives_it():
    """seeded=True: the ranks' (index, seed) pairs together are exactly the global batch's, so an
    image is augmented alike whatever the world size."""
    labels = np.repeat(np.arange(10), 5)
    glob = PKSampler(labels, 4, 3, seed=7, seeded=True)
    for world in (2, 4):
        shares = [DistributedPKSampler(labels, 4, 3, rank=r, world_size=world, seed=7, seeded=True)
                  for r in range(world)]
        for s in [glob] + shares:
            s.set_epoch(2)
        for g, *bs in zip(glob, *shares):
            assert sorted(sum(bs, [])) == sorted(g) and len({z for _, z in g}) == len(g)


# ----------------------------------------------------------------------------- the step function

class _Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, emb, labels, ref_emb=None, ref_labels=None, ref_includes_batch=False):
        self.calls.append(dict(emb=emb.detach().clone(), labels=labels.clone(),
                               ref=None if ref_emb is None else ref_emb.detach().clone(),
                               ref_labels=None if ref_labels is None else ref_labels.clone(),
                               ref_grad=ref_emb is not None and ref_emb.requires_grad,
                               includes=ref_includes_batch))
        return self.w * emb.square().mean()


def test_step_uses_batch_plus_bank_as_reference_then_enqueues():
    torch.manual_seed(0)
    bank = MemoryBank(16, 3)
    old_e, old_y = torch.randn(5, 3), torch.tensor([7, 7, 8, 8, 9])
    bank.enqueue(old_e, old_y)
    crit = _Recorder()
    emb = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1])
    loss = GlobalBatchLoss(bank)(crit, emb, y)
    (call,) = crit.calls
    # MemoryBank.with_batch's reference set is detached: the loss passes the batch rows' gradient itself
    assert call["includes"] and not call["ref_grad"]
    assert call["ref"].shape == (9, 3)
    assert torch.equal(call["ref"][:4], emb.detach()) and torch.equal(call["ref"][4:], old_e)
    assert call["ref_labels"].tolist() == [0, 0, 1, 1, 7, 7, 8, 8, 9]
    # enqueued after the loss: the bank now ends with the batch, detached
    e_now, y_now = bank.get()
    assert len(bank) == 9 and torch.equal(e_now[5:], emb.detach()) and y_now[5:].tolist() == [0, 0, 1, 1]
    assert not e_now.requires_grad
    loss.backward()
    assert emb.grad is not None
    # without a bank: the plain loss, no reference set
    crit.calls.clear()
    GlobalBatchLoss(None)(crit, emb, y)
    assert crit.calls[0]["ref"] is None


def test_train_one_epoch_fills_the_bank_step_by_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    crit = _Recorder()
    loader = [(torch.randn(4, 6), torch.tensor([0, 0, 1, 1])) for _ in range(3)]
    bank = MemoryBank(10, 3)
    opt = torch.optim.SGD(list(model.parameters()) + list(crit.parameters()), lr=0.1)
    train_one_epoch(model, crit, loader, opt, None, torch.device("cpu"), progress=False,
                    loss_fn=GlobalBatchLoss(bank))
    assert [c["ref"].shape[0] for c in crit.calls] == [4, 8, 12]  # batch + 0, 4, 8 bank rows
    assert len(bank) == 10


# ----------------------------------------------------------------------------- config errors

def test_config_errors_are_clear(tmp_path, monkeypatch, capsys):
    assert cli.main(FLAGS + ["--loss", "pml:ContrastiveLoss", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    if importlib.util.find_spec("pytorch_metric_learning") is None:  # refused first: no [pml] extra
        assert "needs pytorch-metric-learning" in err
    else:
        assert "--memory-bank is for --loss daal" in err
    # as rank 0 of a torchrun world of 2 (refused before the process group is joined)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.main(FLAGS[:-2] + ["-P", "3", "--out", str(tmp_path / "b")]) == 2
    assert "must be divisible by the world size 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


@pytest.mark.parametrize("local_rank,want", [(None, 1), ("3", 3)])
def test_a_callers_process_group_without_local_rank_spreads_over_the_gpus(monkeypatch, local_rank, want):
    """A process group made by the caller's own launcher (``mp.spawn`` sets no LOCAL_RANK): rank 5
    of 8 on a machine of 4 GPUs takes cuda:1, not cuda:0 (every rank on one GPU); a LOCAL_RANK
    that is set wins. No GPU needed: the device calls are recorded."""
    from daal_triton.train import ddp

    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ddp.dist, "get_rank", lambda: 5)
    monkeypatch.setattr(ddp.dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(ddp.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    ctx, device = ddp.setup(torch.device("cuda"))
    assert device == torch.device("cuda", want) and chosen == [device]
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.owns_group) == (5, 8, want, False)
    ctx, device = ddp.setup(torch.device("cpu"))
    assert device == torch.device("cpu") and ctx.local_rank == (0 if local_rank is None else want)


@pytest.mark.parametrize("backend,nccl", [("nccl", True), ("cpu:gloo,cuda:nccl", True), ("gloo", False)])
def test_barrier_names_the_gpu_to_nccl(monkeypatch, backend, nccl):
    """With NCCL in the group (alone, or in a caller's "cpu:gloo,cuda:nccl" group) the barrier names
    this rank's GPU (NCCL guesses it otherwise, and warns); with gloo it does not. No GPU needed."""
    from daal_triton.train import ddp

    calls = []
    monkeypatch.setattr(ddp.dist, "barrier", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    ddp.DistContext(rank=1, world_size=2, backend=backend).barrier()
    ddp.DistContext(rank=0, world_size=1, backend=backend).barrier()  # one process: no collective
    assert calls == [{"device_ids": [3]} if nccl else {}]


@pytest.mark.parametrize("error", [RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:1"),
                                   torch.distributed.DistBackendError("NCCL communicator was aborted") if hasattr(
                                       torch.distributed, "DistBackendError") else RuntimeError("Connection reset by peer")])
def test_a_rank_whose_peer_stopped_says_so_in_one_line(monkeypatch, capsys, error):
    """When one torchrun process stops on a user error (its own one line), the others fail in their
    next collective: that was a ~40-line gloo traceback. It is one line naming the rank and
    pointing at the other process's error, exit status 1; outside torchrun the error stays a
    traceback (a bug of ours, not a peer's)."""
    from daal_triton.train import run as run_module

    def failing(cfg, given=()):
        raise error

    monkeypatch.setattr(run_module, "run", failing)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["--out", "unused", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daal-train: error: rank 1/2: another process of the run stopped")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(type(error)):
        cli.main(["--out", "unused", "--no-progress"])


def test_every_error_line_names_its_rank_under_torchrun(monkeypatch, capsys):
    """Under torchrun each process prints its own error line: a run that diverged says so on every
    rank, and the first to fail is followed by the others' "cannot go on". Each line names its
    rank (it did only in the peer's line); in one process nothing is added."""
    from daal_triton.train import run as run_module

    for error, status in [(run_module.Diverged("training diverged in epoch 3 of 20 (loss nan)"), 1),
                          (cli.UsageError("--batch-size must be even"), 2), (OSError(28, "No space left on device"), 1)]:
        def failing(cfg, given=(), error=error):
            raise error

        monkeypatch.setattr(run_module, "run", failing)
        for world, rank, tag in [("2", "1", "rank 1/2: "), ("4", "0", "rank 0/4: "), ("1", "0", "")]:
            monkeypatch.setenv("WORLD_SIZE", world)
            monkeypatch.setenv("RANK", rank)
            assert cli.main(["--out", "unused", "--no-progress"]) == status
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("daal-train: error: " + tag), err
            assert tag or "rank" not in err[0]


def test_a_ranks_own_collective_error_is_not_blamed_on_a_peer(monkeypatch, capsys):
    """Only what gloo and NCCL say when a peer has gone is the one line of the test above: NCCL's
    own out of memory stays the memory line, and any other collective error (an invalid usage: a
    bug of ours) its traceback, under torchrun too."""
    from daal_triton.train import run as run_module

    errors = [RuntimeError("NCCL communicator was aborted on rank 0: NCCL error: unhandled cuda error\n"
                           "ncclUnhandledCudaError: Cuda failure 2 'out of memory'"),
              RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage, ncclInvalidUsage")]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for error in errors:
        def failing(cfg, given=(), error=error):
            raise error

        monkeypatch.setattr(run_module, "run", failing)
        if error is errors[0]:
            assert cli.main(["--out", "unused", "--no-progress"]) == 1
            err = capsys.readouterr().err
            assert "out of memory" in err and "another process" not in err
        else:
            with pytest.raises(RuntimeError, match="ncclInvalidUsage"):
                cli.main(["--out", "unused", "--no-progress"])


def test_world_size_rules_of_the_configuration():
    """P must be a multiple of the world size (not the other way round), and --sync-bn in a world of
    CPU processes is refused from 2 processes on; checked before anything starts."""
    from daal_triton.train.config import ConfigError, TrainConfig, validate_config

    cpu = torch.device("cpu")
    for p, world in ((4, 2), (6, 3), (12, 4), (3, 1)):
        validate_config(TrainConfig(classes_per_batch=p), world, cpu)
    for p, world in ((3, 2), (2, 4), (4, 3)):
        with pytest.raises(ConfigError, match=f"= {p} must be divisible by the world size {world}"):
            validate_config(TrainConfig(classes_per_batch=p), world, cpu)
    validate_config(TrainConfig(sync_bn=True), 1, cpu)  # one process: a note at the start, no error
    with pytest.raises(ConfigError, match="^--sync-bn needs CUDA"):
        validate_config(TrainConfig(sync_bn=True), 2, cpu)


# ----------------------------------------------------------------------------- runs

def test_memory_bank_run_and_resume(single, tmp_path):
    ck = _ck(single)
    assert ck["world_size"] == 1 and ck["config"]["memory_bank"] == 64
    assert ck["memory_bank"]["filled"] == 2 * GLOBAL_B  # 2 steps of the global batch
    before = MemoryBank(64, 8)
    before.load_state_dict(ck["memory_bank"])
    before_e, before_y = before.get()
    out = str(tmp_path / "resumed")
    shutil.copytree(single, out)
    assert cli.main(FLAGS[:FLAGS.index("--epochs")] + ["--epochs", "2"] + FLAGS[FLAGS.index("--epochs") + 2:]
                    + ["--out", out, "--resume", os.path.join(out, "checkpoint_last.pt")]) == 0
    bank = MemoryBank(64, 8)
    bank.load_state_dict(_ck(out)["memory_bank"])
    e, y = bank.get()
    assert len(bank) == 4 * GLOBAL_B  # restored, then 2 more steps (an empty bank would hold 2 x 8)
    assert torch.equal(e[:2 * GLOBAL_B], before_e) and torch.equal(y[:2 * GLOBAL_B], before_y)
    assert [r["epoch"] for r in _records(out)] == [1, 2]


GUARD = textwrap.dedent('''
    # test instrumentation: processes of rank != 0 may not write under $DAAL_GUARD_OUT (open, makedirs,
    # and os.replace, which catches torch.save: checkpoints are written to .tmp and then renamed)
    import builtins, os
    _rank = os.environ.get("RANK", "0")
    _out = os.environ.get("DAAL_GUARD_OUT")
    if _out and _rank != "0":
        _out = os.path.realpath(_out)

        def _check(path):
            p = os.path.realpath(os.fspath(path))
            if p == _out or p.startswith(_out + os.sep):
                raise PermissionError(f"rank {_rank} wrote {p}")

        _open = builtins.open
        def open(file, mode="r", *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
                _check(file)
            return _open(file, mode, *a, **k)
        builtins.open = open
        for _name in ("makedirs", "mkdir", "replace", "rename"):
            def _wrap(f):
                def g(path, *a, **k):
                    _check(path)
                    return f(path, *a, **k)
                return g
            setattr(os, _name, _wrap(getattr(os, _name)))
''')


def _random_miner_worker(rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist
    from pytorch_metric_learning import miners

    import daal_triton

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        emb, labels = _random_miner_problem()
        torch.manual_seed(7)
        criterion = daal_triton.DAALLoss(4, 8, backend="reference")  # the same segments (daal-train broadcasts them)
        torch.manual_seed(100 + rank)  # every rank's generators differ, as daal-train's
        share = slice(rank * 4, rank * 4 + 4)
        step = GlobalBatchLoss(miner=miners.UniformHistogramMiner(num_bins=4, pos_per_bin=3, neg_per_bin=3))
        losses = [step(criterion, emb[share], labels[share]).detach() for _ in range(3)]
        after = torch.rand(1)  # a rank's own generator goes on as before
        torch.save({"losses": torch.stack(losses), "after": after}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _random_miner_problem():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 8, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


@pytest.mark.slow
def test_a_random_miner_mines_the_same_tuples_on_every_rank(tmp_path):
    """UniformHistogramMiner draws random numbers: each rank drew its own, so the ranks mined
    different tuples of the same global batch and computed different losses (a distributed probe,
    2026-12-07: 0.608 vs 0.601), where the docs say the loss is identical on every rank. The
    miner now draws rank 0's numbers everywhere: every rank's loss is that of one process seeded
    as rank 0, and rank 1's own generator is left as it was."""
    pytest.importorskip("pytorch_metric_learning")
    import socket

    import torch.multiprocessing as mp
    from pytorch_metric_learning import miners

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_random_miner_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    emb, labels = _random_miner_problem()
    torch.manual_seed(7)
    criterion = DAALLoss(4, 8, backend="reference")
    torch.manual_seed(100)
    step = GlobalBatchLoss(miner=miners.UniformHistogramMiner(num_bins=4, pos_per_bin=3, neg_per_bin=3))
    alone = torch.stack([step(criterion, emb, labels).detach() for _ in range(3)])
    assert torch.equal(r0["losses"], r1["losses"]), (r0["losses"], r1["losses"])
    assert torch.allclose(r0["losses"], alone, rtol=1e-6, atol=0)
    assert len(set(alone.tolist())) > 1  # the miner's draws do change the loss from step to step
    torch.manual_seed(101)
    assert torch.equal(r1["after"], torch.rand(1))  # rank 1's first own draw after the three steps


@pytest.mark.slow
def test_torchrun_two_gloo_processes(single, tmp_path):
    out = str(tmp_path / "ddp")
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    env = dict(os.environ, DAAL_GUARD_OUT=out, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(guard)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "daal_triton.train"] + FLAGS + ["--out", out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    # the same files as one process with the same flags, written by rank 0 alone (the guard
    # makes any write of rank 1 under --out fail the run)
    assert sorted(os.listdir(out)) == sorted(os.listdir(single))
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["launch"] == {"world_size": 2, "backend": "gloo"}
    recs = _records(out)
    assert [(r["epoch"], r["model"]) for r in recs] == [(1, "trained")] and 0 <= recs[0]["recall@1"] <= 1
    # the throughput counts both ranks' images: 2 steps of the global batch (train_s is rounded
    # to 0.01 s, the rate to 0.1)
    t = recs[0]["train_s"]
    assert 2 * GLOBAL_B / (t + 0.005) - 0.05 <= recs[0]["train_images_per_s"] <= 2 * GLOBAL_B / max(t - 0.005, 1e-3) + 0.05
    ck, ck1 = _ck(out), _ck(single)
    assert ck["world_size"] == 2 and not any(k.startswith("module.") for k in ck["model"])
    # the bank holds the gathered global batches: the same images' classes as one process, step by step
    y2, y1 = ck["memory_bank"]["labels"], ck1["memory_bank"]["labels"]
    assert ck["memory_bank"]["filled"] == 2 * GLOBAL_B
    for s in range(2):
        block = slice(s * GLOBAL_B, (s + 1) * GLOBAL_B)
        assert sorted(y2[block].tolist()) == sorted(y1[block].tolist())
    # every log line says which rank wrote it; rank 0 did the epochs, rank 1 waited
    lines = [ln for ln in r.stdout.splitlines() if "daal-train" in ln]
    assert not [ln for ln in lines if ln.startswith("[daal-train]")], lines
    assert any(ln.startswith("[daal-train rank 0/2] epoch 1/1: loss") for ln in lines), lines
    # (found anywhere in the output: the two processes share one pipe, and once, on a loaded CI
    # machine, rank 1's line did not start a line of it)
    assert "[daal-train rank 1/2] done" in r.stdout, r.stdout[-3000:]
    assert not any(ln.startswith("[daal-train rank 1/2] epoch") for ln in lines)


def _torchrun(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "daal_triton.train"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@pytest.mark.slow
def test_torchrun_resume_goes_on_as_if_never_stopped(tmp_path):
    # With augmentation every rank draws its own random shifts; a resume restores each rank's
    # generators (rank 1's used to be reseeded as at epoch 1), so stop + resume = one run.
    flags = FLAGS[:FLAGS.index("--epochs")] + ["--epochs", "2"] + FLAGS[FLAGS.index("--epochs") + 2:] \
        + ["--augment", "shift"]
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    _torchrun(flags + ["--out", whole])
    _torchrun(flags + ["--out", halves, "--stop-after", "1"])
    first = _ck(halves)
    assert len(first.get("rng_ranks", ())) == 2 and not torch.equal(first["rng_ranks"][0]["torch"],
                                                             first["rng_ranks"][1]["torch"])
    _torchrun(flags + ["--out", halves, "--resume", os.path.join(halves, "checkpoint_last.pt")])
    a, b = _ck(whole), _ck(halves)
    assert a["epoch"] == b["epoch"] == 2
    assert torch.equal(a["loss"]["segments"], b["loss"]["segments"])
    assert [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])] == []


def test_one_process_on_another_gpu_makes_it_current(monkeypatch):
    """``--device cuda:1`` without torchrun: cuda:1 is made the current device (Triton launches its
    kernels on the current device, and CUDA memory statistics read it), and a GPU the machine does
    not have is a configuration error naming the flag. No GPU needed: the device calls are recorded."""
    from daal_triton.train import ddp, devices

    monkeypatch.setattr(ddp.dist, "is_initialized", lambda: False)
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    ctx, device = ddp.setup(torch.device("cuda", 1))
    assert device == torch.device("cuda", 1) and chosen == [device] and ctx.world_size == 1
    ddp.setup(torch.device("cuda"))  # no index: the current device stays
    ddp.setup(torch.device("cpu"))
    assert chosen == [device]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA device"):
        devices.resolve_device("cuda:2")
