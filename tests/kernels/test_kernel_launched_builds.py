"""Every launch the launchers make on the benchmark and training shapes compiles for sm_90, sm_80
and sm_100 (and a T4's or V100's launches for sm_75 and sm_70) exactly as Triton's JIT would
specialise it there, fits each target's shared memory, and the sm_90 builds keep their registers.

``launches()`` (kernels/*.py) lists configurations by hand and the other build tests compile
those; what a GPU actually launches also depends on the call (KP from ``k``, flags for labels,
self, a memory bank, casts, weights) and on Triton's specialisation of each argument (``i32``
for ints below 2^31, constants for ints equal to 1, divisibility by 16). An audit found 451 of
596 launched configurations built by no test. ``launch_recorder.py`` records the real ones on an
emulated H200 (nothing runs); this builds each (no GPU needed).
"""
import json
import os
import subprocess
import sys

import pytest

from daal_testing import compile_many_for_gpu, recorded_job, require_recorded_compiler_facts
from daal_triton.kernels._common import triton_release

pytestmark = pytest.mark.build

HERE = os.path.dirname(os.path.abspath(__file__))


#: The sm_90 stack (bytes) of the pairwise kernels on unpadded rows at D = 129 (bfloat16), by Triton
#: release: 3.8 spills the backward (64 B, one of its two launches), 3.6 (the GPU image's, which
#: timed them) nothing. Allowed by allowed_stack, held exact by test_the_unpadded_rows_are_what_spills
#: (a release not listed may keep none).
PAIRWISE_UNPADDED_STACKS = {"3.8": {"_pairwise_bwd_kernel": 64}, "3.6": {}}
PAIRWISE_UNPADDED_STACK = PAIRWISE_UNPADDED_STACKS.get(triton_release(), {})


def allowed_stack(launch) -> int:
    """The local memory (bytes) an sm_90 build may keep, with the reason; 0 for all others. A
    launch that spills more fails the test by kernel, constexprs and scenario."""
    sig = launch["signature"]
    if launch["kernel"] in ("_lm2_dseg_kernel", "_lm2_dseg_finish_kernel") and sig["seg_ptr"] in ("*bf16", "*fp16"):
        return 48  # half-precision segments: only the line-margin benchmark's direct calls (DAALLoss
        # hands the kernels float32 segments, which keep no stack)
    if launch["kernel"] == "_knn_finish_kernel" and launch["constexprs"]["KP"] == 8 and (
            sig["q_ptr"] == "*fp32" or launch["constexprs"]["BLOCK_D"] == 16):
        return 8  # the finish at KP 8 (k = 5..8; the loss's k = 3 runs KP 4): float32 8 B; float16 and
        # bfloat16 rows of D <= 16 (BLOCK_D 16) 8 B under Triton 3.6, none under 3.8 (the call scenarios)
    if launch["kernel"] == "_knn_fwd_kernel" and sig["q_ptr"] == "*fp32" and launch["constexprs"]["KP"] == 128:
        return 8  # the float32 forward at KP 128 (k = 65..128: daal-train's evaluation of classes that large)
    if launch["kernel"].startswith("_pairwise_") and "D" not in launch["divisible"]:
        return PAIRWISE_UNPADDED_STACK.get(launch["kernel"], 0)  # the pairwise distance's rows as they
        # are at an odd D, its default since the H200 runs timed them faster than the padded ones
        # (kernels/_common.py, ALIGN_DEFAULT): Triton 3.8's backward 64 B, nothing else
    if launch["kernel"] == "_knn_bwd_kernel" and launch["constexprs"].get("M") == 1:
        return 16  # one query row (M = 1, a constant to the JIT): 16 B on sm_90 (Triton 3.8), for one
        # program's k pairs (found by the 2026-12-06 call scenarios)
    if launch["kernel"] == "_knn_filter_kernel" and launch["options"].get("maxnreg") and _probe_only(launch):
        return 80  # the probe's filter tiles capped at 128 registers: 40 B (Triton 3.8), 80 B (3.6), outside the K-loop
        # (test_threshold_filter_alternatives_fit_their_residency)
    return 0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("launches") / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "launch_recorder.py"), str(out)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def _module_of(kernel: str) -> str:
    from daal_triton.kernels import _common, combine, density, knn, knn_threshold, line_margin, normalize, pairwise

    for mod in (_common, knn, knn_threshold, line_margin, pairwise, normalize, density, combine):
        if hasattr(mod, kernel):
            return mod.__name__
    raise LookupError(kernel)


