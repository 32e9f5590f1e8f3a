"""The whole loss on the Triton path (fused kNN + fused line margin) against the float64 reference:
values and gradients, every term, the edge cases of docs/method.md, dtypes, autocast, memory banks, saved tensors,
and torch.compile(fullgraph=True)."""
import dataclasses

import pytest
import torch

import daal_triton as dt
from daal_testing import assert_close, needs_kernels, random_problem, tolerance

pytestmark = needs_kernels

# The interpreter on the CPU (IEEE float32 dots); CUDA tensors (TF32 dots) on a GPU machine.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TF32 = DEV == "cuda"
ALL_TERMS = dict(lambda_pull=0.3, lambda_dens=0.8, lambda_len=0.4, l_max=0.2, tau=1.7, gamma=1.5,
                 alpha=12.0, k=4)


def run(z, y, seg, backend, dtype=None, seg_dtype=None, **hp):
    z = z.detach().to(dtype or z.dtype).requires_grad_(True)
    seg = seg.detach().to(seg_dtype or seg.dtype).requires_grad_(True)
    loss = dt.daal_loss(z, y, seg, backend=backend, **hp)
    gz, gs = torch.autograd.grad(loss.sum(), (z, seg))
    return loss, gz, gs


def check_parity(z, y, seg, *, dtype=torch.float32, seg_dtype=torch.float32, **hp):
    out = run(z, y, seg, "triton", dtype, seg_dtype, **hp)
    # The oracle sees exactly the (rounded) inputs the fast path saw, in float64.
    ref = run(z.to(dtype).double(), y, seg.to(seg_dtype).double(), "reference", **hp)
    tol = tolerance(dtype if dtype != torch.float32 else seg_dtype, tf32=TF32)
    for name, a, b in zip(("loss", "d/dembeddings", "d/dsegments"), out, ref):
        assert_close(a, b, tol, name)
    assert out[0].dtype == torch.promote_types(torch.promote_types(dtype, seg_dtype), torch.float32)
    assert out[1].dtype == dtype and out[2].dtype == seg_dtype


@pytest.mark.parametrize("B,C,D", [(37, 11, 129), (20, 3, 2), (64, 40, 17),
                                   (181, 13, 33),  # 181: several row blocks of every kernel
                                   (21, 5, 2048)])  # wide (a ResNet-50's features): the D >= 512 blocks
@pytest.mark.parametrize("hp", [{}, ALL_TERMS], ids=["defaults", "all_terms"])
def test_parity_float32(B, C, D, hp):
    z, y, seg = random_problem(B, C, D, classes_present=range(min(C, 6)), device=DEV)
    check_parity(z, y, seg, **hp)


def test_margins_at_m0_zero_where_s_to_the_gamma_overflows():
    """m0 = 0 with a duplicate pair per class (radius floor 1e-6) and gamma = -7: s^gamma overflows
    float32, and the margin must still be m_min, as in float64 (the float32 reference gave NaN until
    2026-12-06; the kernel's non-propagating maximum gives m_min, held here on both machines)."""
    z, y, seg = random_problem(32, 6, 16, classes_present=range(6), device=DEV)
    for c in range(6):
        i = (y == c).nonzero().flatten()
        z[i[1]] = z[i[0]]
    check_parity(z, y, seg, m0=0.0, gamma=-7.0, k=1)


def test_reduction_none_parity():
    z, y, seg = random_problem(21, 5, 9, device=DEV)
    check_parity(z, y, seg, reduction="none", **ALL_TERMS)


@pytest.mark.parametrize("case", ["single_sample_class", "k_larger_than_classes", "one_class",
                                  "absent_class", "zero_length_segment", "duplicates",
                                  "zero_embedding", "batch_of_one", "unnormalised"])
