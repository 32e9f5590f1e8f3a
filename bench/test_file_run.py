"""bench/file_run.py: a GPU run's archive filed under bench/results/, never over another run."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import file_run  # noqa: E402
import report  # noqa: E402

ROOT = os.path.dirname(HERE)


def _outdir(tmp_path, digest, steps=(("gpu_tests", 0, 70, 118), ("bench", 1, 92, 123)), sub="files_at"):
    """An OUTDIR as gpu_check.sh leaves it, archived as it archives it (``tar czf -C OUT .``)."""
    out = tmp_path / sub
    run = tmp_path / f"{sub}-run"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"date": "2026-12-05T10:00:00+00:00", "gpu": "NVIDIA H200",
                                              "torch": "2.11.0+cu130", "triton": "3.6.0",
                                              "source_sha256": digest, "git_revision": "1e497c4ce42b",
                                              "settings": {"DAAL_CHECK_K": "knn", "DAAL_CHECK_TOTAL_S": "300"}}))
    (run / "steps.json").write_text("".join(json.dumps(dict(step=s, rc=rc, seconds=t, limit=lim)) + "\n"
                                            for s, rc, t, lim in steps))
    (run / "records.jsonl").write_text("{}\n")
    (run / "report.md").write_text("# DAAL benchmark report\n")
    out.mkdir()
    with tarfile.open(out / file_run.ARCHIVE, "w:gz") as tar:
        tar.add(run, arcname=".")
    return out


def test_files_a_run_under_a_free_name_and_never_over_one(tmp_path, capsys):
    out = _outdir(tmp_path, report.source_digest(ROOT))
    results = tmp_path / "results"
    assert file_run.main([str(out), "--results", str(results), "--no-readme", "--wall", "300"]) == 0
    folder = results / "2026-12-05-h200"
    assert {p.name for p in folder.iterdir()} == {"env.json", "steps.json", "records.jsonl", "report.md", "README.md"}
    assert (folder / "report.md").read_text() == "# DAAL benchmark report\n"  # unedited
    text = (folder / "README.md").read_text()
    assert text.startswith("# 2026-12-05 (NVIDIA H200, torch 2.11.0+cu130, Triton 3.6.0)")
    assert "one call, 300 s" in text and "gpu_tests exit 0 in 70 s (limit 118)" in text
    assert "Settings: `DAAL_CHECK_K=knn`, `DAAL_CHECK_TOTAL_S=300`." in text  # a narrowed run says so
    assert "Not exit 0: bench" in text and "The code is this checkout's" in text and "`1e497c4`" in text
    # the same run again: refused (one run read as two in bench/README.md: a filing probe,
    # 2026-12-07), unless named; a second run of the day: the next free name
    capsys.readouterr()
    assert file_run.main([str(out), "--results", str(results), "--no-readme"]) == 2
    assert "this run is filed already, as " + str(folder) in capsys.readouterr().err
    second = _outdir(tmp_path, report.source_digest(ROOT), steps=(("gpu_tests", 0, 71, 118),), sub="second")
    assert file_run.main([str(second), "--results", str(results), "--no-readme"]) == 0
    assert (results / "2026-12-05-h200-2" / "env.json").exists()
    capsys.readouterr()
    assert file_run.main([str(out), "--results", str(results), "--no-readme", "--name", "2026-12-05-h200"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists: a run is never overwritten" in err and "Traceback" not in err
    assert sorted(p.name for p in results.iterdir()) == ["2026-12-05-h200", "2026-12-05-h200-2"]
    assert file_run.main([str(tmp_path / "nowhere"), "--results", str(results), "--no-readme"]) == 2


def _archive_with(tmp_path, add) -> str:
    out = tmp_path / "bad"
    out.mkdir()
    with tarfile.open(out / file_run.ARCHIVE, "w:gz") as tar:
        add(tar)
    return str(out)


def _file(tar, name, data=b"{}\n"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad", ["parent", "absolute", "link", "not a run"])
def test_refuses_an_archive_that_is_not_a_plain_run(tmp_path, capsys, bad):
    """A member outside the folder (``..``, an absolute path), a link, or no run's files: refused
    before anything is written."""
    def add(tar):
        _file(tar, "./notes.txt" if bad == "not a run" else "./env.json")
        if bad == "parent":
            _file(tar, "../evil.txt")
        elif bad == "absolute":
            _file(tar, "/tmp/evil.txt")
        elif bad == "link":
            link = tarfile.TarInfo("./steps.json")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    results = tmp_path / "results"
    assert file_run.main([_archive_with(tmp_path, add), "--results", str(results), "--no-readme"]) == 2
    err = capsys.readouterr().err
    assert "file_run.py: " in err
    if bad != "not a run":  # refused by the member check itself, not by a later guard (tarfile's filter)
        assert "which is not a plain file inside the run's folder" in err, err
    assert not results.exists() or not any(results.iterdir())
    assert not (tmp_path / "evil.txt").exists()


def test_refuses_a_run_in_a_sub_folder_and_a_damaged_archive(tmp_path, capsys):
    """A run archived inside a sub-folder was filed as a folder holding a folder (an "undated"
    run no report reads); a truncated archive ended in an EOFError traceback. Both are refused in
    one line, exit 2, and leave no folder behind."""
    results = tmp_path / "results"
    nested = _archive_with(tmp_path, lambda tar: [_file(tar, f"stage/{n}") for n in ("env.json", "steps.json")])
    assert file_run.main([nested, "--results", str(results), "--no-readme"]) == 2
    err = capsys.readouterr().err
    assert "at its top (they are in a sub-folder: stage/env.json)" in err and err.count("\n") == 1
    whole = _outdir(tmp_path, "0" * 64) / file_run.ARCHIVE
    data = whole.read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    for size in (len(data) // 3, 2 * len(data) // 3):
        (cut / file_run.ARCHIVE).write_bytes(data[:size])
        assert file_run.main([str(cut), "--results", str(results), "--no-readme"]) == 2
        err = capsys.readouterr().err
        assert "is not a readable archive" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not results.exists() or not any(results.iterdir())


def test_a_run_filed_elsewhere_leaves_the_benchmarks_readme(tmp_path, monkeypatch):
    """``--results DIR`` other than bench/results/ rewrote bench/README.md with DIR's runs alone;
    it is regenerated only for the default folder."""
    calls = []
    monkeypatch.setattr(report, "main", lambda argv: calls.append(argv) or 0)
    out = _outdir(tmp_path, "0" * 64)
    assert file_run.main([str(out), "--results", str(tmp_path / "elsewhere")]) == 0
    assert calls == []
    monkeypatch.setattr(file_run, "HERE", str(tmp_path))  # the default folder is HERE/results
    assert file_run.main([str(out), "--results", str(tmp_path / "results")]) == 0
    assert calls == [["--readme", "--results", str(tmp_path / "results")]]


def test_names_the_commits_whose_code_ran(tmp_path, monkeypatch):
    """The run's digest found among the recent commits: the oldest with that code and the newest
    (HEAD's digest: HEAD is the newest); a digest of no commit: None, and the README says so."""
    tree = subprocess.run(["git", "-C", ROOT, "archive", "HEAD", "--", *file_run.DIGEST_PATHS],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tree)) as tar:
        file_run._extract(tar, str(tmp_path / "head"), file_run._members(tar))
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    oldest, newest = file_run.code_commits(report.source_digest(str(tmp_path / "head")), back=5)
    assert newest == head
    assert subprocess.run(["git", "-C", ROOT, "merge-base", "--is-ancestor", oldest, head]).returncode == 0
    monkeypatch.setattr(file_run, "COMMITS_BACK", 3)
    assert file_run.code_commits("0" * 64, back=3) is None
    out = _outdir(tmp_path, "0" * 64)
    assert file_run.main([str(out), "--results", str(tmp_path / "results"), "--no-readme"]) == 0
    text = (tmp_path / "results" / "2026-12-05-h200" / "README.md").read_text()
    assert "matches neither this checkout" in text and "last 3 commits" in text


