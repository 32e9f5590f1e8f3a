"""Benchmark set-up for pytest: the options, the session state, the cases of each ``test_bench_*``
file (``bench/cases.py``) and their order; ``bench/runner.py`` measures and records them.

Without CUDA the benchmarks run in *smoke* mode (tiny shapes, float32, Triton's interpreter, one
round each) so that CI exercises every file; ``TRITON_INTERPRET=1`` is therefore set here, at
the top, before anything imports triton (as ``tests/conftest.py`` does; the two cooperate:
``setdefault``, and neither imports triton).

Smoke mode implies ``--benchmark-disable`` (each case runs once, untimed by pytest-benchmark).

Options (each also as an environment variable, for ``bench/gpu_check.sh``):

``--bench-profile smoke|check|full`` (``DAAL_BENCH_PROFILE``): ``check`` is the default on a GPU
(what ``gpu_check.sh`` runs: the performance targets and one representative per operator),
``full`` every combination; without CUDA always ``smoke``.
``--bench-records PATH`` (``DAAL_BENCH_RECORDS``): append one JSON line per case (measured,
skipped with the reason, failed); ``bench/report.py`` reads it.
``--bench-time-budget SECONDS`` (``DAAL_BENCH_DEADLINE``, an absolute Unix time): cases that
would start after the budget is spent are recorded as "skipped: out of time budget".
``--bench-compile-on-cpu`` (``DAAL_BENCH_COMPILE_ON_CPU``): run the torch.compile provider in
smoke mode too (~20 s per graph).

Timing: every round of ``benchmark.pedantic`` is bracketed by ``torch.cuda.synchronize``
(the setup ends with one, the timed function ends with one), so pytest-benchmark's wall-clock
timer measures the GPU work of the round; the same per-round times are kept in the records.
"""
from __future__ import annotations

