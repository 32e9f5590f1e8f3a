"""File a GPU run of ``bench/gpu_check.sh`` under ``bench/results/``: the standing order's steps in one.

The device tool brings back ``0-all-files.tar.gz`` (the run's whole OUTDIR: it returns 8 files at
most). This unpacks it, unedited, into a new folder ``bench/results/<date>-<gpu>[-N]`` (never an
existing one: a second run of a day gets the next free suffix, and ``--name`` an existing folder is
refused), writes the folder's README.md (the command, the steps with their exit status and time,
and which code ran: the run's ``source_sha256`` against this checkout's digest and, where they
differ, the recent commit whose code it was), and regenerates ``bench/README.md``
(``report.py --readme``; not for a run filed under another ``--results`` folder). What is left is to read the numbers and commit the folder.

Where no archive came back (a run stopped before it packed), the folder's loose files (the device
tool's first 8 by name) are filed as they are, and the README says what is lost. A run filed
already (the same ``env.json``, ``steps.json`` and ``records.jsonl``) is refused unless ``--name``
is given; a run whose ``env.json`` is empty is named from its records or ``nvidia-smi.txt``.

usage: python bench/file_run.py FILES_AT [--name NAME] [--command CMD] [--wall SECONDS]
FILES_AT: the folder the device tool returned (holding ``0-all-files.tar.gz``), or the archive.
Exit status 2 (one line, no traceback) for a missing or unsafe archive (and no run's loose files),
a run filed already, or a folder that exists.
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import report  # noqa: E402  (bench/report.py: the digest and the README)

ARCHIVE = "0-all-files.tar.gz"
#: How many commits back ``code_commits`` looks for the run's code.
COMMITS_BACK = 150
#: What ``code_commits`` takes of each commit: every file ``report.SOURCE_GLOBS`` can match.
DIGEST_PATHS = ("daal_triton", "kernels", "reference", "bench/*.py", "bench/*.sh", "setup.py")


class FilingError(Exception):
    """A user error: printed as one line, exit status 2."""


#: A run's own files: a folder of loose files holding one of these is a run (without its archive).
RUN_FILES = ("env.json", "steps.json", "records.jsonl", "bench.json", "nvidia-smi.txt", "report.md")


def _archive(files_at: str) -> Tuple[str, Optional[List[str]]]:
    """``(path, None)``: the archive; or ``(files_at, names)``: no archive came back, and the plain
    files of the folder ``files_at`` (the device tool's first 8 by name) are what there is of the run."""
    path = os.path.join(files_at, ARCHIVE) if os.path.isdir(files_at) else files_at
    if os.path.isfile(path):
        return path, None
    if os.path.isdir(files_at):
        loose = sorted(n for n in os.listdir(files_at)
                       if os.path.isfile(os.path.join(files_at, n)) and not os.path.islink(os.path.join(files_at, n)))
        if set(loose) & set(RUN_FILES):
            return files_at, loose
    raise FilingError(f"no {ARCHIVE} at {files_at}, nor any of a run's files ({', '.join(RUN_FILES)})")


def _loose_archive(folder: str, names: List[str]) -> io.BytesIO:
    """The loose files as an archive, packed as gpu_check.sh packs (``./NAME``), for :func:`_unpack`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for n in names:
            tar.add(os.path.join(folder, n), arcname=f"./{n}", recursive=False)
    buf.seek(0)
    return buf


def _members(tar: tarfile.TarFile) -> List[tarfile.TarInfo]:
    """The archive's regular files and folders, each a relative path inside the run's folder;
    anything else (a link, a device, an absolute path, a ``..``) refuses the whole archive."""
    out = []
    for m in tar.getmembers():
        name = m.name
        parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
        if name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise FilingError(f"the archive holds {name!r}, which is not a plain file inside the run's folder")
        if parts:
            out.append(m)
    return out


def run_name(env: dict, results: str) -> str:
    """``<date>-<gpu>``, or with the first free ``-N`` suffix (N = 2, 3, ...): the run's date
    (``env.json``'s, else today's) and its GPU's model (``NVIDIA H200`` gives ``h200``)."""
    date = str(env.get("date") or datetime.date.today().isoformat())[:10]
    words = [w for w in re.split(r"[^a-z0-9]+", str(env.get("gpu") or "").lower()) if w and w != "nvidia"]
    base = f"{date}-{words[0] if words else 'gpu'}"
    name, n = base, 1
    while os.path.exists(os.path.join(results, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def code_commits(digest: str, back: int = COMMITS_BACK) -> Optional[Tuple[str, str]]:
    """``(oldest, newest)``: the run of commits among the last ``back`` whose ``report.py
    --source-digest`` is ``digest`` (the code a run measured: introduced by the oldest, unchanged
    through the newest), or None."""
    try:
        revs = subprocess.run(["git", "-C", ROOT, "rev-list", f"--max-count={back}", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    found: List[str] = []
    for rev in revs:  # newest first
        of_rev = _commit_digest(rev)
        if of_rev is None:
            break
        if of_rev == digest:
            found.append(rev[:7])
        elif found:
            break
    return (found[-1], found[0]) if found else None


def _commit_digest(rev: str) -> Optional[str]:
    """``report.py --source-digest`` of the commit ``rev`` (its files, not the working tree's), or
    None where git cannot say."""
    try:
        tree = subprocess.run(["git", "-C", ROOT, "archive", rev, "--", *DIGEST_PATHS], capture_output=True)
    except OSError:
        return None
    if tree.returncode:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(tree.stdout)) as tar:
            _extract(tar, tmp, _members(tar))
        return report.source_digest(tmp)


def _extract(tar: tarfile.TarFile, dest: str, members: List[tarfile.TarInfo]) -> None:
    """``members`` (checked by :func:`_members`) into ``dest``, with tarfile's "data" filter where
    this Python has it (3.11.4+, 3.12)."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, members=members, filter="data")
    else:
        tar.extractall(dest, members=members)


def _head() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def smi_env(text: str) -> dict:
    """The date and GPU that ``nvidia-smi``'s table says (its first line, its first GPU's row), for a
    run whose ``env.json`` and records say nothing (a hung env step)."""
    env: dict = {}
    lines = text.splitlines()
    try:
        env["date"] = datetime.datetime.strptime(" ".join(lines[0].split()), "%a %b %d %H:%M:%S %Y").date().isoformat()
    except (IndexError, ValueError):
        pass
    gpu = re.search(r"^\|\s+\d+\s+(NVIDIA .+?)\s{2,}", text, re.M)
    if gpu:
        env["gpu"] = gpu.group(1).strip()
    return env


def _step_text(s: dict) -> str:
    if s.get("rc") is None:
        return f"{s.get('step')} not run ({s.get('note') or 'no exit status'})"
    return f"{s.get('step')} exit {s.get('rc')} in {s.get('seconds')} s (limit {s.get('limit')})"


def readme_text(folder: str, command: str, wall: Optional[float], note: Optional[str] = None) -> str:
    """The run folder's README.md: what ran, its steps, and whose code."""
    run = report.load_run(folder)
    env, steps = run["env"], run["steps"]
    smi = os.path.join(folder, "nvidia-smi.txt")
    if not (env.get("date") and env.get("gpu")) and os.path.isfile(smi):
        with open(smi, encoding="utf-8", errors="replace") as f:
            env = dict(smi_env(f.read()), **env)
    date = str(env.get("date") or "")[:10] or "undated"
    lines = [f"# {date} ({env.get('gpu') or 'GPU ?'}, torch {env.get('torch', '?')}, "
             f"Triton {env.get('triton', '?')})", "",
             f"`{command}`, one call" + (f", {wall:.0f} s" if wall else "")
             + (f"; unpacked unedited from its `{ARCHIVE}` by `python bench/file_run.py`." if note is None else
                "; filed by `python bench/file_run.py`."), ""]
    if note:
        lines += [note, ""]
    settings = env.get("settings")
    if isinstance(settings, dict):  # gpu_check.sh records them since 2026-12-07
        lines += ["Settings: " + (", ".join(f"`{k}={v}`" for k, v in settings.items()) if settings else
                                  "none (the script's defaults)") + ".", ""]
    if steps:
        failed = [s for s in steps if s.get("rc") not in (0, None)]
        unrun = [s for s in steps if s.get("rc") is None]
        with open(os.path.join(folder, "steps.json"), encoding="utf-8", errors="replace") as f:
            cut = sum(1 for line in f if line.strip()) - len(steps)
        last = steps[-1].get("step")
        said = [". Not exit 0: " + ", ".join(str(s.get("step")) for s in failed) + " (their logs say why)"
                if failed else "", ". Not run: " + ", ".join(str(s.get("step")) for s in unrun) if unrun else "",
                f". {cut} line(s) of `steps.json` could not be read (cut short)" if cut else "",
                f". The steps end after `{last}`, before the report: the run was cut short" if last != "report" else ""]
        lines.append("Steps (`steps.json`): " + "; ".join(map(_step_text, steps))
                     + ("".join(said) or ". Every step exit 0") + ".")
    else:
        lines.append("No `steps.json`: the run ended before its first step was recorded.")
    lines.append("")
    digest, head = env.get("source_sha256"), _head()
    if not digest:
        lines.append("`env.json` has no `source_sha256`: which code ran is not recorded.")
    elif digest == _commit_digest("HEAD"):
        lines.append(f"The code is this checkout's (`{head}` when filed): `env.json`'s `source_sha256` equals "
                     "`python bench/report.py --source-digest`.")
    elif digest == report.source_digest(ROOT):  # the device tool sends uncommitted changes too
        lines.append(f"The code is this working tree's when filed, with changes not committed at `{head}`: "
                     "`env.json`'s `source_sha256` equals `python bench/report.py --source-digest` here, not "
                     f"that of `{head}`.")
    else:
        revs = code_commits(digest)
        through = "" if not revs or revs[0] == revs[1] else f" (unchanged through `{revs[1]}`)"
        lines.append(f"The code is that of `{revs[0]}`{through}: `env.json`'s `source_sha256` equals `python "
                     f"bench/report.py --source-digest` of that commit, not of `{head}`, where this was filed."
                     if revs else
                     f"`env.json`'s `source_sha256` ({digest[:16]}…) matches neither this checkout (`{head}`) nor "
                     f"any of its last {COMMITS_BACK} commits: the run measured code that is not committed here.")
    if env.get("git_revision"):
        lines.append(f"Its `git_revision` (`{str(env['git_revision'])[:7]}`) is the device copy's git "
                     "metadata, which may be stale: the digest says which code ran.")
    return "\n".join(lines) + "\n"


def file_run(files_at: str, results: str, name: Optional[str] = None, command: str = "bash bench/gpu_check.sh $OUT",
             wall: Optional[float] = None, regenerate: bool = True) -> str:
    """Unpack, describe and tabulate one run (module docstring); returns its folder."""
    path, loose = _archive(files_at)
    try:
        with (tarfile.open(path) if loose is None else tarfile.open(fileobj=_loose_archive(path, loose))) as tar:
            folder = _unpack(tar, path, results, name)
    except (tarfile.TarError, EOFError, zlib.error) as e:  # a truncated or damaged archive
        raise FilingError(f"{path} is not a readable archive: {type(e).__name__}: {' '.join(str(e).split())}") from None
    except OSError as e:
        raise FilingError(f"{path} could not be filed: {type(e).__name__}: {' '.join(str(e).split())}") from None
    readme = os.path.join(folder, "README.md")
    if not os.path.exists(readme):  # the run's own README (none today) is kept
        note = None if loose is None else (
            f"No `{ARCHIVE}` came back (the run was stopped before it was packed, or it was not returned): the "
            f"{len(loose)} files the device tool brought back were filed as they are ({', '.join(loose)}); the "
            "rest of the run is lost.")
        with open(readme, "w", encoding="utf-8") as f:
            f.write(readme_text(folder, command, wall, note))
    if regenerate:
        report.main(["--readme", "--results", results])
    return folder


def _records_env(tar: tarfile.TarFile, members: List[tarfile.TarInfo]) -> dict:
    """The date and GPU of the ``env`` lines of the archive's ``records.jsonl`` (the runner writes
    one per pytest process; the last wins, as in the report's heading), for a run whose ``env.json``
    says nothing."""
    member = next((m for m in members if m.isfile() and os.path.normpath(m.name) == "records.jsonl"), None)
    env: dict = {}
    if member is None:
        return env
    for line in tar.extractfile(member).read().decode("utf-8", "replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short
            continue
        if isinstance(rec, dict) and rec.get("kind") == "env":
            env.update({k: rec[k] for k in ("date", "gpu") if rec.get(k)})  # the last's, as report.load_run
    return env


def _filed_as(tar: tarfile.TarFile, members: List[tarfile.TarInfo], results: str) -> Optional[str]:
    """The folder of ``results`` that holds this run already (its ``env.json``, ``steps.json`` and
    ``records.jsonl``, those the archive has, the same bytes): filed twice, one run read as two
    (a replication) in bench/README.md (a filing probe, 2026-12-07)."""
    ours = {}
    for m in members:
        n = os.path.normpath(m.name)
        if m.isfile() and n in ("env.json", "steps.json", "records.jsonl"):
            ours[n] = tar.extractfile(m).read()
    if not ours or not os.path.isdir(results):
        return None
    for d in sorted(os.listdir(results)):
        if all(_same_bytes(os.path.join(results, d, n), data) for n, data in ours.items()):
            return os.path.join(results, d)
    return None


def _same_bytes(path: str, data: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:  # missing, a folder, unreadable: not the same
        return False


def _unpack(tar: tarfile.TarFile, path: str, results: str, name: Optional[str]) -> str:
    """:func:`file_run`'s checks and extraction into a new folder, which is removed again if the
    archive turns out damaged midway (a partial run is never left to be read as one)."""
    members = _members(tar)
    # the run's files at the archive's top, as gpu_check.sh packs them ("./env.json"): a run in
    # a sub-folder would be filed as a folder holding a folder, which no report reads
    names = {os.path.normpath(m.name) for m in members if m.isfile()}
    if not names & {"env.json", "steps.json", "records.jsonl"}:
        inner = sorted(n for n in names if os.path.basename(n) in ("env.json", "steps.json", "records.jsonl"))
        raise FilingError(f"{path} holds no env.json, steps.json or records.jsonl at its top"
                          + (f" (they are in a sub-folder: {inner[0]})" if inner else "")
                          + ": not a gpu_check.sh run")
    os.makedirs(results, exist_ok=True)
    if name is None:
        env = {}
        env_member = next((m for m in members if os.path.normpath(m.name) == "env.json"), None)
        if env_member is not None:
            try:
                env = json.load(tar.extractfile(env_member))
            except ValueError:
                env = {}
        env = env if isinstance(env, dict) else {}
        if not (env.get("date") and env.get("gpu")):  # env.json empty (a hung env step): the records' env lines
            env = dict(_records_env(tar, members), **{k: v for k, v in env.items() if v})
        smi = next((m for m in members if m.isfile() and os.path.normpath(m.name) == "nvidia-smi.txt"), None)
        if not (env.get("date") and env.get("gpu")) and smi is not None:  # else nvidia-smi's table
            env = dict(smi_env(tar.extractfile(smi).read().decode("utf-8", "replace")), **env)
        filed = _filed_as(tar, members, results)
        if filed:
            raise FilingError(f"this run is filed already, as {filed} (the same env.json, steps.json and "
                              "records.jsonl): give --name to file it again")
        name = run_name(env, results)
    folder = os.path.join(results, name)
    if os.path.exists(folder):
        raise FilingError(f"{folder} exists: a run is never overwritten (give another --name)")
    os.makedirs(folder)
    try:
        _extract(tar, folder, members)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files_at", help=f"the device tool's folder (holding {ARCHIVE}) or the archive")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", help="the run's folder name (default: <date>-<gpu>, or the next free -N)")
    ap.add_argument("--command", default="bash bench/gpu_check.sh $OUT", help="the command that ran")
    ap.add_argument("--wall", type=float, help="the call's seconds (the device tool's wall_s)")
    ap.add_argument("--no-readme", action="store_true", help="do not regenerate bench/README.md")
    a = ap.parse_args(argv)
    # bench/README.md tabulates bench/results/: a run filed elsewhere leaves it alone
    ours = os.path.realpath(a.results) == os.path.realpath(os.path.join(HERE, "results"))
    try:
        folder = file_run(a.files_at, a.results, a.name, a.command, a.wall, regenerate=not a.no_readme and ours)
    except FilingError as e:
        print(f"file_run.py: {e}", file=sys.stderr)
        return 2
    rel = os.path.relpath(folder, ROOT)
    rel = folder if rel.startswith("..") else rel
    read = f"read {rel}/report.md" if os.path.exists(os.path.join(folder, "report.md")) else \
        f"it has no report.md (read its README.md and steps; python bench/report.py {rel} makes one)"
    print(f"filed {rel}; {read}" + (f", then: git add {rel} bench/README.md && git commit" if ours else
                                                  " (outside bench/results/: bench/README.md left as it was)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
