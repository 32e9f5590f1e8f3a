"""Measuring one benchmark case and recording it (``run_case``, called by ``bench/conftest.py``).

``run_case`` goes through small steps: the time budget, the memory guard (an estimate from the
shape against the free GPU memory), the problem (``bench/problems.py``), the warm-up (two calls:
compilation, then a steady one, and the peak memory), the timed rounds of pytest-benchmark's
``benchmark.pedantic``, the NaN check, the triage of failures (out of memory: a skip; anything
else: recorded, then raised), the statistics and FLOP rates, the record.

Every case writes one JSON record (``--bench-records``) whatever happens to it: measured,
skipped (would not fit in memory, too slow, out of the time budget, kernel missing) or failed.
``bench/report.py`` builds the tables from those records.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

import problems
from cases import GiB, Case, estimate_bytes, flops, gemm_shape

# Per profile: seconds of timed rounds per case, min/max rounds, the longest acceptable call.
TIMING = {
    "smoke": dict(budget_s=0.0, min_rounds=1, max_rounds=1, max_call_s=float("inf")),
    "check": dict(budget_s=0.3, min_rounds=3, max_rounds=30, max_call_s=20.0),
    "full": dict(budget_s=1.0, min_rounds=5, max_rounds=100, max_call_s=120.0),
}
# Per operator and profile, where it differs from TIMING. A VGG-19 training step takes tens of
# milliseconds on an H200 and the targets compare step times 2% apart: more rounds. ``slice_s``:
# the seconds all of the operator's cases may take together, counted from the start of its first
# one (the environment variable of SLICE_ENV overrides it, in every profile), so that it cannot
# take the time of the cases after it; ``need_s``: the least time a case must have left to start.
OP_TIMING = {
    "train_step": {
        "check": dict(budget_s=1.0, min_rounds=10, max_rounds=40, max_call_s=10.0, slice_s=80.0, need_s=15.0),
        "full": dict(budget_s=2.0, min_rounds=20, max_rounds=100, max_call_s=60.0, need_s=15.0),
    },
}
SLICE_ENV = {"train_step": "DAAL_BENCH_TRAIN_STEP_S"}


class BenchCaseError(RuntimeError):
    """A benchmark case failed (the message carries the original error and its traceback)."""


# ----------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TF32:
    """TF32 for float32 matmuls inside a benchmark (the pairwise and kNN kernels then use TF32
    dots for float32 on a GPU; the line margin's keep 3xTF32; the eager and compiled references
    and the matmul baseline get TF32),
    restored afterwards so the parity tests of tests/ are unaffected."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = self.old
        return False


