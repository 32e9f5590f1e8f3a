"""Issue 15, silent nonsense: every user error of daal-train / daal-eval is refused up front as
one ``<program>: error: ...`` line with exit status 2, no traceback and nothing written; --help
says what the defaults are; t-SNE works for any number of points >= 2."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from daal_triton.train import cli, plots  # noqa: E402

TINY = ["--dataset", "shapes", "--image-size", "32", "--shapes-train-per-class", "4",
        "--shapes-test-per-class", "4", "-P", "3", "-K", "2", "--steps-per-epoch", "1", "--embedding-dim", "8",
        "--no-progress", "--no-tsne", "--no-baselines", "--epochs", "1"]

BAD_TRAIN = {
    "lr": (["--lr", "-1"], "--lr"),
    "loss-lr": (["--loss-lr", "-0.1"], "--loss-lr"),
    "warmup": (["--warmup-epochs", "-5"], "--warmup-epochs"),
    "lr-nan": (["--lr", "nan"], "--lr"),
    # argparse (Python 3.11) read a negative number with an exponent as a flag: "expected one argument"
    "lr-negative-exponent": (["--lr", "-1e-3"], "--lr must be > 0.0, got -0.001"),
    "m0-negative-exponent": (["--daal-m0", "-1e308"], "m0"),
    "lr-minus-inf": (["--lr", "-inf"], "--lr must be a finite number"),
    "weight-decay": (["--weight-decay", "-1"], "--weight-decay"),
    "epochs": (["--epochs", "0"], "--epochs"),
    "steps": (["--steps-per-epoch", "0"], "--steps-per-epoch"),
    "P-too-large": (["-P", "13"], "12 training classes: pass --classes-per-batch 12 (-P) or fewer"),
    "K0": (["-K", "0"], "--samples-per-class"),
    "image-size": (["--image-size", "8"], "--image-size"),
    "knn-triton-cpu": (["--device", "cpu", "--knn-backend", "triton"], "--knn-backend triton"),
    "loss-triton-cpu": (["--device", "cpu", "--loss-backend", "triton"], "--loss-backend triton"),
    "pml-missing": (["--loss", "pml:NoSuchLoss"], "NoSuchLoss"),
    "loss-foo": (["--loss", "foo"], "--loss"),
    "kwargs-json": (["--loss-kwargs", "{not json"], "--loss-kwargs"),
    "kwargs-list": (["--loss-kwargs", "[1]"], "--loss-kwargs"),
    # Python's JSON reads NaN and Infinity: {"neg_margin": Infinity} diverged at once, blamed on --lr
    "kwargs-nan": (["--loss-kwargs", '{"margin": [1, NaN]}'], "--loss-kwargs: 'margin'[1] is nan, not a finite number"),
    "miner-kwargs-infinity": (["--miner-kwargs", '{"epsilon": -Infinity}'],
                              "--miner-kwargs: 'epsilon' is -inf, not a finite number"),
    "kwargs-unknown": (["--loss", "pml:ContrastiveLoss", "--loss-kwargs", '{"no_such": 1}'], "no_such"),
    "daal-kwargs-unknown": (["--loss-kwargs", '{"no_such": 1}'], "no_such"),
    "weights-missing": (["--weights", "/nonexistent/vgg.pth"], "--weights"),
    # a folder for a data set that reads none: ignored before, the run trained on shapes
    "data-root-built-in": (["--data-root", "/tmp/my_cub"], "--dataset shapes is built in"),
    "resume-missing": (["--resume", "/nonexistent/checkpoint_last.pt"], "no such file"),
    # a folder that is not there: the data set's layout message spoke of a missing train/ in it
    "data-root-missing": (["--dataset", "folder", "--data-root", "/nonexistent/my_cub"],
                          "--data-root /nonexistent/my_cub: no such folder"),
    "device": (["--device", "tpu"], "--device"),
    "eval-every": (["--eval-every", "-1"], "--eval-every"),
    "tsne-points": (["--tsne-max-points", "1"], "--tsne-max-points"),
    "miner-kwargs-unknown": (["--loss", "pml:MultiSimilarityLoss", "--miner", "pml:MultiSimilarityMiner",
                              "--miner-kwargs", '{"no_such": 1}'], "--miner-kwargs"),
    "miner-unknown": (["--miner", "pml:NoSuchMiner"], "pytorch_metric_learning.miners has no miner named 'NoSuchMiner'"),
    "miner-no-pml-prefix": (["--miner", "bogus"], "--miner must be 'pml:<MinerName>', got 'bogus'"),
    "miner-kwargs-alone": (["--miner-kwargs", '{"epsilon": 0.1}'], "--miner-kwargs needs --miner pml:<MinerName>"),
    # a bound's own value where it is excluded, and settings whose bounds had no case
    "lr-zero": (["--lr", "0"], "--lr must be > 0"),
    "dist-timeout-zero": (["--dist-timeout", "0"], "--dist-timeout must be > 0"),
    # 1e-9 minutes rounded to a 0 ms timeout (a C++ trace at the start), 1e13 overflowed a C int
    "dist-timeout-tiny": (["--dist-timeout", "1e-9"], "--dist-timeout must be between 1/60 (a second) and 1e+06 minutes, got 1e-09"),
    "dist-timeout-huge": (["--dist-timeout", "1e13"], "--dist-timeout must be between 1/60 (a second) and 1e+06 minutes, got 10000000000000.0"),
    # just past the limit: :g printed it as the limit itself (a probe, 2026-12-07)
    "dist-timeout-past": (["--dist-timeout", "1000001"], "--dist-timeout must be between 1/60 (a second) and 1e+06 minutes, got 1000001.0"),
    "seed-negative": (["--seed", "-1"], "--seed must be >= 0"),
    # NumPy/scikit-learn take 32-bit seeds: 2**32 trained, then failed in k-means with a traceback
    "seed-2-32": (["--seed", str(2 ** 32)], "--seed must be < 2**32"),
    "seed-huge": (["--seed", "99999999999999999999"], "--seed must be < 2**32"),
    # above 1 most shapes were drawn off the image (a scale below 0, offsets of several widths)
    "nuisance-above-1": (["--shapes-nuisance", "1.5"], "--shapes-nuisance must be <= 1"),
    "width-above-4": (["--width", "5"], "--width must be a number in (0, 4]"),
    "memory-bank-negative": (["--memory-bank", "-1"], "--memory-bank must be an integer >= 0"),
    "memory-bank-beyond-int64": (["--memory-bank", str(2 ** 63)], "--memory-bank must be at most 2**63 - 1"),
    "threads-zero": (["--threads", "0"], "--threads must be between 1 and 4096"),
    # sizes beyond what torch and NumPy take (a CLI fuzz, 2026-12-07): tracebacks from their conversions
    "threads-huge": (["--threads", str(10 ** 30)], "--threads must be between 1 and 4096"),
    "embedding-dim-beyond-int64": (["--embedding-dim", str(2 ** 63)], "--embedding-dim must be at most 2**63 - 1"),
    "log-every-beyond-int64": (["--log-every", str(10 ** 30)], "--log-every must be at most 2**63 - 1"),
    "image-size-huge": (["--image-size", str(2 ** 40)], "--image-size must be <= 65536"),
    # forked worker after worker until the machine ran out, deaf to Ctrl-C
    "num-workers-huge": (["--num-workers", str(10 ** 30)], "--num-workers must be <= 256"),
    "loss-kwargs-deep": (["--loss-kwargs", "[" * 5000 + "]" * 5000], "--loss-kwargs is not valid JSON: nested too"),
    # parsed by Python 3.12+'s json at 5000 levels too: refused by the depth limit on every Python
    "loss-kwargs-101-deep": (["--loss-kwargs", '{"a": ' + "[" * 100 + "]" * 100 + "}"],
                             "--loss-kwargs is not valid JSON: nested too deeply to be read (more than 100 levels)"),
    "loss-kwargs-long-int": (["--loss-kwargs", '{"margin": ' + "1" * 5000 + "}"],
                             "--loss-kwargs is not valid JSON: an integer of more than 4,300 digits"),
    # pytorch-metric-learning builds from any keyword value and failed at the first step, mid-run
    "pml-kwargs-bad-value": (["--loss", "pml:ProxyAnchorLoss", "--loss-kwargs", '{"margin": "a"}'],
                             "--loss pml:ProxyAnchorLoss fails on a test batch (TypeError"),
    "pml-abstract-loss": (["--loss", "pml:BaseMetricLossFunction"],
                          "--loss pml:BaseMetricLossFunction fails on a test batch (NotImplementedError"),
    "pml-abstract-miner": (["--loss", "pml:ContrastiveLoss", "--miner", "pml:BaseMiner"],
                           "--miner pml:BaseMiner fails on a test batch (NotImplementedError"),
    # a DAAL hyperparameter beside another loss did nothing, and later read as a change of the loss
    "daal-flag-with-pml": (["--loss", "pml:ContrastiveLoss", "--daal-alpha", "16"],
                           "--daal-alpha sets a DAAL hyperparameter, but --loss is pml:ContrastiveLoss"),
}
PML_CASES = ("kwargs-unknown", "pml-missing", "miner-kwargs-unknown", "miner-unknown", "pml-kwargs-bad-value",
             "pml-abstract-loss", "pml-abstract-miner", "daal-flag-with-pml")


@pytest.mark.parametrize("case", sorted(BAD_TRAIN))
def test_daal_train_refuses_up_front(case, tmp_path, error_line):
    if case in PML_CASES:
        pytest.importorskip("pytorch_metric_learning")
    flags, words = BAD_TRAIN[case]
    out = tmp_path / "out"
    assert cli.main(TINY + flags + ["--out", str(out)]) == 2
    assert words in error_line("daal-train")
    assert not out.exists()


@pytest.mark.parametrize("dataset, flags, words", [
    ("digits", ["--shapes-train-per-class", "4"], "--shapes-train-per-class is read by --dataset shapes only, but "
                                                   "--dataset is digits: it would do nothing"),
    ("digits", ["--shapes-nuisance", "0.5"], "--shapes-nuisance is read by --dataset shapes only"),
    ("folder", ["--shapes-test-per-class", "3"], "--shapes-test-per-class is read by --dataset shapes only"),
    ("digits", ["--data-seed", "3"], "--data-seed is read by --dataset shapes only"),  # a CLI fuzz, 2026-12-07
    ("folder", ["--augment", "crop"], "--augment is read by --dataset shapes and digits only, but --dataset is folder: "
                                      "it would do nothing (the photo sets always train on random resized crops"),
])
def test_a_data_flag_the_data_set_ignores_is_refused(dataset, flags, words, tmp_path, error_line):
    """It would do nothing, yet config.json would record it as if it had (as --data-root with a
    built-in set, --daal-* with another loss)."""
    root = ["--data-root", str(tmp_path)] if dataset == "folder" else ["-P", "5"]  # digits: 5 training classes
    out = tmp_path / "out"
    assert cli.main(["--dataset", dataset, *root, *flags, "--out", str(out), "--no-progress"]) == 2
    assert words in error_line("daal-train")
    assert not out.exists()


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch, error_line):
    """--out with a name longer than the file system takes is refused up front; one that the
    system refuses to create (/proc/x as root, a read-only mount) is one line too, not an OSError
    traceback after the data had loaded."""
    long = tmp_path / ("x" * 300) / "run"
    assert cli.main(TINY + ["--out", str(long)]) == 2
    assert "is longer than the file system's" in error_line("daal-train")
    # a path whose files would pass the path limit: it trained an epoch, then failed to write (a
    # file-safety probe, 2026-12-07)
    deep = os.path.join(str(tmp_path), *["d" * 200] * 21)
    assert cli.main(TINY + ["--out", deep]) == 2
    assert "the path is too long for the file system" in error_line("daal-train")
    from daal_triton.train import run

    def refuse(path, exist_ok=False):
        raise PermissionError(1, "Operation not permitted", path)

    monkeypatch.setattr(run.os, "makedirs", refuse)
    out = tmp_path / "ro" / "run"
    assert cli.main(TINY + ["--out", str(out)]) == 2
    assert error_line("daal-train").endswith(f"--out {out}: cannot create it (Operation not permitted)")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, full_disk, error_line):
    """torch.save's zip writer fails on a full disk with a RuntimeError: one line naming the
    checkpoint (exit status 1), and its ``.tmp`` removed."""
    out = tmp_path / "run"
    assert cli.main(TINY + ["--out", str(out)]) == 1
    line = error_line("daal-train")
    assert "cannot write it (is the disk full?" in line and str(out) in line and ".tmp" not in line
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_a_full_disk_while_recording_metrics_is_one_line_with_how_to_go_on(tmp_path, monkeypatch, error_line):
    """metrics.jsonl's append failing on a full disk (here in epoch 2, half the line written): the
    line named no file ("[Errno 28] No space left on device") nor what was kept, and left half a JSON
    line in the file (a probe, 2026-12-07). Now it names metrics.jsonl, says where the run stopped
    and how to continue, and the file holds whole lines only."""
    import builtins
    import errno
    import json

    from daal_triton.train import run

    real_open, writes = builtins.open, []

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, b):
            writes.append(len(b))
            if len(writes) == 2:  # epoch 2's record: half of it lands, then the disk is full
                self.f.write(b[: len(b) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(run, "open", lambda p, *a, **k: (Full if str(p).endswith("metrics.jsonl") else
                                                         (lambda f: f))(real_open(p, *a, **k)), raising=False)
    out = tmp_path / "run"
    assert cli.main(TINY + ["--epochs", "3", "--no-baselines", "--out", str(out)]) == 1
    line = error_line("daal-train")
    assert f"stopped (No space left on device: {out / 'metrics.jsonl'}) in epoch 2 of 3" in line, line
    assert f"continue from its last checkpoint with daal-train --resume {out / 'checkpoint_last.pt'}" in line, line
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]


@pytest.mark.parametrize("started", [False, True])
def test_output_whose_reader_has_gone_is_said(tmp_path, monkeypatch, error_line, started):
    """``daal-train | head``: the print after the reader stopped said "[Errno 32] Broken pipe",
    naming nothing (2026-12-07). Now the line says the output's reader has stopped (and, once the
    run has started, how to go on)."""
    import errno
    import sys

    class Pipe:  # the reader stops at once, or once it has read epoch 1's line
        def __init__(self):
            self.gone, self.seen = not started, ""

        def write(self, text):
            if self.gone:
                raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            self.seen += text
            self.gone = "epoch 1/2" in self.seen and self.seen.endswith("\n")
            return len(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", Pipe())
    out = tmp_path / "run"
    assert cli.main(TINY + ["--epochs", "2", "--out", str(out)]) == 1
    line = error_line("daal-train")
    assert "Broken pipe: the program reading this output has stopped" in line, line
    if started:
        assert "in epoch 2 of 2: continue from its last checkpoint" in line, line
    else:
        assert not out.exists()


@pytest.mark.parametrize("mode", ["wb", "ab"])
def test_a_line_cut_back_off_leaves_no_hole(tmp_path, mode):
    """files.append_whole cuts a failed write back off; on a file not opened to append the position
    stayed past the cut, and the next line came after a hole of NUL bytes (a review, 2026-12-07)."""
    import errno

    from daal_triton.train import files

    path = str(tmp_path / "m.jsonl")

    class Full:
        def __init__(self, f):
            self.f, self.calls = f, 0

        def write(self, data):
            self.calls += 1
            if self.calls == 2:  # the second line: half lands, then the disk is full
                self.f.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

    with open(path, mode, buffering=0) as raw:
        f = Full(raw)
        files.append_whole(f, b'{"a": 1}\n', path)
        with pytest.raises(OSError, match=f"No space left on device: '{path}'"):
            files.append_whole(f, b'{"b": 2, "more": "text"}\n', path)
        files.append_whole(f, b'{"c": 3}\n', path)
    assert open(path, "rb").read() == b'{"a": 1}\n{"c": 3}\n'


def test_every_setting_at_its_lowest_allowed_value_is_accepted():
    """The other side of the bounds: a value a bound allows (``--eval-every 0``: the last epoch only;
    ``--stop-after`` at the last epoch: no stop, so any --save) is not refused, and a bool where a
    number belongs (a program calling ``run``) is."""
    from daal_triton.train import config

    cpu = torch.device("cpu")
    lowest = config.TrainConfig(epochs=1, steps_per_epoch=1, classes_per_batch=1, samples_per_class=1,
                                image_size=config.MIN_IMAGE_SIZE, embedding_dim=1, loss_lr=0.0, weight_decay=0.0,
                                warmup_epochs=0.0, eval_every=0, eval_batch_size=1, num_workers=0,
                                shapes_train_per_class=1, shapes_test_per_class=1, shapes_nuisance=0.0,
                                tsne_max_points=2, log_every=1, stop_after=1, seed=0, data_seed=0, width=4.0,
                                memory_bank=0, save="best")
    config.validate_config(lowest, 1, cpu)
    for name, flag in (("epochs", "--epochs"), ("eval_every", "--eval-every"), ("lr", "--lr")):
        with pytest.raises(config.ConfigError, match=f"^{flag} must be a finite number, got True"):
            config.validate_config(config.TrainConfig(**{name: True}), 1, cpu)


def test_vgg19_weights_with_vgg19_bn_is_one_error_line(tmp_path, error_line):
    import torchvision

    path = str(tmp_path / "vgg19.pth")
    torch.save({k: v for k, v in torchvision.models.vgg19(weights=None).state_dict().items()
                if k.startswith("features.")}, path)
    out = tmp_path / "out"
    assert cli.main(TINY + ["--arch", "vgg19_bn", "--weights", path, "--out", str(out)]) == 2
    assert "vgg19 vs vgg19_bn" in error_line("daal-train")
    assert not out.exists()


def _checkpoint(tmp_path, **settings):
    """A checkpoint of an untrained network of ``TrainConfig(embedding_dim=8, **settings)``."""
    from daal_triton.train.checkpoint import save_checkpoint
    from daal_triton.train.config import TrainConfig
    from daal_triton.train.engine import build_criterion, build_model

    cfg = TrainConfig(embedding_dim=8, **settings)
    path = str(tmp_path / "checkpoint_best.pt")
    save_checkpoint(path, model=build_model(cfg), criterion=build_criterion("daal", 12, 8, backend="reference"),
                    cfg=cfg, epoch=1, metrics=[])
    return path


def test_daal_eval_refuses_up_front(tmp_path, error_line):
    path = _checkpoint(tmp_path)
    ev = str(tmp_path / "ev")
    cases = [([str(tmp_path / "missing.pt")], "no such file"), ([path, "--device", "tpu"], "--device"),
             ([path, "--data-root", str(tmp_path)], "--dataset shapes is built in"),
             ([path, "--dataset", "folder", "--data-root", str(tmp_path / "moved")],
              f"--data-root {tmp_path / 'moved'}: no such folder"),
             ([path, "--dataset", "digits", "--data-seed", "3"], "--data-seed is read by --dataset shapes only")]
    if not torch.cuda.is_available():
        cases.append(([path, "--device", "cpu", "--knn-backend", "triton"], "--knn-backend triton"))
    for argv, words in cases:
        assert cli.eval_main(argv + ["--out", ev]) == 2, argv
        assert words in error_line("daal-eval"), argv
    assert not os.path.exists(ev)
    # a file that is no checkpoint is named as such, before the outputs already there are
    (tmp_path / "eval.json").write_text("{}")
    config = tmp_path / "config.json"
    config.write_text('{"epochs": 1}')
    assert cli.eval_main([str(config)]) == 2
    assert "not a PyTorch file" in error_line("daal-eval")


EVAL_NUMBERS = {
    "image-size": (["--image-size", "16"], "--image-size"),
    "batch-0": (["--eval-batch-size", "0"], "--eval-batch-size"),
    "batch-negative": (["--eval-batch-size", "-5"], "--eval-batch-size"),
    "workers": (["--num-workers", "-1"], "--num-workers"),
    "data-seed": (["--data-seed", "-1"], "--data-seed"),
    "tsne-points": (["--tsne-max-points", "1"], "--tsne-max-points"),
    "seed-2-32": (["--seed", str(2 ** 32)], "--seed must be < 2**32"),
}


@pytest.mark.parametrize("case", sorted(EVAL_NUMBERS))
def test_daal_eval_checks_numbers_as_daal_train_does(case, tmp_path, error_line):
    path = _checkpoint(tmp_path, shapes_train_per_class=4, shapes_test_per_class=4, width=0.125)
    flags, words = EVAL_NUMBERS[case]
    ev = tmp_path / "ev"
    assert cli.eval_main([path, "--out", str(ev), "--no-progress"] + flags) == 2
    line = error_line("daal-eval")
    assert words in line
    assert cli.main(TINY + flags + ["--out", str(ev)]) == 2  # the same words as daal-train's
    assert error_line("daal-train").split("error: ", 1)[1] == line.split("error: ", 1)[1]
    assert not ev.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals need a machine without CUDA")
def test_a_checkpoint_setting_that_cannot_run_here_says_where_it_comes_from(tmp_path, error_line):
    for settings, flag in (({"device": "cuda"}, "--device"), ({"knn_backend": "triton", "device": "cpu"},
                                                                "--knn-backend")):
        path = _checkpoint(tmp_path, **settings)
        assert cli.eval_main([path, "--out", str(tmp_path / "ev")]) == 2
        line = error_line("daal-eval")
        assert f"is the setting of the checkpoint {path}" in line and f"give {flag} to override it" in line
    assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--knn-backend", "triton"]) == 2
    assert "the checkpoint" not in error_line("daal-eval")  # given here: nothing to explain


def test_help_texts_name_the_right_settings():
    for parser in (cli.build_parser(), cli.build_eval_parser()):
        (dataset,) = [a for a in parser._actions if a.dest == "dataset"]
        assert "generated from --data-seed" in dataset.help and "--seed" not in dataset.help.replace("--data-seed", "")
    actions = {a.option_strings[0]: a for a in cli.build_eval_parser()._actions if a.option_strings}
    for flag in ("--threads", "--no-amp"):  # not stored in a checkpoint / a switch
        assert "the checkpoint's" not in actions[flag].help, flag
    assert "the checkpoint's" in actions["--amp"].help and "the checkpoint's" in actions["--device"].help
    # daal-eval initialises no model and draws no batches: its seed draws the metrics' k-means and the t-SNE
    assert "initialisation" not in actions["--seed"].help and "k-means" in actions["--seed"].help
    train = {a.option_strings[0]: a for a in cli.build_parser()._actions if a.option_strings}
    assert "initialisation" in train["--seed"].help


def test_a_switch_whose_help_names_its_default_says_it_once():
    """Python 3.9's ``argparse.BooleanOptionalAction`` appends `` (default: %(default)s)`` to a
    switch's help itself (3.10 stopped): the formatter, which leaves switches' help as written,
    must not print it (on 3.9 ``--daal-normalize`` read "... first (default: True)")."""
    import argparse

    switch = argparse.Action(["--x", "--no-x"], "x", nargs=0, default=True, help="do x (default: %(default)s)")
    assert cli._HelpFormatter("prog")._get_help_string(switch) == "do x"


def test_help_says_what_the_defaults_are():
    text = " ".join(cli.build_parser().format_help().split())
    assert "default: True" not in text and "default: False" not in text and "default: None" not in text
    assert "--no-tsne" in text and "--no-baselines" in text
    ev = " ".join(cli.build_eval_parser().format_help().split())
    assert "default: None" not in ev
    assert "the checkpoint's" in ev
    for action in cli.build_eval_parser()._actions:  # one default per option (not daal-train's beside it)
        assert (action.help or "").count("(default:") <= 1, action.help


@pytest.mark.parametrize("n, d", [(2, 64), (3, 64), (7, 64), (49, 64), (60, 64), (2, 1), (40, 1), (40, 2)])
def test_tsne_any_size(n, d):
    """Any test set of two or more images, at any --embedding-dim (1: no PCA initialisation)."""
    emb = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    xy = plots.tsne_2d(emb, seed=0)
    assert xy.shape == (n, 2) and np.isfinite(xy).all()


def test_table_is_printed_before_plots(tmp_path, capsys, monkeypatch):
    order = []
    monkeypatch.setattr(plots, "training_curves", lambda *a, **k: order.append("plot"))
    monkeypatch.setattr(plots, "tsne_plot", lambda *a, **k: order.append("plot"))
    import builtins

    real_print = builtins.print

    def spy(*a, **k):
        if a and "r_precision" in str(a[0]):
            order.append("table")
        return real_print(*a, **k)

    monkeypatch.setattr(builtins, "print", spy)
    flags = [f for f in TINY if f != "--no-tsne"]
    assert cli.main(flags + ["--out", str(tmp_path / "o")]) == 0
    assert order[0] == "table" and order.count("plot") == 2, order
    # daal-eval too: the table, then where eval.json went, then the plot (and where it went)
    order.clear()
    ev = str(tmp_path / "ev")
    assert cli.eval_main([os.path.join(str(tmp_path / "o"), "checkpoint_last.pt"), "--out", ev, "--no-progress"]) == 0
    assert order == ["table", "plot"], order
    said = capsys.readouterr().out
    assert f"wrote {os.path.join(ev, 'eval.json')}" in said and f"wrote {os.path.join(ev, 'tsne_eval.png')}" in said


def test_a_run_made_with_an_unread_data_root_still_evaluates_and_resumes(tmp_path, error_line):
    """Runs made before --data-root was refused beside a built-in data set kept the folder they
    never read: daal-eval and --resume drop it (the run is the same) rather than refuse the run;
    given explicitly, it is refused as for a new run."""
    from daal_triton.train.config import TrainConfig, resume_config

    path = _checkpoint(tmp_path, data_root=str(tmp_path / "never_read"), shapes_train_per_class=4,
                       shapes_test_per_class=4, width=0.125)
    assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress", "--no-tsne"]) == 0
    assert cli.eval_main([path, "--out", str(tmp_path / "ev2"), "--data-root", str(tmp_path)]) == 2
    assert "--dataset shapes is built in" in error_line("daal-eval")
    saved = TrainConfig(embedding_dim=8, data_root=str(tmp_path / "never_read")).to_dict()
    cfg, changes = resume_config(saved, TrainConfig(resume=path), given=set())
    assert cfg.data_root is None and "data_root" not in changes


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 4000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError("Unable to allocate 298. GiB for an array with shape (1200, 3, 50000, 50000)"),
    # sizes beyond any memory (--memory-bank or --embedding-dim of 2**62, -K 2**62): tracebacks before
    RuntimeError("Storage size calculation overflowed with sizes=[4611686018427387904, 8]"),
    ValueError("array is too big; `arr.size * arr.dtype.itemsize` is larger than the maximum possible size."),
    ValueError("Maximum allowed size exceeded"),
    ValueError("Maximum allowed dimension exceeded"),  # np.empty of 12 x 2**60 images (--shapes-train-per-class)
], ids=["torch-cpu", "numpy", "torch-overflow", "numpy-too-big", "numpy-maximum", "numpy-dimension"])
def test_sizes_the_machine_cannot_hold_are_one_line(tmp_path, monkeypatch, error_line, error):
    """``--embedding-dim 1000000000``, ``--memory-bank 10**12``, ``--image-size 50000`` pass the
    checks (each is a valid size) and fail to allocate: one error line naming what to lower, exit
    status 1, not a traceback; any other RuntimeError still shows its traceback (a bug)."""
    from daal_triton.train import run as run_module

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(run_module, "build_run", fails)
    assert cli.main(TINY + ["--out", str(tmp_path / "m")]) == 1
    line = error_line("daal-train")
    assert line.startswith("daal-train: error: out of memory (") and "--embedding-dim" in line, line
    for bug in (RuntimeError("a bug"), ValueError("a bug")):
        monkeypatch.setattr(run_module, "build_run", lambda *a, _bug=bug, **k: (_ for _ in ()).throw(_bug))
        with pytest.raises(type(bug), match="a bug"):
            cli.main(TINY + ["--out", str(tmp_path / "n")])


@pytest.mark.parametrize("mplbackend, kept", [("nonsense", "agg"), ("svg", "svg"), (None, "svg")])
def test_a_bad_mplbackend_does_not_drop_the_plots(tmp_path, mplbackend, kept):
    """``MPLBACKEND=nonsense`` made matplotlib's import fail, and a finished run lost every plot with
    a warning that did not name the variable (a probe, 2026-12-06): the programs write files only,
    and draw with Agg whatever the environment says (which they leave as it was). A caller's own
    backend, set by MPLBACKEND or by ``matplotlib.use`` (None here: ``svg`` set in-process, as a
    notebook sets its inline one), stays its own: ``matplotlib.use("Agg")`` had replaced it (a
    probe, 2026-12-07)."""
    import subprocess
    import sys

    png = tmp_path / "curves.png"
    code = ("import os, sys\n"
            + ("import matplotlib\nmatplotlib.use('svg')\n" if mplbackend is None else "")
            + "from daal_triton.train import plots\n"
            f"plots.training_curves([{{'model': 'trained', 'epoch': 1, 'train_loss': 0.5, 'recall@1': 0.25}}], {str(png)!r})\n"
            "print(sys.modules['matplotlib'].get_backend(), os.environ.get('MPLBACKEND'))")
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    if mplbackend is not None:
        env["MPLBACKEND"] = mplbackend
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the caller's backend kept, and the environment left as it was
    assert r.stdout.lower().split() == [kept, str(mplbackend).lower()], r.stdout


def test_ctrl_c_before_the_run_starts_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the settings are read (a ``--config`` FIFO, a checkpoint loading) printed
    ``daal-train: `` and nothing after it: a KeyboardInterrupt is true even without a message
    (a CLI fuzz, 2026-12-07)."""
    from daal_triton.train import run as run_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run", interrupted)  # as if in run's checks, before its own handler
    assert cli.main(TINY + ["--out", str(tmp_path / "c")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "daal-train: interrupted (Ctrl-C) before the run started: nothing was written")


@pytest.fixture
def fifo(tmp_path):
    """A FIFO (named pipe). Should a program open it and wait for a writer (the defect), a thread
    gives it ``{}`` after 5 s, so that the test fails instead of hanging."""
    import threading
    import time

    path = tmp_path / "fifo"
    os.mkfifo(path)
    done = threading.Event()

    def rescue():
        deadline = time.monotonic() + 5
        while not done.wait(0.05):
            if time.monotonic() < deadline:
                continue
            try:  # succeeds only while a reader waits
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                os.write(fd, b"{}")
            except OSError:
                pass
            os.close(fd)

    thread = threading.Thread(target=rescue, daemon=True)
    thread.start()
    yield str(path)
    done.set()
    thread.join()


def test_files_of_settings_that_are_not_json_files_are_one_line(tmp_path, fifo, error_line, monkeypatch):
    """``--config`` and ``daal-study --file`` (a CLI fuzz, 2026-12-07): a FIFO hung, /dev/zero was
    read until memory ran out (22 GB), deep nesting and long integers were tracebacks. A FIFO
    without a writer now reads as empty; a pipe with one (``--config <(...)``, ``/dev/stdin``) is
    read as before; a device is refused before it is opened."""
    from daal_triton.train import files, study

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    deep_101 = tmp_path / "deep_101.json"  # parsed by every Python's json; refused by the depth limit
    deep_101.write_text('{"loss_kwargs": {"a": ' + "[" * 100 + "]" * 100 + "}}")
    long_int = tmp_path / "long_int.json"
    long_int.write_text('{"epochs": ' + "1" * 5000 + "}")
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:  # sparse: over the limit without writing it
        f.truncate(16 * 2 ** 20 + 1)
    cases = {fifo: "not a readable JSON file (Expecting value", str(tmp_path): "a folder, not a file",
             str(deep): "not a readable JSON file (nested too deeply to be read (more than 100 levels))",
             str(deep_101): "not a readable JSON file (nested too deeply",
             str(long_int): "not a readable JSON file (an integer of more than 4,300 digits)",
             str(huge): "larger than 16 MiB"}
    out = tmp_path / "out"
    for path, words in cases.items():
        assert cli.main(TINY + ["--config", path, "--out", str(out)]) == 2, path
        assert f"--config {path}: {words}" in error_line("daal-train"), path
        assert study.main(["--file", path, "--out", str(out), "--dry-run", "--no-progress"]) == 2, path
        assert f"--file {path}: {words}" in error_line("daal-study"), path
    assert not out.exists()
    # a device is named without being opened (a FIFO stands for /dev/zero above: a regressed build
    # reading a device could take the machine's memory; /dev/null reads as empty)
    if os.path.exists("/dev/null"):
        opened, real_open = [], os.open
        monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
        with pytest.raises(OSError, match="a device, not a file"):
            files.read_json("/dev/null")
        monkeypatch.setattr(os, "open", real_open)
        assert opened == []  # opening a device can act (a tty, a tape)
        assert files.special_text("/dev/null") == "is a device, not a file" and files.is_special("/dev/null")
    # files and pipes within the limits are read as before: 100 levels, a pipe's settings
    good = tmp_path / "good.json"
    good.write_text('{"a": ' + "[" * 98 + "[1, 2.5]" + "]" * 98 + "}")  # 100 levels: the object, 99 arrays
    value, depth = files.read_json(str(good))["a"], 1
    while len(value) == 1:
        value, depth = value[0], depth + 1
    assert value == [1, 2.5] and depth == 99 and files.MAX_JSON_BYTES == 16 * 2 ** 20
    hundred = files.loads_json("[" * 100 + "]" * 100)  # the limit itself is read
    for _ in range(99):
        (hundred,) = hundred
    assert hundred == []
    with pytest.raises(ValueError, match="more than 100 levels"):
        files.loads_json("[" * 101 + "]" * 101)
    for program in ("daal-train", "daal-study"):
        read, write = os.pipe()
        os.write(write, b'{"configs": {"A": "--epochs 1"}, "seeds": [0]}' if program == "daal-study" else
                 b'{"epochs": 1, "embedding_dim": 8}')
        os.close(write)
        try:
            if program == "daal-train":
                assert cli.main(TINY + ["--config", f"/dev/fd/{read}", "--out", str(tmp_path / "piped")]) == 0
                assert '"embedding_dim": 8' in (tmp_path / "piped" / "config.json").read_text()
            else:
                assert study.main(["--file", f"/dev/fd/{read}", "--out", str(tmp_path / "st"), "--dry-run",
                                   "--no-progress"]) == 0
        finally:
            os.close(read)


def test_no_output_replaces_a_fifo_or_a_device(tmp_path, fifo, error_line):
    """``--save-embeddings /dev/null --overwrite`` would, as root, have replaced /dev/null by a file
    (the rename of daal-eval's atomic write: a regressed build did so to this machine's while this
    test was written, so a FIFO stands for the device here); a FIFO at an output was replaced the
    same way. Special files where a checkpoint is read are named as what they are, not as "no such
    file"."""
    from daal_triton.train import files

    path = _checkpoint(tmp_path, shapes_train_per_class=4, shapes_test_per_class=4, width=0.125)
    ev = tmp_path / "ev"
    assert cli.eval_main([path, "--out", str(ev), "--no-progress", "--save-embeddings", fifo, "--overwrite"]) == 2
    assert f"--save-embeddings {fifo}: is a FIFO (named pipe), not a file" in error_line("daal-eval")
    assert not os.path.isfile(fifo)
    ev.mkdir()
    os.mkfifo(ev / "eval.json")
    assert cli.eval_main([path, "--out", str(ev), "--no-progress", "--overwrite"]) == 2
    assert "eval.json is a FIFO (named pipe), not a file: daal-eval writes its eval.json there" in \
        error_line("daal-eval")
    assert sorted(os.listdir(ev)) == ["eval.json"] and not os.path.isfile(ev / "eval.json")
    with pytest.raises(OSError, match="a FIFO .* is there, not a file"):  # the last guard, under every writer
        files.write_text_atomically(str(ev / "eval.json"), "{}")
    assert cli.eval_main([fifo]) == 2
    assert f"checkpoint {fifo!r} is a FIFO (named pipe), not a file" in error_line("daal-eval")
    assert cli.main(TINY + ["--weights", fifo, "--out", str(tmp_path / "out")]) == 2
    assert f"--weights {fifo}: is a FIFO (named pipe), not a file" in error_line("daal-train")


def test_a_warmup_far_beyond_the_run_trains(tmp_path, capsys):
    """``--warmup-epochs 1e307`` (a CLI fuzz, 2026-12-07): an OverflowError traceback from the
    infinite number of warm-up steps; now the rate stays about 0, as a long warm-up's does."""
    argv = TINY + ["--steps-per-epoch", "2", "--warmup-epochs", "1e308", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0  # 2e308 warm-up steps: an infinite float
    assert "Traceback" not in capsys.readouterr().err
    from daal_triton.train.run import warmup_steps

    assert warmup_steps(1e308, 2) == 2 ** 62 and warmup_steps(1.5, 4) == 6 and warmup_steps(0.0, 7) == 0


def test_a_shapes_set_beyond_any_memory_fails_at_once(tmp_path, monkeypatch, error_line):
    """``--shapes-train-per-class 10**30`` (a CLI fuzz, 2026-12-07; now 2**60: a 64-bit integer) drew images for ever, holding
    each in a list to be stacked at the end; the set is now allocated before the first is drawn:
    a size beyond any memory is the out-of-memory line at once (here: before the 100th image)."""
    from daal_triton.train.data import shapes

    real, drawn = shapes.render, []

    def render(*args, **kwargs):
        drawn.append(1)
        if len(drawn) > 100:
            raise AssertionError("drawing images of a set that cannot be held")
        return real(*args, **kwargs)

    monkeypatch.setattr(shapes, "render", render)
    assert cli.main(TINY + ["--shapes-train-per-class", str(2 ** 60), "--out", str(tmp_path / "out")]) == 1
    line = error_line("daal-train")
    assert line.startswith("daal-train: error: out of memory (") and "--shapes-train/test-per-class" in line, line
    images, labels, modes = shapes.generate([0, 3], 5, 32, seed=1)  # a set that fits: as before
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8 and labels.tolist() == [0] * 5 + [3] * 5
    assert np.array_equal(images[7], real(*shapes.class_table()[3], 2, 32, np.random.default_rng([1, 3, 2])))


def test_a_k_the_batch_cannot_give_is_said(tmp_path, capsys):
    """DAAL's radius averages ``min(k, |S_i|)`` same-class distances (docs/method.md): ``-K 2``
    with ``--daal-k 3`` silently used one (a CLI fuzz, 2026-12-07). The run says so, at -K = k too;
    it does not where -K gives k others, where a memory bank adds references, or on a resume
    (which keeps -K and the bank)."""
    assert cli.main(TINY + ["--out", str(tmp_path / "a")]) == 0  # TINY: -K 2, the default k (3)
    assert ("DAAL's k is 3 (--daal-k), but with -K 2 a sample has 1 other sample of its class in a batch, so its "
            "radius averages 1 distance; give -K 4 or more, or a --memory-bank, for 3 neighbours") \
        in capsys.readouterr().out
    assert cli.main(TINY + ["-K", "3", "--daal-k", "3", "--out", str(tmp_path / "b")]) == 0
    assert "with -K 3 a sample has 2 other samples of its class in a batch, so its radius averages 2 distances" \
        in capsys.readouterr().out
    for name, flags in (("c", ["-K", "4", "--daal-k", "3"]), ("d", ["--memory-bank", "12"]),
                        ("a", ["--resume", str(tmp_path / "a" / "checkpoint_last.pt"), "--epochs", "2"])):
        assert cli.main(TINY + flags + ["--out", str(tmp_path / name)]) == 0, flags
        assert "DAAL's k" not in capsys.readouterr().out, flags


def test_settings_files_are_read_where_os_has_no_set_blocking(tmp_path, monkeypatch):
    """Windows' Python (up to 3.11) has no ``os.set_blocking``: ``read_json`` called it for every
    file, and ``--config``, an in-place ``--resume`` and ``daal-study --file`` ended in a traceback
    there (a portability probe, 2026-12-07). A regular file needs none; a pipe still gets it."""
    from daal_triton.train import files

    good = tmp_path / "c.json"
    good.write_text('{"epochs": 2}')
    monkeypatch.delattr(os, "set_blocking")
    assert files.read_json(str(good)) == {"epochs": 2}


@pytest.mark.parametrize("why, words", [("rocm", "ROCm GPUs run the reference backend"),
                                        ("no-triton", "triton is not installed")])
def test_a_forced_triton_backend_the_gpu_cannot_run_is_refused_up_front(monkeypatch, why, words):
    """``--loss-backend triton`` / ``--knn-backend triton`` on a CUDA device that cannot run the
    kernels (ROCm; Windows' CUDA wheels, which bring no Triton) was accepted, and the run failed
    mid-way with a traceback after writing its first files (a portability probe, 2026-12-07)."""
    from daal_triton import backend
    from daal_triton.train import config

    if why == "rocm":
        monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    else:
        monkeypatch.setattr(backend, "triton_available", lambda: False)
    gpu = torch.device("cuda", 0)
    for flag in ("--loss-backend", "--knn-backend"):
        with pytest.raises(config.ConfigError, match=f"{flag} triton cannot run on cuda:0: {words}"):
            config.check_backend(flag, "triton", gpu)
        config.check_backend(flag, "auto", gpu)  # the reference there
        config.check_backend(flag, "reference", gpu)
