"""Issue 15, security and data loss: checkpoints load without running code and are checked
against a stored digest; a run never replaces another run's outputs unasked; --save."""
import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from daal_triton.train import cli  # noqa: E402

TINY = ["--dataset", "shapes", "--image-size", "32", "--shapes-train-per-class", "4",
        "--shapes-test-per-class", "8", "--classes-per-batch", "3", "--samples-per-class", "2",
        "--steps-per-epoch", "1", "--embedding-dim", "16", "--eval-batch-size", "64", "--no-progress",
        "--no-tsne", "--epochs", "1"]
OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt", "training_curves.png",
           "results.txt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("safety") / "run")
    assert cli.main(TINY + ["--no-baselines", "--out", out]) == 0
    return out


class _Mkdir:
    """Unpickling this calls os.mkdir(path): what a malicious checkpoint could run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_checkpoints_open_with_plain_weights_only_load(run_dir):
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        ck = torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)
        assert ck["epoch"] == 1 and "segments" in ck["loss"] and "model" in ck
    assert "rng" in torch.load(os.path.join(run_dir, "checkpoint_last.pt"), weights_only=True)


def test_a_checkpoint_that_runs_code_is_refused(run_dir, tmp_path, error_line):
    evil = str(tmp_path / "evil.pt")
    marker = tmp_path / "pwned"
    torch.save({"format": "daal-train checkpoint", "epoch": 1, "payload": _Mkdir(str(marker))}, evil)
    assert cli.eval_main([evil, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    assert "refus" in error_line("daal-eval")
    assert cli.main(TINY + ["--out", str(tmp_path / "r"), "--resume", evil]) == 2
    error_line("daal-train")
    assert not marker.exists()
    assert not (tmp_path / "ev").exists() and not (tmp_path / "r").exists()


def _flip_tensor_bytes(path, nbytes=4096):
    """Invert ``nbytes`` in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(start)
        data = bytes(b ^ 0xFF for b in f.read(nbytes))
        f.seek(start)
        f.write(data)


def test_protocol_4_pickles_are_named_as_such_not_damaged(tmp_path, error_line):
    """torch's safe loader stops at protocol 4's first opcode (FRAME), whatever follows: the error
    says so, and names the globals a pickle holds (read by pickletools, nothing run)."""
    marker = tmp_path / "pwned"
    evil = str(tmp_path / "evil4.pkl")  # pickle.dump's default protocol (4 or 5), no torch.save
    with open(evil, "wb") as f:
        pickle.dump({"payload": _Mkdir(str(marker))}, f, protocol=4)
    plain = str(tmp_path / "plain4.pt")  # tensors and plain data, zip format, protocol 4
    torch.save({"w": torch.zeros(2), "s": {1, 2}}, plain, pickle_protocol=4)
    cases = {evil: ("protocol 4", "posix.mkdir", "could run code"), plain: ("protocol 4", "refused unread")}
    for path, words in cases.items():
        assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2, path
        line = error_line("daal-eval")
        assert all(w in line for w in words), line
        assert "damaged" not in line and "weights_only=False" not in line, line
        if path == plain:  # torch's own globals (tensor rebuilds, set) are not "code"
            assert "could run code" not in line, line
    assert not marker.exists() and not (tmp_path / "ev").exists()


