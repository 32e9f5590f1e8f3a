"""Run one pytest selection as N processes side by side (bench/gpu_check.sh's test steps).

usage: python bench/sharded_pytest.py --shards N --junitxml OUT.xml -- PYTEST_ARGS...

On the GPU machine those steps' time is Triton's JIT builds, one CPU core each: the first H200
run's kernel-test step got through 34 of its tests in its 80 s. Shard i of N runs the i-th of N
contiguous slices of the selection (``DAAL_TEST_SHARD=i/N``, tests/conftest.py; contiguous, so
a test's cases, which build the same kernels, mostly stay in one process; of about equal weight,
a test marked ``shard_weight(w)`` counting w: since 2026-12-05 the tests that first launch a
kernel in a child process weigh 8-15 ordinary ones, an estimate) in a session of its own. Their JUnit test suites go into OUT.xml and their output follows, in shard order, with a
summary line last.

The step's timeout (``timeout -s INT``) interrupts this process, which passes one SIGINT to each
shard (each then writes its JUnit, as a lone pytest would), waits up to ``GRACE_S`` for them,
kills what is left and merges what was written (a shard that wrote nothing becomes an error
testcase, ``sharded_pytest::shard I``, so the merged file never reads as a clean run). Exit status: 0 when every shard passed or
collected nothing (pytest's 5) and at least one passed; 5 when none collected anything;
otherwise the first other status, in shard order.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence

#: What each shard runs: pytest without the current directory on sys.path (./daal_triton, the
#: source folder without its kernels/ and reference/ subpackages, must not shadow the install).
RUNNER = """import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
import pytest
sys.exit(pytest.main(sys.argv[1:]))"""

#: Seconds the shards get to write their JUnit after the SIGINT (gpu_check's timeout kills 20 s
#: after its SIGINT).
GRACE_S = 12

COUNTS = ("tests", "errors", "failures", "skipped")


def merge_junit(paths: Sequence[str], out: str) -> Optional[dict]:
    """Write one JUnit file holding the ``<testsuite>`` of each of ``paths``, in order, and return
    their summed counts (None, and nothing written, when no file exists and parses). A shard whose
    file is missing or unreadable (killed or crashed before pytest wrote it) is one error testcase
    ``sharded_pytest::shard I``: its tests are missing, and the merged file must not read as a
    clean run of the others."""
    suites, lost = [], []
    for i, path in enumerate(paths):
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError):
            lost.append(i)
            suites.append(None)
            continue
        suites.extend([root] if root.tag == "testsuite" else root.findall("testsuite"))
    if len(lost) == len(paths):
        return None
    for i in lost:
        suite = ET.Element("testsuite", name=f"shard {i}", tests="1", errors="1", failures="0", skipped="0")
        case = ET.SubElement(suite, "testcase", classname="sharded_pytest", name=f"shard {i}")
        ET.SubElement(case, "error", message=f"shard {i} of {len(paths)} wrote no readable JUnit (killed or crashed): "
                                             "its tests did not report")
        suites[suites.index(None)] = suite
    root = ET.Element("testsuites")
    root.extend(suites)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    return {c: sum(int(s.get(c, 0) or 0) for s in suites) for c in COUNTS}


def combined_status(codes: Sequence[Optional[int]]) -> int:
    """The step's exit status from the shards' (None: killed): see the module docstring."""
    others = [c for c in codes if c not in (0, 5)]
    if others:
        return 1 if others[0] is None else others[0]
    return 0 if 0 in codes else 5


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--junitxml", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        ap.error("pytest's arguments follow --")
    cut = argv.index("--")
    args, pytest_args = ap.parse_args(argv[:cut]), argv[cut + 1:]
    if args.shards < 1:
        ap.error(f"--shards must be at least 1, got {args.shards}")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="daal_shards_") as tmp:
        procs, logs, xmls = [], [], []
        for i in range(args.shards):
            logs.append(os.path.join(tmp, f"{i}.log"))
            xmls.append(os.path.join(tmp, f"{i}.xml"))
            env = dict(os.environ, DAAL_TEST_SHARD=f"{i}/{args.shards}")
            with open(logs[-1], "w") as log:
                # a session of its own: only this process's SIGINT reaches it, once
                procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, *pytest_args,
                                               f"--junitxml={xmls[-1]}"], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        interrupted = []

        def interrupt(signum, frame):
            if not interrupted:
                interrupted.append(time.monotonic())
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)

        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
        codes: List[Optional[int]] = [None] * len(procs)
        while any(c is None for c in codes):
            for i, p in enumerate(procs):
                codes[i] = p.poll()
            if interrupted and time.monotonic() - interrupted[0] > GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.2)
        for i, log in enumerate(logs):
            print(f"== shard {i}/{args.shards}: exit {codes[i] if codes[i] is not None else 'killed'}",
                  flush=True)
            with open(log, errors="replace") as f:
                sys.stdout.write(f.read())
        totals = merge_junit(xmls, args.junitxml)
    status = combined_status(codes)
    counts = ", ".join(f"{v} {k}" for k, v in totals.items()) if totals else "no JUnit written"
    print(f"sharded_pytest: {args.shards} shards in {time.monotonic() - start:.0f} s"
          f"{' (interrupted)' if interrupted else ''}: {counts}; exit {status}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
