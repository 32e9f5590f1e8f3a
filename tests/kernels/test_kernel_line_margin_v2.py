"""The line margin's class chunks (kernels/line_margin.py; docs/kernels.md "Fused line
margin"): the class-chunked backward against the float64 reference across several chunks, its
determinism, the memory bound O(B Cc + (B + C) D) of forward + backward with C >= 20 Cc, gradients
through ``DAALLoss`` for both reductions, the custom operators' registrations (``opcheck``), and
the grids (whole waves of the device's SMs). The PTX pipelining and spill tests are in
test_kernel_line_margin.py (they share its compiled configurations)."""
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
import triton
import triton.language as tl

import daal_triton as dt
from daal_testing import assert_close, largest_cpu_allocation, random_problem, rel_err, spy_launches, tolerance
from test_kernel_line_margin import ALPHA, DEV, TF32, check_parity, kernel_grads, make_case, reference_grads

from daal_triton.kernels import _common, line_margin as lm
from daal_triton.launch_count import LaunchCount


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 128 classes (the interpreter's BLOCK_C) for any B up to 128."""
    def set_chunk(B):
        monkeypatch.setattr(lm, "CHUNK_ELEMENTS", B * 128)
    return set_chunk


@pytest.mark.parametrize("x_dtype,seg_dtype", [(torch.float32, torch.float32),
                                               (torch.float16, torch.float16),
                                               (torch.float16, torch.float32)],
                         ids=["fp32", "fp16-seg16", "fp16-seg32"])
def test_parity_across_chunks(small_chunks, x_dtype, seg_dtype):
    """C = 300 in three chunks (128, 128, 44 classes: a partial last chunk and a partial class
    tile), odd B and D, zero-length segments and points on their own segment."""
    B, C, D = 37, 300, 33
    small_chunks(B)
    assert lm.chunk_classes(B, C, 128, 128, 1) == 128
    x, y, seg, m, go = make_case(B, C, D, zero_len=True, on_own=True, absent=True)
    tol = tolerance(x_dtype, tf32=TF32) if x_dtype == torch.float32 else tolerance(torch.float16)
    check_parity(x, y, seg, m, go, 0.3, tol, x_dtype, seg_dtype)


def test_backward_is_deterministic(small_chunks):
    """No atomics (the own-class rows go through the class lists): two backward passes give the
    same bits (several chunks and row tiles)."""
    B, C, D = 130, 300, 17
    small_chunks(B)
    x, y, seg, m, go = make_case(B, C, D, zero_len=True)
    a = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    b = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("seg_dtype", [torch.float32, torch.float16], ids=["seg32", "seg16"])
def test_own_rows_summed_by_class_lists(small_chunks, monkeypatch, seg_dtype):
    """The own-class rows of dP, dQ reach their class through the lists of ``_lm2_ownseg_kernel``
    whatever the uninitialised slot map held: here it is filled with in-range rows of other
    classes, negative and out-of-range values (only present classes overwrite theirs). Many
    samples per class (B = 130 over 9 of C = 300 classes, in three chunks), and the same
    gradients as the atomic design (``DAAL_LM_OWN_SEG=atomic``) and the float64 reference."""
    B, C, D = 130, 300, 33
    small_chunks(B)
    monkeypatch.delenv(lm.OWN_SEG_ENV, raising=False)  # the default: the class lists
    z, y, seg = random_problem(B, C, D, classes_present=[0, 1, 5, 127, 128, 200, 255, 256, 299])
    x = torch.nn.functional.normalize(z, dim=1)
    m = 0.05 + 0.45 * torch.rand(B, dtype=torch.float64)
    go = torch.randn(B, dtype=torch.float64)
    x, y, seg, m, go = (t.to(DEV) for t in (x, y, seg, m, go))
    seen = []

    def garbage_slots(n, device):
        g = torch.randint(-B, 2 * B, (n,), dtype=torch.int32)
        g[::7] = torch.iinfo(torch.int32).max
        g[1::7] = torch.iinfo(torch.int32).min
        seen.append(n)
        return g.to(device)

    monkeypatch.setattr(lm, "_slot_map", garbage_slots)
    check_parity(x, y, seg, m, go, 0.3, tolerance(torch.float32, tf32=TF32) if seg_dtype == torch.float32
                 else tolerance(torch.float16), torch.float32, seg_dtype)
    assert seen == [C]
    lists = kernel_grads(x.float(), y, seg.to(seg_dtype), m.float(), go.float(), 0.3)
    monkeypatch.setenv(lm.OWN_SEG_ENV, "atomic")
    atomic = kernel_grads(x.float(), y, seg.to(seg_dtype), m.float(), go.float(), 0.3)
    assert seen == [C, C]  # the atomic design has no slot map
    tol = 1e-6 if seg_dtype == torch.float32 else 1e-3  # one rounding to float16 either way
    for a, b in zip(lists, atomic):
        assert a.dtype == b.dtype and rel_err(a, b) <= tol


def test_own_seg_switch(monkeypatch):
    """``DAAL_LM_OWN_SEG``: "lists" by default, "atomic" selectable, read when the forward runs
    (the backward follows it, as the benchmarks' provider needs); under deterministic algorithms
    the lists run whatever it says; anything else is a ValueError naming the variable."""
    monkeypatch.delenv(lm.OWN_SEG_ENV, raising=False)
    assert lm.own_seg_policy() == "lists"
    x, y, seg, m, go = make_case(37, 11, 20)
    slots = []
    real = lm._slot_map
    monkeypatch.setattr(lm, "_slot_map", lambda n, dev: slots.append(n) or real(n, dev))
    sk = seg.float().requires_grad_()
    monkeypatch.setenv(lm.OWN_SEG_ENV, "atomic")
    assert lm.own_seg_policy() == "atomic"
    out = lm.line_margin(x.float(), y, sk, m.float(), alpha=ALPHA, lambda_pull=0.2)
    monkeypatch.delenv(lm.OWN_SEG_ENV)
    out.backward(go.float())
    assert slots == []  # the atomic design ran
    monkeypatch.setenv(lm.OWN_SEG_ENV, "atomic")
    out = lm.line_margin(x.float(), y, sk, m.float(), alpha=ALPHA, lambda_pull=0.2)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    out.backward(go.float())
    assert slots == [11]  # the lists ran
    monkeypatch.setenv(lm.OWN_SEG_ENV, "atomics")
    with pytest.raises(ValueError, match="DAAL_LM_OWN_SEG"):
        lm.line_margin(x.float(), y, sk, m.float(), alpha=ALPHA, lambda_pull=0.2)


def test_strided_segments(monkeypatch):
    """Non-contiguous segments with unit feature stride (a slice of a wider leaf) take the copy
    path of ``_cast_segments``; their gradient lands in the slice's places of the leaf."""
    x, y, seg, m, go = make_case(37, 11, 20)
    wide = torch.zeros(11, 2, 40, dtype=torch.float32, device=seg.device)
    wide[:, :, 5:25] = seg
    wide.requires_grad_()
    view = wide[:, :, 5:25]
    seen = []
    cast_segments = lm._cast_segments
    monkeypatch.setattr(lm, "_cast_segments", lambda s, dt, xu: seen.append(s.stride()) or cast_segments(s, dt, xu))
    xk = x.float().clone().requires_grad_()
    out = lm.line_margin(xk, y, view, m.float(), alpha=ALPHA, lambda_pull=0.2)
    out.backward(go.float())
    assert seen == [(80, 40, 1)]  # the slice itself reached the launcher: no copy before it
    ref = kernel_grads(x.float(), y, seg.float().contiguous(), m.float(), go.float(), 0.2)
    for a, b in zip((out.detach(), xk.grad, wide.grad[:, :, 5:25]), ref):
        assert rel_err(a, b) <= 1e-6
    assert not wide.grad[:, :, :5].any() and not wide.grad[:, :, 25:].any()


def test_strided_embeddings_labels_margins_and_upstream_gradient():
    """Column-major embeddings (``x = xT.t()``, column stride B), labels and margins that are
    every other element of longer tensors, and an upstream gradient that is a strided view (the
    output goes through ``torch.stack``): value and both gradients match the float64 reference.
    The kernels read x, labels, margins and grad_out with unit element strides, so the launchers
    must make them so."""
    B, C, D = 37, 11, 33
    x, y, seg, m, go = make_case(B, C, D, on_own=True)
    ref, gx_ref, gs_ref = reference_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.3)
    xk = x.float().t().contiguous().t().requires_grad_()  # B x D, strides (1, B)
    assert xk.stride() == (1, B)
    y2 = torch.stack([y, torch.randint(0, C, (B,), device=y.device)], 1).reshape(-1)[::2]
    m2 = torch.stack([m.float(), torch.rand(B, device=m.device)], 1).reshape(-1)[::2]
    assert torch.equal(y2, y) and torch.equal(m2, m.float()) and y2.stride() == m2.stride() == (2,)
    sk = seg.float().requires_grad_()
    out = lm.line_margin(xk, y2, sk, m2, alpha=ALPHA, lambda_pull=0.3)
    both = torch.stack([out, torch.zeros_like(out)], 1)  # d both / d out: a column of G, stride 2
    G = torch.stack([go.float(), torch.randn(B, device=go.device)], 1)
    (both * G).sum().backward()
    tol = tolerance(torch.float32, tf32=TF32)
    assert rel_err(out.detach(), ref) <= tol
    assert rel_err(xk.grad, gx_ref) <= tol
    assert rel_err(sk.grad, gs_ref) <= tol


