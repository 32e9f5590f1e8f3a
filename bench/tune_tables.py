"""The tuning tools' tables (bench/tune_line_margin.py, bench/tune_knn.py), torch-free: bench/report.py
renders a run's tuning records with them where torch is not installed."""
from __future__ import annotations

from typing import Dict, List, Optional

#: The share of rows whose neighbours another tile shape must give as the reference's do (a
#: bench/tune_knn.py candidate against the table's entry, a bench/probe_h200.py filter tile
#: against the default's): near-ties may swap when the GEMM sums in another order.
SAME_ROWS = 0.999


def _chunk_note(r: dict) -> str:
    """``", chunk 2^22"`` for a candidate class-chunk budget (the table's: nothing)."""
    e = r.get("chunk_elements")
    if not e:
        return ""
    return f", chunk 2^{e.bit_length() - 1}" if e & (e - 1) == 0 else f", chunk {e:,}"


def line_margin_markdown(records: List[dict]) -> str:
    """One table: per kernel and dtype, each candidate's median time relative to the table's, and
    its peak extra memory where measured (a GPU)."""
    lines = ["| dtype | kernel | BLOCK_B x BLOCK_C, warps, stages | median ms | speed-up | peak extra | status |",
             "|---|---|---|---|---|---|---|"]
    base: Dict[tuple, Optional[float]] = {}
    for r in records:
        if r.get("table") and "seconds" in r:
            base[(r["dtype"], r["kernel"])] = r["seconds"]
    for r in records:
        t = r.get("seconds")
        b = base.get((r["dtype"], r["kernel"]))
        rel = f"{b / t:.2f}x" if t and b else "—"
        cfg = (f"{r['BLOCK_B']}x{r['BLOCK_C']}, {r['num_warps']}, {r['num_stages']}" + _chunk_note(r)
               + (" (table)" if r.get("table") else ""))
        peak = r.get("peak_extra_bytes")
        mem = f"{peak / 1e6:.0f} MB" if peak is not None else "—"
        lines.append(f"| {r['dtype']} | {r['kernel']} | {cfg} | {t * 1e3:.3f} | {rel} | {mem} | {r['status']} |"
                     if t else f"| {r['dtype']} | {r['kernel']} | {cfg} | — | — | — | {r['status']} |")
    return "\n".join(lines)


def knn_markdown(records: List[dict]) -> str:
    """One table: per shape, each candidate's median time relative to the table's entry."""
    lines = ["| M = N | BLOCK_M x BLOCK_N, warps, stages (loop) | splits (resident) | median ms | speed-up "
             "| of matmul | status |", "|---|---|---|---|---|---|---|"]
    base: Dict[int, float] = {r["M"]: r["seconds"] for r in records if r.get("table") and "seconds" in r}
    matmul: Dict[int, float] = {r["M"]: r["matmul_seconds"] for r in records if r.get("matmul_seconds")}
    for r in records:
        t, b, mm = r.get("seconds"), base.get(r["M"]), matmul.get(r["M"])
        cfg = (f"{r['BLOCK_M']}x{r['BLOCK_N']}, {r['num_warps']}, {r['num_stages']}"
               + (", flat" if r.get("flat") else "")
               + (f", ≤ {r['maxnreg']} registers" if r.get("maxnreg") else "")
               + (", TMA loads" if r.get("loads") == "tma" else "")
               + (" (table)" if r.get("table") else ""))
        grid = f"{r['splits']} ({r['resident']})"
        time_s = f"{t * 1e3:.3f}" if t else "—"
        rel = f"{b / t:.2f}x" if t and b else "—"
        of_mm = f"{mm / t:.0%}" if t and mm else "—"
        lines.append(f"| {r['M']} | {cfg} | {grid} | {time_s} | {rel} | {of_mm} | {r['status']} |")
    return "\n".join(lines)
