"""Instruction counts of a recorded launch's sm_90 build, per warp and tile (no GPU needed).

usage: python scripts/sass_tile_loop.py KERNEL SCENARIO [LAUNCHES.json]

LAUNCHES.json: the output of ``tests/kernels/launch_recorder.py`` (recorded first when not
given, ~30 s). KERNEL: a kernel's name (``_knn_filter_kernel``); SCENARIO: a substring of one
of the launch's scenarios (``"bf16 bank, threshold"``). Prints the build's registers, stack and
shared memory, then its tile loop: the span of the widest backward branch (conditional or not:
the filter's loop closes with ``@P EXIT; BRA top``), its instructions in all, each loop nested
in it (the D-loop, marked by its HGMMA; the listing or merge rounds) and what lies outside
those, with its ``BAR.SYNC`` count. The figures of docs/kernels.md, "Selection by a
threshold", come from this (Triton 3.8 in .venv, 3.6 in a venv of its own).
"""
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main(argv) -> int:
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    kernel, scenario = argv[0], argv[1]
    if len(argv) == 3:
        path = argv[2]
    else:
        path = os.path.join(tempfile.mkdtemp(), "launches.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, os.path.join(HERE, "..", "tests", "kernels", "launch_recorder.py"), path],
                       env=env, check=True, capture_output=True)
    with open(path) as f:
        launches = [la for la in json.load(f) if la["kernel"] == kernel and any(scenario in s for s in la["scenarios"])]
    if len(launches) != 1:
        print(f"{len(launches)} launches of {kernel} match {scenario!r}: name one", file=sys.stderr)
        return 2
    la = launches[0]
    from daal_testing import compile_many_for_gpu, recorded_job

    module = {"_knn_filter_kernel": "knn_threshold", "_knn_filter_half_kernel": "knn_threshold",
              "_knn_select_kernel": "knn_threshold", "_knn_rescan_kernel": "knn_threshold"}.get(kernel, "knn")
    res = compile_many_for_gpu([recorded_job(la, f"daal_triton.kernels.{module}", 90, sass=True)])[0]
    if res.get("error"):
        print(res["error"], file=sys.stderr)
        return 1
    print(f"{kernel} [{'; '.join(la['scenarios'])}]: {res['registers']} registers, {res['stack']} B stack, "
          f"{res['metadata']['shared']} B shared")
    ops = []
    for line in res["sass"].splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*)", line)
        if m:
            ops.append((int(m.group(1), 16), bool(m.group(2)), m.group(3), m.group(4)))
    back = []
    for addr, predicated, op, args in ops:
        target = re.match(r"\s*(0x[0-9a-f]+)", args) if op == "BRA" else None
        if target and int(target.group(1), 16) <= addr:
            back.append((int(target.group(1), 16), addr, predicated))
    start, end, _ = max(back, key=lambda b: b[1] - b[0])

    def body(a, b):
        return [op for addr, _, op, _ in ops if a <= addr <= b]
    inner = [(a, b) for a, b, p in back if p and start <= a and b <= end and (a, b) != (start, end)]
    print(f"tile loop {start:#x}-{end:#x}: {len(body(start, end))} instructions, "
          f"{sum(o.startswith('BAR.SYNC') for o in body(start, end))} BAR.SYNC")
    nested = 0
    for a, b in inner:
        loop = body(a, b)
        nested += len(loop)
        kind = "D-loop" if any(o.startswith("HGMMA") for o in loop) else "rounds"
        top = collections.Counter(o.split(".")[0] for o in loop).most_common(6)
        print(f"  {kind} {a:#x}-{b:#x}: {len(loop)} instructions, {sum(o.startswith('BAR.SYNC') for o in loop)} "
              f"BAR.SYNC ({', '.join(f'{o} {n}' for o, n in top)})")
    print(f"  outside the nested loops: {len(body(start, end)) - nested}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
