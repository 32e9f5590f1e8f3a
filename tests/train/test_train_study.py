"""daal-study: the grid from a file and from flags, resume (finished cells are skipped and never
overwritten), the table's mean/std/t-interval arithmetic, the plots, and one tiny real study."""
import json
import math
import os
import shlex
import shutil

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from daal_triton.train import study as S  # noqa: E402

TINY = ("--image-size 32 --shapes-train-per-class 4 --shapes-test-per-class 8 --classes-per-batch 3 "
        "--samples-per-class 2 --steps-per-epoch 2 --epochs 1 --embedding-dim 16 --eval-batch-size 64 "
        "--no-tsne --no-baselines --width 0.125")


def test_grid_from_file_and_flags(tmp_path):
    f = tmp_path / "s.json"
    f.write_text(json.dumps({"name": "ablation", "seeds": [3, 4], "common": ["--epochs", "2"],
                             "configs": {"DAAL": [], "no density": "--daal-lambda-dens 0"}}))
    st = S.make_study(str(f))
    assert st["name"] == "ablation" and st["seeds"] == [3, 4]
    cells = S.expand(st)
    assert [(c["config"], c["seed"]) for c in cells] == [("DAAL", 3), ("DAAL", 4), ("no density", 3),
                                                         ("no density", 4)]
    assert cells[2]["args"] == ["--epochs", "2", "--daal-lambda-dens", "0"] and cells[2]["slug"] == "no-density"
    # flags add configurations and override seeds/common
    st = S.make_study(str(f), ["PA=--loss pml:ProxyAnchorLoss"], seeds=[7], common="--epochs 1")
    assert list(st["configs"]) == ["DAAL", "no density", "PA"] and st["seeds"] == [7]
    assert S.expand(st)[-1]["args"] == ["--epochs", "1", "--loss", "pml:ProxyAnchorLoss"]
    st = S.make_study(None, ["a=", "b=--daal-gamma 0"])
    assert st["seeds"] == [0, 1, 2] and st["configs"] == {"a": [], "b": ["--daal-gamma", "0"]}
    cmd = S.cell_command(S.expand(st)[3], "OUT", 2, python="py")
    assert cmd == ["py", "-m", "daal_triton.train", "--daal-gamma", "0", "--seed", "0", "--out", "OUT",
                   "--no-progress", "--threads", "2"]
    for bad in (dict(configs=["x"]), dict(configs=["a=--seed 3"]), dict(configs=["a=", "a="]),
                dict(configs=["A b=", "a-b="]), dict(configs=["a="], seeds=[1, 1]), dict()):
        with pytest.raises(S.StudyError):
            S.make_study(None, **bad)
    f.write_text("{not json")
    with pytest.raises(S.StudyError):
        S.make_study(str(f))


def test_intervals_stay_inside_the_metrics_range():
    """A t-interval knows no bounds: Recall@1 of 0.99, 1.0, 0.95 over three seeds read
    [0.922, 1.038]. Each metric's interval is clipped to [0, 1] and a paired difference's to
    [-1, 1]; the training loss and the wall time keep theirs."""
    s = S.summarize([0.99, 1.0, 0.95], S.METRIC_RANGE)
    assert s["hi"] == 1.0 and 0.9 < s["lo"] < s["mean"] and s["std"] == pytest.approx(0.026458, abs=1e-6)
    low = S.summarize([0.0, 0.01, 0.05], S.METRIC_RANGE)
    assert low["lo"] == 0.0 and low["hi"] > low["mean"]
    recs = [dict(config=c, seed=seed, args=[], train_loss=x, wall_s=10.0,
                 metrics={"recall@1": r, "nmi": 0.5, "map@r": 0.5, "subcluster_nmi": 0.5})
            for c, vals in (("A", (0.0, 0.02, 0.1)), ("B", (1.0, 0.97, 0.92)))
            for seed, (r, x) in enumerate(zip(vals, (0.1, -0.2, 0.3)))]
    st = S.stats_by_config(recs, ["A", "B"], ["recall@1", "train_loss"])
    assert st["A"]["recall@1"]["lo"] == 0.0 and st["B"]["recall@1"]["hi"] == 1.0
    assert st["A"]["train_loss"]["lo"] < -0.2  # not a fraction: unclipped
    d = S.paired_differences(recs, ["A", "B"], ["recall@1"])["B"]["recall@1"]
    assert -1.0 <= d["lo"] and d["hi"] == 1.0 and d["mean"] == pytest.approx(0.9233333)
    md = S.markdown_table(recs, ["A", "B"])
    row = next(line for line in md.splitlines() if line.startswith("| B | 3 |"))
    assert row.endswith(", 1.000] | [0.500, 0.500] | [0.500, 0.500] | [0.500, 0.500] |"), row