def test_edge_cases(case):
    z, y, seg = random_problem(12, 4, 6, classes_present=[0, 1, 2], device=DEV)
    hp = dict(ALL_TERMS)
    if case == "single_sample_class":
        y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3], device=DEV)
    elif case == "k_larger_than_classes":
        hp["k"] = 50
    elif case == "one_class":
        seg, y = seg[:1], torch.zeros_like(y)
    elif case == "zero_length_segment":
        seg[1, 1] = seg[1, 0]
    elif case == "duplicates":
        z[3] = z[0]
        y[3] = y[0]
        z[5] = z[4]
    elif case == "zero_embedding":
        z[2] = 0.0
    elif case == "batch_of_one":
        z, y = z[:1], y[:1]
    elif case == "unnormalised":
        hp["normalize"] = False
    check_parity(z, y, seg, **hp)


def test_more_neighbours_than_the_density_kernel_takes():
    """k above the fused density kernel's MAX_K: the Triton backend runs the reference's density
    step on the fused kNN's output, and matches the float64 reference. The batch has more rows than
    k (the loss selects min(k, B) neighbours: with B = 12 the kernel ran and this test tested
    nothing), and the reference's density step is seen to run."""
    from daal_triton.kernels import density
    from daal_triton import reference

    calls = []
    real = reference.density

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    z, y, seg = random_problem(density.MAX_K + 9, 3, 5, classes_present=range(3), device=DEV)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reference, "density", spy)
        check_parity(z, y, seg, k=density.MAX_K + 1, tau=1.5)
    assert (len(z), density.MAX_K + 1) in calls, calls


@pytest.mark.parametrize("dtype,seg_dtype", [(torch.float16, torch.float32),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16)])
def test_half_precision_inputs(dtype, seg_dtype):
    z, y, seg = random_problem(30, 6, 24, device=DEV)
    check_parity(z, y, seg, dtype=dtype, seg_dtype=seg_dtype, **ALL_TERMS)


def test_autocast_keeps_float32():
    z, y, seg = random_problem(16, 4, 8, dtype=torch.float32, device=DEV)
    plain = dt.daal_loss(z, y, seg, backend="triton")
    with torch.autocast(DEV, dtype=torch.bfloat16):
        emb = torch.nn.functional.linear(z, torch.eye(8, device=DEV))  # bf16 under autocast, as a network's output
        assert emb.dtype == torch.bfloat16
        cast = dt.daal_loss(emb, y, seg, backend="triton")
    assert cast.dtype == torch.float32
    assert_close(cast, plain, tolerance(torch.bfloat16), "loss under autocast")
    # inside, the loss computes as without autocast: the same bits as the bf16 embeddings' call
    # outside it, and the float64 reference on those embeddings to float32's tolerance (bf16
    # arithmetic inside would be ~3e-4 off)
    assert torch.equal(cast, dt.daal_loss(emb.detach(), y, seg, backend="triton"))
    exact = dt.daal_loss(emb.detach().double(), y, seg.double(), backend="reference")
    assert_close(cast, exact, tolerance(torch.float32, tf32=TF32), "loss under autocast vs float64")


def test_memory_bank_parity():
    z, y, seg = random_problem(10, 3, 12, device=DEV)
    bank, bank_y = torch.randn(25, 12, dtype=torch.float64, device=DEV), torch.arange(25, device=DEV) % 3
    for includes in (False, True):
        ref_e = torch.cat([z, bank]) if includes else bank
        ref_y = torch.cat([y, bank_y]) if includes else bank_y
        results = []
        for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            zz, ss, rr = (t.detach().to(dtype).requires_grad_() for t in (z, seg, ref_e))
            loss = dt.daal_loss(zz, y, ss, ref_embeddings=rr, ref_labels=ref_y, ref_includes_batch=includes,
                                backend=backend, k=3, tau=1.5)
            results.append((loss, *torch.autograd.grad(loss, (zz, ss, rr))))
        assert results[1][3].abs().max() > 0, "the bank's rows get a gradient (the density term)"
        for name, a, b in zip(("loss", "d/dembeddings", "d/dsegments", "d/dbank"), *results):
            assert_close(a, b, tolerance(torch.float32, tf32=TF32), f"memory bank (includes batch: {includes}): {name}")


