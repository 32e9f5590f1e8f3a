"""The Gluon kNN forwards (kernels/knn_gluon.py, ``DAAL_KNN_TILES=gluon`` and ``gluon128``):
their sm_90 builds (registers, shared memory, the queries loaded once), where they are chosen,
and on a GPU their selection against the Triton forward's and the float64 reference's."""
import re
from collections import Counter

import pytest
import torch

from daal_testing import programs_per_sm, tolerance
from gpu_canary import canary, first_launches, record
from daal_triton import reference
from daal_triton.kernels import knn as kk, knn_gluon as kg
from daal_triton.kernels._common import triton_release


def _job(build: dict, capability: int = 90) -> dict:
    """A compile job (tests/daal_testing.py, ``compile_many_for_gpu``) of one Gluon build, with
    the launch's specialisation: 16-byte-aligned pointers, the split width a multiple of 16."""
    v = kg.VARIANTS[build["variant"]]
    constexprs = {"BLOCK_M": v.block_m, "BLOCK_N": kg.BLOCK_N, "BLOCK_D": kg.BLOCK_D, "ND": build["ND"],
                  "STAGES": build["STAGES"], "KP": build["KP"], "HAS_LABELS": build["HAS_LABELS"],
                  "EXCLUDE_SELF": build["EXCLUDE_SELF"], "GEMM_ONLY": build["GEMM_ONLY"], "WARPS": v.warps}
    return {"module": kg.__name__, "name": "_knn_fwd_gluon_kernel",
            "signature": kg.signature(build["dtype"], build["HAS_LABELS"], v.name), "constexprs": constexprs,
            "capability": capability, "num_warps": v.warps, "num_stages": build["STAGES"],
            "specialisation": "aligned", "unit": [], "rows": ["cols_per_split"], "sass": build["ND"] in _SASS_ND,
            "maxnreg": None}