def _forward_backward(x, y, seg, m, go):
    """A closure running the line margin forward + backward on leaves ``x``, ``seg``."""
    xk = x.requires_grad_()
    sk = seg.requires_grad_()

    def run():
        out = lm.line_margin(xk, y, sk, m.float(), alpha=ALPHA, lambda_pull=0.2)
        out.backward(go.float())
    return run


def test_memory_is_o_b_cc_plus_b_c_d(small_chunks):
    """Forward + backward never allocate more than O(B Cc + (B + C) D): with C = 3000 >= 20 Cc
    (Cc = 128) and D = 4, B C is 8x the segments' C x 2 x D and 23x B Cc; the largest tensor
    is the segment gradient (C x 2 x D), not anything B x C. (On a GPU the profiler cannot see
    CUDA allocations: there the peak's growth with C is measured instead.)"""
    B, C, D = 64, 3000, 4
    small_chunks(B)
    if DEV == "cuda":
        small_chunks(128)
        _peak_growth_is_o_c_d(128, C, D)
        return
    cc = lm.chunk_classes(B, C, 128, 128, 1)
    assert C >= 20 * cc
    x, y, seg, m, go = make_case(B, C, D)
    run = _forward_backward(x.float(), y, seg.float(), m, go)
    largest = largest_cpu_allocation(run)
    bound = 4 * max(2 * B * cc, 2 * C * D, B * D, 4 * C)  # float32 elements of each term
    assert largest <= bound, (largest, bound)
    assert largest * 4 <= 4 * B * C  # far from anything B x C
    # and the test can tell: a B x C tensor would be seen
    big = largest_cpu_allocation(lambda: torch.empty(B, C).fill_(0))
    assert big >= 4 * B * C


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "separate"])
def test_backward_holds_one_chunks_gemm_results_at_a_time(small_chunks, monkeypatch, merged):
    """The class-chunked backward's two GEMMs per chunk (``mm_f32``: the B x D partial and the
    2n x D ``G``) leave nothing alive into the next chunk but the accumulator (the first chunk's
    partial, summed into): when a GEMM starts, no earlier chunk's ``G`` is still referenced (it
    was, through the next chunk's GEMMs, until 2026-12-05: 67 MB more at B = 1024, C = 100k).
    Five chunks, both launch policies."""
    import weakref

    B, C, D = 37, 600, 16
    small_chunks(B)
    monkeypatch.setenv(_common.LAUNCHES_ENV, "merged" if merged else "separate")
    made, alive_at = [], []
    real = lm.mm_f32

    def recording(a, b):
        alive_at.append([i for i, (_, ref) in enumerate(made) if ref() is not None])
        out = real(a, b)
        made.append((len(made) % 2 == 1, weakref.ref(out)))  # the odd calls: each chunk's G
        return out
    monkeypatch.setattr(lm, "mm_f32", recording)
    x, y, seg, m, go = make_case(B, C, D)
    grads = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    assert len(made) == 2 * 5 and all(torch.isfinite(g).all() for g in grads)
    for call, alive in enumerate(alive_at):
        assert not [i for i in alive if made[i][0]], (call, alive)  # no earlier G
        assert alive in ([], [0]), (call, alive)  # at most the accumulator, the first partial


