"""``daal-study`` (also ``python -m daal_triton.train.study``): configurations x seeds through the
same pipeline as ``daal-train``, with a table of mean +- std and 95% intervals, and plots.

Every cell (one configuration, one seed) is one ``python -m daal_triton.train ... --seed S --out
OUT/cells/<config>/seed<S>`` subprocess; its results are read back from the files it wrote
(``metrics.jsonl``, ``config.json``), never from the engine's internals. A finished cell (its
``results.txt`` exists) is never run again or overwritten, so a study interrupted or extended (more
seeds, more configurations) is resumed by running the same command; a cell that stopped half-way
resumes from its ``checkpoint_last.pt``, or, without one, its folder is moved aside (kept, never
deleted) and the cell starts afresh.

Outputs (in ``--report``, default ``--out``): ``runs.jsonl`` (one JSON line per finished run:
configuration, seed, arguments, command, wall time, final metrics, per-epoch curves),
``table.md`` (mean +- std and the t-distribution 95% confidence interval per metric and
configuration, differences to the first configuration paired by seed, and the command),
``metrics.png`` (bars of the means with 95% error bars and the runs as dots),
``r1_vs_subcluster_nmi.png`` (one point per run) and ``tsne_by_mode.png`` (t-SNE of one seed per
configuration side by side, coloured by mode; ``shapes``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import glob
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .config import SEED_LIMIT, _check_writable  # daal-train's bound on --seed; --out's check
from .console import ON_STOP, stop_name
from .files import append_line, loads_json, open_here, os_message, read_json, write_text_atomically
from .log import plural

EXAMPLE = """\
A study is a JSON file (configurations: daal-train arguments; "common": given to every cell):

  {
    "name": "shapes ablations",
    "seeds": [0, 1, 2],
    "common": ["--no-tsne"],
    "configs": {
      "DAAL": [],
      "DAAL, lambda_dens = 0": ["--daal-lambda-dens", "0"],
      "ProxyAnchor": "--loss pml:ProxyAnchorLoss"
    }
  }

  daal-study --file study.json --out runs/study --jobs 2 --threads 1

or the same with flags (one --config NAME=ARGS per configuration):

  daal-study --seeds 0 1 2 --common "--no-tsne" --config "DAAL=" \\
      --config "ProxyAnchor=--loss pml:ProxyAnchorLoss" --out runs/study

Running the same command again skips the finished cells (add seeds or configurations to extend a
study); --summarize rebuilds the table and plots from the finished cells without running any.
"""

METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "nmi", "map@r", "r_precision", "subcluster_nmi")
KEY_METRICS = ("recall@1", "nmi", "map@r", "subcluster_nmi")
LABELS = {"recall@1": "R@1", "recall@2": "R@2", "recall@4": "R@4", "recall@8": "R@8", "nmi": "NMI",
          "map@r": "MAP@R", "r_precision": "R-prec.", "subcluster_nmi": "sub-cluster NMI",
          "train_loss": "final train loss", "wall_s": "wall s"}
RESERVED = ("--seed", "--out", "--resume", "--threads", "--stop-after", "--overwrite")


class StudyError(ValueError):
    """A study description that cannot run (bad file, reserved flag, clashing names)."""


# ----------------------------------------------------------------------------- the grid

def _split(text: str, where: str) -> List[str]:
    """``text`` split as a shell would (``shlex``); an unbalanced quote is a :class:`StudyError`."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise StudyError(f"{where}: {e} in {text!r}") from None


def _as_args(value: Any, where: str) -> List[str]:
    if isinstance(value, str):
        return _split(value, where)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    raise StudyError(f"{where}: expected a list of daal-train arguments or one string, got {value!r}")


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.]+", "-", name.strip().lower()).strip("-.")
    return s or "config"


#: The longest folder name a configuration may map to: its log, ``<slug>-seed<S>.log``, must fit a
#: file name's 255 bytes (a longer name passed every check, then every cell failed: a probe, 2026-12-07).
SLUG_MAX = 200


def _shown(name: str) -> str:
    """A configuration's name as matplotlib draws it literally: a ``$`` starts no math (a name with
    ``$\\lamda$`` stopped every report), and a leading ``_`` (which a legend leaves out) is kept."""
    name = name.replace("$", r"\$")
    return " " + name if name.startswith("_") else name


def _md(name: str) -> str:
    """A configuration's name as Markdown text (table.md's cells and lists): a ``|`` ended a table's
    cell, a line break its row (control characters are shown as spaces). (Underscores stay: inside a
    word they start no emphasis, and the committed reports keep their names.)"""
    return re.sub(r"[\x00-\x1f\x7f]", " ", name).replace("|", r"\|")


def _check_configs(d: Any, where: str) -> None:
    if not isinstance(d, dict) or not isinstance(d.get("configs"), dict) or not d["configs"]:
        raise StudyError(f"{where}: expected a JSON object with a non-empty 'configs' object")


def load_study(path: str) -> Dict[str, Any]:
    """Read a study file (JSON: ``configs`` {name: args}, optional ``seeds``, ``common``, ``name``)."""
    try:
        d = read_json(path)
    except OSError as e:
        raise StudyError(f"--file {path}: {'no such file' if isinstance(e, FileNotFoundError) else e.strerror or e}") \
            from None
    except ValueError as e:
        raise StudyError(f"--file {path}: not a readable JSON file ({e})") from None
    _check_configs(d, f"--file {path}")
    unknown = set(d) - {"name", "seeds", "common", "configs", "description"}
    if unknown:
        raise StudyError(f"--file {path}: unknown keys {sorted(unknown)}")
    return d


def saved_study(report: str) -> Dict[str, Any]:
    """The study a report folder's ``study.json`` describes (what ``--summarize`` with no
    ``--file``/``--config`` rebuilds the report of)."""
    path = os.path.join(report, "study.json")
    try:
        d = read_json(path)
    except FileNotFoundError:
        raise StudyError(f"no configurations: give --file or at least one --config NAME=ARGS (--summarize alone "
                         f"reads the study of {path}, which is not there)") from None
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}") from None
    _check_configs(d, path)
    return {k: d[k] for k in ("name", "seeds", "common", "configs") if k in d}


def saved_command(report: str) -> Optional[str]:
    """The ``daal-study`` command a report folder's ``study.json`` records (None: none readable)."""
    try:
        command = read_json(os.path.join(report, "study.json")).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return command if isinstance(command, str) and command else None