#: The chunk counts whose SASS the build test reads (cuobjdump per build: CI's time): D = 512's
#: and the narrowest; the others are compiled and checked for stack and residency.
_SASS_ND = (1, kg.MAX_D // kg.BLOCK_D)


#: The sm_90 stack (bytes) the 64-row forward keeps at ND = 6 (D = 321..384) with labels, by Triton
#: release (255 registers: two programs per SM allow no more): 3.8 56 B with self pairs excluded
#: (KP 8 and 16), 8 B without (KP 16); 3.6 80 B (KP 16, self excluded; the others not compiled
#: there). The 2026-12-06 audit found it: the builds covered D = 512 alone. Every other build
#: keeps none. Only ``DAAL_KNN_TILES=gluon`` launches it, and no GPU has timed that path yet.
GLUON_ND6_LABELLED_STACK = {"3.8": 56, "3.6": 80}


def _allowed_stack(build: dict) -> int:
    if build["variant"] == "gluon" and build["ND"] == 6 and build["HAS_LABELS"]:
        return GLUON_ND6_LABELLED_STACK.get(triton_release(), max(GLUON_ND6_LABELLED_STACK.values()))
    return 0


@pytest.mark.build
def test_gluon_forward_builds_for_hopper():
    """Every build a launch can ask for (each variant; float16/bfloat16, KP 8 and 16, with and
    without labels and self pairs, D = 512, and in bfloat16 every narrower D's chunk count; and
    the probe's GEMM-only ceilings) compiles for sm_90 under this machine's Triton with no local
    memory (but :data:`GLUON_ND6_LABELLED_STACK`), fits its variant's programs per SM
    (two at 64 rows, one at 128), keeps its queries resident (the tile loop issues one TMA load
    per D-chunk, the references'; the queries' ND loads come before it) and runs the MMAs from
    shared memory: 4 wgmma k-steps of 64 x 128 x 16 per 64-wide chunk and warpgroup. At 128
    rows a block-wide barrier separates each chunk's wgmma wait from the TMA load that reuses
    the buffer: the other warpgroup may still be reading it. A warp's instructions per tile, off
    the diagonal, are within 10% at 128 rows of those at 64 (outside the merge rounds and per
    round)."""
    from daal_testing import compile_many_for_gpu, sass_loops, tile_loop_parts

    builds = kg.builds()
    probe_depths = sum(map(len, kg.PROBE_STAGES.values()))
    nd = kg.MAX_D // kg.BLOCK_D
    assert len(builds) == (17 + 8 * (nd - 1)) * len(kg.VARIANTS) + probe_depths
    assert {b["ND"] for b in builds} == set(range(1, nd + 1))
    assert all(b["STAGES"] in (kg.VARIANTS[b["variant"]].stages,) + kg.PROBE_STAGES.get(b["variant"], ()) for b in builds)
    assert [b["GEMM_ONLY"] for b in builds].count(True) == len(kg.VARIANTS)  # bench/probe_h200.py's ceilings
    assert {(v.block_m, v.warps, v.per_sm) for v in kg.VARIANTS.values()} == {(64, 4, 2), (128, 8, 1)}
    results = compile_many_for_gpu([_job(b) for b in builds])
    per_warp, depth = {}, {}
    for build, res in zip(builds, results):
        v = kg.VARIANTS[build["variant"]]
        assert not res.get("error"), (build, res.get("error"))
        assert res["stack"] <= _allowed_stack(build), (build, res["registers"], res["stack"])
        shared = res["metadata"]["shared"]
        assert shared >= build["ND"] * v.block_m * kg.BLOCK_D * 2 + build["STAGES"] * kg.BLOCK_N * kg.BLOCK_D * 2
        assert programs_per_sm(res["registers"], v.warps, shared) >= v.per_sm, (build, res["registers"], shared)
        if build["ND"] not in _SASS_ND:
            continue
        if not res["sass"]:
            pytest.skip("cuobjdump is not shipped with this Triton")
        loops = sass_loops(res["sass"])
        tile_loop = max(loops, key=lambda lp: Counter(lp[2])["UTMALDG.2D"])
        ops = Counter(o.split(".")[0] for o in tile_loop[2])
        assert ops["UTMALDG"] == build["ND"], (build, ops)  # the references' chunks only
        assert res["sass"].count("UTMALDG") >= 2 * build["ND"]
        assert ops["HGMMA"] == build["ND"] * kg.BLOCK_D // 16, (build, ops)
        # m64 n128 k16, the queries' operand a shared-memory descriptor (not registers)
        lines = [ln for ln in res["sass"].splitlines() if " HGMMA." in ln]
        assert lines and all(re.search(r"HGMMA\.64x128x16\.F32(\.BF16)? R\d+, gdesc\[", ln) for ln in lines), lines[:2]
        # between each wgmma wait and the next TMA load into the ring, a barrier of all warps
        body = [o.split(".")[0] + ("." + o.split(".")[1] if o.startswith("WARPGROUP.") else "") for o in tile_loop[2]]
        waits = [i for i, o in enumerate(body) if o == "WARPGROUP.DEPBAR"]
        assert len(waits) >= build["ND"], (build, len(waits))
        for i in waits:
            nxt = next((j for j in range(i + 1, len(body)) if body[j] in ("UTMALDG", "HGMMA")), None)
            if nxt is not None and body[nxt] == "UTMALDG":
                assert "BAR" in body[i:nxt], (build, body[i:nxt + 1])
        if (build["dtype"], build["KP"], build["HAS_LABELS"], build["GEMM_ONLY"], build["ND"]) == (
                torch.bfloat16, 8, False, False, nd):
            outside, rounds = tile_loop_parts(loops)
            # the tile loop outside the merge rounds of the probe's build, at each ring depth
            depth[(build["variant"], build["EXCLUDE_SELF"], build["STAGES"])] = outside
            if not build["EXCLUDE_SELF"]:  # the 60k benchmark's path off the diagonal
                assert len(rounds) == 1, (build, rounds)
                per_warp[build["variant"]] = (outside, rounds[0])
    # a warp's instructions per tile (outside the merge rounds, and per round) do not grow with
    # the program's rows: 128 rows are two warpgroups' 64 each (docs/kernels.md: 1,420 and 1,457)
    assert set(per_warp) == set(kg.VARIANTS), per_warp
    assert per_warp["gluon128"][0] <= 1.1 * per_warp["gluon"][0], per_warp
    assert per_warp["gluon128"][1] <= 1.1 * per_warp["gluon"][1], per_warp
    # a ring depth that divides the 8 chunks makes every buffer index and phase a constant: fewer
    # instructions per tile than at the variant's own depth (docs/kernels.md: at 128 rows 12% fewer
    # under Triton 3.8, 5% under 3.6, whose 5-buffer build already keeps more of it in uniform
    # registers; at 64 rows, 2 buffers against 3, 10%)
    for variant, depths in kg.PROBE_STAGES.items():
        own = depth[(variant, True, kg.VARIANTS[variant].stages)]
        for st in depths:
            assert (kg.MAX_D // kg.BLOCK_D) % st == 0 and depth[(variant, True, st)] < own, depth


@pytest.mark.interpreter
@pytest.mark.parametrize("policy", sorted(kk.GLUON_POLICIES))
def test_gluon_forward_is_chosen_only_where_it_runs(monkeypatch, policy):
    """``DAAL_KNN_TILES=gluon`` (``gluon128``) takes a Gluon forward only on sm_90 for what it
    serves; on this machine's tensors (CPU: the interpreter cannot run Gluon) the forward falls
    back to the default narrow tiles and gives their result; ``eligible`` refuses float32,
    KP > 16, D > 512 and misaligned rows whatever the device."""
    q = torch.randn(37, 129)
    assert not kg.eligible(q.half(), q.half(), 8)
    monkeypatch.setenv(kk.TILES_ENV, policy)
    x = torch.randn(150, 64, dtype=torch.float16)
    prepared = kk.prepare(x, torch.float16, align=kk.align_rows("knn"))
    if x.device.type == "cpu":
        assert kk.forward_entry(prepared, prepared, 8, False) == kk.NARROW_ENTRY
    got = kk._knn(x, x, 5, exclude_self=True)
    monkeypatch.setenv(kk.TILES_ENV, "narrow")
    want = kk._knn(x, x, 5, exclude_self=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_gluon_eligibility_rules(monkeypatch):
    """The rules of :func:`knn_gluon.eligible` on a device that reports sm_90 (faked: the rule
    reads the capability and the tensors' facts only)."""
    assert set(kk.GLUON_POLICIES) == set(kg.VARIANTS) <= set(kk.TILES_POLICIES)  # one policy per variant
    assert all(kk.GLUON_ENTRIES[entry] == policy for policy, entry in kk.GLUON_POLICIES.items())
    monkeypatch.setattr(kg, "device_capability", lambda device: (9, 0))

    class Cuda(torch.Tensor):  # a CPU tensor that says it lives on a GPU
        @property
        def device(self):
            return torch.device("cuda", 0)

    def t(rows, d, dtype=torch.bfloat16, cols=None):
        x = torch.zeros(rows, cols or d, dtype=dtype)[:, :d]
        return x.as_subclass(Cuda)

    assert kg.eligible(t(100, 512), t(300, 512), 16)
    assert not kg.eligible(t(100, 512), t(300, 512), 32)  # KP
    assert not kg.eligible(t(100, 520), t(300, 520), 8)  # D: the queries' block must fit
    assert not kg.eligible(t(100, 64, torch.float32), t(300, 64, torch.float32), 8)
    assert not kg.eligible(t(100, 60, cols=68), t(300, 64), 8)  # row stride of 136 B
    assert not kg.eligible(t(0, 64), t(300, 64), 8)
    monkeypatch.setattr(kg, "device_capability", lambda device: (10, 0))
    assert not kg.eligible(t(100, 512), t(300, 512), 16)  # wgmma is sm_90's


def _labels(n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), device="cuda")


#: The child process's first launches of a variant (kernels/knn_gluon.py: never run on a GPU
#: before 2026-12-05): the shapes of the corner cases (fewer chunks than the ring's prefetch,
#: one tile, partial tiles, several splits, D = 512), each checked to take the Gluon entry.
_SMOKE = """
import os, torch
os.environ["DAAL_KNN_TILES"] = {variant!r}
from daal_triton.kernels import knn as kk
kk.NARROW_MIN_WAVES = 0.0
for M, N, D, k, splits in ((200, 50, 64, 3, 1), (300, 700, 64, 5, 3), (1100, 1100, 512, 8, None)):
    q = torch.randn(M, D, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, D, device="cuda").bfloat16()
    assert kk.forward_entry(q, r, kk.next_pow2(k), False) == kk.GLUON_POLICIES[{variant!r}]
    kk._knn(q, r, k, exclude_self=r is q, splits=splits)
    torch.cuda.synchronize()
from daal_triton.kernels import knn_gluon as kg
for st in kg.PROBE_STAGES.get({variant!r}, ()):  # the probe's other ring depths
    x = torch.randn(1100, 512, device="cuda").bfloat16()
    kg.candidates(x, x, 8, None, None, True, 1, variant={variant!r}, stages=st)
    torch.cuda.synchronize()
print("ok")
"""
#: Seconds the child may take (a Python start, three JIT builds, the launches): a hang costs this.
SMOKE_S = 75


def _gluon_on_gpu(variant: str, name: str) -> None:
    """Skip without an sm_90 GPU; else fail (and record the failure in the canary) unless the
    variant's first launches returned in a child process with a deadline
    (``gpu_canary.first_launches``): a kernel that hangs would otherwise take this test process
    and the tests after it."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward runs on sm_90")
    first_launches(variant, _SMOKE.format(variant=variant), SMOKE_S, name)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(kg.VARIANTS))
@pytest.mark.parametrize("M,N,D,k,labelled,splits", [
    # the first of each variant's tests launches it in a child first (shard_weight: an estimate,
    # tests/conftest.py; a Python start, three Gluon builds, the launches: about 12 ordinary tests)
    pytest.param(4100, 4100, 512, 8, False, None, marks=pytest.mark.shard_weight(12)), (4100, 4100, 512, 16, True, 3), (700, 2100, 129, 3, True, 1),
    (1024, 65536, 512, 8, False, None), (5000, 5000, 64, 1, False, 2)])
def test_gluon_forward_gpu(monkeypatch, request, variant, M, N, D, k, labelled, splits):
    """On an sm_90 GPU (bfloat16), after its first launches returned in a child process: each
    Gluon forward selects what the narrow Triton forward selects (another summation order of the
    GEMM form may swap near-ties: 99.9% of the rows), with the float64 reference's distances;
    self-kNN at the model's splits, labels with three splits, odd D with one split, the memory
    bank's shape, k = 1. Its outcome goes to the canary (tests/gpu_canary.py): the
    benchmarks time a variant only after passes and no failure."""
    _gluon_on_gpu(variant, request.node.name)
    with canary(variant, request.node.name):
        _check_gluon_forward(monkeypatch, variant, M, N, D, k, labelled, splits)


def _check_gluon_forward(monkeypatch, variant, M, N, D, k, labelled, splits) -> None:
    monkeypatch.setattr(kk, "NARROW_MIN_WAVES", 0.0)  # these shapes' rows fill no H200: forced
    q = torch.randn(M, D, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, D, device="cuda").bfloat16()
    ql = _labels(M, 5) if labelled else None
    rl = (ql if r is q else _labels(N, 5)) if labelled else None
    launched = []
    real = kg.candidates
    monkeypatch.setattr(kg, "candidates", lambda *a, **kw: launched.append((a[6], kw)) or real(*a, **kw))
    out = {}
    for policy in ("narrow", variant):
        monkeypatch.setenv(kk.TILES_ENV, policy)
        out[policy] = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=r is q, splits=splits)
    assert len(launched) == 1 and launched[0][1] == {"variant": variant}, launched
    assert splits is None or launched[0][0] == splits, launched
    same = (out["narrow"][1] == out[variant][1]).all(dim=1).float().mean().item()
    assert same >= 0.999, same
    assert (out["narrow"][0] - out[variant][0]).abs().max().item() <= 1e-3
    dist, index = out[variant]
    ref_d, _ = reference.knn(q.double(), r.double(), k, query_labels=ql, ref_labels=rl, exclude_self=r is q)
    finite = torch.isfinite(ref_d)
    assert torch.equal(torch.isfinite(dist), finite)
    err = ((dist.double() - ref_d)[finite].norm() / ref_d[finite].norm()).item()
    assert err <= tolerance(torch.bfloat16, tf32=True), err
    # every index is a candidate: right label, not self, in range
    valid = index >= 0
    assert (index[valid] < N).all()
    if r is q:
        assert not (index == torch.arange(M, device="cuda")[:, None]).any()
    if labelled:
        assert (rl[index.clamp(min=0)] == ql[:, None])[valid].all()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(kg.PROBE_STAGES))
def test_gluon_probe_stages_gpu(request, variant):
    """On an sm_90 GPU: each of the probe's other ring depths (``PROBE_STAGES``) writes the same
    slots, bit for bit, as the variant's own (the same MMAs in the same order; only the loads'
    buffers differ). The outcome goes to the canary (tests/gpu_canary.py) under
    ``variant-stagesN``: the probe times a depth only after its pass."""
    _gluon_on_gpu(variant, request.node.name)
    q = torch.randn(4100, 512, device="cuda").bfloat16()
    want = kg.candidates(q, q, 8, None, None, True, 2, variant=variant)
    for st in kg.PROBE_STAGES[variant]:
        got = kg.candidates(q, q, 8, None, None, True, 2, variant=variant, stages=st)
        same = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        record(f"{variant}-stages{st}", "pass" if same else "fail", request.node.name)
        assert same, (st, (got[1] != want[1]).sum().item())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(kg.VARIANTS))
def test_gluon_gemm_only_gpu(request, variant):
    """On an sm_90 GPU: each variant's ``GEMM_ONLY`` build (bench/probe_h200.py's ceiling of the
    Gluon tiles) writes each row's smallest squared distance over its split into slot 0."""
    _gluon_on_gpu(variant, request.node.name)
    q = torch.randn(3000, 512, device="cuda").bfloat16()
    r = torch.randn(2900, 512, device="cuda").bfloat16()
    out_s, _ = kg.candidates(q, r, 8, None, None, False, 2, gemm_only=True, variant=variant)
    d2 = torch.cdist(q.float(), r.float()).square()
    cols = kg.cdiv(kg.cdiv(r.shape[0], 2), kg.BLOCK_N) * kg.BLOCK_N  # the launcher's split width
    want = torch.stack([d2[:, i * cols:(i + 1) * cols].min(dim=1).values for i in range(out_s.shape[0])])
    assert out_s.shape[0] == 2
    assert torch.allclose(out_s[:, :, 0], want, rtol=2e-2, atol=1e-2)


