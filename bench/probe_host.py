"""Host time of one DAALLoss forward + backward besides the kernels, measured on a CPU.

The first H200 run found the B = 180 loss host-bound (3.9 ms of host time per forward + backward
against 0.38 ms of GPU time; docs/kernels.md, "Measured results"). Everything the host does for
a call but launch the Triton kernels — validation, the composition, the operators' dispatch,
autograd, the launchers' own Python, the few PyTorch operators — runs the same on a CPU, so this
measures it here: the Triton kernels are replaced by no-ops (the interpreter's ``run``), the value
checks are off (the CUDA default), and the loss runs on small CPU tensors (B = 180, C = 100,
D = 64 by default) in each ``DAAL_EAGER_OPS`` mode, interleaved, median of ``--rounds`` rounds of
``--calls`` calls. Also prints the launches one call makes (``daal_triton.launch_count``). What
a GPU adds — each Triton launch's own host cost (~17 µs for an empty kernel on the H200's host,
``bench/probe_h200.py``) and each PyTorch launch's — is not in these numbers.

usage: TRITON_INTERPRET=1 python bench/probe_host.py [--B 180 --C 100 --D 64] [--rounds 15 --calls 40]
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
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        if "triton" in sys.modules:
            raise SystemExit("needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    import daal_triton
    from daal_triton import validation
    from daal_triton.kernels import _common
    from daal_triton.launch_count import LaunchCount

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

    call()  # compiles nothing (interpreter) but fills the caches
    with LaunchCount() as count:
        call()
    InterpretedFunction.run = lambda self, *args, **kwargs: None  # the kernels: no-ops from here

    times = {mode: [] for mode in _common.EAGER_MODES}
    for _ in range(3):
        call()
    for _ in range(a.rounds):
        for mode in times:
            _common.EAGER_OPS = mode
            t0 = time.perf_counter()
            for _ in range(a.calls):
                call()
            times[mode].append((time.perf_counter() - t0) / a.calls)
    print(f"DAALLoss forward + backward, B={a.B} C={a.C} D={a.D}, CPU tensors, Triton kernels as "
          f"no-ops, value checks off; torch {torch.__version__}")
    print(f"launches per call: {count.launches} ({sum(count.triton.values())} Triton, "
          f"{count.aten_launches} PyTorch), host syncs: {sum(count.syncs.values())}")
    for mode, ts in times.items():
        print(f"DAAL_EAGER_OPS={mode:8s}  median {statistics.median(ts) * 1e3:.3f} ms, "
              f"min {min(ts) * 1e3:.3f} ms per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
