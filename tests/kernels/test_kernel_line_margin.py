"""The fused line margin (kernels/line_margin.py) against the float64 reference.

Values and all three gradients (dX, dP, dQ) under Triton's interpreter on the CPU (IEEE fp32
dots, tolerance 1e-5; float16 2e-2), the no-B x C-saved-tensor guarantee, compilation of every
GPU configuration for sm_80 / sm_90, and the sm_90 K-loops' pipelining (PTX). GPU parity (TF32,
bfloat16) is marked ``gpu``. The tests of the class chunks, memory, determinism and grids are in
test_kernel_line_margin_v2.py.
"""
import os

import pytest
import torch
import triton
import triton.language as tl

from daal_testing import (DEV, assert_floors_keep_nan, compile_launches, random_problem, rel_err,
                           require_recorded_compiler_facts, tolerance)

from daal_triton import reference
from daal_triton.kernels import line_margin as lm
from daal_triton.kernels._common import POINTER, KernelConfig, KernelSpec, Launch, triton_release

ALPHA = 16.0
# Under the interpreter (no GPU) everything runs on the CPU with IEEE dots; on a GPU machine the
# same tests run on CUDA tensors, where float32 dots are TF32.
TF32 = DEV == "cuda"


def make_case(B, C, D, *, zero_len=False, on_own=False, absent=False, dup=False, zero=False,
              device=DEV):
    """Normalised x, labels, segments, margins, grad_out, all float64."""
    present = list(range(0, C, 2)) if absent and C > 1 else None
    z, y, seg = random_problem(B, C, D, classes_present=present)
    x = torch.nn.functional.normalize(z, dim=1)
    if D == 1:
        # x = +-1, and random_problem's segments around +-1 would contain most x: for points on a
        # *negative* segment the GEMM form's e^2 is rounding noise (even the float32 reference is off
        # by ~2e-4 there; see test_point_on_a_negative_segment_is_finite). Keep them inside (-0.8, 0.8).
        seg = 0.8 * torch.tanh(seg)
    if zero_len:  # every third class (and class 0) is a point: q = p
        seg[::3, 1] = seg[::3, 0]
    if on_own:  # every other sample sits exactly on its own segment (t in (0, 1), or the point)
        idx = torch.arange(0, B, 2)
        t = torch.rand(len(idx), 1, dtype=torch.float64)
        p, q = seg[y[idx], 0], seg[y[idx], 1]
        x[idx] = p + t * (q - p)
    if dup and B > 2:  # duplicate embeddings (same label too, for half of them)
        x[1::3] = x[0::3][: len(x[1::3])]
        y[1::6] = y[0::6][: len(y[1::6])]
    if zero:  # zero embeddings (what normalize=True makes of a zero z)
        x[2::4] = 0.0
    m = 0.05 + 0.45 * torch.rand(B, dtype=torch.float64)
    go = torch.randn(B, dtype=torch.float64)
    to = dict(device=device)
    return x.to(**to), y.to(**to), seg.to(**to), m.to(**to), go.to(**to)


def reference_grads(x, y, seg, m, go, lambda_pull):
    xr = x.double().clone().requires_grad_()
    sr = seg.double().clone().requires_grad_()
    out = reference.line_margin(xr, y, sr, m.double(), alpha=ALPHA, lambda_pull=lambda_pull)
    out.backward(go.double())
    return out.detach(), xr.grad, sr.grad


def kernel_grads(x, y, seg, m, go, lambda_pull):
    xk = x.clone().requires_grad_()
    sk = seg.clone().requires_grad_()
    out = lm.line_margin(xk, y, sk, m, alpha=ALPHA, lambda_pull=lambda_pull)
    out.backward(go.to(out.dtype))
    return out.detach(), xk.grad, sk.grad