def test_damaged_and_wrong_files_are_one_error_line(run_dir, tmp_path, error_line):
    good = os.path.join(run_dir, "checkpoint_best.pt")
    flipped = str(tmp_path / "flipped.pt")
    shutil.copy(good, flipped)
    _flip_tensor_bytes(flipped)
    truncated = str(tmp_path / "truncated.pt")
    with open(good, "rb") as f, open(truncated, "wb") as g:
        g.write(f.read(os.path.getsize(good) // 2))
    empty = str(tmp_path / "empty.pt")
    open(empty, "wb").close()
    garbage = str(tmp_path / "garbage.pt")
    with open(garbage, "wb") as g:
        g.write(os.urandom(5000))
    wrong = str(tmp_path / "state_dict.pt")
    torch.save({"features.0.weight": torch.zeros(2, 2)}, wrong)
    text = str(tmp_path / "config.json")  # a run's other files given by mistake: not "could run code"
    with open(text, "w") as g:
        g.write('{"epochs": 3}')
    notes = str(tmp_path / "notes.txt")  # its first byte, "h", is a pickle opcode (BINGET): not "damaged"
    with open(notes, "w") as g:
        g.write("hello\n")
    code = str(tmp_path / "code.pt")  # a pickle that names a global (a class to construct)
    torch.save({"dtype": np.float64}, code)
    cases = {flipped: "digest", truncated: "truncated or damaged", empty: "empty", garbage: "",
             wrong: "not a daal-train checkpoint", str(tmp_path / "missing.pt"): "no such file",
             text: "not a PyTorch file", notes: "not a PyTorch file", code: "could run code",
             run_dir: "is a folder, not a file: did you mean"}
    for path, words in cases.items():
        assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2, path
        line = error_line("daal-eval")
        assert words in line, path
        assert "weights_only" not in line and "Re-running" not in line, line  # torch's unsafe advice is not ours
    assert not (tmp_path / "ev").exists()
    assert cli.main(TINY + ["--out", str(tmp_path / "r"), "--resume", flipped]) == 2
    assert "digest" in error_line("daal-train")
    assert not (tmp_path / "r").exists()


def test_a_second_run_into_the_same_out_is_refused(run_dir, error_line):
    before = {name: open(os.path.join(run_dir, name), "rb").read() for name in OUTPUTS}
    assert cli.main(TINY + ["--out", run_dir]) == 2
    line = error_line("daal-train")
    assert "--resume" in line and "--overwrite" in line
    assert {name: open(os.path.join(run_dir, name), "rb").read() for name in OUTPUTS} == before


def test_a_folder_of_other_files_is_refused(tmp_path, error_line):
    # no run there, only the user's files, one of them named as a run's output: never written over
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.txt").write_text("my results")
    (out / "notes.md").write_text("my notes")
    assert cli.main(TINY + ["--no-baselines", "--out", str(out)]) == 2
    line = error_line("daal-train")
    assert "is not empty (notes.md, results.txt)" in line and "--overwrite" in line
    assert sorted(os.listdir(out)) == ["notes.md", "results.txt"]
    assert (out / "results.txt").read_text() == "my results"


def test_nothing_is_written_before_the_configuration_is_valid(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["--dataset", "cub200", "--data-root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"daal-train: error: --data-root {tmp_path / 'nowhere'}: no such folder")
    (tmp_path / "empty").mkdir()
    assert cli.main(["--dataset", "cub200", "--data-root", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("daal-train: error: cub200: no images.txt")
    assert not out.exists()


def test_overwrite_replaces_and_save_chooses_checkpoints(run_dir, tmp_path):
    out = str(tmp_path / "again")
    shutil.copytree(run_dir, out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    os.makedirs(os.path.join(out, "sub"))
    assert cli.eval_main([os.path.join(out, "checkpoint_last.pt"), "--no-progress", "--tsne-max-points", "8"]) == 0
    assert {"eval.json", "tsne_eval.png"} <= set(os.listdir(out))
    assert cli.main(TINY + ["--out", out, "--overwrite", "--save", "none", "--no-baselines"]) == 0
    files = set(os.listdir(out))
    assert not any(name.endswith(".pt") for name in files), files  # the old run's checkpoints are gone too
    assert not {"eval.json", "tsne_eval.png"} & files, files  # daal-eval's of the old checkpoint too
    assert {"notes.txt", "sub"} <= files  # files the program does not write are left alone
    assert ".daal-replaced" not in files  # the previous run, set aside until epoch 1 was done
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs] == [1]
    assert json.load(open(os.path.join(out, "config.json")))["save"] == "none"


def _fail_in_epoch(monkeypatch, epoch, exc):
    """The run's epoch ``epoch`` raises ``exc`` (a damaged image found at its first read, Ctrl-C)."""
    from daal_triton.train import run as R

    real = R.train_one_epoch

    def train(*a, desc="", **k):
        if desc.startswith(f"epoch {epoch}/"):
            raise exc
        return real(*a, desc=desc, **k)

    monkeypatch.setattr(R, "train_one_epoch", train)


def _files(folder):
    return {n: open(os.path.join(folder, n), "rb").read() for n in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, n))}


@pytest.mark.parametrize("stop", ["damaged-image", "ctrl-c"])
def test_overwrite_keeps_the_previous_run_until_the_new_one_has_finished(stop, run_dir, tmp_path, monkeypatch,
                                                                       capsys):
    """--overwrite sets the previous run aside (``.daal-replaced``) and removes it only when the
    new run finishes: a run that stops in its first epoch's training (a damaged image is found only when read)
    puts it back as it was; one that stops later keeps both, and its resume to the end removes it."""
    from daal_triton.train.data import DatasetLayoutError

    out = str(tmp_path / "again")
    shutil.copytree(run_dir, out)
    open(os.path.join(out, "notes.txt"), "w").write("mine")
    before = _files(out)
    exc = KeyboardInterrupt if stop == "ctrl-c" else DatasetLayoutError("cannot read the image x.jpg")
    rc = 130 if stop == "ctrl-c" else 2
    flags = TINY + ["--out", out, "--overwrite", "--epochs", "2"]
    _fail_in_epoch(monkeypatch, 1, exc)
    assert _main_interrupted(flags) == rc
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    assert "the previous run's files are back in" in capsys.readouterr().out
    monkeypatch.undo()
    _fail_in_epoch(monkeypatch, 2, exc)
    assert _main_interrupted(flags) == rc
    aside = os.path.join(out, ".daal-replaced")
    assert _files(aside) == {n: b for n, b in before.items() if n != "notes.txt"}  # kept whole
    assert "notes.txt" in os.listdir(out) and os.path.isfile(os.path.join(out, "checkpoint_last.pt"))
    assert "stay in" in capsys.readouterr().out
    monkeypatch.undo()
    assert cli.main(["--resume", os.path.join(out, "checkpoint_last.pt"), "--no-progress"]) == 0
    assert not os.path.exists(aside) and "removed" in capsys.readouterr().out
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))
            if json.loads(line)["model"] == "trained"] == [1, 2]


def _fail_after_training(monkeypatch, where, exc, call=1):
    """The ``call``-th evaluation of the trained network (``where="evaluation"``: its test
    embeddings) or write of checkpoint_last.pt (``"checkpoint"``) raises ``exc``: a run stopped
    after an epoch's training, before its checkpoint is complete."""
    from daal_triton.train import run as R

    name = "_embed_test" if where == "evaluation" else "save_checkpoint"
    real, calls = getattr(R, name), []

    def fail(*a, **k):
        if where == "evaluation" or str(a[0]).endswith("checkpoint_last.pt"):
            calls.append(True)
            if len(calls) == call:
                raise exc
        return real(*a, **k)

    monkeypatch.setattr(R, name, fail)


@pytest.mark.parametrize("where", ["evaluation", "checkpoint"])
@pytest.mark.parametrize("stop", ["damaged-image", "ctrl-c", "disk-full"])
def test_an_overwrite_stopped_before_its_first_checkpoint_puts_the_previous_run_back(where, stop, run_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    """Epoch 1 trained, then its evaluation or checkpoint writing stops (a damaged test image,
    Ctrl-C, a full disk): the run cannot be resumed, so the previous run comes back as it was
    (until 2026-12-05 it stayed aside, and a later --overwrite deleted it)."""
    from daal_triton.train.data import DatasetLayoutError

    out = str(tmp_path / "again")
    shutil.copytree(run_dir, out)
    before = _files(out)
    exc, rc = {"damaged-image": (DatasetLayoutError("cannot read the image x.jpg"), 2),
               "ctrl-c": (KeyboardInterrupt(), 130),
               "disk-full": (OSError(28, "cannot write it (No space left on device)", "x"), 1)}[stop]
    _fail_after_training(monkeypatch, where, exc)
    assert _main_interrupted(TINY + ["--out", out, "--overwrite", "--epochs", "2", "--no-baselines"]) == rc
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    io = capsys.readouterr()
    assert "the previous run's files are back in" in io.out
    if stop == "ctrl-c":  # its own files are gone: the advice is to start it again (it said "before the run
        # wrote anything", which it had: epoch 1, removed when the previous run came back)
        assert io.err.strip() == ("daal-train: interrupted (Ctrl-C) in epoch 1 of 2, before it could be "
                                  f"resumed: its files are removed and the run it was replacing is back "
                                  f"in {out}; run the same command again to start it"), io.err


def test_an_overwrite_whose_config_json_cannot_be_written_puts_the_previous_run_back(run_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    """config.json written on a full disk, after --overwrite set the previous run aside: it stayed
    in .daal-replaced and the line said nothing of it (a review, 2026-12-07). It is put back, and
    the one error line says so."""
    import errno

    from daal_triton.train import run

    out = str(tmp_path / "again")
    shutil.copytree(run_dir, out)
    before = _files(out)
    real = run.write_text_atomically

    def full(path, text):
        if path.endswith("config.json"):
            raise OSError(errno.ENOSPC, "cannot write it (No space left on device)", path)
        return real(path, text)

    monkeypatch.setattr(run, "write_text_atomically", full)
    assert cli.main(TINY + ["--out", out, "--overwrite", "--no-progress"]) == 1
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    io = capsys.readouterr()
    lines = [ln for ln in io.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "config.json" in lines[0], io.err
    assert f"the run it was replacing is back in {out}" in lines[0], io.err


def test_ctrl_c_while_an_epoch_is_evaluated_names_that_epoch(tmp_path, capsys, monkeypatch):
    """Ctrl-C during epoch 2's evaluation: "in epoch 2", and the checkpoint to go on from is epoch 1's."""
    out = str(tmp_path / "int_eval")
    _fail_after_training(monkeypatch, "evaluation", KeyboardInterrupt(), call=2)
    assert _main_interrupted(TINY + ["--epochs", "3", "--eval-every", "1", "--no-baselines", "--out", out]) == 130
    err = capsys.readouterr().err
    assert err.startswith("daal-train: interrupted (Ctrl-C) in epoch 2 of 3: continue from its last checkpoint"), err
    monkeypatch.undo()
    from daal_triton.train.checkpoint import load_checkpoint

    assert load_checkpoint(os.path.join(out, "checkpoint_last.pt"))["epoch"] == 1


def test_a_second_ctrl_c_while_the_previous_run_is_put_back_waits_for_it(run_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C arriving while the previous run's files are moved back (after a first stop) does not
    leave half of them aside: it is held until they are all back, then ends the run (130)."""
    import signal

    from daal_triton.train.data import DatasetLayoutError

    out = str(tmp_path / "twice")
    shutil.copytree(run_dir, out)
    before = _files(out)
    _fail_in_epoch(monkeypatch, 1, DatasetLayoutError("cannot read the image x.jpg"))
    real, sent = os.replace, []

    def replace(src, dst):
        if ".daal-replaced" in str(src) and not sent:  # the first file moved back: Ctrl-C
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert _main_interrupted(TINY + ["--out", out, "--overwrite"]) == 130
    assert sent and _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err


def test_a_run_set_aside_by_a_killed_overwrite_is_never_lost(run_dir, tmp_path, monkeypatch, capsys, error_line):
    """An --overwrite run killed (SIGKILL: nothing can be put back) leaves the run it was replacing
    in .daal-replaced: a new run there is refused with what to do, and --overwrite puts it back
    before replacing it when the killed run had written no checkpoint_last.pt (nothing to resume)."""
    out = str(tmp_path / "killed")
    shutil.copytree(run_dir, os.path.join(out, ".daal-replaced"))
    before = _files(os.path.join(out, ".daal-replaced"))
    open(os.path.join(out, "config.json"), "w").write("{}")  # the killed run's, written in its first epoch
    open(os.path.join(out, "metrics.jsonl"), "w").write(json.dumps({"model": "untrained", "epoch": 0}) + "\n")
    assert cli.main(TINY + ["--out", out]) == 2
    assert ".daal-replaced/, the run that an --overwrite run stopped hard" in error_line("daal-train")
    _fail_in_epoch(monkeypatch, 1, KeyboardInterrupt)
    assert _main_interrupted(TINY + ["--out", out, "--overwrite"]) == 130
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)  # back, as it was
    assert "put back the run in" in capsys.readouterr().out
    # killed after epoch 1's record but before its checkpoint_last.pt (or with --save best|none):
    # nothing to resume, so the run it set aside comes back too
    shutil.copytree(run_dir, os.path.join(out, ".daal-replaced"))
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "results.txt", "training_curves.png"):
        os.remove(os.path.join(out, name))
    open(os.path.join(out, "metrics.jsonl"), "w").write(json.dumps({"model": "trained", "epoch": 1}) + "\n")
    assert _main_interrupted(TINY + ["--out", out, "--overwrite"]) == 130
    assert _files(out) == before and sorted(os.listdir(out)) == sorted(before)
    assert "put back the run in" in capsys.readouterr().out
    # a killed run that could be resumed (its checkpoint_last.pt) is what --overwrite replaces: the older run goes
    shutil.copytree(out, os.path.join(out, ".daal-replaced"))
    monkeypatch.undo()
    assert cli.main(TINY + ["--out", out, "--overwrite"]) == 0
    assert not os.path.exists(os.path.join(out, ".daal-replaced"))
    assert "--overwrite: removed" in capsys.readouterr().out


@pytest.mark.parametrize("save, expected", [("best", {"checkpoint_best.pt"}), ("last", {"checkpoint_last.pt"})])
def test_save_flag(tmp_path, save, expected):
    out = str(tmp_path / save)
    assert cli.main(TINY + ["--out", out, "--save", save, "--no-baselines"]) == 0
    assert {n for n in os.listdir(out) if n.endswith(".pt")} == expected


# ----------------------------------------------------------------------------- --weights files

class _System:
    """Unpickling this would call os.system: a --weights file must never be unpickled that far."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("kind", ["empty", "garbage", "list", "code", "pickled-system", "truncated"])
def test_a_damaged_weights_file_is_one_error_line(kind, tmp_path, error_line):
    path = str(tmp_path / "vgg19_bn.pth")
    if kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        with open(path, "wb") as f:
            f.write(os.urandom(5000))
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "code":
        torch.save({"features.0.weight": _System()}, path)
    elif kind == "pickled-system":  # a plain pickle, not torch.save's zip: torch warns about it first
        with open(path, "wb") as f:
            pickle.dump(os.system, f)
    else:
        torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    out = tmp_path / "out"
    assert cli.main(TINY + ["--width", "1", "--weights", path, "--out", str(out)]) == 2
    assert "--weights" in error_line("daal-train")
    assert not out.exists()


# ----------------------------------------------------------------------------- stopping

@pytest.mark.parametrize("save", ["best", "none"])
def test_stop_after_needs_checkpoint_last(save, tmp_path, error_line):
    out = tmp_path / "sb"
    flags = TINY + ["--epochs", "2", "--stop-after", "1"]  # the later --epochs counts
    assert cli.main(flags + ["--save", save, "--out", str(out)]) == 2
    line = error_line("daal-train")
    assert "--stop-after" in line and "--save last or both" in line
    assert not out.exists()


def _interrupt_in_epoch(monkeypatch, epoch):
    """The run's epoch ``epoch`` raises KeyboardInterrupt, as Ctrl-C does."""
    _fail_in_epoch(monkeypatch, epoch, KeyboardInterrupt)


def _main_interrupted(argv):
    """``cli.main(argv)``; a KeyboardInterrupt that escapes it fails the test (not the whole session)."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped daal-train as a traceback")


def test_the_resume_command_printed_can_be_pasted(tmp_path, capsys, monkeypatch):
    """A folder with a space (or a quote) in its name is quoted for a shell in the command the
    program prints (it was printed as it is: pasted, it failed), with the thread count the run had."""
    import shlex

    out = str(tmp_path / "my runs" / "it's")
    _interrupt_in_epoch(monkeypatch, 2)
    assert _main_interrupted(TINY + ["--epochs", "3", "--no-baselines", "--threads", "1", "--out", out]) == 130
    err = capsys.readouterr().err.strip()
    command = err.split("continue from its last checkpoint with ", 1)[1]
    assert shlex.split(command) == ["daal-train", "--resume", os.path.join(out, "checkpoint_last.pt"),
                                    "--threads", "1"], err
    monkeypatch.undo()
    other = str(tmp_path / "my runs" / "it's another")
    assert cli.main(TINY + ["--epochs", "3", "--no-baselines", "--stop-after", "1", "--out", other]) == 0
    logged = capsys.readouterr().out
    line = next(ln for ln in logged.splitlines() if "(--stop-after); continue with " in ln)
    assert shlex.split(line.split("continue with ", 1)[1])[:3] == ["daal-train", "--resume",
                                                                  os.path.join(other, "checkpoint_last.pt")], line


def test_ctrl_c_says_how_to_continue(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "int")
    flags = TINY + ["--epochs", "3", "--no-baselines"]
    _interrupt_in_epoch(monkeypatch, 2)
    assert _main_interrupted(flags + ["--out", out]) == 130
    err = capsys.readouterr().err
    last = os.path.join(out, "checkpoint_last.pt")
    assert err.strip() == f"daal-train: interrupted (Ctrl-C) in epoch 2 of 3: continue from its last checkpoint " \
                          f"with daal-train --resume {last} --threads {torch.get_num_threads()}", err
    monkeypatch.undo()
    assert cli.main(["--resume", last, "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3]


def test_ctrl_c_during_the_baselines_says_so(tmp_path, capsys, monkeypatch):
    """Interrupted while the raw-pixel and untrained rows are evaluated (before any training), the
    line says that, not "in epoch 1"."""
    from daal_triton.train import evaluate as E

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(E, "pixel_vectors", interrupted)
    assert _main_interrupted(TINY + ["--epochs", "3", "--out", str(tmp_path / "b")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("daal-train: interrupted (Ctrl-C) while evaluating the baselines, before epoch 1 of 3"), err
    assert "in epoch" not in err


def test_ctrl_c_before_the_first_checkpoint(tmp_path, capsys, monkeypatch, error_line):
    out = str(tmp_path / "int4")
    _interrupt_in_epoch(monkeypatch, 1)
    assert _main_interrupted(TINY + ["--out", out]) == 130
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "nothing to resume" in err and "--overwrite" in err and "--resume" not in err
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]
    monkeypatch.undo()
    assert cli.main(TINY + ["--out", out]) == 2  # the refusal's advice must be one that works
    line = error_line("daal-train")
    assert "--overwrite" in line and "--resume" not in line
    assert cli.main(TINY + ["--out", out, "--overwrite"]) == 0


def test_ctrl_c_in_a_run_resumed_into_a_new_folder_gives_advice_that_works(tmp_path, capsys, monkeypatch,
                                                                           error_line):
    """Stopped before the new folder's first checkpoint: --overwrite is no resume's flag and the
    folder is no longer empty, so the advice is the same command with another --out."""
    src = str(tmp_path / "src")
    assert cli.main(TINY + ["--epochs", "3", "--stop-after", "1", "--no-baselines", "--out", src]) == 0
    last = os.path.join(src, "checkpoint_last.pt")
    before = open(last, "rb").read()
    branch = str(tmp_path / "branch")
    _interrupt_in_epoch(monkeypatch, 2)
    assert _main_interrupted(["--resume", last, "--out", branch, "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "resume again with the same command and another (empty) --out" in err and "nothing to resume" not in err
    assert f"this attempt left config.json, metrics.jsonl in {branch}" in err, err
    assert open(last, "rb").read() == before
    monkeypatch.undo()
    assert cli.main(["--resume", last, "--out", branch, "--no-progress"]) == 2  # as the message says
    assert "is not empty" in error_line("daal-train")
    assert cli.main(["--resume", last, "--out", str(tmp_path / "branch2"), "--no-progress"]) == 0


def test_a_second_daal_train_writing_the_same_folder_is_refused(run_dir, tmp_path, error_line):
    """daal-train holds a lock on --out while it writes (a daal-study killed hard leaves its cell
    running; the study started again resumes that cell): another daal-train there, resuming or
    overwriting, is refused before it changes anything."""
    import fcntl

    out = str(tmp_path / "held")
    shutil.copytree(run_dir, out)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running daal-train holds it
        for argv in (["--resume", os.path.join(out, "checkpoint_last.pt"), "--epochs", "2", "--no-progress"],
                     TINY + ["--out", out, "--overwrite"]):
            assert cli.main(argv) == 2, argv
            assert "another daal-train is writing this run" in error_line("daal-train")
            assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
    finally:
        os.close(fd)
    assert cli.main(["--resume", os.path.join(out, "checkpoint_last.pt"), "--epochs", "2", "--no-progress"]) == 0


def test_empty_out_is_one_error_line(run_dir, error_line, tmp_path, monkeypatch):
    assert cli.main(TINY + ["--out", ""]) == 2
    assert "--out" in error_line("daal-train")
    before = sorted(os.listdir(run_dir))  # daal-eval took '' as its default, the checkpoint's folder
    assert cli.eval_main([os.path.join(run_dir, "checkpoint_last.pt"), "--out", "", "--no-progress"]) == 2
    assert "--out must name a folder, got ''" in error_line("daal-eval")
    assert sorted(os.listdir(run_dir)) == before
    # blanks (a CLI fuzz, 2026-12-07: a folder named '  ' was made): no folder either
    monkeypatch.chdir(tmp_path)
    assert cli.main(TINY + ["--out", "  "]) == 2
    assert "--out must name a folder, got '  '" in error_line("daal-train")
    assert cli.eval_main([os.path.join(run_dir, "checkpoint_last.pt"), "--out", " ", "--no-progress"]) == 2
    assert "--out must name a folder, got ' '" in error_line("daal-eval")
    from daal_triton.train import study

    assert study.main(["--config", "A=", "--out", " ", "--dry-run", "--no-progress"]) == 2
    assert "--out ' ': not a folder" in error_line("daal-study")
    assert not os.path.exists(" ") and not os.path.exists("  ")


def test_a_stop_after_at_or_past_the_last_epoch_is_said(tmp_path, capsys):
    assert cli.main(TINY + ["--stop-after", "1", "--no-baselines", "--out", str(tmp_path / "s")]) == 0  # at
    text = capsys.readouterr()
    assert "--stop-after 1 is not before the last epoch (--epochs 1)" in text.err + text.out
    assert cli.main(TINY + ["--stop-after", "3", "--no-baselines", "--out", str(tmp_path / "p")]) == 0  # past
    text = capsys.readouterr()
    assert "--stop-after 3 is not before the last epoch (--epochs 1)" in text.err + text.out
    assert cli.main(TINY + ["--epochs", "2", "--stop-after", "1", "--no-baselines", "--out", str(tmp_path / "t")]) == 0
    text = capsys.readouterr()
    assert "is not before the last epoch" not in text.err + text.out


def test_a_diverging_run_stops_with_one_error_line(tmp_path, error_line):
    # a learning rate far too high: the embeddings become NaN in epoch 2 (the CPU's value check) or
    # the loss's periodic read finds inf (GPU); either way one line says where it stopped, what is
    # kept and what to change, and the earlier epoch's checkpoint stays usable
    out = str(tmp_path / "div")
    flags = TINY + ["--epochs", "3", "--steps-per-epoch", "3", "--warmup-epochs", "0", "--lr", "1e8",
                    "--loss-lr", "1e8", "--no-baselines", "--out", out]  # the later flags win
    assert cli.main(flags) == 1
    line = error_line("daal-train")
    assert "training diverged in epoch" in line and "--lr" in line and "holds epoch" in line, line
    epoch = int(line.split("holds epoch ")[1].split(".")[0])
    assert torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)["epoch"] == epoch


def test_a_step_size_beyond_float32_is_divergence_not_a_traceback(tmp_path, error_line):
    # --lr 4e37 passes the checks, but AdamW's first step is lr / (1 - beta1) = 4e38 > float32's
    # largest: its addcdiv_ raised "value cannot be converted to type float without overflow"
    out = str(tmp_path / "big")
    assert cli.main(TINY + ["--epochs", "2", "--warmup-epochs", "0", "--lr", "4e37", "--no-baselines",
                            "--out", out]) == 1
    line = error_line("daal-train")
    assert "training diverged in epoch 1 of 2" in line and "step size overflows float32" in line, line
    assert "Try a lower --lr" in line and not os.path.exists(os.path.join(out, "checkpoint_last.pt"))


def test_a_network_with_non_finite_output_is_one_eval_error(run_dir, tmp_path, error_line):
    from daal_triton.train.checkpoint import digest

    ck = torch.load(os.path.join(run_dir, "checkpoint_best.pt"), map_location="cpu", weights_only=True)
    ck.pop("sha256")
    name = next(k for k, v in ck["model"].items() if v.is_floating_point() and v.ndim == 2)  # the head
    ck["model"][name] = torch.full_like(ck["model"][name], float("nan"))
    ck["sha256"] = digest(ck)
    path = str(tmp_path / "nan.pt")
    torch.save(ck, path)
    assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress"]) == 1
    assert "non-finite embeddings" in error_line("daal-eval")
    assert not (tmp_path / "ev").exists()


def test_an_infinite_loss_stops_the_run_with_one_error_line(tmp_path, error_line, monkeypatch):
    """+inf (not only NaN) is divergence: the loss's read raises and the run stops with exit code 1
    and the one "training diverged" line; ``+ inf`` keeps the gradients and weights finite, so
    nothing but the loss read can catch it."""
    from daal_triton.train import engine

    real = engine.GlobalBatchLoss.__call__
    calls = []

    def infinite_from_epoch_2(self, criterion, embeddings, labels):
        calls.append(1)
        loss = real(self, criterion, embeddings, labels)
        return loss + float("inf") if len(calls) > 1 else loss  # TINY: one step per epoch

    monkeypatch.setattr(engine.GlobalBatchLoss, "__call__", infinite_from_epoch_2)
    out = str(tmp_path / "inf")
    assert cli.main(TINY + ["--epochs", "2", "--no-baselines", "--out", out]) == 1
    line = error_line("daal-train")
    assert "training diverged in epoch 2 of 2" in line and "the loss became inf" in line, line
    assert "holds epoch 1" in line, line
    assert torch.load(os.path.join(out, "checkpoint_last.pt"), weights_only=True)["epoch"] == 1


def test_a_checkpoint_without_its_digest_is_refused(run_dir, tmp_path, error_line):
    """A checkpoint whose ``sha256`` entry was removed (and a weight then changed) is damaged: a
    missing digest never skips the check, for daal-eval and --resume alike."""
    ck = torch.load(os.path.join(run_dir, "checkpoint_last.pt"), map_location="cpu", weights_only=True)
    del ck["sha256"]
    name = next(k for k, v in ck["model"].items() if v.is_floating_point())
    ck["model"][name] = ck["model"][name] + 1.0
    os.makedirs(tmp_path / "run")
    path = str(tmp_path / "run" / "checkpoint_last.pt")
    torch.save(ck, path)
    assert cli.eval_main([path, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2
    assert "digest" in error_line("daal-eval")
    assert cli.main(["--resume", path, "--epochs", "2", "--no-progress"]) == 2
    assert "digest" in error_line("daal-train")
    assert os.listdir(tmp_path / "run") == ["checkpoint_last.pt"] and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("stop", ["disk-full", "ctrl-c"])
def test_a_checkpoint_write_that_fails_midway_keeps_the_previous_one(stop, tmp_path, monkeypatch):
    """save_checkpoint writes ``path.tmp`` and renames it: a write that dies after part of the file
    (disk full, Ctrl-C) leaves the previous checkpoint at ``path`` whole and loadable, and no
    ``.tmp``."""
    import io

    from torch import nn

    from daal_triton.train import checkpoint as C
    from daal_triton.train.config import TrainConfig

    torch.manual_seed(0)
    model, crit = nn.Linear(3, 2), nn.Linear(2, 2)
    path = str(tmp_path / "checkpoint_last.pt")
    C.save_checkpoint(path, model=model, criterion=crit, cfg=TrainConfig(), epoch=1, metrics=[])
    before = open(path, "rb").read()
    real = torch.save

    def half_then_fail(obj, f, *a, **k):
        buf = io.BytesIO()
        real(obj, buf, *a, **k)
        with open(f, "wb") as g:
            g.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device") if stop == "disk-full" else KeyboardInterrupt

    monkeypatch.setattr(C.torch, "save", half_then_fail)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="No space left") if stop == "disk-full" else pytest.raises(KeyboardInterrupt):
        C.save_checkpoint(path, model=model, criterion=crit, cfg=TrainConfig(), epoch=2, metrics=[])
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint_last.pt"]  # no half-written checkpoint_last.pt.tmp
    assert open(path, "rb").read() == before
    ck = C.load_checkpoint(path)
    assert ck["epoch"] == 1 and not torch.equal(ck["model"]["weight"], model.weight.detach())


def test_a_divergence_of_the_weight_decay_names_it(tmp_path, error_line):
    """``--weight-decay 1e308`` (a CLI fuzz, 2026-12-07) diverged, and the run advised a lower --lr:
    AdamW multiplies the weights by ``1 - lr x weight decay`` at each step, here far below -1."""
    out = str(tmp_path / "wd")
    assert cli.main(TINY + ["--epochs", "1", "--weight-decay", "1e308", "--no-baselines", "--out", out]) == 1
    line = error_line("daal-train")
    assert "training diverged in epoch 1 of 1" in line and "--weight-decay 1e+308 is too large for --lr 0.001" in line
    assert "give a --weight-decay well below 1000 (1 / --lr)" in line and "Try a lower --lr" not in line, line


def _sha(path):
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_live_overwrite_run_is_not_called_killed_and_daal_eval_does_not_write_beside_it(run_dir, tmp_path,
                                                                                          error_line):
    """A file-safety probe (2026-12-07): while an --overwrite run held the folder (the run it
    replaces in .daal-replaced/), a second daal-train called that run "killed" and advised moving
    .daal-replaced/* back by hand; done, the live run stopping before its first checkpoint deleted
    them all. daal-eval wrote eval.json there, which that stop removed too. Both are refused while
    the lock is held (daal-eval only until that run has a checkpoint_last.pt of its own: it puts
    nothing back then); once it is free, the advice for a run stopped hard is given as before."""
    import fcntl

    out = str(tmp_path / "live")
    shutil.copytree(run_dir, out)
    os.makedirs(os.path.join(out, ".daal-replaced"))
    before = {n: _sha(os.path.join(out, n)) for n in os.listdir(out) if os.path.isfile(os.path.join(out, n))}
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the live --overwrite run holds it
        assert cli.main(TINY + ["--out", out]) == 2
        assert "another daal-train is writing this run" in error_line("daal-train")
        ev = [os.path.join(out, "checkpoint_best.pt"), "--no-progress", "--no-tsne", "--overwrite"]
        last = os.path.join(out, "checkpoint_last.pt")
        os.replace(last, str(tmp_path / "last.pt"))  # the live run before its first checkpoint_last.pt
        assert cli.eval_main(ev) == 2
        assert "a daal-train --overwrite run is replacing the run there" in error_line("daal-eval")
        assert not os.path.exists(os.path.join(out, "eval.json"))
        # with its own checkpoint_last.pt that run puts nothing back: daal-eval's files are safe there
        os.replace(str(tmp_path / "last.pt"), last)
        assert cli.eval_main(ev) == 0
    finally:
        os.close(fd)
    assert {n: _sha(os.path.join(out, n)) for n in before} == before and os.path.isfile(os.path.join(out, "eval.json"))
    os.remove(os.path.join(out, "eval.json"))
    assert cli.main(TINY + ["--out", out]) == 2  # no lock: an --overwrite run stopped hard left it
    assert "the run that an --overwrite run stopped hard (killed) was replacing" in error_line("daal-train")


def test_links_in_the_out_folder_are_never_written_through(run_dir, tmp_path, error_line):
    """A file-safety probe (2026-12-07): links left in --out (to files, to nothing, to a folder)
    made daal-train write into the folders they point to: a training_curves.png link (the plot
    written through it), a dangling metrics.jsonl link (a file created there), a NAME.tmp link (a
    checkpoint written through it), and a .daal-replaced link (--overwrite moved the linked folder's
    files into --out and the run's files away). The user's files stay as they were."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "figure.png").write_bytes(b"my figure")
    (precious / "thesis.txt").write_text("my thesis")
    keep = {n: _sha(precious / n) for n in os.listdir(precious)}
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    os.remove(out / "training_curves.png")
    os.symlink(precious / "figure.png", out / "training_curves.png")
    os.symlink(precious / "thesis.txt", out / "checkpoint_last.pt.tmp")
    os.remove(out / "metrics.jsonl")
    os.symlink(precious / "made-by-daal-train.jsonl", out / "metrics.jsonl")  # dangling
    assert cli.main(TINY + ["--out", str(out), "--overwrite"]) == 0
    assert {n: _sha(precious / n) for n in os.listdir(precious)} == keep  # nothing written into it
    for name in ("training_curves.png", "metrics.jsonl", "checkpoint_last.pt"):
        assert os.path.isfile(out / name) and not os.path.islink(out / name), name
    # a resume moves nothing aside: the plot and the checkpoint's NAME.tmp replace the links
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    os.remove(resumed / "training_curves.png")
    os.symlink(precious / "figure.png", resumed / "training_curves.png")
    os.symlink(precious / "thesis.txt", resumed / "checkpoint_last.pt.tmp")
    assert cli.main(["--resume", str(resumed / "checkpoint_last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert {n: _sha(precious / n) for n in os.listdir(precious)} == keep
    assert not os.path.islink(resumed / "training_curves.png")
    assert not os.path.lexists(resumed / "checkpoint_last.pt.tmp")
    # a .daal-replaced that is a link: refused before anything moves
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    os.remove(other / "checkpoint_last.pt")  # as if stopped before its first checkpoint
    os.symlink(precious, other / ".daal-replaced")
    listed = sorted(os.listdir(other))
    assert cli.main(TINY + ["--out", str(other), "--overwrite"]) == 2
    assert ".daal-replaced, which is not a folder daal-train made (a link or a file)" in error_line("daal-train")
    assert sorted(os.listdir(other)) == listed and {n: _sha(precious / n) for n in os.listdir(precious)} == keep


def test_an_empty_set_aside_puts_nothing_back_and_removes_nothing(run_dir, tmp_path):
    """_put_back removed the run's files from --out, then moved back what .daal-replaced held:
    with nothing there (its files moved back by hand), it deleted the only copy."""
    from types import SimpleNamespace

    from daal_triton.train import run as R

    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / ".daal-replaced").mkdir()
    before = {n: _sha(out / n) for n in os.listdir(out) if os.path.isfile(out / n)}
    state = SimpleNamespace(metrics_file=None, replaced=None, path=lambda name: str(out / name))
    R._put_back(state, str(out / ".daal-replaced"))
    assert {n: _sha(out / n) for n in os.listdir(out)} == before