def make_study(file: Union[str, Dict[str, Any], None] = None, configs: Sequence[str] = (), seeds: Optional[Sequence[int]] = None,
               common: Optional[str] = None, name: Optional[str] = None) -> Dict[str, Any]:
    """The study as ``{"name", "seeds", "common", "configs": {name: [args]}}`` from a file (its path,
    or its content as :func:`saved_study` returns it) and/or flags (flags add configurations and
    override the file's seeds / common arguments)."""
    d = load_study(file) if isinstance(file, str) else (file or {"configs": {}})
    out_configs: Dict[str, List[str]] = {}
    for k, v in d["configs"].items():
        out_configs[str(k)] = _as_args(v, f"configuration {k!r}")
    for c in configs:
        if "=" not in c:
            raise StudyError(f"--config {c!r}: expected NAME=ARGS (ARGS may be empty: 'DAAL=')")
        k, v = c.split("=", 1)
        if not k.strip():
            raise StudyError(f"--config {c!r}: empty name")
        if k.strip() in out_configs:
            raise StudyError(f"configuration {k.strip()!r} is given twice")
        out_configs[k.strip()] = _split(v, f"--config {c!r}")
    if not out_configs:
        raise StudyError("no configurations: give --file or at least one --config NAME=ARGS")
    seeds = seeds if seeds else d.get("seeds", [0, 1, 2])
    if not isinstance(seeds, (list, tuple)) or not seeds or \
            not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StudyError(f"seeds must be a non-empty list of integers, got {seeds!r}")
    if any(s < 0 or s >= SEED_LIMIT for s in seeds):  # daal-train refuses them: every cell would
        # fail, every retry too
        raise StudyError(f"seeds must be >= 0 and < 2**32 (daal-train's --seed), got {seeds}")
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds repeat: {seeds}")
    common_args = _split(common, "--common") if common is not None else _as_args(d.get("common", []), "common")
    for k, args in list(out_configs.items()) + [("common", common_args)]:
        bad = [a for a in args if _reserved(a)]
        if bad:
            raise StudyError(f"{k!r}: {bad[0]} is set by the study for every cell (reserved: {', '.join(RESERVED)})")
    slugs: Dict[str, str] = {}
    for k in out_configs:  # a configuration may be called "common" too
        s = slug(k)
        if len(s) > SLUG_MAX:
            raise StudyError(f"configuration {k[:40]!r}...: its folder name would be {len(s)} characters long (at most "
                             f"{SLUG_MAX}: a file name holds 255 bytes); give it a shorter name")
        if s in slugs:
            raise StudyError(f"configurations {slugs[s]!r} and {k!r} map to the same folder name {s!r}")
        slugs[s] = k
    return dict(name=name or d.get("name") or "study", seeds=seeds, common=common_args, configs=out_configs)


def _reserved(arg: str) -> bool:
    """Whether ``arg`` is a reserved flag as daal-train's parser reads it: its full name, or an
    abbreviation of it that argparse takes (``--resum`` for ``--resume``: passed through before, a
    cell resumed another run)."""
    return _train_flag(arg) in RESERVED


def _train_flag(arg: str) -> Optional[str]:
    """The daal-train long flag that ``arg`` sets as daal-train's parser reads it: its name (before
    any ``=``), or the one flag that it abbreviates (argparse takes ``--hel`` for ``--help``);
    None for an argument that is no flag, and for an unknown or ambiguous abbreviation."""
    name = arg.split("=", 1)[0]
    if not name.startswith("--"):
        return None
    options = _train_options()
    if name in RESERVED or name in options:
        return name
    matches = [o for o in options if o.startswith(name)]
    return matches[0] if len(matches) == 1 else None


@functools.lru_cache(maxsize=1)
def _train_options() -> Tuple[str, ...]:
    """daal-train's long flags (its parser is built once)."""
    from .cli import build_parser

    return tuple(o for o in build_parser()._option_string_actions if o.startswith("--"))


def check_cell_args(study: Dict[str, Any]) -> None:
    """Every configuration's daal-train arguments parse (an unknown flag, ``--epochs x``) and hold
    values daal-train accepts on this machine (``--lr -1``, ``--device cuda`` without CUDA, a
    ``--weights`` file that is not there: the checks that read no data): :class:`StudyError` naming
    the configuration before any cell runs (a cell that failed on them would fail again on every
    retry). Arguments with ``--config FILE`` are only parsed (the file completes them)."""
    from .cli import UsageError, build_parser, config_from_args, given_flags
    from .config import check_data_flags, checked_device, validate_config

    parser = build_parser()  # reused: parse_args leaves it as it was, and given_flags restores its defaults
    for name, args in study["configs"].items():
        full = list(study["common"]) + list(args)
        if any(a == "-h" or _train_flag(a) == "--help" for a in full):  # argparse would print the help, exit 0
            raise StudyError(f"configuration {name!r}: -h/--help is no training argument")
        try:
            parsed = parser.parse_args(full)
        except UsageError as e:
            raise StudyError(f"configuration {name!r}: its daal-train arguments do not parse: {e}") from None
        if parsed.config is not None:
            continue
        try:
            cfg = config_from_args(parsed)
            validate_config(cfg, 1, checked_device(cfg.device))  # each cell is one daal-train process
            check_data_flags(cfg, given_flags(parser, full))  # --data-seed with digits
        except (UsageError, ValueError) as e:  # ConfigError is a ValueError
            raise StudyError(f"configuration {name!r}: daal-train would refuse it: {e}") from None


def expand(study: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The cells, configuration-major: ``[{"config", "slug", "seed", "args"}]``."""
    return [dict(config=name, slug=slug(name), seed=seed, args=list(study["common"]) + list(args))
            for name, args in study["configs"].items() for seed in study["seeds"]]


def cell_dir(out: str, cell: Dict[str, Any]) -> str:
    return os.path.join(out, "cells", cell["slug"], f"seed{cell['seed']}")


def cell_command(cell: Dict[str, Any], out_dir: str, threads: Optional[int], python: str = sys.executable,
                 resume: Optional[str] = None) -> List[str]:
    cmd = [python, "-m", "daal_triton.train", *cell["args"], "--seed", str(cell["seed"]), "--out", out_dir,
           "--no-progress"]
    if threads:
        cmd += ["--threads", str(threads)]
    if resume:
        cmd += ["--resume", resume]
    return cmd


# ----------------------------------------------------------------------------- reading a cell

def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    """The JSON lines of ``path``; :class:`StudyError` naming the file and line of one that is not
    (a study killed while writing it leaves a torn last line)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    out.append(loads_json(line))
    except (OSError, ValueError) as e:
        where = f", line {i}" if isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError) else ""
        raise StudyError(f"{path}{where}: not a JSON line ({e}): a study killed while writing it? Remove that "
                         f"line and run again") from None
    return out


def _read_json(path: str) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        raise StudyError(f"{path}: cannot be read as JSON ({e})") from None


def is_finished(d: str) -> bool:
    return os.path.isfile(os.path.join(d, "results.txt")) and os.path.isfile(os.path.join(d, "metrics.jsonl"))


def collect(cell: Dict[str, Any], d: str) -> Dict[str, Any]:
    """One run's JSON line, from the files the run wrote (and the study's ``study_cell.json``)."""
    recs = _read_jsonl(os.path.join(d, "metrics.jsonl"))
    cfg = _read_json(os.path.join(d, "config.json"))
    evals = [r for r in recs if r.get("model") == "trained" and "recall@1" in r]
    if not evals:
        raise StudyError(f"{d}: metrics.jsonl holds no evaluation of the trained network")
    last = evals[-1]
    info = {}
    p = os.path.join(d, "study_cell.json")
    if os.path.isfile(p):
        info = _read_json(p)
    trained = [r for r in recs if r.get("model") == "trained"]
    rec = dict(config=cell["config"], seed=cell["seed"], args=cell["args"], dir=d,
               command=info.get("command"), wall_s=info.get("wall_s", last.get("elapsed_s")),
               threads=info.get("threads"), resumed=info.get("resumed", False),
               epoch=last["epoch"], width=cfg.get("width"), arch=cfg.get("arch"), loss=cfg.get("loss"),
               metrics={k: last[k] for k in METRICS if k in last and last[k] is not None},
               train_loss=last.get("train_loss"),
               curve=dict(epoch=[r["epoch"] for r in trained if "train_loss" in r],
                          train_loss=[round(r["train_loss"], 5) for r in trained if "train_loss" in r],
                          eval_epoch=[r["epoch"] for r in evals],
                          recall_at_1=[round(r["recall@1"], 5) for r in evals]),
               baselines={r["model"]: {k: r[k] for k in METRICS if r.get(k) is not None}
                          for r in recs if r.get("model") in ("raw_pixels", "untrained")})
    return rec


