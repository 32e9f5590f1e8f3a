"""The canary of kernels no GPU had run before a check: their GPU tests write it, the benchmarks
and the probe read it (bench/gpu_check.sh names the file in ``DAAL_GPU_CANARY``).

A kernel's first GPU run may hang (a wrong barrier phase), fault (an address out of bounds: the
CUDA context is then lost for the whole process) or mis-select. Each variant's GPU tests
therefore first launch it in a child process with a deadline (:func:`first_launches`), then
check it in-process, and append one line ``variant pass|fail test`` per test to the canary
(:func:`canary`, :func:`record`). The benchmarks and the probe time a variant only after a
pass and no failure (:func:`unvetted`), so a broken kernel costs its tests, not the benchmarks'
cases after it. The variants: the Gluon forwards (``gluon``, ``gluon128``, ``gluon-stagesN``;
tests/kernels/test_kernel_knn_gluon.py) and the selection by a threshold (``threshold``,
``half`` and each of the filter's other tiles, :func:`filter_tiles_variant`;
tests/kernels/test_kernel_knn_threshold.py). Imports nothing heavy: bench/probe_h200.py and
bench/problems.py read it."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional, Tuple

#: The variable naming the canary file (bench/gpu_check.sh sets it; unset: nothing is vetted or
#: recorded, and every variant may be timed, as in a CPU rehearsal).
CANARY_ENV = "DAAL_GPU_CANARY"


def record(variant: str, outcome: str, name: str) -> None:
    """Append ``variant outcome name`` to the canary where :data:`CANARY_ENV` names a file."""
    path = os.environ.get(CANARY_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{variant} {outcome} {name}\n")


@contextlib.contextmanager
def canary(variant: str, name: str) -> Iterator[None]:
    """Record ``variant`` "pass" for test ``name`` when the block returns, "fail" when it raises
    (an assertion, a CUDA error, an interrupt)."""
    try:
        yield
    except BaseException:
        record(variant, "fail", name)
        raise
    record(variant, "pass", name)


def unvetted(variant: str) -> Optional[str]:
    """Why ``variant`` may not be timed in this run (the canary records no pass of its GPU tests,
    or a failure), or None (vetted, or no canary named)."""
    path = os.environ.get(CANARY_ENV)
    if not path:
        return None
    outcomes = set()
    if os.path.exists(path):
        with open(path) as f:
            outcomes = {words[1] for words in map(str.split, f) if len(words) >= 2 and words[0] == variant}
    if "fail" in outcomes:
        return f"{variant} failed a GPU test in this run ({path})"
    if "pass" not in outcomes:
        return f"{variant}'s GPU tests have not passed in this run ({path})"
    return None


def filter_tiles_variant(blocks: Tuple[int, int, int, int, Optional[int]]) -> str:
    """The canary's name of the threshold filter on ``blocks`` (a key of
    ``knn_threshold.FILTER_ALTERNATIVES``), e.g. ``threshold-128x128-w8-s3-r128``."""
    bm, bn, warps, stages, maxnreg = blocks
    return f"threshold-{bm}x{bn}-w{warps}-s{stages}" + (f"-r{maxnreg}" if maxnreg else "")


_launched = {}


def first_launches(variant: str, code: str, seconds: float, name: str) -> None:
    """Fail the calling test, recording the failure in the canary, unless ``code`` (``variant``'s
    first launches, ending in a synchronisation) exits 0 within ``seconds`` in a fresh Python
    (``daal_testing.run_with_deadline``; once per variant and test process: the outcome is kept)."""
    import pytest

    from daal_testing import run_with_deadline

    if variant not in _launched:
        with tempfile.TemporaryDirectory() as cwd:
            _launched[variant] = run_with_deadline(code, seconds, cwd)
    if _launched[variant]:
        record(variant, "fail", name)
        pytest.fail(f"{variant}'s first launches in a child process: {_launched[variant]}")