def test_statistics_and_table_on_made_up_runs(tmp_path):
    s = S.summarize([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    h = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2}
    assert s["lo"] == pytest.approx(0.6 - h) and s["hi"] == pytest.approx(0.6 + h)
    assert S.t_quantile(4) == pytest.approx(2.776445, abs=1e-5)
    one = S.summarize([0.4])
    assert one["n"] == 1 and math.isnan(one["std"])
    recs = []
    for c, base in (("A", 0.5), ("B", 0.6)):
        for seed, off in zip((0, 1, 2), (-0.1, 0.0, 0.1)):
            recs.append(dict(config=c, seed=seed, args=["--x", c], train_loss=0.1, wall_s=10.0,
                             metrics={"recall@1": base + off, "nmi": 0.3, "map@r": 0.2,
                                      "subcluster_nmi": base / 2 + off / 10}))
    d = S.paired_differences(recs, ["A", "B"], ["recall@1"])["B"]["recall@1"]
    assert d["mean"] == pytest.approx(0.1) and d["std"] == pytest.approx(0.0, abs=1e-12)
    md = S.markdown_table(recs, ["A", "B"], command="daal-study --x", title="T")
    assert md.startswith("# T") and "daal-study --x" in md
    row = [line for line in md.splitlines() if line.startswith("| B | 3 |")][0]
    assert "0.600 ± 0.100" in row and f"[{0.6 - h:.3f}, {0.6 + h:.3f}]" in row
    assert "| B | 3 | 0.100 [0.100, 0.100]" in md  # paired difference of R@1
    # A run whose MAP@R is missing (NaN: no query had R > 0) leaves that metric n = 2 beside the row's 3.
    del recs[3]["metrics"]["map@r"]
    md = S.markdown_table(recs, ["A", "B"])
    row = [line for line in md.splitlines() if line.startswith("| B | ")]
    assert row[0].startswith("| B | 3 | 0.600 ± 0.100 | 0.300 ± 0.000 | 0.200 ± 0.000 (n=2) | 0.300 ± 0.010 |")
    all_metrics = row[1].split(" | ")
    assert all_metrics[3] == "0.200 ± 0.000 (n=2)" and all_metrics[1] == "0.600 ± 0.100"
    out = tmp_path / "plots"
    out.mkdir()
    for fn, name in ((S.plot_metrics, "m.png"), (S.plot_tradeoff, "t.png")):
        p = fn(recs, ["A", "B"], str(out / name))
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    import numpy as np

    rng = np.random.default_rng(0)
    panels = [(c, rng.normal(size=(40, 8)), np.repeat(np.arange(4), 10), np.tile(np.arange(4), 10),
               ["a", "b", "c", "d"]) for c in ("A", "B")]
    p = S.plot_tsne(panels, str(out / "tsne.png"))
    assert os.path.getsize(p) > 0


def _fake_finished(d, r1):
    os.makedirs(d)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write(json.dumps(dict(epoch=1, model="trained", train_loss=0.2, **{"recall@1": r1, "nmi": 0.1,
                                                                            "subcluster_nmi": 0.2})) + "\n")
    json.dump({"width": 0.25}, open(os.path.join(d, "config.json"), "w"))
    open(os.path.join(d, "results.txt"), "w").write("done\n")


def _recording_run(ran):
    """A ``run_cell`` that appends ``(config, seed)`` to ``ran`` and leaves a finished fake cell."""
    def fake_run(cell, out_, threads, python=None):
        ran.append((cell["config"], cell["seed"]))
        d = S.cell_dir(out_, cell)
        _fake_finished(d, 0.5)
        return S.collect(cell, d)
    return fake_run


def _rows(table):
    return [line for line in table.splitlines() if line.startswith("|")]


def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    out = str(tmp_path / "study")
    st = S.make_study(None, ["A=--epochs 1", "B=--epochs 2"], seeds=[0, 1])
    cells = S.expand(st)
    _fake_finished(S.cell_dir(out, cells[0]), 0.42)  # A seed 0 was finished before
    ran = []
    monkeypatch.setattr(S, "run_cell", _recording_run(ran))
    argv = ["--config", "A=--epochs 1", "--config", "B=--epochs 2", "--seeds", "0", "1", "--out", out,
            "--no-progress", "--no-tsne"]
    assert S.main(argv) == 0
    assert ran == [("B", 0), ("A", 1), ("B", 1)]  # seed-major
    runs = S._read_jsonl(os.path.join(out, "runs.jsonl"))
    assert len(runs) == 4 and {(r["config"], r["seed"]) for r in runs} == {(c["config"], c["seed"]) for c in cells}
    assert [r for r in runs if r["config"] == "A" and r["seed"] == 0][0]["metrics"]["recall@1"] == 0.42
    for name in ("table.md", "study.json", "metrics.png", "r1_vs_subcluster_nmi.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    ran.clear()
    assert S.main(argv) == 0  # everything finished: nothing runs, nothing is appended twice
    assert ran == [] and len(S._read_jsonl(os.path.join(out, "runs.jsonl"))) == 4
    # --summarize with only --out: the study its study.json records, the same table
    table = open(os.path.join(out, "table.md")).read()
    os.remove(os.path.join(out, "table.md"))
    assert S.main(["--summarize", "--out", out, "--no-progress", "--no-plots"]) == 0
    assert ran == [] and _rows(open(os.path.join(out, "table.md")).read()) == _rows(table)
    # ... and into a new --report folder: still the study --out records (it looked for NEW/study.json)
    new = str(tmp_path / "new_report")
    assert S.main(["--summarize", "--out", out, "--report", new, "--no-progress", "--no-plots"]) == 0
    assert ran == [] and _rows(open(os.path.join(new, "table.md")).read()) == _rows(table)
    # an unfinished cell without a checkpoint is moved aside (kept), not deleted
    d = S.cell_dir(out, dict(config="C", slug="c", seed=0))
    os.makedirs(d)
    open(os.path.join(d, "partial.txt"), "w").write("x")
    assert S._move_aside(d).endswith(".incomplete-1") and os.path.isfile(d + ".incomplete-1/partial.txt")


def _fake_python(tmp_path):
    """An executable that stands for python in run_cell: writes a finished run into its --out
    (Recall@1 0.75)."""
    import sys

    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n" + """import json, os, sys
out = sys.argv[sys.argv.index("--out") + 1]
os.makedirs(out)
open(os.path.join(out, "metrics.jsonl"), "w").write(json.dumps(
    {"epoch": 1, "model": "trained", "recall@1": 0.75, "nmi": 0.5, "subcluster_nmi": 0.25}) + "\\n")
json.dump({"width": 0.25}, open(os.path.join(out, "config.json"), "w"))
open(os.path.join(out, "results.txt"), "w").write("done\\n")
""")
    fake.chmod(0o755)
    return fake


def test_an_unfinished_cell_without_a_checkpoint_is_kept_aside_and_run_again(tmp_path):
    """A cell folder left without a checkpoint (killed before its first epoch ended) cannot resume:
    run_cell moves it, and what it was started with, to ``.incomplete-N`` (never deleted, N never
    reused) and runs the cell afresh."""
    fake = _fake_python(tmp_path)
    out = str(tmp_path / "study")
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
    d = S.cell_dir(out, cell)
    for n in (1, 2):
        os.makedirs(d)
        open(os.path.join(d, "partial.txt"), "w").write(f"attempt {n}")
        json.dump(dict(config="A", seed=0, args=cell["args"], wall_s=1.0), open(S.started_file(d), "w"))
        rec = S.run_cell(cell, out, 1, python=str(fake))
        assert rec["metrics"]["recall@1"] == 0.75 and S.is_finished(d)
        assert open(f"{d}.incomplete-{n}/partial.txt").read() == f"attempt {n}"
        assert json.load(open(S.started_file(f"{d}.incomplete-{n}")))["wall_s"] == 1.0
        shutil.rmtree(d)
    log = open(os.path.join(out, "logs", "a-seed0.log")).read()
    assert log.count("--out " + d) == 2 and "--resume" not in log


def test_a_full_disk_leaves_no_torn_study_cell_json(tmp_path, monkeypatch):
    """study_cell.json (what a finished cell ran) written on a full disk: it was left empty, and
    every later run of the study stopped on it, "cannot be read as JSON" (a probe, 2026-12-07). It
    is written whole or not at all: the cell fails with the file named, and nothing is left."""
    import builtins
    import errno

    from daal_triton.train import files

    fake = _fake_python(tmp_path)
    out = str(tmp_path / "study")
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "study_cell.json" not in str(path):
            return f
        f.close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "open", full, raising=False)
    with pytest.raises(OSError, match="No space left on device"):
        S.run_cell(cell, out, 1, python=str(fake))
    d = S.cell_dir(out, cell)
    assert S.is_finished(d) and not [n for n in os.listdir(d) if n.startswith("study_cell.json")]
    monkeypatch.setattr(files, "open", real_open, raising=False)
    assert S.run_cell(cell, out, 1, python=str(fake))["metrics"]["recall@1"] == 0.75  # the disk freed


def test_no_cell_starts_once_the_study_is_stopping(tmp_path):
    """A cell a pool thread started after the study's stop inherited its signals ignored: the stop
    never reached it and the study waited for its end (a review, 2026-12-07). Once stopping, no
    cell starts; before, one does."""
    fake = _fake_python(tmp_path)
    out = str(tmp_path / "study")
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
    S._STOPPING.set()
    try:
        with pytest.raises(KeyboardInterrupt, match="not started"):
            S.run_cell(cell, out, 1, python=str(fake))
    finally:
        S._STOPPING.clear()
    assert not os.path.isdir(S.cell_dir(out, cell))
    assert S.run_cell(cell, out, 1, python=str(fake))["metrics"]["recall@1"] == 0.75


def test_a_full_disk_stops_the_study_and_keeps_runs_jsonl_whole(tmp_path, monkeypatch):
    """runs.jsonl's append failing on a full disk: the study ran every queued cell to the end
    before it said so, left half a line that stopped every later run of the study, and named no
    file (a probe, 2026-12-07). Now no queued cell starts, the file keeps whole lines (the next
    run, the disk freed, reads it and collects the finished cells), and the error names it."""
    import errno
    import time

    from daal_triton.train import files

    ran = []
    good = _recording_run(ran)

    def slow(cell, out_, threads, python=None):
        time.sleep(0.3)
        return good(cell, out_, threads)

    monkeypatch.setattr(S, "run_cell", slow)
    runs = str(tmp_path / "runs.jsonl")
    S._append_run(runs, {"config": "earlier", "seed": 9})
    real_open = files.open_here

    class Full:  # half of what is written lands, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(files, "open_here", lambda path, mode="w": Full(real_open(path, mode)))
    todo = S.expand(S.make_study(None, ["A="], seeds=[0, 1, 2, 3]))
    with pytest.raises(S.StudyError, match=f"cannot record a finished cell in {runs} \\(No space left on device\\)"):
        S._run_cells(todo, str(tmp_path), 1, 1, False, {}, runs)
    assert len(ran) <= 2, ran  # the first, and at most the one started as it finished
    monkeypatch.setattr(files, "open_here", real_open)
    assert S._read_jsonl(runs) == [{"config": "earlier", "seed": 9}]  # whole lines: the next run reads it


def test_a_stop_while_waiting_for_the_running_cells_reaches_them(tmp_path):
    """After a full disk the study waits for its running cells; a SIGTERM then was not passed on
    (the study waited for the cells' end, and its stop hook stayed installed: a review,
    2026-12-07). It reaches them now, and the hook is removed."""
    import signal
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(f"""import errno, os, signal, subprocess, sys, threading, time
from daal_triton.train import console, study as S
t0 = time.time()
def run_cell(cell, out, threads, python=None):
    if cell["seed"] == 0:
        time.sleep(0.5)
        return dict(config=cell["config"], seed=0, metrics={{}})
    with S._RUNNING_LOCK:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        S._RUNNING.add(proc)
    try:
        rc = proc.wait()
    finally:
        with S._RUNNING_LOCK:
            S._RUNNING.discard(proc)
    print("cell", rc, round(time.time() - t0), flush=True)
    raise RuntimeError("stopped")
def full(path, rec):
    raise OSError(errno.ENOSPC, "No space left on device", path)
S.run_cell, S._append_run = run_cell, full
signal.signal(signal.SIGTERM, console._stop_once)
threading.Timer(2.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
todo = S.expand(S.make_study(None, ["A="], seeds=[0, 1]))
try:
    S._run_cells(todo, {str(tmp_path / "st")!r}, 2, 1, False, {{}}, {str(tmp_path / "runs.jsonl")!r})
except BaseException as e:
    print(type(e).__name__, round(time.time() - t0), console.ON_STOP, flush=True)
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    lines = [ln for ln in out.split("\n") if ln.startswith(("cell ", "KeyboardInterrupt "))]
    assert lines[0].startswith(f"cell {-signal.SIGTERM} "), out + err  # the cell was stopped, not waited for
    kind, seconds, hooks = lines[1].split(" ", 2)
    assert kind == "KeyboardInterrupt" and int(seconds) < 20 and hooks == "[]", out + err
    assert "stopping (cannot record a finished cell in" in out + err and "stops it)" in out + err, out + err


def test_a_stop_landing_inside_the_stopping_mark_completes(tmp_path):
    """The stop's handler marks the study stopping; a ``threading.Event`` took a lock there, and a
    SIGTERM landing while the main thread's own mark held it hung the study for good (a review,
    2026-12-07)."""
    import signal
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text("""import os, signal
from daal_triton.train import console, study as S
signal.signal(signal.SIGTERM, console._stop_once)
console.ON_STOP.append(S._mark_stopping)
flag, sent = S._STOPPING, []
def stop_once():
    if not sent:  # one stop, landing inside the first set()
        sent.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
if hasattr(flag, "_cond"):  # an Event: its lock is held around notify_all
    real = flag._cond.notify_all
    def inside():
        stop_once()
        real()
    flag._cond.notify_all = inside
else:
    real = type(flag).set
    def inside(self):
        stop_once()
        real(self)
    type(flag).set = inside
try:
    S._mark_stopping()
except KeyboardInterrupt:
    print("stopped", S._STOPPING.is_set())
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        out, err = "", "hung"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert out.strip() == "stopped True", out + err


def test_the_study_is_stopping_before_its_signals_are_ignored(tmp_path):
    """A pool thread may start a cell between the stop's handler ignoring the signals and the
    study marking itself stopping: that cell inherited them ignored and the study waited for its
    end (noticed 2026-12-07). The mark now comes first, from the handler: here a cell's thread
    sends the SIGTERM, waits until the signals are ignored and finds the study stopping, while the
    main thread is held up on its way from the handler (a slow ``shutdown``)."""
    import subprocess
    import sys

    driver = tmp_path / "driver.py"
    driver.write_text(f"""import concurrent.futures as cf, os, signal, sys, time
from daal_triton.train import console, study as S
seen = []
def run_cell(cell, out, threads, python=None):
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 20
    while signal.getsignal(signal.SIGTERM) != signal.SIG_IGN and time.time() < deadline:
        time.sleep(0.001)
    seen.append((signal.getsignal(signal.SIGTERM) == signal.SIG_IGN, S._STOPPING.is_set()))
    return dict(metrics={{}})
S.run_cell = run_cell
real = cf.ThreadPoolExecutor.shutdown
def slow(self, wait=True, **kw):
    if not wait:
        time.sleep(0.5)
    return real(self, wait=wait, **kw)
cf.ThreadPoolExecutor.shutdown = slow
todo = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0, 1]))
def main():
    S._run_cells(todo, {str(tmp_path / "study")!r}, 1, 1, False, {{}}, {str(tmp_path / "runs.jsonl")!r})
    return 0
status = console._run_program(lambda: main, "daal-study")
print(seen, getattr(console, "ON_STOP", None))
sys.exit(status)
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(driver)], capture_output=True, text=True, env=env, timeout=120,
                          start_new_session=True)
    assert proc.returncode == 130 and proc.stderr.endswith("daal-study: interrupted (SIGTERM)\n"), proc.stderr
    assert proc.stdout.strip() == "[(True, True)] []", proc.stdout  # one cell ran; the hook is gone after


