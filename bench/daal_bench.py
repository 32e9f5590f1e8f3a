"""The machinery of the DAAL benchmarks (imported by ``bench/conftest.py`` and the ``test_bench_*`` files).

One benchmark case is one (operator, shape, precision, provider, pass):

* operators: ``pairwise`` (pairwise distance), ``knn`` (k nearest neighbours), ``line_margin``
  (the fused adaptive line margin), ``loss`` (the whole ``DAALLoss``);
* providers: ``triton`` (``daal_triton.kernels.*``; for ``loss`` ``DAALLoss(backend="triton")``),
  ``eager`` (``daal_triton.reference.*``; ``DAALLoss(backend="reference")``), ``compile``
  (``torch.compile`` of the reference function) and, for kNN only, ``chunked`` (row chunks of
  ``torch.cdist`` + ``torch.topk``, the usual hand-written baseline);
* passes: ``fwd`` (the forward with autograd recording, as in training; kNN retrieval
  evaluation runs under ``no_grad``), ``bwd`` (the backward alone: a fresh forward is built
  outside the timed region of every round) and ``fwdbwd``.

Profiles: ``smoke`` (no CUDA: tiny shapes, float32, Triton's interpreter, one round; so the
files cannot rot), ``check`` (the subset ``bench/gpu_check.sh`` runs within its budget: every
target of the issue plus one representative per operator) and ``full`` (every combination).

Every case writes one JSON record (``--bench-records``) whatever happens to it: measured,
skipped (would not fit in memory, too slow, out of the time budget, kernel missing) or failed.
``bench/report.py`` builds the tables from those records. Nothing here imports triton at import
time: ``TRITON_INTERPRET`` must be settled first (``bench/conftest.py``).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch

GiB = 1024 ** 3
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PASSES = ("fwd", "bwd", "fwdbwd")
PROFILES = ("smoke", "check", "full")
PROVIDERS = {
    "pairwise": ("triton", "eager", "compile"),
    "knn": ("triton", "eager", "compile", "chunked"),
    "line_margin": ("triton", "eager", "compile"),
    "loss": ("triton", "eager", "compile"),
}
# The Triton modules each operator's Triton provider needs.
KERNEL_MODULES = {
    "pairwise": ("pairwise",),
    "knn": ("knn",),
    "line_margin": ("line_margin",),
    "loss": ("knn", "line_margin"),
}

# ----------------------------------------------------------------------------- shapes
# kNN: ``labels`` = number of classes drawn for same-class search (None: any neighbour);
# ``self`` = query and reference are the same set (exclude_self=True); ``grad`` = differentiable use.
SHAPES: Dict[str, Dict[str, dict]] = {
    "pairwise": {
        "dml": dict(M=180, N=180, D=512),
        "large": dict(M=4096, N=4096, D=512),
        "bank": dict(M=1024, N=65536, D=512),
    },
    "knn": {
        "dml": dict(M=180, N=180, D=512, k=3, labels=100, self=True, grad=True),
        "bank": dict(M=1024, N=65536, D=512, k=8, labels=None, self=False, grad=True),
        "eval60k": dict(M=60000, N=60000, D=512, k=8, labels=None, self=True, grad=False),
    },
    "line_margin": {
        "dml": dict(B=180, C=100, D=512),
        "large": dict(B=4096, C=1000, D=512),
        "classes11k": dict(B=1024, C=11318, D=512),
        "classes100k": dict(B=1024, C=100000, D=512),
    },
    "loss": {
        "dml": dict(B=180, C=100, D=512),
        "large": dict(B=4096, C=1000, D=512),
        "classes11k": dict(B=1024, C=11318, D=512),
        "classes100k": dict(B=1024, C=100000, D=512),
    },
}
SMOKE_SHAPES: Dict[str, Dict[str, dict]] = {
    "pairwise": {"tiny": dict(M=8, N=12, D=16)},
    "knn": {"tiny": dict(M=32, N=40, D=16, k=3, labels=5, self=False, grad=True)},
    "line_margin": {"tiny": dict(B=8, C=5, D=16)},
    "loss": {"tiny": dict(B=8, C=5, D=16)},
}
# The whole loss computes in float32 whatever the embeddings' dtype (SPEC step 1: "at least
# float32"), so it is benchmarked in float32 only. The operators in bfloat16 and float32 (TF32).
OP_DTYPES = {"pairwise": ("bf16", "fp32"), "knn": ("bf16", "fp32"),
             "line_margin": ("bf16", "fp32"), "loss": ("fp32",)}

# The targets (H200). ``bench/report.py`` evaluates them; these flags order the cases
# (targets run first, so a run cut short by its time budget still has them).
TARGETS = {("knn", "eval60k", "bf16"), ("line_margin", "classes100k", "bf16"), ("loss", "dml", "fp32")}

# What ``bench/gpu_check.sh`` runs (profile "check"): (op, shape) -> dtypes, providers, passes.
_ALL = ("triton", "eager", "compile", "chunked")
CHECK: Dict[Tuple[str, str], List[dict]] = {
    ("knn", "eval60k"): [dict(dtypes=("bf16",), providers=("triton", "chunked", "eager"))],
    ("line_margin", "classes100k"): [
        dict(dtypes=("bf16",), providers=("triton", "eager", "compile")),
        dict(dtypes=("fp32",), providers=("triton", "eager"))],
    ("loss", "dml"): [dict(dtypes=("fp32",), providers=("triton", "eager"))],
    ("knn", "bank"): [dict(dtypes=("bf16",), providers=("triton", "chunked", "eager"),
                           passes=("fwd", "fwdbwd"))],
    ("pairwise", "large"): [dict(dtypes=("bf16", "fp32"), providers=("triton", "eager"))],
    ("line_margin", "dml"): [dict(dtypes=("bf16",), providers=("triton", "eager"))],
    ("line_margin", "large"): [dict(dtypes=("bf16",), providers=("triton", "eager"), passes=("fwdbwd",))],
    ("line_margin", "classes11k"): [dict(dtypes=("bf16",), providers=("triton", "eager"), passes=("fwdbwd",))],
    ("loss", "classes100k"): [dict(dtypes=("fp32",), providers=("triton", "eager"), passes=("fwdbwd",))],
}

CPU_COMPILE_REASON = ("torch.compile provider not run in the CPU smoke mode: inductor's C++ "
                      "compilation takes ~20 s per graph on 2 cores (it runs on the GPU; "
                      "--bench-compile-on-cpu forces it)")


def passes_for(op: str, dims: dict) -> Tuple[str, ...]:
    if op == "knn" and not dims.get("grad", True):
        return ("fwd",)
    return PASSES


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    dims_items: Tuple[Tuple[str, object], ...]
    dtype: str
    provider: str
    pass_: str
    target: bool = False
    static_skip: str = ""

    @property
    def dims(self) -> dict:
        return dict(self.dims_items)

    @property
    def id(self) -> str:
        return f"{self.shape}-{self.dtype}-{self.provider}-{self.pass_}"

    @property
    def group(self) -> str:
        return f"{self.op} {self.shape} {self.dtype} {self.pass_}"

    def describe(self) -> dict:
        return dict(op=self.op, shape=self.shape, dims=self.dims, dtype=self.dtype,
                    provider=self.provider, pass_=self.pass_, target=self.target)


def cases(op: str, profile: str, *, compile_on_cpu: bool = False) -> List[Case]:
    """The cases of operator ``op`` in ``profile`` (``smoke``, ``check`` or ``full``), targets first."""
    out: List[Case] = []
    if profile == "smoke":
        for shape, dims in SMOKE_SHAPES[op].items():
            for provider in PROVIDERS[op]:
                passes = passes_for(op, dims)
                if provider == "compile":
                    passes = passes[:1]  # one compile case per operator, forward only
                for p in passes:
                    skip = CPU_COMPILE_REASON if provider == "compile" and not compile_on_cpu else ""
                    out.append(Case(op, shape, tuple(dims.items()), "fp32", provider, p, False, skip))
        return out
    for shape, dims in SHAPES[op].items():
        if profile == "check":
            specs = CHECK.get((op, shape), [])
        else:
            specs = [dict(dtypes=OP_DTYPES[op], providers=PROVIDERS[op])]
        for spec in specs:
            for dtype in spec["dtypes"]:
                for provider in spec["providers"]:
                    for p in spec.get("passes", passes_for(op, dims)):
                        if p not in passes_for(op, dims):
                            continue
                        out.append(Case(op, shape, tuple(dims.items()), dtype, provider, p,
                                        (op, shape, dtype) in TARGETS))
    out.sort(key=order_key)
    return out


HEAVY_BYTES = 32 * GiB


def order_key(case: "Case"):
    """Run order: the targets first, and last of all the heavy cases (an estimated peak over
    32 GiB: the eager kNN of 60k x 60k, needed by no target), so that a run cut short by its
    time budget still has the targets. (Stable sorts keep the table order otherwise.)"""
    return (estimate_bytes(case) > HEAVY_BYTES, not case.target)


# ----------------------------------------------------------------------------- FLOPs
def flops(op: str, dims: dict, pass_: str) -> Optional[float]:
    """Useful floating-point operations of one call (the issue's counts; None where the pass
    has no GEMM worth counting)."""
    if op == "pairwise":
        mnd = dims["M"] * dims["N"] * dims["D"]
        return {"fwd": 2.0, "bwd": 4.0, "fwdbwd": 6.0}[pass_] * mnd
    if op == "knn":
        mnd = dims["M"] * dims["N"] * dims["D"]
        return {"fwd": 2.0 * mnd, "bwd": None, "fwdbwd": 2.0 * mnd}[pass_]
    bcd = dims["B"] * dims["C"] * dims["D"]
    line = {"fwd": 4.0, "bwd": 12.0, "fwdbwd": 16.0}[pass_] * bcd
    if op == "line_margin":
        return line
    knn_part = 2.0 * dims["B"] * dims["B"] * dims["D"]  # the in-batch kNN of the loss
    return line + (knn_part if pass_ != "bwd" else 0.0)


def gemm_shape(op: str, dims: dict, max_out: int = 1 << 28) -> Tuple[int, int, int]:
    """The comparable GEMM (M, N, K) for the matmul baseline: the operator's own GEMM, with the
    rows cut so that the output stays under ``max_out`` elements (1 GB in float32; throughput
    saturates long before: 60k x 60k is measured as 4,473 x 60,000 x 512)."""
    if op in ("pairwise", "knn"):
        m, n, k = dims["M"], dims["N"], dims["D"]
    else:
        m, n, k = dims["B"], dims["C"], dims["D"]
    n = min(n, max_out)
    m = min(m, max(1, max_out // n))
    return m, n, k


# ----------------------------------------------------------------------------- memory estimates
def knn_chunk_rows(n_ref: int, elems: int = 1 << 28) -> int:
    """Rows per chunk of the chunked cdist+topk baseline: about 2^28 distances per chunk."""
    return max(1, elems // max(1, n_ref))


def estimate_bytes(case: Case) -> int:
    """A rough upper estimate of the peak extra memory of a case (beyond its inputs), from the
    shape alone, to decide beforehand whether a provider can fit (not a measurement)."""
    d = case.dims
    es = 2 if case.dtype == "bf16" else 4
    prov, op = case.provider, case.op
    if op == "pairwise":
        mn = d["M"] * d["N"]
        per = {"triton": 8, "eager": 24, "compile": 12}[prov]
        return per * mn + 4 * mn  # + the M x N upstream gradient of the bwd passes
    if op == "knn":
        mn = d["M"] * d["N"]
        if prov == "triton":
            return 16 * d["M"] * d["k"] + (64 << 20)
        if prov == "chunked":
            rows = min(d["M"], knn_chunk_rows(d["N"]))
            return rows * d["N"] * (3 * es + 8) + (d["M"] + d["N"]) * d["D"] * 4
        # eager reference: float32 d, -2xy temporaries, bool mask, masked copy, stable sort
        # (values + int64 indices + its workspace): ~34 bytes per pair; compile keeps ~20.
        return (34 if prov == "eager" else 20) * mn
    bc = d["B"] * d["C"]
    if prov == "triton":
        line = 64 * d["B"] * d["D"] * 4 + 16 * d["C"] * d["D"] + (64 << 20)
    elif prov == "eager":
        line = 80 * bc  # ~15 float32 B x C temporaries kept for backward + an int64 one-hot
    else:
        line = 24 * bc
    if op == "line_margin":
        return line
    knn_part = 40 * d["B"] * d["B"] if prov != "triton" else 0
    return line + knn_part + 8 * d["C"] * d["D"] * es


def input_bytes(tensors) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)))


# ----------------------------------------------------------------------------- providers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BenchCaseError(RuntimeError):
    """A benchmark case failed (the message carries the original error and its traceback)."""


class KernelMissing(Exception):
    """The Triton kernel module of a provider cannot be imported (yet)."""


def import_kernel(name: str):
    import importlib

    try:
        return importlib.import_module(f"daal_triton.kernels.{name}")
    except Exception as exc:  # ImportError, or an error inside the module
        raise KernelMissing(f"daal_triton.kernels.{name} cannot be imported: "
                            f"{type(exc).__name__}: {exc}") from exc


def chunked_knn(query: torch.Tensor, ref: torch.Tensor, k: int, *, query_labels=None,
                ref_labels=None, exclude_self: bool = False, chunk_rows: Optional[int] = None):
    """The hand-written baseline: ``torch.cdist`` (matmul form, in the inputs' dtype) on row
    chunks of the query, masked, then ``torch.topk`` (smallest). Never holds more than
    ``chunk_rows x N`` distances. Differentiable w.r.t. ``query`` and ``ref`` (through cdist)."""
    m, n = query.shape[0], ref.shape[0]
    rows = chunk_rows or knn_chunk_rows(n)
    kk = min(k, n)
    dists, idxs = [], []
    for s in range(0, m, rows):
        e = min(m, s + rows)
        d = torch.cdist(query[s:e], ref, compute_mode="use_mm_for_euclid_dist")
        mask = None
        if query_labels is not None:
            mask = query_labels[s:e, None] != ref_labels[None, :]
        if exclude_self and s < n:
            r = torch.arange(s, min(e, n), device=query.device)
            eye = torch.zeros(e - s, n, dtype=torch.bool, device=query.device)
            eye[r - s, r] = True
            mask = eye if mask is None else (mask | eye)
        if mask is not None:
            d = d.masked_fill(mask, float("inf"))
        v, i = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        dists.append(v)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def set_compile_limits() -> None:
    """Raise dynamo's recompilation limits: every benchmark shape is a new specialisation, and
    hitting the default limit (8) would silently fall back to eager. Both old and new names."""
    try:
        import torch._dynamo as dynamo
    except Exception:
        return
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(256, getattr(dynamo.config, name)))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(4096, getattr(dynamo.config, name)))


_COMPILED: Dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """One ``torch.compile`` wrapper per reference function for the whole session."""
    if name not in _COMPILED:
        set_compile_limits()
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def make_labels(n: int, num_classes: int, device, per_class: int = 4) -> torch.Tensor:
    """Labels as an m-per-class sampler draws them: ``n / per_class`` random classes (at most
    ``num_classes``), ``per_class`` samples each, shuffled."""
    present = max(1, min(num_classes, n // per_class))
    classes = torch.randperm(num_classes, device="cpu")[:present]
    lab = classes[torch.arange(n) % present]
    return lab[torch.randperm(n)].to(device)


@dataclass
class Problem:
    """Inputs and the forward of one case; ``forward()`` returns the tensor the backward starts
    from (a scalar for the loss)."""

    forward: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]  # tensors whose .grad the backward fills (reset every round)
    grad_out: Optional[torch.Tensor]  # None: a scalar output
    inputs: List[torch.Tensor] = field(default_factory=list)
    no_grad: bool = False  # inference use: forward under torch.no_grad()
    notes: str = ""


def _unit_rows(n: int, d: int, dtype, device) -> torch.Tensor:
    x = torch.randn(n, d, device=device, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def build_problem(case: Case, device: torch.device) -> Problem:
    from daal_triton import reference

    d = case.dims
    dtype = DTYPES[case.dtype]
    prov = case.provider
    torch.manual_seed(0)

    if case.op == "pairwise":
        x = _unit_rows(d["M"], d["D"], dtype, device).requires_grad_(True)
        y = _unit_rows(d["N"], d["D"], dtype, device).requires_grad_(True)
        if prov == "triton":
            fn = import_kernel("pairwise").pairwise_distance
        elif prov == "eager":
            fn = reference.pairwise_distance
        else:
            fn = compiled("pairwise", reference.pairwise_distance)
        g = torch.randn(d["M"], d["N"], device=device, dtype=torch.float32)
        return Problem(lambda: fn(x, y), [x, y], g, [x, y])

    if case.op == "knn":
        k = d["k"]
        q = _unit_rows(d["M"], d["D"], dtype, device)
        r = q if d["self"] else _unit_rows(d["N"], d["D"], dtype, device)
        infer = not d.get("grad", True)
        if not infer:
            q.requires_grad_(True)
        kw = dict(exclude_self=bool(d["self"]))
        if d.get("labels"):
            lab = make_labels(d["M"], d["labels"], device)
            kw.update(query_labels=lab, ref_labels=lab if d["self"] else make_labels(d["N"], d["labels"], device))
        if prov == "triton":
            fn = import_kernel("knn").knn
        elif prov == "eager":
            fn = reference.knn
        elif prov == "compile":
            fn = compiled("knn", reference.knn)
        else:
            fn = chunked_knn
        g = torch.randn(d["M"], k, device=device, dtype=torch.float32)
        leaves = [] if infer else [q]
        return Problem(lambda: fn(q, r, k, **kw)[0], leaves, g, [q, r], no_grad=infer,
                       notes="chunked: torch.cdist(use_mm) in the input dtype + topk, "
                             f"{knn_chunk_rows(d['N'])} rows per chunk" if prov == "chunked" else "")

    # line_margin and loss
    from daal_triton import DAALLoss, init_segments

    B, C, D = d["B"], d["C"], d["D"]
    labels = make_labels(B, C, device)
    if case.op == "line_margin":
        x = _unit_rows(B, D, dtype, device).requires_grad_(True)
        seg = init_segments(C, D).to(device=device, dtype=dtype).requires_grad_(True)
        margins = (0.05 + 0.3 * torch.rand(B, device=device)).float()
        kw = dict(alpha=16.0, lambda_pull=0.0)
        if prov == "triton":
            fn = import_kernel("line_margin").line_margin
        elif prov == "eager":
            fn = reference.line_margin
        else:
            fn = compiled("line_margin", reference.line_margin)
        g = torch.randn(B, device=device, dtype=torch.float32)
        return Problem(lambda: fn(x, labels, seg, margins, **kw), [x, seg], g, [x, seg, margins])

    # the whole loss: the module as users call it (validation included) for triton and eager;
    # torch.compile of the reference function for compile.
    emb = torch.randn(B, D, device=device, dtype=dtype).requires_grad_(True)
    if prov == "compile":
        seg = init_segments(C, D).to(device=device, dtype=dtype).requires_grad_(True)
        fn = compiled("loss", reference.daal_loss)
        return Problem(lambda: fn(emb, labels, seg), [emb, seg], None, [emb, seg],
                       notes="torch.compile(daal_triton.reference.daal_loss): no input validation")
    if prov == "triton":
        for name in KERNEL_MODULES["loss"]:
            import_kernel(name)
    module = DAALLoss(C, D, backend="triton" if prov == "triton" else "reference").to(device=device, dtype=dtype)
    return Problem(lambda: module(emb, labels), [emb, module.segments], None,
                   [emb, module.segments], notes="DAALLoss module (validation included)")


# ----------------------------------------------------------------------------- one pass
def pass_callables(problem: Problem, pass_: str, device: torch.device):
    """``(setup, fn)`` for ``benchmark.pedantic``: ``setup`` builds what the round needs outside
    the timed region and ends with a device synchronisation; ``fn`` is the timed work."""

    def reset():
        for t in problem.leaves:
            t.grad = None

    def run_forward():
        ctx = torch.no_grad() if problem.no_grad else contextlib.nullcontext()
        with ctx:
            return problem.forward()

    def backward(out):
        if problem.grad_out is None:
            out.backward()
        else:
            out.backward(problem.grad_out)

    if pass_ == "fwd":
        def setup():
            reset()
            _sync(device)

        def fn():
            return run_forward()
    elif pass_ == "bwd":
        def setup():
            reset()
            out = run_forward()
            _sync(device)
            return (out,), {}

        def fn(out):
            backward(out)
            return out
    else:
        def setup():
            reset()
            _sync(device)

        def fn():
            out = run_forward()
            backward(out)
            return out
    return setup, fn


def call_once(setup, fn, device) -> Tuple[float, torch.Tensor]:
    made = setup()
    args = made[0] if made else ()
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - t0, out


def peak_extra(setup, fn, device) -> Optional[int]:
    """Peak memory of one call above what was allocated when it started (inputs, and for the
    bwd pass the saved forward), from ``torch.cuda.max_memory_allocated``."""
    if device.type != "cuda":
        return None
    made = setup()
    args = made[0] if made else ()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(*args)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, args, made
    return int(peak)


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


# ----------------------------------------------------------------------------- matmul baseline
_MATMUL: Dict[Tuple[str, int, int, int], float] = {}


def matmul_flops_per_s(dtype: str, m: int, n: int, k: int, device: torch.device,
                       record: Optional[Callable[[dict], None]] = None) -> Optional[float]:
    """``torch.matmul`` throughput (FLOP/s) of an (m x k) @ (k x n) GEMM in ``dtype`` on
    ``device``, measured once per session and cached (best of 3 batches, CUDA events)."""
    key = (dtype, m, n, k)
    if key in _MATMUL:
        return _MATMUL[key]
    dt = DTYPES[dtype]
    try:
        a = torch.randn(m, k, device=device, dtype=torch.float32).to(dt)
        b = torch.randn(k, n, device=device, dtype=torch.float32).to(dt)
        torch.matmul(a, b)
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
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


# ----------------------------------------------------------------------------- environment
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
    )
    try:
        import importlib.metadata as md

        env["triton"] = md.version("triton")
    except Exception:  # noqa: BLE001
        env["triton"] = None
    try:
        import importlib.metadata as md

        env["pytest_benchmark"] = md.version("pytest-benchmark")
    except Exception:  # noqa: BLE001
        env["pytest_benchmark"] = None
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


# ----------------------------------------------------------------------------- the runner
# Per profile: seconds of timed rounds per case, min/max rounds, the longest acceptable call.
TIMING = {
    "smoke": dict(budget_s=0.0, min_rounds=1, max_rounds=1, max_call_s=float("inf")),
    "check": dict(budget_s=0.3, min_rounds=3, max_rounds=30, max_call_s=20.0),
    "full": dict(budget_s=1.0, min_rounds=5, max_rounds=100, max_call_s=120.0),
}


class TF32:
    """TF32 for float32 matmuls inside a benchmark (the Triton kernels use TF32 dots for
    float32 on a GPU; the eager and compiled references and the matmul baseline get the same),
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


def run_case(case: Case, benchmark, st) -> dict:
    """Measure one case with pytest-benchmark's ``benchmark`` fixture and record it (``st``: the
    session's state: device, profile, timing, recorder, deadline). What cannot or should not
    run is recorded and skipped (``pytest.skip``) with the reason; failures are recorded, then
    raised."""
    with TF32(st.device):
        return _run_case(case, benchmark, st)


def _run_case(case: Case, benchmark, st) -> dict:
    device = st.device
    base = dict(kind="case", id=f"{case.op}-{case.id}", profile=st.profile, **case.describe())
    try:
        benchmark.group = case.group
    except Exception:  # noqa: BLE001 - older/newer pytest-benchmark
        pass
    benchmark.extra_info.update(base)

    def finish(status, **kw):
        rec = dict(base, status=status, **kw)
        st.recorder(rec)
        return rec

    def skip(status, **kw):
        finish(status, **kw)
        pytest.skip(status)

    if case.static_skip:
        skip("skipped: " + case.static_skip)
    remaining = st.remaining()
    need = 60.0 if case.provider == "compile" else 5.0
    if remaining is not None and remaining < need:
        skip(f"skipped: out of time budget ({max(remaining, 0):.0f} s left, this provider needs ~{need:.0f} s)")
    est = estimate_bytes(case)
    cleanup(device)
    free = free_bytes(device)
    if free is not None and est > 0.85 * free:
        cleanup(device, collect=True)
        free = free_bytes(device)
    if free is not None and est > 0.85 * free:
        skip(f"skipped: would need ~{est / GiB:.1f} GiB (estimated from the shape), "
             f"{free / GiB:.1f} GiB free", est_bytes=est, free_bytes=free)

    timing = st.timing
    smoke = st.profile == "smoke"
    problem = None
    notes = ""
    warm, peak = [], None
    times = []
    last = {}
    failure = None
    setup = fn = None
    try:
        try:
            problem = build_problem(case, device)
        except KernelMissing as exc:
            skip(f"skipped: Triton kernel not available: {exc}")
        notes = problem.notes
        setup, fn = pass_callables(problem, case.pass_, device)
        in_bytes = input_bytes(problem.inputs)
        if not smoke:
            t, out = call_once(setup, fn, device)  # compiles (Triton JIT, torch.compile)
            warm.append(t)
            del out
            if st.remaining() is not None and st.remaining() < 2 * t:
                skip(f"skipped: out of time budget after the first call ({t:.2f} s)", warmup_s=warm)
            t, out = call_once(setup, fn, device)
            warm.append(t)
            del out
            if t > timing["max_call_s"]:
                skip(f"too slow: one call takes {t:.1f} s (limit {timing['max_call_s']:.0f} s "
                     f"per call in the '{st.profile}' profile)", warmup_s=warm)
            peak = peak_extra(setup, fn, device)
        per_call = min(warm) if warm else 0.0
        rounds = timing["min_rounds"]
        if per_call > 0:
            rounds = int(min(timing["max_rounds"], max(timing["min_rounds"], timing["budget_s"] / per_call)))
            left = st.remaining()
            if left is not None:
                rounds = max(1, min(rounds, int((left - 3.0) / per_call)))

        def timed(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            _sync(device)
            times.append(time.perf_counter() - t0)
            last["out"] = out

        benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
        out = last.pop("out", None)
        if isinstance(out, torch.Tensor) and torch.isnan(out.detach()).any():
            raise AssertionError(f"{case.op} {case.provider} {case.pass_}: NaN in the output")
        del out
    except Exception as exc:  # noqa: BLE001
        # Only strings leave this block: the exception's traceback holds the frames (and the
        # tensors) of the failed call, which must not outlive it (pytest keeps the last one).
        failure = ("oom" if is_oom(exc) else "error", short_error(exc), format_tb(exc))
    finally:
        problem = setup = fn = None
        last.clear()
        cleanup(device)
    if failure is not None:
        cleanup(device, collect=True)
        kind, msg, tb = failure
        if kind == "oom":
            skip(f"skipped: out of memory ({msg[:200]})", est_bytes=est, free_bytes=free)
        finish("error: " + msg, traceback=tb)
        raise BenchCaseError(f"{case.op} {case.id}: {msg}\n{tb}")

    times_sorted = sorted(times)
    n = len(times)
    median = (times_sorted[(n - 1) // 2] + times_sorted[n // 2]) / 2 if n else None
    mean = sum(times) / n if n else None
    stdev = (sum((t - mean) ** 2 for t in times) / (n - 1)) ** 0.5 if n > 1 else 0.0
    fl = flops(case.op, case.dims, case.pass_)
    gm, gn, gk = gemm_shape(case.op, case.dims)
    mm = matmul_flops_per_s(case.dtype, gm, gn, gk, device, st.recorder) if not smoke else None
    achieved = fl / median if (fl and median) else None
    extra = dict(
        median_s=median, mean_s=mean, min_s=times_sorted[0] if n else None,
        max_s=times_sorted[-1] if n else None, stdev_s=stdev, rounds=n, times_s=times,
        warmup_s=warm, flops=fl, tflops=achieved / 1e12 if achieved else None,
        matmul_gemm=[gm, gn, gk], matmul_tflops=mm / 1e12 if mm else None,
        matmul_fraction=achieved / mm if (achieved and mm) else None,
        peak_extra_bytes=peak, input_bytes=in_bytes, est_bytes=est, free_bytes=free,
        tf32=bool(device.type == "cuda"), notes=notes,
    )
    benchmark.extra_info.update({k: v for k, v in extra.items() if k != "times_s"})
    return finish("ok", **extra)


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