def _describe(launch) -> str:
    shown = {k: v for k, v in launch["constexprs"].items() if v is not None}
    return f"{launch['kernel']} {launch['options']} {shown} [{'; '.join(launch['scenarios'])}]"


def _pre_ampere(launch) -> bool:
    """Launched on a GPU without TF32 (the recorder's scenarios ``..., sm_75``)."""
    return any(s.endswith("sm_75") for s in launch["scenarios"])


def _capabilities(launch):
    """sm_90 and sm_100 (a B200: its tensor-core MMA and pipelining differ from Hopper's, and
    its builds take more shared memory), and sm_80 unless the launch loads through tensor
    descriptors (sm_90/sm_100 only: knn.tma_device); sm_75 and sm_70 for a launch of a GPU without
    TF32 (a forced ``backend="triton"`` there: daal_triton/backend.py, MIN_CAPABILITY), only
    those when no newer GPU makes it (its float32 dots are IEEE). The launches only gpu_check
    makes on the H200 (tuning candidates, ``DAAL_ALIGN_D=off``, the probe's other sample strides):
    sm_90 alone."""
    if _tuning_only(launch) or _unaligned_only(launch) or _probe_only(launch):
        return (90,)  # timed by gpu_check on the H200 alone, never launched elsewhere
    descriptors = any(t.startswith("tensordesc") for t in launch["signature"].values())
    if _call_only(launch):  # the calls beyond the benchmarks' shapes: Hopper's builds (CI's time)
        return (90,)
    if descriptors:
        return (90, 100)
    if not _pre_ampere(launch):
        return (90, 80, 100)
    return (75, 70) if all(s.endswith("sm_75") for s in launch["scenarios"]) else (90, 80, 100, 75, 70)


def _job(launch, capability: int, sass: bool = False) -> dict:
    return recorded_job(launch, _module_of(launch["kernel"]), capability, sass)


@pytest.fixture(scope="module")
def built(recorded):
    jobs = [_job(launch, capability) for launch in recorded for capability in _capabilities(launch)]
    return list(zip([la for la in recorded for _ in _capabilities(la)], compile_many_for_gpu(jobs)))