@pytest.mark.parametrize("sigint", ["ignored", "default", "windows"])
def test_a_study_stopped_by_sigterm_stops_its_running_cell(tmp_path, sigint):
    """A study started in the background without job control (``daal-study ... &`` in a script)
    inherits SIGINT ignored, and so do its cells: the SIGINT it passed on after a SIGTERM never
    reached them, and the study waited for the cell to train to its end (a determinism probe,
    2026-12-07). It passes on the signal that stopped it. The cell here is daal-train's console
    around a minute's sleep. "windows": Ctrl-C reaches the study and its cells (one console), and
    ``Popen.send_signal`` refuses SIGINT as CPython's does there (``ValueError: Unsupported signal``:
    the study ended in that traceback, a portability probe, 2026-12-07)."""
    import signal
    import subprocess
    import sys
    import time

    started = tmp_path / "cell-started"
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{sys.executable}\n" + f"""import sys, time
from daal_triton.train import console
def main():
    open({str(started)!r}, "w").close()
    time.sleep(60)
    return 0
sys.exit(console._run_program(lambda: main, "daal-train"))
""")
    fake.chmod(0o755)
    driver = tmp_path / "driver.py"
    driver.write_text(f"""import functools, signal, sys
if {sigint == "ignored"}:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
from daal_triton.train import console, study as S
S.run_cell = functools.partial(S.run_cell, python={str(fake)!r})
if {sigint == "windows"}:
    import subprocess
    def send_signal(self, sig):  # CPython's Windows branch
        if sig != signal.SIGTERM:
            raise ValueError(f"Unsupported signal: {{sig}}")
        self.terminate()
    subprocess.Popen.send_signal = send_signal
todo = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
def main():
    S._run_cells(todo, {str(tmp_path / "study")!r}, 1, 1, False, {{}}, {str(tmp_path / "runs.jsonl")!r})
    return 0