def test_names_runs_by_date_and_gpu(tmp_path):
    (tmp_path / "2026-12-04-h100").mkdir()
    assert file_run.run_name({"date": "2026-12-04T18:26:48+00:00", "gpu": "NVIDIA H100 80GB HBM3"},
                             str(tmp_path)) == "2026-12-04-h100-2"
    assert file_run.run_name({"date": "2026-12-04", "gpu": "NVIDIA H200"}, str(tmp_path)) == "2026-12-04-h200"
    assert file_run.run_name({"date": "2026-12-04"}, str(tmp_path)) == "2026-12-04-gpu"


def test_a_run_whose_env_json_is_empty_is_named_from_its_records(tmp_path):
    """An empty env.json (a hung env step) named the folder ``<today>-gpu`` while its README said
    NVIDIA H200 (a probe, 2026-12-07): the records' env lines give the date and the GPU."""
    out = _outdir(tmp_path, report.source_digest(ROOT))
    with tarfile.open(out / file_run.ARCHIVE) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    files["./env.json"] = b""
    env = [{"kind": "env", "date": "2026-12-06T23:59:00+00:00", "gpu": "NVIDIA H200", "profile": "check"},
           {"kind": "env", "date": "2026-12-07T00:01:00+00:00", "gpu": "NVIDIA H200"}]
    files["./records.jsonl"] = "".join(json.dumps(e) + "\n" for e in env).encode() + b'{"kind": "ca'
    redone = _archive_with(tmp_path, lambda tar: [_file(tar, n, d) for n, d in files.items()])
    results = tmp_path / "results"
    assert file_run.main([redone, "--results", str(results), "--no-readme"]) == 0
    (folder,) = results.iterdir()  # the last env line's date, as the README's heading says
    assert folder.name == "2026-12-07-h200" and (folder / "README.md").read_text().startswith("# 2026-12-07 (NVIDIA H200")


