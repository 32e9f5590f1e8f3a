"""Shared test helpers: the one tolerance table of SPEC.md, relative error, random inputs,
and compiling a Triton kernel for a GPU target without a GPU."""
from __future__ import annotations

import os
import types

import torch

# SPEC.md "Parity": ||out - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {
    "float32": 1e-5,  # IEEE fp32 dots (the interpreter)
    "float32_tf32": 5e-3,  # TF32 dots on a GPU
    "float16": 2e-2,
    "bfloat16": 2e-2,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


def compile_for_gpu(fn, signature: dict, constexprs: dict, *, capability: int,
                    num_warps: int = 4, num_stages: int = 2):
    """Compile a ``@triton.jit`` kernel for ``GPUTarget("cuda", capability, 32)`` without a GPU.

    ``signature`` maps every argument name to a Triton type ("*fp32", "i32", ...) or
    "constexpr"; ``constexprs`` gives the constexpr values. Returns the compiled kernel
    (``.asm["ptx"]``, ``.metadata``).

    Under ``TRITON_INTERPRET=1`` Triton's own ``@jit`` library functions (``tl.zeros``,
    ``tl.sum``, ...) are interpreted functions that the code generator cannot compile, so the
    compilation then runs in a fresh Python process without the interpreter (see
    :func:`compile_many_for_gpu`); the result has the same ``.asm["ptx"]`` and ``.metadata``
    (``shared``, ``num_warps``, ``name``) attributes.
    """
    if _interpreting():
        (res,) = compile_many_for_gpu([gpu_job(fn, signature, constexprs, capability=capability,
                                               num_warps=num_warps, num_stages=num_stages)])
        if res.get("error"):
            raise RuntimeError(f"compiling {res['name']} for sm_{capability} failed:\n{res['error']}")
        return _Compiled(res)
    return _compile_here(as_jit_function(fn), signature, constexprs, capability, num_warps, num_stages)


def _compile_here(fn, signature, constexprs, capability, num_warps, num_stages):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _Compiled:
    """What :func:`compile_for_gpu` returns when the compilation ran in another process."""

    def __init__(self, res: dict):
        self.asm = {"ptx": res["ptx"]}
        self.metadata = types.SimpleNamespace(**res["metadata"])
        self.n_regs = res.get("n_regs")
        self.n_spills = res.get("n_spills")


def gpu_job(fn, signature: dict, constexprs: dict, *, capability: int, num_warps: int = 4,
            num_stages: int = 2) -> dict:
    """A JSON-able compile job for :func:`compile_many_for_gpu` (the kernel is found again by
    its module and name, so it must be a module-level ``@triton.jit`` function)."""
    inner = getattr(fn, "fn", fn)
    return {"module": inner.__module__, "name": inner.__name__, "signature": dict(signature),
            "constexprs": dict(constexprs), "capability": int(capability),
            "num_warps": int(num_warps), "num_stages": int(num_stages)}


_WORKER = r"""
import json, sys, traceback
jobs = json.load(sys.stdin)
sys.path.insert(0, sys.argv[1])
from daal_testing import _compile_here
import importlib
out = []
for job in jobs:
    res = {"name": job["name"], "capability": job["capability"]}
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        k = _compile_here(fn, job["signature"], job["constexprs"], job["capability"],
                          job["num_warps"], job["num_stages"])
        md = k.metadata
        res.update(ptx=k.asm["ptx"], metadata={"shared": md.shared, "num_warps": md.num_warps,
                                               "name": md.name},
                   n_regs=getattr(k, "n_regs", None), n_spills=getattr(k, "n_spills", None))
    except Exception:
        res["error"] = traceback.format_exc()
    out.append(res)
json.dump(out, sys.stdout)
"""


def compile_many_for_gpu(jobs, *, workers: int = 2):
    """Compile many :func:`gpu_job` jobs in ``workers`` fresh processes without the interpreter.

    Returns one dict per job, in order: ``name``, ``capability``, and ``ptx``, ``metadata``,
    ``n_regs``, ``n_spills`` — or ``error`` (the traceback) when the compilation failed.
    """
    import json
    import subprocess
    import sys

    jobs = list(jobs)
    if not jobs:
        return []
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    workers = max(1, min(workers, len(jobs)))
    slices = [jobs[i::workers] for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, here], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for _ in slices]
    results = []
    for proc, part in zip(procs, slices):
        stdout, stderr = proc.communicate(json.dumps(part))
        if proc.returncode != 0:
            raise RuntimeError(f"GPU compile worker failed (rc {proc.returncode}):\n{stderr[-4000:]}")
        results.append(json.loads(stdout))
    ordered = [None] * len(jobs)
    for w, part in enumerate(results):
        for i, res in enumerate(part):
            ordered[w + i * workers] = res
    return ordered


def as_jit_function(fn):
    """The compilable ``JITFunction`` behind ``fn``.

    Under ``TRITON_INTERPRET=1``, ``@triton.jit`` returns an ``InterpretedFunction`` that
    ``triton.compile`` cannot take; it keeps the Python function as ``.fn``, from which a real
    ``JITFunction`` is built here. (The kernel must not call other ``@triton.jit`` helpers, which
    would be interpreted functions too.)
    """
    if hasattr(fn, "cache_key"):
        return fn
    from triton.runtime.jit import JITFunction

    inner = getattr(fn, "fn", None)
    if inner is None:
        raise TypeError(f"{fn!r} is not a @triton.jit kernel")
    return JITFunction(inner)



#: Compile every kernel configuration the launchers can choose for both GPU targets (~3 min on
#: 2 cores; the default, and what CI runs). ``DAAL_ALL_CONFIGS=0`` compiles a representative subset
#: (every kernel and dtype family) for quick local runs.
COMPILE_ALL_CONFIGS = os.environ.get("DAAL_ALL_CONFIGS", "1") not in ("", "0")