import os
import sys
import time

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    from daal_triton.backend import interpreter_on

    if "triton" in sys.modules and not interpreter_on():
        raise RuntimeError("triton was imported before bench/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # --import-mode=importlib does not add it
    sys.path.insert(0, _HERE)

import cases  # noqa: E402
import runner  # noqa: E402
from interpreter import strict_interpreter, tests_on_path  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("daal-bench", "DAAL benchmarks (bench/)")
    group.addoption("--bench-profile", choices=cases.PROFILES, default=None,
                    help="smoke (CPU, tiny), check (gpu_check.sh subset, GPU default) or full")
    group.addoption("--bench-records", default=None, help="append one JSON line per benchmark case here")
    group.addoption("--bench-time-budget", type=float, default=None,
                    help="seconds after which remaining cases are recorded as out of time budget")
    group.addoption("--bench-compile-on-cpu", action="store_true", default=False,
                    help="run the torch.compile provider in the CPU smoke mode too")


class BenchState:
    def __init__(self, config):
        def opt(name, env=None):
            try:
                value = config.getoption(name)
            except (ValueError, AttributeError):  # options not registered (non-initial conftest)
                value = None
            if value in (None, False) and env:
                value = os.environ.get(env) or None
            return value

        self.device = torch.device("cuda", torch.cuda.current_device()) if HAS_CUDA else torch.device("cpu")
        profile = opt("--bench-profile", "DAAL_BENCH_PROFILE") or ("check" if HAS_CUDA else "smoke")
        if profile not in cases.PROFILES:
            raise pytest.UsageError(f"bench profile must be one of {cases.PROFILES}, got {profile!r}")
        self.requested_profile = profile
        self.profile = profile if HAS_CUDA else "smoke"
        self.timing = runner.TIMING[self.profile]
        self.recorder = runner.Recorder(opt("--bench-records", "DAAL_BENCH_RECORDS"))
        self.compile_on_cpu = bool(opt("--bench-compile-on-cpu") or os.environ.get("DAAL_BENCH_COMPILE_ON_CPU"))
        budget = opt("--bench-time-budget")
        deadline = os.environ.get("DAAL_BENCH_DEADLINE")
        self.deadline = None
        if budget is not None:
            self.deadline = time.time() + float(budget)
        elif deadline:
            self.deadline = float(deadline)
        self.env_written = False

    def remaining(self):
        return None if self.deadline is None else self.deadline - time.time()

    def write_env(self):
        if self.env_written or not self.recorder.path:
            return
        self.env_written = True
        env = runner.environment(self.device, self.profile)
        env.update(requested_profile=self.requested_profile, tf32_matmul_in_benchmarks=self.device.type == "cuda",
                   deadline=self.deadline)
        self.recorder(env)


def _state(config) -> BenchState:
    st = getattr(config, "_daal_bench_state", None)
    if st is None:
        st = BenchState(config)
        config._daal_bench_state = st
    return st


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    strict_interpreter()  # under the interpreter: what the GPU JIT refuses fails here too
    # Smoke mode (no CUDA): benchmarks run once, untimed, as with --benchmark-disable, whether or
    # not CI passes it (tryfirst: before pytest-benchmark reads the option). --benchmark-enable
    # (or DAAL_BENCH_CPU_TIMING=1) keeps pytest-benchmark's timing of the interpreter.
    if (not HAS_CUDA and hasattr(config.option, "benchmark_disable")
            and not getattr(config.option, "benchmark_enable", False)
            and not getattr(config.option, "benchmark_only", False)
            and not os.environ.get("DAAL_BENCH_CPU_TIMING")):
        config.option.benchmark_disable = True
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, on CPU)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "build: builds kernels for GPU targets and reads the result "
                            "without running them: no GPU needed (tests/conftest.py)")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors through the interpreter "
                            "(skipped on a GPU machine: tests/conftest.py)")
    config.addinivalue_line("markers", "bench: a benchmark case of bench/ (smoke mode without CUDA)")
    config.addinivalue_line("markers", "bench_target: a benchmark case with a performance target (bench/cases.py TARGETS)")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    op = getattr(metafunc.module, "OP", None)
    if op is None:
        return
    st = _state(metafunc.config)
    params = []
    for c in cases.cases_for(op, st.profile, compile_on_cpu=st.compile_on_cpu):
        marks = [pytest.mark.bench] + ([pytest.mark.bench_target] if c.target else [])
        params.append(pytest.param(c, id=c.id, marks=marks))
    metafunc.parametrize("case", params)


def _is_bench_case(item) -> bool:
    path = str(getattr(item, "path", None) or getattr(item, "fspath", ""))
    return "case" in getattr(item, "fixturenames", ()) and path.startswith(_HERE + os.sep)


def pytest_collection_modifyitems(config, items):
    """Benchmark cases in ``cases.order_key`` order across the files (targets' comparisons first, heavy
    cases last: a run cut short still has the targets); the positions of other items are kept."""
    idx = [i for i, it in enumerate(items) if _is_bench_case(it)]

    def key(it):
        case = getattr(getattr(it, "callspec", None), "params", {}).get("case")
        return cases.order_key(case) if isinstance(case, cases.Case) else (True, 99)

    ordered = sorted((items[i] for i in idx), key=key)
    for i, it in zip(idx, ordered):
        items[i] = it
    if HAS_CUDA:  # as tests/conftest.py does (bench/ may run without it)
        tests_on_path()
        from daal_testing import skip_interpreter_tests_on_gpu

        skip_interpreter_tests_on_gpu(items)


try:
    import pytest_benchmark  # noqa: F401
except ImportError:  # without the plugin: a minimal stand-in, so the files still run
    @pytest.fixture
    def benchmark():
        return runner.MiniBenchmark()


@pytest.fixture(scope="session")
def bench_state(request) -> BenchState:
    st = _state(request.config)
    st.write_env()
    return st


@pytest.fixture
def run_case(benchmark, bench_state):
    """``run_case(case)``: measure one case and record it; skips (pytest.skip, with the reason
    recorded) what cannot or should not run; failures are recorded, then raised."""

    def run(case: cases.Case) -> dict:
        return runner.run_case(case, benchmark, bench_state)

    return run