def check_parity(x, y, seg, m, go, lambda_pull, tol, x_dtype, seg_dtype):
    xk, sk = x.to(x_dtype), seg.to(seg_dtype)
    # the reference sees exactly the (rounded) inputs the kernel sees
    ref, gx_ref, gs_ref = reference_grads(xk, y, sk, m, go, lambda_pull)
    out, gx, gs = kernel_grads(xk, y, sk, m.float(), go.float(), lambda_pull)
    expect = torch.promote_types(torch.float32, torch.promote_types(x_dtype, seg_dtype))
    assert out.dtype == expect and gx.dtype == x_dtype and gs.dtype == seg_dtype
    assert out.shape == ref.shape
    errs = {
        "value": rel_err(out, ref),
        "dX": rel_err(gx, gx_ref),
        "dP": rel_err(gs[:, 0], gs_ref[:, 0]),
        "dQ": rel_err(gs[:, 1], gs_ref[:, 1]),
    }
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"relative errors over {tol:.0e}: {errs}"


# (B, C, D, lambda_pull, special): odd shapes, every edge case at least once, fast under the interpreter
CASES = [
    (1, 1, 1, 0.0, ""),  # B = 1, C = 1 (the line term is exactly 0), D = 1
    (37, 1, 3, 0.5, ""),  # C = 1 with a pull term
    (37, 2, 129, 0.0, "on_own"),
    (1, 300, 129, 0.3, "zero_len"),
    (37, 11, 3, 0.5, "zero_len,on_own,absent"),
    # D = 1: x = +-1 and every segment on one side of it makes the line term's dX vanish
    # analytically (translation invariance), so a pull term keeps dX meaningful
    (130, 300, 1, 0.5, "absent"),
    (130, 300, 129, 0.7, "zero_len,on_own"),  # several row, class and D tiles
    (37, 11, 129, 0.4, "dup,zero"),  # duplicate and zero embeddings
]


def _ids(case):
    B, C, D, lp, sp = case
    return f"B{B}-C{C}-D{D}-pull{lp}" + (f"-{sp.replace(',', '+')}" if sp else "")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_parity_float32(case):
    B, C, D, lp, sp = case
    x, y, seg, m, go = make_case(B, C, D, zero_len="zero_len" in sp, on_own="on_own" in sp,
                                 absent="absent" in sp, dup="dup" in sp, zero="zero" in sp)
    check_parity(x, y, seg, m, go, lp, tolerance(torch.float32, tf32=TF32), torch.float32, torch.float32)


@pytest.mark.parametrize("seg_dtype", [torch.float16, torch.float32], ids=["seg_fp16", "seg_fp32"])
@pytest.mark.parametrize("case", [(37, 11, 129, 0.5, "zero_len,on_own"), (130, 300, 33, 0.0, "absent"),
                                  (37, 7, 3, 0.2, "zero_len")],
                         ids=["B37-C11-D129", "B130-C300-D33", "B37-C7-D3"])
def test_parity_float16(case, seg_dtype):
    B, C, D, lp, sp = case
    x, y, seg, m, go = make_case(B, C, D, zero_len="zero_len" in sp, on_own="on_own" in sp,
                                 absent="absent" in sp)
    check_parity(x, y, seg, m, go, lp, tolerance(torch.float16), torch.float16, seg_dtype)


def test_point_on_a_negative_segment_is_finite():
    """x_i exactly on another class's segment: the GEMM form's e^2 there is rounding noise around
    0 (the reference's too); values and gradients must stay finite and close: 1e-3 with the
    interpreter's IEEE dots (measured 1.6e-4 at most), the half tolerance with a GPU's."""
    B, C, D = 16, 5, 8
    x, y, seg, m, go = make_case(B, C, D, zero_len=True)
    y = torch.zeros(B, dtype=torch.long, device=DEV)
    for i in range(B):  # sample i sits on segment 1 + i % 4 (a negative: every label is 0)
        c = 1 + i % 4
        x[i] = seg[c, 0] + (i / B) * (seg[c, 1] - seg[c, 0])
    ref, gx_ref, gs_ref = reference_grads(x, y, seg, m, go, 0.2)
    out, gx, gs = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    for got in (out, gx, gs):
        assert torch.isfinite(got).all()
    tol = 1e-3 if DEV == "cpu" else tolerance(torch.float16)
    assert rel_err(out, ref) <= tol
    assert rel_err(gx, gx_ref) <= tol
    assert rel_err(gs, gs_ref) <= tol


