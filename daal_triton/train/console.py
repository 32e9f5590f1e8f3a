"""The console scripts ``daal-train``, ``daal-eval`` and ``daal-study`` (setup.py's entry points).

Each loads its program with a Ctrl-C held (torch, numpy and the rest import in the first second
or two: an interrupt raised inside those imports printed a traceback, or left numpy half-imported
so that the run went on and later failed on "module 'numpy' has no attribute ...", or was lost
altogether); a Ctrl-C held there ends the program with one line and status 130 once the imports
are done (a second one stops them at once). Then it runs the program's ``main``, whose own handler says how a run stopped, and
returns its exit status; after that a Ctrl-C is ignored. What is left is the interpreter's
teardown (DataLoader workers joined, ``atexit`` handlers), which a second Ctrl-C used to
interrupt with an "Exception ignored in atexit callback" traceback after the program had already
said how it stopped. The ``main`` functions themselves stay interruptible and are what the tests
call in-process. (``import daal_triton`` does not import torch: daal_triton/__init__.py.)

The loaders import what ``main`` imports, torch among them (``cli`` imports its program's
modules inside ``main``): until 2026-12-05 they loaded ``cli`` alone, so torch's import ran in
``main`` without the hold, where a Ctrl-C that landed in one of the import system's weakref
callbacks was "ignored" by the interpreter and the run went on to the end (status 0: a CI run
of test_an_early_ctrl_c_stops_daal_train_with_one_line).
"""
import codecs
import importlib
import signal
import sys
from typing import Any, Callable, List, Tuple


def _escape(error: UnicodeError):
    """The codec error handler of the programs' output, for encoding: a path's undecodable bytes
    (surrogates, in a non-UTF-8 locale) go out as those bytes, as the name is on the disk; any
    other character the stream cannot encode as an escape (``\\xb1`` for the tables' ±). The
    encoder hands over a whole run of characters: its leading part of one kind is handled and the
    encoder comes back for the rest. (A decoding error, should a stream be read, is replaced.)"""
    if not isinstance(error, UnicodeEncodeError):
        return codecs.lookup_error("replace")(error)
    text, end = error.object, error.start

    def surrogate(c: str) -> bool:
        return 0xDC80 <= ord(c) <= 0xDCFF

    kind = surrogate(text[end])
    while end < error.end and surrogate(text[end]) == kind:
        end += 1
    part = UnicodeEncodeError(error.encoding, text, error.start, end, error.reason)
    return codecs.lookup_error("surrogateescape" if kind else "backslashreplace")(part)


codecs.register_error("daal-escape", _escape)


def _tolerant_output() -> List[Tuple[Any, str]]:
    """stdout and stderr with :func:`_escape` for what they cannot encode (an ASCII terminal or
    pipe: ``LC_ALL=C`` with ``PYTHONUTF8=0``, ``PYTHONIOENCODING=ascii``): before, a ± or a path's
    non-ASCII name ended a finished run with a UnicodeEncodeError traceback, its results unwritten.
    Returns ``(stream, its errors before)`` of the streams changed, for :func:`_run` to restore."""
    changed: List[Tuple[Any, str]] = []
    stream: Any
    for stream in (sys.stdout, sys.stderr):
        try:  # a TextIOWrapper; not one that is closed, nor a replacement without reconfigure
            before = stream.errors
            stream.reconfigure(errors="daal-escape")
        except (AttributeError, ValueError, OSError):
            continue
        changed.append((stream, before))
    return changed


def _run(load: Callable[[], Callable[[], int]], prog: str) -> int:
    """:func:`_run_program` with the streams of :func:`_tolerant_output`, restored afterwards (the
    programs also run in-process: a notebook's or pytest's streams are left as they were)."""
    changed = _tolerant_output()
    try:
        return _run_program(load, prog)
    finally:
        for stream, errors in changed:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError):  # closed meanwhile
                pass


#: What stopped the program, for its "interrupted (...)" line: Ctrl-C (SIGINT) or SIGTERM (``kill``,
#: ``timeout``, a batch system's or a container's stop)
STOPPED_BY = ["Ctrl-C"]


def stop_name() -> str:
    return STOPPED_BY[-1]


#: Called first by the stop, while the signals are still handled: daal-study's "stopping" mark,
#: which no cell may start after (one started between the signals being ignored and the study
#: marking itself stopping inherited them ignored, and the study waited for its end: noticed
#: 2026-12-07)
ON_STOP: List[Callable[[], None]] = []


