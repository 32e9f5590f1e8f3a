"""The console scripts (daal_triton/train/console.py): what setup.py installs, and a Ctrl-C after
the program has finished."""
import ast
import importlib
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import pytest

from daal_triton.train import cli, console, study

_TEARDOWN = textwrap.dedent("""
    import atexit, os, signal, sys, time
    from daal_triton.train import console

    def teardown():  # a Ctrl-C while the interpreter tears down (DataLoader workers, atexit)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        print("teardown finished", flush=True)

    atexit.register(teardown)
    sys.exit(console._run(lambda: lambda: {status}, "prog"))
""")


def _interactive_sigint():
    """In the child before it starts: Ctrl-C as a terminal's program has it. A job started in the
    background (``cmd &`` without job control: CI scripts, nohup) inherits SIGINT ignored, and Python
    then never raises KeyboardInterrupt: these tests would pass with nothing to catch."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("status", [0, 130])
def test_ctrl_c_during_teardown_is_ignored(status):
    r = subprocess.run([sys.executable, "-c", _TEARDOWN.format(status=status)], capture_output=True, text=True,
                       timeout=120, preexec_fn=_interactive_sigint)
    assert r.returncode == status, r.stderr
    assert "teardown finished" in r.stdout, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_ctrl_c_before_main_handles_it(capsys):
    def main():
        raise KeyboardInterrupt  # as while main's imports run

    import signal
    before = signal.getsignal(signal.SIGINT)
    try:
        assert console._run(lambda: main, "daal-train") == 130
    finally:
        signal.signal(signal.SIGINT, before)  # _run ignores Ctrl-C afterwards: not in pytest's process
    assert capsys.readouterr().err == "daal-train: interrupted (Ctrl-C)\n"


def test_ctrl_c_while_the_program_loads_is_held_then_stops_it(capsys):
    """A Ctrl-C while the program's modules import (torch, numpy: the first second or two) is held
    until they are done (raised inside them it printed a traceback, left numpy half-imported, or
    was lost and the run went on); then the program does not start: one line, status 130."""
    import os
    import signal

    ran = []

    def load():
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C during the imports
        time.sleep(0.05)
        return lambda: ran.append(1) or 0

    before = signal.getsignal(signal.SIGINT)
    try:
        assert console._run(load, "daal-study") == 130
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert not ran and capsys.readouterr().err == "daal-study: interrupted (Ctrl-C)\n"


def test_a_second_ctrl_c_stops_a_load_that_hangs(capsys):
    """The held Ctrl-C is one: a second one while the program still loads (an import that hangs)
    stops it at once, with the same line and status."""
    import os
    import signal

    def load():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # "hangs": only the second Ctrl-C ends it
            time.sleep(0.01)
        raise AssertionError("the second Ctrl-C did not stop the load")

    before = signal.getsignal(signal.SIGINT)
    try:
        assert console._run(load, "daal-train") == 130
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err == "daal-train: interrupted (Ctrl-C)\n"


def _restoring_signals(fn):
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    try:
        return fn()
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        console.STOPPED_BY[:] = ["Ctrl-C"]  # what this process's next program starts with


def test_sigterm_stops_the_program_as_ctrl_c_does(capsys):
    """SIGTERM (kill, timeout, a batch system's or a container's stop) ended the program with no
    line (and a run could leave NAME.tmp, a study its cells running): it stops it as Ctrl-C does,
    and the line names it. After the program, SIGTERM is the default again."""
    import signal

    def load():
        def main():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
            raise AssertionError("SIGTERM did not stop main")
        return main

    def run():
        signal.signal(signal.SIGCHLD, lambda *_: None)  # as torch's DataLoader installs one
        assert console._run(load, "daal-train") == 130
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        # its workers die with a process group's SIGTERM: no "worker killed" error inside the stop
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    _restoring_signals(run)
    assert capsys.readouterr().err == "daal-train: interrupted (SIGTERM)\n"


def test_a_second_ctrl_c_while_the_first_is_handled_is_ignored(capsys):
    """The first Ctrl-C raises; one more while the program says how it stopped (its except branch)
    raised again, a traceback, in 3 of 7 tries 0.3-1 ms apart (a run-folder probe, 2026-12-07)."""
    import signal

    def main():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            print("handled", file=sys.stderr)
            return 130
        raise AssertionError("Ctrl-C did not stop main")

    assert _restoring_signals(lambda: console._run(lambda: main, "daal-train")) == 130
    assert capsys.readouterr().err == "handled\n"


def test_a_sigterm_inside_a_deferred_block_waits_for_its_end():
    """A run's file moves hold Ctrl-C until they are done; under the console they hold SIGTERM too."""
    import signal

    from daal_triton.train import run as run_module

    def body():
        signal.signal(signal.SIGTERM, console._stop_once)
        signal.signal(signal.SIGINT, console._stop_once)
        done = []
        with pytest.raises(KeyboardInterrupt):
            with run_module._deferred_interrupt():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                done.append(1)
        assert done == [1] and console.stop_name() == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # what follows is not cut short
        # a library caller's own SIGTERM handler is not held, nor turned into a KeyboardInterrupt
        flag = []
        signal.signal(signal.SIGTERM, lambda *_: flag.append("term"))
        with run_module._deferred_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert flag == ["term"]  # run at once, as outside the block
        assert flag == ["term"]
    _restoring_signals(body)


