#!/usr/bin/env bash
# The GPU check: on a machine with one NVIDIA GPU and no network, in under 8 minutes,
#   1. install this package (pip --no-deps --no-build-isolation -e .; fallbacks: --target, then a
#      link tree on PYTHONPATH),
#   2. run the GPU parity tests (pytest tests -m gpu) as DAAL_CHECK_SHARDS pytest processes side
#      by side (bench/sharded_pytest.py: their time is Triton's JIT builds, one core each),
#   3. run the benchmarks (bench/, profile "check", in cases.order_key's order: the comparisons
#      issue 13's targets make, the internal switches on those shapes, the other targets'
#      comparisons, the whole loss at 100k classes (cases.NEXT_KEYS), the other switches, then
#      one representative per operator), with an in-process deadline so they stop in time; the
#      training-step cases (VGG-19-BN, B=180, C=100 and 11,318) share a slice of
#      DAAL_BENCH_TRAIN_STEP_S seconds within that deadline,
#   4. probe where the time goes (bench/probe_h200.py: host cost per launch, the kNN forward's
#      parts and splits; DAAL_PROBE_S seconds, default 75, 0 skips it), time alternative kNN
#      forward block sizes, loops and grids (bench/tune_knn.py; DAAL_TUNE_KNN_S seconds, default 45, 0
#      skips it), then alternative line-margin block sizes (bench/tune_line_margin.py, with the
#      time the benchmarks leave, at least DAAL_TUNE_S seconds),
#   5. the kernel tests (tests/kernels) that run kernels on this GPU, when DAAL_CHECK_KERNEL_S
#      reserves time (default 0: the first run's 80 s did not finish them, and they took the
#      benchmarks' time; the parity tests of step 2 run the kernels here): not those marked
#      "build" (CI's job; DAAL_CHECK_BUILD_S) nor "small_tiles" (a JIT build per case),
#   6. write OUTDIR/report.md (bench/report.py) from what was recorded.
#
# usage: bash bench/gpu_check.sh OUTDIR
#
# OUTDIR receives: env.json, steps.json (one line per step: exit status, seconds), *.log,
# gpu_tests.xml / kernel_tests.xml / bench_junit.xml / build_tests.xml (JUnit; the last with
# DAAL_CHECK_BUILD_S), records.jsonl (one line per
# benchmark case: measured, skipped with the reason, or failed), bench.json
# (pytest-benchmark's --benchmark-json), probe.jsonl, tune_knn.json, tune_line_margin.json,
# nvidia-smi.txt, report.md, and 0-all-files.tar.gz: all of these in one archive (the device tool
# brings back 8 files).
# To commit a run: copy OUTDIR to bench/results/<date>-<gpu>/ and run
# `python bench/report.py --readme`.
#
# Every step runs under `timeout -s INT` (pytest still writes its JSON/JUnit when interrupted)
# and a failing step never stops the next one; the report is always written. Exit status: 0 when
# the install and the parity tests passed, 1 otherwise (see steps.json and the report).
#
# Environment: PYTHON (default python3), DAAL_CHECK_TOTAL_S (default 460: the whole budget),
# DAAL_CHECK_INSTALL (default 1; 0: use the daal_triton already importable, for rehearsals),
# DAAL_CHECK_K (a pytest -k expression for the test steps, for rehearsals),
# DAAL_BENCH_PROFILE (default check; "full" needs far more time than 8 minutes), DAAL_TUNE_S
# (default 30: the seconds reserved for step 4's line-margin tuning, which the first H200 run
# decided; 0 skips it), DAAL_TUNE_KNN_S (default 45: the candidates most promising first, as many as fit (the 2026-12-04 runs used 10-23 s, and three runs have timed them); 0 skips the kNN tuning),
# DAAL_CHECK_SHARDS (default: a third of the cores, 1 to 6: the pytest processes the parity and the
# kernel tests each run side by side, bench/sharded_pytest.py), DAAL_CHECK_BUILD_S (default 0: the seconds reserved at the end for the kernel tests marked
# "build", which only build kernels for GPU targets and need no GPU), DAAL_CHECK_KERNEL_S (default 0: the
# seconds reserved at the end for the kernel tests, step 5), DAAL_BENCH_TRAIN_STEP_S (default 80:
# the most the training-step cases may take together in step 3; what they leave goes to the
# operators' remaining cases), DAAL_BENCH_S (default none: a cap on step 3's seconds, for rehearsals).
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
# a run's folder holds one run: records.jsonl and probe.jsonl are appended to, so a second run
# into it would mix its records with the first's (the later winning); an earlier run's other
# outputs (a failing kernel_tests.xml) would be read into this run's report and archive
for f in steps.json records.jsonl probe.jsonl env.json report.md bench.json gpu_tests.xml kernel_tests.xml \
         bench_junit.xml build_tests.xml tune_knn.json tune_line_margin.json 0-all-files.tar.gz; do
  if [ -e "$OUT/$f" ]; then
    echo "gpu_check: $OUT already holds a run ($f): give an empty or new OUTDIR" >&2
    exit 2
  fi