SMI = """Fri Dec  4 18:26:39 2026
+-----------------------------------------------------------------------------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|=========================================+========================+======================|
|   0  NVIDIA H200                    On  |   00000000:00:06.0 Off |                    0 |
"""


def test_loose_files_are_filed_when_no_archive_came_back(tmp_path, capsys):
    """A run stopped before it packed brings back its first 8 files by name and no archive:
    file_run.py refused them all ("no 0-all-files.tar.gz"), and the run was lost (a filing probe,
    2026-12-07). They are filed as they are; the README says what is lost. Its env.json empty (a
    hung env step), no records: the date and GPU come from nvidia-smi's table; a steps.json cut
    short, with a step not run and no report step: said, not "Every step exit 0"."""
    loose = tmp_path / "files_at"
    loose.mkdir()
    (loose / "env.json").write_text("")
    (loose / "nvidia-smi.txt").write_text(SMI)
    (loose / "gpu_tests.log").write_text("...\n")
    (loose / "steps.json").write_text(json.dumps(dict(step="gpu_tests", rc=0, seconds=70, limit=118)) + "\n"
                                      + json.dumps(dict(step="probe", rc=None, seconds=0, note="not run: out of time"))
                                      + '\n{"step": "bench", "rc"')
    results = tmp_path / "results"
    assert file_run.main([str(loose), "--results", str(results), "--no-readme"]) == 0
    (folder,) = results.iterdir()
    assert folder.name == "2026-12-04-h200"
    assert {p.name for p in folder.iterdir()} == {"env.json", "nvidia-smi.txt", "gpu_tests.log", "steps.json",
                                                   "README.md"}
    assert (folder / "steps.json").read_bytes() == (loose / "steps.json").read_bytes()
    text = (folder / "README.md").read_text()
    assert text.startswith("# 2026-12-04 (NVIDIA H200")
    assert "No `0-all-files.tar.gz` came back" in text and "env.json, gpu_tests.log, nvidia-smi.txt, steps.json" in text
    assert "probe not run (not run: out of time)" in text and "Not run: probe" in text
    assert "1 line(s) of `steps.json` could not be read" in text and "end after `probe`, before the report" in text
    assert "Every step exit 0" not in text
    assert "it has no report.md" in capsys.readouterr().out
    assert "unknown (env.json unreadable" in "\n".join(report.env_lines(report.load_run(str(folder))))
    # a folder of other files is no run
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    assert file_run.main([str(other), "--results", str(results), "--no-readme"]) == 2
    assert "nor any of a run's files" in capsys.readouterr().err


def test_a_run_of_uncommitted_code_is_not_credited_to_head(tmp_path, monkeypatch):
    """The device tool sends uncommitted changes too: a run of them was "this checkout's (HEAD)"
    (a filing probe, 2026-12-07)."""
    monkeypatch.setattr(file_run, "_commit_digest", lambda rev: "1" * 64)  # HEAD's code differs
    out = _outdir(tmp_path, report.source_digest(ROOT))
    assert file_run.main([str(out), "--results", str(tmp_path / "results"), "--no-readme"]) == 0
    text = (tmp_path / "results" / "2026-12-05-h200" / "README.md").read_text()
    assert "this working tree's when filed, with changes not committed" in text and "checkout's" not in text


def test_the_report_says_a_test_step_was_cut_and_orders_runs_by_date(tmp_path):
    """A test step stopped at its limit (its JUnit clean, a shard's missing) gave PASS rows without
    a caveat; runs were listed by folder name (``-10`` before ``-2``; a filing probe, 2026-12-07)."""
    run = {"junit": [{"name": "gpu_tests.xml", "failures": 0, "errors": 0}], "env": {"gpu": "NVIDIA H200"},
           "steps": [{"step": "gpu_tests", "rc": 124}, {"step": "bench", "rc": 124}]}
    (note,) = report.target_caveats(run)
    assert "a test step did not finish (gpu_tests (exit 124)" in note
    run["steps"][0]["rc"] = 5  # no test collected: fine
    assert report.target_caveats(run) == []
    for name, date in (("2026-12-04-h200-10", "2026-12-04T23:00:00"), ("2026-12-04-h200-2", "2026-12-04T12:00:00"),
                       ("2026-12-04-h200", "2026-12-04T10:00:00"), ("2026-12-03-h100", "2026-12-03T10:00:00")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "env.json").write_text(json.dumps({"date": date}))
        (tmp_path / name / "steps.json").write_text("")
    order = [r["name"] for r in sorted(map(report.load_run, report.find_runs(str(tmp_path))), key=report.run_order)]
    assert order == ["2026-12-03-h100", "2026-12-04-h200", "2026-12-04-h200-2", "2026-12-04-h200-10"]
