"""Shared test helpers: the one tolerance table, relative error, random inputs, and compiling
the kernels' launch configurations (``daal_triton.kernels._common.Launch``) for a GPU target
without a GPU."""
from __future__ import annotations

import functools
import gc
import os
import sys

import pytest
import torch

from daal_triton import backend as _backend

#: Whether the kernels can run at all here: Triton installed, 3.5 or later (torch 2.4-2.8 bring
#: 3.0-3.4, where "auto" runs the reference and a forced "triton" raises ValueError).
KERNELS_RUN = _backend.triton_available() and (_backend.TRITON_VERSION is None
                                               or _backend.TRITON_VERSION >= _backend.MIN_TRITON)
KERNELS_SKIP_REASON = (f"the kernels need Triton {_backend.MIN_TRITON[0]}.{_backend.MIN_TRITON[1]} or later "
                       f"(installed: {_backend.TRITON_VERSION}); the reference's tests run")
needs_kernels = pytest.mark.skipif(not KERNELS_RUN, reason=KERNELS_SKIP_REASON)

# Parity: ||out - ref|| / ||ref|| against the float64 reference (docs/method.md, "Precision").
TOLERANCE = {
    "float32": 1e-5,  # IEEE fp32 dots (the interpreter)
    "float32_tf32": 5e-3,  # TF32 dots on a GPU
    "float16": 2e-2,
    "bfloat16": 2e-2,
}
# Where the kernel tests run: the GPU when there is one, else the CPU through the interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


#: Why :func:`skip_interpreter_tests_on_gpu` skips a test.
CPU_ONLY = "runs Triton's interpreter on CPU tensors: CPU machines (CI) run it"


def skip_interpreter_tests_on_gpu(items) -> None:
    """On a GPU machine (no ``TRITON_INTERPRET``): skip, with the reason, the items marked
    ``interpreter`` (the Triton backend on CPU tensors), but never one also marked ``gpu`` or
    ``build`` (a module's ``pytestmark = pytest.mark.interpreter`` reaches its GPU and build tests
    too: until 2026-12-05's sixth session it would have skipped the threshold path's GPU tests on
    the GPU). Both conftests call it."""
    cpu_only = pytest.mark.skip(reason=CPU_ONLY)
    for item in items:
        if "interpreter" in item.keywords and "gpu" not in item.keywords and "build" not in item.keywords:
            item.add_marker(cpu_only)


def item_weight(item) -> float:
    """A test's expected time against an ordinary one's, for the shards' split: the argument of
    its ``shard_weight`` marker, else 1."""
    mark = item.get_closest_marker("shard_weight")
    return float(mark.args[0]) if mark else 1.0


def shard_slice(weights, i: int, n: int) -> range:
    """The indices of the i-th of n contiguous slices of items with these ``weights``: an item
    goes to the slice its weight's midpoint falls in (n equal parts of the total), so the slices
    weigh about the same and together hold every item once, in order."""
    total = sum(weights) or 1.0
    starts, acc = [], 0.0
    for w in weights:
        starts.append(min(n - 1, int((acc + w / 2) * n / total)))
        acc += w
    first = next((j for j, s in enumerate(starts) if s >= i), len(weights))
    last = next((j for j, s in enumerate(starts) if s > i), len(weights))
    return range(first, last)


#: The Triton releases whose compiler facts (registers, stack, SASS instruction counts) the build
#: tests hold: CI's 3.8 and the GPU image's 3.6. Under another release (3.5, 3.7 and 3.9 were run:
#: README, Versions) every kernel still builds for each target (those tests run), but the facts are
#: another compiler's: :func:`require_recorded_compiler_facts` skips, :func:`compiler_fact` skips
#: naming the difference.
FACT_RELEASES = ("3.6", "3.8")


def require_recorded_compiler_facts() -> None:
    """Skip a test of compiler facts under a Triton release outside :data:`FACT_RELEASES`."""
    from daal_triton.kernels._common import triton_release

    release = triton_release()
    if release not in FACT_RELEASES:
        pytest.skip(f"registers, stack and SASS facts are recorded for Triton {' and '.join(FACT_RELEASES)}, "
                    f"not {release} (its builds are tested)")


