"""The line-margin work model (bench/work_model.py) against the kernels it describes."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import cases as bc  # noqa: E402
import report  # noqa: E402
import work_model as wm  # noqa: E402

SHAPES = [(d["B"], d["C"], d["D"]) for d in bc.SHAPES["line_margin"].values()] + [(37, 11, 129)]


@pytest.mark.parametrize("B,C,D", SHAPES)
def test_flops_are_the_kernels(B, C, D):
    """The kernels do exactly 16 BCD GEMM flops (fwd 4: X [P;Q]^T; bwd 12: the recompute and the
    two gradient GEMMs); the benchmark's useful count is 12 BCD (issue 12)."""
    bcd = B * C * D
    assert wm.total_flops(B, C, D) == 16 * bcd
    assert bc.flops("line_margin", dict(B=B, C=C, D=D), "fwdbwd") == 12 * bcd
    fwd = sum(k["flops"] for k in wm.kernels(B, C, D) if k["pass_"] == "fwd")
    assert fwd == 4 * bcd == bc.flops("line_margin", dict(B=B, C=C, D=D), "fwd")
    # no read-modify-write of a global accumulator inside any loop
    assert wm.summary(B, C, D)["rmw_bytes"] == 0


def test_model_mirrors_the_kernels():
    """The model's chunk budget and tiles are the kernels' (kernels/line_margin.py)."""
    pytest.importorskip("torch")
    from daal_triton.kernels import line_margin as lm

    assert wm.CHUNK_ELEMENTS == lm.CHUNK_ELEMENTS
    for name, (bb, bc_) in wm.V2_TILES.items():
        cfg = lm.CONFIGS["half"][name]
        assert (cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"]) == (bb, bc_)
    for B, C, _D in SHAPES:
        assert lm.chunk_classes(B, C, *wm.V2_TILES["bwd2"], 1) == wm.chunk_width(B, C)


def test_million_classes_case_and_memory():
    """The 1M-class case is benchmarked (check profile): Triton's estimated extra memory is a few
    GB (O(C D + B Cc)), eager's and compile's are B x C (hundreds of GB: recorded as skipped for
    memory or out of memory)."""
    assert bc.SHAPES["line_margin"]["classes1m"] == dict(B=4096, C=1_000_000, D=512)
    cs = [c for c in bc.cases_for("line_margin", "check") if c.shape == "classes1m"]
    assert {c.provider for c in cs} == {"triton", "eager", "compile"}
    est = {c.provider: bc.estimate_bytes(c) for c in cs}
    assert est["triton"] < 8 * bc.GiB
    assert est["eager"] > 139 * bc.GiB and est["compile"] > 0.85 * 139 * bc.GiB * 0.5


def test_report_prints_the_model_beside_times():
    """The model's row beside Triton's time; a run's retired ``triton_v1`` times (the first
    design, removed after the 2026-11-30 H200 run) get no model row, and a shape only it measured
    none at all."""
    run = dict(name="r", env={"gpu": "H200", "profile": "check"}, cases={}, matmul=[], steps=[],
               junit=[], tuning=None)
    d = dict(B=1024, C=100000, D=512)
    for prov, t in (("triton", 0.004), ("triton_v1", 0.009)):
        run["cases"][("line_margin", "classes100k", "bf16", "fwdbwd", prov)] = dict(
            status="ok", median_s=t, dims=d)
    run["cases"][("line_margin", "classes11k", "bf16", "fwdbwd", "triton_v1")] = dict(
        status="ok", median_s=0.002, dims=dict(B=1024, C=11318, D=512))
    text = "\n".join(report.work_model_table(run))
    # the copy [p~, u~], written again chunk by chunk in the backward (+0.41 GB)
    assert "| classes100k | bf16 | 839 (16) | 3.98 | 0.00 | 4 ms | 210 |" in text
    run["env"]["switches"] = [["DAAL_LM_XU", "dot", "difference"]]  # a run before DAAL_LM_COPY
    assert "| classes100k | bf16 | 839 (16) | 3.57 | 0.00 | 4 ms | 210 |" in "\n".join(report.work_model_table(run))
    del run["env"]["switches"]
    run["env"]["date"] = "2026-12-04"  # before DAAL_LM_XU: the segments read as they are
    assert "| classes100k | bf16 | 839 (16) | 3.37 | 0.00 | 4 ms | 210 |" in "\n".join(report.work_model_table(run))
    assert "classes11k" not in text and text.count("| classes100k |") == 1
    assert "\n".join(wm.markdown(1024, 100000, 512)).count("**total**") == 1


def test_extra_memory_reproduces_the_first_run():
    """The memory estimate of the design the 2026-11-30 H200 run timed (the own-class segment
    rows by atomics into a float32 gradient, ``atomic=True``) is within 5% of that run's measured
    peaks at B = 1024, C = 100k, D = 512 (fwd+bwd: bf16 732 MB, fp32 629 MB); the class lists
    that replaced it write the bf16 gradient once, under half of that (an estimate until a run).
    Both read the segments as they were (``xu=False``, ``DAAL_LM_XU=difference``); the copy
    ``[p~, u~]`` of the default adds one class chunk's (Cc x 2 x D in x's dtype, with its 4 x Cc
    statistics: the backward copies chunk by chunk), the whole C x 2 x D with ``DAAL_LM_COPY=whole``; with one chunk
    (C <= Cc) the forward's copy is saved either way."""
    for dtype, measured in (("bf16", 732e6), ("fp32", 629e6)):
        est = wm.extra_bytes(1024, 100_000, 512, dtype, atomic=True, xu=False)
        assert abs(est - measured) <= 0.05 * measured, (dtype, est)
    assert wm.extra_bytes(1024, 100_000, 512, "bf16", xu=False) < 0.5 * 732e6
    for dtype, es in (("bf16", 2), ("fp32", 4)):
        plain = wm.extra_bytes(1024, 100_000, 512, dtype, xu=False)
        cc = wm.chunk_width(1024, 100_000)
        # one chunk's copy and its statistics (4 x Cc float32)
        assert cc < 100_000 and wm.extra_bytes(1024, 100_000, 512, dtype) - plain == 2 * cc * 512 * es + 16 * cc
        assert wm.extra_bytes(1024, 100_000, 512, dtype, copy="whole") - plain == 2 * 100_000 * 512 * es
        one = wm.chunk_width(1024, 1000)
        assert one >= 1000 and all(wm.extra_bytes(1024, 1000, 512, dtype, copy=c) - wm.extra_bytes(
            1024, 1000, 512, dtype, xu=False) == 2 * 1000 * 512 * es for c in ("chunks", "whole"))
    # float32 segments: the float32 gradient is the output either way (+ the own terms, 6 MB)
    fp32 = [wm.extra_bytes(1024, 100_000, 512, "fp32", atomic=a, xu=False) for a in (False, True)]
    assert 0 < fp32[0] - fp32[1] <= 12 * 1024 * 512 + 4 * (1024 + 100_000)


@pytest.mark.interpreter
@pytest.mark.parametrize("B,C,D,cc,copy,xu", [(256, 600, 32, 256, "chunks", "dot"),
                                             (256, 200, 32, 256, "chunks", "dot"),
                                             (128, 1000, 64, 128, "whole", "dot"),
                                             (96, 700, 48, 64, "chunks", "difference")],
                         ids=["chunks", "one-chunk", "whole", "difference"])
def test_extra_memory_is_what_the_kernels_allocate(monkeypatch, B, C, D, cc, copy, xu):
    """``extra_bytes`` against the storage the line margin's forward + backward really holds at
    its peak (float32, the GPU's backward tiles 128 x 32, a chunk budget of B x ``cc`` so that
    several chunks run; ``tests/daal_testing.peak_live_cpu_bytes``): within -2% / +6% for each
    copy policy and x.u design (measured 2026-12-06: +0.8% to +4.2%, the model counting the
    backward's accumulators alive together). The model had the row partials at half their size
    and left out a chunk's statistics until then."""
    import torch
    from daal_testing import peak_live_cpu_bytes
    from daal_triton.kernels import line_margin as lm

    monkeypatch.setenv(lm.COPY_ENV, copy)
    monkeypatch.setenv(lm.XU_ENV, xu)
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", B * cc)
    monkeypatch.setattr(wm, "CHUNK_ELEMENTS", B * cc)
    monkeypatch.setitem(lm.CONFIGS["interp"], "bwd2", lm.CONFIGS["interp"]["bwd2"].with_blocks(
        BLOCK_B=wm.V2_TILES["bwd2"][0], BLOCK_C=wm.V2_TILES["bwd2"][1]))
    g = torch.Generator().manual_seed(B + C)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).requires_grad_()
    seg = (0.3 * torch.randn(C, 2, D, generator=g)).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g)
    m = torch.full((B,), 0.2)
    assert lm._backward_chunk(x.detach(), C) == wm.chunk_width(B, C)
    peak = peak_live_cpu_bytes(lambda: lm.line_margin(x, y, seg, m, alpha=16.0, lambda_pull=0.1).sum().backward())
    est = wm.extra_bytes(B, C, D, "fp32", xu=xu == "dot", copy=copy)
    assert 0.98 * peak <= est <= 1.06 * peak, (est, peak, est / peak)