done
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$(pwd)
T0=$(date +%s)
TOTAL=${DAAL_CHECK_TOTAL_S:-460}
PY=${PYTHON:-$(command -v python3 || command -v python)}
PROFILE=${DAAL_BENCH_PROFILE:-check}
TUNE_S=${DAAL_TUNE_S:-30}  # reserved for step 4's line-margin tuning (0: none)
PROBE_S=${DAAL_PROBE_S:-75}  # reserved for step 4's probe (0: no probe; 45 until the threshold lines came, 60 until
# the filter's other tiles and the steps' lines came, 2026-12-05: five more filter builds to JIT)
TUNE_KNN_S=${DAAL_TUNE_KNN_S:-45}  # reserved for step 4's kNN tuning (0: none; 60 until 2026-12-05's fifth session)
BUILD_S=${DAAL_CHECK_BUILD_S:-0}  # reserved for step 4's build-only kernel tests (0: none)
KERNEL_S=${DAAL_CHECK_KERNEL_S:-0}  # reserved for step 5's kernel tests (0: none)
NPROC=$(nproc 2>/dev/null || echo 4)
SHARDS=${DAAL_CHECK_SHARDS:-$(( NPROC / 3 < 1 ? 1 : (NPROC / 3 > 6 ? 6 : NPROC / 3) ))}  # step 2's pytest processes
TMP=$(mktemp -d "${TMPDIR:-/tmp}/daal_gpu_check.XXXXXX")
STEPS="$OUT/steps.json"
: > "$STEPS"
STATUS=0

unset TRITON_INTERPRET
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The full sm_80/sm_90 compile matrix is CI's job (CPU); here a representative subset keeps the budget.
export DAAL_ALL_CONFIGS=0
if [ ! -w "${HOME:-/nonexistent}" ]; then  # Triton and inductor caches need a writable place
  export TRITON_CACHE_DIR="$TMP/triton" TORCHINDUCTOR_CACHE_DIR="$TMP/inductor"
fi

# pytest without the current directory on sys.path: ./daal_triton (the source folder, without
# its kernels/ and reference/ subpackages) must not shadow the installed package.
RUNNER='import sys
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
import pytest
sys.exit(pytest.main(sys.argv[1:]))'

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - $(elapsed) )); }

# step NAME LIMIT_S CMD...: run CMD under timeout, log to OUT/NAME.log, record in steps.json.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  if [ "$limit" -lt 5 ]; then
    echo "{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"note\": \"not run: out of time\"}" >> "$STEPS"
    echo "== $name: not run (out of time)"
    return 124
  fi
  echo "== $name (limit ${limit} s, $(elapsed) s elapsed)"
  start=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"limit\": $limit}" >> "$STEPS"
  echo "   exit $rc after $(( $(date +%s) - start )) s; last lines of $name.log:"
  tail -n 5 "$OUT/$name.log" | sed 's/^/   | /'
  pack
  return $rc
}

# This workplace's device tool returns at most 8 files of OUTDIR, the first 8 by name (2026-12-04: a run's
# records, report and probe did not come back): one archive of the whole run, named to sort first,
# brings it all. To commit the run, unpack it into bench/results/<date>-<gpu>/ (not the archive itself):
# python bench/file_run.py FILES_AT does it, with the folder's README and bench/README.md.
# It is packed again after every step and when the script is stopped (a run killed at the device's
# limit had packed nothing: every measurement lost; a filing probe, 2026-12-07), ~100 KB each time.
ARCHIVE=0-all-files.tar.gz
pack() {
  # (written beside, then moved in: an archive growing inside the folder it packs makes tar report
  # "file changed as we read it"; tar's exit 1 is that warning, 2 a failure)
  local part
  part=$(mktemp "${TMPDIR:-/tmp}/gpu_check_archive.XXXXXX") || return 0
  tar czf "$part" -C "$OUT" --exclude="./$ARCHIVE" . 2>/dev/null
  if [ $? -le 1 ] && mv "$part" "$OUT/$ARCHIVE"; then :; else
    rm -f "$part"; echo "gpu_check: could not write $OUT/$ARCHIVE" >&2
  fi
}
stopped() {  # SIGTERM/SIGINT/SIGHUP to this script: what was recorded is packed, then the temporary folder goes
  echo "{\"step\": \"stopped\", \"rc\": null, \"seconds\": $(elapsed), \"note\": \"gpu_check.sh stopped by $1\"}" >> "$STEPS"
  pack
  rm -rf "$TMP" 2>/dev/null
  exit "$2"
}
trap 'stopped SIGTERM 143' TERM
trap 'stopped SIGINT 130' INT
trap 'stopped SIGHUP 129' HUP

