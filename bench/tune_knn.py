"""Time alternative block sizes and grids of the kNN forward (``_knn_fwd_kernel``) on a GPU.

The first H200 run (bench/results/2026-11-30-h200) put the kNN forward at 12.8% of matmul at
60,000 x 60,000 (bf16, D = 512, k = 8), and its probe split a 128 x 128 tile's time into about a
third GEMM and two thirds merge. The table's entry (128 x 128, 8 warps) compiles to ~200
registers per thread on sm_90: one program per SM, so nothing overlaps one program's merge
(shuffles, a block-wide test per round) with another's tensor-core work. Entries with 4 warps
and 64- or 128-row tiles fit two programs per SM (registers x threads and shared memory from
``ptxas``; docs/kernels.md, "Compile facts"), at the price of more L2 traffic per FLOP. Which
wins is a GPU question; this tool asks it.

Since 2026-12-01 the candidates include the kernel's other loop structure (``FLAT``: one loop over
(tile, D-chunk) pairs, so the software pipeline loads the next tile while this one merges).

Also a register cap (Triton's ``maxnreg``) on the entry's own 128 x 128 tiles: 128 registers per
thread fit two programs per SM, at the price of spills in the merge.

Since 2026-12-01 (night) also tiles loaded through tensor descriptors (the Hopper TMA unit,
``DAAL_KNN_LOADS=tma``, set around the candidate's calls): fewer registers, so the capped entry
spills less and 4-warp tiles fit three programs per SM.

Since 2026-12-04 the default forward is the 64 x 128 / 4-warp descriptor candidate (the
``fwd_narrow`` entry: it timed 1.36-1.37x the table's entry on the 2026-12-04 H200 run); the
table's entry stays the baseline here (``DAAL_KNN_TILES=table`` around each call).

Since 2026-12-01 (day), first in the list: the wide tiles 256 x 128 and 128 x 256 on 8 warps with
descriptor loads (one program per SM, no spill): 85 FLOP per byte loaded from L2 instead of the
entry's 64 (docs/kernels.md, "Wider tiles").

For each candidate ``(BLOCK_M, BLOCK_N, num_warps, num_stages, FLAT[, maxnreg[, "tma"]])`` of the
forward entry serving ``k`` (``CONFIGS[family][fwd_kp*]``), and each shape ``M = N`` (the query is the reference set,
``exclude_self``, no labels: a retrieval evaluation), the forward ``knn`` (selection + fused
finish, no gradient) is timed with CUDA events (median of ``--reps`` calls after a warm-up that
compiles it) at the column splits the model picks for one program per SM, and — when it differs
— for the programs per SM the candidate's build allows (``knn._num_splits`` with waves of
SMs x resident; ``FWD_ALTERNATIVES`` in kernels/knn.py). Each
result is checked against the table entry's (and the table's entry is timed beside
``x @ x.T``, so that the table gives each candidate's time as a share of matmul's: the "of
matmul" column): the same neighbours in at least 99.9% of the rows
and distances within 1e-3 (another tile shape sums the GEMM in another order: near-ties may
swap). The table's entry runs first on every shape, then the candidates until ``--budget-s`` is
spent; the rest are recorded as not run. Writes JSON (``OUT``) and prints a Markdown table.
``--smoke``: tiny shapes on the CPU under Triton's interpreter (timings meaningless), so that the
tool cannot rot.

usage: python bench/tune_knn.py OUT.json [--budget-s 60] [--sizes 20000,60000] [--dtype bf16]
           [--k 8] [--reps 5] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from tune_line_margin import DTYPES, Timer, interpret_without_gpu, try_candidate, write_records
from tune_tables import SAME_ROWS, knn_markdown

#: (BLOCK_M, BLOCK_N, num_warps, num_stages, FLAT[, maxnreg[, loads]]) -> programs per SM (sm_90), after
#: the table's entry: ``kernels/knn.py``'s FWD_ALTERNATIVES (the tests assert their residency from
#: ptxas's report). The smoke run takes both loop structures and a register cap through the
#: interpreter.
SMOKE_CANDIDATES = {(32, 32, 4, 1, False): 1, (32, 32, 4, 1, True): 1, (32, 32, 4, 1, False, 128): 1,
                    (32, 32, 4, 1, False, None, "tma"): 1}
DIST_TOL = 1e-3


def _problem(n: int, D: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1).to(device, dtype)


def _splits(kk, n: int, bm: int, bn: int, device: torch.device, resident: int) -> int:
    return kk._num_splits(n, n, bm, bn, device, policy="model", resident=resident)


def _compare(out, base) -> Tuple[float, float]:
    """(fraction of rows with the same neighbours, max |dist - dist_table|)."""
    (d, i), (bd, bi) = out, base
    same = float((i == bi).all(dim=1).float().mean())
    return same, float((d - bd).abs().max()) if d.numel() else 0.0


def _plan(sizes, table, cands: Dict[tuple, int]) -> List[tuple]:
    """Jobs ``(n, blocks, resident, is_table)``: the table's entry on every size first, then the
    candidates (each at one program per SM, then at its residency where that is more)."""
    first = (table.blocks["BLOCK_M"], table.blocks["BLOCK_N"], table.num_warps, table.num_stages,
             table.blocks["FLAT"])
    jobs = [(n, first, 1, True) for n in sizes]
    for c, resident in cands.items():
        if c == first:
            continue
        for n in sizes:
            jobs += [(n, c, r, False) for r in sorted({1, resident})]
    return jobs


def _measure(rec: dict, n: int, S: int, inputs: Dict[int, torch.Tensor], base: Dict[int, tuple],
             timer, reps: int, is_table: bool, device: torch.device, D: int, dtype: torch.dtype,
             k: int) -> None:
    """Time the forward at M = N = n with S splits into ``rec`` and check it against the table
    entry's result (``base``); ``rec["loads"]`` is set as ``DAAL_KNN_LOADS`` around each call,
    and ``DAAL_KNN_TILES=table`` (the forward takes the entry the candidate replaces, not the
    default narrow one)."""
    from daal_triton.kernels import knn as kk

    if n not in inputs:
        inputs[n] = _problem(n, D, dtype, device)
    x = inputs[n]

    def call():
        # the table's entry (the candidate replaces it), whose loads DAAL_KNN_LOADS chooses
        settings = {kk.LOADS_ENV: rec["loads"], kk.TILES_ENV: "table"}
        old = {name: os.environ.get(name) for name in settings}
        os.environ.update(settings)
        try:
            with torch.no_grad():
                return kk._knn(x, x, k, exclude_self=True, splits=S)
        finally:
            for name, value in old.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    t0 = time.monotonic()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rec["first_call_s"] = round(time.monotonic() - t0, 3)
    rec["seconds"] = timer(call, reps)
    if is_table:
        base[n], rec["status"] = out, "measured"
        # the GEMM of the same shape, for the table's "of matmul" (issue 13's target: >= 60% at 60k)
        rec["matmul_seconds"] = timer(lambda: x @ x.T, reps)
    elif n not in base:
        rec["status"] = "measured (not checked: the table's entry did not run)"
    else:
        same, err = _compare(out, base[n])
        rec.update(same_rows=same, max_dist_diff=err)
        ok = same >= SAME_ROWS and err <= DIST_TOL
        rec["status"] = "measured" if ok else "WRONG: differs from the table's entry"


def tune(out_path: str, *, sizes=(20_000, 60_000), D: int = 512, dtype: str = "bf16", k: int = 8,
         reps: int = 5, budget_s: float = 60.0, smoke: bool = False) -> List[dict]:
    """Time the candidates (see the module docstring); writes ``out_path`` and returns the records."""
    from daal_triton.kernels import knn as kk
    from daal_triton.kernels._common import next_pow2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not smoke:
        raise SystemExit("no CUDA GPU: run with --smoke on the CPU (under TRITON_INTERPRET=1)")
    tdtype = DTYPES[dtype]
    fam = kk.family(tdtype)
    entry = kk.fwd_entry(next_pow2(k))
    table = kk.CONFIGS[fam][entry]
    timer = Timer(device)
    deadline = time.monotonic() + budget_s
    inputs: Dict[int, torch.Tensor] = {}
    base: Dict[int, tuple] = {}
    records, seen_grid = [], set()
    jobs = _plan(sizes, table, SMOKE_CANDIDATES if smoke else kk.fwd_alternatives())
    try:  # what was measured is written even when the step's time runs out (SIGINT) mid-sweep
        for run, (n, cand, resident, is_table) in enumerate(jobs):
            bm, bn, w, st, flat = cand[:5]
            maxnreg = cand[5] if len(cand) > 5 else None
            loads = cand[6] if len(cand) > 6 else "pointer"
            diag = bool(cand[7]) if len(cand) > 7 else False  # the lean epilogue's diagonal branch
            S = _splits(kk, n, bm, bn, device, resident)
            rec = dict(run=run, dtype=dtype, entry=entry, M=n, N=n, D=D, k=k, BLOCK_M=bm, BLOCK_N=bn,
                       num_warps=w, num_stages=st, flat=flat, maxnreg=maxnreg, loads=loads, resident=resident,
                       splits=S, table=is_table, device=str(device), diag_branch=diag)
            if (n, cand, S) in seen_grid:  # the same grid as at one program per SM
                continue
            seen_grid.add((n, cand, S))
            records.append(rec)
            try_candidate(rec, deadline, kk.CONFIGS[fam], entry,
                          table.with_blocks(BLOCK_M=bm, BLOCK_N=bn, FLAT=flat, num_warps=w, num_stages=st,
                                            maxnreg=maxnreg, DIAG_BRANCH=diag),
                          lambda: _measure(rec, n, S, inputs, base, timer, 1 if smoke else reps,
                                           is_table, device, D, tdtype, k))
    finally:
        records.sort(key=lambda r: (r["M"], not r["table"], r["run"]))
        write_records(out_path, records, device, smoke)
    print(knn_markdown(records))
    return records


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--budget-s", type=float, default=60.0)
    p.add_argument("--sizes", default=None, help="M = N values (default 20000,60000; smoke 70,130)")
    p.add_argument("--dim", type=int, default=None, help="D (default 512; smoke 40: rows of 16-byte "
                   "multiples, so the descriptor candidate loads through descriptors)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default bf16; smoke fp16: the "
                   "interpreter cannot run bfloat16 dots)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes")
    a = p.parse_args(argv)
    if a.smoke:
        interpret_without_gpu()
    sizes = tuple(int(v) for v in a.sizes.split(",")) if a.sizes else ((70, 130) if a.smoke else (20_000, 60_000))
    recs = tune(a.out, sizes=sizes, D=a.dim or (40 if a.smoke else 512),
                dtype=a.dtype or ("fp16" if a.smoke else "bf16"), k=a.k, reps=a.reps,
                budget_s=a.budget_s, smoke=a.smoke)
    bad = [r for r in recs if r["status"].startswith(("WRONG", "failed"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
