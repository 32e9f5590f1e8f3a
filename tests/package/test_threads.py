"""Threads: the package's calls from several threads at once give what each gives alone.

Triton's interpreter is not thread-safe (one process-wide builder holds the grid and the program
index of the launch running; each launch swaps functions of ``triton.language``): unserialised,
two threads on the Triton backend on the CPU failed with "x >= grid_dim[0]" or returned wrong
distances without an error. ``kernels/_common.py``'s ``serialise_interpreter`` makes the launches
take turns.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import daal_triton as dt
from daal_triton.kernels import _common

pytestmark = pytest.mark.interpreter


@pytest.fixture
def fast_switching():
    """Threads switch every 10 µs (Python's default is 5 ms), so that launches overlap."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def _in_threads(work, n_threads: int, rounds: int) -> list:
    """``work(i)`` in ``n_threads`` threads at once, ``rounds`` times; what each call returned or raised."""
    results: list = []
    lock = threading.Lock()

    def run(i):
        try:
            out = work(i)
        except Exception as err:  # noqa: BLE001 - reported by the test
            out = err
        with lock:
            results.append((i, out))

    for _ in range(rounds):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return results


def _loss_and_grads(x, labels, segments):
    e = x.clone().requires_grad_(True)
    s = segments.clone().requires_grad_(True)
    loss = dt.daal_loss(e, labels, s, k=3, backend="triton")
    loss.backward()
    return torch.cat([loss.detach().reshape(1), e.grad.flatten(), s.grad.flatten()])


def test_triton_backend_from_threads_equals_each_call_alone(fast_switching):
    """Pairwise distances, the kNN and the loss's forward + backward from three threads at once on
    the Triton backend (the interpreter), each bitwise equal to the same call made alone."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(130, 13, generator=gen) for _ in range(3)]
    labels = torch.randint(0, 5, (130,), generator=gen)
    segments = dt.init_segments(5, 13, generator=gen)
    calls = [
        lambda: dt.pairwise_distance(xs[0], xs[0][:70], backend="triton"),
        lambda: torch.cat([t.float().flatten() for t in dt.knn(xs[1], xs[1], 4, exclude_self=True, backend="triton")]),
        lambda: _loss_and_grads(xs[2], labels, segments),
    ]
    alone = [call() for call in calls]
    results = _in_threads(lambda i: calls[i](), n_threads=3, rounds=6)
    errors = [(i, out) for i, out in results if isinstance(out, Exception)]
    assert not errors, f"calls failed in threads: {errors[:2]}"
    wrong = [i for i, out in results if not torch.equal(out, alone[i])]
    assert not wrong, f"calls {wrong} gave other values in threads than alone"


def test_interpreter_launches_are_wrapped_once():
    """Serialising is idempotent: the launch point is wrapped once however often it is asked."""
    dt.pairwise_distance(torch.randn(4, 3), torch.randn(5, 3), backend="triton")
    cls, name = _common.interpreter_launch_point()
    first = getattr(cls, name)
    assert getattr(first, "_daal_serialised", False)
    _common.serialise_interpreter()
    assert getattr(cls, name) is first


def test_launch_count_counts_its_own_thread_only():
    """A counter counts the launches of the code in its thread: another thread's Triton launches,
    counted there or not, are neither charged to it nor make it drop its own thread's operators."""
    from daal_triton.launch_count import LaunchCount

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(24, 12, generator=gen)
    labels = torch.randint(0, 4, (24,), generator=gen)
    segments = dt.init_segments(4, 12, generator=gen)
    a, b = torch.randn(40, 16, generator=gen), torch.randn(40, 16, generator=gen)

    def counted_loss():
        with LaunchCount() as n:
            for _ in range(5):
                dt.daal_loss(x, labels, segments, backend="reference")
        return dict(n.triton), dict(n.ops)

    def counted_distances():
        with LaunchCount() as n:
            dt.pairwise_distance(a, b, backend="triton")
        return dict(n.triton), dict(n.ops)

    counted_loss(), counted_distances()  # first calls (the interpreter's set-up: operators of their own)
    alone = counted_loss()
    alone_distances = counted_distances()
    stop = threading.Event()
    other_counts: list = []

    def other(count: bool):
        while not stop.is_set():
            if count:
                other_counts.append(counted_distances())
            else:
                dt.pairwise_distance(a, b, backend="triton")

    for count in (False, True):
        worker = threading.Thread(target=other, args=(count,))
        worker.start()
        try:
            beside = [counted_loss() for _ in range(3)]
        finally:
            stop.set()
            worker.join()
            stop.clear()
        assert alone[0] == {} and alone_distances[0]
        assert all(c == alone for c in beside), f"another thread's launches changed this thread's counts ({count=})"
    assert other_counts and all(c == alone_distances for c in other_counts)


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=240)


def test_kernels_serialise_on_import_for_their_direct_callers():
    """``daal_triton.kernels`` serialise the interpreter's launches when imported: a caller of the
    launchers (no backend choice made) is covered too."""
    out = _run("""
        import daal_triton.kernels.pairwise
        from daal_triton.kernels._common import interpreter_launch_point
        cls, name = interpreter_launch_point()
        print(getattr(getattr(cls, name), "_daal_serialised", False))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork: POSIX only")
def test_a_child_forked_during_a_launch_can_launch():
    """A process forked while another of its threads holds the launch lock (a DataLoader worker
    forked beside a launching thread) gets a lock of its own: its first launch used to wait for ever."""
    out = _run("""
        import os, signal, threading, torch
        from daal_triton.kernels import _common
        from daal_triton.kernels.pairwise import pairwise_distance
        x = torch.randn(9, 4)
        expected = pairwise_distance(x, x)
        held, release = threading.Event(), threading.Event()
        def hold():
            with _common.INTERPRETER_LOCK:
                held.set()
                release.wait()
        t = threading.Thread(target=hold)
        t.start()
        held.wait()
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)
            os._exit(0 if torch.equal(pairwise_distance(x, x), expected) else 3)
        _, status = os.waitpid(pid, 0)
        release.set()
        t.join()
        print(os.waitstatus_to_exitcode(status))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0"], "the forked child's launch did not finish (alarm) or was wrong"


def test_launch_count_counts_launches_inside_another_namespaces_operator():
    """A custom operator the counter cannot open (not ``daal_triton::``) runs while the counter is
    off the dispatch stack: the Triton launches of its body still count."""
    import triton
    import triton.language as tl

    from daal_triton.launch_count import LaunchCount

    @triton.jit
    def _copy_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    @torch.library.custom_op("daal_threads_test::copy", mutates_args=())
    def copy(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        _copy_kernel[(1,)](x, y, BLOCK=16)
        return y

    x = torch.arange(16.0)
    with LaunchCount() as n:
        y = copy(x)
    assert torch.equal(y, x)
    assert dict(n.triton) == {"_copy_kernel": 1}