def compiler_fact(holds: bool, what: str) -> None:
    """Hold a compiler fact recorded for :data:`FACT_RELEASES` (no stack, a table of spills):
    ``AssertionError(what)`` there when it fails; under another release a failing fact skips the
    test, naming ``what`` (call it after the test's builds have been checked: they are tested
    everywhere), and a fact that holds passes as anywhere."""
    from daal_triton.kernels._common import triton_release

    if holds:
        return
    release = triton_release()
    if release in FACT_RELEASES:
        raise AssertionError(what)
    pytest.skip(f"under Triton {release}: {what} (a compiler fact recorded for Triton "
                f"{' and '.join(FACT_RELEASES)}; its builds are tested)")


def strict_interpreter_launches() -> None:
    """Make Triton's interpreter refuse a launch keyword the GPU JIT refuses: one that is neither
    a parameter of the kernel nor a compile option. The interpreter drops it silently; on a GPU it
    is a KeyError at the first build (bench/probe_h200.py passed the forward's ``FLAT`` to a probe
    kernel without it, unseen on the CPU). Installed by the test and bench conftests and by the
    bench scripts' ``--smoke`` rehearsals; idempotent."""
    from triton.backends.nvidia.compiler import CUDAOptions

    from daal_triton.kernels._common import interpreter_launch_point

    # Triton 3.6 on launches through InterpretedFunction.run(*args, grid, warmup, **kwargs); 3.5
    # through GridExecutor.__call__(*args, **kwargs) (grid and warmup among the keywords)
    cls, name = interpreter_launch_point()
    plain = getattr(cls, name)
    if getattr(plain, "daal_strict", False):
        return
    accepted = frozenset(CUDAOptions.__dataclass_fields__) | {"grid", "warmup"}

    @functools.wraps(plain)  # keeps daal_triton.launch_count's flag: its counter is not installed twice
    def run(self, *args, **kwargs):
        unknown = sorted(k for k in kwargs if k not in self.arg_names and k not in accepted)
        if unknown:
            name = getattr(getattr(self, "fn", None), "__name__", "kernel")
            raise TypeError(f"{name}: launch keyword(s) {unknown} are neither parameters of the kernel nor "
                            "compile options (the GPU JIT refuses them; the interpreter would drop them)")
        return plain(self, *args, **kwargs)

    run.daal_strict = True
    setattr(cls, name, run)