def test_fast_path_validates_like_the_reference():
    z, y, seg = random_problem(6, 3, 4, dtype=torch.float32, device=DEV)
    with pytest.raises(ValueError, match="labels must lie in"):
        dt.daal_loss(z, y + 3, seg, backend="triton", check_values=True)  # off by default on CUDA
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        dt.daal_loss(z, y, seg.to("meta"), backend="triton")
    with pytest.raises(ValueError, match="float64 inputs run on the reference backend"):
        dt.daal_loss(z.double(), y, seg, backend="triton")


def test_mixed_float64_inputs_run_on_the_reference():
    """``pairwise_distance``/``knn`` with one float64 operand: the promotion (float64) decides the
    backend, so "auto" runs the reference in float64 (not the kernels, which refuse float64)."""
    from daal_triton import reference

    x, y = torch.randn(7, 5, device=DEV), torch.randn(9, 5, dtype=torch.float64, device=DEV)
    d = dt.pairwise_distance(x, y)
    assert d.dtype == torch.float64 and torch.equal(d, reference.pairwise_distance(x, y))
    for q, r in ((x, y), (y, x)):
        dist, index = dt.knn(q, r, 3)
        want = reference.knn(q, r, 3)
        assert dist.dtype == torch.float64 and torch.equal(dist, want[0]) and torch.equal(index, want[1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_knn_passes_exclude_self_and_labels(backend):
    """``daal_triton.knn(..., exclude_self=True)``: row i is never its own neighbour, only
    same-label rows count, and the Triton backend returns the reference's neighbours."""
    from daal_triton import reference

    x = torch.randn(13, 6, device=DEV)
    y = torch.arange(13, device=DEV) % 3
    dist, index = dt.knn(x, x, 3, query_labels=y, ref_labels=y, exclude_self=True, backend=backend)
    want_d, want_i = reference.knn(x.double(), x.double(), 3, query_labels=y, ref_labels=y, exclude_self=True)
    assert not (index == torch.arange(13, device=DEV)[:, None]).any()
    assert torch.equal(index, want_i)
    assert_close(dist, want_d, tolerance(torch.float32, tf32=TF32), "knn distances")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_knn_of_no_queries_or_no_references(backend):
    """Zero queries give 0 x k; zero references give every query k empty slots (inf, -1), as
    rows with fewer than k candidates get (docs/method.md); on both backends."""
    r = torch.randn(6, 5, device=DEV)
    dist, index = dt.knn(torch.empty(0, 5, device=DEV), r, 3, backend=backend)
    assert dist.shape == index.shape == (0, 3) and dist.dtype == torch.float32 and index.dtype == torch.int64
    dist, index = dt.knn(torch.randn(4, 5, device=DEV), torch.empty(0, 5, device=DEV), 3, backend=backend)
    assert torch.equal(dist, torch.full((4, 3), float("inf"), device=DEV))
    assert torch.equal(index, torch.full((4, 3), -1, device=DEV))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_public_knn_and_pairwise_ignore_an_enclosing_autocast(backend):
    """Under ``torch.autocast`` (bfloat16) the distance operators compute as without it, like the
    loss: the reference's GEMM ran in bfloat16 there (9.8e-3 off float64 instead of 2.5e-6, other
    neighbours), while the kernels' did not, so the two backends disagreed."""
    x = torch.randn(37, 129, device=DEV)
    # each query has two references close by, told apart by distances far below bfloat16's resolution
    y = torch.cat([x + 0.01 * torch.randn_like(x), x + 0.01 * torch.randn_like(x), torch.randn(11, 129, device=DEV)])
    d, (kd, ki) = dt.pairwise_distance(x, y, backend=backend), dt.knn(x, y, 5, backend=backend)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        d_cast, (kd_cast, ki_cast) = dt.pairwise_distance(x, y, backend=backend), dt.knn(x, y, 5, backend=backend)
    assert d_cast.dtype == kd_cast.dtype == torch.float32
    assert torch.equal(d_cast, d) and torch.equal(kd_cast, kd) and torch.equal(ki_cast, ki)


@pytest.mark.interpreter  # bfloat16 on the CPU: Triton's interpreter has no bfloat16 dots
def test_bfloat16_distances_on_the_interpreter_run_the_reference():
    """The interpreter returned the 1e-6 floor for every bfloat16 pair and wrong neighbours, with
    no error: "auto" runs those inputs on the reference, a forced "triton" says why. The loss (it
    computes in float32) and float16 keep the kernels."""
    from daal_triton import reference
    from daal_triton.backend import choose_backend

    x, y = torch.randn(9, 16).bfloat16(), torch.randn(7, 16).bfloat16()
    assert torch.equal(dt.pairwise_distance(x, y), reference.pairwise_distance(x, y))
    d, i = dt.knn(x, y, 3)
    want_d, want_i = reference.knn(x, y, 3)
    assert torch.equal(i, want_i) and torch.equal(d, want_d)
    for call in (lambda: dt.pairwise_distance(x, y, backend="triton"), lambda: dt.knn(x, y, 3, backend="triton")):
        with pytest.raises(ValueError, match="interpreter cannot run bfloat16 dots"):
            call()
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu, torch.bfloat16) == "triton"  # the loss's choice
    assert choose_backend("auto", cpu, torch.float16, own_dots=True) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_pairwise_distance_on_the_triton_backend(dtype):
    """``daal_triton.pairwise_distance(x, y, backend="triton")``: the kernel's distances and
    gradients against the float64 reference, float32 out for half inputs, on an odd shape (and
    "auto" picks the same kernel where Triton runs)."""
    from daal_triton import reference

    x = torch.randn(37, 129, device=DEV).to(dtype).requires_grad_(True)
    y = torch.randn(11, 129, device=DEV).to(dtype).requires_grad_(True)
    g = torch.randn(37, 11, device=DEV)
    d = dt.pairwise_distance(x, y, backend="triton")
    assert d.dtype == torch.float32 and d.shape == (37, 11)
    xd, yd = x.detach().double().requires_grad_(True), y.detach().double().requires_grad_(True)
    want = reference.pairwise_distance(xd, yd)
    tol = tolerance(dtype, tf32=TF32)
    assert_close(d, want, tol, "distances")
    (d * g).sum().backward()
    (want * g.double()).sum().backward()
    assert_close(x.grad, xd.grad, tol, "dL/dx")
    assert_close(y.grad, yd.grad, tol, "dL/dy")
    assert torch.equal(dt.pairwise_distance(x, y), d)  # "auto": the same kernel


def test_aten_glue_runs_the_fused_knn_and_line_margin(monkeypatch):
    """``DAAL_GLUE=aten`` (the timing switch of daal_triton.functional): the fused kNN and line
    margin kernels run between the reference's step functions (and no fused prepare, density or
    combine), with the float64 reference's loss."""
    from daal_triton.launch_count import LaunchCount

    z, y, seg = random_problem(15, 4, 6, device=DEV)
    monkeypatch.setenv("DAAL_GLUE", "aten")
    with LaunchCount() as count:
        loss = dt.daal_loss(z.float(), y, seg.float(), backend="triton")
    kernels = " ".join(count.triton)
    assert "_knn_fwd_kernel" in kernels and "_lm2_fwd_kernel" in kernels, count.triton
    assert not any(w in kernels for w in ("_prepare_", "_density_", "_combine_")), count.triton
    assert_close(loss, dt.daal_loss(z, y, seg, backend="reference"), tolerance(torch.float32, tf32=TF32), "loss")
    # a misspelt value is refused, naming the variable, as the kernels' switches are (it ran "fused")
    monkeypatch.setenv("DAAL_GLUE", "Aten")
    with pytest.raises(ValueError, match=r"DAAL_GLUE must be one of \('fused', 'aten'\), got 'Aten'"):
        dt.daal_loss(z.float(), y, seg.float(), backend="triton")


def _largest_saved(backend, B, C, D):
    z, y, seg = random_problem(B, C, D, dtype=torch.float32, classes_present=range(8), device=DEV)
    z.requires_grad_(True)
    seg.requires_grad_(True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = dt.daal_loss(z, y, seg, backend=backend, **ALL_TERMS)
    loss.backward()
    return max(sizes)


def test_fast_path_saves_nothing_of_size_b_times_c():
    B, C, D = 16, 8192, 2  # B*C = 131072, while (B + C) * D is ~16k
    assert _largest_saved("triton", B, C, D) < B * C
    assert _largest_saved("reference", B, C, D) >= B * C  # the test can tell the difference


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).to(DEV)
    loss_fn = dt.DAALLoss(5, 8, backend="triton", lambda_pull=0.2, lambda_len=0.1).to(DEV)
    x, y = torch.randn(24, 10, device=DEV), torch.arange(24, device=DEV) % 5

    def step(inp, lab):
        return loss_fn(model(inp), lab)

    eager = step(x, y)
    eager_grads = torch.autograd.grad(eager, [*model.parameters(), loss_fn.segments])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    grads = torch.autograd.grad(out, [*model.parameters(), loss_fn.segments])
    assert_close(out, eager, 1e-6, "compiled loss")
    for g, e in zip(grads, eager_grads):
        assert_close(g, e, 1e-6, "compiled gradient")


def test_a_refused_input_under_fullgraph_names_the_check():
    """README: under ``torch.compile(fullgraph=True)`` a ``ValueError`` of the checks reaches the
    user as ``torch._dynamo.exc.Unsupported``, whose message quotes it (README said the
    ``ValueError`` was its ``__cause__``: it is Dynamo's ``ObservedValueErrorError``, a
    RuntimeError); without ``fullgraph``, as itself."""
    emb, labels, segments = torch.randn(10, 5), torch.randint(0, 4, (10,)), dt.init_segments(4, 6)
    said = "segments has dimension 6 but embeddings has 5"
    with pytest.raises(torch._dynamo.exc.Unsupported) as caught:
        torch.compile(lambda e, y, s: dt.daal_loss(e, y, s), fullgraph=True, backend="eager")(emb, labels, segments)
    # torch 2.14 writes ValueError('...'), torch 2.11 ValueError([ConstantVariable(str: '...')]): both quote it
    assert "ValueError(" in str(caught.value) and said in str(caught.value)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=said):
        torch.compile(lambda e, y, s: dt.daal_loss(e, y, s), backend="eager")(emb, labels, segments)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compiled_functional_takes_symbolic_hyperparameters(backend):
    """``torch.compile(dynamic=True, fullgraph=True)`` makes ``daal_loss``'s float hyperparameters
    symbolic: building ``Hyperparameters`` in the traced call must not need their values
    (``math.isfinite`` of one failed to trace; an integration probe, 2026-12-06); and a compiled
    ``DAALLoss`` sees a hyperparameter set as an attribute between calls."""
    torch.manual_seed(0)
    z = torch.randn(10, 6, device=DEV, requires_grad=True)
    y, seg = torch.arange(10, device=DEV) % 3, torch.randn(3, 2, 6, device=DEV, requires_grad=True)
    f = torch.compile(lambda e, lab, s, a: dt.daal_loss(e, lab, s, alpha=a, backend=backend),
                      fullgraph=True, dynamic=True, backend="aot_eager")
    for alpha in (16.0, 32.0, 8.0):
        out, eager = f(z, y, seg, alpha), dt.daal_loss(z, y, seg, alpha=alpha, backend=backend)
        assert_close(out, eager, 1e-6, f"alpha={alpha}")
        grads = torch.autograd.grad(out, [z, seg])
        for g, e in zip(grads, torch.autograd.grad(eager, [z, seg])):
            assert_close(g, e, 1e-6, f"gradient, alpha={alpha}")
    loss_fn = dt.DAALLoss(3, 6, backend=backend).to(DEV)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    seen = []
    for alpha in (16.0, 4.0):
        loss_fn.alpha = alpha
        seen.append(compiled(z, y))
        assert_close(seen[-1], loss_fn(z, y), 1e-6, f"module, alpha={alpha}")
    assert abs(seen[0].item() - seen[1].item()) > 1e-3  # a stale alpha would give the first value again