# ------------------------------------------------------------------ the kNN merge's rounds
def test_knn_merge_model_selects_what_the_kernel_selects(monkeypatch):
    """bench/knn_merge_model.py replays the forward's selection tile by tile: on exact integer
    distances (ties included) its slots are a stable sort's first KP in ``(s, j)`` order and the
    kernel's own (``_candidates``, same tiles, under the interpreter), and its counts follow the
    merges' rules. (On such dense ties the count is a loose bound: here the counted merge runs
    more row-mins than the checked one.)"""
    import torch

    import knn_merge_model as km
    from daal_triton.kernels import knn as kk

    g = torch.Generator().manual_seed(3)
    M, N, k, bn = 32, 300, 6, 32
    q = torch.randint(-2, 3, (M, 5), generator=g).float()
    r = torch.randint(-2, 3, (N, 5), generator=g).float()
    s = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)  # exact small integers
    res = km.merge_rounds(s, k, bn)
    order = torch.sort(s, dim=1, stable=True).indices[:, :8]
    assert torch.equal(res["index"], order)
    assert res["tiles"] == -(-N // bn)
    assert res["counted_blocks"] == res["tiles"]
    # the checked merge: at least one row-min per tile, and the first tile fills all 8 slots
    assert res["checked_mins"] >= res["tiles"] + 8
    assert res["checked_blocks"] == res["checked_mins"]
    # the counted one: at most KP rounds per tile, and exactly KP on the first
    assert 8 <= res["counted_mins"] <= 8 * res["tiles"]
    fam = kk.CONFIGS["fp32"]
    monkeypatch.setitem(fam, kk.CHECKED_ENTRY, fam[kk.CHECKED_ENTRY].with_blocks(BLOCK_M=32, BLOCK_N=bn))
    out_s, out_i = kk._candidates(q, r, k, None, None, False, 1)
    got = torch.sort(out_s[0] * 4096 + out_i[0].double() / 4096, dim=1).indices
    assert torch.equal(out_i[0].long().gather(1, got), res["index"])


def test_knn_merge_model_counts_fewer_reductions():
    """The counted merge needs fewer row-mins and block-wide reductions per tile than the
    checked one on a retrieval problem (the figures docs/kernels.md quotes come from the
    script's own command line at 20k and 60k rows)."""
    import knn_merge_model as km

    r = km.retrieval(20000, 8, D=64, blocks=1)
    assert r["counted_blocks"] == 1.0
    assert r["counted_mins"] < r["checked_mins"]
    assert 1.0 < r["checked_blocks"] < 8.0


def test_knn_merge_model_compares_tile_shapes(capsys):
    """The script's command line takes the tile shape (``--block-m``, ``--block-n``) into the
    replay and its table: wider tiles see more candidates per tile, so at least as many rounds
    per tile as 128 x 128 on the same data (docs/kernels.md, "Wider tiles", quotes it)."""
    import knn_merge_model as km

    km.main(["--n", "3000", "--blocks", "1", "--block-m", "128", "--block-n", "256"])
    assert "| 3,000 | 8 | 128 x 256 | uniform |" in capsys.readouterr().out
    base = km.retrieval(3000, 8, D=64, blocks=2)
    wide = km.retrieval(3000, 8, D=64, blocks=2, block_n=256)
    assert wide["block_n"] == 256 and wide["counted_mins"] >= base["counted_mins"]


# ------------------------------------------------------------------ the threshold filter's rounds
def test_knn_threshold_model_counts_what_the_filter_lists(monkeypatch):
    """bench/knn_threshold_model.py replays the threshold filter's lists: each row's count is
    the kernel's (``DAAL_KNN_SELECT=half`` under the interpreter: a 1/4 sample, 455 float16 unit
    rows, k = 8), and its rounds per tile follow from them: the half filter's tiles take at least
    one rows' round, and on random rows no more columns' rounds than rows' and one (the figures
    docs/kernels.md quotes come from its command line at 60k rows)."""
    import torch

    import knn_threshold_model as km
    from daal_testing import spy_launches
    from daal_triton.kernels import knn as kk, knn_threshold as kt

    monkeypatch.setattr(kt, "STRIDE", 4)
    monkeypatch.setattr(kt, "MIN_SAMPLE", 8)
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(455, 32, generator=g), dim=1).half()
    seen = spy_launches(monkeypatch, kt, ["_knn_select_kernel"], record=lambda name, args, kw: args[0].clone())
    monkeypatch.setenv(kk.SELECT_ENV, "half")
    kk.knn(x, x, 8, exclude_self=True)
    r = km.listing_rounds(x.float(), 8, 4)
    assert torch.equal(seen[0].long(), r["counts"])
    assert 28 <= r["entries_per_row"] <= 36  # about k * STRIDE
    assert 1.0 <= r["rows_half"] <= r["rows_all"] + 1 and 0.0 < r["columns_half"] <= r["rows_half"] + 1