sys.exit(console._run_program(lambda: main, "daal-study"))
""")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(driver)], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=True)
    try:
        deadline = time.time() + 60
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), proc.stderr.read() if proc.poll() is not None else "the cell did not start"
        t0 = time.time()
        if sigint == "windows":
            os.killpg(proc.pid, signal.SIGINT)  # the console's Ctrl-C: every process of it
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=40)
    finally:
        try:  # the study and its cell, whatever happened
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    how = "Ctrl-C" if sigint == "windows" else "SIGTERM"
    assert time.time() - t0 < 30, "the study waited for its cell's end"
    assert proc.returncode == 130 and err.endswith(f"daal-study: interrupted ({how})\n"), err
    log = open(tmp_path / "study" / "logs" / "a-seed0.log").read()
    assert log.endswith(f"daal-train: interrupted ({how})\n"), log


def test_the_default_progress_bar_counts_cells_and_keeps_their_lines(tmp_path, monkeypatch, capsys):
    ran = []
    good = _recording_run(ran)

    def run(cell, out_, threads, python=None):
        if cell["seed"] == 1:
            raise RuntimeError("exit 1")
        return good(cell, out_, threads)

    monkeypatch.setattr(S, "run_cell", run)
    todo = S.expand(S.make_study(None, ["A="], seeds=[0, 1]))
    failed = S._run_cells(todo, str(tmp_path), 1, 1, True, {}, str(tmp_path / "runs.jsonl"))
    assert [c["seed"] for c in failed] == [1] and ran == [("A", 0)]
    text = "".join(capsys.readouterr())
    assert "daal-study" in text and "2/2" in text  # the bar, at its end
    assert "[daal-study] A seed 0: R@1 0.5000, sub-cluster NMI 0.2000" in text
    assert "[daal-study] FAILED A seed 1: exit 1" in text


def test_tiny_real_study(tmp_path):
    """Two configurations x one seed through the real daal-train subprocess, then the report."""
    pytest.importorskip("pytorch_metric_learning")
    out, rep = str(tmp_path / "st"), str(tmp_path / "rep")
    argv = ["--seeds", "5", "--common", TINY, "--config", "DAAL=", "--config",
            "MS=--loss pml:MultiSimilarityLoss --miner pml:MultiSimilarityMiner", "--out", out, "--report", rep,
            "--threads", "1", "--no-progress"]
    assert S.main(argv) == 0
    runs = S._read_jsonl(os.path.join(rep, "runs.jsonl"))
    assert [r["config"] for r in runs].count("DAAL") == 1 and len(runs) == 2
    for r in runs:
        assert 0 <= r["metrics"]["recall@1"] <= 1 and r["width"] == 0.125 and r["epoch"] == 1
        assert r["command"].startswith("daal-train ") and "--seed 5" in r["command"]
    for name in ("table.md", "metrics.png", "r1_vs_subcluster_nmi.png", "tsne_by_mode.png"):
        assert os.path.getsize(os.path.join(rep, name)) > 0
    mtime = os.path.getmtime(os.path.join(out, "cells", "daal", "seed5", "results.txt"))
    assert S.main(argv + ["--no-plots"]) == 0  # resumed: nothing re-run, nothing overwritten
    assert os.path.getmtime(os.path.join(out, "cells", "daal", "seed5", "results.txt")) == mtime
    # a finished cell asked to run with other arguments is refused
    bad = [a if a != "DAAL=" else "DAAL=--daal-gamma 0" for a in argv]
    assert S.main(bad) == 2


def _fake_cell(cell, out_, threads, python=None):
    """run_cell without daal-train: a finished cell, its study_cell.json as run_cell writes it."""
    d = S.cell_dir(out_, cell)
    _fake_finished(d, 0.5 + cell["seed"] / 100)
    json.dump(dict(config=cell["config"], seed=cell["seed"], args=cell["args"]),
              open(os.path.join(d, "study_cell.json"), "w"))
    return S.collect(cell, d)


def _failing_cell(cell, out_, threads, python=None):
    raise RuntimeError(f"cell {cell['config']!r} seed {cell['seed']} failed (exit 2)")


def test_a_command_where_nothing_finishes_keeps_the_report(tmp_path, monkeypatch):
    out = str(tmp_path / "st")
    flags = ["--out", out, "--no-progress", "--no-tsne"]
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    assert S.main(["--config", "A=--epochs 1", "--seeds", "0", "1"] + flags) == 0
    report = ("table.md", "study.json", "metrics.png", "r1_vs_subcluster_nmi.png", "runs.jsonl")
    before = {n: open(os.path.join(out, n), "rb").read() for n in report}
    monkeypatch.setattr(S, "run_cell", _failing_cell)
    assert S.main(["--config", "B=--epochs 3", "--seeds", "5"] + flags) == 1  # the cell fails: nothing new
    assert {n: open(os.path.join(out, n), "rb").read() for n in report} == before
    assert S.main(["--config", "A=--epochs 3", "--seeds", "5"] + flags) == 2  # A's runs had other arguments
    assert {n: open(os.path.join(out, n), "rb").read() for n in report} == before
    # a command that adds a run reports every finished run of --out; the first configuration stays first
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    assert S.main(["--config", "C=--epochs 2", "--seeds", "0"] + flags) == 0
    table = open(os.path.join(out, "table.md")).read()
    assert "3 runs; seeds 0, 1." in table and "2 of these 3 are not in the study of the command below" in table
    assert table.index("| A | 2 |") < table.index("| C | 1 |") and "Difference to **A**" in table
    reported = json.load(open(os.path.join(out, "study.json")))["reported"]
    assert reported == {"A": {"args": ["--epochs", "1"], "seeds": [0, 1]},
                        "C": {"args": ["--epochs", "2"], "seeds": [0]}}
    # another --report finds the finished cells of --out by their study_cell.json
    rep = str(tmp_path / "rep")
    assert S.main(["--config", "C=--epochs 2", "--seeds", "1", "--report", rep] + flags) == 0
    assert "4 runs" in open(os.path.join(rep, "table.md")).read()
    assert len(S._read_jsonl(os.path.join(rep, "runs.jsonl"))) == 4


def test_the_table_names_the_runs_that_failed(tmp_path, monkeypatch):
    """A configuration whose mean stands on fewer seeds than the study asked for says so: the
    table lists each missing run, failed in this command or not run."""
    out = str(tmp_path / "st")

    def some_fail(cell, out_, threads, python=None):
        if cell["config"] == "B" and cell["seed"] == 1:
            return _failing_cell(cell, out_, threads)
        return _fake_cell(cell, out_, threads)

    monkeypatch.setattr(S, "run_cell", some_fail)
    argv = ["--config", "A=--epochs 1", "--config", "B=--epochs 2", "--seeds", "0", "1", "--out", out,
            "--no-progress", "--no-tsne", "--no-plots"]
    assert S.main(argv) == 1
    table = open(os.path.join(out, "table.md")).read()
    assert "1 of the study's 4 runs have no result and are not in the table: B seed 1 (failed)." in table
    assert "| B | 1 |" in table
    monkeypatch.setattr(S, "run_cell", _fake_cell)  # the retry finishes it: the note is gone
    assert S.main(argv) == 0
    table = open(os.path.join(out, "table.md")).read()
    assert "have no result" not in table and "| B | 2 |" in table


def test_dry_run_writes_nothing_and_bad_arguments_are_one_line(tmp_path, capsys, error_line):
    out = tmp_path / "st"
    assert S.main(["--config", "A=", "--seeds", "0", "--out", str(out), "--dry-run"]) == 0
    assert "todo" in capsys.readouterr().out and not out.exists()
    for argv in (["--seeds", "x", "--config", "A="], ["--no-such-flag"], ["--config", "A=", "--jobs"]):
        assert S.main(argv + ["--out", str(out)]) == 2, argv
        assert "see daal-study --help" in error_line("daal-study"), argv
    assert S.main(["--config", "A=", "--out", ""]) == 2
    assert "--out" in error_line("daal-study")
    assert not out.exists()


def test_a_cell_stopped_half_way_resumes(tmp_path):
    """The study gives every cell --threads and a half-finished one --resume: that pair used to crash."""
    from daal_triton.train import cli

    out, common = str(tmp_path / "st"), TINY.replace("--epochs 1", "--epochs 2")
    (cell,) = S.expand(S.make_study(None, ["DAAL="], seeds=[5], common=common))
    d = S.cell_dir(out, cell)
    assert cli.main(cell["args"] + ["--seed", "5", "--out", d, "--no-progress", "--stop-after", "1"]) == 0
    assert S.main(["--seeds", "5", "--common", common, "--config", "DAAL=", "--out", out, "--threads", "1",
                   "--no-progress", "--no-plots"]) == 0
    (run,) = S._read_jsonl(os.path.join(out, "runs.jsonl"))
    assert run["resumed"] and run["epoch"] == 2 and "--resume" in run["command"]
    assert [r["epoch"] for r in S._read_jsonl(os.path.join(d, "metrics.jsonl"))] == [1, 2]


def test_a_half_finished_cell_resumes_with_its_own_thread_count(tmp_path, capsys):
    """A cell started at --threads 1 and resumed by a study at --threads 2 ran its second part at 2
    threads, without a word, and its record named 2 alone: neither run's numbers (PyTorch's CPU sums
    depend on the thread count; a determinism probe, 2026-12-07). It resumes at its own count, and
    says so; a cell started before the count was recorded takes the study's."""
    fake = tmp_path / "fake_python"
    fake.write_text(_fake_python(tmp_path).read_text().replace("os.makedirs(out)", "os.makedirs(out, exist_ok=True)"))
    out = str(tmp_path / "study")
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
    d = S.cell_dir(out, cell)
    for recorded, used in ((1, 1), (None, 2)):
        os.makedirs(d)
        open(os.path.join(d, "checkpoint_last.pt"), "w").close()  # half-finished: it resumes
        json.dump(dict(config="A", seed=0, args=cell["args"], wall_s=1.0, **({"threads": recorded} if recorded else {})),
                  open(S.started_file(d), "w"))
        S.run_cell(cell, out, 2, python=str(fake))
        said = capsys.readouterr().out
        assert ("resumes with --threads 1, as it was started" in said) == (recorded == 1), said
        command = open(os.path.join(out, "logs", "a-seed0.log")).read().splitlines()[-1]
        assert f"--threads {used} --resume" in command
        assert json.load(open(os.path.join(d, "study_cell.json")))["threads"] == used
        assert json.load(open(S.started_file(d)))["threads"] == used
        shutil.rmtree(d)