@pytest.mark.interpreter
@pytest.mark.parametrize("entry", sorted(kk.GLUON_ENTRIES))
@pytest.mark.parametrize("k,splits", [(3, None), (8, 2), (13, 1)])
def test_gluon_entry_glue(monkeypatch, k, splits, entry):
    """The forward's glue around each Gluon entry, on the CPU with the Gluon launcher stood in
    for by the Triton forward's slots (KP = max(8, next_pow2(k)), as the Gluon forward writes
    them): the entry's variant, the splits it is given (the caller's, else the model's), no fused
    finish, and the separate finish turning the slots into the default forward's neighbours and
    distances."""
    x = torch.randn(150, 48, dtype=torch.float16)
    lab = torch.randint(0, 3, (150,))
    want = kk._knn(x, x, k, query_labels=lab, ref_labels=lab, exclude_self=True, splits=splits)
    seen = []

    def stand_in(q, r, k_, ql, rl, exclude_self, S, variant):
        seen.append((k_, S, exclude_self, variant))
        return kk._candidates(q, r, max(8, kk.next_pow2(k_)), ql, rl, exclude_self, S, entry=kk.NARROW_ENTRY)

    monkeypatch.setattr(kg, "candidates", stand_in)
    monkeypatch.setattr(kk, "forward_entry", lambda *a: entry)
    got = kk._knn(x, x, k, query_labels=lab, ref_labels=lab, exclude_self=True, splits=splits)
    assert seen == [(k, splits or 1, True, kk.GLUON_ENTRIES[entry])], seen
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    with pytest.raises(ValueError, match="does not finish"):
        kk._candidates(kk.prepare(x, torch.float16, align=kk.align_rows("knn")), x, k, None, None, False, 1,
                       finish=True, entry=entry)