def run_with_deadline(code: str, seconds: float, cwd: str) -> "str | None":
    """Run ``code`` in a fresh Python (this one, its environment, in ``cwd``: not a checkout's
    root, whose ./daal_triton would shadow the installed package); None when it exits 0 within
    ``seconds``, else why not: "hung" (killed at the deadline: a kernel that never returns, as a
    wrong barrier phase makes one) or its exit status and the end of its output. A kernel no GPU
    has run yet is first launched this way (tests/kernels/test_kernel_knn_gluon.py): a hang costs
    the deadline, not the test process and every test after it."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                              timeout=seconds)
    except subprocess.TimeoutExpired:
        return f"hung: no exit within {seconds:g} s (killed)"
    if done.returncode:
        return f"exit status {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
    return None


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> float:
    name = str(dtype).replace("torch.", "")
    if name == "float32" and tf32:
        return TOLERANCE["float32_tf32"]
    return TOLERANCE[name]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN/inf in ``out`` never passes (returns inf)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def random_problem(B: int, C: int, D: int, *, dtype=torch.float64, device="cpu", classes_present=None):
    """Embeddings B x D, labels in [0, C) (optionally drawn only from ``classes_present``),
    segments C x 2 x D near the unit sphere."""
    z = torch.randn(B, D, dtype=dtype, device=device)
    pool = torch.arange(C) if classes_present is None else torch.as_tensor(classes_present)
    y = pool[torch.randint(0, len(pool), (B,))].to(device)
    mid = torch.nn.functional.normalize(torch.randn(C, D, dtype=torch.float64), dim=1)
    seg = torch.stack([mid + 0.3 * torch.randn(C, D, dtype=torch.float64) / D**0.5,
                       mid + 0.3 * torch.randn(C, D, dtype=torch.float64) / D**0.5], 1)
    return z, y, seg.to(dtype=dtype, device=device)


def patch_value_checks(monkeypatch, answer) -> None:
    """``value_checks_on`` replaced by ``answer(device, check_values=None)`` in every package module
    that calls it: each binds the name at its import (``from .validation import value_checks_on``),
    and the package imports them lazily, so patching ``validation`` alone missed a module first
    imported later, and left one imported during the patch bound to the stand-in for good."""
    import importlib

    # every module imported before any is patched: one imported after would bind the stand-in
    modules = [importlib.import_module(f"daal_triton.{name}") for name in ("validation", "functional", "loss", "memory")]
    for module in modules:
        monkeypatch.setattr(module, "value_checks_on", answer)


# ----------------------------------------------------------------------------- specialisation
# At launch, Triton's JIT specialises each kernel on its arguments: an integer equal to 1 becomes
# the constant 1, and a pointer aligned to 16 bytes or an integer divisible by 16 gets
# ``tt.divisibility = 16`` (triton.runtime.jit; the same in Triton 3.6 and 3.8). That decides
# vectorised loads, pipelining and register use, so the compile tests build configurations in two
# specialisations: "generic" (nothing assumed: odd D, strided views) and "aligned", the hot path
# of contiguous inputs from the caching allocator with D % 16 == 0 (D = 512 in the benchmarks):
# every pointer aligned, D divisible by 16, and the stride facts each kernel declares in its
# ``KernelSpec`` (kernels/_common.py): ``unit`` strides equal to 1, ``rows`` strides divisible by
# 16. ``other`` strides and the sizes (B, C, M, N, K) stay unspecialised: the benchmark shapes
# include odd ones (B = 180, C = 100 or 11,318). Their big shapes are multiples of 16, which a
# launch specialises too: tests/kernels/test_kernel_specialisation.py builds those bf16 variants.
SPECIALISATIONS = ("generic", "aligned")


def triton_specialisation(value):
    """What Triton's JIT launcher derives from one runtime argument: ``(type, "D" when divisible by
    16 / aligned to 16 bytes)``, or ``("constexpr", value)`` for None and an int equal to 1
    (Triton 3.6 and 3.8 share this API; 3.5 has the same rule in Python). The rule
    :func:`specialise` copies, and what tests/kernels/launch_recorder.py records."""
    from triton.backends.compiler import BaseBackend

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # Triton 3.5
        from triton.runtime.jit import create_specialize_impl

        return create_specialize_impl(BaseBackend.get_arg_specialization)(value, False, True, True)
    return native_specialize_impl(BaseBackend, value, False, True, True)


def largest_cpu_allocation(fn) -> int:
    """The largest number of bytes any single op allocated while ``fn`` ran (torch.profiler's
    per-op self memory on the CPU, which sees allocations inside ATen ops too: an upper bound of
    the largest tensor made)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def peak_live_cpu_bytes(fn) -> int:
    """The most bytes of CPU tensor storage alive at once while ``fn`` ran, counting only storage
    made during the call (its extra memory beyond the inputs): every op's new storages are recorded
    by a dispatch mode and followed until freed (garbage collected at each new allocation). The package's custom operators run as their
    bodies inside the mode, so their temporaries count too; the Triton interpreter's own copies
    of the kernels' arguments do not (they stand for GPU registers)."""
    from torch._library.custom_ops import OPDEFS
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    def interpreter_copy() -> bool:
        f = sys._getframe(2)
        while f is not None:
            if "triton/runtime/interpreter" in f.f_code.co_filename:
                return True
            f = f.f_back
        return False

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.alive, self.peak = {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "daal_triton":
                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            made = [t.untyped_storage() for t in tree_flatten(out)[0]
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
            made = [st for st in made if st._cdata not in inputs and st.nbytes()]
            if made and not interpreter_copy():
                for st in made:
                    self.alive[st._cdata] = (StorageWeakRef(st), st.nbytes())
                gc.collect()  # the interpreter's reference cycles hold launch arguments (a GPU's do not)
            self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
            self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
            return out

    mode = Live()
    with mode:
        fn()
    return mode.peak


def specialise(signature: dict, unit=(), rows=(), specialisation: str = "generic") -> tuple[dict, dict, set]:
    """``(signature, extra constexprs, names with tt.divisibility=16)`` of a launch of a kernel
    with this ``signature`` and hot-path stride facts ``unit`` / ``rows``.

    ``specialisation``: "generic" (nothing specialised) or "aligned" (see above)."""
    if specialisation == "generic":
        return dict(signature), {}, set()
    if specialisation != "aligned":
        raise ValueError(f"specialisation must be one of {SPECIALISATIONS}, got {specialisation!r}")
    sig, ones, divisible = dict(signature), {}, set()
    for name, ty in signature.items():
        if ty == "constexpr":
            continue
        if name in unit:
            ones[name] = 1
            del sig[name]
        elif ty.startswith("*") or name == "D" or name in rows:
            divisible.add(name)
    return sig, ones, divisible


def _compile_here(fn, signature, constexprs, capability, num_warps, num_stages,
                  specialisation="generic", unit=(), rows=(), maxnreg=None, divisible=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.language import target_info

    if specialisation == "recorded":  # a launch as recorded (tests/kernels/launch_recorder.py)
        sig, ones, divisible = dict(signature), {}, set(divisible or ())
    else:
        sig, ones, divisible = specialise(signature, unit, rows, specialisation)
    constexprs = {**constexprs, **ones}
    for name in constexprs:
        sig[name] = "constexpr"
    # in argument order: ``divisible`` is a set, whose order follows the process's string-hash
    # seed, and ``str(attrs)`` is part of Triton's cache key (a set order would miss the cache
    # in every new process: each CI run compiled the same builds several times)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in sorted(divisible, key=fn.arg_names.index)}
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (kernels/knn_gluon.py)
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    else:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    target = GPUTarget("cuda", capability, 32)
    # kernels may ask for the target (``cuda_capability_geq``): on a GPU it is the active
    # device's, here the one compiled for (this process compiles for nothing else)
    def current_target():
        return target

    current_target.__triton_builtin__ = True  # as Triton's own (its cache key skips builtins)
    target_info.current_target = current_target
    return triton.compile(src, target=target, options=options)


def programs_per_sm(registers: int, warps: int, shared: int) -> int:
    """Resident programs per sm_90 SM: 64K registers (allocated per warp in multiples of 8 per
    thread) and 228 KB of shared memory (1 KB of it reserved per program)."""
    by_regs = 65536 // (-(-registers // 8) * 8 * 32 * warps)
    return min(by_regs, 233472 // (shared + 1024))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin (the tool shipped with Triton); None when it is not there."""
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True, timeout=60).stdout


def resource_usage(cubin: bytes) -> dict:
    """``{"registers": int, "stack": int}`` of a compiled kernel, read by the ``cuobjdump``
    shipped with Triton (no GPU needed). ``stack`` > 0 bytes means ptxas spilled registers to
    local memory (Triton kernels use no other stack). ``{}`` when cuobjdump is not there."""
    import re

    out = _cuobjdump(cubin, "-res-usage")
    if out is None:
        return {}
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    if not regs or not stack:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{out}")
    return {"registers": int(regs.group(1)), "stack": int(stack.group(1))}


def sass(cubin: bytes) -> str:
    """The SASS of a compiled kernel (``cuobjdump -sass``; no GPU needed); "" without the tool."""
    return _cuobjdump(cubin, "-sass") or ""


def sass_loops(text: str) -> list:
    """The loops of a SASS listing: ``[(start, end, opcodes)]`` for each conditional backward
    branch (``@P BRA target`` at ``end`` with ``target <= end``), ``opcodes`` the instructions
    between (their first word, predicates dropped). An unconditional backward ``BRA`` (a
    divergent path rejoining its loop) is not a loop of its own."""
    import re

    lines = []
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*)", line)
        if m:
            lines.append((int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4)))
    loops = []
    for addr, predicated, op, args in lines:
        if op == "BRA" and predicated:
            target = re.match(r"\s*(0x[0-9a-f]+)", args)
            if target and int(target.group(1), 16) <= addr:
                start = int(target.group(1), 16)
                loops.append((start, addr, [o for a, _, o, _ in lines if start <= a <= addr]))
    return loops


def tile_loop_parts(loops: list) -> tuple[int, list]:
    """Of a kernel's :func:`sass_loops`, the longest (a kNN forward's loop over column tiles):
    ``(outside, rounds)``, its instructions outside the loops nested in it, and the lengths of
    the nested loops that issue no ``HGMMA`` (the merge rounds; the D-loop's do)."""
    outer = max(loops, key=lambda lp: len(lp[2]))
    inner = [lp for lp in loops if lp is not outer and outer[0] <= lp[0] and lp[1] <= outer[1]]
    rounds = [len(lp[2]) for lp in inner if not any(o.startswith("HGMMA") for o in lp[2])]
    return len(outer[2]) - sum(len(lp[2]) for lp in inner), rounds


def gpu_job(launch, *, capability: int, specialisation: str = "generic", with_sass: bool = False) -> dict:
    """A JSON-able compile job of a ``Launch`` (kernels/_common.py) for
    :func:`compile_many_for_gpu` (the kernel is found again by its module and name; a job may
    also name a ``path``, a folder put on the worker's ``sys.path`` first, for a kernel defined
    in a test module); ``specialisation``: see :func:`specialise`; ``with_sass``: the result
    also holds the SASS (:func:`sass`)."""
    if specialisation not in SPECIALISATIONS:
        raise ValueError(f"specialisation must be one of {SPECIALISATIONS}, got {specialisation!r}")
    inner = getattr(launch.kernel, "fn", launch.kernel)
    return {"module": inner.__module__, "name": inner.__name__, "signature": launch.signature,
            "constexprs": launch.constexprs, "capability": int(capability),
            "num_warps": launch.num_warps, "num_stages": launch.num_stages,
            "specialisation": specialisation, "unit": list(launch.spec.unit),
            "rows": list(launch.spec.rows), "sass": bool(with_sass),
            "maxnreg": launch.config.maxnreg}


_WORKER = r"""
import json, os, sys, time, traceback
# the working directory (often the repository root) must not shadow the installed daal_triton:
# ./daal_triton lacks the kernels/ and reference/ subpackages that setup.py maps into it
sys.path[:] = [p for p in sys.path if p not in ("", ".", os.getcwd())]
jobs = json.load(sys.stdin)
started = time.time()
sys.path.insert(0, sys.argv[1])
from daal_testing import _compile_here, resource_usage, sass
import importlib
out = []
for job in jobs:
    res = {"name": job["name"], "capability": job["capability"],
           "specialisation": job["specialisation"]}
    if job.get("path") and job["path"] not in sys.path:
        sys.path.insert(0, job["path"])
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        k = _compile_here(fn, job["signature"], job["constexprs"], job["capability"],
                          job["num_warps"], job["num_stages"], job["specialisation"],
                          job["unit"], job["rows"], job.get("maxnreg"), job.get("divisible"))
        md = k.metadata
        res.update(ptx=k.asm["ptx"], metadata={"shared": md.shared, "num_warps": md.num_warps,
                                               "name": md.name},
                   hash=k.hash, **resource_usage(k.asm["cubin"]))
        if job.get("sass"):
            res["sass"] = sass(k.asm["cubin"])
    except Exception:
        res["error"] = traceback.format_exc()
    res["worker"] = {"pid": os.getpid(), "started": started, "done": time.time()}
    out.append(res)
json.dump(out, sys.stdout)
"""


def compile_many_for_gpu(jobs, *, workers: int | None = None):
    """Compile many :func:`gpu_job` jobs in ``workers`` fresh processes without the interpreter.

    Returns one dict per job, in order: ``name``, ``capability``, ``specialisation``,
    ``worker`` (its process id, when it had read its jobs and when this one was done), and
    ``ptx``, ``metadata``, ``hash`` (Triton's cache key of the build), ``registers``, ``stack``
    (:func:`resource_usage`) — or ``error``
    (the traceback) when the compilation failed.
    """
    import json
    import subprocess
    import sys
    import tempfile

    jobs = list(jobs)
    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    if workers is None:  # 2 on CI's 2 cores; up to 8 on the GPU machine's 16
        workers = max(2, min(8, os.cpu_count() or 2))
    workers = max(1, min(workers, len(jobs)))
    slices = [jobs[i::workers] for i in range(workers)]
    # Each worker reads its jobs from a file and writes to files, so that all of them run at once
    # (communicate() on one pipe after another would feed the second worker only after the first
    # had finished) and none can block on a full pipe.
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for w, part in enumerate(slices):
            paths = [os.path.join(tmp, f"{w}.{ext}") for ext in ("in", "out", "err")]
            with open(paths[0], "w") as f:
                json.dump(part, f)
            with open(paths[0]) as stdin, open(paths[1], "w") as stdout, open(paths[2], "w") as stderr:
                procs.append((subprocess.Popen([sys.executable, "-c", _WORKER, here], stdin=stdin,
                                               stdout=stdout, stderr=stderr, env=env), paths))
        results = []
        for proc, paths in procs:
            proc.wait()
            with open(paths[1]) as out, open(paths[2]) as err:
                stdout, stderr = out.read(), err.read()
            if proc.returncode != 0:
                raise RuntimeError(f"GPU compile worker failed (rc {proc.returncode}):\n{stderr[-4000:]}")
            results.append(json.loads(stdout))
    ordered = [None] * len(jobs)
    for w, part in enumerate(results):
        for i, res in enumerate(part):
            ordered[w + i * workers] = res
    return ordered


def spy_launches(monkeypatch, module, names, record=None, launched: list | None = None) -> list:
    """Wrap the Triton kernels ``names`` of ``module`` (for the test's duration): each launch
    appends ``record(name, args, kwargs)`` (default: the kernel's name) to ``launched`` (default:
    a new list), which is returned, and then launches the kernel (not when ``record`` raises)."""
    launched = [] if launched is None else launched

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(self.name if record is None else record(self.name, args, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch
    for name in names:
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    return launched


def recorded_job(launch: dict, module: str, capability: int, sass: bool = False) -> dict:
    """The :func:`compile_many_for_gpu` job of a launch as tests/kernels/launch_recorder.py
    recorded it (its kernel in ``module``), for one target."""
    return {"module": module, "name": launch["kernel"], "signature": launch["signature"],
            "constexprs": launch["constexprs"], "divisible": launch["divisible"], "capability": capability,
            "num_warps": launch["options"]["num_warps"], "num_stages": launch["options"]["num_stages"],
            "maxnreg": launch["options"].get("maxnreg"), "specialisation": "recorded", "unit": [], "rows": [],
            "sass": sass}


#: Compile every configuration the launchers can choose for both GPU targets (the default, and
#: what CI runs). ``DAAL_ALL_CONFIGS=0`` compiles only the configurations a D = 512 launch picks
#: (every kernel and dtype) for quick local runs.
COMPILE_ALL_CONFIGS = os.environ.get("DAAL_ALL_CONFIGS", "1") not in ("", "0")


def largest_block_d(launches) -> set:
    """Names of the launches a D = 512 launch picks: per op, entry, family, dtype and precision
    variant (``Launch.variant``), the one with the largest BLOCK_D (launches without BLOCK_D
    count as such)."""
    best = {}
    for la in launches:
        key = (la.op, la.entry, la.family, la.x_dtype, la.variant)
        if key not in best or (la.block_d or 0) > (best[key].block_d or 0):
            best[key] = la
    return {la.name for la in best.values()}


def config_jobs(launches, capabilities=(80, 90)):
    """``[(launch, capability, specialisation)]`` for the launches to compile
    (:data:`COMPILE_ALL_CONFIGS`): each "generic", and the ones a D = 512 launch picks also
    "aligned" (see :func:`specialise`), for each capability."""
    hot = largest_block_d(launches)
    chosen = [la for la in launches if COMPILE_ALL_CONFIGS or la.name in hot]
    return [(la, cap, spec) for la in chosen for cap in capabilities
            for spec in SPECIALISATIONS if spec == "generic" or la.name in hot
            if not la.aligned_hopper_only or (cap >= 90 and spec == "aligned")]


def compile_launches(launches, capabilities=(80, 90)):
    """``[((launch, capability, specialisation), result)]``: :func:`config_jobs` compiled by
    :func:`compile_many_for_gpu`."""
    cases = config_jobs(launches, capabilities)
    jobs = [gpu_job(la, capability=cap, specialisation=spec) for la, cap, spec in cases]
    return list(zip(cases, compile_many_for_gpu(jobs)))


def assert_floors_keep_nan(compiled, prefixes) -> None:
    """The builds whose ``Launch.entry`` starts with one of ``prefixes`` take their ``max(., eps)``
    floors with a NaN-propagating max (PTX ``max.NaN.f32``, Triton's ``propagate_nan=ALL``):
    NaN/inf inputs reach the loss instead of reading as the floor (docs/method.md, "Bad input")."""
    seen = set()
    for (la, cap, spec), res in compiled:
        hit = [p for p in prefixes if la.entry.startswith(p)]
        if hit:
            seen.update(hit)
            assert "max.NaN.f32" in res["ptx"], f"{la.name}-sm{cap}-{spec}: a floor drops NaN"
    assert seen == set(prefixes), f"no build of {set(prefixes) - seen}"


def assert_compiled_without_spills(compiled) -> None:
    """Every build of :func:`compile_launches` succeeded (PTX with an entry), and the sm_90
    "aligned" builds (the hot path) use no local memory (cuobjdump's STACK 0): a compiler fact,
    held by :func:`compiler_fact` (Triton 3.9 spills 8 B in the float32 normalize backward: a
    skip there). Call it last in a test."""
    assert compiled
    for (la, cap, spec), res in compiled:
        what = f"{la.name}-sm{cap}-{spec}"
        assert not res.get("error"), f"{what}:\n{res.get('error')}"
        assert ".entry" in res["ptx"], what
    spills = {f"{la.name}-sm{cap}": res.get("stack", "no cuobjdump report")
              for (la, cap, spec), res in compiled if cap == 90 and spec == "aligned" and res.get("stack") != 0}
    compiler_fact(not spills, f"local memory (bytes per thread) on the hot path: {spills}")