def test_study_inputs_that_were_tracebacks_are_one_line(tmp_path, error_line):
    # a seeds entry that is not a list, a study file that is not UTF-8, --out under a file, a torn
    # runs.jsonl (a study killed while appending), flags that would make a cell never finish
    bad_seeds = tmp_path / "seeds.json"
    bad_seeds.write_text('{"configs": {"A": []}, "seeds": 5}')
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'\xff\xfe{"configs": {"A": []}}')
    afile = tmp_path / "afile"
    afile.write_text("x")
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "runs.jsonl").write_text('{"config": "A", "seed": 0}\n{"config": "A", "se')
    cases = [(["--file", str(bad_seeds), "--out", str(tmp_path / "o1")], "seeds must be a non-empty list"),
             (["--file", str(latin), "--out", str(tmp_path / "o2")], "latin.json"),
             (["--config", "A=", "--seeds", "0", "--out", str(afile / "sub")], "afile"),
             (["--config", "A=", "--seeds", "0", "--out", str(torn)], "runs.jsonl, line 2: not a JSON line"),
             (["--config", "A=--stop-after 1", "--seeds", "0", "--out", str(tmp_path / "o3")], "--stop-after is set"),
             (["--config", "common=", "--config", "Common=--epochs 2", "--out", str(tmp_path / "o4")],
              "map to the same folder name 'common'"),
             # a cell's arguments that daal-train cannot parse: refused up front, dry run included
             (["--config", "A=", "--config", "DAAL=--epochs x", "--out", str(tmp_path / "o5")],
              "configuration 'DAAL': its daal-train arguments do not parse"),
             (["--config", "A=--no-such-flag", "--dry-run", "--out", str(tmp_path / "o6")], "--no-such-flag"),
             (["--config", "A=--help", "--dry-run", "--out", str(tmp_path / "o7")], "-h/--help is no training")]
    for argv, words in cases:
        assert S.main(argv + ["--no-progress"]) == 2, argv
        assert words in error_line("daal-study"), argv


def test_study_flags_out_of_range_and_reserved_cell_flags_are_one_line(tmp_path, error_line):
    # --dry-run: a check that lets one through must not start real cells
    seeds_bool = tmp_path / "seeds_bool.json"
    seeds_bool.write_text('{"configs": {"A": []}, "seeds": [true, false]}')
    quote = tmp_path / "quote.json"
    quote.write_text('{"configs": {"A": "--lr \'x"}}')
    out = tmp_path / "o"
    cases = [(["--config", "A=", "--jobs", "0"], "--jobs and --threads must be >= 1"),
             (["--config", "A=", "--threads", "0"], "--jobs and --threads must be >= 1"),
             (["--config", "A=--overwrite"], "--overwrite is set by the study"),
             (["--config", "A=--seed=3"], "--seed=3 is set by the study"),
             (["--common=--out=x", "--config", "A="], "'common': --out=x is set by the study"),
             # abbreviations argparse takes for them (a CLI fuzz, 2026-12-07: --resum resumed another run)
             (["--config", "A=--resum other/checkpoint_last.pt"], "--resum is set by the study"),
             (["--config", "A=--thread 3"], "--thread is set by the study"),
             # a CLI fuzz, 2026-12-07: accepted, then every cell refused it; --hel printed daal-train's help
             (["--config", "A=", "--threads", str(10 ** 30)], "--threads must be between 1 and 4096"),
             (["--config", "A=--hel"], "configuration 'A': -h/--help is no training argument"),
             (["--config", "A=--dataset digits -P 5 --data-seed 1"],
              "configuration 'A': daal-train would refuse it: --data-seed is read by --dataset shapes only"),
             (["--common=--ou=x", "--config", "A="], "'common': --ou=x is set by the study"),
             (["--file", str(seeds_bool)], "seeds must be a non-empty list of integers"),
             (["--config", "A=", "--first", "B"], "--first 'B': no such configuration"),
             (["--config", "A=", "--seeds", "2", "-1"], "seeds must be >= 0 and < 2**32 (daal-train's --seed)"),
             (["--config", "A=", "--seeds", str(2 ** 32)], "seeds must be >= 0 and < 2**32"),
             (["--config", "A=--lr 'x"], "--config \"A=--lr 'x\": No closing quotation"),
             (["--common", "--lr 'x", "--config", "A="], "--common: No closing quotation"),
             (["--file", str(quote)], "configuration 'A': No closing quotation"),
             (["--config", "A=--lr -1"], "configuration 'A': daal-train would refuse it: --lr must be > 0"),
             (["--common", "--epochs 0", "--config", "A="], "configuration 'A': daal-train would refuse it: --epochs"),
             (["--config", "A=--miner bogus"], "configuration 'A': daal-train would refuse it: --miner must be"),
             (["--config", "A=--miner-kwargs '{\"epsilon\": 0.1}'"],
              "configuration 'A': daal-train would refuse it: --miner-kwargs needs --miner"),
             (["--config", "A=--device cuda"], "configuration 'A': daal-train would refuse it: --device cuda"),
             (["--config", "A=--loss-backend triton"],
              "configuration 'A': daal-train would refuse it: --loss-backend triton needs a CUDA device"),
             (["--config", "A=--weights nowhere.pth"], "configuration 'A': daal-train would refuse it: --weights"),
             (["--config", "A=--data-root x"], "configuration 'A': daal-train would refuse it: --data-root"),
             (["--config", "A=--dataset folder"],
              "configuration 'A': daal-train would refuse it: --dataset folder needs --data-root"),
             # failed in every cell (exit status 2 in its log) before: digits has 5 training classes
             (["--config", "A=--dataset digits"],
              "configuration 'A': daal-train would refuse it: --classes-per-batch (P) = 12, but digits has 5 "
              "training classes"),
             (["--config", "A=--dataset cars196 --data-root . -P 99"],
              "daal-train would refuse it: --classes-per-batch (P) = 99, but cars196 has at most 98 training classes"),
             (["--summarize"], "--summarize alone reads the study of")]  # no study.json in --out
    for argv, words in cases:
        seeds = [] if "--file" in argv or "--seeds" in argv else ["--seeds", "0"]
        assert S.main(argv + seeds + ["--out", str(out), "--dry-run", "--no-progress"]) == 2, argv
        assert words in error_line("daal-study"), argv
    assert not out.exists()