def test_the_recording_covers_every_kernel_of_the_hot_paths(recorded):
    # the scenarios reach every kernel the loss, kNN, line margin and pairwise distance launch
    kernels = {la["kernel"] for la in recorded}
    expected = {"_knn_fwd_kernel", "_knn_finish_kernel", "_knn_bwd_kernel", "_sqnorm_kernel",
                "_lm2_fwd_kernel", "_lm2_bwd_kernel", "_lm2_own_prep_kernel", "_lm2_ownseg_kernel",
                "_lm2_dseg_kernel", "_lm2_dseg_finish_kernel", "_lm2_lse_kernel", "_pairwise_fwd_kernel",
                "_pairwise_h_kernel", "_pairwise_bwd_kernel", "_prepare_fwd_kernel", "_prepare_bwd_kernel",
                "_density_fwd_kernel", "_density_bwd_kernel", "_combine_fwd_kernel", "_combine_bwd_kernel"}
    assert expected <= kernels, expected - kernels
    # and the launch-time facts the hand-written lists missed: the loss's k = 3 (KP 4), its
    # float32 segments (no cast), ints typed i32 by value
    knn_kp = {la["constexprs"].get("KP") for la in recorded if la["kernel"] == "_knn_fwd_kernel"}
    assert {4, 8} <= knn_kp
    assert any(la["constexprs"].get("CAST") is False for la in recorded if la["kernel"] == "_lm2_own_prep_kernel")
    assert all(t != "i64" for la in recorded for t in la["signature"].values())
    # the default narrow tiles (64 x 128 through descriptors) where the benchmarks' bf16 kNN and
    # the bf16 loss batch run on an H200, and the switches gpu_check times: the table's 128 x 128
    # tiles with pointer loads, the wide tiles (256 rows) through descriptors
    fwd = [la for la in recorded if la["kernel"] == "_knn_fwd_kernel"]

    def tiles(la):
        c = la["constexprs"]
        return c.get("BLOCK_M"), c.get("BLOCK_N"), la["options"].get("num_warps"), bool(c.get("TMA"))
    # (the narrow ones where the rows fill the GPU: the 60k evaluation, not the bank or the loss batch)
    for scenario, default in (("knn bf16 eval60k", (64, 128, 4, True)), ("knn bf16 bank", (128, 128, 8, False)),
                              ("knn bf16 dml", (128, 128, 8, False))):
        assert {tiles(la) for la in fwd if scenario in la["scenarios"]} == {default}, scenario
        assert {tiles(la) for la in fwd if scenario + ", table tiles" in la["scenarios"]} == {(128, 128, 8, False)}
    assert {tiles(la) for la in fwd if "knn bf16 labelled 20k" in la["scenarios"]} == {(64, 128, 4, True)}
    assert any(tiles(la) == (256, 128, 8, True) for la in fwd)
    # selection by a threshold (DAAL_KNN_SELECT=threshold): its sample's default forward, the
    # filter on 128 x 128 tiles (one warpgroup) through descriptors, the selection and the rescan
    threshold = [la for la in recorded if any(s.endswith(", threshold") for s in la["scenarios"])]
    assert {"_knn_fwd_kernel", "_knn_filter_kernel", "_knn_select_kernel", "_knn_rescan_kernel"} <= {
        la["kernel"] for la in threshold}
    filt = [la for la in threshold if la["kernel"] == "_knn_filter_kernel"]
    assert {tiles(la) for la in filt if "knn bf16 eval60k, threshold" in la["scenarios"]} == {(128, 128, 4, True)}
    assert {la["constexprs"]["EXCLUDE_SELF"] for la in filt} == {False, True}
    # DAAL_KNN_SELECT=half: a self-search's filter on half the tiles (128 x 128, one warpgroup,
    # descriptors), not the filter on every tile
    half = [la for la in recorded if any(s.endswith(", half") for s in la["scenarios"])]
    assert {la["kernel"] for la in half} >= {"_knn_filter_half_kernel", "_knn_select_kernel", "_knn_rescan_kernel"}
    assert "_knn_filter_kernel" not in {la["kernel"] for la in half}
    assert {(la["constexprs"]["BLOCK"], la["options"]["num_warps"], la["constexprs"]["TMA"]) for la in half
            if la["kernel"] == "_knn_filter_half_kernel"} == {(128, 4, True)}
    # on an A100 (no descriptor loads) the switch leaves the default forward, on its table tiles
    a100 = [la for la in recorded if "knn bf16 eval 20k, threshold, sm_80" in la["scenarios"]]
    assert {la["kernel"] for la in a100} == {"_sqnorm_kernel", "_knn_fwd_kernel", "_knn_finish_kernel"}, a100
    assert {tiles(la) for la in a100 if la["kernel"] == "_knn_fwd_kernel"} == {(128, 128, 8, False)}


def test_every_recorded_launch_compiles_for_each_target(built):
    errors = [f"sm_{res['capability']} {_describe(la)}:\n{res['error'][-1500:]}" for la, res in built
              if "error" in res]
    assert not errors, "\n\n".join(errors)
    assert {res["capability"] for _, res in built} == {90, 80, 100, 75, 70}


#: The shared memory one program may use (bytes), by the compile target: sm_90 an H100/H200's
#: and sm_100 a B200's 227 KB (its largest builds: 147,504 B, the wide kNN tiles; 147,488 B, the
#: half-precision line-margin forward, 147,456 B on sm_90);
#: sm_80 the 99 KB of the consumer GPUs that run the same configurations (sm_86, sm_89,
#: sm_120; an A100 has 163 KB: their sm_86 and sm_120 builds used no more than the sm_80 ones,
#: 98,304 B at most, Triton 3.8, 2026-12-03); sm_75 a T4's 64 KB; sm_70 a V100's 96 KB. A launch
#: over the limit compiles and then fails on that GPU with OutOfResources.
SHARED_LIMIT = {90: 227 * 1024, 100: 227 * 1024, 80: 99 * 1024, 75: 64 * 1024, 70: 96 * 1024}


def test_every_recorded_launch_fits_in_shared_memory(built):
    over = [f"sm_{res['capability']}: {res['metadata']['shared']} B > {SHARED_LIMIT[res['capability']]} B: "
            f"{_describe(la)}" for la, res in built
            if "metadata" in res and res["metadata"]["shared"] > SHARED_LIMIT[res["capability"]]]
    assert not over, "\n".join(over)


