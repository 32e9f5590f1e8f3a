#!/usr/bin/env python3
"""Markdown tables from benchmark runs (standard library only: runs anywhere, no torch needed).

    python bench/report.py RUN_DIR [-o FILE]     # one run -> Markdown (default RUN_DIR/report.md,
                                                 # never over an existing one; -o - prints it)
    python bench/report.py --readme              # bench/README.md from every run in bench/results/

A run directory (what ``bench/gpu_check.sh OUTDIR`` writes) holds ``records.jsonl`` (one JSON
object per benchmark case, written as the run goes, including the skipped and failed ones, plus
the environment and the matmul baselines), and optionally ``env.json``, ``bench.json``
(pytest-benchmark's ``--benchmark-json``; used when ``records.jsonl`` is missing),
``steps.json`` (the script's steps) and ``*.xml`` (JUnit results of the parity tests).

Only what a run measured is ever printed: a missing measurement is shown as missing, with why.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
import xml.etree.ElementTree as ET
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported from a file path rather than run as bench/report.py
    sys.path.insert(0, HERE)

from cases import DTYPES, PASSES, PROVIDERS, SHAPES, SWITCH_NOISE, SWITCHES, TARGETS  # noqa: E402  (torch-free)
from tune_tables import SAME_ROWS  # noqa: E402  (torch-free)

OPS = ("knn", "line_margin", "loss", "pairwise")
OP_TITLES = {
    "pairwise": "Pairwise distance",
    "knn": "k nearest neighbours",
    "line_margin": "Line margin (fused, steps 5-6)",
    "loss": "Whole DAALLoss",
}
SHAPE_ORDER = ("tiny", "dml", "large", "bank", "bank_d129", "large_d129", "large_odd", "classes11k", "classes100k", "classes1m",
               "eval60k")
PROVIDER_TITLES = {"triton": "Triton", "eager": "eager", "compile": "compile", "chunked": "chunked",
                   "triton_v1": "Triton v1", "triton_aten_glue": "Triton, PyTorch glue",
                   "triton_graphed": "Triton, CUDA graphs",
                   "triton_aten_finish": "Triton (aten finish)",
                   "triton_wave_splits": "Triton (wave splits)",
                   "triton_atomic_own": "Triton, atomic own rows",
                   "triton_checked_merge": "Triton, checked merge",
                   "triton_separate": "Triton, separate launches",
                   "triton_tma": "Triton, TMA loads", "triton_wide": "Triton, wide tiles",
                   "triton_table": "Triton, table tiles", "triton_plain": "Triton, plain epilogue",
                   "triton_gluon": "Triton, Gluon forward", "triton_gluon128": "Triton, Gluon forward, 128 rows",
                   "triton_threshold": "Triton, threshold selection",
                   "triton_threshold_half": "Triton, threshold selection on half the tiles",
                   "triton_unaligned": "Triton, unaligned rows",
                   "triton_xu_difference": "Triton, x.u as x.q - x.p",
                   "triton_copy_whole": "Triton, whole copy saved"}
#: Providers that earlier runs measured and the benchmarks no longer run: the line margin's first
#: design and the kNN's aten finish, removed after the 2026-11-30 H200 run decided against them
#: (docs/kernels.md, "Measured results"). Their stored results still render, after the others.
RETIRED_PROVIDERS = {"knn": ("triton_aten_finish",), "line_margin": ("triton_v1",)}


def columns(op: str, run: Optional[dict] = None) -> Tuple[str, ...]:
    """The providers of ``op``'s table, in column order: today's, then the retired ones, then (given
    ``run``) any other its records hold (a provider renamed or removed since: shown under its own name)."""
    known = tuple(PROVIDERS.get(op, ())) + RETIRED_PROVIDERS.get(op, ())
    if run is None:
        return known
    others = sorted({str(k[4]) for k in run["cases"] if k[0] == op and k[4] not in known})
    return known + tuple(others)


def title(provider: str) -> str:
    return PROVIDER_TITLES.get(provider, f"`{provider}`")


def table_ops(run: dict) -> Tuple[str, ...]:
    """The operators with a table in ``run``: the known ones in order, then any other its records
    name (an operator renamed since), never dropped without a word."""
    others = sorted({str(k[0]) for k in run["cases"] if k[0] not in OPS and k[0] != "train_step"})
    return OPS + tuple(others)

# the training step's providers are the losses it trains with
STEP_PROVIDER_TITLES = {"triton": "DAAL (Triton)", "eager": "DAAL (reference)",
                        "proxyanchor": "ProxyAnchor (PML)", "ce_floor": "CE floor"}
STEP_SHAPE_ORDER = ("tiny",) + tuple(SHAPES["train_step"])


# ----------------------------------------------------------------------------- loading
def _read_jsonl(path: str) -> List[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed run
                continue
    return out


def _from_benchmark_json(path: str) -> List[dict]:
    """Case records rebuilt from pytest-benchmark's JSON (measured cases only)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    recs = []
    for b in data.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        if "op" not in info:
            continue
        stats = b.get("stats") or {}
        info.setdefault("kind", "case")
        if "median_s" not in info:  # the runner's summary (after the NaN check) never ran: pytest-
            # benchmark exports a case that failed or was interrupted after its timed rounds too
            info["status"] = "error: not confirmed (bench.json alone: the case did not finish its checks)"
            recs.append(info)
            continue
        info.setdefault("status", "ok")
        info.setdefault("median_s", stats.get("median"))
        info.setdefault("mean_s", stats.get("mean"))
        info.setdefault("min_s", stats.get("min"))
        info.setdefault("rounds", stats.get("rounds"))
        recs.append(info)
    mi = data.get("machine_info") or {}
    recs.append(dict(kind="env", source="bench.json", date=data.get("datetime"),
                     python=mi.get("python_version")))
    return recs


def load_run(run_dir: str) -> dict:
    """Everything a run directory holds, as plain dicts."""
    run = dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)), env={}, cases={},
               matmul=[], steps=[], junit=[], tuning=None, knn_tuning=None, probe=[])
    recs: List[dict] = []
    rec_path = os.path.join(run_dir, "records.jsonl")
    bench_path = os.path.join(run_dir, "bench.json")
    if os.path.exists(rec_path):
        recs = _read_jsonl(rec_path)
    elif os.path.exists(bench_path):
        try:
            recs = _from_benchmark_json(bench_path)
        except (OSError, ValueError) as exc:  # empty or cut short (a step killed while pytest-benchmark wrote it)
            run["bench_unreadable"] = f"{type(exc).__name__}: {exc}"
    for r in recs:
        kind = r.get("kind")
        if kind == "env":
            run["env"].update({k: v for k, v in r.items() if v is not None})
        elif kind == "matmul":
            run["matmul"].append(r)
        elif kind == "case":
            key = (r.get("op"), r.get("shape"), r.get("dtype"), r.get("pass_"), r.get("provider"))
            m = r.get("median_s")
            if r.get("status") == "ok" and m is not None and not (isinstance(m, (int, float)) and 0 < m < math.inf):
                # NaN (a JSON NaN reads as one), zero, negative, a string: no time, whatever the status says
                r = dict(r, status=f"error: invalid median ({m!r})")
            run["cases"][key] = r  # a later record of the same case wins
    env_path = os.path.join(run_dir, "env.json")
    if os.path.exists(env_path):
        try:
            with open(env_path, encoding="utf-8") as f:
                run["env"].update({k: v for k, v in json.load(f).items() if v is not None})
        except (OSError, json.JSONDecodeError):
            pass
    for key, name in (("steps", "steps.json"), ("probe", "probe.jsonl")):  # one JSON per line
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            try:
                run[key] = _read_jsonl(path)
            except OSError:
                pass
    for xml in sorted(glob.glob(os.path.join(run_dir, "*.xml"))):
        summary = junit_summary(xml)
        if summary:
            run["junit"].append(summary)
    for key, name in (("tuning", "tune_line_margin.json"), ("knn_tuning", "tune_knn.json")):
        tune_path = os.path.join(run_dir, name)
        if os.path.exists(tune_path):
            try:
                with open(tune_path, encoding="utf-8") as f:
                    run[key] = json.load(f)
            except (OSError, json.JSONDecodeError):
                pass
    return run