def test_a_finished_cell_is_never_reported_under_another_name_or_arguments(tmp_path, monkeypatch, error_line):
    # "DAAL" renamed "daal" (the same folder), or its arguments edited with the report moved
    # elsewhere: the finished run would be reported as a run of the new name or arguments
    out = str(tmp_path / "st")
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    flags = ["--seeds", "0", "--out", out, "--no-progress", "--no-plots", "--no-tsne"]
    assert S.main(["--config", "DAAL=--epochs 1"] + flags) == 0
    runs = open(os.path.join(out, "runs.jsonl")).read()
    assert S.main(["--config", "daal=--epochs 1"] + flags) == 2
    assert "holds a run of configuration 'DAAL', not 'daal'" in error_line("daal-study")
    report = tmp_path / "elsewhere"
    assert S.main(["--config", "DAAL=--epochs 2", "--report", str(report)] + flags) == 2
    assert "was run with '--epochs 1', the study now says '--epochs 2'" in error_line("daal-study")
    assert open(os.path.join(out, "runs.jsonl")).read() == runs and not (report / "runs.jsonl").exists()


def test_a_changed_cell_is_refused_before_anything_is_written(tmp_path, monkeypatch, error_line):
    # B's arguments edited, the report sent elsewhere: A (unchanged, finished) was recorded in the
    # new report's runs.jsonl and its folder made before B's refusal
    out = str(tmp_path / "st")
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    flags = ["--seeds", "0", "--out", out, "--no-progress", "--no-plots", "--no-tsne"]
    assert S.main(["--config", "A=--epochs 1", "--config", "B=--epochs 1"] + flags) == 0
    report = tmp_path / "elsewhere"
    for extra in ([], ["--dry-run"]):
        argv = ["--config", "A=--epochs 1", "--config", "B=--epochs 2", "--report", str(report)] + flags + extra
        assert S.main(argv) == 2
        assert "was run with '--epochs 1', the study now says '--epochs 2'" in error_line("daal-study")
        assert not report.exists()


def test_finished_cells_are_found_by_their_folder_and_record(tmp_path):
    # a study's cells under --out/cells/<slug>/seed<N>: one copied by hand into another seed's
    # folder, or a folder named for a negative seed, is not a run of the seed it claims
    out = str(tmp_path / "st")
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[3]))
    _fake_cell(cell, out, None)
    good = S.cell_dir(out, cell)
    for name, seed in (("seed4", 3), ("seed-1", -1), ("seed03", 3)):
        _fake_cell(dict(cell, seed=seed), out, None) if name == "seed-1" else shutil.copytree(
            good, os.path.join(os.path.dirname(good), name))
    assert [(c["config"], c["seed"], d) for c, d in S.finished_cells(out)] == [("A", 3, good)]


def test_a_second_study_on_the_same_out_is_refused(tmp_path, error_line):
    out = tmp_path / "st"
    out.mkdir()
    held = S._lock(str(out))
    try:
        assert S.main(["--config", "A=", "--seeds", "0", "--out", str(out), "--no-progress"]) == 2
        assert "another daal-study is running on this folder" in error_line("daal-study")
    finally:
        held.close()


