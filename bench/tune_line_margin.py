"""Time alternative block sizes of the fused line-margin kernels on a GPU.

The launch configurations of the line-margin kernels (``CONFIGS[family][kernel]`` in
``kernels/line_margin.py``, ``KernelConfig`` objects of the one model in ``kernels/_common.py``)
were chosen by what ``ptxas`` reports (no register spills on sm_90; docs/kernels.md). This tool
times them against alternatives on the machine it runs on, one kernel at a time (the others keep their table
entries), and checks that every alternative computes what the table's entry computes:
``fwd2``: the forward operator ``daal_triton::line_margin2`` (own rows, prep, ``_lm2_fwd_kernel``,
merge); ``bwd2``: the backward operator ``daal_triton::line_margin2_backward`` (the chunk kernel
``_lm2_bwd_kernel``, the two ``torch.mm`` and the segment-gradient epilogue). (The first design's
kernels, timed here too until the 2026-11-30 H200 run retired that design, are gone; that run's
records still render.)

``bwd2`` is also timed with the table's block sizes at other class-chunk budgets
(``CHUNK_CANDIDATES``: ``CHUNK_ELEMENTS`` = B·Cc of 2^22 and 2^23 against the table's 2^24). A
smaller chunk means more launches but a smaller ``a~ b~`` buffer (B x 2Cc: 67 MB at B = 1024 and
2^24, more than the H200's 50 MB L2, so the two GEMMs re-read it from DRAM; 17 MB at 2^22) and a
lower peak memory; each record has its peak extra memory on a GPU.

Each candidate is timed with CUDA events (median of ``--reps`` calls after a warm-up call that
also compiles it). The table's entries run first, then the block sizes they replaced, then the
chunk budgets, then the other candidates, until ``--budget-s`` is spent; the rest are recorded as
not run. Writes JSON (``OUT``) and prints a
Markdown table. ``--smoke`` runs tiny shapes on the CPU under Triton's interpreter (the
``interp`` family; timings meaningless) so that the tool cannot rot.

usage: python bench/tune_line_margin.py OUT.json [--budget-s 90] [--shape 1024,100000,512]
           [--dtypes bf16,fp32] [--reps 10] [--kernels fwd2,bwd2] [--smoke]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

from tune_tables import line_margin_markdown

# (BLOCK_B, BLOCK_C, num_warps, num_stages); BLOCK_D stays the family's. Order of the runs:
# first, for every dtype and kernel, the table's entry and the block sizes it replaced (PREVIOUS:
# the entries before the first H200 run, bench/results/2026-11-30-h200, and the half forward's
# before the three runs of 2026-12-04); then the other candidates (duplicates dropped).
PREVIOUS = {
    "half": {"fwd2": (128, 128, 8, 3), "bwd2": (128, 64, 8, 4)},
    "fp32": {"fwd2": (64, 128, 8, 3), "bwd2": (64, 128, 8, 3)},
}
#: The kernels timed, in order.
KERNELS = ("fwd2", "bwd2")
CANDIDATES = {
    # 128-wide tiles with >= 3 stages (ptxas keeps everything in registers on sm_90 but for the
    # float32 forward's SPILLS)
    "fwd2": [(128, 128, 8, 3), (128, 64, 8, 4), (64, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2)],
    "bwd2": [(128, 64, 8, 4), (128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
}
#: The candidates whose sm_90 build spills (local memory, by family and kernel; bytes per thread
#: under Triton 3.8 at this tool's shape), skipped among the other candidates: checked by
#: tests/kernels/test_kernel_launched_builds.py against the builds of this tool's launches. The
#: float32 forward keeps a 3xTF32 accumulator and its operands' splits: 128-wide tiles spill.
#: (64, 128, 8, 3), 16 B, is the float32 entry the first H200 run replaced (PREVIOUS): still timed.
SPILLS: Dict[str, Dict[str, List[tuple]]] = {
    "fp32": {"fwd2": [(128, 128, 8, 3),    # 120 B
                      (64, 128, 8, 3),     # 16 B
                      (128, 64, 4, 3),     # 432 B
                      (128, 128, 8, 2)]},  # 120 B
}
SMOKE_CANDIDATES = {"fwd2": [(32, 32, 4, 1)], "bwd2": [(32, 32, 4, 1)]}
#: Other ``CHUNK_ELEMENTS`` (kernels/line_margin.py) timed with the table's block sizes.
CHUNK_CANDIDATES = {"bwd2": (1 << 22, 1 << 23)}
SMOKE_CHUNK_CANDIDATES = {"bwd2": (1 << 12,)}  # the path only: one class tile is the least chunk
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALPHA = 16.0
PARITY_TOL = 1e-3  # same arithmetic, another summation order (float32 accumulation)


def _problem(B: int, C: int, D: int, dtype: torch.dtype, device: torch.device):
    """A line-margin call as DAALLoss makes it: unit embeddings, DAALLoss's initial segments
    (float32); margins and grad_out random."""
    from daal_triton import init_segments

    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    seg = init_segments(C, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    margins = 0.05 + 0.3 * torch.rand(B, generator=g)
    go = torch.rand(B, generator=g)
    return x.to(device, dtype), seg.to(device), labels.to(device), margins.to(device), go.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Timer:
    """Median time of calls: CUDA events on a GPU, the wall clock elsewhere (also bench/probe_h200.py)."""
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, reps: int) -> float:
        """Median seconds of ``reps`` calls of ``fn`` (after the caller's warm-up)."""
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        times.sort()
        return times[len(times) // 2]


def _plan(lm, shape, dtypes, cands, device, kernels=KERNELS, chunks=None):
    """``(runs, order)``: per (dtype, kernel) the operator to time and the table's entry; the
    jobs ``(dtype, kernel, (BLOCK_B, BLOCK_C, warps, stages, chunk elements or None), is_table)``
    in run order (None: the table's ``CHUNK_ELEMENTS``)."""
    chunks = CHUNK_CANDIDATES if chunks is None else chunks
    B, C, D = shape
    ops = torch.ops.daal_triton
    runs, plans = {}, []
    for dname in dtypes:
        fam = lm.config_family(DTYPES[dname])
        x, seg, labels, margins, go = _problem(B, C, D, DTYPES[dname], device)

        def fwd2(x=x, seg=seg, labels=labels, margins=margins):
            return ops.line_margin2(x, seg, labels, margins, ALPHA, 0.0)

        _, lse2, rs2, st2, sx2 = fwd2()

        def bwd2(go=go, x=x, seg=seg, sx=sx2, st=st2, labels=labels, lse=lse2, rs=rs2):
            return ops.line_margin2_backward(go, x, seg, sx, st, labels, lse, rs, ALPHA, 0.0)

        calls = {"fwd2": fwd2, "bwd2": bwd2}
        for kernel in kernels:
            table = lm.CONFIGS[fam][kernel]
            first = (table.blocks["BLOCK_B"], table.blocks["BLOCK_C"], table.num_warps, table.num_stages)
            runs[dname, kernel] = (fam, calls[kernel], table)
            prev = [PREVIOUS[fam][kernel]] if kernel in PREVIOUS.get(fam, {}) else []
            rest = [c for c in cands.get(kernel, []) if c not in prev and c not in SPILLS.get(fam, {}).get(kernel, ())]
            plans.append(([(dname, kernel, first + (None,), True)],
                          [(dname, kernel, c + (None,), False) for c in prev if c != first],
                          [(dname, kernel, first + (e,), False) for e in chunks.get(kernel, ())
                           if e != lm.CHUNK_ELEMENTS],
                          [(dname, kernel, c + (None,), False) for c in rest if c != first]))
    return runs, [job for stage in range(4) for p in plans for job in p[stage]]


def _measure(rec: dict, run, timer, reps: int, base_out: dict, is_table: bool, sync: bool) -> None:
    """Time ``run`` into ``rec`` and check its outputs against the table entry's (``base_out``)."""
    key = (rec["dtype"], rec["kernel"])
    t0 = time.monotonic()
    outs = [o for o in run() if o is not None]  # warm-up: compiles this entry
    if sync:
        torch.cuda.synchronize()
    rec["first_call_s"] = round(time.monotonic() - t0, 3)
    rec["seconds"] = timer(run, reps)
    base = base_out.get(key)
    if is_table:
        base_out[key], rec["status"] = outs, "measured"
    elif base is None:
        rec["status"] = "measured (not checked: the table's entry did not run)"
    else:
        err = max(_rel(o, b) for o, b in zip(outs, base))
        rec["max_rel_err_vs_table"] = err
        rec["status"] = "measured" if err <= PARITY_TOL else "WRONG: differs from the table's entry"


def try_candidate(rec: dict, deadline: float, configs: dict, entry: str, candidate, measure) -> None:
    """``measure()`` with ``configs[entry]`` replaced by ``candidate`` (restored after), unless
    ``deadline`` has passed; a failure is recorded in ``rec["status"]`` and the sweep goes on
    (also bench/tune_knn.py)."""
    if time.monotonic() > deadline:
        rec["status"] = "not run: out of the time budget"
        return
    table = configs[entry]
    configs[entry] = candidate
    try:
        measure()
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        rec["status"] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        configs[entry] = table


def write_records(out_path: str, records: List[dict], device: torch.device, smoke: bool) -> None:
    """``{"environment", "smoke", "records"}`` as JSON (also bench/tune_knn.py); a record the sweep
    did not finish (Ctrl-C, or the GPU check's ``timeout -s INT``) says so."""
    for rec in records:
        rec.setdefault("status", "not run: interrupted")
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if device.type == "cuda" else None)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    with open(out_path, "w") as f:
        json.dump(dict(environment=env, smoke=smoke, records=records), f, indent=1)


def tune(out_path: str, *, shape=(1024, 100_000, 512), dtypes=("bf16", "fp32"), reps: int = 10,
         budget_s: float = 90.0, smoke: bool = False, kernels=KERNELS) -> List[dict]:
    """Time the candidates (see the module docstring); writes ``out_path`` and returns the records."""
    from daal_triton.kernels import line_margin as lm
    from runner import peak_extra  # the benchmarks' own peak-memory reading

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        raise SystemExit("no CUDA GPU: run with --smoke on the CPU (under TRITON_INTERPRET=1)")
    B, C, D = shape
    timer = Timer(device)
    deadline = time.monotonic() + budget_s
    runs, order = _plan(lm, shape, dtypes, SMOKE_CANDIDATES if smoke else CANDIDATES, device,
                        tuple(kernels), SMOKE_CHUNK_CANDIDATES if smoke else CHUNK_CANDIDATES)
    records, base_out = [], {}
    try:  # what was measured is written even when the step's time runs out (SIGINT) mid-sweep
        for n, (dname, kernel, (bb, bc, w, s, chunk), is_table) in enumerate(order):
            fam, run, table = runs[dname, kernel]
            rec = dict(run=n, dtype=dname, family=fam, kernel=kernel, B=B, C=C, D=D, BLOCK_B=bb,
                       BLOCK_C=bc, BLOCK_D=table.block_d_for(D), num_warps=w, num_stages=s,
                       table=is_table, device=str(device))
            if chunk:
                rec["chunk_elements"] = chunk
            records.append(rec)

            def measure(rec=rec, run=run, is_table=is_table, chunk=chunk):
                table_chunk = lm.CHUNK_ELEMENTS
                lm.CHUNK_ELEMENTS = chunk or table_chunk
                try:
                    _measure(rec, run, timer, 1 if smoke else reps, base_out, is_table, device.type == "cuda")
                    if device.type == "cuda":  # one more call: its peak above what was allocated before
                        rec["peak_extra_bytes"] = peak_extra(lambda: None, run, device)[0]
                finally:
                    lm.CHUNK_ELEMENTS = table_chunk

            try_candidate(rec, deadline, lm.CONFIGS[fam], kernel,
                          table.with_blocks(BLOCK_B=bb, BLOCK_C=bc, num_warps=w, num_stages=s), measure)
    finally:
        records.sort(key=lambda r: (dtypes.index(r["dtype"]), tuple(kernels).index(r["kernel"]),
                                    not r["table"]))
        write_records(out_path, records, device, smoke)
    print(line_margin_markdown(records))
    return records


def interpret_without_gpu() -> None:
    """For a ``--smoke`` run: Triton's interpreter when there is no GPU (also bench/tune_knn.py)."""
    from daal_triton.backend import interpreter_on

    if not torch.cuda.is_available() and not interpreter_on():
        if "triton" in sys.modules:
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    from interpreter import strict_interpreter

    strict_interpreter()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--budget-s", type=float, default=90.0)
    p.add_argument("--shape", default=None, help="B,C,D (default 1024,100000,512; smoke 40,70,33)")
    p.add_argument("--dtypes", default=None, help="default bf16,fp32 (smoke: fp32; the "
                   "interpreter cannot run bfloat16 dots)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--kernels", default=",".join(KERNELS), help="kernels to time, in order")
    p.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    a = p.parse_args(argv)
    if a.smoke:
        interpret_without_gpu()
    shape = tuple(int(v) for v in a.shape.split(",")) if a.shape else ((40, 70, 33) if a.smoke else (1024, 100_000, 512))
    dtypes = a.dtypes or ("fp32" if a.smoke else "bf16,fp32")
    recs = tune(a.out, shape=shape, dtypes=tuple(dtypes.split(",")), reps=a.reps,
                budget_s=a.budget_s, smoke=a.smoke, kernels=tuple(a.kernels.split(",")))
    bad = [r for r in recs if r["status"].startswith(("WRONG", "failed"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