def test_the_console_module_loads_without_torch():
    """The console scripts import ``daal_triton.train.console`` before anything else: it and the
    package's ``__init__`` import no torch, so that the program's own imports run with a Ctrl-C
    held; the public names still load on first use."""
    code = ("import sys, daal_triton.train.console as c; assert 'torch' not in sys.modules, 'torch'; "
            "import daal_triton; from daal_triton import DAALLoss, knn; import daal_triton.loss; "
            "assert daal_triton.loss.miner_weights and DAALLoss and knn and 'DAALLoss' in dir(daal_triton); "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_loader_imports_what_the_run_imports_before_training(tmp_path):
    """What ``daal-train`` imports before its first epoch loads under the held Ctrl-C (the
    console's loader): a run of ``main`` after it imports none of torch, numpy, torchvision,
    scikit-learn or triton, nor most of their submodules. (A Ctrl-C that lands in one of the
    import system's weakref callbacks is dropped by the interpreter: with torch imported inside
    ``main`` a CI run went on to the end with status 0.) ``--help`` preloads only what ``main``
    imports before it parses."""
    code = f"""
import sys
from daal_triton.train import console
main = console._train_main()
before = set(sys.modules)
status = main(["--epochs", "1", "--steps-per-epoch", "1", "--shapes-train-per-class", "8",
               "--shapes-test-per-class", "5", "--width", "0.125", "--embedding-dim", "32", "--threads", "1",
               "--no-tsne", "--no-progress", "--out", {str(tmp_path / "run")!r}])
new = set(sys.modules) - before
heavy = ("torch", "numpy", "torchvision", "sklearn", "triton", "scipy")
print(status, sorted(m for m in new if m.split(".")[0] in heavy))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    status, _, late = r.stdout.strip().splitlines()[-1].partition(" ")
    late = ast.literal_eval(late)  # the printed list of module names
    assert status == "0" and not [m for m in late if "." not in m], late
    assert len(late) <= 20, late  # (torch imports a few submodules on first use)
    code = ("import sys; sys.argv[1:] = ['--help']; from daal_triton.train import console; console._train_main(); "
            "print('torchvision' in sys.modules, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.stdout.split() == ["False", "True"], r.stderr[-2000:]


@pytest.mark.parametrize("missing", ["torchvision", "sklearn"])
def test_a_missing_train_extra_is_one_line(tmp_path, missing):
    """Without the "train" extra (torchvision, scikit-learn, ...) ``daal-train`` says so in one line
    with the install command, status 1, no traceback; a module of the package itself that cannot
    be imported is a bug and keeps its traceback."""
    code = (f"import sys; sys.modules[{missing!r}] = None; from daal_triton.train import console; "
            "sys.exit(console.train())")
    r = subprocess.run([sys.executable, "-c", code, "--epochs", "1"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    name = {"sklearn": "scikit-learn"}.get(missing, missing)
    assert r.stderr.strip() == (f"daal-train: error: {name} is not installed; the training programs need the "
                                "\"train\" extra: pip install 'daal-triton[train]'"), r.stderr
    text = (pathlib.Path(__file__).resolve().parents[2] / "setup.py").read_text()
    extra = re.search(r'"train": \[([^\]]*)\]', text).group(1)
    assert sorted(console.TRAIN_EXTRA.values()) == sorted(re.findall(r'"([\w-]+)[<>=]', extra))  # setup.py's
    code = "import sys; sys.modules['daal_triton.train.run'] = None; from daal_triton.train import console; console.train()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    last = (r.stderr.strip().splitlines() or [""])[-1]
    assert r.returncode == 1 and "Traceback" in r.stderr and last.startswith("ModuleNotFoundError"), r.stderr[-2000:]


@pytest.mark.parametrize("when", ["loading", "training", "training-group"])
def test_sigterm_stops_daal_train_with_one_line_and_leaves_no_tmp(tmp_path, when):
    """SIGTERM while daal-train loads (held until the imports are done) or trains (after its first
    epoch's line): one line naming it, status 130, no traceback, no NAME.tmp (it ended the process
    outright before)."""
    import signal

    args = [sys.executable, "-m", "daal_triton.train", "--epochs", "50", "--steps-per-epoch", "1",
            "--shapes-train-per-class", "8", "--shapes-test-per-class", "5", "--width", "0.125",
            "--embedding-dim", "32", "--threads", "1", "--no-tsne", "--no-progress", "--out", str(tmp_path / "run")]
    group = when == "training-group"  # scancel, systemd: the workers get it too (a traceback, 3 runs in 5)
    args += ["--num-workers", "2"] if group else []
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         start_new_session=group)
    if when == "loading":
        time.sleep(0.5)
    else:
        for line in p.stdout:
            if "epoch 1/50" in line:
                break
    if group:
        os.killpg(p.pid, signal.SIGTERM)
    else:
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "Traceback" not in err and "interrupted (SIGTERM)" in err, err[-2000:]
    run = tmp_path / "run"
    assert not run.exists() or not [f for f in os.listdir(run) if f.endswith(".tmp")]


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.6])
def test_an_early_ctrl_c_stops_daal_train_with_one_line(tmp_path, delay):
    """``python -m daal_triton.train`` (what ``daal-train`` runs) interrupted while it starts:
    whenever the Ctrl-C lands (imports, argument checks, data), one line and status 130, nothing
    run to the end, no traceback."""
    import signal

    args = [sys.executable, "-m", "daal_triton.train", "--epochs", "1", "--steps-per-epoch", "1",
            "--shapes-train-per-class", "8", "--shapes-test-per-class", "5", "--width", "0.125",
            "--embedding-dim", "32", "--threads", "1", "--no-tsne", "--no-progress", "--out", str(tmp_path / "run")]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         preexec_fn=_interactive_sigint)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert "Traceback" not in err and "interrupted (Ctrl-C)" in err, err[-2000:]
    assert not (tmp_path / "run" / "results.txt").exists()


def test_setup_names_the_console_functions():
    """setup.py's console_scripts are the wrappers (a stale install's metadata may say otherwise:
    this reads what the next install will write)."""
    text = (pathlib.Path(__file__).resolve().parents[2] / "setup.py").read_text()
    scripts = dict(re.findall(r'"(daal-[a-z]+)=([\w.:]+)"', text))
    assert scripts == {"daal-train": "daal_triton.train.console:train",
                       "daal-eval": "daal_triton.train.console:evaluate",
                       "daal-study": "daal_triton.train.console:study"}
    for value in scripts.values():
        module, name = value.split(":")
        assert callable(getattr(importlib.import_module(module), name))


@pytest.mark.parametrize("wrapper, module, name", [(console.train, cli, "main"),
                                                    (console.evaluate, cli, "eval_main"),
                                                    (console.study, study, "main")])
def test_each_wrapper_runs_its_main(monkeypatch, wrapper, module, name):
    import signal
    monkeypatch.setattr(module, name, lambda: 7)
    before = signal.getsignal(signal.SIGINT)
    try:
        assert wrapper() == 7
    finally:
        signal.signal(signal.SIGINT, before)


_ENCODINGS = {"ascii": {"PYTHONIOENCODING": "ascii"}, "C-locale": {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}}


@pytest.mark.parametrize("env", list(_ENCODINGS), ids=list(_ENCODINGS))
def test_output_the_terminal_cannot_encode_is_escaped(env):
    """On an ASCII stdout (``PYTHONIOENCODING=ascii``; ``LC_ALL=C`` with ``PYTHONUTF8=0``) a ± or
    a path's non-ASCII name ended a finished run with a UnicodeEncodeError traceback before its
    results were written (a probe, 2026-12-06). The programs print ± as ``\\xb1``, and a name the
    file system's encoding could not decode (surrogates) as the bytes it has on the disk."""
    code = ("import sys; from daal_triton.train import console\n"
            "def main():\n"
            "    print('0.600 \\u00b1 0.100 in run \\udcc3\\udcbc, \\u00b1\\udcc3\\udcbc\\u00b1', flush=True)\n"
            "    print('an error \\u00d7', file=sys.stderr)\n"
            "    return 0\n"
            "sys.exit(console._run(lambda: main, 'prog'))\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_ALL", "LANG", "PYTHONUTF8")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120,
                       env=dict(environ, **_ENCODINGS[env]))
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert r.stdout == b"0.600 \\xb1 0.100 in run \xc3\xbc, \\xb1\xc3\xbc\\xb1\n"  # runs of both kinds
    assert r.stderr == b"an error \\xd7\n"