#: A schedule for each float hyperparameter (valid with the others at their defaults).
SCHEDULES = {"m0": (0.2, 0.3, 0.25, 0.35), "m_min": (0.05, 0.3, 0.4, 0.35), "m_max": (0.5, 0.3, 0.2, 0.25),
             "gamma": (1.0, 2.0, 0.5, 1.5), "tau": (0.8, 1.2, 1.0, 1.4), "lambda_pull": (0.1, 0.2, 0.3, 0.4),
             "lambda_dens": (0.5, 1.0, 2.0, 3.0), "lambda_len": (0.1, 0.5, 1.0, 2.0), "l_max": (1.0, 0.1, 0.05, 0.02)}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_compiled_reference_keeps_a_scheduled_hyperparameter_symbolic(name):
    """On the reference backend a compiled ``DAALLoss`` follows a schedule of any float
    hyperparameter with at most two graphs (the first value's, then a symbolic one), each step
    equal to eager. ``clamp``, ``pow`` and ``full_like`` with a float (``m_min``, ``m_max``,
    ``gamma``, ``m0``), and ``tau - r``, recompiled for every value, so a schedule ran uncompiled
    after 8 steps, or failed with ``fullgraph=True`` (a long-run probe, 2026-12-07)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    z = torch.randn(24, 8, device=DEV, requires_grad=True)
    y = torch.arange(24, device=DEV) % 5
    loss_fn = dt.DAALLoss(5, 8, backend="reference", lambda_pull=0.1, lambda_len=0.1, tau=1.5).to(DEV)
    with torch.no_grad():  # every term depends on its hyperparameters: radii below tau, segments above l_max
        loss_fn.segments.mul_(10.0)
    dynamo.reset()
    counters.clear()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    seen = []
    for value in SCHEDULES[name]:
        setattr(loss_fn, name, value)
        out = compiled(z, y)
        assert_close(out, loss_fn(z, y), 1e-6, f"{name}={value}")
        seen.append(out.item())
    assert counters["stats"]["unique_graphs"] <= 2, f"{name}: one graph per value"
    assert len({round(v, 7) for v in seen}) > 1, f"{name}: the schedule changes nothing here"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_export_with_a_dynamic_batch(backend):
    """``torch.export`` with a dynamic batch size: the loss's ``k = min(hp.k, B)`` is symbolic
    there, and the kernels specialise it (a guard B >= k) instead of refusing it as a bad ``k``
    (an integration probe, 2026-12-06); the exported program matches eager at other sizes. The
    reference takes a lower bound under ``k`` too (its sort's first ``k`` columns were a view whose
    contiguity guarded ``B != k``: export refused a lower bound of ``k``)."""
    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = dt.DAALLoss(3, 6, backend=backend, lambda_pull=0.1)

        def forward(self, e, lab):
            return self.loss(e, lab)

    torch.manual_seed(0)
    step = Step().to(DEV)
    low = 3 if backend == "triton" else 2  # k = 3: the kernels specialise min(k, B)
    # no upper bound (the kNN's int32 check was a guard N <= 2^31 - 1 that export refused: a probe, 2026-12-07)
    batch = torch.export.Dim("batch", min=low)
    e, lab = torch.randn(16, 6, device=DEV), torch.arange(16, device=DEV) % 3
    program = torch.export.export(step, (e, lab), dynamic_shapes=({0: batch}, {0: batch}))
    for n in (16, 11, 4, 3, low):
        e, lab = torch.randn(n, 6, device=DEV), torch.arange(n, device=DEV) % 3
        assert_close(program.module()(e, lab), step(e, lab), 1e-6, f"B={n}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_export_returns_the_parts_and_saves_them(tmp_path, backend):
    """``return_parts=True`` under ``torch.export``: ``DAALParts`` is a registered pytree node, so
    the program exports, matches eager field by field and survives ``save``/``load`` (it was
    "not a known type": an integration probe, 2026-12-06)."""
    class Parts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = torch.nn.Parameter(torch.randn(3, 2, 6))

        def forward(self, e, lab):
            return dt.daal_loss(e, lab, self.seg, backend=backend, return_parts=True, lambda_pull=0.1)

    torch.manual_seed(0)
    step = Parts().to(DEV)
    e, lab = torch.randn(12, 6, device=DEV), torch.arange(12, device=DEV) % 3
    path = tmp_path / "parts.pt2"
    torch.export.save(torch.export.export(step, (e, lab)), str(path))
    out, eager = torch.export.load(str(path)).module()(e, lab), step(e, lab)
    assert isinstance(out, dt.DAALParts)
    for f in dataclasses.fields(eager):
        a, b = getattr(out, f.name), getattr(eager, f.name)
        assert (a is None) == (b is None), f.name
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f.name
            assert torch.equal(a, b) if not b.is_floating_point() else torch.allclose(a, b, rtol=1e-6, atol=0), f.name


@pytest.mark.gpu
def test_torch_compile_inductor_on_gpu():
    model = torch.nn.Linear(32, 64).cuda()
    loss_fn = dt.DAALLoss(10, 64).cuda()
    x, y = torch.randn(40, 32, device="cuda"), (torch.arange(40) % 10).cuda()
    step = lambda a, b: loss_fn(model(a), b)  # noqa: E731
    eager = step(x, y)
    compiled = torch.compile(step, fullgraph=True)(x, y)
    compiled.backward()
    assert_close(compiled, eager, 5e-3, "inductor-compiled loss")
    assert torch.isfinite(loss_fn.segments.grad).all()


@pytest.mark.gpu
def test_tensors_on_another_gpu_than_the_current_one():
    """Triton launches on the current device: the loss (forward and backward), the kNN and the
    pairwise distance on cuda:1 while cuda:0 is current give what they give with cuda:1 current
    (core._on_device). Needs two GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two CUDA GPUs, this machine has {torch.cuda.device_count()}")
    torch.cuda.set_device(0)
    z, y, seg = random_problem(37, 11, 129, dtype=torch.float32)
    out = {}
    for current in (1, 0):
        torch.cuda.set_device(current)
        zz = z.to("cuda:1").requires_grad_()
        module = dt.DAALLoss(11, 129, backend="triton").to("cuda:1")
        with torch.no_grad():
            module.segments.copy_(seg)
        loss = module(zz, y.to("cuda:1"))
        loss.backward()
        d, i = dt.knn(zz.detach(), zz.detach(), 3, backend="triton")
        pw = dt.pairwise_distance(zz.detach(), zz.detach(), backend="triton")
        out[current] = [t.cpu() for t in (loss.detach(), zz.grad, module.segments.grad, d, i, pw)]
    torch.cuda.set_device(0)
    for a, b in zip(out[0], out[1]):  # (the kNN backward's atomics may reorder the last bits)
        assert torch.equal(a, b) if not a.is_floating_point() else torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_cpu_labels_beside_cuda_embeddings_on_gpu():
    """pytorch-metric-learning's convention: CPU labels (a DataLoader's) with CUDA embeddings are
    moved to the GPU, the bank's labels too; the same loss and gradient as CUDA labels."""
    z, y, seg = random_problem(37, 11, 129, device="cuda")
    bank, bank_y = torch.randn(20, 129, device="cuda"), torch.arange(20) % 11
    module = dt.DAALLoss(11, 129).cuda()
    out = {}
    for where in ("cpu", "cuda"):
        zz = z.float().clone().requires_grad_(True)
        loss = module(zz, y.to(where), ref_emb=bank, ref_labels=bank_y.to(where))
        out[where] = (loss.detach(), torch.autograd.grad(loss, zz)[0])
    for what, a, b in zip(("loss", "d/dembeddings"), out["cpu"], out["cuda"]):  # atomics may reorder sums
        assert_close(a, b, 1e-6, what)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_parity_on_gpu(dtype):
    z, y, seg = random_problem(180, 100, 512, device="cuda")
    out = run(z, y, seg, "triton", dtype, torch.float32, **ALL_TERMS)
    ref = run(z.to(dtype).double(), y, seg.double(), "reference", **ALL_TERMS)
    tol = tolerance(dtype, tf32=True)
    for name, a, b in zip(("loss", "d/dembeddings", "d/dsegments"), out, ref):
        assert_close(a, b, tol, name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_miner_weights_parity(reduction):
    """A miner's tuple (per-sample weights on the line, pull and density terms) on the Triton
    backend against the float64 reference: values and gradients, weights far from uniform."""
    z, y, seg = random_problem(37, 5, 24, classes_present=range(5), device=DEV)
    g = torch.Generator().manual_seed(3)
    anchors = torch.randint(0, 30, (60,), generator=g).to(DEV)  # rows 30-36 in no pair: weight 0
    tup = (anchors, torch.randint(0, 30, (60,), generator=g).to(DEV), anchors[:20],
           torch.randint(0, 30, (20,), generator=g).to(DEV))
    results = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        loss = dt.DAALLoss(5, 24, backend=backend, reduction=reduction, lambda_pull=0.2, tau=1.5).to(DEV, dtype)
        with torch.no_grad():
            loss.segments.copy_(seg)
        zz = z.to(dtype).requires_grad_(True)
        out = loss(zz, y, tup)
        results.append((out, *torch.autograd.grad(out.sum(), (zz, loss.segments))))
    weights = dt.loss.miner_weights(tup, 37, device=DEV)
    assert (weights == 0).any() and weights.min() < weights.max() < 1.01, "the weights are uneven"
    for name, a, b in zip(("loss", "d/dembeddings", "d/dsegments"), *results):
        assert_close(a, b, tolerance(torch.float32, tf32=TF32), f"miner weights: {name}")


def test_parts_match_the_reference():
    """``return_parts=True`` on the Triton backend: every part (the line/pull split, the density
    and length terms, per-sample values, radii, validity, margins, neighbours) against the
    float64 reference, with every term switched on and a class of one sample (invalid)."""
    z, y, seg = random_problem(41, 7, 19, classes_present=range(7), device=DEV)
    y[y == 5] = 4
    y[1] = 5  # class 5 a singleton: sample 1 has no neighbour (invalid)
    fast = dt.daal_loss(z.float(), y, seg.float(), backend="triton", return_parts=True, **ALL_TERMS)
    ref = dt.daal_loss(z, y, seg, backend="reference", return_parts=True, **ALL_TERMS)
    tol = tolerance(torch.float32, tf32=TF32)
    assert not ref.valid[1] and torch.equal(fast.valid, ref.valid)
    for name in ("loss", "line", "pull", "density", "length", "per_sample", "margin"):
        assert_close(getattr(fast, name), getattr(ref, name), tol, name)
    assert_close(fast.radius[ref.valid], ref.radius[ref.valid], tol, "radius")
    assert torch.isinf(fast.radius[~ref.valid]).all() and torch.isinf(ref.radius[~ref.valid]).all()
    assert torch.equal(fast.neighbors, ref.neighbors)