def junit_summary(path: str) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:  # cut by a killed step: said, not dropped
        return dict(name=os.path.basename(path), tests="?", failures="?", errors="?", skipped="?", failed=[],
                    unreadable=f"{type(exc).__name__}: {exc}")
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = dict(name=os.path.basename(path), tests=0, failures=0, errors=0, skipped=0, failed=[])
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            total[k] += int(s.get(k, 0) or 0)
        for tc in s.iter("testcase"):
            if tc.find("failure") is not None or tc.find("error") is not None:
                total["failed"].append(f"{tc.get('classname', '')}::{tc.get('name', '')}")
    return total


# ----------------------------------------------------------------------------- formatting
def fmt_time(s: Optional[float], digits: int = 3) -> str:
    if s is None:
        return "—"
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.{digits}g} ms"
    return f"{s * 1e6:.{digits}g} µs"


def fmt_peak(r: dict) -> str:
    """A record's peak extra memory, and the CUDA graphs' pool beside it where one was reserved
    at capture (``triton_graphed``: a replay allocates next to nothing, the pool holds it all)."""
    pool = r.get("graph_pool_bytes")
    return fmt_bytes(r.get("peak_extra_bytes")) + (f" + {fmt_bytes(pool)} graph pool" if pool else "")


def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "—"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= div:
            return f"{b / div:.3g} {unit}"
    return f"{int(b)} B"


def fmt_ratio(r: Optional[float]) -> str:
    return "—" if r is None else f"{r:.3g}×"


def fmt_pct(f: Optional[float]) -> str:
    return "—" if f is None else f"{100 * f:.3g}%"


# (prefix of a record's status, what the tables show), first match wins
_SHORT = (("skipped: would need", "skip: memory"), ("skipped: out of memory", "OOM"),
          ("skipped: out of time budget", "skip: time budget"),
          ("skipped: Triton kernel not available", "skip: no kernel"),
          ("skipped: pytorch-metric-learning not installed", "skip: no PML"),
          ("skipped: torch.compile provider not run in the CPU", "skip: CPU"),
          ("too slow", "too slow"), ("error", "error"))


def short_status(status: str) -> str:
    s = status or ""
    if s == "ok":
        return "ok"
    return next((short for prefix, short in _SHORT if s.startswith(prefix)), "skipped")


def dims_text(dims: dict) -> str:
    if not dims:
        return ""
    keys = [k for k in ("B", "C", "M", "N", "D", "k") if k in dims]
    text = " ".join(f"{k}={dims[k]:,}" if isinstance(dims[k], int) else f"{k}={dims[k]}" for k in keys)
    extra = []
    if dims.get("labels"):
        extra.append(f"same-class of {dims['labels']}")
    if dims.get("self"):
        extra.append("self excluded")
    if dims.get("grad") is False:
        extra.append("no_grad")
    return text + (f" ({', '.join(extra)})" if extra else "")


def _order(seq, value):
    return seq.index(value) if value in seq else len(seq)


def ok(rec: Optional[dict]) -> bool:
    return bool(rec) and rec.get("status") == "ok" and rec.get("median_s") is not None


def median(rec: Optional[dict]) -> Optional[float]:
    return rec.get("median_s") if ok(rec) else None


def speedup(run: dict, key: Tuple, other: str) -> Optional[float]:
    """``time(other) / time(triton)`` for one (op, shape, dtype, pass)."""
    t = median(run["cases"].get(key + ("triton",)))
    o = median(run["cases"].get(key + (other,)))
    if t and o:
        return o / t
    return None