# ----------------------------------------------------------------------------- statistics

def t_quantile(df: int, q: float = 0.975) -> float:
    """Student-t quantile (scipy when available; a table for the two-sided 95% otherwise)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(q, df))
    except ImportError:  # pragma: no cover - scipy comes with scikit-learn
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
                 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
        if q != 0.975:
            raise
        return table.get(df) or table[max(k for k in table if k <= df)]


#: The range every metric of METRICS lies in (a fraction): their intervals are clipped to it, their
#: paired differences' to [-1, 1]; a t-interval knows no bounds (0.98 ± 0.04 read [0.94, 1.02]).
METRIC_RANGE = (0.0, 1.0)


def summarize(values: Iterable[Optional[float]], bounds: Optional[Tuple[float, float]] = None) -> Dict[str, float]:
    """n, mean, sample std (ddof 1) and the t-distribution 95% interval of the mean, clipped to
    ``bounds`` (the range the values can take) where given."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    n = len(v)
    if n == 0:
        return dict(n=0, mean=math.nan, std=math.nan, lo=math.nan, hi=math.nan)
    mean = sum(v) / n
    if n == 1:
        return dict(n=1, mean=mean, std=math.nan, lo=math.nan, hi=math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    h = t_quantile(n - 1) * std / math.sqrt(n)
    lo, hi = mean - h, mean + h
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return dict(n=n, mean=mean, std=std, lo=lo, hi=hi)


def _value(rec: Dict[str, Any], key: str) -> Optional[float]:
    if key in rec.get("metrics", {}):
        return rec["metrics"][key]
    return rec.get(key)


def stats_by_config(records: List[Dict[str, Any]], configs: Sequence[str],
                    keys: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    return {c: {k: summarize((_value(r, k) for r in records if r["config"] == c),
                             METRIC_RANGE if k in METRICS else None) for k in keys} for c in configs}


def paired_differences(records: List[Dict[str, Any]], configs: Sequence[str],
                       keys: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """``config - configs[0]`` per metric, paired by seed (the seeds share data and initial draws)."""
    ref = {r["seed"]: r for r in records if r["config"] == configs[0]}
    out = {}
    for c in configs[1:]:
        mine = {r["seed"]: r for r in records if r["config"] == c}
        seeds = sorted(set(ref) & set(mine))
        out[c] = {k: summarize((a - b for a, b in ((_value(mine[s], k), _value(ref[s], k)) for s in seeds)
                                if a is not None and b is not None),
                               (-METRIC_RANGE[1], METRIC_RANGE[1]) if k in METRICS else None)
                  for k in keys}
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(s: Dict[str, float], digits: int = 3, row_n: Optional[int] = None) -> str:
    """mean ± std; "(n=K)" where K, the runs that gave this metric a value, is 1 or not the row's n."""
    if s["n"] == 0:
        return "—"
    if s["n"] == 1:
        return f"{_fmt(s['mean'], digits)} (n=1)"
    own_n = f" (n={s['n']})" if row_n is not None and s["n"] != row_n else ""
    return f"{_fmt(s['mean'], digits)} ± {_fmt(s['std'], digits)}{own_n}"


def _ci(s: Dict[str, float], digits: int = 3) -> str:
    return "—" if s["n"] < 2 else f"[{_fmt(s['lo'], digits)}, {_fmt(s['hi'], digits)}]"


def markdown_table(records: List[Dict[str, Any]], configs: Sequence[str], *, command: str = "",
                   title: str = "study", note: str = "") -> str:
    """The study's Markdown report: the main metrics as mean ± std with the 95% interval, every
    metric as mean ± std, the differences to the first configuration paired by seed (``note``:
    a sentence after the count of runs)."""
    keys = [k for k in METRICS if any(k in r.get("metrics", {}) for r in records)]
    main = [k for k in KEY_METRICS if k in keys]
    st = stats_by_config(records, configs, keys + ["train_loss", "wall_s"])
    seeds = sorted({r["seed"] for r in records})
    lines = [f"# {title}", ""]
    if command:
        lines += ["```bash", command, "```", ""]
    lines += [f"{len(records)} runs; seeds {', '.join(map(str, seeds))}. Mean ± sample standard deviation over "
              "seeds, and the 95% confidence interval of the mean (Student t, n − 1 degrees of freedom; clipped to "
              "the metric's range [0, 1]). "
              "Final epoch, held-out classes." + (f" {note}" if note else ""), ""]
    head = ["configuration", "n"] + [f"{LABELS[k]} mean ± std" for k in main] + [f"{LABELS[k]} 95% CI" for k in main]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for c in configs:
        n = int(st[c][main[0]]["n"]) if main else 0
        lines.append("| " + " | ".join([_md(c), str(n)] + [_pm(st[c][k], row_n=n) for k in main]
                                       + [_ci(st[c][k]) for k in main]) + " |")
    lines += ["", "All metrics (mean ± std):", ""]
    allk = keys + ["train_loss", "wall_s"]
    lines += ["| configuration | " + " | ".join(LABELS[k] for k in allk) + " |", "|" + " --- |" * (len(allk) + 1)]
    for c in configs:
        n_or_none = int(st[c][main[0]]["n"]) if main else None
        lines.append("| " + " | ".join([_md(c)] + [_pm(st[c][k], 1 if k == "wall_s" else 3, row_n=n_or_none)
                                           for k in allk])
                     + " |")
    if len(configs) > 1 and main:
        diff = paired_differences(records, configs, main)
        lines += ["", f"Difference to **{_md(configs[0])}**, paired by seed (mean [95% CI]; an interval that excludes 0 "
                      "is a difference at the 5% level):", ""]
        lines += ["| configuration | n | " + " | ".join(f"Δ {LABELS[k]}" for k in main) + " |",
                  "|" + " --- |" * (len(main) + 2)]
        for c in configs[1:]:
            d = diff[c]
            own = [f" (n={d[k]['n']})" if d[k]["n"] != d[main[0]]["n"] else "" for k in main]
            cells = [f"{_fmt(d[k]['mean'], 3)} {_ci(d[k])}{o}" if d[k]["n"] >= 2 else _pm(d[k])
                     for k, o in zip(main, own)]
            lines.append("| " + " | ".join([_md(c), str(d[main[0]]["n"])] + cells) + " |")
    lines += ["", "Arguments of each configuration (given to `daal-train` with `--seed S --out ...`):", ""]
    for c in configs:
        args = next((r["args"] for r in records if r["config"] == c), None)
        lines.append(f"- **{_md(c)}**: `{shlex.join(args) if args else '(defaults)'}`" if args is not None
                     else f"- **{_md(c)}**: (no finished run)")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plots

def plot_metrics(records: List[Dict[str, Any]], configs: Sequence[str], path: str) -> str:
    """Bars of the mean per configuration and metric, 95% CI error bars, each run as a dot."""
    from .plots import colormap, figure, save

    keys = [k for k in KEY_METRICS if any(k in r.get("metrics", {}) for r in records)]
    st = stats_by_config(records, configs, keys)
    fig, axes = figure(1, len(keys), figsize=(3.6 * len(keys), 4.2), squeeze=False)
    cmap = colormap("tab10")
    for ax, k in zip(axes[0], keys):
        for i, c in enumerate(configs):
            s = st[c][k]
            err = [[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]] if s["n"] >= 2 else None
            ax.bar(i, s["mean"], color=cmap(i % 10), alpha=0.75, yerr=err, capsize=4)
            pts = [_value(r, k) for r in records if r["config"] == c and _value(r, k) is not None]
            ax.scatter([i] * len(pts), pts, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(configs)))
        ax.set_xticklabels([_shown(c) for c in configs], rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{LABELS[k]} (mean, 95% CI)", fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def plot_tradeoff(records: List[Dict[str, Any]], configs: Sequence[str], path: str) -> str:
    """Held-out Recall@1 against sub-cluster NMI, one point per run, one colour per configuration."""
    from .plots import colormap, figure, save

    fig, ax = figure(figsize=(6.5, 4.8))
    cmap = colormap("tab10")
    for i, c in enumerate(configs):
        rs = [r for r in records if r["config"] == c and "subcluster_nmi" in r["metrics"]]
        ax.scatter([r["metrics"]["subcluster_nmi"] for r in rs], [r["metrics"]["recall@1"] for r in rs],
                   color=cmap(i % 10), label=_shown(c), s=28)
    ax.set_xlabel("sub-cluster NMI (modes kept inside each class)")
    ax.set_ylabel("held-out Recall@1")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, path)


def embed_run(d: str) -> Tuple[Any, Any, Any, Optional[List[str]]]:
    """Embed the held-out classes with the run's ``checkpoint_last.pt`` (its own config.json)."""
    import torch

    from . import evaluate as E
    from .data import build_datasets
    from .checkpoint import load_checkpoint
    from .config import TrainConfig
    from .engine import build_model

    cfg = TrainConfig.from_dict(dict({"width": 1.0}, **read_json(os.path.join(d, "config.json"))))
    cfg.weights = None
    _, test_ds = build_datasets(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.data_seed, augment=cfg.augment,
                                shapes_train_per_class=cfg.shapes_train_per_class,
                                shapes_test_per_class=cfg.shapes_test_per_class, shapes_nuisance=cfg.shapes_nuisance,
                                train=False)
    ck = load_checkpoint(os.path.join(d, "checkpoint_last.pt"))  # digest-checked, weights_only
    model = build_model(cfg)
    model.load_state_dict(ck["model"])
    emb = E.embed(model, test_ds, torch.device("cpu"), batch_size=cfg.eval_batch_size, progress=False)
    return emb.numpy(), E.dataset_labels(test_ds).numpy(), test_ds.modes, getattr(test_ds, "mode_names", None)


def plot_tsne(panels: List[Tuple[str, Any, Any, Any, Optional[List[str]]]], path: str, seed: int = 0) -> str:
    """t-SNE panels side by side (title, embeddings, labels, modes, mode names), coloured by mode."""
    import numpy as np

    from .plots import colormap, figure, save, tsne_2d

    n = len(panels)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = figure(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    cmap = colormap("tab10")
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, emb, labels, modes, names) in zip(axes.flat, panels):
        xy = tsne_2d(np.asarray(emb), seed=seed)
        m = np.asarray(modes) if modes is not None else np.zeros(len(xy), int)
        for v in np.unique(m):
            sel = m == v
            ax.scatter(xy[sel, 0], xy[sel, 1], s=4, color=cmap(int(v) % 10),
                       label=names[v] if names is not None and v < len(names) else str(v))
        ax.set_title(title, fontsize=9)
        ax.set_axis_on()
        ax.set_xticks([])
        ax.set_yticks([])
    axes.flat[0].legend(fontsize=7, markerscale=3, loc="best", title="mode")
    fig.suptitle("held-out classes, t-SNE coloured by mode (one seed per configuration)")
    fig.tight_layout()
    return save(fig, path, dpi=100)


# ----------------------------------------------------------------------------- running

def _move_aside(d: str) -> str:
    i = 1
    while os.path.exists(f"{d}.incomplete-{i}"):
        i += 1
    os.rename(d, f"{d}.incomplete-{i}")
    return f"{d}.incomplete-{i}"


#: The daal-train processes of the cells running now (Ctrl-C stops them: :func:`_run_cells`).
_RUNNING: set = set()
_RUNNING_LOCK = threading.RLock()  # re-entrant: :func:`_mark_stopping` runs in a signal handler


class _Flag:
    """``threading.Event``'s ``set``/``clear``/``is_set`` without its lock, which a signal handler
    landing inside the main thread's own ``set()`` waited on forever (a review, 2026-12-07); the
    order that matters is kept by ``_RUNNING_LOCK``."""

    def __init__(self) -> None:
        self._on = False

    def set(self) -> None:
        self._on = True

    def clear(self) -> None:
        self._on = False

    def is_set(self) -> bool:
        return self._on


#: Set when the study stops (Ctrl-C, SIGTERM): no cell starts after it (one started then inherited
#: the signals ignored, so the study's stop never reached it and the study waited for its end)
_STOPPING = _Flag()


def _mark_stopping() -> None:
    """The study's part of the stop (``console.ON_STOP``), before its signals are ignored: a cell
    is either started and listed before it, with the signals handled, or never started."""
    with _RUNNING_LOCK:
        _STOPPING.set()


#: The cells' progress bar while they run (empty: none); :func:`_say` writes through it.
_BAR: List[Any] = []
_SAY_LOCK = threading.Lock()


def _say(msg: str) -> None:
    """One whole line of the study's, from any of its threads: through the progress bar while it
    runs (a line a cell's thread printed broke it), and never two lines run together (a cell's
    thread and the main one merged theirs: a probe, 2026-12-07)."""
    with _SAY_LOCK:
        if _BAR:
            _BAR[0].write(msg)
        else:
            print(msg, flush=True)


def started_file(d: str) -> str:
    """What the cell in folder ``d`` was started with, beside it (daal-train wants an empty --out):
    a cell resumes only under the same arguments."""
    return d + ".started.json"


def _started(d: str) -> Dict[str, Any]:
    """What the cell in folder ``d`` was started with (``{}``: no record); a RuntimeError (the
    cell fails, the others run) for a record that is not what :func:`run_cell` writes: torn by a
    kill, or edited (a dry run stopped in a traceback: a review, 2026-12-07)."""
    path = started_file(d)
    if not os.path.isfile(path):
        return {}
    try:
        started = _read_json(path)
    except StudyError as e:
        raise RuntimeError(f"{e}: move {d} and that file aside to start the cell again") from None
    ok = isinstance(started, dict)
    args, wall = (started.get("args", []), started.get("wall_s", 0.0)) if ok else (None, math.nan)
    if not (ok and _strings(args) and _number(wall) and math.isfinite(wall)):
        raise RuntimeError(f"{path} is not what daal-study writes (config, seed, args, wall_s, threads): move {d} "
                           "and that file aside to start the cell again")
    return started


def cell_plan(cell: Dict[str, Any], out: str,
              threads: Optional[int]) -> Tuple[Optional[str], float, Optional[int], bool]:
    """How the cell will run (reading only): ``(checkpoint it resumes or None, its wall time so
    far, its --threads, whether an unfinished folder without a checkpoint is moved aside first)``.
    A half-finished cell resumes with the --threads it was started with, which a bit-identical
    resume on the CPU needs (another --threads resumed it silently, its record naming only the
    last: a determinism probe, 2026-12-07); under other arguments it is a RuntimeError."""
    d = cell_dir(out, cell)
    if not (os.path.isdir(d) and os.listdir(d)):
        return None, 0.0, threads, False
    ck = os.path.join(d, "checkpoint_last.pt")
    if not os.path.isfile(ck):
        return None, 0.0, threads, True
    started = _started(d)
    if started.get("args", cell["args"]) != cell["args"]:
        raise RuntimeError(f"{d} was started with {shlex.join(started['args'])!r}, the study now says "
                           f"{shlex.join(cell['args'])!r}: a resumed run would mix the two; restore the study "
                           "file, or move that folder aside to start the cell again")
    first = started.get("threads")
    if isinstance(first, int) and not isinstance(first, bool) and first >= 1:
        threads = first
    return ck, float(started.get("wall_s", 0.0)), threads, False


def run_cell(cell: Dict[str, Any], out: str, threads: Optional[int], python: str = sys.executable) -> Dict[str, Any]:
    """Run one cell to completion (or resume it: :func:`cell_plan`); returns its JSON line. Raises on failure."""
    d = cell_dir(out, cell)
    resume, wall_before, own, stale = cell_plan(cell, out, threads)
    if own != threads:
        _say(f"[daal-study] {d} resumes with --threads {own}, as it was started (the study now says "
             f"{threads}): PyTorch's CPU sums depend on the thread count")
        threads = own
    if stale:
        moved = _move_aside(d)
        if os.path.isfile(started_file(d)):
            os.replace(started_file(d), started_file(moved))
        _say(f"[daal-study] {d} was left unfinished without a checkpoint: moved to {moved}")
    os.makedirs(os.path.dirname(d), exist_ok=True)
    cmd = cell_command(cell, d, threads, python, resume)
    log = os.path.join(out, "logs", f"{cell['slug']}-seed{cell['seed']}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()

    def note_started(wall_s: float) -> None:  # whole or not at all: a kill while writing tore it
        write_text_atomically(started_file(d), json.dumps(dict(config=cell["config"], seed=cell["seed"],
                                                               args=cell["args"], wall_s=round(wall_s, 1),
                                                               threads=threads)))

    note_started(wall_before)
    with open_here(log, "a") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        with _RUNNING_LOCK:  # started and listed at once: the study's stop reaches every cell it started
            if _STOPPING.is_set():
                raise KeyboardInterrupt("the study is stopping: this cell was not started")
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
            _RUNNING.add(proc)
        try:
            rc = proc.wait()
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)
            note_started(wall_before + time.time() - t0)  # a resumed cell's wall time adds up
    wall = wall_before + time.time() - t0
    if rc != 0 or not is_finished(d):
        raise RuntimeError(f"cell {cell['config']!r} seed {cell['seed']} failed (exit {rc}); see {log}")
    shown = ["daal-train", *cmd[3:]]
    # whole or not at all: a full disk left it empty, and every later run of the study stopped on it
    # (a probe, 2026-12-07)
    write_text_atomically(os.path.join(d, "study_cell.json"), json.dumps(
        dict(config=cell["config"], seed=cell["seed"], args=cell["args"], command=shlex.join(shown),
             wall_s=round(wall, 1), threads=threads, resumed=resume is not None), indent=1))
    return collect(cell, d)


def _load_runs(path: str) -> List[Dict[str, Any]]:
    """The runs a report's ``runs.jsonl`` records; :class:`StudyError` for a record daal-study did
    not write (another program's file there gave a KeyError traceback: a probe, 2026-12-07)."""
    runs = _read_jsonl(path) if os.path.isfile(path) else []
    for i, r in enumerate(runs, 1):
        if not _is_run(r):
            raise StudyError(f"{path}: record {i} is not a run daal-study recorded (an object with config, seed, "
                             f"args, dir and numeric metrics): is the file daal-study's? Move it away, or give "
                             f"another --report")
    return runs


def _number(x: Any) -> bool:
    """A JSON number (a bool is none)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _strings(x: Any) -> bool:
    """A JSON list of strings (a command's arguments)."""
    return isinstance(x, list) and all(isinstance(a, str) for a in x)


def _is_run(r: Any) -> bool:
    """``r`` has what the report reads of a run (:func:`collect` writes it so): a partial record
    passed the first check, was appended to, and stopped the table in a KeyError (a review, 2026-12-07)."""
    return (isinstance(r, dict) and isinstance(r.get("config"), str) and isinstance(r.get("seed"), int)
            and not isinstance(r.get("seed"), bool) and isinstance(r.get("dir"), str) and _strings(r.get("args"))
            and isinstance(r.get("metrics"), dict)
            and all(v is None or _number(v) for v in [*r["metrics"].values(), r.get("train_loss"), r.get("wall_s")]))


def _append_run(path: str, rec: Dict[str, Any]) -> None:
    append_line(path, json.dumps(rec) + "\n")


def finished_cells(out: str) -> List[Tuple[Dict[str, Any], str]]:
    """``(cell, folder)`` of every finished cell under ``out/cells`` that a study ran (its
    ``study_cell.json`` names the configuration, seed and arguments), whichever command ran it."""
    found = []
    for d in sorted(glob.glob(os.path.join(glob.escape(out), "cells", "*", "seed*"))):
        if not re.fullmatch(r"seed\d+", os.path.basename(d)) or not is_finished(d):
            continue
        try:
            info = read_json(os.path.join(d, "study_cell.json"))
            cell = dict(config=str(info["config"]), slug=os.path.basename(os.path.dirname(d)), seed=int(info["seed"]),
                        args=list(info["args"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a cell a study finished
        if os.path.basename(d) != f"seed{cell['seed']}":
            continue  # a folder renamed or copied by hand: its seed is not the one it says
        found.append((cell, d))
    return found


def check_names(study: Dict[str, Any], records: Iterable[Dict[str, Any]]) -> None:
    """A configuration of ``study`` with a finished run (``records``) under other arguments is an
    error: the report would pool runs of two settings under one name."""
    want = {c["config"]: c["args"] for c in expand(study)}
    for r in records:
        if r["config"] in want and r.get("args") is not None and r["args"] != want[r["config"]]:
            raise StudyError(f"configuration {r['config']!r} has a finished run ({r.get('dir')}) with "
                             f"{shlex.join(r['args'])!r}, the study now says {shlex.join(want[r['config']])!r}: rename "
                             f"the configuration or use another --out (finished runs are never overwritten)")


def check_same_args(cell: Dict[str, Any], d: str) -> None:
    """A finished cell run with other arguments than the study now asks for is an error (rename
    the configuration or use another --out): its results would be reported under a wrong name."""
    p = os.path.join(d, "study_cell.json")
    if os.path.isfile(p):
        info = _read_json(p)
        had = info.get("args")
        if had is not None and had != cell["args"]:
            raise StudyError(f"{d} was run with {shlex.join(had)!r}, the study now says {shlex.join(cell['args'])!r}: "
                             "rename the configuration or use another --out (finished cells are never overwritten)")
        name = info.get("config")
        if name is not None and name != cell["config"]:  # e.g. renamed by case only: the same folder
            raise StudyError(f"{d} holds a run of configuration {name!r}, not {cell['config']!r} (their folder names "
                             "are the same): keep the name, or use another --out")


def report_order(study: Dict[str, Any], records: List[Dict[str, Any]], report: str) -> List[str]:
    """The configurations of ``records`` in the report's order: that of the report already in
    ``report`` (its first configuration stays the one the others are compared with), then the
    study's, then any other."""
    before: List[Any] = []
    try:
        old = read_json(os.path.join(report, "study.json"))
        before = list(old.get("reported") or old.get("configs") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    have = {r["config"] for r in records}
    order: List[str] = []
    for c in before + list(study["configs"]) + [r["config"] for r in records]:
        if c in have and c not in order:
            order.append(c)
    return order


#: The report's files that :func:`write_report` replaces (and ``study.json``).
REPORT_FILES = ("table.md", "metrics.png", "r1_vs_subcluster_nmi.png", "tsne_by_mode.png")


def check_report_folder(report: str) -> None:
    """The report folder's files are daal-study's (its ``study.json`` describes a study) or absent:
    a ``table.md`` or ``study.json`` of the user's in ``--report`` was replaced without a word (a
    probe, 2026-12-07). A report cut short (:data:`WRITING` there) is daal-study's."""
    if os.path.exists(os.path.join(report, WRITING)):
        return
    path = os.path.join(report, "study.json")
    if os.path.lexists(path):
        try:
            d = read_json(path)
            _check_configs(d, path)
            ours = isinstance(d.get("command"), str)  # every report's since the first daal-study; a study file's: none
        except (OSError, ValueError, StudyError):
            ours = False
        if not ours:
            raise StudyError(f"{path} is not a report's study.json that daal-study wrote (a JSON object with its "
                             f"'configs' and 'command': a study file there is not one), and daal-study would replace "
                             f"it and the files beside it ({', '.join(REPORT_FILES)}): move it away, or give another "
                             f"--report")
        return
    held = [name for name in REPORT_FILES if os.path.lexists(os.path.join(report, name))]
    if held:
        raise StudyError(f"{report} holds {', '.join(held)} without the study.json daal-study writes beside its "
                         f"report: not daal-study's, and it would replace {'it' if len(held) == 1 else 'them'}; move "
                         f"{'it' if len(held) == 1 else 'them'} away, or give another --report")


#: In a report folder while :func:`write_report` writes it (a Ctrl-C during the t-SNE left table.md
#: without its plots, and the next command, finding no new run, left it so).
WRITING = ".daal-study-writing"


def write_report(study: Dict[str, Any], records: List[Dict[str, Any]], configs: Sequence[str], report: str,
                 command: str, *, note: str = "", plots: bool = True, tsne: bool = True,
                 tsne_seed: Optional[int] = None) -> List[str]:
    """table.md, study.json (the study this command described, and ``reported``: the arguments
    and seeds of every configuration in the report) and the plots, from the finished runs'
    ``records`` of ``configs``."""
    os.makedirs(report, exist_ok=True)
    marker = os.path.join(report, WRITING)
    open_here(marker).close()  # removed once every file is written: a report cut short is redone
    written = []
    # UTF-8 whatever the locale (the table holds ±), and whole or not at all: a failure leaves the
    # previous table.md as it was
    write_text_atomically(os.path.join(report, "table.md"),
                          markdown_table(records, configs, command=command, title=study["name"], note=note))
    written.append(os.path.join(report, "table.md"))
    reported = {c: dict(args=next(r["args"] for r in records if r["config"] == c),
                        seeds=sorted(r["seed"] for r in records if r["config"] == c)) for c in configs}
    try:  # the runs the figures there show
        shown = read_json(os.path.join(report, "study.json")).get("reported")
    except (OSError, ValueError, AttributeError):
        shown = None
    write_text_atomically(os.path.join(report, "study.json"),
                          json.dumps(dict(study, command=command, reported=reported), indent=2))
    written.append(os.path.join(report, "study.json"))
    if plots and records:
        written.append(plot_metrics(records, configs, os.path.join(report, "metrics.png")))
        written.append(plot_tradeoff(records, configs, os.path.join(report, "r1_vs_subcluster_nmi.png")))
        if tsne:
            seed = study["seeds"][0] if tsne_seed is None else tsne_seed
            panels: List[Tuple[str, Any, Any, Any, Optional[List[str]]]] = []
            for c in configs:
                rs = [r for r in records if r["config"] == c and r["seed"] == seed]
                if rs and not os.path.isfile(os.path.join(rs[0]["dir"], "checkpoint_last.pt")):  # said, not silent
                    print(f"[daal-study] no t-SNE panel for {c} (seed {seed}): {rs[0]['dir']} has no "
                          "checkpoint_last.pt (--save best or none writes none)", flush=True)
                elif rs:
                    try:
                        emb, labels, modes, names = embed_run(rs[0]["dir"])
                    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # a damaged checkpoint
                        print(f"[daal-study] no t-SNE panel for {c} (seed {seed}): {rs[0]['dir']} cannot be "
                              f"embedded: {e}", flush=True)
                        continue
                    r1 = rs[0]["metrics"].get("recall@1", math.nan)
                    sub = rs[0]["metrics"].get("subcluster_nmi", math.nan)
                    panels.append((f"{_shown(c)} (seed {seed})\nR@1 {r1:.3f}, sub-cluster NMI {sub:.3f}", emb, labels,
                                   modes, names))
            if panels:
                written.append(plot_tsne(panels, os.path.join(report, "tsne_by_mode.png"), seed=seed))
    for name in REPORT_FILES[1:] if shown != json.loads(json.dumps(reported)) else ():
        # an earlier command's figure beside a table of other runs (a probe, 2026-12-07); one of the
        # same runs stays (a --summarize --no-plots removed it: a review)
        path = os.path.join(report, name)
        if path not in written and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            print(f"[daal-study] removed {path}: it showed other runs than this report's", flush=True)
    os.remove(marker)
    return written


def build_parser() -> argparse.ArgumentParser:
    from .cli import _Parser  # a bad command line is one error line, as for daal-train

    p = _Parser(
        prog="daal-study", description="Run daal-train over configurations x seeds (resumable) and report mean ± std, "
                                       "95% confidence intervals and plots.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", help="study description (JSON; see the example below)")
    p.add_argument("--config", action="append", default=[], metavar="NAME=ARGS",
                   help="a configuration: its name and its daal-train arguments (repeatable; added to --file's)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the file's, else 0 1 2)")
    p.add_argument("--common", default=None, help="daal-train arguments given to every cell (replaces the file's)")
    p.add_argument("--name", default=None, help="title of the report (default: the file's \"name\" field, else study)")
    p.add_argument("--out", default="runs/study", help="folder of the cells (cells/<config>/seed<S>/) and logs "
                                                       "(default %(default)s)")
    p.add_argument("--report", default=None, help="folder of runs.jsonl, table.md and the plots (default: --out)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (default %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads per cell (default: the cores this process may use / --jobs)")
    p.add_argument("--first", action="append", default=[], metavar="NAME",
                   help="run this configuration's cells (all seeds) before the other configurations' second and "
                        "later seeds (repeatable); the default order is seed-major")
    p.add_argument("--tsne-seed", type=int, default=None, help="seed whose runs the t-SNE shows (default: the first)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="table only")
    p.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE panels")
    p.add_argument("--summarize", action="store_true",
                   help="run nothing: rebuild the report from finished cells (with no --file/--config: the study "
                        "recorded in the report folder's study.json)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cells' commands and whether they are done (writes nothing)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cells_to_run(study: Dict[str, Any], cells: List[Dict[str, Any]], out: str, first: List[str],
                  known: Dict[Any, Any], runs_path: Optional[str]) -> List[Dict[str, Any]]:
    """The cells still to run, in order; finished cells not yet in ``runs.jsonl`` are recorded
    (in ``known``, and in ``runs_path`` unless it is None).

    Seed-major: every configuration gets its first seed before any gets its second, so a study
    stopped early still compares all of them (``--first NAME``: those configurations' cells, all
    seeds, come right after the first seed)."""
    todo = []
    for cell in cells:
        d = cell_dir(out, cell)
        had = known.get((cell["config"], cell["seed"]))
        if had is not None and not is_finished(d) and os.path.realpath(str(had.get("dir"))) != os.path.realpath(d):
            # the report already holds this (configuration, seed), run in another --out: not again
            print(f"[daal-study] {cell['config']} seed {cell['seed']}: the report already has its run in "
                  f"{had.get('dir')}; not run again", flush=True)
            continue
        if is_finished(d):
            check_same_args(cell, d)
            if (cell["config"], cell["seed"]) not in known:  # finished but not yet recorded
                rec = collect(cell, d)
                known[(cell["config"], cell["seed"])] = rec
                if runs_path is not None:
                    _append_run(runs_path, rec)
        else:
            todo.append(cell)
    first_set = set(first)
    todo.sort(key=lambda c: (0 if c["config"] in first_set or c["seed"] == study["seeds"][0] else 1,
                             study["seeds"].index(c["seed"])))
    return todo


def _run_cells(todo: List[Dict[str, Any]], out: str, jobs: int, threads: int, progress: bool,
               known: Dict[Any, Any], runs_path: str) -> List[Dict[str, Any]]:
    """Run ``todo`` ``jobs`` at a time, recording each finished cell as it ends; returns the
    failed cells (one failure never loses the others)."""
    failed = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="daal-study", unit="run", dynamic_ncols=True)
        _BAR[:] = [bar]
    pool = cf.ThreadPoolExecutor(max_workers=jobs)

    def stop_running() -> None:
        # the signal that stopped the study, which its cells inherited as it did (not ignored): a
        # study started in the background without job control has SIGINT ignored, and so have its
        # cells, which a forwarded SIGINT never stopped after a SIGTERM (a determinism probe, 2026-12-07)
        stop = signal.SIGTERM if stop_name() == "SIGTERM" else signal.SIGINT
        with _RUNNING_LOCK:
            _STOPPING.set()
            for proc in _RUNNING:
                try:
                    proc.send_signal(stop)
                except ValueError:  # Windows sends no SIGINT (its console's Ctrl-C reached the cells)
                    pass

    _STOPPING.clear()
    ON_STOP.append(_mark_stopping)
    futures: Dict[Any, Dict[str, Any]] = {}
    try:
        futures = {pool.submit(run_cell, cell, out, threads): cell for cell in todo}
        for fut in cf.as_completed(futures):
            cell = futures[fut]
            try:
                rec = fut.result()
            except Exception as e:  # one failed cell must not lose the others
                failed.append(cell)
                msg = f"[daal-study] FAILED {cell['config']} seed {cell['seed']}: {e}"
            else:
                known[(cell["config"], cell["seed"])] = rec
                try:
                    _append_run(runs_path, rec)
                except OSError as e:  # a full disk: the queued cells ran on to the end before this was said
                    raise StudyError(f"cannot record a finished cell in {runs_path} ({e.strerror or e}): no more "
                                     "cells start (a finished cell is found again by the next run: free space, "
                                     "then run the same command again)") from None
                msg = (f"[daal-study] {cell['config']} seed {cell['seed']}: R@1 {rec['metrics'].get('recall@1', 0):.4f}"
                       f", sub-cluster NMI {rec['metrics'].get('subcluster_nmi', math.nan):.4f}"
                       + (f" ({rec['wall_s']:.0f} s)" if rec.get("wall_s") is not None else ""))
            _say(msg)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:  # no queued cell starts; the running ones stop as after their own Ctrl-C
        pool.shutdown(wait=False, cancel_futures=True)
        stop_running()
        raise
    except BaseException as e:  # (a full disk) no queued cell starts; the running ones finish
        _mark_stopping()
        pool.shutdown(wait=False, cancel_futures=True)
        with _RUNNING_LOCK:
            running = len(_RUNNING)
        if running:
            _say(f"[daal-study] stopping ({e}): waiting for the {plural(running, 'running cell')} to finish (Ctrl-C "
                 f"or SIGTERM stops {'it' if running == 1 else 'them'})")
        try:  # (not a join: one a KeyboardInterrupt cut short makes the finally's join return at once)
            cf.wait([f for f in futures if not f.cancelled()])  # a cancelled one never counts as done
        except KeyboardInterrupt:  # a stop while waiting reaches the cells too (it waited for their end)
            stop_running()
            raise
        raise
    finally:
        try:
            pool.shutdown(wait=True)
        finally:
            ON_STOP.remove(_mark_stopping)
            _BAR.clear()
            if bar is not None:
                bar.close()
    return failed


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        file, recorded = args.file, None
        written = os.path.join(args.report or args.out or "", "study.json")
        if file is not None and (args.report or args.out) and os.path.realpath(file) == os.path.realpath(written):
            raise StudyError(f"--file {file} is the report's study.json, which daal-study writes (the study and "
                             f"the command it ran): keep the study file elsewhere (--summarize alone rebuilds the "
                             f"report from it)")
        if args.summarize and (args.report or args.out):
            # the study the report was made of; a new --report folder: the one recorded in --out
            where = args.report if args.report and (not args.out or os.path.isfile(
                os.path.join(args.report, "study.json"))) else args.out or args.report
            if file is None and not args.config:
                file = saved_study(where)
            # the command that ran the cells, also when --file/--config name the study again (the
            # summarize command replaced it, and a later --summarize kept that one)
            recorded = saved_command(where)
        study = make_study(file, args.config, args.seeds, args.common, args.name)
        check_cell_args(study)
        unknown = [c for c in args.first if c not in study["configs"]]
        if unknown:
            raise StudyError(f"--first {unknown[0]!r}: no such configuration (have: {', '.join(study['configs'])})")
        if args.jobs < 1 or (args.threads is not None and args.threads < 1):
            raise StudyError("--jobs and --threads must be >= 1")
        from .cli import MAX_THREADS  # each cell's daal-train --threads: refused there, in every cell, after the start

        if args.threads is not None and args.threads > MAX_THREADS:
            raise StudyError(f"--threads must be between 1 and {MAX_THREADS}, got {args.threads}")
        for flag, path in (("--out", args.out), ("--report", args.report)):
            if path is not None and (not path.strip() or os.path.exists(path) and not os.path.isdir(path)):
                raise StudyError(f"{flag} {path!r}: not a folder")
            if path and not args.dry_run and not (args.summarize and flag == "--out" and args.report):  # written
                try:  # named up front, as daal-train names --out: not "Permission denied: ro/st" afterwards
                    _check_writable(path, flag)
                except ValueError as e:
                    raise StudyError(str(e)) from None
        os.environ["MPLBACKEND"] = "Agg"  # it writes files; a bad or interactive backend must not stop the report
        lock = None
        try:
            if not args.dry_run and not args.summarize and args.out:
                os.makedirs(args.out, exist_ok=True)
                lock = _lock(args.out)
            # a report rebuilt from its own study.json keeps the command that ran its cells
            return _study(args, study, recorded or "daal-study " + shlex.join(argv))
        finally:
            if lock is not None:
                lock.close()
    except (UsageError, StudyError) as e:
        print(f"daal-study: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out / --report under a file, a full or read-only disk
        print(f"daal-study: error: {os_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"daal-study: interrupted ({stop_name()}): run the same command again to go on (finished cells are kept, "
              "half-finished ones resume from their checkpoint_last.pt)", file=sys.stderr)
        return 130


def _lock(out: str):
    """Hold ``out/.daal-study.lock`` (an advisory ``flock``; the open file is returned: closing it
    releases the lock): a second daal-study on the same folder would move this one's running
    cells aside and append to its runs.jsonl; it gets a :class:`StudyError` instead."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    f = open_here(os.path.join(out, ".daal-study.lock"), "a")  # "a": truncates nothing
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise StudyError(f"--out {out}: another daal-study is running on this folder (it holds "
                         f"{os.path.join(out, '.daal-study.lock')}); wait for it or use another --out") from None
    return f


def _study(args: argparse.Namespace, study: Dict[str, Any], command: str) -> int:
    """Run what is missing of ``study`` and report every finished run of ``args.out`` (the runs of
    earlier commands too); a report is never replaced by an empty one."""
    threads = args.threads or max(1, _cores() // args.jobs)
    report = args.report or args.out
    check_report_folder(report)
    cells = expand(study)
    runs_path = os.path.join(report, "runs.jsonl")
    known = {(r["config"], r["seed"]): r for r in _load_runs(runs_path)}
    seeds = set(study["seeds"]) | {seed for _, seed in known}
    if args.tsne and args.plots and args.tsne_seed is not None and args.tsne_seed not in seeds:
        raise StudyError(f"--tsne-seed {args.tsne_seed}: no such seed in the study or its report (seeds "
                         f"{', '.join(map(str, sorted(seeds)))}): the t-SNE panel would be left out")
    identity = lambda: {(k, str(r.get("dir"))) for k, r in known.items()}  # noqa: E731 (a run replaced counts)
    before = identity()
    grid = {os.path.realpath(cell_dir(args.out, c)) for c in cells}  # its own cells are read by _cells_to_run
    found = [(cell, d) for cell, d in finished_cells(args.out)
             if os.path.realpath(d) not in grid and (cell["config"], cell["seed"]) not in known]
    check_names(study, list(known.values()) + [dict(cell, dir=d) for cell, d in found])
    for cell in cells:  # refused before anything is written (no --report folder, no runs.jsonl line)
        if is_finished(cell_dir(args.out, cell)):
            check_same_args(cell, cell_dir(args.out, cell))
    if args.dry_run:  # writes nothing
        todo = _cells_to_run(study, cells, args.out, args.first, dict(known), None)
    else:
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(report, exist_ok=True)
        for cell, d in found:
            known[(cell["config"], cell["seed"])] = rec = collect(cell, d)
            _append_run(runs_path, rec)
        todo = _cells_to_run(study, cells, args.out, args.first, known, runs_path)
    print(f"[daal-study] {plural(len(cells), 'cell')} ({plural(len(study['configs']), 'configuration')} x "
          f"{plural(len(study['seeds']), 'seed')}): "
          f"{len(cells) - len(todo)} finished, {len(todo)} to run"
          + ("" if args.summarize or args.dry_run or not todo
             else f", {args.jobs} at a time x {plural(threads, 'thread')}"),
          flush=True)
    if args.dry_run:  # the finished cells, then those to run in the order and with the commands they will run
        pending = {(c["config"], c["seed"]) for c in todo}
        for cell in cells:  # done here, or done elsewhere and in the report already (not run again): as counted
            if (cell["config"], cell["seed"]) not in pending:
                print(f"done  {shlex.join(cell_command(cell, cell_dir(args.out, cell), threads))}")
        for cell in todo:  # (it printed the study's order and fresh commands: a probe, 2026-12-07)
            d = cell_dir(args.out, cell)
            try:
                resume, _, own, stale = cell_plan(cell, args.out, threads)
            except RuntimeError as e:  # started under other arguments: the run would fail this cell
                print(f"fails {shlex.join(cell_command(cell, d, threads))}  # {e}")
                continue
            state = "resume" if resume else "todo"
            print(f"{state}  {shlex.join(cell_command(cell, d, own, resume=resume))}"
                  + (f"  # {d} (unfinished, no checkpoint) is moved aside first" if stale else ""))
        return 0
    failed = []
    if todo and not args.summarize:
        failed = _run_cells(todo, args.out, args.jobs, threads, args.progress, known, runs_path)
    records = list(known.values())
    table = os.path.join(report, "table.md")
    if (identity() == before and os.path.isfile(table) and not os.path.exists(os.path.join(report, WRITING))
            and not args.summarize):
        print(f"[daal-study] no new finished run: the report in {report} is left as it was (--summarize rebuilds "
              f"it)", flush=True)
    elif records:
        wanted = {(c["config"], c["seed"]) for c in cells}
        earlier = sum((r["config"], r["seed"]) not in wanted for r in records)
        note = (f"The report covers every finished run in {args.out}: {earlier} of these {len(records)} are not in "
                f"the study of the command below but come from earlier daal-study commands (runs.jsonl has each "
                f"run's daal-train command)." if earlier else "")
        missing = [c for c in cells if (c["config"], c["seed"]) not in known]
        if missing:  # a configuration's mean then stands on fewer seeds: say which, and why
            why = {(c["config"], c["seed"]) for c in failed}
            listed = "; ".join(f"{c['config']} seed {c['seed']}"
                               + (" (failed)" if (c["config"], c["seed"]) in why else " (not run)")
                               for c in missing)
            note = (note + " " if note else "") + (
                f"{len(missing)} of the study's {len(cells)} runs have no result and are not in the table: {listed}.")
        written = write_report(study, records, report_order(study, records, report), report, command, note=note,
                               plots=args.plots, tsne=args.tsne, tsne_seed=args.tsne_seed)
        with open(table, encoding="utf-8", errors="surrogateescape") as f:
            print(f.read())
        print("[daal-study] wrote " + ", ".join([runs_path] + written), flush=True)
    else:
        print(f"[daal-study] no finished run to report: nothing written in {report}", flush=True)
    if failed:
        print(f"daal-study: {plural(len(failed), 'cell')} failed; run the same command again to retry them",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