def test_a_gpu_without_tf32_gets_ieee_dots(recorded):
    """A T4 or V100 has no TF32: its float32 dots are IEEE FMAs (as torch.matmul's there) whatever
    the matmul precision, and no operand is rounded to TF32 (``cvt.rna.tf32`` needs sm_80)."""
    pre = [la for la in recorded if _pre_ampere(la)]
    assert {la["kernel"] for la in pre} >= {"_knn_fwd_kernel", "_lm2_fwd_kernel", "_lm2_bwd_kernel",
                                            "_pairwise_fwd_kernel", "_pairwise_bwd_kernel"}
    assert any("fp32, tf32, sm_75" in s for la in pre for s in la["scenarios"])
    wrong = [_describe(la) for la in pre if la["constexprs"].get("INPUT_PRECISION", "ieee") != "ieee"
             or la["constexprs"].get("ROUND_TF32")]
    assert not wrong, "\n".join(wrong)


def _tuning_only(launch) -> bool:
    return all(s.startswith("tune_") for s in launch["scenarios"])


def _probe_only(launch) -> bool:
    """Launched only by bench/probe_h200.py's other sample strides (the recorder's ``knn bf16
    probe 20k, ...`` scenarios: ``knn_threshold.sampled_every``)."""
    return all(s.startswith("knn bf16 probe ") for s in launch["scenarios"])


def _call_only(launch) -> bool:
    """Launched only by the recorder's ``call: ...`` scenarios: what a call can ask for beyond the
    benchmarks' and the training program's shapes (each k's KP, each dtype, the loss's options,
    narrow embeddings, one sample or class, odd row counts, the switches crossed with them;
    launches no test built until 2026-12-06). Built for sm_90 alone: with sm_80 too CI took
    1,173 s of its 1,200 (2026-12-06); sm_80 and sm_100 build the benchmarks' and training's."""
    return all(s.startswith("call: ") for s in launch["scenarios"])


def _unaligned_only(launch) -> bool:
    """Launched only with ``DAAL_ALIGN_D=off``: the unpadded rows kept for the GPU's timing."""
    return all(s.endswith(", unaligned") for s in launch["scenarios"])


def test_recorded_sm90_launches_do_not_spill(built):
    require_recorded_compiler_facts()
    spills = []
    for la, res in built:
        if res["capability"] != 90 or "stack" not in res or _tuning_only(la) or _unaligned_only(la):
            continue
        if res["stack"] > allowed_stack(la):
            spills.append(f"{res['stack']} B stack, {res['registers']} registers: {_describe(la)}")
    assert not spills, "\n".join(spills)


def test_threshold_filter_fits_two_programs_per_sm(built):
    """DAAL_KNN_SELECT=threshold and half (kernels/knn_threshold.py): the filters' sm_90 builds
    (128 x 128 tiles on 4 warps through descriptors; every tile, or half of a self-search's) run
    wgmma, keep no stack, and fit two programs per SM (registers and shared memory), so one
    program's compare-and-append overlaps the other's MMAs: the premise of their estimates
    (docs/kernels.md, "Selection by a threshold") and of their grids' waves
    (``knn_threshold.PROGRAMS_PER_SM``)."""
    require_recorded_compiler_facts()
    from daal_testing import programs_per_sm
    from daal_triton.kernels import knn_threshold as kt

    filt = [(la, res) for la, res in built if la["kernel"] in ("_knn_filter_kernel", "_knn_filter_half_kernel")
            and res["capability"] == 90 and not _filter_tiles_only(la)]
    assert len(filt) >= 5 and {la["kernel"] for la, _ in filt} == {"_knn_filter_kernel", "_knn_filter_half_kernel"}
    for la, res in filt:
        assert "wgmma.mma_async" in res["ptx"] and "cp.async.bulk.tensor" in res["ptx"], _describe(la)
        assert res["stack"] == 0, (res["registers"], _describe(la))
        assert programs_per_sm(res["registers"], la["options"]["num_warps"], res["metadata"]["shared"]) >= max(
            2, kt.PROGRAMS_PER_SM), (
            res["registers"], res["metadata"]["shared"], _describe(la))


def _filter_tiles_only(launch) -> bool:
    """Launched only on the probe's other filter tiles (``knn_threshold.filter_tiles``)."""
    return all(", filter tiles " in s for s in launch["scenarios"])