def _peak_extra(fn) -> int:
    """On a GPU the most memory allocated while ``fn`` ran above what was allocated before; on
    the CPU :func:`daal_testing.largest_cpu_allocation` (the profiler does not track CPU totals)."""
    if DEV != "cuda":
        return largest_cpu_allocation(fn)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _peak_growth_is_o_c_d(B: int, C: int, D: int) -> None:
    """On a GPU: the peak extra memory of forward + backward grows with the classes by O(D)
    bytes per class (float32: the segment gradient's 8 D, the statistics' 16 and the class
    slot's 4: 52 bytes at D = 4, bench/work_model.py), far below the 4 B bytes per class of any
    B x C float32 tensor (512 at B = 128); Cc stays fixed (``small_chunks``). Doubling C from
    ``C`` to ``2C``, the growth per added class must stay under half a B x C tensor's (2 B
    bytes), and the measurement can tell: one B x C tensor is seen."""
    peaks = []
    for c in (C, 2 * C):
        x, y, seg, m, go = make_case(B, c, D)
        peaks.append(_peak_extra(_forward_backward(x.float(), y, seg.float(), m, go)))
    per_class = (peaks[1] - peaks[0]) / C
    assert per_class < 2 * B, (peaks, per_class, 4 * B)
    assert _peak_extra(lambda: torch.empty(B, 2 * C, device=DEV).fill_(0)) >= 4 * B * 2 * C


def test_half_segments_gradient_written_once(small_chunks, monkeypatch):
    """With float16 x and segments the segment gradient is written once, in float16: on the CPU
    the backward's largest tensor is that C x 2 x D float16 gradient, on a GPU the peak is lower
    than the atomic design's by about its float32 C x 2 x D accumulator (that accumulator and its
    cast made the 2026-11-30 run's 730 MB peak at C = 100k; the test sees it: checked too)."""
    B, C, D = 64, 3000, 16
    small_chunks(B)
    monkeypatch.delenv(lm.OWN_SEG_ENV, raising=False)  # the default: the class lists
    x, y, seg, m, go = make_case(B, C, D)
    sk = seg.half().requires_grad_()
    run = _forward_backward(x.half(), y, sk, m, go)
    half_grad = 2 * C * D * 2
    lists = _peak_extra(run)
    assert sk.grad.dtype == torch.float16
    sk.grad = None
    monkeypatch.setenv(lm.OWN_SEG_ENV, "atomic")
    atomic = _peak_extra(run)
    if DEV == "cuda":
        assert atomic - lists >= 0.75 * 2 * half_grad, (lists, atomic)
    else:
        assert lists <= half_grad < 2 * half_grad <= atomic, (lists, atomic)


_BACKWARD_KERNELS = ("_lm2_ownseg_kernel", "_lm2_bwd_kernel", "_lm2_dseg_kernel", "_lm2_dseg_finish_kernel",
                     "_lm2_finish_kernel", "_lm2_prep_kernel")


@pytest.mark.parametrize("frozen", ["segments", "embeddings"])
@pytest.mark.parametrize("merged,ops,own", [(True, "function", "lists"), (False, "function", "lists"),
                                            (True, "custom", "lists"), (True, "function", "atomic")],
                         ids=["merged", "separate", "custom-op", "atomic"])
def test_an_input_without_gradient_costs_no_gradient_work(small_chunks, monkeypatch, frozen, merged, ops, own):
    """Frozen segments (or embeddings that need no gradient: segments trained on fixed features)
    get no gradient and cost none: the backward runs neither that gradient's GEMM (one ``mm_f32``
    per chunk, not two) nor its kernels (no segment epilogue / no dX finish), nor allocates it
    (C x 2 x D: 410 MB at C = 100k, D = 512 float32); the other gradient has the same bits as in a
    backward of both, and matches the float64 reference. Three chunks, both launch policies,
    eager and through the ``torch.library`` operator (``ctx.needs_input_grad`` in both); the atomic
    design's finish adds the own classes' dSeg rows, so there dX is still computed for dSeg."""
    B, C, D = 37, 300, 33
    small_chunks(B)
    monkeypatch.setenv(_common.LAUNCHES_ENV, "merged" if merged else "separate")
    monkeypatch.setattr(_common, "EAGER_OPS", ops)
    monkeypatch.setenv(lm.OWN_SEG_ENV, own)
    x, y, seg, m, go = make_case(B, C, D, zero_len=True, on_own=True)
    x, seg, m, go = x.float(), seg.float(), m.float(), go.float()
    full = kernel_grads(x, y, seg, m, go, 0.3)
    gemms, real = [], lm.mm_f32
    monkeypatch.setattr(lm, "mm_f32", lambda a, b: gemms.append(a.shape) or real(a, b))
    launched = spy_launches(monkeypatch, lm, _BACKWARD_KERNELS)
    xk = x.clone().requires_grad_(frozen != "embeddings")
    sk = seg.clone().requires_grad_(frozen != "segments")
    out = lm.line_margin(xk, y, sk, m, alpha=ALPHA, lambda_pull=0.3)
    largest = largest_cpu_allocation(lambda: out.backward(go)) if DEV == "cpu" else None
    assert torch.equal(out.detach(), full[0])
    assert len(gemms) == (6 if own == "atomic" and frozen == "embeddings" else 3), gemms  # one GEMM per chunk
    ref = reference_grads(x, y, seg, m, go, 0.3)
    tol = tolerance(torch.float32, tf32=TF32)
    if frozen == "segments":
        # (the atomic design's dX takes its own-class terms in the finish, the lists' in ownseg: the
        # same formula in another kernel, whose bits a GPU compiler may contract differently)
        assert sk.grad is None and (torch.equal(xk.grad, full[1]) or own == "atomic" and rel_err(xk.grad, full[1]) < 1e-6)
        assert_close(xk.grad, ref[1], tol, "dX")
        assert not {"_lm2_dseg_kernel", "_lm2_dseg_finish_kernel"} & set(launched), launched
        assert launched.count("_lm2_finish_kernel") == 1, launched
        if largest is not None:  # nothing C x 2 x D (the largest: a B x 2 Cc chunk buffer or dX)
            assert largest < 4 * C * 2 * D, largest
    else:
        assert xk.grad is None and torch.equal(sk.grad, full[2])
        assert_close(sk.grad, ref[2], tol, "dSeg")
        assert "_lm2_dseg_finish_kernel" not in launched, launched
        assert launched.count("_lm2_finish_kernel") == (own == "atomic"), launched
        assert launched.count("_lm2_dseg_kernel") == 3, launched


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_daal_loss_gradients(reduction):
    """Gradients through ``DAALLoss`` (backend "triton") match the float64 reference
    module's for both reductions (every term on; odd B and D, a class absent from the batch)."""
    z, y, seg = random_problem(37, 11, 129, classes_present=range(8), device=DEV)
    hp = dict(lambda_pull=0.3, lambda_dens=0.5, lambda_len=0.2, l_max=0.2, alpha=12.0,
              reduction=reduction)
    outs = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        module = dt.DAALLoss(11, 129, backend=backend, **hp).to(device=DEV, dtype=dtype)
        with torch.no_grad():
            module.segments.copy_(seg)
        zz = z.detach().to(dtype).requires_grad_(True)
        loss = module(zz, y)
        w = torch.linspace(0.5, 1.5, loss.numel(), dtype=dtype, device=DEV).reshape(loss.shape)
        gz, gs = torch.autograd.grad((loss * w).sum(), (zz, module.segments))
        outs.append((loss, gz, gs))
    assert outs[0][0].shape == (() if reduction == "mean" else (37,))
    tol = tolerance(torch.float32, tf32=TF32)
    for name, a, b in zip(("loss", "dZ", "dSegments"), *outs):
        assert_close(a, b, tol, f"{reduction} {name}")


