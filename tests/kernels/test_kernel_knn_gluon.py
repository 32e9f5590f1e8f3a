"""The Gluon kNN forward (kernels/knn_gluon.py, ``DAAL_KNN_TILES=gluon``): its sm_90 builds
(registers, shared memory, the queries loaded once), where it is chosen, and on a GPU its
selection against the Triton forward's and the float64 reference's."""
import os
import re
from collections import Counter

import pytest
import torch

from daal_testing import programs_per_sm, tolerance
from daal_triton import reference
from daal_triton.kernels import knn as kk, knn_gluon as kg


def _job(build: dict, capability: int = 90) -> dict:
    """A compile job (tests/daal_testing.py, ``compile_many_for_gpu``) of one Gluon build, with
    the launch's specialisation: 16-byte-aligned pointers, the split width a multiple of 16."""
    constexprs = {"BLOCK_M": kg.BLOCK_M, "BLOCK_N": kg.BLOCK_N, "BLOCK_D": kg.BLOCK_D, "ND": build["ND"],
                  "STAGES": kg.STAGES, "KP": build["KP"], "HAS_LABELS": build["HAS_LABELS"],
                  "EXCLUDE_SELF": build["EXCLUDE_SELF"], "GEMM_ONLY": build["GEMM_ONLY"]}
    return {"module": kg.__name__, "name": "_knn_fwd_gluon_kernel",
            "signature": kg.signature(build["dtype"], build["HAS_LABELS"]), "constexprs": constexprs,
            "capability": capability, "num_warps": kg.NUM_WARPS, "num_stages": kg.STAGES,
            "specialisation": "aligned", "unit": [], "rows": ["cols_per_split"], "sass": True, "maxnreg": None}


@pytest.mark.build
def test_gluon_forward_builds_for_hopper():
    """Every build a launch can ask for (float16/bfloat16, KP 8 and 16, with and without labels
    and self pairs, D = 512; and the probe's GEMM-only ceiling) compiles for sm_90 under this machine's Triton with no local memory,
    fits two programs per SM, keeps its queries resident (the tile loop issues one TMA load per
    D-chunk, the references'; the queries' ND loads come before it) and runs the MMAs from
    shared memory: 4 wgmma k-steps of 64 x 128 x 16 per 64-wide chunk."""
    from daal_testing import compile_many_for_gpu, sass_loops

    builds = kg.builds()
    assert len(builds) == 17 and {b["ND"] for b in builds} == {kg.MAX_D // kg.BLOCK_D}
    assert [b["GEMM_ONLY"] for b in builds].count(True) == 1  # bench/probe_h200.py's ceiling
    results = compile_many_for_gpu([_job(b) for b in builds])
    for build, res in zip(builds, results):
        assert not res.get("error"), (build, res.get("error"))
        assert res["stack"] == 0, (build, res["registers"], res["stack"])
        shared = res["metadata"]["shared"]
        assert shared >= build["ND"] * kg.BLOCK_M * kg.BLOCK_D * 2 + kg.STAGES * kg.BLOCK_N * kg.BLOCK_D * 2
        assert programs_per_sm(res["registers"], kg.NUM_WARPS, shared) >= 2, (build, res["registers"], shared)
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


@pytest.mark.interpreter
def test_gluon_forward_is_chosen_only_where_it_runs(monkeypatch):
    """``DAAL_KNN_TILES=gluon`` takes the Gluon forward only on sm_90 for what it serves; on this
    machine's tensors (CPU: the interpreter cannot run Gluon) the forward falls back to the
    default narrow tiles and gives their result; ``eligible`` refuses float32, KP > 16, D > 512
    and misaligned rows whatever the device."""
    q = torch.randn(37, 129)
    assert not kg.eligible(q.half(), q.half(), 8)
    monkeypatch.setenv(kk.TILES_ENV, "gluon")
    x = torch.randn(150, 64, dtype=torch.float16)
    prepared = kk.prepare(x, torch.float16, align=kk.align_rows())
    if x.device.type == "cpu":
        assert kk.forward_entry(prepared, prepared, 8, False) == kk.NARROW_ENTRY
    got = kk._knn(x, x, 5, exclude_self=True)
    monkeypatch.setenv(kk.TILES_ENV, "narrow")
    want = kk._knn(x, x, 5, exclude_self=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_gluon_eligibility_rules(monkeypatch):
    """The rules of :func:`knn_gluon.eligible` on a device that reports sm_90 (faked: the rule
    reads the capability and the tensors' facts only)."""
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


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,D,k,labelled,splits", [
    (4100, 4100, 512, 8, False, None), (4100, 4100, 512, 16, True, 3), (700, 2100, 129, 3, True, 1),
    (1024, 65536, 512, 8, False, None), (5000, 5000, 64, 1, False, 2)])