def test_threshold_filter_alternatives_fit_their_residency(built):
    """The filter's other tiles that bench/probe_h200.py times at 60k (``knn_threshold.
    FILTER_ALTERNATIVES``), built as recorded: each runs wgmma on descriptor loads and allows
    exactly the programs per SM the table says (what their grids count waves of); none keeps a
    stack but one capped by ``maxnreg``, whose spills (at most 80 B: 40 under Triton 3.8, 80 under
    3.6) stay out of the K-loop
    (its sm_90 SASS: no local-memory access in the loop that holds the MMAs). Registers, stack
    and SASS are compiler facts, held under the recorded releases (Triton 3.9's capped build keeps
    256 B); the wgmma and TMA of the PTX under every release."""
    from daal_testing import programs_per_sm, sass_loops
    from daal_triton.kernels import knn_threshold as kt

    def blocks(la):
        c, o = la["constexprs"], la["options"]
        return c["BLOCK_M"], c["BLOCK_N"], o["num_warps"], o["num_stages"], o.get("maxnreg")
    alt = {blocks(la): (la, res) for la, res in built if la["kernel"] == "_knn_filter_kernel"
           and res["capability"] == 90 and _filter_tiles_only(la)}
    assert set(alt) == set(kt.FILTER_ALTERNATIVES), set(alt)
    for la, res in alt.values():
        assert "wgmma.mma_async" in res["ptx"] and "cp.async.bulk.tensor" in res["ptx"], _describe(la)
    require_recorded_compiler_facts()
    capped = []
    for key, (la, res) in alt.items():
        got = programs_per_sm(res["registers"], key[2], res["metadata"]["shared"])
        assert got == kt.FILTER_ALTERNATIVES[key], (key, res["registers"], res["metadata"]["shared"], got)
        if key[4] is None:
            assert res["stack"] == 0, (key, res["stack"])
        else:
            assert res["registers"] <= key[4] and res["stack"] <= 80, (key, res["registers"], res["stack"])
            capped.append(la)
    assert capped, "a register-capped candidate is among them"
    for la, res in zip(capped, compile_many_for_gpu([_job(la, 90, sass=True) for la in capped])):
        if not res["sass"]:
            pytest.skip("cuobjdump is not shipped with this Triton")
        mma_loops = [ops for _, _, ops in sass_loops(res["sass"]) if any(o.startswith("HGMMA") for o in ops)]
        inner = min(mma_loops, key=len)  # the K-loop (the tile loop holds it and the listing)
        assert not any(o.startswith(("LDL", "STL")) for o in inner), _describe(la)


def test_line_margin_tuning_candidates_that_spill_are_the_ones_it_skips(built):
    """bench/tune_line_margin.py times block sizes on the GPU against the table's, in a budget of
    seconds: its candidates all compile (above), and those whose sm_90 build spills (local
    memory in the hot loop of a GEMM kernel) are exactly the ones it skips (``SPILLS``), so the
    device time goes to ones that can win. ``SPILLS`` is a compiler fact (:func:`compiler_fact`:
    Triton 3.9 no longer spills the float32 (64, 128, 8, 3))."""
    from daal_testing import compiler_fact

    sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
    import tune_line_margin as tune

    kernel_of = {"_lm2_fwd_kernel": "fwd2", "_lm2_bwd_kernel": "bwd2"}
    stack = {}
    for la, res in built:
        if res["capability"] != 90 or la["kernel"] not in kernel_of:
            continue
        for s in la["scenarios"]:
            parts = s.split(" ", 3)
            if parts[0] == "tune_line_margin" and parts[2] == kernel_of[la["kernel"]]:
                stack[parts[1], parts[2], parts[3]] = res["stack"]
    expected = 2 * sum(len(tune.CANDIDATES[k]) for k in tune.KERNELS)
    assert len(stack) >= expected - 2, sorted(stack)  # candidates equal to the table's entry merge
    spilling = {key for key, b in stack.items() if b > 0}
    declared = {(fam, kernel, str(tuple(blocks))) for fam, per in tune.SPILLS.items()
                for kernel, cands in per.items() for blocks in cands}
    compiler_fact(spilling == declared, "the candidates that spill are not bench/tune_line_margin.py's SPILLS "
                  f"(bytes): {({key: stack.get(key) for key in spilling ^ declared})}")


def _padded_scenario(scenario: str) -> bool:
    """Whether a D = 129 scenario's kNN or pairwise rows are padded: "..., unaligned" (with
    ``DAAL_ALIGN_D=off``) never, "..., padded" (``=pad``) always, else by the operator's default
    (kernels/_common.py, ``ALIGN_DEFAULT``; the loss's rows are its kNN's)."""
    from daal_triton.kernels import _common

    if scenario.endswith((", unaligned", ", padded")):
        return scenario.endswith(", padded")
    return _common.ALIGN_DEFAULT["pairwise" if scenario.startswith("pairwise") else "knn"]


