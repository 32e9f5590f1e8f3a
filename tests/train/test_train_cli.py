"""The training program end to end, shortened: every output file, resume, daal-eval, --help."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from daal_triton.train import cli  # noqa: E402

TINY = ["--dataset", "shapes", "--image-size", "32", "--shapes-train-per-class", "4",
        "--shapes-test-per-class", "8", "--classes-per-batch", "3", "--samples-per-class", "2",
        "--steps-per-epoch", "2", "--embedding-dim", "16", "--eval-batch-size", "64", "--no-progress",
        "--tsne-max-points", "96"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert cli.main(TINY + ["--epochs", "2", "--out", out]) == 0
    return out


def _records(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_end_to_end_outputs(trained, capsys):
    out = trained
    for name in ("config.json", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt",
                 "tsne_test.png", "training_curves.png", "results.txt"):
        path = os.path.join(out, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    with open(os.path.join(out, "tsne_test.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dataset"] == "shapes" and cfg["epochs"] == 2 and cfg["daal"]["alpha"] > 0
    recs = _records(out)
    assert [r["model"] for r in recs] == ["raw_pixels", "untrained", "trained", "trained"]
    for r in recs:
        for key in ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r", "r_precision",
                    "subcluster_nmi"):
            assert 0.0 <= r[key] <= 1.0, (r["model"], key)
    assert recs[-1]["epoch"] == 2 and "train_loss" in recs[-1]
    table = open(os.path.join(out, "results.txt")).read()
    for row in ("raw pixels", "untrained network", "trained (daal, epoch 2)", "subcluster_nmi"):
        assert row in table


def test_eval_baselines_run_on_the_device(trained, tmp_path, monkeypatch):
    """daal-eval's raw-pixel baseline is measured on the run's device, as daal-train's: its vectors
    were left on the CPU (refused with --knn-backend triton on a GPU machine; with "auto" the kNN
    ran on the CPU). The meta device stands in for a GPU: the metrics' inputs are recorded."""
    import torch

    from daal_triton.train import config, devices, evaluate

    class Stop(Exception):
        pass

    seen = []

    def all_metrics(emb, labels, *a, **k):
        seen.append((emb.device, labels.device))
        if len(seen) == 2:
            raise Stop
        return {}

    meta = torch.device("meta")
    monkeypatch.setattr(config, "checked_device", lambda name: meta)
    monkeypatch.setattr(config, "check_backend", lambda *a: None)
    monkeypatch.setattr(devices, "resolve_amp", lambda *a: None)
    monkeypatch.setattr(devices, "place_model", lambda model, *a: model)
    monkeypatch.setattr(evaluate, "embed", lambda model, ds, *a, **k: torch.zeros(len(ds), 4))
    monkeypatch.setattr(evaluate, "all_metrics", all_metrics)
    args = cli.build_eval_parser().parse_args([os.path.join(trained, "checkpoint_last.pt"), "--out",
                                               str(tmp_path / "ev"), "--no-progress", "--baselines"])
    with pytest.raises(Stop):
        cli._evaluate_checkpoint(args)
    assert seen == [(meta, meta), (meta, meta)]


def test_resume_and_eval(trained, tmp_path):
    import torch

    ck = torch.load(os.path.join(trained, "checkpoint_last.pt"), map_location="cpu", weights_only=False)
    for key in ("model", "loss", "optimizer", "scheduler", "epoch", "metrics", "config"):
        assert key in ck
    assert ck["epoch"] == 2 and "segments" in ck["loss"]
    # resume for one more epoch into a copy of the run
    import shutil

    out = str(tmp_path / "resumed")
    shutil.copytree(trained, out)
    assert cli.main(TINY + ["--epochs", "3", "--out", out, "--no-tsne",
                            "--resume", os.path.join(out, "checkpoint_last.pt")]) == 0
    recs = _records(out)
    assert recs[-1]["epoch"] == 3 and recs[-1]["model"] == "trained"
    assert [r["model"] for r in recs].count("untrained") == 1  # baselines are not redone
    ev = str(tmp_path / "eval")
    assert cli.eval_main([os.path.join(out, "checkpoint_last.pt"), "--out", ev, "--no-progress",
                          "--baselines"]) == 0
    res = json.load(open(os.path.join(ev, "eval.json")))
    (name,) = [k for k in res["results"] if k.startswith("checkpoint")]
    assert res["results"][name]["recall@1"] == pytest.approx(recs[-1]["recall@1"])
    assert os.path.isfile(os.path.join(ev, "tsne_eval.png"))