def test_a_report_that_has_a_cell_from_another_out_does_not_run_it_again(tmp_path, monkeypatch, capsys):
    # docs: --out runs/study --report docs/results/shapes; the report's (config, seed) runs in the
    # first --out are not run again in a second one (they were, and runs.jsonl got duplicates)
    ran = []
    monkeypatch.setattr(S, "run_cell", _recording_run(ran))
    report = str(tmp_path / "report")
    base = ["--config", "A=", "--seeds", "0", "1", "--report", report, "--no-progress", "--no-plots", "--no-tsne"]
    assert S.main(base + ["--out", str(tmp_path / "old")]) == 0 and len(ran) == 2
    ran.clear()
    assert S.main(base + ["--out", str(tmp_path / "new")]) == 0
    assert ran == [] and "already has its run in" in capsys.readouterr().out
    assert len(S._read_jsonl(os.path.join(report, "runs.jsonl"))) == 2
    # and --dry-run lists them as done, as its count says (it listed them "todo")
    assert S.main(base + ["--out", str(tmp_path / "new"), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "2 finished, 0 to run" in said and "\ntodo " not in said and said.count("\ndone ") == 2


def test_a_half_finished_cell_resumes_only_under_its_arguments(tmp_path):
    # the study file edited after an interruption: resuming would mix two settings in one run
    (cell,) = S.expand(S.make_study(None, ["A=--lr 0.01"], seeds=[0]))
    d = S.cell_dir(str(tmp_path), cell)
    os.makedirs(d)
    open(os.path.join(d, "checkpoint_last.pt"), "wb").write(b"x")
    json.dump(dict(config="A", seed=0, args=["--lr", "0.001"], wall_s=5.0), open(S.started_file(d), "w"))
    with pytest.raises(RuntimeError, match="was started with '--lr 0.001', the study now says '--lr 0.01'"):
        S.run_cell(cell, str(tmp_path), 1, python="/nonexistent")


def test_counts_of_one_are_singular(tmp_path, capsys):
    """"1 cell (1 configuration x 1 seed)", not "1 cells (1 configurations x 1 seeds)"."""
    from daal_triton.train.log import plural

    assert [plural(n, "thread") for n in (0, 1, 2)] == ["0 threads", "1 thread", "2 threads"]
    assert [plural(n, "held-out class") for n in (1, 3)] == ["1 held-out class", "3 held-out classes"]
    assert S.main(["--config", "A=", "--seeds", "0", "--out", str(tmp_path / "o"), "--dry-run", "--no-progress"]) == 0
    assert "1 cell (1 configuration x 1 seed): 0 finished, 1 to run" in capsys.readouterr().out
    assert S.main(["--config", "A=", "--config", "B=", "--seeds", "0", "1", "--out", str(tmp_path / "o"),
                   "--dry-run", "--no-progress"]) == 0
    assert "4 cells (2 configurations x 2 seeds)" in capsys.readouterr().out


def test_a_report_cut_short_is_written_again_and_summarize_keeps_the_command(tmp_path, monkeypatch):
    """A Ctrl-C while the report is written (its plots, the t-SNE: seconds to minutes) left
    table.md without them, and the same command again, finding no new finished run, left it so
    for good: the report is written again until it is whole. ``--summarize`` rebuilding a report
    from its own study.json keeps the command that ran the cells (it put its own there)."""
    out = str(tmp_path / "st")
    argv = ["--config", "A=--epochs 1", "--seeds", "0", "1", "--out", out, "--no-progress", "--no-tsne"]
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    real = S.plot_tradeoff

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "plot_tradeoff", interrupted)
    assert S.main(argv) == 130
    assert os.path.isfile(os.path.join(out, "table.md")) and not os.path.exists(os.path.join(out, "r1_vs_subcluster_nmi.png"))
    monkeypatch.setattr(S, "plot_tradeoff", real)
    assert S.main(argv) == 0  # nothing new ran: the report is completed all the same
    assert os.path.getsize(os.path.join(out, "r1_vs_subcluster_nmi.png")) > 0
    assert not os.path.exists(os.path.join(out, S.WRITING))
    stamp = os.path.getmtime(os.path.join(out, "table.md"))
    assert S.main(argv) == 0 and os.path.getmtime(os.path.join(out, "table.md")) == stamp  # whole: left as it was
    command = "daal-study " + shlex.join(argv)
    assert json.load(open(os.path.join(out, "study.json")))["command"] == command
    assert S.main(["--summarize", "--out", out, "--no-progress", "--no-plots"]) == 0
    assert json.load(open(os.path.join(out, "study.json")))["command"] == command
    assert f"```bash\n{command}\n```" in open(os.path.join(out, "table.md")).read()
    # naming the study again (--config here, --file alike) kept the summarize command instead
    assert S.main(["--summarize", "--config", "A=--epochs 1", "--out", out, "--no-progress", "--no-plots"]) == 0
    assert json.load(open(os.path.join(out, "study.json")))["command"] == command


def test_a_tsne_seed_the_study_does_not_have_is_refused_up_front(tmp_path, monkeypatch, error_line):
    """``--tsne-seed 7`` in a study of seeds 0 and 1 (and no earlier run of seed 7 in its report)
    silently left the t-SNE panel out; it is one error line before any cell runs. A seed of an
    earlier command's runs in the report is one the panel can show."""
    out = str(tmp_path / "st")
    ran = []
    monkeypatch.setattr(S, "run_cell", _recording_run(ran))
    base = ["--config", "A=--epochs 1", "--out", out, "--no-progress"]
    assert S.main(base + ["--seeds", "0", "1", "--tsne-seed", "7"]) == 2
    assert "--tsne-seed 7: no such seed" in error_line("daal-study") and ran == []
    assert S.main(base + ["--seeds", "7", "--no-tsne"]) == 0 and ran == [("A", 7)]
    assert S.main(base + ["--seeds", "0", "--tsne-seed", "7"]) == 0  # 7 is in the report now


@pytest.mark.parametrize("report", ["shapes", "shapes_12epochs", "shapes_warmup1"])
def test_published_tables_are_what_their_runs_give(report):
    """docs/results/*/table.md, the numbers the docs quote: every row and the method sentence are
    what markdown_table renders today from the runs.jsonl beside them (a hand edit, a table left
    from an older renderer, or a change of the arithmetic that moves a published number fails)."""
    base = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "docs", "results", report)
    with open(os.path.join(base, "runs.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(base, "table.md")) as f:
        published = f.read()
    names = {r["config"] for r in records}
    order = list(dict.fromkeys(line.split("|")[1].strip() for line in _rows(published)
                               if line.split("|")[1].strip() in names))  # the report's order (its --first)
    assert sorted(order) == sorted(names)
    sentence = next(line for line in published.splitlines() if line.startswith(f"{len(records)} runs; "))
    note = sentence.split("Final epoch, held-out classes.", 1)[1].strip()
    rendered = S.markdown_table(records, order, note=note)
    assert sentence in rendered.splitlines()
    assert _rows(published) == _rows(rendered)


def test_a_report_that_fails_midway_keeps_the_previous_table(tmp_path, monkeypatch):
    """table.md was opened for writing (emptied) before its text existed: a failure then (an ASCII
    locale's UnicodeEncodeError on the ±, found by a probe under LC_ALL=C PYTHONUTF8=0) left the
    previous report's table empty. It is written whole or not at all, as UTF-8 whatever the locale."""
    out = str(tmp_path / "st")
    argv = ["--config", "A=--epochs 1", "--seeds", "0", "1", "--out", out, "--no-progress", "--no-plots"]
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    assert S.main(argv) == 0
    table = os.path.join(out, "table.md")
    before = open(table, "rb").read()
    assert "±".encode() in before

    def failing(*args, **kwargs):
        raise UnicodeEncodeError("ascii", "±", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(S, "markdown_table", failing)
    with pytest.raises(UnicodeEncodeError):
        S.main(argv + ["--seeds", "2"])
    assert open(table, "rb").read() == before


@pytest.mark.parametrize("flag", ["--out", "--report"])
def test_a_folder_the_study_cannot_make_is_named_by_its_flag(tmp_path, monkeypatch, flag, error_line):
    """``--out afile/st`` (or ``--report``) said "Not a directory: afile/st", naming no flag (a
    probe, 2026-12-06); checked up front now, as daal-train's --out is. Nothing is written."""
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    path = str(blocker / "st")
    out = path if flag == "--out" else str(tmp_path / "out")
    argv = ["--config", "A=--epochs 1", "--seeds", "0", "--out", out, "--no-progress", "--no-plots"]
    assert S.main(argv + (["--report", path] if flag == "--report" else [])) == 2
    assert error_line("daal-study") == f"daal-study: error: {flag} {path}: {blocker} is a file, not a folder"
    assert sorted(os.listdir(tmp_path)) == ["afile"] and blocker.read_text() == "mine"


def test_the_report_study_json_is_no_study_file(tmp_path, error_line):
    """``--file OUT/study.json`` (a file-safety probe, 2026-12-07): a hand-written study file in the
    report folder was replaced by the report's study.json (its notes gone), and the same command
    then failed on that file's 'command' and 'reported'. Refused before anything runs."""
    out = tmp_path / "st"
    out.mkdir()
    mine = out / "study.json"
    mine.write_text('{"configs": {"A": "--epochs 1"}, "seeds": [0], "description": "my notes"}')
    assert S.main(["--file", str(mine), "--out", str(out), "--no-progress"]) == 2
    assert "is the report's study.json, which daal-study writes" in error_line("daal-study")
    assert "my notes" in mine.read_text() and sorted(os.listdir(out)) == ["study.json"]


def test_a_damaged_checkpoint_leaves_its_tsne_panel_out(tmp_path, monkeypatch, capsys):
    """The t-SNE panels embed each configuration's run with its ``checkpoint_last.pt``; a damaged one
    (a CLI fuzz, 2026-12-07) ended ``daal-study`` and ``--summarize`` with a CheckpointError
    traceback, no plots written after it. Its panel is left out, saying why; the report is whole."""
    out = str(tmp_path / "st")
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    argv = ["--config", "A=--epochs 1", "--seeds", "0", "--out", out, "--no-progress"]
    assert S.main(argv + ["--no-tsne"]) == 0
    cell = os.path.join(out, "cells", "a", "seed0")
    with open(os.path.join(cell, "checkpoint_last.pt"), "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    capsys.readouterr()
    assert S.main(["--summarize", "--out", out, "--no-progress"]) == 0
    said = capsys.readouterr()
    assert f"[daal-study] no t-SNE panel for A (seed 0): {cell} cannot be embedded: checkpoint" in said.out
    assert "Traceback" not in said.out + said.err
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 0 and not os.path.exists(os.path.join(out, S.WRITING))
    # without a checkpoint_last.pt (--save best or none) the panel is left out too: said, not silently
    # (a probe, 2026-12-07)
    os.remove(os.path.join(cell, "checkpoint_last.pt"))
    assert S.main(["--summarize", "--out", out, "--no-progress"]) == 0
    said = capsys.readouterr()
    assert f"[daal-study] no t-SNE panel for A (seed 0): {cell} has no checkpoint_last.pt" in said.out, said.out


def test_links_and_fifos_in_a_study_folder_are_never_written_through(tmp_path, error_line):
    """daal-study opened its own files with open(): a link planted at a cell's log, its
    .started.json, runs.jsonl or .daal-study.lock wrote (appended, or truncated: the lock was
    opened "w") into the file it points to; a FIFO at the lock hung the study. Links are replaced
    by files, what they point to stays; a FIFO is one error line."""
    import signal

    precious = tmp_path / "precious"
    precious.mkdir()
    for name in ("log.txt", "started.txt", "runs.txt", "lock.txt"):
        (precious / name).write_text(f"my {name}")
    keep = {n: (precious / n).read_text() for n in os.listdir(precious)}
    fake = _fake_python(tmp_path)
    out = tmp_path / "study"
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
    d = S.cell_dir(str(out), cell)
    os.makedirs(os.path.dirname(d))
    (out / "logs").mkdir()
    os.symlink(precious / "log.txt", out / "logs" / "a-seed0.log")
    os.symlink(precious / "started.txt", S.started_file(d))
    os.symlink(precious / "runs.txt", out / "runs.jsonl")
    os.symlink(precious / "lock.txt", out / ".daal-study.lock")
    assert S.run_cell(cell, str(out), 1, python=str(fake))["metrics"]["recall@1"] == 0.75
    S._append_run(str(out / "runs.jsonl"), {"config": "A", "seed": 0})
    S._lock(str(out)).close()
    assert {n: (precious / n).read_text() for n in os.listdir(precious)} == keep
    for path in (out / "logs" / "a-seed0.log", S.started_file(d), out / "runs.jsonl", out / ".daal-study.lock"):
        assert os.path.isfile(path) and not os.path.islink(path), path
    assert "--out " + d in (out / "logs" / "a-seed0.log").read_text()
    # a FIFO at the lock: one line, not a study that waits for ever for a reader
    os.remove(out / ".daal-study.lock")
    os.mkfifo(out / ".daal-study.lock")

    def hung(*_):
        raise AssertionError("daal-study hung opening the FIFO at .daal-study.lock")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        assert S.main(["--config", "A=--epochs 1", "--seeds", "0", "--out", str(out), "--no-progress"]) == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "a FIFO (named pipe) is there, not a file" in error_line("daal-study")


def test_configuration_names_are_text_in_the_table_and_the_plots(tmp_path, monkeypatch, capsys):
    """Names are the user's text: ``$\\lamda$`` stopped every report in matplotlib's TeX parser
    (a traceback, and the same again at every command), ``$5 vs $10`` lost its dollars, a leading
    ``_`` left the legend, and a ``|`` shifted every column of table.md (a probe, 2026-12-07)."""
    import matplotlib

    matplotlib.use("Agg")
    names = ["DAAL $\\lamda$ 0.1", "price $5 vs $10", "_baseline", "A|B", "two\nlines"]
    out = str(tmp_path / "st")
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    argv = sum((["--config", f"{n}=--epochs {i + 1}"] for i, n in enumerate(names)), [])
    assert S.main(argv + ["--seeds", "0", "1", "--out", out, "--no-progress", "--no-tsne"]) == 0
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    rows = [r for r in _rows(table) if r.startswith("| A\\|B |")]
    assert len(rows) == 3 and all(r.replace("\\|", "").count("|") == _rows(table)[0].count("|") for r in rows[:1])
    assert "\n| two lines |" in table and "\nlines |" not in table and "- **two lines**:" in table  # (a review)
    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, path, *a, **k):
        seen[os.path.basename(path)] = fig
        return real_savefig(fig, path, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    records = S._load_runs(os.path.join(out, "runs.jsonl"))
    S.plot_metrics(records, names, str(tmp_path / "m.png"))
    S.plot_tradeoff(records, names, str(tmp_path / "t.png"))
    ticks = [t.get_text() for t in seen["m.png"].axes[0].get_xticklabels()]
    assert ticks == ["DAAL \\$\\lamda\\$ 0.1", "price \\$5 vs \\$10", " _baseline", "A|B", "two\nlines"]
    legend = [t.get_text() for t in seen["t.png"].axes[0].get_legend().get_texts()]
    assert len(legend) == 5 and " _baseline" in legend


def test_a_name_too_long_for_a_folder_is_refused_up_front():
    S.make_study(None, ["x" * S.SLUG_MAX + "="])
    with pytest.raises(S.StudyError, match="folder name would be 250 characters long"):
        S.make_study(None, ["x" * 250 + "="])


@pytest.mark.parametrize("mine", ["runs.jsonl", "runs.jsonl-partial", "table.md", "study.json", "study.json-a-study",
                                  "metrics.png"])
def test_a_report_folder_with_files_not_daal_studys_is_refused(tmp_path, monkeypatch, mine, error_line):
    """A runs.jsonl of another program in --report gave a KeyError traceback (one with config, seed
    and metrics was appended to first); a user's table.md, study.json (a study file too) or plot
    there was replaced without a word (a probe and a review, 2026-12-07)."""
    report = tmp_path / "r"
    report.mkdir()
    content = {"runs.jsonl": '{"x": 1}\n', "runs.jsonl-partial": '{"config": "A", "seed": 0, "metrics": {"recall@1": 0.5}}\n',
               "study.json": '{"my": "data"}', "study.json-a-study": '{"name": "mine", "seeds": [0], "configs": {"A": []}}'
               }.get(mine, "mine")
    mine = mine.split("-")[0]
    (report / mine).write_text(content)
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    argv = ["--config", "A=", "--seeds", "0", "--out", str(tmp_path / "o"), "--report", str(report), "--no-progress",
            "--no-tsne"]
    assert S.main(argv) == 2
    line = error_line("daal-study")
    assert str(report / mine) in line or f"holds {mine}" in line, line
    assert (report / mine).read_text() == content and sorted(p.name for p in report.iterdir()) == [mine]
    # daal-study's own report is rewritten by the next command
    (report / mine).unlink()
    assert S.main(argv) == 0
    assert S.main(argv + ["--summarize"]) == 0


def test_the_dry_run_shows_the_commands_in_the_order_they_run(tmp_path, capsys):
    """The dry run printed the study's order (configuration-major) and fresh commands: a
    half-finished cell's --resume and its own --threads, and a folder moved aside, were not shown
    (a probe, 2026-12-07)."""
    out = str(tmp_path / "o")
    study = S.make_study(None, ["A=", "B=--epochs 2"], seeds=[0, 1])
    a0, a1, b0, b1 = S.expand(study)
    d = S.cell_dir(out, a0)
    os.makedirs(d)
    open(os.path.join(d, "checkpoint_last.pt"), "w").close()
    json.dump(dict(config="A", seed=0, args=a0["args"], wall_s=3.0, threads=2), open(S.started_file(d), "w"))
    os.makedirs(S.cell_dir(out, a1))
    open(os.path.join(S.cell_dir(out, a1), "partial"), "w").close()
    argv = ["--config", "A=", "--config", "B=--epochs 2", "--seeds", "0", "1", "--out", out, "--threads", "1",
            "--dry-run", "--no-progress"]
    assert S.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("[daal-study]")]
    assert [ln.split()[0] for ln in lines] == ["resume", "todo", "todo", "todo"]
    assert "--threads 2 --resume " + os.path.join(d, "checkpoint_last.pt") in lines[0]
    assert [ln.split("--seed ")[1].split()[0] for ln in lines] == ["0", "0", "1", "1"]  # seed-major, as they run
    assert S.cell_dir(out, b0) in lines[1] and "moved aside first" in lines[2] and S.cell_dir(out, b1) in lines[3]
    assert os.path.exists(os.path.join(S.cell_dir(out, a1), "partial"))  # and nothing moved

    # a damaged record of what the cell was started with: a "fails" line, not a traceback (a review)
    for damaged in ("[]", '{"args": [], "wall_s": "n/a"}', '{"args": null}', ""):
        open(S.started_file(d), "w").write(damaged)
        assert S.main(argv) == 0
        lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("[daal-study]")]
        assert lines[0].startswith("fails ") and S.started_file(d) in lines[0], lines


def test_plots_of_an_earlier_report_are_not_left_beside_a_new_table(tmp_path, monkeypatch, capsys):
    """A --no-plots command that added runs left the earlier metrics.png and
    r1_vs_subcluster_nmi.png beside a table of more runs (a probe, 2026-12-07): removed, and said."""
    out = str(tmp_path / "st")
    monkeypatch.setattr(S, "run_cell", _fake_cell)
    flags = ["--config", "A=", "--out", out, "--no-progress", "--no-tsne"]
    assert S.main(flags + ["--seeds", "0"]) == 0
    assert os.path.isfile(os.path.join(out, "metrics.png"))
    capsys.readouterr()
    # the same runs (--summarize --no-plots): the figures still show them, and stay (a review, 2026-12-07)
    assert S.main(flags + ["--seeds", "0", "--summarize", "--no-plots"]) == 0
    assert "removed" not in capsys.readouterr().out and os.path.isfile(os.path.join(out, "metrics.png"))
    assert S.main(flags + ["--seeds", "0", "1", "--no-plots"]) == 0
    said = capsys.readouterr().out
    for name in ("metrics.png", "r1_vs_subcluster_nmi.png"):
        assert not os.path.exists(os.path.join(out, name))
        assert f"removed {os.path.join(out, name)}: it showed other runs than this report's" in said
    assert "| A | 2 |" in open(os.path.join(out, "table.md"), encoding="utf-8").read()


def test_a_cells_lines_go_through_the_progress_bar(tmp_path, monkeypatch):
    """run_cell's lines (a folder moved aside, a resume's threads) come from the pool's threads:
    printed past the bar they broke it, and two threads' lines ran together (a probe, 2026-12-07)."""
    lines = []

    class Bar:
        def write(self, msg):
            lines.append(msg)

    fake = _fake_python(tmp_path)
    out = str(tmp_path / "study")
    (cell,) = S.expand(S.make_study(None, ["A=--epochs 1"], seeds=[0]))
    os.makedirs(S.cell_dir(out, cell))
    open(os.path.join(S.cell_dir(out, cell), "partial"), "w").close()
    monkeypatch.setattr(S, "_BAR", [Bar()])
    S.run_cell(cell, out, 1, python=str(fake))
    assert len(lines) == 1 and "was left unfinished without a checkpoint: moved to" in lines[0]