def test_gluon_forward_gpu(monkeypatch, request, M, N, D, k, labelled, splits):
    """On an sm_90 GPU (bfloat16): the Gluon forward selects what the narrow Triton forward
    selects (another summation order of the GEMM form may swap near-ties: 99.9% of the rows),
    with the float64 reference's distances; self-kNN at the model's splits, labels with three
    splits, odd D with one split, the memory bank's shape, k = 1. Where ``DAAL_GLUON_CANARY``
    names a file (bench/gpu_check.sh), a pass appends the test's name to it: the benchmarks time
    the Gluon forward only after one (bench/problems.py, ``GLUON_CANARY_ENV``)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward runs on sm_90")
    monkeypatch.setattr(kk, "NARROW_MIN_WAVES", 0.0)  # these shapes' rows fill no H200: forced
    q = torch.randn(M, D, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, D, device="cuda").bfloat16()
    ql = _labels(M, 5) if labelled else None
    rl = (ql if r is q else _labels(N, 5)) if labelled else None
    launched = []
    real = kg.candidates
    monkeypatch.setattr(kg, "candidates", lambda *a: launched.append(a[-1]) or real(*a))
    out = {}
    for policy in ("narrow", "gluon"):
        monkeypatch.setenv(kk.TILES_ENV, policy)
        out[policy] = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=r is q, splits=splits)
    assert len(launched) == 1 and (splits is None or launched[0] == splits), launched
    same = (out["narrow"][1] == out["gluon"][1]).all(dim=1).float().mean().item()
    assert same >= 0.999, same
    assert (out["narrow"][0] - out["gluon"][0]).abs().max().item() <= 1e-3
    dist, index = out["gluon"]
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
    canary = os.environ.get("DAAL_GLUON_CANARY")  # bench/gpu_check.sh: the benchmarks may time it now
    if canary:
        with open(canary, "a") as f:
            f.write(f"{request.node.name}\n")


@pytest.mark.gpu
def test_gluon_gemm_only_gpu():
    """On an sm_90 GPU: the probe's ``GEMM_ONLY`` build (bench/probe_h200.py's ceiling of the
    Gluon tiles) writes each row's smallest squared distance over its split into slot 0."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward runs on sm_90")
    q = torch.randn(3000, 512, device="cuda").bfloat16()
    r = torch.randn(2900, 512, device="cuda").bfloat16()
    out_s, _ = kg.candidates(q, r, 8, None, None, False, 2, gemm_only=True)
    d2 = torch.cdist(q.float(), r.float()).square()
    cols = kg.cdiv(kg.cdiv(r.shape[0], 2), kg.BLOCK_N) * kg.BLOCK_N  # the launcher's split width
    want = torch.stack([d2[:, i * cols:(i + 1) * cols].min(dim=1).values for i in range(out_s.shape[0])])
    assert out_s.shape[0] == 2
    assert torch.allclose(out_s[:, :, 0], want, rtol=2e-2, atol=1e-2)


@pytest.mark.interpreter
@pytest.mark.parametrize("k,splits", [(3, None), (8, 2), (13, 1)])
def test_gluon_entry_glue(monkeypatch, k, splits):
    """The forward's glue around the Gluon entry, on the CPU with the Gluon launcher stood in for
    by the Triton forward's slots (KP = max(8, next_pow2(k)), as the Gluon forward writes them):
    the splits it is given (the caller's, else the model's), no fused finish, and the separate
    finish turning the slots into the default forward's neighbours and distances."""
    x = torch.randn(150, 48, dtype=torch.float16)
    lab = torch.randint(0, 3, (150,))
    want = kk._knn(x, x, k, query_labels=lab, ref_labels=lab, exclude_self=True, splits=splits)
    seen = []

    def stand_in(q, r, k_, ql, rl, exclude_self, S):
        seen.append((k_, S, exclude_self))
        return kk._candidates(q, r, max(8, kk.next_pow2(k_)), ql, rl, exclude_self, S, entry=kk.NARROW_ENTRY)

    monkeypatch.setattr(kg, "candidates", stand_in)
    monkeypatch.setattr(kk, "forward_entry", lambda *a: kk.GLUON_ENTRY)
    got = kk._knn(x, x, k, query_labels=lab, ref_labels=lab, exclude_self=True, splits=splits)
    assert seen == [(k, splits or 1, True)], seen
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    with pytest.raises(ValueError, match="does not finish"):
        kk._candidates(kk.prepare(x, torch.float16, align=kk.align_rows()), x, k, None, None, False, 1,
                       finish=True, entry=kk.GLUON_ENTRY)
