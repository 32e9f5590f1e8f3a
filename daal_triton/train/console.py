"""The console scripts ``daal-train``, ``daal-eval`` and ``daal-study`` (setup.py's entry points).

Each runs its program's ``main`` and returns its exit status; then a Ctrl-C is ignored. What is
left is the interpreter's teardown (DataLoader workers joined, ``atexit`` handlers), which a
second Ctrl-C used to interrupt with an "Exception ignored in atexit callback" traceback after the
program had already said how it stopped. The ``main`` functions themselves stay interruptible and
are what the tests call in-process.
"""
import signal
import sys
from typing import Callable


def _run(main: Callable[[], int], prog: str) -> int:
    try:
        status = main()
    except KeyboardInterrupt:  # a Ctrl-C before main's own handler (while its imports ran)
        print(f"{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        status = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


def train() -> int:
    """``daal-train``."""
    from .cli import main
    return _run(main, "daal-train")


def evaluate() -> int:
    """``daal-eval``."""
    from .cli import eval_main
    return _run(eval_main, "daal-eval")


def study() -> int:
    """``daal-study``."""
    from .study import main
    return _run(main, "daal-study")