# ----------------------------------------------------------------------------- tables
def op_table(run: dict, op: str) -> List[str]:
    keys = sorted({k[:4] for k in run["cases"] if k[0] == op},
                  key=lambda k: (_order(SHAPE_ORDER, k[1]), str(k[1]), _order(DTYPES, k[2]), _order(PASSES, k[3])))
    if not keys:
        return []
    present = [p for p in columns(op, run) if any(k + (p,) in run["cases"] for k in keys)]
    others = [p for p in present if p != "triton"]
    head = ["shape", "dtype", "pass"] + [title(p) for p in present]
    head += [f"Triton vs {title(p)}" for p in others]
    head += ["Triton TFLOP/s", "Triton % of matmul", "peak extra memory (" + " / ".join(title(p) for p in present) + ")"]
    lines = [f"### {OP_TITLES.get(op, op)}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    last_shape = None
    for key in keys:
        _op, shape, dtype, pass_ = key
        recs = {p: run["cases"].get(key + (p,)) for p in present}
        any_rec = next((r for r in recs.values() if r), {})
        shape_cell = shape if shape == last_shape else f"{shape}: {dims_text(any_rec.get('dims') or {})}"
        last_shape = shape
        row = [shape_cell, dtype, pass_]
        for p in present:
            r = recs[p]
            if r is None:
                row.append("—")
            elif ok(r):
                row.append(fmt_time(r["median_s"]))
            else:
                row.append(short_status(r.get("status", "")))
                notes.append(f"- {shape} {dtype} {pass_}, {title(p)}: {r.get('status')}")
        for p in others:
            row.append(fmt_ratio(speedup(run, key, p)))
        tr = recs.get("triton")
        row.append(f"{tr['tflops']:.3g}" if ok(tr) and tr.get("tflops") else "—")
        row.append(fmt_pct(tr.get("matmul_fraction")) if ok(tr) else "—")
        row.append(" / ".join(fmt_peak(recs[p]) if ok(recs[p]) else "—" for p in present))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if notes:
        lines += ["Not measured:", ""] + notes + [""]
    return lines


def _why_missing(run: dict, key: Tuple, providers, field: str = "") -> str:
    """Why a comparison has no value: each provider's missing or failed record, else the field
    the measured records lack (a run of older code may not record it)."""
    parts = []
    for p in providers:
        r = run["cases"].get(key + (p,))
        if r is None:
            parts.append(f"{p}: not run")
        elif not ok(r):
            parts.append(f"{p}: {r.get('status')}")
    return "; ".join(parts) or (f"the records hold no {field}" if field else "no usable value in the records")


# A target decided on fewer timed rounds than this (a case cut short by the time budget) is
# marked indicative: one round's median is one call.
FEW_ROUNDS = 3


def _rounds(recs) -> Tuple[str, Optional[int]]:
    """The timed rounds behind a comparison, as a cell ("10 / 40"), and the fewest of them."""
    counts = [r.get("rounds") if ok(r) else None for r in recs]
    known = [c for c in counts if c is not None]
    if not known:
        return "—", None
    return " / ".join("—" if c is None else str(c) for c in counts), min(known)


# A ratio on its bound meets it whatever float division makes of it (0.3 / 0.1 is 2.9999999999999996):
# the bound is widened by this relative amount, as the switches' noise band is.
BOUND_SLACK = 1e-9


#: A GPU record is implausible above this fraction of the same run's ``torch.matmul`` FLOP/s (an
#: operator cannot do its useful FLOPs much faster than cuBLAS does a plain GEMM of them) or below
#: this median (seconds: less than a kernel launch). Either means a timing that did not wait for
#: the GPU, or a FLOP model counting work not done: such a record passes no target.
PLAUSIBLE_FRACTION = 1.1
PLAUSIBLE_MEDIAN_S = 2e-6


def implausible(run: dict, rec: Optional[dict]) -> Optional[str]:
    """Why ``rec`` (a record of a GPU run) cannot be a real measurement, or None."""
    env = run.get("env") or {}
    if not ok(rec) or not env.get("gpu") or env.get("profile") == "smoke":
        return None
    fraction = rec.get("matmul_fraction")
    if isinstance(fraction, (int, float)) and fraction > PLAUSIBLE_FRACTION:
        return f"{fmt_pct(fraction)} of torch.matmul's FLOP/s"
    if rec["median_s"] < PLAUSIBLE_MEDIAN_S:
        return f"a median of {fmt_time(rec['median_s'])}, less than a kernel launch"
    return None


def targets_table(run: dict) -> List[str]:
    lines = ["| target | measured | rounds | result |", "|---|---|---|---|"]
    for title, op, shape, dtype, pass_, kind, arg, thr in TARGETS:
        key = (op, shape, dtype, pass_)
        tr = run["cases"].get(key + ("triton",))
        value, shown = None, ""
        if kind == "fraction":
            value = tr.get("matmul_fraction") if ok(tr) else None
            shown = fmt_pct(value)
            if value is not None and tr.get("matmul_tflops"):
                shown += f" ({tr['tflops']:.3g} of {tr['matmul_tflops']:.3g} TFLOP/s)"
            passed = value is not None and value >= thr * (1 - BOUND_SLACK)
            missing = _why_missing(run, key, ["triton"], "matmul fraction")
        elif kind == "speedup":
            value = speedup(run, key, arg)
            shown = fmt_ratio(value)
            if value is not None:
                shown += f" ({fmt_time(median(run['cases'].get(key + (arg,))))} vs {fmt_time(median(tr))})"
            passed = value is not None and value >= thr * (1 - BOUND_SLACK)
            missing = _why_missing(run, key, ["triton", arg])
        elif kind == "overhead":
            ratio = speedup(run, key, arg)  # time(other) / time(triton)
            value = 1.0 / ratio - 1.0 if ratio else None
            if value is not None:
                theirs = fmt_time(median(run["cases"].get(key + (arg,))), 4)  # 2% apart: 4 digits
                # two decimals: a value that reads as the bound is one (+2.00% passes "at most 2%")
                value = round(value, 4)
                shown = f"{value:+.2%} ({fmt_time(median(tr), 4)} vs {theirs} of {STEP_PROVIDER_TITLES.get(arg, arg)})"
            passed = value is not None and value <= thr
            missing = _why_missing(run, key, ["triton", arg])
        else:  # memory
            other = run["cases"].get(key + (arg,))
            a = tr.get("peak_extra_bytes") if ok(tr) else None
            b = other.get("peak_extra_bytes") if ok(other) else None
            if a is not None and b:
                value = a / b
                shown = f"{fmt_pct(value)} ({fmt_bytes(a)} vs {fmt_bytes(b)})"
            passed = value is not None and value <= thr * (1 + BOUND_SLACK)
            missing = _why_missing(run, key, ["triton", arg], "peak extra memory")
        compared = [tr] + ([run["cases"].get(key + (arg,))] if kind != "fraction" else [])
        rounds, fewest = _rounds(compared)
        result = ("PASS" if passed else "FAIL") if value is not None else f"not measured ({missing})"
        if value is not None and any(implausible(run, rec) for rec in compared):
            result = "implausible (see the caveat above)"  # neither a PASS nor a FAIL
        if value is not None and fewest is not None and fewest < FEW_ROUNDS:
            result += f" (indicative: {fewest} timed round{'s' if fewest != 1 else ''})"
        lines.append(f"| {title} | {shown or '—'} | {rounds} | {result} |")
        if kind == "fraction":
            lines += _alternative_fractions(run, key, thr)
    return lines + [""]


def _alternative_fractions(run: dict, key: tuple, thr: float) -> List[str]:
    """Rows under a throughput target: the same case with each timed switch's alternative (a
    design that could become the default, e.g. ``DAAL_KNN_SELECT=threshold``), where the run
    measured it: what the default would read if a run decided for it. Not the target's result."""
    rows = []
    for sw in SWITCHES:
        rec = run["cases"].get(key + (sw.provider,))
        if sw.until or key not in sw.cases or not ok(rec) or rec.get("matmul_fraction") is None:
            continue
        value = rec["matmul_fraction"]
        shown = fmt_pct(value)
        if rec.get("tflops") and rec.get("matmul_tflops"):
            shown += f" ({rec['tflops']:.3g} of {rec['matmul_tflops']:.3g} TFLOP/s)"
        verdict = "would pass" if value >= thr * (1 - BOUND_SLACK) else "would fail"
        if implausible(run, rec):
            verdict = "implausible (see the caveat above)"
        rows.append(f"| ↳ the same with `{sw.env}={sw.alternative}` (an alternative, not the default) | {shown} "
                    f"| {_rounds([rec])[0]} | {verdict} |")
    return rows


#: The steps of gpu_check.sh that run tests (each writes ``<step>.xml``).
TEST_STEPS = ("gpu_tests", "kernel_tests", "build_tests")


def target_caveats(run: dict) -> List[str]:
    """What a reader must know before the targets table: parity tests that failed in the same run
    (a fast kernel that is wrong meets no target), a GPU other than the H200 the targets are set for."""
    notes = []
    failing = [j for j in run["junit"] if j.get("unreadable") or (j["failures"] or j["errors"])]
    if failing:
        names = ", ".join(j["name"] for j in failing)
        notes.append(f"**Caveat:** tests failed or could not be read in this run ({names}: see \"Test results\"): "
                     "a result below holds for the speed only, not for kernels shown correct.")
    # a test step stopped by its limit (124), killed, or not run: some tests never reported, and
    # their JUnit counts alone (a shard that hung writes none) read as a clean pass (a filing probe,
    # 2026-12-07); a step whose JUnit shows failures is said above
    said = {j["name"].rsplit(".", 1)[0] for j in failing}
    cut = [s for s in run["steps"] if s.get("step") in TEST_STEPS and s.get("rc") not in (0, 5)
           and s.get("step") not in said]
    if cut:
        names = ", ".join(f"{s.get('step')} ({'not run' if s.get('rc') is None else 'exit %s' % s.get('rc')})"
                          for s in cut)
        notes.append(f"**Caveat:** a test step did not finish ({names}: see \"Steps\"): tests it had not run or "
                     "reported are missing from \"Test results\", and a result below holds for the speed only.")
    odd = [f"{' '.join(map(str, key))} ({why})" for key, rec in sorted(run.get("cases", {}).items(), key=str)
           if (why := implausible(run, rec))]
    if odd:
        notes.append(f"**Caveat:** {len(odd)} record{'s' if len(odd) != 1 else ''} cannot be real measurements "
                     f"({'; '.join(odd[:5])}{' …' if len(odd) > 5 else ''}): a timing that did not wait for the "
                     "GPU or a FLOP model counting work not done; no target reads them as passed.")
    gpu = str(run["env"].get("gpu") or "")
    if gpu and "H200" not in gpu and run["env"].get("profile") != "smoke":
        notes.append(f"**Caveat:** measured on {gpu}, not an H200: the targets are set for an H200.")
    return [n + "\n" for n in notes]


def _reading(ratio: float, above: str, below: str, what: str) -> str:
    """``above`` / ``below`` for a ratio above / below 1 by more than ``SWITCH_NOISE``, else
    "<what>within 3%" (the bound itself included: 1.03 is no decision)."""
    if abs(ratio - 1.0) <= SWITCH_NOISE * (1 + BOUND_SLACK):
        return f"{what}within {SWITCH_NOISE:.0%}"
    return above if ratio > 1 else below


def switch_rows(run: dict) -> List[Tuple[object, tuple, str, str]]:
    """``(switch, case, table row, reading)`` for each internal switch (``cases.SWITCHES``) the run
    timed and each of its cases: the default's and the alternative's times, their ratio, peak
    memory, and what the numbers say (a difference within ``SWITCH_NOISE`` decides nothing)."""
    rows = []
    date = str(run.get("env", {}).get("date", ""))[:10]
    for sw in SWITCHES:
        for key in sw.cases:
            d, a = run["cases"].get(key + ("triton",)), run["cases"].get(key + (sw.provider,))
            if not sw.applies_to(run.get("env", {})) or (a is None and not date):  # another design then
                continue
            td, ta = median(d), median(a)
            rounds, fewest = _rounds([d, a])
            if td and ta:
                ratio = ta / td
                reading = _reading(ratio, f"{sw.default} faster", f"{sw.alternative} faster", "")
                if fewest is not None and fewest < FEW_ROUNDS:
                    reading += f" (indicative: {fewest} timed round{'s' if fewest != 1 else ''})"
                shown = fmt_ratio(ratio)
            else:
                reading, shown = f"not measured ({_why_missing(run, key, ['triton', sw.provider])})", "—"
            mem = " / ".join(fmt_bytes(r.get("peak_extra_bytes")) if ok(r) else "—" for r in (d, a))
            if sw.memory and ok(d) and ok(a) and d.get("peak_extra_bytes") and a.get("peak_extra_bytes"):
                reading += "; " + _reading(a["peak_extra_bytes"] / d["peak_extra_bytes"],
                                           f"less memory: {sw.default}", f"less memory: {sw.alternative}", "memory ")
            # the alternative and the operator named: switches share a variable (DAAL_KNN_TILES: table,
            # wide, gluon, gluon128) and one switch times the kernel and the whole loss (a probe, 2026-12-07)
            rows.append((sw, key, f"| `{sw.env}={sw.alternative}` | {' '.join(key)} | "
                                  f"{fmt_time(td) if td else '—'} | {fmt_time(ta) if ta else '—'} | {shown} | {rounds} | {mem} | {reading} |",
                         (shown + " " + reading) if td and ta else ""))
    return rows


def switches_table(run: dict, heading_level: int = 2) -> List[str]:
    """The internal switches the run timed (:func:`switch_rows`), as a Markdown table."""
    rows = [row for _sw, _key, row, _reading in switch_rows(run)]
    if not rows:
        return []
    h = "#" * heading_level
    return [f"{h}# Switches kept until a GPU run decides", "",
            "Each switch's default (provider `triton`) beside its alternative, same run; \"alternative / "
            "default\" = time(alternative) / time(default) (above 1: the default is faster); peak extra "
            "memory default / alternative.", "",
            "| switch | case | default | alternative | alternative / default | rounds | peak memory | reading |",
            "|---|---|---|---|---|---|---|---|"] + rows + [""]


def decided_readings(sw, runs: List[dict]) -> List[Tuple[str, str]]:
    """``(run name, "ratio reading")`` of a switch's first case, the one that decides it, in each
    run that timed both sides of it."""
    return [(run["name"], reading) for run in runs for o, key, _row, reading in switch_rows(run)
            if o is sw and key == sw.cases[0] and reading]


def decided_values(sw) -> Tuple[str, str]:
    """``(kept, other)``: the value a decided switch kept (its default unless ``Switch.kept``
    names the alternative) and the one it dropped."""
    kept = sw.kept or sw.default
    return kept, (sw.default if kept == sw.alternative else sw.alternative)


def decided_table(runs: List[dict], heading_level: int = 2) -> List[str]:
    """The switches the runs decided (``Switch.decided``): the default kept, the alternative no
    longer timed, why, and every run's reading of the case that decides it."""
    rows = []
    for sw in SWITCHES:
        if sw.decided:
            seen = "; ".join(f"`{name}` {reading}" for name, reading in decided_readings(sw, runs)) or "—"
            kept, other = decided_values(sw)
            rows.append(f"| `{sw.env}` | {kept} | {other} | {sw.decided} | "
                        f"{' '.join(sw.cases[0][1:])} | {seen} |")
    if not rows:
        return []
    h = "#" * heading_level
    return [f"{h}# Switches decided", "",
            "Kept: the code's default (the switch's default, or its alternative where the runs decided for "
            "it); no longer timed: the other (its variable still selects it). Each run's reading of the case "
            "that decides: time(alternative) / time(default) as that run named them, and what it says.", "",
            "| switch | kept | no longer timed | decided | case | readings |", "|---|---|---|---|---|---|"] + rows + [""]


def work_model_table(run: dict, heading_level: int = 2) -> List[str]:
    """The line-margin work model (bench/work_model.py: flops and bytes per kernel, from the shape)
    beside the measured fwd+bwd times of the ``triton`` provider, for every line-margin shape the
    run measured: the achieved rate on the flops the kernels do. (Runs before the first design's
    removal also timed ``triton_v1``; the model has no rows for it now.)"""
    import work_model as wm

    keys = sorted({k[:4] for k in run["cases"] if k[0] == "line_margin" and k[3] == "fwdbwd"
                   and ok(run["cases"].get(k[:4] + ("triton",)))},
                  key=lambda k: (_order(SHAPE_ORDER, k[1]), str(k[1]), _order(DTYPES, k[2])))
    if not keys:
        return []
    h = "#" * heading_level
    lines = [f"{h}# Line-margin work model beside the measured times", "",
             "Flops and compulsory bytes of the kernels from bench/work_model.py (estimates); time = "
             "this run's median fwd+bwd (Triton); TFLOP/s = the kernels' own flops / time.", "",
             "| shape | dtype | GFLOP (·BCD) | DRAM GB | global RMW GB | time | TFLOP/s | GB/s (DRAM) |",
             "|---|---|---|---|---|---|---|---|"]
    # the copy [p~, u~] of DAAL_LM_XU=dot where the run's code had it (earlier runs: x.q - x.p)
    xu = any(sw.env == "DAAL_LM_XU" and sw.applies_to(run.get("env") or {}) for sw in SWITCHES)
    # and its copy per class chunk in the backward (DAAL_LM_COPY=chunks) where the run's code had it
    copy = "chunks" if any(sw.env == "DAAL_LM_COPY" and sw.applies_to(run.get("env") or {})
                           for sw in SWITCHES) else "whole"
    for key in keys:
        _op, shape, dtype, _pass = key
        d = SHAPES["line_margin"].get(shape) or (run["cases"].get(key + ("triton",)) or {}).get("dims") or {}
        if not d:
            continue
        s = wm.summary(d["B"], d["C"], d["D"], dtype, xu=xu, copy=copy)
        t = median(run["cases"].get(key + ("triton",)))
        lines.append(f"| {shape} | {dtype} | {s['flops'] / 1e9:.0f} "
                     f"({s['flops'] / (d['B'] * d['C'] * d['D']):.0f}) | {s['dram_bytes'] / 1e9:.2f} | "
                     f"{s['rmw_bytes'] / 1e9:.2f} | {fmt_time(t)} | "
                     f"{s['flops'] / t / 1e12:.3g} | {s['dram_bytes'] / t / 1e9:.0f} |")
    return lines + [""]


def train_step_table(run: dict) -> List[str]:
    """One row per (shape, loss): step time, images/s, the step relative to the CE floor's, the
    loss's forward+backward (CUDA events inside the step) and its share, peak memory."""
    keys = sorted({k[:4] for k in run["cases"] if k[0] == "train_step"},
                  key=lambda k: (_order(STEP_SHAPE_ORDER, k[1]), str(k[1]), _order(DTYPES, k[2])))
    if not keys:
        return []
    head = ["shape", "loss", "step", "images/s", "vs CE floor", "loss fwd+bwd", "loss share",
            "peak memory (extra)"]
    lines = ["### Training step (forward, loss, backward, AdamW step)", "",
             "\"vs CE floor\" = step time / the CE floor's − 1 (what the loss adds to training); "
             "\"loss share\" = the loss's forward+backward / the whole step, both from marks inside "
             "each step (CUDA events on a GPU); peak memory = `max_memory_allocated` during a step "
             "(network, optimiser state and images included), and above what was allocated before it.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for key in keys:
        _op, shape, dtype, _pass = key
        floor = median(run["cases"].get(key + ("ce_floor",)))
        first = True
        for p in columns("train_step", run):
            r = run["cases"].get(key + (p,))
            if r is None:
                continue
            d = r.get("dims") or {}
            cell = ""
            if first:
                width = f" (width {d['width']:g})" if d.get("width") else ""
                size = ", ".join(f"{n}={d[n]:,}" if isinstance(d[n], int) else f"{n}={d[n]}"
                                 for n in ("B", "C", "D") if d.get(n) is not None)
                net = " ".join(str(v) for v in (d.get("arch"), width.strip() or None,
                                                f"{d['H']}²" if d.get("H") else None) if v)
                cell = f"{shape}: " + ", ".join(v for v in (net, size, 'bf16 autocast' if dtype == 'bf16' else dtype) if v)
                first = False
            row = [cell, STEP_PROVIDER_TITLES.get(p, p)]
            if ok(r):
                t = r["median_s"]
                row += [fmt_time(t, 4), f"{r['images_per_s']:,.0f}" if r.get("images_per_s") else "—",
                        f"{t / floor - 1:+.1%}" if floor and p != "ce_floor" else "—",
                        fmt_time(r.get("loss_s")), fmt_pct(r.get("loss_share")),
                        f"{fmt_bytes(r['peak_bytes'])} ({fmt_bytes(r.get('peak_extra_bytes'))})"
                        if r.get("peak_bytes") else "—"]
            else:
                row += [short_status(r.get("status", ""))] + ["—"] * 5
                notes.append(f"- {shape}, {STEP_PROVIDER_TITLES.get(p, p)}: {r.get('status')}")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if notes:
        lines += ["Not measured:", ""] + notes + [""]
    return lines


def env_lines(run: dict) -> List[str]:
    env = run["env"]
    items = [
        ("GPU", env.get("gpu") or ("none (CPU smoke run)" if env.get("profile") == "smoke" else
                                   "unknown (env.json unreadable: see nvidia-smi.txt)")),
        ("torch failed to import", env.get("torch_error")),
        ("compute capability", env.get("capability")),
        ("GPU memory", f"{env['gpu_memory_gib']} GiB" if env.get("gpu_memory_gib") else None),
        ("torch", env.get("torch")), ("CUDA", env.get("cuda")), ("triton", env.get("triton")),
        ("pytest-benchmark", env.get("pytest_benchmark")), ("python", env.get("python")),
        ("date (UTC)", env.get("date")), ("profile", env.get("profile")),
        ("install", env.get("install")),
        ("git revision", env.get("git_revision")),
        ("source digest", env.get("source_sha256") and f"{env['source_sha256'][:16]} (`python bench/report.py "
                                                         "--source-digest` of a checkout: the same code when equal)"),
    ]
    return [f"- {k}: {v}" for k, v in items if v] + [""]


#: The files whose contents make a run's code: the package, its kernels and reference, the benchmarks.
SOURCE_GLOBS = ("daal_triton/**/*.py", "kernels/*.py", "reference/*.py", "bench/*.py", "bench/*.sh", "setup.py")


def source_digest(root: str) -> str:
    """SHA-256 over the paths and contents of :data:`SOURCE_GLOBS` under ``root`` (sorted), so that a
    run's ``env.json`` ties its numbers to the code, with or without a git checkout on the GPU."""
    import hashlib

    h = hashlib.sha256()
    paths = sorted({os.path.relpath(p, root) for g in SOURCE_GLOBS
                    for p in glob.glob(os.path.join(root, g), recursive=True)})
    for rel in paths:
        if "__pycache__" in rel:
            continue
        h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read() + b"\0")
    return h.hexdigest()


def _num(v, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def probe_table(run: dict, heading_level: int = 2) -> List[str]:
    """The probe's lines (bench/probe_h200.py, ``probe.jsonl``): host time per launch or call,
    and the kNN forward's parts and merges, as measured."""
    if not run.get("probe"):
        return []
    h = "#" * heading_level
    lines = [f"{h}# Probe (bench/probe_h200.py)", "",
             "Host µs: wall time per call on the host (launches included); GPU ms: CUDA-event time; "
             "µs per tile per SM: the kNN forward's time x SMs / its tiles; L2 TB/s: the bytes its "
             "tiles load from L2 (a model: bench/probe_h200.py, tile_bytes) per second.", "",
             "| section | what | host µs | GPU ms | TFLOP/s | µs per tile per SM | L2 TB/s |",
             "|---|---|---|---|---|---|---|"]
    # a line at the 60k evaluation's rows, against the same run's matmul there (issue 13's 60%)
    eval60k = run.get("cases", {}).get(("knn", "eval60k", "bf16", "fwd", "triton")) or {}
    mm60k = eval60k.get("matmul_tflops") if ok(eval60k) else None
    for r in run["probe"]:
        if r.get("name") == "error":
            last = (str(r.get("error", "")).strip().splitlines() or [""])[-1][:200]
            lines.append(f"| {r.get('section', '')} | error: {last} | | | | | |")
            continue
        gpu_ms = r.get("ms", r.get("gpu_ms"))
        name = r.get("name", "")
        if r.get("same_rows") is not None:  # another tile shape's neighbours against the default's
            name += f"; the same neighbours in {r['same_rows']:.2%} of rows"
            name += "" if r["same_rows"] >= SAME_ROWS else f" (WRONG: fewer than {SAME_ROWS:.1%})"
        if mm60k and r.get("tflops") and r.get("n") == SHAPES["knn"]["eval60k"]["M"]:
            name += f" [{r['tflops'] / mm60k:.1%} of the benchmarks' matmul at 60k]"
        lines.append(f"| {r.get('section', '')} | {name} | {_num(r.get('host_us'), '.1f')} "
                     f"| {_num(gpu_ms, '.3f')} | {_num(r.get('tflops'), '.1f')} "
                     f"| {_num(r.get('us_per_tile_per_sm'), '.2f')} | {_num(r.get('l2_tb_per_s'), '.2f')} |")
    return lines + [""] + tiles_reading(run["probe"])


#: How close (relative) a tile shape's time must follow its L2 bytes, or stay level with the
#: 128 x 128 tiles', for the probe's ``tiles`` section to read one way or the other.
TILES_TOLERANCE = 0.15


def tiles_reading(probe: List[dict]) -> List[str]:
    """The probe's ``tiles`` section against the L2 byte model (docs/kernels.md, "Wider tiles"):
    each shape's time and L2 bytes relative to the 128 x 128 tiles', and what they say: the time
    follows the bytes (L2 bound), stays level (bound elsewhere), or neither."""
    rows = [r for r in probe if r.get("section") == "tiles" and r.get("ms") and r.get("l2_bytes")
            and r.get("blocks")]
    out = []
    for tma in (False, True):  # each way of loading against its own 128 x 128 (since 2026-12-04: TMA too)
        same = [r for r in rows if bool(r.get("tma")) == tma]
        base = next((r for r in same if list(r["blocks"][:2]) == [128, 128]), None)
        if base is None or len(same) < 2:
            continue
        for r in same:
            t, b = r["ms"] / base["ms"], r["l2_bytes"] / base["l2_bytes"]
            if r is base:
                reading = "(the reference)"
            elif abs(t / b - 1) <= TILES_TOLERANCE:
                reading = "follows the L2 bytes"
            elif abs(t - 1) <= TILES_TOLERANCE:
                reading = "level: not L2-bound"
            else:
                reading = "neither"
            bm, bn, w = r["blocks"][:3]
            out.append(f"| {bm} x {bn}, {w}{', TMA loads' if tma else ''} | {t:.2f} | {b:.2f} | {reading} |")
    if not out:
        return []
    return ["Tile shapes against the L2 byte model (`gemm_min`: the forward's tiles without the merge; "
            "each way of loading against its own 128 x 128):", "",
            "| tiles, warps | time / 128 x 128's | L2 bytes / 128 x 128's | reading |", "|---|---|---|---|"] + out + [""]


def run_report(run: dict, *, heading_level: int = 2) -> List[str]:
    h = "#" * heading_level
    lines = [f"{h} Run `{run['name']}`", ""] + env_lines(run)
    if run["env"].get("profile") == "smoke" or (run["env"] and not run["env"].get("gpu")):
        lines += ["**CPU smoke run**: tiny shapes, the Triton provider under Triton's interpreter. "
                  "These times say nothing about performance; targets are for an H200.", ""]
    if run["steps"]:
        lines += [f"{h}# Steps", "", "| step | exit status | seconds | note |", "|---|---|---|---|"]
        for s in run["steps"]:
            rc = s.get("rc")
            note = "timed out" if rc in (124, 137) else s.get("note", "")
            lines.append(f"| {s.get('step')} | {rc} | {s.get('seconds')} | {note} |")
        lines.append("")
    if run["junit"]:
        lines += [f"{h}# Test results (JUnit)", "", "| file | tests | failures | errors | skipped |",
                  "|---|---|---|---|---|"]
        for j in run["junit"]:
            name = j["name"] + (f" (unreadable, cut short? {j['unreadable']})" if j.get("unreadable") else "")
            lines.append(f"| {name} | {j['tests']} | {j['failures']} | {j['errors']} | {j['skipped']} |")
        failed = [f for j in run["junit"] for f in j["failed"]]
        lines.append("")
        if failed:
            lines += ["Failed:", ""] + [f"- `{f}`" for f in failed[:50]]
            lines += [f"- … and {len(failed) - 50} more"] if len(failed) > 50 else []
            lines.append("")
    if run["tuning"] and run["tuning"].get("records"):
        from tune_tables import line_margin_markdown

        recs = run["tuning"]["records"]
        r0 = recs[0]
        lines += [f"{h}# Line-margin block sizes (bench/tune_line_margin.py)", "",
                  f"B={r0['B']}, C={r0['C']}, D={r0['D']}; one kernel varied at a time; "
                  "\"speed-up\" = time(table's entry) / time(candidate).", "",
                  line_margin_markdown(recs), ""]
    if run.get("knn_tuning") and run["knn_tuning"].get("records"):
        from tune_tables import knn_markdown

        r0 = run["knn_tuning"]["records"][0]
        lines += [f"{h}# kNN forward block sizes and grids (bench/tune_knn.py)", "",
                  f"{r0['dtype']}, D={r0['D']}, k={r0['k']}, query = reference set, forward only; "
                  "splits sized for 1 or 2 programs per SM (\"resident\"); \"speed-up\" = "
                  "time(table's entry) / time(candidate).", "",
                  knn_markdown(run["knn_tuning"]["records"]), ""]
    lines += probe_table(run, heading_level)
    if not run["cases"]:
        lines += ["No benchmark case was recorded in this run"
                  + (f" (bench.json unreadable, cut short? {run['bench_unreadable']})." if run.get("bench_unreadable")
                     else "."), ""]
        return lines
    lines += [f"{h}# Targets (issues 6, 13 and 17, H200)", "",
              "\"rounds\": the timed rounds behind each side of the comparison (Triton first); a "
              f"result from fewer than {FEW_ROUNDS} (a case the time budget cut short) is marked "
              "indicative. A row \"↳ the same with ...\" under a throughput target: an internal switch's "
              "alternative on the same case, what the default would read if a run decided for it (not "
              "the target's result).", ""] + target_caveats(run) + targets_table(run)
    lines += switches_table(run, heading_level)
    lines += [f"{h}# Results", "",
              "Median time per call; \"Triton vs X\" = time(X) / time(Triton) (above 1: Triton is "
              "faster); \"% of matmul\" = the operator's useful FLOP/s over `torch.matmul`'s on a "
              "comparable GEMM in the same precision and run; peak extra memory = "
              "`max_memory_allocated` above what was allocated before the call. "
              f"`—`: not run: not in this run's profile ({run['env'].get('profile', '?')}; "
              "`check` is the subset gpu_check.sh runs, `full` every combination), or not reached "
              "by a run its time limit cut short (see Steps).", ""]
    for op in table_ops(run):
        lines += op_table(run, op)
    lines += work_model_table(run, heading_level)
    lines += train_step_table(run)
    if run["matmul"]:
        lines += [f"{h}# torch.matmul baselines", "", "| dtype | M × N × K | TFLOP/s |", "|---|---|---|"]
        for m in sorted(run["matmul"], key=lambda m: (m.get("dtype", ""), m.get("M", 0), m.get("N", 0))):
            t = f"{m['tflops']:.3g}" if m.get("tflops") else m.get("status", "")
            lines.append(f"| {m.get('dtype')} | {m.get('M')} × {m.get('N')} × {m.get('K')} | {t} |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- README
README_HEAD = """# Benchmarks

<!-- Generated by `python bench/report.py --readme` from bench/results/. Do not edit by hand. -->

pytest-benchmark files, one per operator: `test_bench_pairwise.py`, `test_bench_knn.py`,
`test_bench_line_margin.py`, `test_bench_loss.py` (the whole `DAALLoss`), and
`test_bench_train_step.py` (a whole training step: see below). The machinery:
`cases.py` (torch-free: operators, shapes, profiles, providers, targets, FLOP and memory models;
`report.py` reads the same tables), `problems.py` (one set-up per operator, the provider's
function from a table), `runner.py` (time budget, memory guard, warm-up, timing, NaN check,
failure triage, statistics, records) and `conftest.py` (options, ordering); `report.py` turns a
run into Markdown; `file_run.py` files a run's archive under `results/` (a new folder, its README,
this file regenerated); `gpu_check.sh` is the GPU check (its two test steps run as pytest processes side by side:
`sharded_pytest.py`, one slice of the selection each; kernels no GPU had run, the Gluon forwards and the
threshold selection's, are timed only after their GPU tests passed in the run: `tests/gpu_canary.py`); `tune_line_margin.py` times alternative block
sizes of the line-margin kernels and the backward's class-chunk budget, with peak memory (the
check runs it for at least 30 s; its table goes into the run's report), `tune_knn.py` those of the kNN forward, its flat loop, wide tiles and grids sized for two programs per SM
(45 s; its table too); `probe_h200.py` splits host and GPU time on a GPU (and profiles the
B = 180 loss's host time: cProfile by function and by origin, Triton's launcher, the package's
Python, PyTorch's operators; torch.profiler by operator; the large pairwise distance's host, event and
CUDA-graph times; and times the kNN
forward's tiles without the merge at five tile shapes: does its ceiling follow the L2 bytes per FLOP?; and the
selection by a threshold: its steps, its filter's grid and other tiles, on half the tiles, its sample's stride; 75 s), `probe_host.py` measures
the loss's host time besides the kernels on a CPU (`--profile`: the same split as the probe's host section); `work_model.py` models the flops and bytes of each line-margin kernel
(printed beside a run's measured times; `python bench/work_model.py B,C,D` prints it alone);
`knn_merge_model.py` counts the kNN forward's merge rounds and block-wide reductions per tile
for both merges (a CPU replay of the selection, counts not times); `knn_threshold_model.py` counts
the threshold filter's listing rounds per tile, on every tile and on half of them (a CPU replay of
its lists). Each run's report sets every
internal switch it timed (`cases.SWITCHES`: the kNN's merge, splits, loads, tiles, epilogue, Gluon forwards and selection by a threshold, the line margin's own-class rows and its x·u, the loss's glue, the merged launches, the padding of odd widths) beside its alternative, case by case, with what
the numbers say. A switch the runs have decided is no longer timed (`Switch.decided`; its variable
still selects the alternative): "Switches decided" below lists each with every run's reading of
the case that decides it.

Each case is (shape, precision, provider, pass):

- providers: `Triton` (`daal_triton.kernels.*`; for the loss `DAALLoss(backend="triton")`),
  `eager` (`daal_triton.reference.*`; `DAALLoss(backend="reference")`), `compile`
  (`torch.compile` of the reference function) and, for kNN, `chunked` (row chunks of
  `torch.cdist` in the inputs' dtype + `torch.topk`), `Triton (wave splits)` (the kNN kernel
  with its earlier grid rule, `DAAL_KNN_SPLITS=waves`) and `Triton, checked merge` (the kNN
  kernel with its earlier merge, rounds while any row takes, `DAAL_KNN_MERGE=checked`;
  docs/kernels.md "The counted merge"); for the whole loss `Triton, PyTorch glue`
  (`DAAL_GLUE=aten`) and `Triton, CUDA graphs` (the module through
  `torch.cuda.make_graphed_callables`, README "Small batches"; GPU only); for the line margin and
  the whole loss `Triton, atomic own rows` (the own-class rows of the segment gradient added by
  float32 atomics into a float32 gradient, as the first run timed them, `DAAL_LM_OWN_SEG=atomic`,
  beside the class lists that replaced them; docs/kernels.md "Class-chunked backward") and
  `Triton, x.u as x.q - x.p` (step 5's `x·u` from the segments as they are, as every run until
  2026-12-04 timed it, `DAAL_LM_XU=difference`, beside one dot with `u` from a copy `[p~, u~]`;
  docs/kernels.md "x·u, one dot"); for the kNN,
  the line margin and the whole loss `Triton, separate launches` (one launch per kernel,
  `DAAL_LAUNCHES=separate`, beside the merged launches that replaced them; docs/kernels.md
  "Fewer launches"); for the kNN `Triton, table tiles` (its forward on the table's 128 × 128 tiles
  with pointer loads, the default until 2026-12-04, `DAAL_KNN_TILES=table`, beside the narrow
  64 × 128 tiles through tensor descriptors that replaced them where descriptors apply;
  docs/kernels.md "Narrow tiles through descriptors"), `Triton, TMA loads` (the table's tiles loaded
  through tensor descriptors, `DAAL_KNN_LOADS=tma`, beside the pointer loads: the runs until
  2026-12-04; docs/kernels.md "Tensor-descriptor loads") and `Triton, wide tiles` (its forward on
  256 × 128 tiles through tensor descriptors where they apply, k ≤ 8 without labels,
  `DAAL_KNN_TILES=wide`, beside the default tiles of the run; docs/kernels.md "Wider tiles") and
  `Triton, plain epilogue` (its float16/bfloat16 forward's epilogue as before 2026-12-04's evening,
  `DAAL_KNN_EPILOGUE=plain`, beside the lean one: the same slots, fewer instructions per tile;
  docs/kernels.md "A leaner epilogue"), the Gluon forwards (`Triton, Gluon forward`, `..., 128 rows`:
  `DAAL_KNN_TILES=gluon`, `gluon128`; docs/kernels.md "Queries resident in shared memory") and
  `Triton, threshold selection` (a bound from a 1/16 sample, a filter that lists the entries below
  it, a selection among them, `DAAL_KNN_SELECT=threshold`; float16/bfloat16 without labels, skipped
  elsewhere; docs/kernels.md "Selection by a threshold") with `..., on half the tiles` (a
  self-search's filter on the tiles J ≥ I, each listing both directions, `DAAL_KNN_SELECT=half`;
  docs/kernels.md "Half the tiles of a self-search"); for the kNN at D = 129 `Triton, unaligned
  rows` (the kernels on the unpadded rows, `DAAL_ALIGN_D=off`, beside the rows padded to 144
  columns that replaced them; docs/kernels.md "Odd widths"; the runs of 2026-12-04 timed the
  pairwise distance so too, and its default is the unpadded rows since). The first run also
  timed `Triton (aten finish)` (the kNN kernel with its earlier finish) and `Triton v1` (the line
  margin's first design); both were removed after it (the fused finish was 1.45–3.3× faster, v2 4.1×), and its
  tables still show them;
- passes: `fwd` (forward with autograd recording, as in training; kNN retrieval evaluation under
  `no_grad`), `bwd` (backward alone; the forward of each round is built outside the timed
  region), `fwdbwd`;
- precisions: bf16 inputs (fp32 accumulation) and fp32, for the operators (TF32 matmuls for the
  references and the baselines and the pairwise/kNN kernels; the line margin's fp32 kernels keep
  float32 accuracy with 3×TF32 dots whatever the setting); the
  whole loss computes in float32 whatever its inputs (docs/method.md, step 1), so it runs in fp32 only. The
  references keep their own arithmetic (the pairwise/kNN reference upcasts to float32);
- shapes: DML batch (B=180, C=100, D=512), large batch (B=4096, C=1000), many classes
  (B=1024, C=11,318 and C=100,000; the line margin alone also at B=4096, C=1,000,000, `classes1m`),
  kNN evaluation (60,000 × 60,000, k=8), memory bank
  (1,024 queries × 65,536 references), all with D=512; the same memory bank and the large pairwise at D=129 (`bank_d129`, `large_d129`); the large pairwise's backward at
  M = N = 4,104, no multiple of 16 (`large_odd`).

Measured per case: the median time of rounds each bracketed by `torch.cuda.synchronize`, the
peak extra memory (`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, above what
was allocated before the call; for CUDA graphs "+ … graph pool": the graphs' private pool, reserved at
capture and holding the intermediates a replay reuses, which that peak does not see), and the useful FLOP/s as a fraction of `torch.matmul`'s on a
comparable GEMM (same precision, same run). FLOP counts (the useful GEMMs; a backward's
recomputation is not counted): pairwise 2·M·N·D forward, 4·M·N·D backward, 6·M·N·D both; kNN
2·M·N·D; line margin 4·B·C·D forward, 8·B·C·D backward, 12·B·C·D both (the kernels' own work,
16·B·C·D, is the work-model table's); the whole loss adds its in-batch kNN, 2·B·B·D. A provider that
would not fit in memory (estimated from the shape against the free GPU memory), runs out of
memory, is too slow, or is cut by the time budget is recorded with that status, never dropped.

## Training step

Does the loss slow training? `test_bench_train_step.py` times one optimiser step of the training
program's embedding network (`daal_triton.train.model.EmbeddingNet`: VGG-19 or VGG-19-BN,
random weights, embedding 512, channels_last) on synthetic 224 × 224 images already on the GPU,
labels as P × K sampling draws them: forward under bf16 autocast, loss, backward, AdamW step
(`cudnn.benchmark` on). The losses (the providers): `DAAL (Triton)` and `DAAL (reference)`
(`DAALLoss`, backends "triton" and "reference"), `ProxyAnchor` (pytorch-metric-learning's
`ProxyAnchorLoss`; recorded as skipped where the package is not installed) and `CE floor` (a
linear cross-entropy head on the embedding: the least a loss can cost). Shapes: B = 180
(P × K = 45 × 4) and 512, C = 100 and 11,318 (Stanford Online Products). Recorded per case:
the median step time and images per second, the peak memory of a step (whole, and above what
the network, optimiser state and images hold), and the loss's share of the step: CUDA events
mark the step and the loss's forward + backward inside it (the backward runs in two calls, the
loss's down to the embedding, then the network's: the same work, no added synchronisation).
The report shows every loss side by side with its step time relative to the CE floor's. The GPU
check runs VGG-19-BN at B = 180 only (the targets' shapes), in a time slice of its own
(`DAAL_BENCH_TRAIN_STEP_S`, 80 s); `--bench-profile full` runs the rest. Without a GPU (CI) the
same code runs a VGG-19 with 1/16 of the channels on 32 × 32 images, B = 12, in float32.

## Running

```bash
# CPU smoke mode (what CI runs: tiny shapes, Triton's interpreter, one round each)
.venv/bin/pytest bench --benchmark-disable
# On a machine with one NVIDIA GPU (no network needed), under 8 minutes:
bash bench/gpu_check.sh OUTDIR          # install, GPU parity tests, benchmarks, OUTDIR/report.md
# Every combination (long):
pytest bench --bench-profile full --bench-records run/records.jsonl --benchmark-json run/bench.json
python bench/report.py run
```

Committed runs live in `bench/results/<date>-<gpu>/` (see `results/README.md`); this file's
results section is regenerated from them with `python bench/report.py --readme`.

## Results
"""


def find_runs(results_dir: str) -> List[str]:
    runs = []
    for d in sorted(glob.glob(os.path.join(results_dir, "*"))):
        # steps.json alone: a run whose install or tests failed before any benchmark (its steps show why)
        if os.path.isdir(d) and any(os.path.exists(os.path.join(d, f)) for f in ("records.jsonl", "bench.json",
                                                                                  "steps.json")):
            runs.append(d)
    return runs


def run_order(run: dict) -> Tuple[str, int]:
    """Runs (:func:`load_run`) by their date (``env.json``'s, to the second; else the folder's
    ``<date>``), then the folder's ``-N``: by name, ``-10`` sorted before ``-2`` (a filing probe,
    2026-12-07)."""
    tail = re.search(r"-(\d+)$", run["name"])
    return str(run["env"].get("date") or run["name"][:10]), int(tail.group(1)) if tail else 1


def readme(results_dir: str) -> str:
    runs = sorted((load_run(d) for d in find_runs(results_dir)), key=run_order)  # each read once
    lines = [README_HEAD]
    if not runs:
        lines.append("No GPU run has been recorded yet: there are no measured numbers to show. "
                     "The first run of `bench/gpu_check.sh` on a GPU, committed under "
                     "`bench/results/<date>-<gpu>/`, will fill this section.\n")
        return "\n".join(lines)
    lines.append("Recorded runs (newest last; each one's report follows, newest first, so a partial or failed run "
                 "never hides an earlier run's numbers):\n")
    rel = os.path.relpath(results_dir, HERE)
    for r in runs:
        gpu = r["env"].get("gpu") or "?"
        lines.append(f"- [`{r['name']}`]({rel}/{r['name']}/) — {gpu}, torch {r['env'].get('torch', '?')}, "
                     f"triton {r['env'].get('triton', '?')}, profile {r['env'].get('profile', '?')}")
    lines.append("")
    lines += decided_table(runs, heading_level=2)
    for r in reversed(runs):
        lines += run_report(r, heading_level=3)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", nargs="?", help="a run directory (records.jsonl, env.json, ...)")
    ap.add_argument("-o", "--output", help="where to write the Markdown")
    ap.add_argument("--readme", action="store_true", help="regenerate bench/README.md from bench/results/")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="the results directory (--readme)")
    ap.add_argument("--source-digest", action="store_true",
                    help="print the source digest of this checkout (a run's env.json source_sha256)")
    args = ap.parse_args(argv)
    if args.source_digest:
        print(source_digest(os.path.dirname(HERE)))
        return 0
    if args.readme:
        text = readme(args.results)
        out = args.output or os.path.join(HERE, "README.md")
    elif args.run_dir:
        out = args.output or os.path.join(args.run_dir, "report.md")
        if args.output is None and os.path.exists(out):  # a recorded run's own report: kept
            print(f"report.py: {out} exists and is not overwritten; give -o FILE (or -o - for "
                  "standard output)", file=sys.stderr)
            return 2
        text = "\n".join(run_report(load_run(args.run_dir))).rstrip() + "\n"
        text = "# DAAL benchmark report\n\n" + text
    else:
        ap.error("give a run directory or --readme")
        return 2
    if out == "-":
        sys.stdout.write(text)
        return 0
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