def test_the_streams_are_restored_after_an_in_process_run():
    """The programs run in-process too (a notebook, these tests): the escaping handler is theirs
    only while they run, and the caller's streams keep their own error handling afterwards."""
    import io
    import signal

    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    before, handler = sys.stdout, signal.getsignal(signal.SIGINT)
    sys.stdout = stream
    try:
        assert console._run(lambda: lambda: print("\u00b1") or 0, "prog") == 0
    finally:
        sys.stdout = before
        signal.signal(signal.SIGINT, handler)  # _run ignores Ctrl-C afterwards: not in pytest's process
    stream.flush()
    assert stream.buffer.getvalue() == b"\\xb1\n" and stream.errors == "strict"


def test_a_run_into_a_folder_with_a_non_ascii_name_finishes_in_an_ascii_locale(tmp_path):
    """``daal-train --out "run ü×"`` under ``LC_ALL=C PYTHONUTF8=0``: the file system's encoding
    (ASCII) gives the name surrogates; results.txt failed to encode them at the end of a finished
    run (UnicodeEncodeError, no results). Now every file is written and results.txt names the folder
    by its bytes on the disk."""
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    from test_train_user_errors import TINY

    name = "run ü×"
    code = ("import sys; from daal_triton.train import console; "
            f"sys.argv = ['daal-train'] + {list(TINY)!r} + ['--out', {ascii(name)}.encode().decode('ascii', "
            "'surrogateescape')]; "
            "sys.exit(console.train())")
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_ALL", "LANG", "PYTHONUTF8")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600, cwd=tmp_path,
                       env=dict(environ, LC_ALL="C", LANG="C", PYTHONUTF8="0"))
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    folder = tmp_path / name
    assert {"config.json", "metrics.jsonl", "results.txt", "checkpoint_last.pt"} <= set(os.listdir(folder))
    assert f"outputs in {name})".encode() in (folder / "results.txt").read_bytes()
    assert f"outputs in {name})".encode() in r.stdout
