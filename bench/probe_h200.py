"""Where the time goes, on a GPU: host cost per launch, and the kNN forward's epilogue.

The first H200 run (bench/results/2026-11-30-h200) measured the whole DAALLoss at B = 180 at
3.8 ms per forward + backward (25 launches: ~150 µs each, against ~20 µs of GPU time inside a
training step) and the kNN forward at ~25 µs per 128 x 128 tile (the MMA alone: ~2.5 µs, an estimate from the tile's FLOP at peak). This
script splits both:

* ``launch`` (after ``tiles``): host microseconds per call (a loop of calls, one synchronisation at
  the end) of an empty Triton kernel, of ``_knn_fwd_kernel`` on a tiny problem (its 20 arguments),
  of a PyTorch op, of ``daal_triton.knn``, and of DAALLoss forward / forward + backward at B = 180,
  C = 100, D = 512 (also with each ``DAAL_EAGER_OPS`` mode and each ``DAAL_LAUNCHES`` policy); and
  the same forward + backward replayed from a CUDA graph (GPU time alone).
* ``knn``: the selection kernel at M = N (bf16, D = 512, k = 8) against kernels that keep its
  GEMM and drop parts of its epilogue: ``gemm_min`` (tiles, s and one row-min per tile), and
  ``filter`` (+ the candidate filter ``s < worst`` and its row-min, no merge loop); the kernel
  at k = 1, 8 and 32 (until 2026-12-05 also with each merge, ``DAAL_KNN_MERGE``, since decided);
  the selection by a threshold (``DAAL_KNN_SELECT=threshold``: whole, and its sample's forward
  alone); plus ``torch.matmul``
  of the same shape; since 2026-12-04 these run the table's entry (comparable with the earlier
  runs), and the default narrow tiles' forward (64 x 128 through descriptors) is timed beside,
  with self pairs excluded under each epilogue (``DAAL_KNN_EPILOGUE``: lean, plain); and, on
  sm_90 once their GPU tests have passed in the run (tests/gpu_canary.py), the Gluon forwards
  (kernels/knn_gluon.py: the queries resident in shared memory; 64 and 128 rows) with self pairs
  excluded (and at the ring depths of ``knn_gluon.PROBE_STAGES``, each once its GPU test
  passed), and their GEMM-only ceilings (``GEMM_ONLY``: the distance epilogue and a row-min, the
  L2 bytes and rate).
* ``tiles`` (after ``knn``): ``gemm_min`` at the tile shapes of ``PROBE_TILES`` (the entry's 128 x 128,
  the wide 128 x 256 and 256 x 128 of the "tma" candidates, 64 x 128 on 4 warps), each with the
  bytes its tiles load from L2 (``tile_bytes``) and the rate that makes: does the forward's
  ceiling follow the L2 traffic per FLOP (docs/kernels.md, "Wider tiles")? With pointer loads,
  then (since 2026-12-04, where the GPU has TMA) through tensor descriptors: the narrow tiles'
  GEMM ceiling beside their forward's time (docs/kernels.md, "Narrow tiles through descriptors").
* ``host`` (after ``launch``, both before ``threshold``; since 2026-12-05's seventh session): where
  the host time of the B = 180 loss's forward + backward goes (1,966 µs on the H200's host in
  2026-12-04-h200-3, against 0.41 ms of glue and 79 µs of Triton's binder on a CPU,
  bench/probe_host.py): the functions with the most own time under ``cProfile`` (Python 3.12
  profiles every thread, so the backward's, which autograd runs on its device thread, is in it; an
  older Python sees the calling thread only, and says so), and the PyTorch operators with the most
  own CPU time under ``torch.profiler`` (every thread), µs per call (one synchronisation after
  the calls, as the loss is host-bound); and cProfile's own time summed by origin (Python in
  Triton, in PyTorch, in the package; the C calls each makes: Triton's launcher, the operators).
  Both profilers add their own cost: read the split, not the sum.
* ``threshold`` (after ``host``, recorded as section ``knn``): the selection by a threshold at
  60k rows with the filter's grid in waves of 2 and of 1 program per SM
  (``knn_threshold.PROGRAMS_PER_SM``) and with the filter on the other tiles of
  ``knn_threshold.FILTER_ALTERNATIVES`` (since 2026-12-05's fifth session), and at 20k with
  samples of 1/8 and 1/32 (``knn_threshold.PROBE_STRIDES``).
* ``pairwise`` (last, since 2026-12-05's seventh session): the benchmarks' large pairwise
  distance (4,096², D = 512, bf16) forward and forward + backward, in a loop, one call between
  CUDA events (as the benchmarks' rounds), and from a CUDA graph (``pairwise_split``: host- or
  GPU-bound?). Last because its kernels may compile here (the benchmarks' budget seldom reaches
  that shape).

Kernels no GPU had run before the check (the Gluon forwards, the selection by a threshold, on
half the tiles, and the filter's other tiles) are timed only once their GPU tests passed in the
run (tests/gpu_canary.py, since 2026-12-05's sixth session also the threshold's): a line "not
timed: ..." stands for them otherwise, so that a kernel that faults cannot take the lines after it.

usage: python bench/probe_h200.py OUT.jsonl [--n 20000] [--smoke]
(--smoke: tiny shapes (n = 140, D = 64) and few calls, for a CPU with TRITON_INTERPRET=1: a rehearsal.) One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from unittest import mock

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from daal_triton.kernels import _common, knn as kk
from daal_triton.kernels._common import TL_EPS, _dot_tile, dot_flags, row_sqnorms
from interpreter import strict_interpreter
from daal_triton.kernels import knn_gluon, knn_threshold
from problems import _unit_rows, _with_env, unvetted
from gpu_canary import filter_tiles_variant  # (tests/, on the path once problems is imported)
from tune_line_margin import Timer


@triton.jit
def _empty_kernel(x_ptr):
    pass


@triton.jit
def _probe_knn_kernel(q_ptr, r_ptr, q_desc, r_desc, qn_ptr, rn_ptr, out_ptr, M, N, D, cols_per_split,
                      stride_q_m, stride_r_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, FILTER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      ROUND_TF32: tl.constexpr, TMA: tl.constexpr = False):
    """``_knn_fwd_kernel``'s tile loop without its merge: ``s = max(qn + rn - 2 q.r, eps)`` per
    tile, then a running row-min of ``s`` (FILTER=False) or of ``where(s < worst, s, inf)`` with
    ``worst`` lowered to that min (FILTER=True: the candidate test the merge starts with).
    ``TMA``: the chunks arrive through the tensor descriptors, as in the forward's narrow and
    wide tiles (``q_desc``, ``r_desc``; else they are None and pointer loads run)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q_m
    qn = tl.load(qn_ptr + rows, mask=rmask, other=float("inf"))
    worst = tl.zeros([BLOCK_M], dtype=tl.float32) + float("inf")
    n_start = pid_s * cols_per_split
    n_end = tl.minimum(N, n_start + cols_per_split)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        acc = _dot_tile(q_rows, r_ptr, q_desc, r_desc, pid_m * BLOCK_M, n0, cols, rmask, cmask, D, stride_r_n,
                        BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, ROUND_TF32, TMA)
        rn = tl.load(rn_ptr + cols, mask=cmask, other=float("inf"))
        s = tl.maximum(qn[:, None] + rn[None, :] - 2.0 * acc, TL_EPS)
        if FILTER:
            sm = tl.where(s < worst[:, None], s, float("inf"))
            worst = tl.minimum(worst, tl.min(sm, axis=1) + 1.0)
        else:
            worst = tl.minimum(worst, tl.min(s, axis=1))
    tl.store(out_ptr + pid_s.to(tl.int64) * M + rows, worst, mask=rmask)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def host_us(fn, dev, n):
    """Host microseconds per call: n calls, one synchronisation at the end (after a warm-up)."""
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / n * 1e6


