"""docs/method.md "Numerics": on CUDA tensors the default call never synchronises the host, and
one loss forward+backward launches few kernels.

The value checks are what would synchronise; they are off for GPU tensors unless asked for. On this
CPU-only machine "the path CUDA takes" is the same call with the value checks switched off
(``validation.value_checks_on`` patched), and ``daal_triton.launch_count.LaunchCount`` (a
``TorchDispatchMode`` that also sees inside the package's custom operators and counts Triton
launches) counts every operator that copies a device value to the host, and every launch.
"""
import pytest
import torch

import daal_triton
from daal_triton import validation
from daal_triton.launch_count import LaunchCount
from daal_testing import needs_kernels, patch_value_checks

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]  # CPU tensors
#: issue 13: one DAALLoss forward+backward at B = 180, C = 100 on the Triton backend.
MAX_LAUNCHES = 40


@pytest.fixture
def gpu_defaults(monkeypatch):
    """Value checks as on a CUDA tensor with the default options: off."""
    patch_value_checks(monkeypatch, lambda device, check_values=None: False)


def test_the_counter_sees_a_host_sync():
    """The counter itself: a check as the validation does it is counted."""
    with LaunchCount() as count:
        bool(torch.isfinite(torch.randn(3)).all())
    assert count.syncs == {"aten._local_scalar_dense": 1} or count.syncs.get("aten.is_nonzero")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bank", [False, True], ids=["batch", "memory_bank"])
def test_loss_forward_backward_never_syncs(gpu_defaults, backend, bank):
    loss = daal_triton.DAALLoss(11, 32, backend=backend)
    z = torch.randn(37, 32, requires_grad=True)
    y = torch.randint(0, 11, (37,))
    kw = {}
    if bank:
        kw = dict(ref_emb=torch.cat([z.detach(), torch.randn(20, 32)]),
                  ref_labels=torch.cat([y, torch.randint(0, 11, (20,))]), ref_includes_batch=True)
    loss(z, y, **kw).backward()  # first call: imports and one-time set-up are not per-call costs
    with LaunchCount() as count:
        out = loss(z, y, **kw)
        out.backward()
    assert count.syncs == {}
    assert torch.isfinite(out) and z.grad is not None


def test_value_checks_on_cpu_count_as_syncs():
    """With the checks on (always for CPU tensors) the same call does read values: the test
    above would fail if the patch did not take the checks away."""
    loss = daal_triton.DAALLoss(11, 32, backend="reference")
    with LaunchCount() as count:
        loss(torch.randn(37, 32), torch.randint(0, 11, (37,)))
    assert count.syncs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-1, 11, 10 ** 6])
