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


def _outdir(tmp_path, digest, steps=(("gpu_tests", 0, 70, 118), ("bench", 1, 92, 123))):
    """An OUTDIR as gpu_check.sh leaves it, archived as it archives it (``tar czf -C OUT .``)."""
    out = tmp_path / "files_at"
    run = tmp_path / "run"
    run.mkdir()
    (run / "env.json").write_text(json.dumps({"date": "2026-12-05T10:00:00+00:00", "gpu": "NVIDIA H200",
                                              "torch": "2.11.0+cu130", "triton": "3.6.0",
                                              "source_sha256": digest, "git_revision": "1e497c4ce42b"}))
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
    assert "Not exit 0: bench" in text and "The code is this checkout's" in text and "`1e497c4`" in text
    # a second run of the day: the next free name; a named folder that exists: refused, one line
    assert file_run.main([str(out), "--results", str(results), "--no-readme"]) == 0
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
    assert file_run.main([str(out), "--results", str(tmp_path / "results")]) == 0
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