min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

echo "gpu_check: repo $REPO, output $OUT, python $PY, budget ${TOTAL} s, profile $PROFILE"
(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi) > "$OUT/nvidia-smi.txt" 2>&1 || true
pack

# ------------------------------------------------------------------ 1. install
verify_import() {  # verify_import [PYTHONPATH]
  (cd "$TMP" && PYTHONPATH="${1:-${PYTHONPATH:-}}" timeout -k 10 120 "$PY" -c \
    "import daal_triton, daal_triton.kernels, daal_triton.reference; print('imports', daal_triton.__file__)")
}
INSTALL=none
TARGET_PATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
if [ "${DAAL_CHECK_INSTALL:-1}" = 0 ]; then  # a rehearsal in an environment that has the package
  if verify_import > "$OUT/install_preinstalled.log" 2>&1; then INSTALL=preinstalled; else INSTALL=failed; STATUS=1; fi
  echo "{\"step\": \"install_preinstalled\", \"rc\": $([ $INSTALL = failed ] && echo 1 || echo 0), \"seconds\": 0}" >> "$STEPS"
elif step install_editable "$(min 120 "$(left)")" "$PY" -m pip install --no-deps --no-build-isolation -e "$REPO" \
    && verify_import >> "$OUT/install_editable.log" 2>&1; then
  INSTALL=editable
elif step install_target "$(min 90 "$(left)")" "$PY" -m pip install --no-deps --no-build-isolation \
      --target "$TMP/site" "$REPO" \
    && verify_import "$TARGET_PATH" >> "$OUT/install_target.log" 2>&1; then
  export PYTHONPATH="$TARGET_PATH"
  INSTALL=target