@pytest.mark.interpreter
@pytest.mark.parametrize("variant", sorted(kg.VARIANTS))
def test_gluon_launch_is_the_compiled_build(monkeypatch, variant):
    """What :func:`knn_gluon.candidates` launches (the kernel stood in for: Gluon runs on no CPU)
    is what the build test compiles: the variant's constexprs and warps (``_job``), its grid of
    ``cdiv(M, rows)`` x splits, descriptors with ``rows x 64`` and ``128 x 64`` blocks, and the
    argument types of :func:`knn_gluon.signature`; and the probe's other ring depths
    (``PROBE_STAGES``), one of ``knn_gluon.builds()`` each."""
    from triton.runtime.jit import mangle_type

    v = kg.VARIANTS[variant]
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: calls.append((grid, args, kw))

    monkeypatch.setattr(kg, "_knn_fwd_gluon_kernel", Recorder())
    q = torch.randn(300, 512, dtype=torch.bfloat16)
    r = torch.randn(700, 512, dtype=torch.bfloat16)
    out_s, out_i = kg.candidates(q, r, 5, None, None, False, 3, variant=variant)
    assert out_s.shape == out_i.shape == (3, 300, 8)
    (grid, args, kw), = calls
    assert grid == (kg.cdiv(300, v.block_m), 3)
    assert [args[0].block_shape, args[1].block_shape] == [[v.block_m, kg.BLOCK_D], [kg.BLOCK_N, kg.BLOCK_D]]
    build = {"variant": variant, "dtype": torch.bfloat16, "KP": 8, "HAS_LABELS": False, "EXCLUDE_SELF": False,
             "ND": 8, "GEMM_ONLY": False, "STAGES": v.stages}
    assert build in kg.builds()
    job = _job(build)
    assert {name: kw[name] for name in job["constexprs"]} == job["constexprs"]
    assert kw["num_warps"] == job["num_warps"] and set(kw) == set(job["constexprs"]) | {"num_warps"}
    names = list(job["signature"])
    assert [mangle_type(a) for a in args[:2]] == [job["signature"][n] for n in names[:2]]
    for st in kg.PROBE_STAGES.get(variant, ()):  # the probe's other ring depths: compiled too
        calls.clear()
        kg.candidates(q, q, 8, None, None, True, 1, variant=variant, stages=st)
        (grid, args, kw), = calls
        build = dict(build, EXCLUDE_SELF=True, STAGES=st)
        assert build in kg.builds() and kw["STAGES"] == st
        assert {name: kw[name] for name in _job(build)["constexprs"]} == _job(build)["constexprs"]