def test_pml_baseline_loss(tmp_path, capsys):
    pytest.importorskip("pytorch_metric_learning")
    out = str(tmp_path / "pml")
    assert cli.main(TINY + ["--epochs", "1", "--steps-per-epoch", "1", "--loss", "pml:ProxyAnchorLoss",
                            "--no-tsne", "--no-baselines", "--out", out]) == 0
    # one epoch under the default 3-epoch warm-up: said, as the schedule never decays
    said = capsys.readouterr().out
    assert "--warmup-epochs 3 spans the whole run (--epochs 1)" in said
    assert "rises only to about 0.000333 (--lr 0.001 x 1/3)" in said  # not to --lr: a third of the way
    recs = _records(out)
    assert recs[-1]["model"] == "trained" and "recall@1" in recs[-1]
    assert os.path.isfile(os.path.join(out, "training_curves.png"))  # also without baselines


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["--dataset", "cub200", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "images.txt" in err and "Expected layout" in err


def test_help_explains_flags():
    text = cli.build_parser().format_help()
    for flag in ("--dataset", "--data-root", "--epochs", "--steps-per-epoch", "--image-size", "--device",
                 "--loss", "--weights", "--resume", "--out", "--arch", "--embedding-dim",
                 "--classes-per-batch", "--samples-per-class", "--amp", "--lr", "--loss-lr", "--daal-alpha"):
        assert flag in text
    assert "checkpoint" in cli.build_eval_parser().format_help()


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "daal_triton.train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "daal-train" in r.stdout


def test_progress_bars_cover_every_long_step(tmp_path, capsys):
    """Not only the epochs: the baselines, every embedding of the test set and the t-SNE show a bar."""
    out = str(tmp_path / "p")
    assert cli.main([f for f in TINY if f != "--no-progress"] + ["--epochs", "1", "--out", out]) == 0
    err = capsys.readouterr().err
    for bar in ("epoch 1/1", "raw pixels", "embed", "t-SNE of 96 points"):
        assert bar in err, bar
    assert cli.eval_main([os.path.join(out, "checkpoint_last.pt"), "--out", str(tmp_path / "ev"),
                          "--baselines"]) == 0
    err = capsys.readouterr().err
    assert "embed" in err and "t-SNE of 96 points" in err and "raw pixels" in err


@pytest.fixture
def keep_threads():
    """--threads 1 (a tiny run on a shared CPU is many times faster on one thread) sets torch's
    thread count for the whole process: put it back afterwards."""
    import torch

    n = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(n)


def test_warmup_epochs_count_steps_per_epoch(tmp_path, monkeypatch, keep_threads):
    """--warmup-epochs 1 with 2 steps per epoch warms up over 2 steps (make_scheduler: linear
    (step + 1) / warmup), then decays by cosine to 0 over the other 2: the rate at each of the
    4 optimiser steps is lr x [1/2, 1, 1, 1/2] (the loss's group at --loss-lr alike)."""
    from daal_triton.train import engine

    seen = []
    real = engine.train_step

    def spy(model, criterion, images, labels, optimizer, *a, **k):
        seen.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"]))
        return real(model, criterion, images, labels, optimizer, *a, **k)

    monkeypatch.setattr(engine, "train_step", spy)
    out = str(tmp_path / "warm")
    assert cli.main(TINY + ["--epochs", "2", "--warmup-epochs", "1", "--no-tsne", "--no-baselines",
                            "--out", out] + keep_threads) == 0
    factors = [0.5, 1.0, 1.0, 0.5]
    assert [lr for lr, _ in seen] == pytest.approx([1e-3 * f for f in factors])
    assert [lr for _, lr in seen] == pytest.approx([5e-3 * f for f in factors])


def test_the_best_checkpoint_is_the_epoch_of_the_highest_recall_at_1(tmp_path, monkeypatch, keep_threads):
    """checkpoint_best.pt follows held-out Recall@1, not another metric: Recall@1 peaks in epoch 1
    while MAP@R peaks in epoch 2 (and beats epoch 1's Recall@1): the best checkpoint holds epoch 1."""
    import torch

    from daal_triton.train import evaluate as E

    real = E.all_metrics
    scores = [(0.9, 0.1), (0.5, 0.95), (0.6, 0.2)]  # (recall@1, map@r) of epochs 1, 2, 3

    def metrics(*a, **k):
        m = dict(real(*a, **k))
        m["recall@1"], m["map@r"] = scores.pop(0)
        return m

    monkeypatch.setattr(E, "all_metrics", metrics)
    out = str(tmp_path / "best")
    assert cli.main(TINY + ["--epochs", "3", "--steps-per-epoch", "1", "--no-tsne", "--no-baselines",
                            "--out", out] + keep_threads) == 0
    assert scores == []
    assert [r["recall@1"] for r in _records(out)] == [0.9, 0.5, 0.6]
    best = torch.load(os.path.join(out, "checkpoint_best.pt"), map_location="cpu", weights_only=True)
    assert best["epoch"] == 1
    assert torch.load(os.path.join(out, "checkpoint_last.pt"), map_location="cpu", weights_only=True)["epoch"] == 3


def test_more_threads_than_cores_is_said(tmp_path, capsys, monkeypatch, keep_threads):
    """--threads above the cores this process may use is allowed but said (threads would take
    turns); --threads within them says nothing. (The machine's cores are pretended to be 1, so the
    run itself stays on one thread.)"""
    from daal_triton.train import devices

    monkeypatch.setattr(devices, "available_cpus", lambda: 1)
    flags = TINY + ["--epochs", "1", "--no-tsne", "--no-baselines", "--eval-every", "0", "--save", "none"]
    assert cli.main(flags + ["--threads", "2", "--out", str(tmp_path / "a")]) == 0
    assert "--threads 2 is more than the 1 CPU core this process may use" in capsys.readouterr().out
    assert cli.main(flags + keep_threads + ["--out", str(tmp_path / "b")]) == 0
    assert "--threads" not in capsys.readouterr().out


def test_an_in_process_run_leaves_the_callers_threads(trained, tmp_path, keep_threads):
    """``--threads`` sets torch's thread count for the whole process: an in-process caller's next
    run without it ran on the last one's (and its resume line said ``--threads 1``; a probe,
    2026-12-07). daal-train and daal-eval put the caller's back when they end, whatever the end."""
    import torch

    torch.set_num_threads(2)
    flags = TINY + ["--epochs", "1", "--no-tsne", "--no-baselines", "--eval-every", "0", "--save", "none"]
    assert cli.main(flags + keep_threads + ["--out", str(tmp_path / "a")]) == 0
    assert torch.get_num_threads() == 2
    assert cli.main(flags + keep_threads + ["--lr", "-1", "--out", str(tmp_path / "b")]) == 2
    assert torch.get_num_threads() == 2
    assert cli.eval_main([os.path.join(trained, "checkpoint_last.pt"), "--out", str(tmp_path / "ev"), "--no-progress",
                          "--no-tsne"] + keep_threads) == 0
    assert torch.get_num_threads() == 2


def test_the_epoch_bar_is_cleared_on_ctrl_c_and_shows_the_rate_used(monkeypatch):
    """A Ctrl-C (or a divergence) mid-epoch clears the bar before the program says why it stopped
    (the message was glued to the bar's line); the bar's ``lr`` is the rate the last step used, not
    the next one the scheduler has already set."""
    import torch
    from daal_triton.train import engine

    bars = []

    class Bar:
        def __init__(self, **kw):
            self.closed, self.postfix = False, {}
            bars.append(self)

        def update(self, n):
            pass

        def set_postfix(self, **kw):
            self.postfix = kw

        def close(self):
            self.closed = True

    monkeypatch.setattr("tqdm.auto.tqdm", Bar)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    batches = [(torch.randn(6, 4), torch.arange(6) % 3) for _ in range(3)]

    class Crit(torch.nn.Module):
        def forward(self, emb, labels):
            return emb.pow(2).mean()

    crit = Crit()
    engine.train_one_epoch(model, crit, batches, opt, sched, torch.device("cpu"), log_every=1,
                           loss_fn=lambda c, e, y: c(e, y))
    assert bars[-1].closed and bars[-1].postfix["lr"] == f"{1.0 / 3:.2e}"  # steps at 1, 1/2, 1/3; next 1/4
    real = engine.train_step

    def stopped(*args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    calls = []
    monkeypatch.setattr(engine, "train_step", stopped)
    with pytest.raises(KeyboardInterrupt):
        engine.train_one_epoch(model, crit, batches, opt, sched, torch.device("cpu"), log_every=1,
                               loss_fn=lambda c, e, y: c(e, y))
    assert bars[-1].closed


def test_nmi_off_leaves_nmi_null_and_says_so_once(tmp_path, capsys):
    """``daal-train --nmi off``: every metrics.jsonl record has NMI null and the other metrics; the
    log says why once (not at each evaluation), and the setting may change on --resume."""
    out = str(tmp_path / "r")
    flags = TINY + ["--epochs", "2", "--no-tsne", "--no-baselines", "--save", "last"]
    assert cli.main(flags + ["--nmi", "off", "--out", out]) == 0
    records = _records(out)
    assert len(records) == 2 and all(r["nmi"] is None and 0 <= r["recall@1"] <= 1 for r in records)
    assert capsys.readouterr().out.count("NMI left out (--nmi off)") == 1
    assert cli.main(flags + ["--epochs", "3", "--nmi", "on", "--resume", os.path.join(out, "checkpoint_last.pt")]) == 0
    assert 0 <= _records(out)[-1]["nmi"] <= 1