def test_float64_is_refused():
    """float64 is routed to the reference by daal_triton.backend, never lowered by a kernel."""
    x, y, seg, m, go = make_case(5, 3, 4)
    with pytest.raises(ValueError, match="float64 inputs run on the reference backend"):
        lm.line_margin(x, y, seg, m, alpha=ALPHA, lambda_pull=0.1)
    with pytest.raises(ValueError, match="float64 inputs run on the reference backend"):
        lm.line_margin(x.float(), y, seg, m.float(), alpha=ALPHA, lambda_pull=0.1)


def test_rejects_bad_dtype_and_shape():
    x, y, seg, m, _ = make_case(4, 3, 5)
    with pytest.raises(ValueError, match="x and segments"):
        lm.line_margin(x.float().int(), y, seg.float(), m.float(), alpha=ALPHA, lambda_pull=0.0)
    with pytest.raises(ValueError, match="segments"):
        lm.line_margin(x.float(), y, seg.float()[:, :, :4], m.float(), alpha=ALPHA, lambda_pull=0.0)


def test_saved_tensors_are_never_b_by_c():
    """Everything autograd keeps for backward is O(B D + C D + B + C), never B x C."""
    B, C, D = 16, 4096, 4
    x, y, seg, m, _ = make_case(B, C, D)
    xk = x.float().requires_grad_()
    sk = seg.float().requires_grad_()
    sizes = []

    def pack(t):
        sizes.append((tuple(t.shape), t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm.line_margin(xk, y, sk, m.float(), alpha=ALPHA, lambda_pull=0.5)
    assert sizes, "nothing was saved: the hook saw no tensors"
    assert max(n for _, n in sizes) < B * C, f"a saved tensor has >= B*C = {B * C} elements: {sizes}"


# ----------------------------------------------------------------------------- compilation
# The GPU configurations (lm.launches(): the "interp" family is only chosen under
# TRITON_INTERPRET=1) compile for sm_80 and sm_90 in fresh processes
# (daal_testing.compile_launches), each both "generic" and "aligned" (the specialisation of a
# contiguous D = 512 launch: daal_testing.specialise), with float32 segments (the DAALLoss
# parameters' dtype).
GEMM_KERNELS = ("fwd2", "bwd2")
# the O(B D) kernels around the GEMMs, and the O(C D) epilogues (prep2 once, dseg2 per chunk),
# and the two launches that merge them (DAAL_LAUNCHES=merged)
ROW_KERNELS = ("own2", "lse2", "finish2", "ownseg2", "prep2", "dseg2", "ownprep2", "dsegfin2")
#: The sm_90 stack (bytes) of the row and epilogue kernels' listed D = 512 builds, by Triton
#: release, held exact: 3.6 (the GPU image's) keeps 8 B in the bfloat16 ``ownprep2`` (one pass over
#: the batch's own-class rows per call, no loop over classes; the launches the loss and the
#: benchmarks make keep none: tests/kernels/test_kernel_launched_builds.py; found by a run of the
#: suite under torch 2.11 and Triton 3.6 on 2026-12-06), 3.8 none.
ROW_STACKS = {"3.6": {"line_margin_ownprep2-bf16-bd64-sm90-aligned": 8}, "3.8": {}}


@pytest.fixture(scope="module")
def compiled():
    return compile_launches(lm.launches())


def _what(case):
    launch, cap, spec = case
    return f"{launch.name}-sm{cap}-{spec}"


@pytest.mark.build
def test_every_config_compiles(compiled):
    """Compiles; the GEMM kernels use tensor cores (half and TF32 alike: mma.sync on sm_80,
    wgmma on sm_90) and fit the shared memory of an A100 / H100-H200."""
    assert compiled
    report = []
    for case, res in compiled:
        what, name, cap = _what(case), case[0].entry, case[1]
        assert not res.get("error"), f"{what}:\n{res.get('error')}"
        ptx = res["ptx"]
        assert ".entry" in ptx, what
        if name in GEMM_KERNELS:
            want = "wgmma.mma_async" if cap == 90 else "mma.sync"
            assert want in ptx, f"{what}: no {want} in the PTX"
            limit = 227 * 1024 if cap == 90 else 163 * 1024
            assert res["metadata"]["shared"] <= limit, f"{what}: {res['metadata']['shared']} B shared"
        report.append(f"{what}: shared={res['metadata']['shared']} registers={res.get('registers')} "
                      f"stack={res.get('stack')}")
    print("\n".join(report))


@pytest.mark.build
def test_floors_keep_nan(compiled):
    """``delta = sqrt(max(e2, eps))`` in the forward, the backward and the own-class kernels keeps
    NaN, and so does ``1 / max(|u|^2, eps)``."""
    assert_floors_keep_nan(compiled, ("fwd2", "bwd2", "own2", "ownprep2", "prep2", "ownseg2"))


@pytest.mark.build
def test_hot_path_does_not_spill(compiled):
    """On sm_90, the GEMM kernels as a contiguous D = 512 launch specialises them keep everything
    in registers: no local memory (cuobjdump's STACK is 0). Spilling inside the class loop costs
    local-memory traffic on every tile; the block sizes in lm.CONFIGS were chosen for this."""
    require_recorded_compiler_facts()
    hot = [(c, r) for c, r in compiled if c[1] == 90 and c[2] == "aligned" and c[0].entry in GEMM_KERNELS]
    assert {c[0].family for c, _ in hot} == {"fp32", "half"}
    assert {c[0].entry for c, _ in hot} == set(GEMM_KERNELS)
    if any("stack" not in r for _, r in hot):
        pytest.fail("cuobjdump is missing from triton/backends/nvidia/bin: cannot read the "
                    "register report")
    spills = {_what(c): r["stack"] for c, r in hot if r["stack"]}
    assert not spills, f"local memory (bytes per thread) on the hot path: {spills}"
    rows = {_what(c): r.get("stack") for c, r in compiled
            if c[1] == 90 and c[2] == "aligned" and c[0].entry in ROW_KERNELS}
    assert {w.split("-")[0] for w in rows} == {f"line_margin_{e}" for e in ROW_KERNELS}
    stacks = {w: st for w, st in rows.items() if st != 0}
    assert stacks == ROW_STACKS[triton_release()], f"row and epilogue kernels' stack: {stacks}"


def test_config_table_covers_every_launch():
    names = {la.name for la in lm.launches()}
    for interpret in (False, True):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            fam = lm.config_family(dtype, interpret=interpret)
            assert set(lm.CONFIGS[fam]) == set(lm.KERNELS)
            for D in (1, 3, 16, 17, 33, 129, 512, 4096):
                for entry, cfg in lm.CONFIGS[fam].items():
                    if cfg.block_d is None:  # a kernel without a D loop
                        assert cfg.block_d_choices() == [None]
                        if not interpret:
                            assert f"line_margin_{entry}-{POINTER[dtype][1:]}" in names
                        continue
                    bd = cfg.block_d_for(D)
                    assert bd in cfg.block_d_choices()
                    if not interpret:
                        assert f"line_margin_{entry}-{POINTER[dtype][1:]}-bd{bd}" in names


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("x_dtype,seg_dtype,tol", [
    (torch.float32, torch.float32, tolerance(torch.float32, tf32=True)),
    (torch.float16, torch.float32, tolerance(torch.float16)),
    (torch.bfloat16, torch.float32, tolerance(torch.bfloat16)),
    (torch.bfloat16, torch.bfloat16, tolerance(torch.bfloat16)),
], ids=["fp32-tf32", "fp16-segfp32", "bf16-segfp32", "bf16-segbf16"])
@pytest.mark.parametrize("case", [(1, 1, 1, 0.0, ""), (130, 300, 129, 0.5, "zero_len,on_own,absent"),
                                  (1024, 5000, 512, 0.2, "zero_len")],
                         ids=["tiny", "odd", "large"])
def test_parity_gpu(case, x_dtype, seg_dtype, tol):
    B, C, D, lp, sp = case
    x, y, seg, m, go = make_case(B, C, D, zero_len="zero_len" in sp, on_own="on_own" in sp,
                                 absent="absent" in sp, device="cuda")
    check_parity(x, y, seg, m, go, lp, tol, x_dtype, seg_dtype)


# ----------------------------------------------------------------------------- PTX: the pipeline
def k_loops(ptx: str):
    """The bodies (lists of instruction lines) of the innermost loops of ``ptx`` that issue
    ``wgmma.mma_async``: from a label to the branch back to it."""
    import re

    lines = [ln.strip() for ln in ptx.splitlines()]
    labels = {m.group(1): i for i, ln in enumerate(lines)
              for m in [re.match(r"^(\$L__BB\d+_\d+):", ln)] if m}
    bodies = []
    for j, ln in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < j:
            body = lines[labels[m.group(1)]:j + 1]
            if any("wgmma.mma_async" in b for b in body):
                bodies.append(body)
    # innermost: no other such body nested inside
    return [b for b in bodies if not any(o is not b and len(o) < len(b) and o[0] in b for o in bodies)]


def pipeline_facts(ptx: str) -> dict:
    """What the sm_90 K-loop does between loads and tensor-core work (see the test below)."""
    import re

    loops = k_loops(ptx)
    facts = {"loops": len(loops)}
    if not loops:
        return facts
    body = loops[0]
    waits_mma = [int(m.group(1)) for b in body for m in [re.search(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", b)] if m]
    waits_load = [int(m.group(1)) for b in body for m in [re.search(r"cp\.async\.wait_group\s+(\d+)", b)] if m]
    last_commit = max(i for i, b in enumerate(body) if b.startswith("wgmma.commit_group"))
    first_mma_wait = next((i for i, b in enumerate(body) if i > last_commit and b.startswith("wgmma.wait_group")), None)
    loads_after_mma = [i for i, b in enumerate(body) if b.startswith("cp.async.cg") or b.startswith("cp.async.ca")
                       if i > last_commit]
    facts.update(mma_waits=waits_mma, load_waits=waits_load,
                 loads_in_loop=sum(b.startswith(("cp.async.cg", "cp.async.ca", "cp.async.bulk")) for b in body),
                 prefetch_while_mma_in_flight=bool(loads_after_mma) and (
                     first_mma_wait is None or min(loads_after_mma) > first_mma_wait and min(waits_mma) >= 1),
                 prologue_stages=ptx.count("cp.async.commit_group") - sum(b.startswith("cp.async.commit_group") for b in body))
    return facts


def pipeline_failures(facts: dict, num_stages: int) -> list:
    """Which conditions of a pipelined K-loop (``test_hot_loop_is_pipelined``) ``facts``
    (:func:`pipeline_facts`) fails; empty when it is pipelined."""
    f = facts
    checks = {
        "a wgmma K-loop": f["loops"] >= 1,
        "the load wait leaves later stages in flight": bool(f.get("load_waits")) and min(f["load_waits"]) >= 1,
        "no wait for the MMA just issued": bool(f.get("mma_waits")) and min(f["mma_waits"]) >= 1,
        "loads issued while the MMA runs": f.get("loads_in_loop", 0) > 0 and bool(f.get("prefetch_while_mma_in_flight")),
        "num_stages - 1 stages requested before the loop": f.get("prologue_stages", 0) >= num_stages - 1,
    }
    return [what for what, ok in checks.items() if not ok]


@pytest.mark.build
@pytest.mark.parametrize("entry", ["fwd2", "bwd2"])
def test_hot_loop_is_pipelined(compiled, entry):
    """The GEMM K-loops (fwd2, bwd2), as a contiguous D = 512 bfloat16/float16 launch builds them
    for sm_90, overlap loads with tensor-core work. In the loop body: the wait for loaded tiles
    leaves later stages in flight (``cp.async.wait_group N``, N >= 1), no ``wgmma.wait_group``
    waits for the MMA just issued (every N >= 1: step k's MMA is waited on only in step k + 1), and
    the loads of a later step (16-byte ``cp.async``) are issued in the loop while step k's MMA
    runs; before the loop, num_stages - 1 stages are already requested. So the loads of step k + 1
    are always issued before step k's MMA is waited on (:func:`pipeline_failures`)."""
    hot = [(c, r) for c, r in compiled if c[0].entry == entry and c[1] == 90 and c[2] == "aligned"
           and c[0].family == "half"]
    assert hot
    for case, res in hot:
        assert not res.get("error"), res.get("error")
        f = pipeline_facts(res["ptx"])
        assert not pipeline_failures(f, case[0].num_stages), f"{_what(case)}: {f}"


@triton.jit
def _serialised_kloop_kernel(x_ptr, seg_ptr, out_ptr, B, C, D, stride_x_b, stride_seg_c, stride_seg_v,
                             BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """A deliberately serialised K-loop, the negative control of ``test_pipeline_check_can_tell``:
    ``x.p`` and ``x.u`` of a row tile and a class tile (x in its dtype, float32 segments), with
    ``u = q - p`` formed in float32 and both cast to x's dtype between the loads and the MMAs (what
    the line margin's first design did, before the 2026-11-30 H200 run retired it); stores
    ``x.p + x.u``."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cls = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < B
    cmask = cls < C
    xrow = x_ptr + rows.to(tl.int64)[:, None] * stride_x_b
    crow = seg_ptr + cls.to(tl.int64)[:, None] * stride_seg_c
    xp = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    xu = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        xt = tl.load(xrow + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        cm = cmask[:, None] & dmask[None, :]
        p = tl.load(crow + offs_d[None, :], mask=cm, other=0.0).to(tl.float32)
        q = tl.load(crow + stride_seg_v + offs_d[None, :], mask=cm, other=0.0).to(tl.float32)
        u = q - p
        xp = tl.dot(xt, tl.trans(p.to(xt.dtype)), xp)
        xu = tl.dot(xt, tl.trans(u.to(xt.dtype)), xu)
    out = out_ptr + rows.to(tl.int64)[:, None] * C + cls[None, :]
    tl.store(out, xp + xu, mask=rmask[:, None] & cmask[None, :])


@pytest.mark.build
def test_pipeline_check_can_tell():
    """The PTX reading above rejects a serialised loop: ``_serialised_kloop_kernel``, built like
    the half ``fwd2`` was until 2026-12-05 (bfloat16, 128 x 128 x 64, 8 warps, 3 stages, sm_90, aligned), has a wgmma
    K-loop, and ``pipeline_failures`` finds it not pipelined."""
    from daal_testing import compile_many_for_gpu, gpu_job

    spec = KernelSpec(_serialised_kloop_kernel, "x_ptr: *x; seg_ptr: *seg; out_ptr: *fp32; B C D: i32; "
                      "stride_x_b stride_seg_c stride_seg_v: i32",
                      rows=("stride_x_b", "stride_seg_c", "stride_seg_v"))
    cfg = KernelConfig({"BLOCK_B": 128, "BLOCK_C": 128}, num_warps=8, num_stages=3, block_d=(64, 64))
    la = Launch("test", "half", "serialised", spec, torch.bfloat16, cfg, 64, {})
    job = dict(gpu_job(la, capability=90, specialisation="aligned"), path=os.path.dirname(__file__))
    res = compile_many_for_gpu([job], workers=1)[0]
    assert not res.get("error"), res.get("error")
    f = pipeline_facts(res["ptx"])
    fails = pipeline_failures(f, cfg.num_stages)
    assert f["loops"] >= 1 and "a wgmma K-loop" not in fails, f
    assert fails, f