def test_custom_ops_opcheck():
    """The operators' (``daal_triton::line_margin2`` and its backward) schema, fake (meta)
    functions and autograd registration are consistent (``torch.library.opcheck``), for the cast
    (fp16 x, fp32 segments) and no-copy paths."""
    x, y, seg, m, go = make_case(6, 5, 16)
    for x_dtype in (torch.float32, torch.float16):
        xk = x.to(x_dtype).requires_grad_()
        sk = seg.float().requires_grad_()
        args = (xk, sk, y, m.float(), ALPHA, 0.1)
        torch.library.opcheck(torch.ops.daal_triton.line_margin2.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        out, lse, rs, st, sx = torch.ops.daal_triton.line_margin2(*args)
        # and x and the segments in other layouts: the fake copied them, the kernels return
        # contiguous gradients (inductor's stride asserts failed; a torch.library probe, 2026-12-07)
        for xb, sb in ((xk.detach(), sk.detach()), (_other_layout(xk.detach()), _other_layout(sk.detach()))):
            bargs = (go.float(), xb, sb, sx, st, y, lse, rs, ALPHA, 0.1)
            torch.library.opcheck(torch.ops.daal_triton.line_margin2_backward.default, bargs,
                                  test_utils=("test_schema", "test_faketensor"))
        # one gradient only (the other input frozen): 0 rows for the other, in the fake too
        for need in ((True, False), (False, True)):
            bargs = (go.float(), xk.detach(), sk.detach(), sx, st, y, lse, rs, ALPHA, 0.1, False, True, True, *need)
            torch.library.opcheck(torch.ops.daal_triton.line_margin2_backward.default, bargs,
                                  test_utils=("test_schema", "test_faketensor"))


def _other_layout(t):
    """``t``'s values with its dimensions' order reversed in memory (a transposed x: strides (1, B))."""
    dims = list(range(t.dim()))[::-1]
    return t.permute(dims).contiguous().permute(dims)


# ----------------------------------------------------------------------------- grids
H200_SMS = 132


@pytest.mark.parametrize("B,C", [(1024, 100_000), (4096, 1_000_000), (4096, 1000), (1024, 11318),
                                 (180, 100)])
def test_forward_grid_in_whole_waves(B, C):
    """The forward's (row tiles x splits) grid is sized from the SM count: its modelled time
    (waves x class tiles of the longest program) is within 5% of the ideal (all SMs busy, the work
    split evenly) plus one class tile (the granularity)."""
    cfg = lm.CONFIGS["half"]["fwd2"]
    rt = -(-B // cfg.blocks["BLOCK_B"])
    tiles = -(-C // cfg.blocks["BLOCK_C"])
    s = lm.wave_split(rt, tiles, H200_SMS)
    cost = -(-rt * s // H200_SMS) * -(-tiles // s)
    ideal = rt * tiles / H200_SMS
    assert cost <= 1.05 * ideal + 1, (s, cost, ideal)


def test_backward_chunk_grid():
    """The backward's chunk respects the element budget and stays within 3/4 of its widest; at
    B = 1024, C = 100k its grid is whole waves on an H200 (8 row tiles x 495 class tiles of 32 = 30
    waves), and at B = 4096, C = 1M too (32 row tiles x 99 class tiles = 24 waves, 3168 of the
    widest 4096 classes)."""
    cfg = lm.CONFIGS["half"]["bwd2"]
    bb, bc = cfg.blocks["BLOCK_B"], cfg.blocks["BLOCK_C"]
    for B, C in ((1024, 100_000), (4096, 1_000_000), (1024, 11318), (180, 100)):
        cc = lm.chunk_classes(B, C, bb, bc, H200_SMS)
        widest = lm.chunk_classes(B, C, bb, bc, 1)
        assert B * cc <= max(lm.CHUNK_ELEMENTS, B * bc) and cc % bc == 0
        assert 4 * cc >= 3 * widest
    cc = lm.chunk_classes(1024, 100_000, bb, bc, H200_SMS)
    assert cc == 495 * bc and ((1024 // bb) * (cc // bc)) % H200_SMS == 0
    cc = lm.chunk_classes(4096, 1_000_000, bb, bc, H200_SMS)
    assert cc == 99 * bc and ((4096 // bb) * (cc // bc)) % H200_SMS == 0


def test_backward_under_autocast():
    """A backward run inside autocast gives the same gradients (the operator turns autocast off
    around its float32 GEMM outputs)."""
    x, y, seg, m, go = make_case(37, 11, 33)
    ref = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        got = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and rel_err(a, b) <= 1e-6


# ----------------------------------------------------------------------------- merged launches
def _launched(fn):
    """``fn()``'s result and the Triton kernels it launched (name -> count)."""
    with LaunchCount() as count:
        out = fn()
    return out, dict(count.triton)


@pytest.mark.parametrize("sms,C,chunked", [(1, 11, False), (1, 300, True), (64, 300, True), (64, 300, False)],
                         ids=["one-split-one-chunk", "one-split-chunks", "splits-chunks", "splits-one-chunk"])
def test_merged_launches_give_the_same_bits(small_chunks, monkeypatch, sms, C, chunked):
    """``DAAL_LAUNCHES=merged`` (the default) and ``separate`` run the same arithmetic: value and
    both gradients agree bit for bit, with one class split (the merge inside the GEMM kernel) or
    several (``sm_count`` patched: 3 class tiles on 64 SMs), one class chunk or three; and the
    merged forward makes 2 launches where one split suffices (4 separate) and the backward one
    launch fewer (the last chunk's segment epilogue with dX); with more than one chunk the
    backward copies each chunk's segments (``DAAL_LM_COPY=chunks``)."""
    B, D = 37, 33
    if chunked:
        small_chunks(B)
    monkeypatch.setattr(lm, "sm_count", lambda device: sms)
    x, y, seg, m, go = make_case(B, C, D, zero_len=True, on_own=True)
    args = (x.float(), y, seg.float(), m.float(), go.float(), 0.3)
    monkeypatch.setenv(_common.LAUNCHES_ENV, "separate")
    sep, sep_n = _launched(lambda: kernel_grads(*args))
    monkeypatch.delenv(_common.LAUNCHES_ENV)
    mer, mer_n = _launched(lambda: kernel_grads(*args))
    for a, b in zip(mer, sep):
        assert torch.equal(a, b)
    splits = lm.forward_splits(1, -(-C // 128), sms)
    assert (splits > 1) == (sms > 1)
    fwd_sep = 4  # own rows, class statistics, logsumexp, merge
    fwd_mer = 2 if splits == 1 else 3
    chunks = -(-C // lm.chunk_classes(B, C, 128, 128, sms))
    # the lists, per chunk (its copy,) the GEMM kernel and the epilogue, dX
    bwd_sep = 1 + (3 if chunks > 1 else 2) * chunks + 1
    assert sum(sep_n.values()) == fwd_sep + bwd_sep, sep_n
    assert sum(mer_n.values()) == fwd_mer + bwd_sep - 1, mer_n
    assert "_lm2_lse_kernel" in sep_n and ("_lm2_lse_kernel" in mer_n) == (splits > 1)
    assert mer_n["_lm2_own_prep_kernel"] == 1 and mer_n["_lm2_dseg_finish_kernel"] == 1
    assert mer_n.get("_lm2_dseg_kernel", 0) == chunks - 1


class _GridSpy:
    """Stands in for a ``@triton.jit`` kernel in the launcher's module: records each launch's grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("C,sms,splits", [(300, 64, 3), (600, 4, 3)], ids=["3-tiles-3-splits", "5-tiles-3-splits"])
def test_parity_across_forward_splits(monkeypatch, C, sms, splits):
    """Several class splits merged by ``_lm2_lse_kernel`` (each split's sum rescaled by
    ``e^{m_s - top}``) against the float64 reference, value and gradients: on the CPU one SM means
    one split (the merge inside the GEMM kernel), and the merged-launches test only compares this
    merge with itself. ``sm_count`` patched: C = 300 on 64 SMs is 3 class tiles in 3 splits; C = 600
    on 4 SMs is 5 tiles in 3 splits (1, 2 and 2 tiles: the split bounds ``s T / nsplit`` must
    cover every tile when the splits do not divide them); the forward's grid is checked to hold
    them, so the test cannot fall back to one split unnoticed."""
    B, D = 37, 33
    monkeypatch.setattr(lm, "sm_count", lambda device: sms)
    fwd = _GridSpy(lm._lm2_fwd_kernel)
    monkeypatch.setattr(lm, "_lm2_fwd_kernel", fwd)
    x, y, seg, m, go = make_case(B, C, D, zero_len=True, on_own=True)
    _, n = _launched(lambda: check_parity(x, y, seg, m, go, 0.3, tolerance(torch.float32, tf32=TF32),
                                          torch.float32, torch.float32))
    assert len(fwd.grids) == 1 and fwd.grids[0][1] == splits, fwd.grids  # (row tiles, splits)
    assert n["_lm2_lse_kernel"] == 1, n


def test_own_distance_on_the_segment_is_the_floor():
    """Points exactly on their own segment (its midpoint, p, q: e = 0 exactly in float32) get the
    own-class distance ``sqrt(eps)``, bit for bit (``rs[0]`` of ``daal_triton::line_margin2``, both
    launch designs), and the loss is the hand value ``softplus(alpha (1e-6 + m - 0.25)) / alpha +
    lambda_pull 1e-12`` (float64) within 1e-7: with the negative's logit at ~0 a floor of
    ``100 eps`` (d = 1e-5) moves the loss by 4.5e-6, which random on-segment points hide in the
    1e-5 parity tolerance. The negative is a parallel segment 0.25 away (exact in float32)."""
    x = torch.tensor([[1.0, 0.0], [1.0, -0.5], [1.0, 0.5]], device=DEV)
    seg = torch.tensor([[[1.0, -0.5], [1.0, 0.5]], [[1.25, -0.5], [1.25, 0.5]]], device=DEV)
    y = torch.zeros(3, dtype=torch.long, device=DEV)
    m = torch.full((3,), 0.25, device=DEV)
    d = torch.tensor(lm.EPS, dtype=torch.float64).sqrt()
    hand = torch.nn.functional.softplus(ALPHA * (d + 0.25 - 0.25)) / ALPHA + 0.3 * d ** 2
    ref = reference_grads(x, y, seg, m, torch.ones(3, device=DEV), 0.3)[0]
    assert (ref - hand).abs().max() <= 1e-12, (ref, hand)
    floor = torch.tensor(lm.EPS, dtype=torch.float32).sqrt().item()
    for merged in (True, False):
        out, _, rs, _, _ = torch.ops.daal_triton.line_margin2(x, seg, y, m, ALPHA, 0.3, merged)
        assert rs[0].tolist() == [floor] * 3, (merged, rs[0].tolist(), floor)
        err = (out.double() - hand).abs().max().item()
        assert err <= 1e-7, f"merged={merged}: loss {out.tolist()} vs the hand value {hand.item()}: off by {err:.1e}"


def test_distance_to_a_negative_through_the_point_is_the_floor():
    """Points exactly on a *negative* segment, at values where the GEMM form is exact (e^2 = 0 in
    float32): their distance to it is the floor ``sqrt(eps)``, as in the reference, never 0. The
    loss is the hand value ``softplus(alpha (d_pos + m - 1e-6)) / alpha + lambda_pull d_pos^2``
    (float64; d_pos = 0.25, exact) within 2e-7, with both launch designs: with the logit at ~8 a
    distance of 0 moves it by ~1e-6, which random inputs hide in the 1e-5 parity tolerance. The
    own segment is a parallel one 0.25 away; the gradient at the floor is the reference's."""
    x = torch.tensor([[1.0, 0.0], [1.0, -0.5], [1.0, 0.5], [1.0, 0.25]], device=DEV)
    seg = torch.tensor([[[1.25, -0.5], [1.25, 0.5]], [[1.0, -0.5], [1.0, 0.5]]], device=DEV)
    y = torch.zeros(4, dtype=torch.long, device=DEV)
    m = torch.full((4,), 0.25, device=DEV)
    floor = torch.tensor(lm.EPS, dtype=torch.float64).sqrt()
    hand = torch.nn.functional.softplus(ALPHA * (0.25 + 0.25 - floor)) / ALPHA + 0.3 * 0.25 ** 2
    go = torch.tensor([1.0, -0.5, 0.25, 2.0], device=DEV)
    ref, gx_ref, gs_ref = reference_grads(x, y, seg, m, go, 0.3)
    assert (ref - hand).abs().max() <= 1e-12, (ref, hand)
    for merged in (True, False):
        out = torch.ops.daal_triton.line_margin2(x, seg, y, m, ALPHA, 0.3, merged)[0]
        err = (out.double() - hand).abs().max().item()
        assert err <= 2e-7, f"merged={merged}: loss {out.tolist()} vs the hand value {hand.item()}: off by {err:.1e}"
    out, gx, gs = kernel_grads(x, y, seg, m, go, 0.3)
    assert rel_err(gx, gx_ref) <= 1e-5 and rel_err(gs, gs_ref) <= 1e-5


def test_merged_launches_with_the_atomic_design(monkeypatch):
    """The atomic own-class rows (``DAAL_LM_OWN_SEG=atomic``) add into the segment gradient after
    every chunk's epilogue has written it: that backward keeps its dX kernel apart (the forward
    still merges), and gives the lists' gradients."""
    x, y, seg, m, go = make_case(37, 11, 20)
    args = (x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    lists = kernel_grads(*args)
    monkeypatch.setenv(lm.OWN_SEG_ENV, "atomic")
    atomic, n = _launched(lambda: kernel_grads(*args))
    assert "_lm2_finish_kernel" in n and "_lm2_dseg_finish_kernel" not in n and "_lm2_own_prep_kernel" in n
    for a, b in zip(lists, atomic):
        assert rel_err(a, b) <= 1e-6


def test_launch_switch_is_checked(monkeypatch):
    """Any value of ``DAAL_LAUNCHES`` but "merged" and "separate" is a ValueError naming it."""
    x, y, seg, m, _ = make_case(5, 3, 4)
    monkeypatch.setenv(_common.LAUNCHES_ENV, "fused")
    with pytest.raises(ValueError, match="DAAL_LAUNCHES"):
        lm.line_margin(x.float(), y, seg.float(), m.float(), alpha=ALPHA, lambda_pull=0.0)


@pytest.mark.parametrize("B,C", [(180, 100), (1024, 100_000), (4096, 1000), (1024, 11318), (256, 2000)])
def test_forward_splits_charge_the_merge_launch(B, C):
    """On an H200: the merged forward takes one split where that costs at most one class tile
    more than the splits (B = 180, C = 100 in float32: 2 x 2 tiles, 2 splits save one tile and
    cost a launch), and :func:`wave_split`'s splits wherever they save more (C = 100k: 782 tiles)."""
    for fam in ("fp32", "half"):
        cfg = lm.CONFIGS[fam]["fwd2"]
        rt, ct = -(-B // cfg.blocks["BLOCK_B"]), -(-C // cfg.blocks["BLOCK_C"])
        waves = lm.wave_split(rt, ct, H200_SMS)
        got = lm.forward_splits(rt, ct, H200_SMS)
        assert lm.forward_splits(rt, ct, H200_SMS, merged=False) == waves
        cost = lambda s: -(-rt * s // H200_SMS) * -(-ct // s)  # noqa: E731
        assert got in (1, waves)
        assert (got == 1) == (cost(1) <= cost(waves) + 1)
    cfg = lm.CONFIGS["fp32"]["fwd2"]
    assert lm.wave_split(2, 2, H200_SMS) == 2 and lm.forward_splits(2, 2, H200_SMS) == 1
    assert lm.forward_splits(8, -(-100_000 // cfg.blocks["BLOCK_C"]), H200_SMS) > 1


def test_backward_gemm_asks_for_float32_output_once(monkeypatch):
    """``mm_f32`` (the backward's GEMMs on a GPU) asks ``torch.mm`` for a float32 result once per
    device type and dtype and remembers the answer; an out-of-memory error is raised, not taken as
    "this PyTorch has no out_dtype" (which would round every later product to half precision)."""
    calls = []
    real_mm = torch.mm

    def fake_mm(a, b, **kw):  # meta tensors: the GPU branch without a GPU
        calls.append(kw)
        if kw and failure[0] is not None:
            raise failure[0]
        out = real_mm(a, b)
        return out.to(kw["out_dtype"]) if kw else out

    monkeypatch.setattr(lm, "_MM_OUT_DTYPE", {})
    monkeypatch.setattr(torch, "mm", fake_mm)
    a, b = torch.empty(4, 3, dtype=torch.bfloat16, device="meta"), torch.empty(3, 2, dtype=torch.bfloat16, device="meta")
    failure = [torch.OutOfMemoryError("CUDA out of memory")]
    with pytest.raises(torch.OutOfMemoryError):
        lm.mm_f32(a, b)
    assert lm._MM_OUT_DTYPE == {}  # nothing learnt
    failure[0] = None
    assert lm.mm_f32(a, b).dtype == torch.float32 and calls[-1] == {"out_dtype": torch.float32}
    assert lm._MM_OUT_DTYPE == {("meta", torch.bfloat16): True}
    lm.mm_f32(a, b)
    assert calls[-1] == {"out_dtype": torch.float32}  # asked again only as the call itself
    failure[0] = TypeError("mm() got an unexpected keyword argument 'out_dtype'")  # an older PyTorch
    h = torch.empty(4, 3, dtype=torch.float16, device="meta"), torch.empty(3, 2, dtype=torch.float16, device="meta")
    n = len(calls)
    assert lm.mm_f32(*h).dtype == torch.float32
    assert calls[n:] == [{"out_dtype": torch.float32}, {}]
    assert lm._MM_OUT_DTYPE[("meta", torch.float16)] is False
    lm.mm_f32(*h)
    assert calls[n + 2:] == [{}]  # not asked again


def test_no_classes_is_refused():
    """C = 0 (the public API refuses it first): a ValueError, not a read of a segment that does
    not exist (it crashed the interpreter)."""
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"segments must hold at least one class \(C >= 1\), got C = 0"):
        lm.line_margin(x, torch.zeros(3, dtype=torch.long), torch.randn(0, 2, 8), torch.zeros(3), alpha=ALPHA,
                       lambda_pull=0.5)


@triton.jit
def _small_value_helpers_kernel(x_ptr, log1p_ptr, omexp_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < N, other=0.0)
    tl.store(log1p_ptr + i, _common._log1p(x), mask=i < N)
    tl.store(omexp_ptr + i, _common._one_minus_exp_neg(x), mask=i < N)


def test_log1p_and_one_minus_exp_keep_small_values():
    """The line term's ``log(1 + s)`` and the backward's ``1 - exp(-lse)`` (kernels/_common.py):
    within a few float32 ulps of float64's ``log1p`` and ``-expm1(-x)`` from 1e-38 to 1e10, on both
    sides of the 0.5 where each switches from its series to the plain formula (a wrong series
    coefficient shows near 0.5); 0 gives 0, NaN stays NaN, inf gives inf and 1."""
    x = torch.cat([torch.logspace(-38, 10, 400, dtype=torch.float64),
                   torch.tensor([0.0, 0.3, 0.4999999, 0.5, 0.5000001, 0.7], dtype=torch.float64)]).float()
    special = torch.tensor([float("nan"), float("inf")])
    xs = torch.cat([x, special]).to(DEV)
    log1p, omexp = torch.empty_like(xs), torch.empty_like(xs)
    _small_value_helpers_kernel[(1,)](xs, log1p, omexp, xs.numel(), BLOCK=512)
    log1p, omexp = log1p.cpu(), omexp.cpu()
    x64 = x.double()
    for got, want in ((log1p[:-2], torch.log1p(x64)), (omexp[:-2], -torch.expm1(-x64))):
        err = ((got.double() - want).abs() / want.clamp_min(1e-300)).where(want > 0, got.double().abs())
        assert err.max().item() < 4e-7, (err.max().item(), x[err.argmax()].item())
    assert log1p[-2].isnan() and omexp[-2].isnan() and log1p[-1].item() == float("inf") and omexp[-1].item() == 1.0


def test_split_merge_keeps_small_line_terms():
    """``_lm2_lse_kernel`` merges the class splits' running (max, sum): where every split's max is 0
    (every logit below 0) the line term is ``log1p`` of the summed rest, accurate to float32's
    relative precision per row down to 1e-12 (``log(1 + s)`` there read 0 or 20% off); rows with a
    positive logit take ``top + log(e^-top + rest)``."""
    B, nsplit = 37, 3
    g = torch.Generator().manual_seed(3)
    s = (torch.rand(nsplit, B, generator=g, dtype=torch.float64) * torch.logspace(-12, -1, B, dtype=torch.float64)).float()
    m = torch.zeros(nsplit, B)
    m[1, ::4] = 0.7  # a positive logit in split 1: that split's sum holds its own e^0
    s[1, ::4] += 1.0
    rs = torch.zeros(3, B)
    rs[0] = torch.rand(B, generator=g)  # the own-class distances (read with lambda_pull)
    lse, out = torch.empty(B, device=DEV), torch.empty(B, device=DEV)
    lm._lm2_lse_kernel[(1,)](m.to(DEV), s.to(DEV), rs.to(DEV), lse, out, B, nsplit, 2.0, 0.25, BLOCK_B=64)
    lse, out = lse.cpu(), out.cpu()
    rest = (s.double() * m.double().exp()).sum(0)
    want = torch.log1p(rest)
    assert (((lse.double() - want) / want).abs().max().item()) < 1e-6
    torch.testing.assert_close(out.double(), want / 2.0 + 0.25 * rs[0].double() ** 2, rtol=1e-6, atol=0)


def _inside_a_short_segment(length, B=32, C=4, D=32, seed=0):
    """Unit rows that all project inside class 0's segment of ``length`` (a negative for 3/4 of
    them), float64: the case where ``t`` decides how a segment's gradient splits between p and q."""
    g = torch.Generator().manual_seed(seed)
    seg = dt.init_segments(C, D, length=length, generator=g).double()
    v = seg[0, 1] - seg[0, 0]
    v = v / v.norm()
    y = torch.arange(B) % C
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    x = x - (x @ v)[:, None] * v + (torch.rand(B, generator=g, dtype=torch.float64) - 0.5)[:, None] * 0.9 * length * v
    m = 0.05 + 0.45 * torch.rand(B, generator=g, dtype=torch.float64)
    go = torch.randn(B, generator=g, dtype=torch.float64)
    return tuple(t.to(DEV) for t in (x, y, seg, m, go))


@pytest.mark.parametrize("length", [1e-2, 1e-3, 1e-4, 1e-6])
def test_short_segments_split_their_gradient_as_the_reference(monkeypatch, length):
    """``x.u`` is one dot with ``u`` (docs/method.md step 5's GEMM form), not ``x.q - x.p``: that
    difference of two O(1) float32 dots carried ~1e-6 of rounding, all of ``x.u`` for a short
    segment, so ``t`` and the split of the segment's gradient between p and q were noise (dP, dQ
    1e-2 off at a length of 1e-3, 38% at 1e-4). ``x.u - p.u`` still cancels as ``(x - p).u`` would
    not, by a factor ~1/|u| less: the float32 reference, which takes the same GEMM form, is 1.4e-5
    off at 1e-3; the kernels must be within 1e-5 or 3x the float32 reference's own error."""
    monkeypatch.delenv(lm.XU_ENV, raising=False)
    x, y, seg, m, go = _inside_a_short_segment(length)
    x32, seg32 = x.float().double(), seg.float().double()  # the inputs both see
    want = reference_grads(x32, y, seg32, m, go, 0.2)
    xr, sr = x.float().requires_grad_(), seg.float().requires_grad_()  # the float32 reference
    out32 = dt.reference.line_margin(xr, y, sr, m.float(), alpha=ALPHA, lambda_pull=0.2)
    out32.backward(go.float())
    ref32 = (out32.detach(), xr.grad, sr.grad)
    got = kernel_grads(x.float(), y, seg.float(), m.float(), go.float(), 0.2)
    for name, a, r, w in zip(("value", "dX", "dSegments"), got, ref32, want):
        bound = max(tolerance(torch.float32, tf32=TF32), 3 * rel_err(r, w))
        assert rel_err(a, w) <= bound, (name, rel_err(a, w), rel_err(r, w))
    check_parity(x, y, seg, m, go, 0.2, tolerance(torch.float16), torch.float16, torch.float16)


def test_xu_switch(monkeypatch):
    """``DAAL_LM_XU``: "dot" by default (``sx`` holds ``[p~, u~]``, always a copy), "difference"
    selectable (the design the H200 runs timed: the segments themselves when they are contiguous
    in x's dtype, ``x.q - x.p``), read when the forward runs (its backward follows it); both match
    the float64 reference on ordinary segments; another value is a ValueError naming it."""
    monkeypatch.delenv(lm.XU_ENV, raising=False)
    assert lm.xu_dot()
    x, y, seg, m, go = make_case(37, 11, 20, zero_len=True, on_own=True)
    seen = []
    cast_segments = lm._cast_segments
    monkeypatch.setattr(lm, "_cast_segments", lambda s, dt, xu: seen.append(xu) or cast_segments(s, dt, xu))
    for policy, xu in (("difference", False), ("dot", True)):
        monkeypatch.setenv(lm.XU_ENV, policy)
        sk = seg.float().contiguous().requires_grad_()
        xk = x.float().requires_grad_()
        out = lm.line_margin(xk, y, sk, m.float(), alpha=ALPHA, lambda_pull=0.2)
        monkeypatch.setenv(lm.XU_ENV, "dot" if policy == "difference" else "difference")
        out.backward(go.float())  # the forward's choice, whatever the variable says now
        assert seen.pop() is xu
        ref = reference_grads(x.float(), y, seg.float(), m, go, 0.2)
        for a, b in zip((out, xk.grad, sk.grad), ref):
            assert rel_err(a, b) <= tolerance(torch.float32, tf32=TF32), policy
    _, _, _, _, sx = torch.ops.daal_triton.line_margin2(x.float(), seg.float().contiguous(), y, m.float(),
                                                         ALPHA, 0.2, True, True)
    assert torch.equal(sx[:, 0], seg.float()[:, 0])
    assert torch.equal(sx[:, 1], seg.float()[:, 1] - seg.float()[:, 0])  # u~: q - p rounded once
    monkeypatch.setenv(lm.XU_ENV, "q-p")
    with pytest.raises(ValueError, match="DAAL_LM_XU"):
        lm.line_margin(x.float(), y, seg.float(), m.float(), alpha=ALPHA, lambda_pull=0.2)


def _saved_copies(monkeypatch, policy, x, y, seg, m, go):
    """``((value, dX, dSegments), copies)`` of the kernels under ``DAAL_LM_COPY=policy``: the
    tensors of C x 2 x D elements other than the segments that the forward saved for the backward."""
    monkeypatch.setenv(lm.COPY_ENV, policy)
    saved, made = [], []
    cast_segments = lm._cast_segments

    def recording(*args, **kwargs):  # the forward's copy, followed until it is freed
        st, sx, cast = cast_segments(*args, **kwargs)
        if sx.numel():
            made.append(StorageWeakRef(sx.untyped_storage()))
        return st, sx, cast
    monkeypatch.setattr(lm, "_cast_segments", recording)
    xk, sk = x.detach().clone().requires_grad_(), seg.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lm.line_margin(xk, y, sk, m.float(), alpha=ALPHA, lambda_pull=0.2)
    monkeypatch.setattr(lm, "_cast_segments", cast_segments)
    gc.collect()  # the Triton interpreter's reference cycles hold launch arguments (not a GPU's)
    alive = [not r.expired() for r in made]
    saved = [t for t in saved if t.numel() == seg.numel() and t.data_ptr() != sk.data_ptr()]
    # what is saved is alive; an unsaved copy must be gone before the backward
    assert alive == [bool(saved)] * len(made), (alive, len(saved))
    monkeypatch.setenv(lm.COPY_ENV, "whole" if policy == "chunks" else "chunks")
    out.backward(go.float())  # the forward's choice, whatever the variable says now
    return (out.detach(), xk.grad, sk.grad), saved


@pytest.mark.parametrize("x_dtype,seg_dtype,xu", [(torch.float32, torch.float32, "dot"),
                                                  (torch.float16, torch.float32, "dot"),
                                                  (torch.float16, torch.float32, "difference"),
                                                  (torch.float32, torch.float32, "difference")],
                         ids=["fp32", "fp16-seg32", "fp16-seg32-difference", "fp32-difference"])
def test_the_backward_copies_the_segments_chunk_by_chunk(small_chunks, monkeypatch, x_dtype, seg_dtype, xu):
    """``DAAL_LM_COPY``: with "chunks" (the default) and more than one class chunk the forward
    saves no C x 2 x D copy of the segments for the backward (205 MB at C = 100k, D = 512 in
    bfloat16), which rounds each chunk's into one Cc x 2 x D buffer with the forward's kernel;
    "whole" saves the forward's copy; the gradients are the same bits and the float64
    reference's. With one chunk both save the copy (the chunk's would be as large) and launch
    the same kernels. Where no copy is made (``difference``, segments contiguous in x's dtype)
    nothing changes. Another value is a ValueError naming the variable."""
    monkeypatch.setenv(lm.XU_ENV, xu)
    B, C, D = 37, 300, 33
    small_chunks(B)
    x, y, seg, m, go = make_case(B, C, D, zero_len=True, on_own=True)
    x, seg = x.to(x_dtype), seg.to(seg_dtype)
    copying = xu == "dot" or x_dtype != seg_dtype
    got, copies = _saved_copies(monkeypatch, "chunks", x, y, seg, m, go)
    assert copies == []
    whole, copies = _saved_copies(monkeypatch, "whole", x, y, seg, m, go)
    assert len(copies) == int(copying) and all(c.dtype == x_dtype for c in copies)
    for a, b in zip(got, whole):
        assert torch.equal(a, b)
    ref = reference_grads(x.double(), y, seg.double(), m, go, 0.2)
    tol = tolerance(torch.float32, tf32=TF32) if x_dtype == torch.float32 else tolerance(torch.float16)
    for a, b in zip(got, ref):
        assert rel_err(a, b) <= tol
    # one chunk: the forward's copy is kept, and the backward makes none
    x1, y1, seg1, m1, go1 = make_case(B, 11, D, zero_len=True)
    for policy in lm.COPY_POLICIES:
        (_, copies), n = _launched(lambda: _saved_copies(monkeypatch, policy, x1.to(x_dtype), y1,
                                                              seg1.to(seg_dtype), m1, go1))
        assert len(copies) == int(copying) and n.get("_lm2_prep_kernel", 0) + n.get(
            "_lm2_own_prep_kernel", 0) == 1, (policy, n)
    monkeypatch.setenv(lm.COPY_ENV, "none")
    with pytest.raises(ValueError, match="DAAL_LM_COPY"):
        lm.line_margin(x.requires_grad_(), y, seg, m.float(), alpha=ALPHA, lambda_pull=0.2)