else
  # Last resort: the installed layout as a tree of links (the package_dir of setup.py).
  mkdir -p "$TMP/shim/daal_triton"
  for f in "$REPO"/daal_triton/*; do ln -s "$f" "$TMP/shim/daal_triton/$(basename "$f")"; done
  ln -s "$REPO/kernels" "$TMP/shim/daal_triton/kernels"
  ln -s "$REPO/reference" "$TMP/shim/daal_triton/reference"
  SHIM_PATH="$TMP/shim${PYTHONPATH:+:$PYTHONPATH}"
  if verify_import "$SHIM_PATH" > "$OUT/install_link_tree.log" 2>&1; then
    export PYTHONPATH="$SHIM_PATH"
    INSTALL=link-tree
  else
    INSTALL=failed
    STATUS=1
  fi
  echo "{\"step\": \"install_link_tree\", \"rc\": $([ $INSTALL = failed ] && echo 1 || echo 0), \"seconds\": 0}" >> "$STEPS"
fi
echo "   install: $INSTALL"

# ------------------------------------------------------------------ ProxyAnchor's loss
# The training-step benchmark compares DAAL with pytorch-metric-learning's ProxyAnchorLoss, which
# the GPU image lacks (and the machine has no network): its wheel travels with the repository
# (bench/wheels/README.md), installed into a folder of this run on PYTHONPATH.
if ! (cd "$TMP" && timeout -k 5 60 "$PY" -c "import pytorch_metric_learning" > /dev/null 2>&1); then
  for whl in "$REPO"/bench/wheels/pytorch_metric_learning-*.whl; do
    [ -f "$whl" ] || continue
    if timeout -k 5 60 "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$TMP/pml" "$whl" \
        > "$OUT/install_pml.log" 2>&1; then
      export PYTHONPATH="$TMP/pml${PYTHONPATH:+:$PYTHONPATH}"
      echo "   pytorch-metric-learning: $(basename "$whl")"
    else
      echo "   pytorch-metric-learning: not installed (install_pml.log)"
    fi
  done
fi

# ------------------------------------------------------------------ environment
INSTALL="$INSTALL" timeout -k 10 60 "$PY" - > "$OUT/env.json" 2> "$OUT/env.log" <<'EOF'
import datetime, json, os, platform, subprocess
env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "python": platform.python_version(), "install": os.environ.get("INSTALL")}
try:
    import torch
    env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_count=torch.cuda.device_count())
except Exception as exc:
    env["torch_error"] = repr(exc)
# the settings this run was given (none: the defaults): a run narrowed by DAAL_CHECK_K or a shorter
# DAAL_CHECK_TOTAL_S was filed as a full default one (a filing probe, 2026-12-07)
env["settings"] = {k: v for k, v in sorted(os.environ.items())
                   if k.startswith(("DAAL_CHECK_", "DAAL_BENCH_", "DAAL_TUNE_", "DAAL_PROBE_"))
                   or k in ("PYTHON", "TMPDIR")}
for mod in ("triton", "pytest", "pytest_benchmark", "pytorch_metric_learning"):
    try:
        import importlib.metadata as md
        env[mod] = md.version(mod.replace("_", "-"))
    except Exception:
        env[mod] = None
# the code that ran: the git revision where the copy has one, and in any case a digest of the
# package's and benchmarks' sources (python bench/report.py --source-digest computes it for a checkout)
try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    env["git_revision"] = out.stdout.strip() or None
except Exception:
    env["git_revision"] = None
try:
    import sys
    sys.path.insert(0, "bench")
    from report import source_digest
    env["source_sha256"] = source_digest(".")
except Exception as exc:
    env["source_sha256_error"] = repr(exc)
try:  # the internal switches this code times (bench/report.py reads a run's by them)
    from cases import TIMED_SWITCHES
    env["switches"] = [[sw.env, sw.default, sw.alternative] for sw in TIMED_SWITCHES]
except Exception as exc:
    env["switches_error"] = repr(exc)
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=15)
    env["driver"] = out.stdout.strip() or None
except Exception:
    env["driver"] = None
print(json.dumps(env, indent=1))
EOF
cat "$OUT/env.json"
pack

# ------------------------------------------------------------------ 2. parity tests
if [ "$INSTALL" != failed ]; then
  KSEL=()  # DAAL_CHECK_K: a pytest -k expression narrowing the test steps (rehearsals)
  if [ -n "${DAAL_CHECK_K:-}" ]; then KSEL=(-k "$DAAL_CHECK_K"); fi
  # kernels no GPU had run before (the Gluon forwards, the selection by a threshold: on every
  # tile, on half of them, the filter's other tiles) are timed by the benchmarks and the probe
  # only once their GPU tests have passed here (a hang, a fault or a wrong result stays in this
  # step): the tests write their outcomes to this file (tests/gpu_canary.py)
  export DAAL_GPU_CANARY="$OUT/gpu_canary.txt"
  # the test steps (this one and step 5's) run as SHARDS pytest processes side by side
  # (bench/sharded_pytest.py): their time is Triton's JIT builds, one core each
  # (2026-12-04's third run: 84 tests, 70 s on 4 shards, the slowest 61 s; since 2026-12-05 12
  # more, the two Gluon variants', each first launched in a child process with a 75 s deadline;
  # since the sixth session of 2026-12-05 the threshold path's: 7 more, 5 children of 90 s)
  step gpu_tests "$(min 170 $(( $(left) - 250 )))" "$PY" bench/sharded_pytest.py --shards "$SHARDS" \
      --junitxml "$OUT/gpu_tests.xml" -- tests -m gpu -q -ra -p no:cacheprovider ${KSEL[@]+"${KSEL[@]}"}
  rc=$?; if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then STATUS=1; fi  # 5: no test collected

  # ---------------------------------------------------------------- 3. benchmarks
  # (the first H200 run's tests ended at 207 s of 460 and left them 168 s; the kernel tests' 80 s
  # now come last, if reserved, so that the targets' comparisons get about that again)
  BENCH_LIMIT=$(( $(left) - 25 - TUNE_S - PROBE_S - TUNE_KNN_S - BUILD_S - KERNEL_S ))  # keep time for steps 4-6
  # DAAL_BENCH_S: at most this long (a CPU rehearsal: its smoke cases would otherwise fill every second left)
  if [ -n "${DAAL_BENCH_S:-}" ]; then BENCH_LIMIT=$(min "$DAAL_BENCH_S" "$BENCH_LIMIT"); fi
  export DAAL_BENCH_DEADLINE=$(( $(date +%s) + BENCH_LIMIT - 30 ))  # cases stop starting 30 s early
  export DAAL_BENCH_TRAIN_STEP_S=${DAAL_BENCH_TRAIN_STEP_S:-80}
  # Last on the line: of the targets, the training step's run after the operators'.
  step bench "$BENCH_LIMIT" "$PY" -c "$RUNNER" bench/test_bench_pairwise.py bench/test_bench_knn.py \
      bench/test_bench_line_margin.py bench/test_bench_loss.py bench/test_bench_train_step.py \
      -q -ra -p no:cacheprovider \
      --bench-profile "$PROFILE" --bench-records "$OUT/records.jsonl" \
      --benchmark-json "$OUT/bench.json" --benchmark-columns=min,median,mean,rounds \
      --junitxml="$OUT/bench_junit.xml"

  # ---------------------------------------------------------------- 4. probe, kNN and line-margin block sizes
  # Without a GPU (a rehearsal of this script on a CPU) all three run in their --smoke modes.
  SMOKE=$(timeout -k 5 60 "$PY" -c 'import torch; print("" if torch.cuda.is_available() else "--smoke")' 2>/dev/null)
  if [ "$PROBE_S" -gt 0 ]; then
    if [ -n "$SMOKE" ]; then PROBE_ENV=(env TRITON_INTERPRET=1); else PROBE_ENV=(); fi
    step probe "$(min "$PROBE_S" $(( $(left) - 25 - TUNE_S - TUNE_KNN_S - BUILD_S - KERNEL_S )))" ${PROBE_ENV[@]+"${PROBE_ENV[@]}"} \
        "$PY" bench/probe_h200.py "$OUT/probe.jsonl" $SMOKE
  fi
  if [ "$TUNE_KNN_S" -gt 0 ]; then
    KNN_LIMIT=$(min "$TUNE_KNN_S" $(( $(left) - 25 - TUNE_S - BUILD_S - KERNEL_S )))
    step tune_knn "$KNN_LIMIT" "$PY" bench/tune_knn.py \
        "$OUT/tune_knn.json" --budget-s $(( KNN_LIMIT - 25 )) $SMOKE
  fi
  # It gets what the benchmarks left (at least the TUNE_S reserved for it): candidates start
  # until 30 s before the step's limit, which leaves the last one time to finish.
  if [ "$TUNE_S" -gt 0 ]; then
    TUNE_LEFT=$(( $(left) - 25 - BUILD_S - KERNEL_S ))
    step tune_line_margin "$TUNE_LEFT" "$PY" bench/tune_line_margin.py \
        "$OUT/tune_line_margin.json" --budget-s $(( TUNE_LEFT - 30 )) $SMOKE
  fi
  if [ "$BUILD_S" -gt 0 ]; then  # the build-only kernel tests, under this machine's Triton
    step build_tests "$(( $(left) - 25 - KERNEL_S ))" "$PY" -c "$RUNNER" tests/kernels -m build -q -ra \
        -p no:cacheprovider --junitxml="$OUT/build_tests.xml" ${KSEL[@]+"${KSEL[@]}"}
    rc=$?; if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then STATUS=1; fi
  fi

  # ---------------------------------------------------------------- 5. kernel tests (reserved time only)
  # the kernel tests that run kernels (on this GPU); the ones that only build them for GPU targets
  # (marker "build": PTX, registers, spills) need no GPU (CI; step 4 with DAAL_CHECK_BUILD_S);
  # those at test-only block sizes ("small_tiles": a JIT build per case here) are CI's too
  if [ "$KERNEL_S" -gt 0 ]; then
    step kernel_tests "$(( $(left) - 25 ))" "$PY" bench/sharded_pytest.py --shards "$SHARDS" \
        --junitxml "$OUT/kernel_tests.xml" -- tests/kernels -m "not gpu and not build and not small_tiles" \
        -q -ra -p no:cacheprovider ${KSEL[@]+"${KSEL[@]}"}
    rc=$?; if [ $rc -ne 0 ] && [ $rc -ne 5 ]; then STATUS=1; fi
  fi
fi

# ------------------------------------------------------------------ 6. report
step report 30 "$PY" bench/report.py "$OUT" -o "$OUT/report.md"
[ -f "$OUT/report.md" ] && sed -n '1,60p' "$OUT/report.md"
trap - TERM INT HUP  # (the report step packed the whole run)
echo "gpu_check: done in $(elapsed) s (install: $INSTALL, status $STATUS); report: $OUT/report.md"
rm -rf "$TMP" 2>/dev/null || true
exit $STATUS