def test_out_of_range_label_without_checks_is_nan_not_a_fault(gpu_defaults, backend, bad):
    loss = daal_triton.DAALLoss(11, 16, backend=backend, reduction="none")
    z = torch.randn(9, 16, requires_grad=True)
    y = torch.randint(0, 11, (9,))
    y[4] = bad
    per_sample = loss(z, y)
    assert torch.isnan(per_sample[4])
    assert torch.isfinite(per_sample[torch.arange(9) != 4]).all()
    per_sample.sum().backward()  # the backward runs too (NaN flows where it must)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_embeddings_without_checks_make_the_loss_nan(gpu_defaults, backend, normalize, bad):
    """docs/method.md "Bad input": without value checks, NaN/inf in one embedding reaches the loss
    and that row's gradient on both backends (a floor that swallowed NaN made the Triton loss
    finite, with a NaN row as everyone's nearest neighbour); the other rows keep the float64
    reference's values, since a non-finite row is no one's neighbour."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(23, 12, generator=g, dtype=torch.float64)
    y = torch.arange(23) % 5
    seg = 0.5 * torch.randn(5, 2, 12, generator=g, dtype=torch.float64)
    z[7, 3] = float(bad)
    hp = dict(reduction="none", normalize=normalize, lambda_pull=0.1)
    zk, sk = z.float().requires_grad_(), seg.float().requires_grad_()
    per_sample = daal_triton.daal_loss(zk, y, sk, backend=backend, **hp)
    per_sample.sum().backward()
    others = torch.arange(23) != 7
    assert torch.isnan(per_sample[7]) and torch.isfinite(per_sample[others]).all()
    assert torch.isnan(zk.grad[7]).any() and torch.isfinite(zk.grad[others]).all()
    assert torch.isnan(sk.grad).flatten(1).any(1).all(), "row 7's NaN reaches every class's segment"
    assert torch.isnan(daal_triton.daal_loss(zk, y, sk, backend=backend, normalize=normalize))
    oracle = daal_triton.daal_loss(z, y, seg, backend="reference", **hp)
    assert torch.isnan(oracle[7])
    torch.testing.assert_close(per_sample[others].double(), oracle[others], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_segments_without_checks_make_the_loss_nan(gpu_defaults, backend, bad):
    """A NaN/inf end point makes every sample's line term NaN (the segment is everyone's negative
    or own class) and every gradient NaN: nothing is floored to a finite number."""
    z = torch.randn(11, 8, requires_grad=True)
    seg = torch.randn(4, 2, 8)
    seg[2, 1, 5] = float(bad)
    seg.requires_grad_(True)
    per_sample = daal_triton.daal_loss(z, torch.arange(11) % 4, seg, backend=backend, reduction="none")
    per_sample.sum().backward()
    assert torch.isnan(per_sample).all()
    assert torch.isnan(z.grad).any(1).all() and torch.isnan(seg.grad).flatten(1).any(1).all()


@pytest.mark.interpreter
def test_the_counter_sees_inside_custom_operators_and_triton_launches(monkeypatch):
    """Called as its custom operator (as torch.compile calls it; DAAL_EAGER_OPS=custom) the kNN is
    one custom operator whose body's aten operators and Triton kernels count; called in eager
    mode (an autograd.Function around the same body) it launches exactly the same."""
    from daal_triton.kernels import _common, knn

    x = torch.randn(20, 16, requires_grad=True)
    counts = {}
    for mode in _common.EAGER_MODES:
        monkeypatch.setattr(_common, "EAGER_OPS", mode)
        x.grad = None
        with LaunchCount() as count:
            d, _ = knn.knn(x, x, 3, exclude_self=True)
            d.sum().backward()
        counts[mode] = count
    custom, function = counts["custom"], counts["function"]
    assert custom.custom == {"daal_triton.knn": 1, "daal_triton.knn_backward": 1}
    assert sum(custom.triton.values()) >= 3 and "_knn_fwd_kernel" in custom.triton
    assert custom.launches > sum(custom.triton.values()) or custom.aten_launches == 0
    assert function.custom == {"daal_triton.knn_backward": 1}  # the backward formula calls it
    assert function.triton == custom.triton and function.launches == custom.launches



@pytest.mark.interpreter
@pytest.mark.parametrize("counter_first", [True, False], ids=["counter-then-strict", "strict-then-counter"])
def test_a_launch_counts_once_whatever_patches_the_interpreter_again(monkeypatch, counter_first):
    """The counter and ``daal_testing.strict_interpreter_launches`` both wrap the interpreter's
    ``run``, and the strict check is installed again by every in-process bench ``--smoke`` run
    (bench/test_bench_tools.py calls tune_line_margin's main): each wrap, in either order and
    repeated, keeps one counter and one strict check, so one launch counts once (a second counter
    had counted every launch twice, in the tests that ran after such a run in the same worker)."""
    import triton
    import triton.language as tl
    from daal_testing import strict_interpreter_launches
    from daal_triton.kernels._common import interpreter_launch_point

    cls, name = interpreter_launch_point()  # its run (Triton 3.5: GridExecutor's call)
    monkeypatch.setattr(cls, name, getattr(cls, name))  # put back afterwards

    @triton.jit
    def _copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    x = torch.arange(16.0)
    y = torch.empty_like(x)
    steps = ["count", "strict", "count", "strict", "count"] if counter_first else ["strict", "count", "strict", "count"]
    for step in steps:
        if step == "strict":
            strict_interpreter_launches()
            continue
        with LaunchCount() as count:
            _copy[(1,)](x, y, BLOCK=16)
        assert dict(count.triton) == {"_copy": 1}
    with pytest.raises(TypeError, match="FLAT"):  # the strict check is still there
        _copy[(1,)](x, y, BLOCK=16, FLAT=False)

@pytest.mark.interpreter
def test_eager_calls_skip_every_custom_operator_dispatch(monkeypatch):
    """A plain eager forward+backward of the loss dispatches none of the package's custom
    operators (the forwards run as autograd.Functions, the backward operators' bodies straight:
    ``_common.eager`` / ``_common.direct``), and gives bit-identical values and gradients to the
    custom-operator path (``DAAL_EAGER_OPS=custom``, what torch.compile traces), which
    dispatches all ten (the profiler records each dispatched operator)."""
    from daal_triton.kernels import _common

    torch.manual_seed(0)
    loss = daal_triton.DAALLoss(7, 16)
    z = torch.randn(30, 16, requires_grad=True)
    y = torch.arange(30) % 5
    seen, results = {}, {}
    for mode in _common.EAGER_MODES:
        monkeypatch.setattr(_common, "EAGER_OPS", mode)
        z.grad = loss.segments.grad = None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            value = loss(z, y)
            value.backward()
        seen[mode] = {e.name for e in prof.events() if e.name.startswith("daal_triton::")}
        results[mode] = (value.detach(), z.grad.clone(), loss.segments.grad.clone())
    assert seen["function"] == set()
    ops = {"prepare", "knn", "density", "line_margin2", "combine"}
    assert seen["custom"] == {f"daal_triton::{op}{suffix}" for op in ops for suffix in ("", "_backward")}
    for a, b in zip(results["function"], results["custom"]):
        assert torch.equal(a, b)


@needs_kernels
def test_a_bad_eager_mode_is_refused(monkeypatch):
    from daal_triton.kernels import _common, knn

    monkeypatch.setattr(_common, "EAGER_OPS", "Custom")
    with pytest.raises(ValueError, match="DAAL_EAGER_OPS"):
        knn.knn(torch.randn(5, 3), torch.randn(5, 3), 2)


def test_the_counter_tells_copies_from_no_ops():
    a = torch.randn(3)
    with LaunchCount() as count:
        a.float()
        a.contiguous()
        a.double()
    assert count.launches == 1


@pytest.mark.interpreter
@pytest.mark.parametrize("bank", [False, True], ids=["batch", "memory_bank"])
def test_loss_forward_backward_launches(gpu_defaults, bank):
    """Issue 13: DAALLoss forward+backward at B = 180, C = 100 (Triton backend) launches at most
    MAX_LAUNCHES kernels (aten operators that launch work + Triton kernels), where the composition
    of plain PyTorch operators launched ~200; the reference backend is counted as the contrast."""
    counts = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        loss = daal_triton.DAALLoss(100, 64, backend=backend)
        z = torch.randn(180, 64, requires_grad=True)
        y = torch.arange(180) % 50
        kw = {}
        if bank:
            kw = dict(ref_emb=torch.randn(300, 64), ref_labels=torch.arange(300) % 100)
        loss(z, y, **kw).backward()  # one-time set-up is not a per-call cost
        with LaunchCount() as count:
            loss(z, y, **kw).backward()
        counts[backend] = count
    tri = counts["triton"]
    assert tri.syncs == {}
    assert tri.launches <= MAX_LAUNCHES, f"{tri.launches} launches:\n{tri.table()}"
    assert counts["reference"].launches > 3 * tri.launches  # the counter does see glue operators


@pytest.mark.interpreter
def test_merged_launches_at_b180(gpu_defaults, monkeypatch):
    """``DAAL_LAUNCHES=merged`` (the default) at B = 180, C = 100 with one split everywhere (as on
    an H200 at this size: tests/kernels, ``forward_splits`` and ``_num_splits``): 14 Triton
    launches per forward+backward where ``separate`` makes 18 (the kNN's finish in its forward;
    the line margin's own-class rows with the class statistics and its merge in the GEMM kernel;
    the last segment epilogue with dX), the same aten launches, and the same loss and gradients
    bit for bit."""
    from daal_triton.kernels import _common

    runs = {}
    for policy in ("separate", "merged"):
        monkeypatch.setenv(_common.LAUNCHES_ENV, policy)
        torch.manual_seed(0)
        loss = daal_triton.DAALLoss(100, 64)
        z = torch.randn(180, 64, requires_grad=True)
        y = torch.arange(180) % 50
        with LaunchCount() as count:
            value = loss(z, y)
            value.backward()
        runs[policy] = (count, value.detach(), z.grad, loss.segments.grad)
    (sep, *a), (mer, *b) = runs["separate"], runs["merged"]
    assert sum(sep.triton.values()) == 18 and sum(mer.triton.values()) == 14, (sep.triton, mer.triton)
    assert sep.aten_launches == mer.aten_launches and mer.syncs == {}
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_check_values_on_cpu_cannot_be_turned_off():
    """CPU tensors are always checked: bad labels are a ValueError naming the argument."""
    y = torch.tensor([0, 1, 11])
    with pytest.raises(ValueError, match="labels"):
        daal_triton.daal_loss(torch.randn(3, 4), y, torch.randn(11, 2, 4), check_values=False)


@pytest.mark.parametrize("value, env, expected", [
    (None, None, False), (None, "1", True), (None, "0", False), (True, None, True), (False, "1", False),
    (None, "true", True), (None, " Yes ", True), (None, "ON", True), (None, "off", False), (None, "2", False),
])
def test_value_checks_switch_for_gpu_tensors(monkeypatch, value, env, expected):
    if env is None:
        monkeypatch.delenv(validation.CHECK_VALUES_ENV, raising=False)
    else:
        monkeypatch.setenv(validation.CHECK_VALUES_ENV, env)
    assert validation.value_checks_on(torch.device("cuda"), value) is expected
    assert validation.value_checks_on(torch.device("cpu"), value) is True


def test_check_values_true_reaches_every_check(monkeypatch):
    """``check_values=True`` on ``daal_loss`` and on ``DAALLoss`` (its labels and a miner's tuple)
    reaches the value checks: here they answer as on a GPU, where they run only when asked."""
    def as_on_gpu(device, check_values=None):
        return bool(check_values)

    patch_value_checks(monkeypatch, as_on_gpu)
    z, seg, bad = torch.randn(4, 3), torch.randn(2, 2, 3), torch.tensor([0, 1, 2, 0])
    assert torch.isnan(daal_triton.daal_loss(z, bad, seg, backend="reference"))  # unchecked: NaN
    with pytest.raises(ValueError, match="labels must lie in"):
        daal_triton.daal_loss(z, bad, seg, check_values=True, backend="reference")
    loss = daal_triton.DAALLoss(2, 3, check_values=True, backend="reference")
    with pytest.raises(ValueError, match="labels must lie in"):
        loss(z, bad)
    with pytest.raises(ValueError, match="indices_tuple must index the batch's 4 rows"):
        loss(z, torch.tensor([0, 1, 1, 0]), (torch.tensor([0, 4]), torch.tensor([1, 2])))


@pytest.mark.gpu
def test_cuda_default_call_never_syncs():
    loss = daal_triton.DAALLoss(100, 64).cuda()
    z = torch.randn(180, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (180,), device="cuda")
    loss(z, y).backward()
    with LaunchCount() as count:
        loss(z, y).backward()
    assert count.syncs == {}


@pytest.mark.gpu
def test_loss_is_captured_in_a_cuda_graph():
    """No host sync and static shapes: DAALLoss forward+backward replays from a CUDA graph and
    gives the eager values."""
    loss = daal_triton.DAALLoss(100, 64).cuda()
    z = torch.randn(180, 64, device="cuda", requires_grad=True)
    y = torch.randint(0, 100, (180,), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (kernel compilation, allocator)
        for _ in range(2):
            z.grad = None
            loss.segments.grad = None
            loss(z, y).backward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    z.grad = None
    loss.segments.grad = None
    with torch.cuda.graph(graph):
        out = loss(z, y)
        out.backward()
    with torch.no_grad():
        z.copy_(torch.randn_like(z))
    graph.replay()
    torch.cuda.synchronize()
    z_eager = z.detach().clone().requires_grad_()
    eager = loss(z_eager, y)
    eager.backward()
    assert torch.allclose(out, eager, rtol=1e-4, atol=1e-6)
    assert torch.allclose(z.grad, z_eager.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
def test_loss_as_a_graphed_callable():
    """The README's recipe for small batches: ``torch.cuda.make_graphed_callables`` turns
    DAALLoss into one autograd node whose forward and backward replay CUDA graphs; values and
    gradients (embeddings and segments) equal the eager module's on new inputs of the same shape."""
    torch.manual_seed(0)
    loss = daal_triton.DAALLoss(100, 64).cuda()
    twin = daal_triton.DAALLoss(100, 64).cuda()
    twin.load_state_dict(loss.state_dict())
    z0 = torch.randn(180, 64, device="cuda", requires_grad=True)
    y0 = torch.randint(0, 100, (180,), device="cuda")
    graphed = torch.cuda.make_graphed_callables(loss, (z0, y0))
    for _ in range(2):  # new values each step, as in training; the graph copies them in
        z = torch.randn(180, 64, device="cuda", requires_grad=True)
        y = torch.randint(0, 100, (180,), device="cuda")
        loss.segments.grad = twin.segments.grad = None
        out = graphed(z, y)
        out.backward()
        z_eager = z.detach().clone().requires_grad_()
        eager = twin(z_eager, y)
        eager.backward()
        torch.cuda.synchronize()
        assert torch.allclose(out, eager, rtol=1e-4, atol=1e-6)
        assert torch.allclose(z.grad, z_eager.grad, rtol=1e-3, atol=1e-6)
        assert torch.allclose(loss.segments.grad, twin.segments.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_non_finite_embeddings_make_the_loss_nan(dtype):
    """The compiled kernels keep NaN as the interpreter does (PTX max.NaN.f32): with the default
    options (no value checks on CUDA tensors) a NaN embedding makes its sample's loss and
    gradient NaN, the other samples stay finite, and it is nobody's kNN neighbour."""
    z = torch.randn(180, 512, device="cuda").to(dtype)
    z[7, 3] = float("nan")
    z.requires_grad_(True)
    y = torch.arange(180, device="cuda") % 100
    loss = daal_triton.DAALLoss(100, 512, reduction="none").cuda()
    per_sample = loss(z, y)
    per_sample.sum().backward()
    others = torch.arange(180, device="cuda") != 7
    assert torch.isnan(per_sample[7]) and torch.isfinite(per_sample[others]).all()
    assert torch.isnan(z.grad[7]).any() and torch.isfinite(z.grad[others]).all()
    dist, index = daal_triton.knn(z.detach().float(), z.detach().float(), 4, exclude_self=True)
    assert (index[7] == -1).all() and not (index == 7).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, clamped", [(-1, 0), (-7, 0), (5, 4), (10 ** 6, 4)])
def test_out_of_range_label_without_checks_counts_in_its_clamped_class(gpu_defaults, backend, bad, clamped):
    """docs/method.md "Bad input": without value checks (``check_values=False``; on CPU tensors
    the checks are patched away as on a GPU) a label outside ``[0, C)`` is clamped into it, and
    the other samples still see that sample as a member of its clamped class, in the class's kNN
    radii (it is a neighbour, and it has neighbours) and so in its mean radius and margins: with
    ``reduction="none"`` their values, and the gradients of their sum (embeddings and segments,
    every row), are those of the batch with the label clamped (not a batch without the sample,
    nor one where the sample is no one's neighbour or has none). The clamped class has 4 or 5 other
    members (B = 23, C = 5), ``gamma = 1`` and margins inside ``[m_min, m_max]``, so a rule that
    left the sample out of the class's radii would move the margins of the class."""
    B, C, D, i = 23, 5, 33, 7
    g = torch.Generator().manual_seed(3)
    dtype = torch.float64 if backend == "reference" else torch.float32
    z = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    seg = (0.5 * torch.randn(C, 2, D, generator=g, dtype=torch.float64)).to(dtype)
    y_clamped = torch.arange(B) % C
    y_clamped[i] = clamped
    y_bad = y_clamped.clone()
    y_bad[i] = bad
    others = torch.arange(B) != i
    hp = dict(reduction="none", k=4, lambda_pull=0.1, tau=1.5, backend=backend)
    results = {}
    for name, y in (("bad", y_bad), ("clamped", y_clamped)):
        zz, ss = z.clone().requires_grad_(True), seg.clone().requires_grad_(True)
        per_sample = daal_triton.daal_loss(zz, y, ss, check_values=False, **hp)
        per_sample[others].sum().backward()
        results[name] = (per_sample.detach(), zz.grad, ss.grad)
    (v_bad, gz_bad, gs_bad), (v_ok, gz_ok, gs_ok) = results["bad"], results["clamped"]
    assert torch.isnan(v_bad[i]) and torch.isfinite(v_ok).all()
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(v_bad[others], v_ok[others], **tol)
    torch.testing.assert_close(gz_bad, gz_ok, **tol)
    torch.testing.assert_close(gs_bad, gs_ok, **tol)
    # the sample does count: its clamped class's margins differ from those of a batch without it
    parts = daal_triton.daal_loss(z, y_clamped, seg, backend="reference", return_parts=True, k=4, tau=1.5)
    without = daal_triton.daal_loss(z[others], y_clamped[others], seg, backend="reference",
                                    return_parts=True, k=4, tau=1.5)
    members = (y_clamped == clamped) & others
    assert members.sum() >= 4 and parts.valid[members].all()
    assert not torch.allclose(parts.margin[members], without.margin[members[others]], rtol=1e-3, atol=0)
    margins = parts.margin[y_clamped == clamped]
    assert ((margins > 0.05 + 1e-3) & (margins < 0.5 - 1e-3)).all(), margins