def test_odd_widths_reach_the_gemm_kernels_as_aligned_rows(recorded):
    """At D = 129 the padded kNN and pairwise launches get rows of 144 (kernels/_common.py,
    ``ALIGN``): D and every row stride marked divisible by 16, as at D = 512, so they are the
    builds that keep no stack (the test above covers them); the unpadded ones (the kNN with
    ``DAAL_ALIGN_D=off``, the pairwise distance by default) are unmarked."""
    # D and the row strides of the D-wide operands (the others, of k- or N-wide outputs, are
    # the call's: k = 8 is no multiple of 16)
    ROWS = {"D", "stride_q_m", "stride_r_n", "stride_dq_m", "stride_dr_n", "stride_x_m", "stride_y_n",
            "stride_a_r", "stride_b_c", "stride_da_r"}
    gemm = ("_knn_fwd_kernel", "_knn_finish_kernel", "_knn_bwd_kernel", "_pairwise_fwd_kernel",
            "_pairwise_bwd_kernel", "_sqnorm_kernel")
    seen = {True: set(), False: set()}
    for la in recorded:
        if la["kernel"] not in gemm:
            continue
        for s in la["scenarios"]:
            if "D=129" not in s:
                continue
            padded = _padded_scenario(s)
            seen[padded].add(la["kernel"])
            strides = {n for n in la["signature"] if n in ROWS}
            marked = strides & set(la["divisible"])
            assert (marked == strides) if padded else ("D" not in marked), (s, la["kernel"], strides - marked)
    assert seen[True] == set(gemm), set(gemm) - seen[True]
    assert {"_knn_bwd_kernel", "_pairwise_fwd_kernel", "_pairwise_bwd_kernel"} <= seen[False]
    assert not _padded_scenario("pairwise bf16 large D=129") and _padded_scenario("knn bf16 bank D=129")


def test_the_unpadded_rows_are_what_spills(built):
    """What the padding is for: the unpadded bfloat16 kNN backward at D = 129 keeps stack on
    sm_90 (744 B with Triton 3.8 and 3.6), where its padded launch keeps none. Should a Triton
    release stop spilling it, the padding's copy may no longer pay: time ``DAAL_ALIGN_D=off``
    (the benchmarks' ``triton_unaligned``) before keeping it. The pairwise distance runs its
    unpadded rows by default (the H200 runs, under Triton 3.6, timed them faster): their stack is
    the one :data:`PAIRWISE_UNPADDED_STACKS` lists for this Triton (3.8: the backward's 64 B, the
    more of its two launches; 3.6: none), not less (a build that stopped spilling would leave the
    allowance standing for nothing), and their forward keeps none."""
    require_recorded_compiler_facts()
    stack = [res["stack"] for la, res in built if res["capability"] == 90 and _unaligned_only(la)
             and la["kernel"] == "_knn_bwd_kernel"]
    assert stack and min(stack) > 0, stack
    worst = {}
    for la, res in built:
        if res["capability"] == 90 and la["kernel"].startswith("_pairwise_") and "D" in la["signature"] \
                and "D" not in la["divisible"]:
            worst[la["kernel"]] = max(worst.get(la["kernel"], 0), res["stack"])
    assert set(worst) == {"_pairwise_fwd_kernel", "_pairwise_bwd_kernel"}, worst
    assert {k: st for k, st in worst.items() if st} == PAIRWISE_UNPADDED_STACK, worst


def test_sass_tile_loop_script_counts_the_filter(recorded, tmp_path, capsys):
    """scripts/sass_tile_loop.py (the instruction counts docs/kernels.md quotes for the
    threshold filter) reads a recorded launch's sm_90 build: its D-loop (HGMMA), its listing
    rounds and what lies outside them; a scenario no launch matches is refused."""
    import importlib.util

    path = tmp_path / "launches.json"
    path.write_text(json.dumps(recorded))
    spec = importlib.util.spec_from_file_location("sass_tile_loop", os.path.join(HERE, "..", "..", "scripts",
                                                                                "sass_tile_loop.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["_knn_filter_kernel", "bf16 bank, threshold", str(path)]) == 0
    out = capsys.readouterr().out
    assert "0 B stack" in out and "D-loop" in out and "outside the nested loops" in out, out
    rounds = [line for line in out.splitlines() if line.strip().startswith("rounds")]
    assert len(rounds) == 1 and " 2 BAR.SYNC" in rounds[0], out
    assert script.main(["_knn_filter_kernel", "no such scenario", str(path)]) == 2
