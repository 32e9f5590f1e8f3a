"""Host time of one DAALLoss forward + backward besides the kernels, measured on a CPU.

The first H200 run found the B = 180 loss host-bound (3.9 ms of host time per forward + backward
against 0.38 ms of GPU time; docs/kernels.md, "Measured results"). Everything the host does for
a call but launch the Triton kernels — validation, the composition, the operators' dispatch,
autograd, the launchers' own Python, the few PyTorch operators — runs the same on a CPU, so this
measures it here: the Triton kernels are replaced by no-ops (the interpreter's launch), and so
is the arithmetic of the line-margin backward's two PyTorch GEMMs (``mm_f32``: an empty result of
the GEMM's shape; on the CPU at D = 64 they computed 0.14–0.19 ms per call that a GPU does in its own
time, not the host's; their launches are counted with the others), the value
checks are off (the CUDA default), and the loss runs on small CPU tensors (B = 180, C = 100,
D = 64 by default) in three settings, interleaved (``DAAL_EAGER_OPS=function`` and ``custom``
with the merged launches, ``function`` with ``DAAL_LAUNCHES=separate``), median of ``--rounds``
rounds of ``--calls`` calls. Also prints the launches one call makes in each
(``daal_triton.launch_count``). What
a GPU adds — each Triton launch's own host cost (~17 µs for an empty kernel on the H200's host,
``bench/probe_h200.py``) and each PyTorch launch's — is not in these numbers; the part of Triton's
that is Python (``JITFunction.run``'s argument binder and cache key) is measured apart, on each
launch's arguments, and printed last, once per launch policy.

usage: TRITON_INTERPRET=1 python bench/probe_host.py [--B 180 --C 100 --D 64] [--rounds 15 --calls 40]
           [--profile]  (the split bench/probe_h200.py's ``host`` section makes on a GPU's host)

It measures whichever ``daal_triton`` Python imports: an older commit's, through a link tree on
``PYTHONPATH`` (as ``bench/gpu_check.sh``'s last-resort install builds it), gives the same
measurement of the code the first H200 probe timed (docs/kernels.md, "Measured results").
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=180)
    p.add_argument("--C", type=int, default=100)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--profile", action="store_true",
                   help="also profile the default setting (bench/probe_h200.py's host section: by origin, "
                        "then the functions with the most own time), to set beside a GPU run's")
    a = p.parse_args(argv)
    from daal_triton.backend import interpreter_on

    if not interpreter_on():
        if "triton" in sys.modules:
            raise SystemExit("needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import daal_triton
    from daal_triton import validation
    from daal_triton.kernels import _common, line_margin
    from daal_triton.launch_count import LaunchCount

    try:  # where the interpreter launches a kernel: InterpretedFunction.run, Triton 3.5's GridExecutor
        from daal_triton.kernels._common import interpreter_launch_point
        launch_cls, launch_name = interpreter_launch_point()
    except ImportError:  # an older commit's package (see above), from before Triton 3.5's support
        from triton.runtime.interpreter import InterpretedFunction as launch_cls
        launch_name = "run"

    torch.set_num_threads(1)
    # the no-op kernels leave their outputs uninitialised, and the few PyTorch GEMMs of the
    # backward then multiply whatever memory held: denormals there made torch.mm up to 40x slower
    # on this CPU (2 ms per call instead of 0.05), an artefact no GPU has
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    loss = daal_triton.DAALLoss(a.C, a.D)
    z = torch.randn(a.B, a.D, requires_grad=True)
    y = torch.arange(a.B) % max(1, a.C // 2)
    validation.value_checks_on = lambda device, check_values=None: False  # the CUDA default

    def call():  # as in training: the gradients were reset (set to None) before the step
        z.grad = loss.segments.grad = None
        loss(z, y).backward()

    # the settings timed side by side: the operators' dispatch (DAAL_EAGER_OPS) and the merged
    # launches (DAAL_LAUNCHES); a tree from before either (e.g. the commit the first H200 probe
    # measured, for a calibration: docs/kernels.md, "Measured results") has one setting
    eager_modes = getattr(_common, "EAGER_MODES", ())
    launch_env = getattr(_common, "LAUNCHES_ENV", None)
    settings = [("function", "merged"), ("function", "separate"), ("custom", "merged")]
    settings = [(e if eager_modes else None, m if launch_env else None) for e, m in settings]
    settings = list(dict.fromkeys(settings))

    def use(setting):
        eager_mode, launches = setting
        if eager_mode is not None:
            _common.EAGER_OPS = eager_mode
        if launches is not None:
            os.environ[launch_env] = launches

    def label(setting):
        return "  ".join(f"{name}={v:8s}" for name, v in zip(("DAAL_EAGER_OPS", "DAAL_LAUNCHES"), setting)
                         if v is not None) or "this tree"

    counts, launched = {}, {}  # per setting: the launches of one call, and each Triton launch's
    real_run = getattr(launch_cls, launch_name)  # (kernel function, args, kwargs)
    for setting in settings:
        use(setting)
        call()  # compiles nothing (interpreter) but fills the caches
        with LaunchCount() as counts[setting]:
            call()
        launched[setting] = rec = []

        def recording_run(self, *args, _rec=rec, **kwargs):  # a no-op that keeps the arguments
            _rec.append((self.fn, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))

        setattr(launch_cls, launch_name, recording_run)
        call()
        setattr(launch_cls, launch_name, real_run)
    setattr(launch_cls, launch_name, lambda self, *args, **kwargs: None)  # the kernels: no-ops from here
    line_margin.mm_f32 = lambda a, b: torch.empty(a.shape[0], b.shape[1], device=a.device)  # and the GEMMs

    times = {setting: [] for setting in settings}
    for setting in settings:
        use(setting)
        for _ in range(3):
            call()
    for _ in range(a.rounds):
        for setting in settings:
            use(setting)
            t0 = time.perf_counter()
            for _ in range(a.calls):
                call()
            times[setting].append((time.perf_counter() - t0) / a.calls)
    print(f"DAALLoss forward + backward, B={a.B} C={a.C} D={a.D}, CPU tensors, Triton kernels as "
          f"no-ops (the backward's GEMMs too), value checks off; torch {torch.__version__}")
    for setting, ts in times.items():
        count = counts[setting]
        print(f"{label(setting)}  median {statistics.median(ts) * 1e3:.3f} ms, min {min(ts) * 1e3:.3f} ms "
              f"per call; launches {count.launches} ({sum(count.triton.values())} Triton, "
              f"{count.aten_launches} PyTorch), host syncs {sum(count.syncs.values())}")
    for setting in dict.fromkeys((None, s[1]) for s in settings):  # once per launch policy
        rec = next(launched[s] for s in settings if s[1] == setting[1])
        per_kernel = triton_launch_path_us(rec)
        if per_kernel:
            print(f"Triton's launch path (JITFunction.run's binder + cache key, for an sm_90 target)"
                  f"{'' if setting[1] is None else ', DAAL_LAUNCHES=' + setting[1]}: "
                  f"{sum(per_kernel.values()):.0f} µs per call over {len(rec)} launches (not in the "
                  f"times above); the heaviest: " + ", ".join(
                      f"{k} {us:.1f}" for k, us in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:3]))
    if a.profile:
        from probe_h200 import host_profile_rows  # the GPU probe's split, for the same call here

        use(settings[0])
        rows, by_origin, wall = host_profile_rows(call, a.calls * a.rounds)
        print(f"under cProfile, {label(settings[0])}: {wall:.0f} µs per call (the profiler's cost "
              "included; Triton's launch path is not: the kernels are no-ops here); own time by origin: "
              + "; ".join(f"{origin} {us:.0f} µs" for origin, us in by_origin.items()))
        for name, n, own, cum in rows:
            print(f"  {own:7.1f} µs own, {cum:7.1f} µs cumulative, {n:g} calls: {name}")
    return 0


def triton_launch_path_us(launched, reps: int = 2000):
    """Microseconds of Triton's own Python before each launch that the no-op kernels skip: the
    argument binder (specialisation) and cache key of ``JITFunction.run``, built as for an sm_90
    GPU (no GPU needed), timed on each recorded launch's arguments and summed per kernel. Not
    included: what follows them (the device and stream queries, the compiled kernel's C
    launcher). Empty when this Triton lacks the pieces."""
    import time as _time

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature
        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception:  # another Triton's internals: nothing to report
        return {}
    out, binders = {}, {}
    for fn, args, kwargs in launched:
        binder = binders.get(fn)
        if binder is None:
            jit = JITFunction(fn)
            binder = binders[fn] = create_function_from_signature(jit.signature, jit.params, backend)
        key_cache = {}

        def once():
            _, specialization, options = binder(*args, **kwargs)
            return compute_cache_key(key_cache, specialization, options)

        once()
        t0 = _time.perf_counter()
        for _ in range(reps):
            once()
        out[fn.__name__] = out.get(fn.__name__, 0.0) + (_time.perf_counter() - t0) / reps * 1e6
    return out


if __name__ == "__main__":
    sys.exit(main())