def _stop_once(signum: int, frame: Any) -> None:
    """While the program runs, the first SIGINT or SIGTERM stops it as Ctrl-C does (a
    KeyboardInterrupt: the run cleans up and says how to go on); every later one is ignored, so
    nothing cuts that short. (A second Ctrl-C that landed while the line was printed gave a
    traceback; SIGTERM ended the program with no line, could leave a ``NAME.tmp``, and left a
    study's running cells orphaned: a run-folder probe, 2026-12-07.)"""
    for hook in ON_STOP:
        hook()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # a SIGTERM sent to the process group (scancel, systemd, kill -TERM -PGID) kills the DataLoader
    # workers too, and torch's SIGCHLD handler then raised "DataLoader worker ... killed by signal"
    # inside the stop, a traceback (a review, 2026-12-07): the program is stopping, its workers with it
    if hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    STOPPED_BY.append("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C")
    raise KeyboardInterrupt


def _run_program(load: Callable[[], Callable[[], int]], prog: str) -> int:
    held: List[int] = []
    STOPPED_BY[:] = ["Ctrl-C"]

    def hold(signum, frame):
        if held:  # a second Ctrl-C while loading: the user insists (an import that hangs)
            raise KeyboardInterrupt
        held.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    term = signal.getsignal(signal.SIGTERM)
    term = signal.SIG_DFL if term is None else term
    if term != signal.SIG_IGN:  # a SIGTERM is held as a Ctrl-C is (it killed the imports outright)
        signal.signal(signal.SIGTERM, hold)
    try:
        try:
            main = load()
        except ModuleNotFoundError as e:  # the "train" extra not installed: one line, not a traceback
            top = (e.name or "").split(".")[0]
            if top not in TRAIN_EXTRA:
                raise
            print(f"{prog}: error: {TRAIN_EXTRA[top]} is not installed; the training programs need the \"train\" "
                  "extra: pip install 'daal-triton[train]'", file=sys.stderr)
            return 1
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, term)
        if held:
            STOPPED_BY.append("SIGTERM" if held[0] == signal.SIGTERM else "Ctrl-C")
            raise KeyboardInterrupt
        # a signal the process inherited ignored (a background job's SIGINT) stays ignored
        if signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            signal.signal(signal.SIGINT, _stop_once)
        if term != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, _stop_once)
        try:
            status = main()
        finally:  # a SIGTERM while Python shuts down ends it, as before
            signal.signal(signal.SIGTERM, term)
    except KeyboardInterrupt:  # held during the imports, or before main's own handler
        print(f"{prog}: interrupted ({stop_name()})", file=sys.stderr)
        status = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


#: The top-level modules of setup.py's "train" extra (the loaders import two of them) and their
#: distributions' names.
TRAIN_EXTRA = {"torchvision": "torchvision", "sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}
#: What ``daal-train`` and ``daal-eval`` import before their first epoch or evaluation, imported
#: by their loaders under the hold: the program's modules (which ``cli`` imports inside its
#: ``main``s: torch, numpy), torchvision (the network), the loss, and scikit-learn's metrics (the
#: baselines' NMI). (t-SNE and matplotlib come at the end of a run: not held.)
PRELOAD = ("daal_triton.train.run", "daal_triton.train.evaluate", "daal_triton.loss", "torchvision",
           "sklearn.cluster", "sklearn.metrics")


def _preload() -> None:
    """Import :data:`PRELOAD`; for ``--help`` only the first (``main`` imports it before it
    parses: the rest would add ~2.4 s to the help on a 2-core CPU)."""
    help_only = bool({"-h", "--help"} & set(sys.argv[1:]))
    for name in PRELOAD[:1] if help_only else PRELOAD:
        importlib.import_module(name)


def _train_main() -> Callable[[], int]:
    from .cli import main
    _preload()
    return main


def _eval_main() -> Callable[[], int]:
    from .cli import eval_main
    _preload()
    return eval_main


def _study_main() -> Callable[[], int]:
    from .study import main
    return main


def train() -> int:
    """``daal-train``."""
    return _run(_train_main, "daal-train")


def evaluate() -> int:
    """``daal-eval``."""
    return _run(_eval_main, "daal-eval")


def study() -> int:
    """``daal-study``."""
    return _run(_study_main, "daal-study")