def gpu_ms(fn, dev, reps):
    """Median milliseconds per call (``tune_line_margin.Timer``: CUDA events on a GPU), after one
    warm-up call."""
    fn()
    _sync(dev)
    return Timer(dev)(fn, reps) * 1e3


def launch_section(dev, emit, n, reps, shape=(180, 100, 512)):
    import daal_triton as dt
    x = torch.zeros(16, device=dev)
    emit("launch", "empty triton kernel", host_us=host_us(lambda: _empty_kernel[(1,)](x), dev, n))
    emit("launch", "torch add_", host_us=host_us(lambda: x.add_(1.0), dev, n))
    q = torch.randn(16, 512, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    emit("launch", "_candidates (norms + _knn_fwd_kernel), M=N=16",
         host_us=host_us(lambda: kk._candidates(q, q, 8, None, None, True), dev, n))
    emit("launch", "daal_triton.knn (custom op), M=N=16",
         host_us=host_us(lambda: kk.knn(q, q, 8, exclude_self=True), dev, n))
    B, C, D = shape
    loss = dt.DAALLoss(C, D, backend="triton").to(dev)
    z = torch.randn(B, D, device=dev, requires_grad=True)
    y = torch.randint(0, C, (B,), device=dev)
    emit("launch", f"DAALLoss forward, B={B} C={C} D={D}", host_us=host_us(lambda: loss(z, y), dev, n // 4))

    def fb():  # the benchmark's work: fresh gradients every call, no accumulate-adds
        z.grad = loss.segments.grad = None
        loss(z, y).backward()
    emit("launch", f"DAALLoss forward+backward, B={B} C={C} D={D}", host_us=host_us(fb, dev, n // 4),
         gpu_ms=gpu_ms(fb, dev, reps))
    for mode in _common.EAGER_MODES:  # the custom operators' dispatch vs autograd.Functions (both ways)
        saved, _common.EAGER_OPS = _common.EAGER_OPS, mode
        try:
            emit("launch", f"DAALLoss forward+backward, B={B} C={C} D={D}, DAAL_EAGER_OPS={mode}",
                 host_us=host_us(fb, dev, n // 4))
        finally:
            _common.EAGER_OPS = saved
    for policy in _common.LAUNCH_POLICIES:  # merged launches vs one launch per kernel (both ways)
        emit("launch", f"DAALLoss forward+backward, B={B} C={C} D={D}, DAAL_LAUNCHES={policy}",
             host_us=host_us(lambda: _with_env(_common.LAUNCHES_ENV, policy, fb), dev, n // 4),
             gpu_ms=gpu_ms(lambda: _with_env(_common.LAUNCHES_ENV, policy, fb), dev, reps))
    graph = captured(fb, dev)
    if graph is not None:
        emit("launch", "DAALLoss forward+backward from a CUDA graph (replay)",
             host_us=host_us(graph.replay, dev, n // 4), gpu_ms=gpu_ms(graph.replay, dev, 2 * reps))


def captured(fn, dev):
    """``fn`` captured in a CUDA graph (after two warm-up calls on a side stream), or None off
    CUDA: its replay's time is the GPU's alone."""
    if dev.type != "cuda":
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def pairwise_split(dev, emit, n, reps, shape=(4096, 512)):
    """The benchmarks' large pairwise distance (M = N = 4,096, D = 512, bfloat16 on a GPU; float32
    in the interpreter) forward and forward + backward: host µs per call (a loop, one
    synchronisation), one call's time between CUDA events (as each of the benchmarks' rounds, it
    includes the host time of a host-bound call), and the GPU's own from a CUDA graph's replay.
    The benchmarks read it at 11–12% of matmul (251–265 µs forward, 2026-12-04); host or GPU, no
    run had split it (docs/kernels.md, "kNN and pairwise: issue 13, part 4")."""
    import daal_triton as dt
    M, D = shape
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = _unit_rows(M, D, dtype, dev).requires_grad_(True)  # the benchmarks' inputs
    y = _unit_rows(M, D, dtype, dev).requires_grad_(True)
    g = torch.randn(M, M, device=dev)

    def fwd():
        return dt.pairwise_distance(x, y)

    def fwdbwd():
        return torch.autograd.grad(dt.pairwise_distance(x, y), (x, y), g)
    what = f"pairwise_distance M=N={M} D={D} {str(dtype).replace('torch.', '')}"
    for name, fn in (("forward", fwd), ("forward+backward", fwdbwd)):
        emit("pairwise", f"{what}, {name}", host_us=host_us(fn, dev, n), gpu_ms=gpu_ms(fn, dev, reps))
        graph = captured(fn, dev)
        if graph is not None:
            emit("pairwise", f"{what}, {name} from a CUDA graph (replay)",
                 gpu_ms=gpu_ms(graph.replay, dev, 2 * reps))


#: How many functions / operators the ``host`` section lists, by own time.
HOST_TOP = 12


def _where(file: str, line: int, func: str) -> str:
    """A profile entry's name: the package- or library-relative file, or the builtin."""
    if file == "~":  # a builtin: cProfile's "<built-in method ...>"
        return func
    for marker in ("/daal_triton/", "/kernels/", "/reference/", "/bench/", "/tests/", "/site-packages/",
                   "/lib/python"):
        if marker in file:
            file = file[file.rindex(marker) + 1:]
            break
    return f"{file}:{line}({func})"


#: Where a profiled function's file lies, first match: Triton's, PyTorch's, this package's.
ORIGINS = (("Triton", ("/triton/",)), ("PyTorch", ("/torch/",)),
           ("daal_triton", ("/daal_triton/", "/kernels/", "/reference/")))


def _origin(file: str) -> str:
    return next((name for name, marks in ORIGINS if any(m in file for m in marks)), "other")


def host_profile_rows(fn, calls: int, top: int = HOST_TOP, after=None):
    """``fn`` called ``calls`` times under cProfile (after one unprofiled call; ``after()``, a
    synchronisation, once the profile ends and before the wall time is read): the ``top``
    functions by own time, as ``(name, calls per call, own µs per call, cumulative µs per call)``;
    all own time by origin, ``{origin: µs per call}`` (Python functions by their file: "Python in
    Triton", ...; a builtin's own time by its caller's file: "C called from Triton" takes Triton's
    launcher and the driver, "C called from daal_triton" the PyTorch operators the package calls,
    ...; :data:`ORIGINS`); and the profiled wall µs per call."""
    import cProfile
    import pstats

    fn()
    if after is not None:
        after()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    if after is not None:
        after()
    wall = (time.perf_counter() - t0) / calls * 1e6
    stats = pstats.Stats(prof).stats  # {(file, line, func): (prim calls, calls, own s, cumulative s, callers)}
    by_origin: dict = {}
    for (file, _, _), (_, _, tt, _, callers) in stats.items():
        if file != "~":
            key = f"Python in {_origin(file)}"
            by_origin[key] = by_origin.get(key, 0.0) + tt / calls * 1e6
            continue
        seen = 0.0
        for (cfile, _, _), caller in callers.items():  # {caller: (prim calls, calls, own s, cumulative s)}
            key = f"C called from {_origin(cfile) if cfile != '~' else 'C'}"
            by_origin[key] = by_origin.get(key, 0.0) + caller[2] / calls * 1e6
            seen += caller[2]
        if tt > seen:  # no caller recorded (the profiler's own disable(), at the top)
            rest = "C called from other"
            by_origin[rest] = by_origin.get(rest, 0.0) + (tt - seen) / calls * 1e6
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return ([(_where(*key), nc / calls, tt / calls * 1e6, ct / calls * 1e6)
             for key, (_, nc, tt, ct, _) in rows],
            dict(sorted(by_origin.items(), key=lambda kv: -kv[1])), wall)


def op_profile_rows(fn, calls: int, top: int = HOST_TOP, after=None):
    """``fn`` called ``calls`` times under ``torch.profiler`` (CPU activity: every thread's
    PyTorch operators; ``after()`` once after the calls, inside): the ``top`` operators by own
    CPU time, as ``(name, calls per call, own µs per call)``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if after is not None:
            after()
    avgs = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.count / calls, e.self_cpu_time_total / calls) for e in avgs]


def host_section(dev, emit, calls, shape=(180, 100, 512)):
    """The B = 180 loss's forward + backward under cProfile and under torch.profiler (see the
    module's docstring, ``host``)."""
    import daal_triton as dt
    B, C, D = shape
    loss = dt.DAALLoss(C, D, backend="triton").to(dev)
    z = torch.randn(B, D, device=dev, requires_grad=True)
    y = torch.randint(0, C, (B,), device=dev)

    def fb():  # no synchronisation inside: the host's own time (the GPU's is a quarter of it)
        z.grad = loss.segments.grad = None
        loss(z, y).backward()

    threads = ("every thread" if sys.version_info >= (3, 12) or dev.type != "cuda"
               else "the calling thread only (Python < 3.12: not the backward's autograd thread)")
    rows, by_origin, wall = host_profile_rows(fb, calls, after=lambda: _sync(dev))
    emit("host", f"DAALLoss forward+backward, B={B} C={C} D={D}, under cProfile ({threads})", host_us=wall)
    for origin, us in by_origin.items():
        emit("host", f"cProfile own time by origin: {origin}", host_us=us)
    for name, n, own, cum in rows:
        emit("host", f"cProfile own time: {name} ({n:g} calls, cumulative {cum:.0f} µs)",
             host_us=own, calls=n, cum_us=cum)
    for name, n, own in op_profile_rows(fb, calls, after=lambda: _sync(dev)):
        emit("host", f"torch.profiler own CPU time: {name} ({n:g} calls)", host_us=own, calls=n)


def _problem(dev, n, d, dtype=None):
    """The kNN sections' problem: ``n`` x ``d`` queries (the reference set too; ``dtype``, by
    default bf16 on a GPU and float32 in the interpreter), their squared norms, the dot flags,
    the FLOPs of the n x n distances and the forward's table entry for k = 8."""
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    q = torch.randn(n, d, device=dev, dtype=dtype)
    flags = dot_flags(dtype, device=dev)
    return (q, row_sqnorms(q, flags["INPUT_PRECISION"]), flags, 2.0 * n * n * d,
            kk.CONFIGS[kk.family(dtype)][kk.fwd_entry(8)])


#: The compile options a launch of the probe kernel passes on.
PROBE_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _probe_call(q, qn, flags, S, launch, filt, tma=False):
    """``(run, S)``: a call of ``_probe_knn_kernel`` over ``q``'s self distances with about ``S``
    column splits (rounded to whole BLOCK_N tiles, as the forward does) and ``launch``'s tiles;
    ``tma``: loaded through tensor descriptors."""
    # the forward's launch arguments that the probe kernel has (not the forward's own switches,
    # such as FLAT, which a GPU build would refuse), and the compile options
    launch = {k: v for k, v in launch.items() if k in _probe_knn_kernel.arg_names or k in PROBE_OPTIONS}
    n, bm, bn = q.shape[0], launch["BLOCK_M"], launch["BLOCK_N"]
    cols = triton.cdiv(triton.cdiv(n, S), bn) * bn
    S = triton.cdiv(n, cols)
    out = torch.empty(S, n, device=q.device)
    q_desc = r_desc = None
    if tma:
        q_desc = TensorDescriptor(q, list(q.shape), [q.stride(0), 1], [bm, launch["BLOCK_D"]])
        r_desc = TensorDescriptor(q, list(q.shape), [q.stride(0), 1], [bn, launch["BLOCK_D"]])

    def run():
        _probe_knn_kernel[(triton.cdiv(n, bm), S)](q, q, q_desc, r_desc, qn, qn, out, n, n, q.shape[1], cols,
                                                   q.stride(0), q.stride(0), FILTER=filt, TMA=tma, **flags,
                                                   **launch)
    return run, S


def _knn_rec(dev, emit, n, flops, cfg):
    """``rec(name, ms, **kw)``: one ``knn`` line, with TFLOP/s and microseconds per tile of the
    table entry ``cfg`` per SM."""
    tiles = triton.cdiv(n, cfg.blocks["BLOCK_M"]) * triton.cdiv(n, cfg.blocks["BLOCK_N"])

    def rec(name, ms, **kw):
        emit("knn", name, n=n, ms=ms, tflops=flops / ms / 1e9, us_per_tile_per_sm=None if dev.type != "cuda"
             else ms * 1e3 * torch.cuda.get_device_properties(dev).multi_processor_count / tiles, **kw)
    return rec


def knn_section(dev, emit, n, d, reps):
    q, qn, flags, flops, cfg = _problem(dev, n, d)
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    s_default = kk._num_splits(n, n, bm, bn, q.device)
    rec = _knn_rec(dev, emit, n, flops, cfg)

    # the table's entries (as the runs before 2026-12-04 probed them: comparable with theirs), then
    # the default narrow tiles where they apply (64 x 128 through descriptors: DAAL_KNN_TILES)
    for S in sorted({s_default, 1}):
        rec(f"_knn_fwd_kernel k=8 S={S}", gpu_ms(lambda: kk._candidates(q, q, 8, None, None, False, S,
                                                                        entry=kk.fwd_entry(8)), dev, reps),
            splits=S, blocks=[bm, bn, cfg.num_warps, cfg.num_stages])
    for kv in (1, 32):
        rec(f"_knn_fwd_kernel k={kv} S=default", gpu_ms(lambda: kk._candidates(q, q, kv, None, None, False,
                                                                               entry=kk.fwd_entry(kv)), dev, reps))
    # (the two merges, DAAL_KNN_MERGE, were timed side by side here until the runs decided them:
    # bench/README.md, "Switches decided")
    # the selection by a threshold (DAAL_KNN_SELECT=threshold; docs/kernels.md, "Selection by a
    # threshold"), self pairs excluded: the whole path, and its sample's bounds alone (1/16 of
    # the columns at k = 8, and the sample's own kNN), so the filter's and the selection's share
    # is their difference
    if knn_threshold.eligible(q, q, 8, False) and vetted(emit, "threshold"):
        rec("knn threshold k=8 self (sample, filter, selection)",
            gpu_ms(lambda: knn_threshold.select(q, q, 8, True), dev, reps))
        rec("knn threshold: the sample's bounds alone (k=8, 1/16 of the columns, + the sample's self-kNN)",
            gpu_ms(lambda: knn_threshold.sample_bounds(q, q, 8, True), dev, reps))
        # (its other sample strides and the 60k grids: the ``threshold`` section, after the tiles'
        # GEMM ceilings)
    if kk.forward_entry(q, q, 8, False) == kk.NARROW_ENTRY:
        nc = kk.CONFIGS[kk.family(q.dtype)][kk.NARROW_ENTRY]
        rec("_knn_fwd_kernel k=8 S=default narrow", gpu_ms(lambda: kk._candidates(q, q, 8, None, None, False),
                                                           dev, reps),
            splits=kk._num_splits(n, n, nc.blocks["BLOCK_M"], nc.blocks["BLOCK_N"], q.device),
            blocks=[nc.blocks["BLOCK_M"], nc.blocks["BLOCK_N"], nc.num_warps, nc.num_stages])
        # the two epilogues side by side, self pairs excluded as in the 60k benchmark
        # (DAAL_KNN_EPILOGUE; docs/kernels.md, "A leaner epilogue")
        for policy in kk.EPILOGUE_POLICIES:
            rec(f"_knn_fwd_kernel k=8 S=default narrow self epilogue={policy}",
                gpu_ms(lambda: _with_env(kk.EPILOGUE_ENV, policy, kk._candidates, q, q, 8, None, None, True),
                       dev, reps), epilogue=policy)
        # the Gluon forward (queries resident in shared memory; docs/kernels.md, "Queries resident
        # in shared memory"), self pairs excluded, and its GEMM-only ceiling: once vetted in this run
        # (each variant: 64 rows on 4 warps, 128 rows on 8)
        for name, v in knn_gluon.VARIANTS.items():
            if dev.type != "cuda" or not knn_gluon.eligible(q, q, 8) or not vetted(emit, name):
                continue
            S = kk._num_splits(n, n, v.block_m, knn_gluon.BLOCK_N, q.device)
            rec(f"_knn_fwd_gluon_kernel {name} k=8 S=default self", gpu_ms(
                lambda: knn_gluon.candidates(q, q, 8, None, None, True, S, variant=name), dev, reps), splits=S,
                stages=v.stages)
            for st in knn_gluon.PROBE_STAGES.get(name, ()):  # another ring depth (its GPU test passed)
                if vetted(emit, f"{name}-stages{st}"):
                    rec(f"_knn_fwd_gluon_kernel {name} stages={st} k=8 S=default self", gpu_ms(
                        lambda: knn_gluon.candidates(q, q, 8, None, None, True, S, variant=name, stages=st),
                        dev, reps), splits=S, stages=st)
            ms = gpu_ms(lambda: knn_gluon.candidates(q, q, 8, None, None, False, S, gemm_only=True, variant=name),
                        dev, reps)
            nbytes = tile_bytes(n, d, 0, knn_gluon.BLOCK_N, q.element_size(), v.block_m)
            rec(f"probe gemm_min {name} {v.block_m}x{knn_gluon.BLOCK_N}, {v.warps} warps, queries resident", ms,
                splits=S, l2_bytes=nbytes, l2_tb_per_s=nbytes / ms / 1e9)
    rec("knn (whole forward: selection + fused finish) k=8", gpu_ms(lambda: kk.knn(q, q, 8), dev, reps))
    for filt in (False, True):
        run, S = _probe_call(q, qn, flags, s_default, cfg.launch(d), filt)
        rec("probe " + ("filter" if filt else "gemm_min"), gpu_ms(run, dev, reps), splits=S)
    rec("torch.matmul q @ q.T", gpu_ms(lambda: q @ q.T, dev, reps))


#: The tile shapes of the ``tiles`` section: (BLOCK_M, BLOCK_N, num_warps); the first is the
#: forward's entry, the wide ones its "tma" candidates in ``kernels/knn.py``'s FWD_ALTERNATIVES,
#: 64 x 128 the default narrow tiles, and (since 2026-12-04's evening, last) 128 x 128 on one
#: warpgroup: the GEMM ceiling of the candidate the lean epilogue lets fit two programs per SM.
PROBE_TILES = ((128, 128, 8), (128, 256, 8), (256, 128, 8), (64, 128, 4), (128, 128, 4))


def tile_bytes(n: int, D: int, bm: int, bn: int, elem: int = 2, rows: int = 0) -> int:
    """Bytes the tiles of an n x n distance matrix load from L2 (each tile reads its BLOCK_M query
    rows and BLOCK_N reference rows, D elements each; nothing is kept across tiles):
    ``ceil(n/bm) ceil(n/bn) (bm + bn) D elem``, i.e. ``bm bn / (bm + bn)`` FLOP per byte.
    ``bm = 0`` and ``rows``: the queries kept resident (the Gluon forward), ``rows``-row tiles
    reading their BLOCK_N references alone (the queries' one load per program left out)."""
    if bm == 0:
        return triton.cdiv(n, rows) * triton.cdiv(n, bn) * bn * D * elem
    return triton.cdiv(n, bm) * triton.cdiv(n, bn) * (bm + bn) * D * elem


def tiles_section(dev, emit, n, d, reps):
    """``gemm_min`` (the forward's tiles and distance epilogue, a row-min instead of the merge)
    at several tile shapes: if its time follows the bytes the tiles load from L2 rather than
    the FLOPs, wider tiles lift the forward's ceiling (docs/kernels.md, "Wider tiles")."""
    q, qn, flags, flops, cfg = _problem(dev, n, d)
    # through descriptors too (since 2026-12-04: the default narrow tiles load so), where the
    # device has TMA or the interpreter emulates it
    tma_here = dev.type != "cuda" or kk.tma_device(dev)
    for tma in (False, True) if tma_here else (False,):
        for bm, bn, w in PROBE_TILES:
            # the knn section's launch arguments with the tile replaced: at 128 x 128 the same build
            launch = dict(cfg.launch(d), BLOCK_M=bm, BLOCK_N=bn, num_warps=w)
            run, S = _probe_call(q, qn, flags, kk._num_splits(n, n, bm, bn, q.device), launch, False, tma)
            ms = gpu_ms(run, dev, reps)
            nbytes = tile_bytes(n, d, bm, bn, q.element_size())
            emit("tiles", f"probe gemm_min {bm}x{bn}, {w} warps{', TMA loads' if tma else ''} "
                 f"({bm * bn / (bm + bn):.0f} FLOP per L2 byte)",
                 n=n, ms=ms, tflops=flops / ms / 1e9, splits=S, blocks=[bm, bn, w, 3], tma=tma,
                 l2_bytes=nbytes, l2_tb_per_s=nbytes / ms / 1e9)


def vetted(emit, variant: str) -> bool:
    """Whether ``variant`` (a kernel no GPU had run before this check) passed its GPU tests in
    this run, and none failed (tests/gpu_canary.py; True without a canary, as in a rehearsal);
    if not, a line saying why stands in the table for its lines."""
    why = unvetted(variant)
    if why:
        emit("knn", f"not timed: {why}", variant=variant)
    return why is None


def filter_tiles_name(blocks) -> str:
    """``"128x128 tiles, 8 warps, 3 stages, <= 128 registers"`` for a
    ``knn_threshold.FILTER_ALTERNATIVES`` key."""
    bm, bn, warps, stages, maxnreg = blocks
    return f"{bm}x{bn} tiles, {warps} warps, {stages} stages" + (f", <= {maxnreg} registers" if maxnreg else "")


def threshold_section(dev, emit, n, d, reps, dtype=None, n_grid=60000):
    """The selection by a threshold beyond the ``knn`` section's line (recorded as section
    ``knn``), after ``tiles``: each line JIT-builds another filter or needs 60k rows, and a probe
    cut short by its budget keeps the GEMM ceilings.

    1. At the 60k evaluation's shape (``n_grid`` rows), the filter's grid with waves of
       ``knn_threshold.PROGRAMS_PER_SM`` (2) programs per SM beside waves of 1 (the split count
       until 2026-12-05: S = 7 against 5 on an H200), which no GPU has timed; its time up to
       the end of its first two steps (the sample's bounds, the filter: ``select``'s ``until``),
       so the steps' shares are differences; then the filter on each of
       ``knn_threshold.FILTER_ALTERNATIVES``' tiles (its grid in waves of their programs per
       SM), with the share of rows whose neighbours are the default tiles' (``same_rows``:
       another tile shape sums the GEMM form in another order, so near-ties may swap). Before
       those, the filter on half the tiles (``DAAL_KNN_SELECT=half``) in both grids' waves, and
       up to its end.
    2. At ``n`` rows, samples of ``knn_threshold.PROBE_STRIDES`` (1/8 and 1/32) beside the
       ``knn`` section's 1/16: the sample's cost against the listing rounds (about k STRIDE
       entries per row), the model of docs/kernels.md's estimate.

    (``dtype``: float16 for a test in the interpreter, where bf16 dots cannot run.)"""
    q, _, _, flops, cfg = _problem(dev, n_grid, d, dtype)
    if not knn_threshold.eligible(q, q, 8, False) or not vetted(emit, "threshold"):
        return  # (every line runs the path's sample forward, filter and selection)
    rec = _knn_rec(dev, emit, n_grid, flops, cfg)
    last = []  # the last timed call's (dist, index)

    def call(half=False):
        last[:] = [knn_threshold.select(q, q, 8, True, half=half)]

    def attempt(what, time, **fields):
        """``(ms, same_rows)`` of ``time()``, or None after an error line naming ``what`` (a
        build no GPU has run: its failure is its line, and the others still run)."""
        try:
            ms = time()
            return ms, float((last[0][1] == want).all(dim=1).float().mean())
        except Exception:
            tb = traceback.format_exc()[-3000:]
            final = (tb.strip().splitlines() or [""])[-1]  # the line the report shows, with what failed
            emit("knn", "error", error=f"{tb}\n{what}: {final}", **fields)
            return None
    for per_sm in sorted({knn_threshold.PROGRAMS_PER_SM, 1}, reverse=True):
        S = knn_threshold.filter_splits(n_grid, n_grid, dev, per_sm)
        with mock.patch.object(knn_threshold, "PROGRAMS_PER_SM", per_sm):
            ms = gpu_ms(call, dev, reps)
        if per_sm == knn_threshold.PROGRAMS_PER_SM:
            want = last[0][1]  # the default tiles' neighbours
        rec(f"knn threshold k=8 self, the filter's grid in waves of {per_sm} program(s) per SM (S={S})", ms,
            splits=S, programs_per_sm=per_sm)
    # a self-search's filter on half the tiles (DAAL_KNN_SELECT=half), in both grids' waves
    half_waves = sorted({knn_threshold.PROGRAMS_PER_SM, 1}, reverse=True) if vetted(emit, "half") else []
    for per_sm in half_waves:
        S = knn_threshold.half_splits(n_grid, dev, per_sm)
        with mock.patch.object(knn_threshold, "PROGRAMS_PER_SM", per_sm):
            got = attempt("the filter on half the tiles", lambda: gpu_ms(lambda: call(True), dev, reps), half=True)
        if got:
            rec(f"knn threshold k=8 self, half the tiles, in waves of {per_sm} program(s) per SM ({S} runs "
                "per pair)", got[0], splits=S, programs_per_sm=per_sm, half=True, same_rows=got[1])
    # the time up to the end of each earlier step (the rest: the selection and the rescan)
    steps = [(False, step) for step in knn_threshold.STEPS[:-1]]
    if unvetted("half") is None:  # (its "not timed" line came with its grids')
        steps.append((True, "filter"))
    for half, step in steps:
        emit("knn", f"knn threshold k=8 self{', half the tiles' if half else ''}, its steps up to {step}",
             n=n_grid, until=step, half=half,
             ms=gpu_ms(lambda: knn_threshold.select(q, q, 8, True, until=step, half=half), dev, reps))
    for blocks, per_sm in knn_threshold.FILTER_ALTERNATIVES.items():
        if not vetted(emit, filter_tiles_variant(blocks)):
            continue
        with knn_threshold.filter_tiles(blocks):
            S = knn_threshold.filter_splits(n_grid, n_grid, dev)
            got = attempt(f"the filter on {filter_tiles_name(blocks)}", lambda: gpu_ms(call, dev, reps),
                          filter_blocks=list(blocks))
        if got:
            rec(f"knn threshold k=8 self, the filter on {filter_tiles_name(blocks)} ({per_sm} per SM, S={S})",
                got[0], splits=S, programs_per_sm=per_sm, filter_blocks=list(blocks), same_rows=got[1])
    del want, last, q
    q, _, _, flops, cfg = _problem(dev, n, d, dtype)
    if not knn_threshold.eligible(q, q, 8, False):
        return
    rec = _knn_rec(dev, emit, n, flops, cfg)
    for stride in knn_threshold.PROBE_STRIDES:
        with knn_threshold.sampled_every(stride):
            rec(f"knn threshold k=8 self, a 1/{stride} sample",
                gpu_ms(lambda: knn_threshold.select(q, q, 8, True), dev, reps), stride=stride)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    strict_interpreter()  # a rehearsal on the CPU refuses the launches a GPU would refuse
    n = 140 if args.smoke else args.n
    d = 64 if args.smoke else 512  # the interpreter's time grows with D; the code path does not
    calls = 4 if args.smoke else 400
    reps = 2 if args.smoke else 20
    t0 = time.perf_counter()
    with open(args.out, "a") as f:
        def emit(section, name, **kw):  # t_s: seconds since the start (JIT builds included)
            line = dict(section=section, name=name, t_s=round(time.perf_counter() - t0, 1), device=str(dev),
                        gpu=torch.cuda.get_device_name(0) if dev.type == "cuda" else None,
                        torch=torch.__version__, triton=triton.__version__, **kw)
            print(json.dumps(line), flush=True)
            f.write(json.dumps(line) + "\n")
            f.flush()
        for section, fn in (("knn", lambda: knn_section(dev, emit, n, d, 2 if args.smoke else 10)),
                            ("tiles", lambda: tiles_section(dev, emit, n, d, 2 if args.smoke else 10)),
                            # the two cheap host sections before the threshold's kernels, which no GPU
                            # has run (a fault there ends the process's CUDA context) nor timed
                            ("launch", lambda: launch_section(dev, emit, calls, reps, (37, 11, 33) if args.smoke else (180, 100, 512))),
                            ("host", lambda: host_section(dev, emit, 2 if args.smoke else 100,
                                                          (37, 11, 33) if args.smoke else (180, 100, 512))),
                            ("threshold", lambda: threshold_section(dev, emit, n, d, 2 if args.smoke else 10,
                                                                    n_grid=n if args.smoke else 60000)),
                            # last: its kernels are compiled here unless the benchmarks reached them
                            ("pairwise", lambda: pairwise_split(dev, emit, calls // 4, reps,
                                                                (64, 32) if args.smoke else (4096, 512)))):
            try:
                fn()
            except Exception:
                emit(section, "error", error=traceback.format_exc()[-3000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