def free_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def is_oom(exc: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def cleanup(device: torch.device, collect: bool = False) -> None:
    """Return the cached GPU memory of the previous case (its tensors die with their last
    reference). ``collect``: also run ``gc.collect`` (~0.4 s with torch loaded: only when
    memory is tight or after an error, whose traceback holds frames in cycles)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def input_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


# ----------------------------------------------------------------------------- one pass
def pass_callables(problem: problems.Problem, pass_: str, device: torch.device):
    """``(setup, fn)`` for ``benchmark.pedantic``: ``setup`` builds what the round needs outside
    the timed region and ends with a device synchronisation; ``fn`` is the timed work."""

    def reset():
        for t in problem.leaves:
            t.grad = None

    def run_forward():
        with torch.no_grad() if problem.no_grad else contextlib.nullcontext():
            return problem.forward()

    def backward(out):
        if problem.grad_out is None:
            out.backward()
        else:
            out.backward(problem.grad_out)

    def setup():
        reset()
        sync(device)

    if pass_ == "fwd":
        return setup, run_forward
    if pass_ == "step":  # the forward is the whole training step (problems.setup_train_step)
        return setup, problem.forward
    if pass_ == "bwd":
        def setup_forward():
            reset()
            out = run_forward()
            sync(device)
            return (out,), {}

        def backward_only(out):
            backward(out)
            return out
        return setup_forward, backward_only

    def forward_backward():
        out = run_forward()
        backward(out)
        return out
    return setup, forward_backward


def call_once(setup, fn, device) -> Tuple[float, torch.Tensor]:
    made = setup()
    args = made[0] if made else ()
    t0 = time.perf_counter()
    out = fn(*args)
    sync(device)
    return time.perf_counter() - t0, out


def peak_extra(setup, fn, device) -> Tuple[Optional[int], Optional[int]]:
    """Peak memory of one call above what was allocated when it started (inputs, and for the
    bwd pass the saved forward), and the whole peak, from ``torch.cuda.max_memory_allocated``."""
    if device.type != "cuda":
        return None, None
    made = setup()
    args = made[0] if made else ()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*args)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out, args, made
    return int(peak - base), int(peak)


# ----------------------------------------------------------------------------- matmul baseline
_MATMUL: Dict[Tuple[str, int, int, int], float] = {}


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> float:
    """Best of 3 batches of back-to-back matmuls (CUDA events on a GPU), seconds per matmul;
    a batch lasts ~30 ms (3 to 200 matmuls, from one timed call after a warm-up)."""
    torch.matmul(a, b)
    sync(device)
    t0 = time.perf_counter()
    torch.matmul(a, b)
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(200, max(3, 0.03 / one)))
    best = math.inf
    for _ in range(3):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                torch.matmul(a, b)
            end.record()
            end.synchronize()
            sec = start.elapsed_time(end) / 1e3 / reps
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.matmul(a, b)
            sec = (time.perf_counter() - t0) / reps
        best = min(best, sec)
    return best


def matmul_flops_per_s(dtype: str, m: int, n: int, k: int, device: torch.device,
                       record: Optional[Callable[[dict], None]] = None) -> Optional[float]:
    """``torch.matmul`` throughput (FLOP/s) of an (m x k) @ (k x n) GEMM in ``dtype`` on
    ``device``, measured once per session and cached."""
    key = (dtype, m, n, k)
    if key in _MATMUL:
        return _MATMUL[key]
    dt = problems.TORCH_DTYPES[dtype]
    try:
        a = torch.randn(m, k, device=device, dtype=torch.float32).to(dt)
        b = torch.randn(k, n, device=device, dtype=torch.float32).to(dt)
        best = _matmul_seconds(a, b, device)
        rate = 2.0 * m * n * k / best
        del a, b
    except Exception as exc:  # noqa: BLE001 - a failed baseline must not stop the benchmark
        if record is not None:
            record(dict(kind="matmul", dtype=dtype, M=m, N=n, K=k, status=f"error: {exc!r}"[:300]))
        _MATMUL[key] = None
        return None
    _MATMUL[key] = rate
    if record is not None:
        record(dict(kind="matmul", dtype=dtype, M=m, N=n, K=k, seconds=best, tflops=rate / 1e12,
                    tf32=bool(torch.backends.cuda.matmul.allow_tf32), status="ok"))
    return rate


# ----------------------------------------------------------------------------- records
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device, profile: str) -> dict:
    env = dict(
        kind="env",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        profile=profile,
        device=str(device),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
        triton=_version("triton"),
        pytest_benchmark=_version("pytest-benchmark"),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device),
                   gpu_memory_gib=round(props.total_memory / GiB, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))))
    else:
        env.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return env


class Recorder:
    """Appends one JSON object per line to ``path`` (if any) and flushes at once, so a run
    killed by its time limit keeps every record written so far."""

    def __init__(self, path: Optional[str]):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, rec: dict) -> None:
        if not self.path:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()


def short_error(exc: BaseException, limit: int = 400) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return msg[:limit]


def format_tb(exc: BaseException, limit: int = 3000) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-limit:]


class CaseLog:
    """The record of one case: its description, labelled on the ``benchmark`` fixture; ``finish``
    writes it with a status, ``skip`` writes it and skips the test with that status as reason."""

    def __init__(self, case: Case, benchmark, st):
        self.st = st
        self.base = dict(kind="case", id=f"{case.op}-{case.id}", profile=st.profile, **case.describe())
        try:
            benchmark.group = case.group
        except Exception:  # noqa: BLE001 - older/newer pytest-benchmark
            pass
        benchmark.extra_info.update(self.base)

    def finish(self, status: str, **kw) -> dict:
        rec = dict(self.base, status=status, **kw)
        self.st.recorder(rec)
        return rec

    def skip(self, status: str, **kw):
        self.finish(status, **kw)
        pytest.skip(status)


# ----------------------------------------------------------------------------- the runner
@dataclass
class Measured:
    """What the timed part of a case leaves: per-round and warm-up seconds, peak extra memory."""

    times: List[float]
    warm: List[float]
    peak: Tuple[Optional[int], Optional[int]]  # (extra, whole), as peak_extra returns them
    input_bytes: int
    notes: str
    metrics: dict  # the problem's own fields (the training step's throughput and loss share)


def run_case(case: Case, benchmark, st) -> dict:
    """Measure one case with pytest-benchmark's ``benchmark`` fixture and record it (``st``: the
    session's state: device, profile, timing, recorder, deadline). What cannot or should not
    run is recorded and skipped (``pytest.skip``) with the reason; failures are recorded, then
    raised."""
    st = OpSession(st, case.op)
    with TF32(st.device):
        log = CaseLog(case, benchmark, st)
        if case.static_skip:
            log.skip("skipped: " + case.static_skip)
        check_time_budget(case, st, log)
        est, free = check_memory(case, st.device, log)
        measured, failure = measure(case, benchmark, st, log)
        if failure is not None:
            triage_failure(case, st.device, log, failure, est, free)
        return log.finish("ok", **summary(case, measured, benchmark, st, est, free))


class OpSession:
    """The session state (``st``) as one operator's cases see it: the operator's own timing
    (``OP_TIMING``), and a deadline that is the earlier of the session's and the end of the
    operator's slice (its start is kept on ``st``)."""

    def __init__(self, st, op: str):
        self._st = st
        spec = dict(OP_TIMING.get(op, {}).get(st.profile) or st.timing)
        slice_s = spec.pop("slice_s", None)
        slice_s = os.environ.get(SLICE_ENV.get(op, ""), "") or slice_s
        self.need_s = spec.pop("need_s", None)
        self.timing = spec
        self._end = None
        if slice_s:
            starts = st.__dict__.setdefault("op_slice_starts", {})
            self._end = starts.setdefault(op, time.time()) + float(slice_s)

    def __getattr__(self, name):
        return getattr(self._st, name)

    def remaining(self) -> Optional[float]:
        left = self._st.remaining()
        if self._end is None:
            return left
        mine = self._end - time.time()
        return mine if left is None else min(left, mine)


def check_time_budget(case: Case, st, log: CaseLog) -> None:
    """Skip what would start too close to the deadline (a compile needs ~60 s, the rest ~5 s,
    unless the operator's timing says otherwise)."""
    remaining = st.remaining()
    need = getattr(st, "need_s", None) or (60.0 if case.provider == "compile" else 5.0)
    if remaining is not None and remaining < need:
        log.skip(f"skipped: out of time budget ({max(remaining, 0):.0f} s left, "
                 f"this provider needs ~{need:.0f} s)")


def check_memory(case: Case, device: torch.device, log: CaseLog) -> Tuple[int, Optional[int]]:
    """``(estimated bytes, free bytes)``; skips a case whose estimate exceeds 85% of the free
    GPU memory (after a garbage collection, if the first look says so)."""
    est = estimate_bytes(case)
    cleanup(device)
    free = free_bytes(device)
    if free is not None and est > 0.85 * free:
        cleanup(device, collect=True)
        free = free_bytes(device)
    if free is not None and est > 0.85 * free:
        log.skip(f"skipped: would need ~{est / GiB:.1f} GiB (estimated from the shape), "
                 f"{free / GiB:.1f} GiB free", est_bytes=est, free_bytes=free)
    return est, free


def warm_up(setup, fn, st, log: CaseLog) -> Tuple[List[float], Tuple[Optional[int], Optional[int]]]:
    """Two untimed calls (the first compiles: Triton JIT, torch.compile), skipping what would
    not fit in the time left or is too slow for the profile; then the peak extra memory."""
    device, warm = st.device, []
    t, out = call_once(setup, fn, device)
    warm.append(t)
    del out
    if st.remaining() is not None and st.remaining() < 2 * t:
        log.skip(f"skipped: out of time budget after the first call ({t:.2f} s)", warmup_s=warm)
    t, out = call_once(setup, fn, device)
    warm.append(t)
    del out
    limit = st.timing["max_call_s"]
    if t > limit:
        log.skip(f"too slow: one call takes {t:.1f} s (limit {limit:.0f} s "
                 f"per call in the '{st.profile}' profile)", warmup_s=warm)
    return warm, peak_extra(setup, fn, device)


def plan_rounds(warm: List[float], st) -> int:
    """Rounds filling the profile's time per case within its bounds, and the time left."""
    timing = st.timing
    per_call = min(warm) if warm else 0.0
    rounds = timing["min_rounds"]
    if per_call > 0:
        rounds = int(min(timing["max_rounds"], max(timing["min_rounds"], timing["budget_s"] / per_call)))
        left = st.remaining()
        if left is not None:
            rounds = max(1, min(rounds, int((left - 3.0) / per_call)))
    return rounds


def time_rounds(benchmark, setup, fn, rounds: int, device: torch.device):
    """``(seconds per round, the last output)``: ``benchmark.pedantic`` runs the rounds, each
    timed here too, between device synchronisations."""
    times, last = [], {}

    def timed(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        sync(device)
        times.append(time.perf_counter() - t0)
        last["out"] = out

    benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    return times, last.pop("out", None)


def check_nan(case: Case, out) -> None:
    if isinstance(out, torch.Tensor) and torch.isnan(out.detach()).any():
        raise AssertionError(f"{case.op} {case.provider} {case.pass_}: NaN in the output")


def measure(case: Case, benchmark, st, log: CaseLog):
    """``(Measured, None)``, or ``(None, (kind, message, traceback))`` on a failure: only
    strings leave, since an exception's traceback holds the frames (and the tensors) of the
    failed call, which must not outlive it (pytest keeps the last one). Skips pass through."""
    device = st.device
    problem = setup = fn = None
    try:
        try:
            problem = problems.build_problem(case, device)
        except problems.ProviderMissing as exc:
            log.skip(f"skipped: {exc.reason}: {exc}")
        setup, fn = pass_callables(problem, case.pass_, device)
        in_bytes = input_bytes(problem.inputs)
        warm, peak = ([], (None, None)) if st.profile == "smoke" else warm_up(setup, fn, st, log)
        times, out = time_rounds(benchmark, setup, fn, plan_rounds(warm, st), device)
        check_nan(case, out)
        del out
        metrics = problem.metrics(times) if problem.metrics else {}
        return Measured(times, warm, peak, in_bytes, problem.notes, metrics), None
    except Exception as exc:  # noqa: BLE001
        return None, ("oom" if is_oom(exc) else "error", short_error(exc), format_tb(exc))
    finally:
        problem = setup = fn = None
        cleanup(device)


def triage_failure(case: Case, device: torch.device, log: CaseLog, failure, est, free) -> None:
    """Out of memory: recorded and skipped; anything else: recorded, then raised."""
    cleanup(device, collect=True)
    kind, msg, tb = failure
    if kind == "oom":
        log.skip(f"skipped: out of memory ({msg[:200]})", est_bytes=est, free_bytes=free)
    log.finish("error: " + msg, traceback=tb)
    raise BenchCaseError(f"{case.op} {case.id}: {msg}\n{tb}")


def statistics(times: List[float]) -> dict:
    n = len(times)
    ordered = sorted(times)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2 if n else None
    mean = sum(times) / n if n else None
    stdev = (sum((t - mean) ** 2 for t in times) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return dict(median_s=median, mean_s=mean, min_s=ordered[0] if n else None,
                max_s=ordered[-1] if n else None, stdev_s=stdev, rounds=n, times_s=times)


def rates(case: Case, median: Optional[float], st) -> dict:
    """Useful FLOP/s, and as a fraction of ``torch.matmul``'s on the comparable GEMM (measured
    and recorded once per session; not in the smoke profile)."""
    fl = flops(case.op, case.dims, case.pass_)
    gm, gn, gk = gemm_shape(case.op, case.dims)
    no_baseline = st.profile == "smoke" or case.pass_ == "step"  # a training step has no one GEMM
    mm = None if no_baseline else matmul_flops_per_s(case.dtype, gm, gn, gk, st.device, st.recorder)
    achieved = fl / median if (fl and median) else None
    return dict(flops=fl, tflops=achieved / 1e12 if achieved else None, matmul_gemm=[gm, gn, gk],
                matmul_tflops=mm / 1e12 if mm else None,
                matmul_fraction=achieved / mm if (achieved and mm) else None)


def summary(case: Case, m: Measured, benchmark, st, est: int, free: Optional[int]) -> dict:
    """The measured fields of a case's record (also on pytest-benchmark's ``extra_info``)."""
    stats = statistics(m.times)
    extra = dict(stats, warmup_s=m.warm, **rates(case, stats["median_s"], st),
                 peak_extra_bytes=m.peak[0], peak_bytes=m.peak[1], input_bytes=m.input_bytes,
                 est_bytes=est, free_bytes=free, tf32=bool(st.device.type == "cuda"), notes=m.notes,
                 **m.metrics)
    benchmark.extra_info.update({k: v for k, v in extra.items() if k != "times_s"})
    return extra


class MiniBenchmark:
    """A stand-in for pytest-benchmark's ``benchmark`` fixture (only what ``run_case`` uses):
    for machines without the plugin, and for testing the GPU code path on the CPU."""

    def __init__(self, disabled: bool = False):
        self.extra_info: dict = {}
        self.group = None
        self.disabled = disabled
        self.rounds_run = 0

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        result = None
        for _ in range(warmup_rounds + (1 if self.disabled else rounds)):
            made = setup() if setup else None
            a, kw = made if made else (args, kwargs or {})
            result = target(*a, **kw)
            self.rounds_run += 1
        return result
