"""The console scripts (daal_triton/train/console.py): what setup.py installs, and a Ctrl-C after
the program has finished."""
import importlib
import pathlib
import re
import subprocess
import sys
import textwrap

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
    sys.exit(console._run(lambda: {status}, "prog"))
""")


@pytest.mark.parametrize("status", [0, 130])
def test_ctrl_c_during_teardown_is_ignored(status):
    r = subprocess.run([sys.executable, "-c", _TEARDOWN.format(status=status)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == status, r.stderr
    assert "teardown finished" in r.stdout, r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr


def test_ctrl_c_before_main_handles_it(capsys):
    def main():
        raise KeyboardInterrupt  # as while main's imports run

    import signal
    before = signal.getsignal(signal.SIGINT)
    try:
        assert console._run(main, "daal-train") == 130
    finally:
        signal.signal(signal.SIGINT, before)  # _run ignores Ctrl-C afterwards: not in pytest's process
    assert capsys.readouterr().err == "daal-train: interrupted (Ctrl-C)\n"


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
