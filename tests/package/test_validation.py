"""Bad input raises ValueError naming the argument, on every public entry point."""
import os
import subprocess
import sys

import pytest
import torch

import daal_triton as dt
from daal_testing import needs_kernels, assert_close, tolerance
from daal_triton.backend import choose_backend


def good(B=6, C=3, D=4):
    z = torch.randn(B, D)
    y = torch.arange(B) % C
    seg = torch.randn(C, 2, D)
    return z, y, seg


def raises(match, fn, *args, **kw):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_loss_errors_name_the_argument(backend):
    f = lambda *a, **k: dt.daal_loss(*a, backend=backend, **k)  # noqa: E731
    z, y, seg = good()
    raises("labels must lie in", f, z, torch.tensor([0, 1, 2, 3, 0, 1]), seg)
    raises("labels must lie in", f, z, torch.tensor([0, 1, 2, -1, 0, 1]), seg)
    raises("embeddings must have 2 dimensions", f, z[None], y, seg)
    raises("segments must have 3 dimensions", f, z, y, seg[:, 0])
    raises(r"segments must have shape \(C, 2, D\)", f, z, y, torch.randn(3, 3, 4))
    raises(r"segments must have shape \(C, 2, D\) with C >= 1, got \(0, 2, 4\)", f, z, y, torch.randn(0, 2, 4))
    raises("segments has dimension 5", f, z, y, torch.randn(3, 2, 5))
    raises("labels must have 6 entries", f, z, y[:5], seg)
    raises("labels must be 1-D", f, z, y[:, None], seg)
    raises("labels must be an integer tensor", f, z, y.float(), seg)
    raises("labels must be an integer tensor, got dtype torch.bool", f, z, y > 0, seg)
    raises("labels must be an integer tensor, got dtype torch.complex64", f, z, y.to(torch.complex64), seg)
    raises("embeddings must be float16, bfloat16, float32 or float64, got dtype torch.int64", f, z.long(), y, seg)
    bad = z.clone(); bad[2, 1] = float("nan")
    raises("embeddings contains NaN or inf", f, bad, y, seg)
    bad = z.clone(); bad[0, 0] = float("inf")
    raises("embeddings contains NaN or inf", f, bad, y, seg)
    bad = seg.clone(); bad[1, 1, 2] = float("-inf")
    raises("segments contains NaN or inf", f, z, y, bad)
    raises("all tensors must be on one device: .*segments on meta", f, z, y, seg.to("meta"))
    raises("all tensors must be on one device: .*labels on meta", f, z, y.to("meta"), seg)  # no values to move
    raises("k must be an integer >= 1", f, z, y, seg, k=0)
    raises("k must be an integer >= 1", f, z, y, seg, k=2.0)
    raises(r"k must be an integer in \[1, 2147483647\], got 18446744073709551616", f, z, y, seg, k=2**64)
    raises(r"k must be an integer in \[1, 2147483647\]", dt.DAALLoss, 3, 4, k=2**63 - 1)  # when it is built
    raises("reduction must be", f, z, y, seg, reduction="sum")
    raises("alpha must be > 0", f, z, y, seg, alpha=0.0)
    raises("m_min and m_max", f, z, y, seg, m_min=0.6, m_max=0.5)
    raises("lambda_dens must be >= 0", f, z, y, seg, lambda_dens=-1.0)
    raises("embeddings must have at least one row", f, z[:0], y[:0], seg)
    raises("embeddings must be a torch.Tensor", f, z.tolist(), y, seg)
    # the optional tensors too (a NumPy array's .device, the string "cpu", read as another device)
    raises("ref_labels must be a torch.Tensor, got list", f, z, y, seg, ref_embeddings=z.clone(), ref_labels=y.tolist())
    raises("ref_embeddings must be a torch.Tensor, got ndarray", f, z, y, seg, ref_embeddings=z.numpy(), ref_labels=y)
    raises("ref_emb must be a torch.Tensor, got list", dt.DAALLoss(3, 4, backend=backend), z, y,
           ref_emb=z.tolist(), ref_labels=y)
    raises("ref_embeddings and ref_labels must be given together", f, z, y, seg, ref_embeddings=z)
    raises("ref_embeddings and ref_labels must be given together", f, z, y, seg, ref_labels=y)
    raises("ref_embeddings must have 4 columns", f, z, y, seg, ref_embeddings=torch.randn(5, 3),
           ref_labels=torch.zeros(5, dtype=torch.long))
    raises("ref_labels must have 5 entries", f, z, y, seg, ref_embeddings=torch.randn(5, 4),
           ref_labels=torch.zeros(4, dtype=torch.long))
    # flags: a string reads as true, so it is refused rather than guessed at
    bank, bank_y = torch.cat([z, torch.randn(3, 4)]), torch.cat([y, torch.arange(3)])
    raises("ref_includes_batch must be True or False, got 'False'", f, z, y, seg, ref_embeddings=bank,
           ref_labels=bank_y, ref_includes_batch="False")
    # a reference set said to start with the batch must hold at least its B rows
    raises("ref_includes_batch=True needs ref_embeddings to start with the batch's 6 rows, got 5 rows", f, z, y,
           seg, ref_embeddings=z[:5], ref_labels=y[:5], ref_includes_batch=True)
    raises("return_parts must be True or False, got 'yes'", f, z, y, seg, return_parts="yes")
    raises("check_values must be None, True or False, got 'yes'", f, z, y, seg, check_values="yes")
    # flags that must be given: None is no answer either
    for flag in ("return_parts", "ref_includes_batch", "normalize"):
        raises(f"{flag} must be True or False, got None", f, z, y, seg, **{flag: None})


def test_module_errors():
    raises("num_classes must be an integer >= 1", dt.DAALLoss, 0, 4)
    raises("embedding_dim must be an integer >= 1", dt.DAALLoss, 3, 0)
    loss = dt.DAALLoss(3, 4, backend="reference")
    z, y, _ = good()
    raises("segments has dimension 4 but embeddings has 5", loss, torch.randn(6, 5), y)
    raises("labels must lie in", loss, z, y + 1)


def test_knn_and_pairwise_errors():
    q, r = torch.randn(4, 3), torch.randn(5, 3)
    raises("query and ref must have the same number of columns", dt.knn, q, torch.randn(5, 2), 2)
    raises("k must be an integer >= 1", dt.knn, q, r, 0)
    raises(r"k must be an integer in \[1, 2147483647\], got 2147483648", dt.knn, q, r, 2**31)
    raises("exclude_self must be True or False, got 'False'", dt.knn, q, r, 2, exclude_self="False")
    raises("exclude_self must be True or False, got 1", dt.knn, q, r, 2, exclude_self=1)
    raises("query_labels and ref_labels must be given together", dt.knn, q, r, 2,
           query_labels=torch.zeros(4, dtype=torch.long))
    raises("ref_labels must have 5 entries", dt.knn, q, r, 2, query_labels=torch.zeros(4, dtype=torch.long),
           ref_labels=torch.zeros(3, dtype=torch.long))
    # uint64 labels beyond int64 would match negative ones (both backends compare as int64)
    huge = torch.tensor([0, 1, 2, 2**64 - 1], dtype=torch.uint64)
    raises(r"query_labels holds values above 2\*\*63 - 1", dt.knn, q, r, 2, query_labels=huge,
           ref_labels=torch.tensor([0, 1, 2, 3, -1]))
    raises(r"ref_labels holds values above 2\*\*63 - 1", dt.knn, r, q, 2, query_labels=torch.arange(5),
           ref_labels=huge)
    dt.knn(q, r, 2, query_labels=torch.tensor([0, 1, 2, 2**63 - 1], dtype=torch.uint64), ref_labels=torch.arange(5))  # fine
    raises("query must be float16, bfloat16, float32 or float64", dt.knn, q.int(), r, 2)
    raises("query_labels must have 4 entries", dt.knn, q, r, 2, query_labels=torch.zeros(3, dtype=torch.long),
           ref_labels=torch.zeros(5, dtype=torch.long))
    raises("query contains NaN", dt.knn, torch.full((4, 3), float("nan")), r, 2)
    raises("query_labels must be a torch.Tensor, got list", dt.knn, q, r, 2, query_labels=[0, 1, 2, 3],
           ref_labels=torch.zeros(5, dtype=torch.long))
    raises("ref_labels must be a torch.Tensor, got ndarray", dt.knn, q, r, 2,
           query_labels=torch.zeros(4, dtype=torch.long), ref_labels=torch.zeros(5, dtype=torch.long).numpy())
    raises("all tensors must be on one device: .*ref_labels on meta", dt.knn, q, r, 2,
           query_labels=torch.zeros(4, dtype=torch.long), ref_labels=torch.zeros(5, dtype=torch.long, device="meta"))
    raises("ref contains NaN", dt.knn, q, r.log() - r.log() * 0 + float("nan"), 2)
    raises("x and y must have the same number of columns", dt.pairwise_distance, q, torch.randn(2, 4))
    raises("y must have 2 dimensions", dt.pairwise_distance, q, r[0])
    raises("y contains NaN", dt.pairwise_distance, q, torch.full((2, 3), float("nan")))
    raises("all tensors must be on one device", dt.pairwise_distance, q, r.to("meta"))


@pytest.mark.parametrize("backend, dtype", [
    ("reference", torch.float32), ("reference", torch.bfloat16),
    # bfloat16 knn/pairwise_distance need a GPU on the kernels (the interpreter has no bf16 dot)
    pytest.param("triton", torch.float32, marks=[pytest.mark.interpreter, needs_kernels])])
def test_rows_whose_squared_distances_overflow_are_named(backend, dtype):
    """Finite rows of norm beyond 2^62 (float32 and bfloat16 rows reach 3e38) gave NaN distances
    and "no neighbour" (-1) on both backends: refused, naming the argument and the row. At the
    limit the distances are finite and right (GEMM form: ~sqrt(eps) of the norm); float64 rows,
    computed in float64, are not refused."""
    D = 129
    x = torch.nn.functional.normalize(torch.randn(9, D, dtype=torch.float64), dim=1) * 2.0 ** 62 * 0.999
    x[0] = x[1]
    x[2] = -x[3]
    big = x.clone()
    big[5] *= 1.01
    raises(r"query: row 5 has norm 4.6\de\+18, above 4.61e\+18 \(2\^62\): its squared distances overflow float32",
           dt.knn, big.to(dtype), x.to(dtype), 2, backend=backend)
    from daal_triton import validation  # no float64 copy of float32 rows (MPS has none: a TypeError there)
    double = torch.Tensor.double
    try:
        torch.Tensor.double = lambda self: pytest.fail("a float64 copy of the rows")
        raises(r"y: row 5 has norm 4.6\de\+18", validation.check_distance_range, big.to(dtype), "y", torch.float32)
    finally:
        torch.Tensor.double = double
    raises("ref: row 5 has norm", dt.knn, x.to(dtype), big.to(dtype), 2, backend=backend)
    raises("y: row 5 has norm", dt.pairwise_distance, x.to(dtype), big.to(dtype), backend=backend)
    xs = x.to(dtype).requires_grad_()
    d = dt.pairwise_distance(xs, xs, backend=backend)
    d.sum().backward()
    want = torch.cdist(xs.detach().double(), xs.detach().double())
    assert torch.isfinite(d).all() and torch.isfinite(xs.grad).all()
    assert (d.double() - want).abs().max() < 1e-3 * want.max()
    dist, index = dt.knn(xs.detach(), xs.detach(), 3, exclude_self=True, backend=backend)
    assert torch.isfinite(dist).all() and (index >= 0).all()
    assert index[0, 0] == 1 and index[1, 0] == 0
    d64 = dt.pairwise_distance(big, big)  # float64: its own limit, 2^510
    assert torch.isfinite(d64).all()
    # the loss uses its rows as they are with normalize=False (a review: NaN from finite rows)
    y, seg = torch.arange(9) % 3, torch.randn(3, 2, D, dtype=dtype)
    raises("embeddings: row 5 has norm", dt.daal_loss, big.to(dtype), y, seg, normalize=False, backend=backend)
    raises("ref_embeddings: row 5 has norm", dt.daal_loss, x.to(dtype), y, seg, normalize=False, backend=backend,
           ref_embeddings=big.to(dtype), ref_labels=y)
    assert torch.isfinite(dt.daal_loss(big.to(dtype), y, seg, backend=backend))  # normalised: norm 1


def _not_dense(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t`` in ``layout``: "sparse_coo", "sparse_csr" (2-D; 1-D tensors stay COO), "mkldnn" (float32;
    others COO) or "nested" (one component per row, or the vector itself)."""
    if layout == "nested":
        return torch.nested.nested_tensor(list(t) if t.ndim > 1 else [t])
    if layout == "sparse_csr" and t.ndim == 2:
        return t.to_sparse_csr()
    if layout == "mkldnn" and t.dtype == torch.float32:
        return t.to_mkldnn()
    return t.to_sparse()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[pytest.mark.interpreter, needs_kernels])])
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn", "nested"])
def test_a_tensor_that_is_not_dense_is_named(backend, layout):
    """Sparse, mkldnn and nested tensors: a ValueError naming the argument, not an error from deep
    inside torch (a user's-eye probe, 2026-12-06, found each of these failing so)."""
    z, y, seg = good()
    bank, bank_y = torch.randn(5, 4), torch.arange(5) % 3
    loss = dt.DAALLoss(3, 4, backend=backend)
    f = lambda *a, **k: dt.daal_loss(*a, backend=backend, **k)  # noqa: E731
    nd = lambda t: _not_dense(t, layout)  # noqa: E731
    kind = "a nested tensor" if layout == "nested" else "layout torch."
    calls = [
        ("embeddings", loss, (nd(z), y), {}),
        ("labels", loss, (z, nd(y)), {}),
        ("ref_emb", loss, (z, y), {"ref_emb": nd(bank), "ref_labels": bank_y}),
        ("ref_labels", loss, (z, y), {"ref_emb": bank, "ref_labels": nd(bank_y)}),
        ("indices_tuple's tensors", loss, (z, y, (nd(torch.tensor([0, 1])), torch.tensor([1, 2]),
                                                   torch.tensor([2, 3]))), {}),
        ("segments", f, (z, y, nd(seg)), {}),
        ("query", dt.knn, (nd(z), bank, 2), {"backend": backend}),
        ("ref", dt.knn, (z, nd(bank), 2), {"backend": backend}),
        ("query_labels", dt.knn, (z, bank, 2), {"query_labels": nd(y), "ref_labels": bank_y, "backend": backend}),
        ("x", dt.pairwise_distance, (nd(z), bank), {"backend": backend}),
        ("y", dt.pairwise_distance, (z, nd(bank)), {"backend": backend}),
    ]
    for name, fn, args, kw in calls:
        with pytest.raises(ValueError) as err:
            fn(*args, **kw)
        assert str(err.value).startswith(f"{name} must be dense (torch.strided), got {kind}"), (name, str(err.value))
    mem = dt.MemoryBank(8, 4)
    for name, args in (("embeddings", (nd(z), y)), ("labels", (z, nd(y)))):
        with pytest.raises(ValueError, match=f"^{name} must be dense"):
            mem.enqueue(*args)
    # the same calls with dense tensors pass (the check refuses the layout, nothing else)
    assert torch.isfinite(loss(z, y, (torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([2, 3]))))


@needs_kernels
def test_backend_choice(monkeypatch):
    raises("backend must be one of", choose_backend, "cuda", torch.device("cpu"))
    assert choose_backend("reference", torch.device("cpu")) == "reference"
    assert choose_backend("auto", torch.device("cpu"), torch.float64) == "reference"
    raises("float64 inputs run on the reference backend", choose_backend, "triton",
           torch.device("cpu"), torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend("auto", torch.device("cpu")) == "reference"
    raises("backend='triton' cannot run here: tensors are on 'cpu'", choose_backend, "triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend("auto", torch.device("cpu")) == "triton"


@needs_kernels
@pytest.mark.parametrize("capability,auto,forced", [
    ((9, 0), "triton", "triton"), ((8, 0), "triton", "triton"), ((12, 0), "triton", "triton"),
    ((7, 5), "reference", "triton"), ((7, 0), "reference", "triton"),
    ((6, 1), "reference", "the GPU is sm_61; the kernels need sm_70 or later")])
def test_backend_choice_by_gpu(monkeypatch, capability, auto, forced):
    """On a GPU "auto" runs the kernels from sm_80 (Triton's supported GPUs); a forced "triton"
    from sm_70 (what they are built for, tests/kernels/test_kernel_launched_builds.py); older
    GPUs, and ROCm's, are refused by name."""
    from daal_triton.kernels import _common as kc

    monkeypatch.setattr(kc, "_CAPABILITY", {0: capability})
    monkeypatch.setattr(torch.version, "hip", None)
    gpu = torch.device("cuda", 0)
    assert choose_backend("auto", gpu) == auto
    assert choose_backend("reference", gpu) == "reference"
    if forced in ("triton",):
        assert choose_backend("triton", gpu) == "triton"
    else:
        raises(f"backend='triton' cannot run here: {forced}", choose_backend, "triton", gpu)
    assert choose_backend("auto", gpu, torch.float64) == "reference"
    monkeypatch.setattr(torch.version, "hip", "6.4.0")  # a ROCm build: its GPUs are "cuda" devices
    assert choose_backend("auto", gpu) == "reference"
    raises("backend='triton' cannot run here: ROCm GPUs run the reference backend", choose_backend, "triton", gpu)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")  # PyTorch's own, about the same
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_torchscript_is_refused_with_what_works(backend):
    """``torch.jit.script(DAALLoss)`` failed on ``**kwargs`` deep inside, ``torch.jit.trace`` of the
    Triton backend handed a kernel a size as a pointer, and a trace of the reference dropped the
    value checks (a machinery probe, 2026-12-07): each is a NotImplementedError naming
    torch.compile and torch.export."""
    z, y, seg = good(B=9, C=3, D=5)
    module = dt.DAALLoss(3, 5, backend=backend)
    with pytest.raises(NotImplementedError, match=r"^DAALLoss cannot be compiled by TorchScript.*torch.compile and torch.export"):
        torch.jit.script(module)
    calls = {"the DAAL loss": (module, (z, y)), "knn": (lambda q: dt.knn(q, z, 2, backend=backend)[0], (z,)),
             "pairwise_distance": (lambda q: dt.pairwise_distance(q, z, backend=backend), (z,))}
    for name, (f, args) in calls.items():
        with pytest.raises(NotImplementedError, match=f"^{name}.* cannot be compiled by TorchScript"):
            torch.jit.trace(f, args, check_trace=False)
    assert module(z, y).isfinite()  # and outside TorchScript, as before


@pytest.mark.interpreter  # CPU tensors on the Triton backend
def test_torch_func_transforms_run_on_the_reference():
    """Inside ``torch.func.grad`` "auto" runs the reference (the kernels cannot read a transform's
    wrapped tensors) and gives the gradient ``.backward()`` gives; a forced "triton" says why."""
    z, y, seg = good(B=9, C=3, D=5)
    g = torch.func.grad(lambda e: dt.daal_loss(e, y, seg, k=2))(z)
    e = z.clone().requires_grad_(True)
    dt.daal_loss(e, y, seg, k=2, backend="reference").backward()
    assert torch.equal(g, e.grad)
    with pytest.raises(ValueError, match="torch.func transforms .* run on the reference backend"):
        torch.func.grad(lambda e: dt.daal_loss(e, y, seg, k=2, backend="triton"))(z)
    assert choose_backend("auto", torch.device("cpu")) == "triton"  # outside a transform: the kernels


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch.func.hessian's own
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_vmap_is_refused_with_the_alternative(backend):
    """torch.func.vmap over the loss, kNN or distances raised vmap's "data-dependent control flow"
    error from a value check (or a broadcast error from the reference's in-place masks):
    NotImplementedError naming the function and the loop instead, inside grad(vmap(...)) too; a
    torch.func.grad around the same call still works (above)."""
    z, y, seg = good(B=9, C=3, D=5)
    batch = torch.stack([z, z.flip(0)])
    module = dt.DAALLoss(3, 5, k=2, backend=backend)
    calls = {"the DAAL loss": lambda e: dt.daal_loss(e, y, seg, k=2, backend=backend),
             "DAALLoss": lambda e: module(e, y),
             "knn": lambda e: dt.knn(e, z, 2, backend=backend)[0],
             "pairwise_distance": lambda e: dt.pairwise_distance(e, z, backend=backend)}
    for name, f in calls.items():
        word = "the DAAL loss" if name == "DAALLoss" else name
        with pytest.raises(NotImplementedError, match=f"{word}.* cannot run under torch.func.vmap.*in a loop") as e:
            torch.func.vmap(f)(batch)
        assert ("kNN" in str(e.value)) == (name != "pairwise_distance")  # it has none (a probe, 2026-12-07)
        with pytest.raises(NotImplementedError, match="cannot run under torch.func.vmap"):
            torch.func.grad(lambda b: torch.func.vmap(f)(b).sum())(batch)
        looped = torch.stack([f(e) for e in batch])  # the loop the message suggests
        assert looped.shape[0] == 2 and torch.isfinite(looped).all()
    # hessian (jacfwd over jacrev) runs vmap inside: the message named only a loop over problems
    # the caller did not have (an interop probe, 2026-12-07); it names what works, which does
    f = calls["the DAAL loss"]
    with pytest.raises(NotImplementedError, match=r"which jacfwd and hessian use too.*jacrev\(jacrev\(f\)\)") as e:
        torch.func.hessian(f)(z)
    if backend == "reference":  # (on "auto" a Hessian is the Triton backward's second derivative)
        assert torch.allclose(torch.func.jacrev(torch.func.jacrev(f))(z), torch.autograd.functional.hessian(f, z))
    else:  # which the message says (it named autograd.functional.hessian as working: a machinery probe, 2026-12-07)
        assert "autograd.functional.hessian with backend='reference'" in str(e.value)


@pytest.mark.interpreter  # CPU tensors on the Triton backend
def test_a_triton_older_than_the_kernels_need_runs_the_reference(monkeypatch):
    """torch 2.4-2.8 (setup.py allows them) bring Triton 3.0-3.4, which lack modules the kernels
    import: "auto" chose the kernels and stopped in ModuleNotFoundError (triton.experimental,
    triton.language.target_info). It now runs the reference there; a forced "triton" says why.
    The version is read from the distribution's metadata (triton, or pytorch-triton's builds)."""
    from importlib import metadata

    import daal_triton.backend as backend

    found = {"triton": "3.4.0"}

    def version(dist):
        if dist not in found:
            raise metadata.PackageNotFoundError(dist)
        return found[dist]

    asked = []
    monkeypatch.setattr(metadata, "version", lambda dist: asked.append(dist) or version(dist))
    assert backend.read_triton_version() == (3, 4)
    monkeypatch.setattr(backend, "TRITON_VERSION", backend.read_triton_version())
    asked.clear()
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) == "reference"
    raises(r"backend='triton' cannot run here: triton 3.4 is installed; the kernels need Triton 3.5 or later",
           choose_backend, "triton", cpu)
    z, y, seg = good()
    assert torch.equal(dt.daal_loss(z, y, seg, k=2), dt.daal_loss(z, y, seg, k=2, backend="reference"))
    assert asked == []  # read once, at import (~150 µs each time): not on every call of the loss
    for installed, read in [({"pytorch-triton": "3.2.0+git35c6c7c6"}, (3, 2)), ({"triton": "3.5.0"}, (3, 5)),
                            ({"triton": "3.10.1"}, (3, 10)), ({"triton": "main"}, None), ({}, None)]:
        found = installed
        assert backend.read_triton_version() == read, installed
    monkeypatch.setattr(backend, "TRITON_VERSION", (3, 5))
    monkeypatch.setattr(backend, "NUMPY_VERSION", (2, 3))
    assert choose_backend("auto", cpu) == "triton"


@pytest.mark.interpreter  # CPU tensors on the Triton backend
def test_an_interpreter_that_numpy_breaks_runs_the_reference(monkeypatch):
    """Triton 3.5's and 3.6's interpreters take a loop bound as int() of a one-element array, which
    NumPy 2.4 refuses: every kernel failed with "only 0-dimensional arrays can be converted to
    Python scalars" (423 tests under torch 2.11, Triton 3.6, NumPy 2.4.6; Triton 3.7 fixed it).
    "auto" then runs the reference on the CPU, a forced "triton" says why; a GPU is not concerned,
    nor is a newer Triton or an older NumPy."""
    from importlib import metadata

    import daal_triton.backend as backend

    monkeypatch.setattr(metadata, "version", lambda dist: {"numpy": "2.4.6", "triton": "3.6.0"}[dist])
    assert backend.read_version(("numpy",)) == (2, 4)
    cpu = torch.device("cpu")
    for triton_v, numpy_v, chosen in [((3, 6), (2, 4), "reference"), ((3, 5), (2, 5), "reference"),
                                      ((3, 6), (2, 3), "triton"), ((3, 7), (2, 4), "triton"),
                                      ((3, 8), (3, 0), "triton"), ((3, 6), None, "triton")]:
        monkeypatch.setattr(backend, "TRITON_VERSION", triton_v)
        monkeypatch.setattr(backend, "NUMPY_VERSION", numpy_v)
        assert choose_backend("auto", cpu) == chosen, (triton_v, numpy_v)
    monkeypatch.setattr(backend, "TRITON_VERSION", (3, 6))
    monkeypatch.setattr(backend, "NUMPY_VERSION", (2, 4))
    raises(r"backend='triton' cannot run here: Triton 3.6's interpreter fails with NumPy 2.4 .*'numpy<2.4'",
           choose_backend, "triton", cpu)
    z, y, seg = good()
    assert torch.equal(dt.daal_loss(z, y, seg, k=2), dt.daal_loss(z, y, seg, k=2, backend="reference"))


def test_a_torch_that_cannot_trace_the_functorch_query_is_not_asked_while_compiling(monkeypatch):
    """torch 2.4's dynamo refuses ``torch._C._are_functorch_transforms_active`` ("torch.* op
    returned non-Tensor bool"): ``torch.compile(fullgraph=True)`` of the loss failed there on the
    reference (a compatibility run, 2026-12-06; torch 2.5.1, 2.6.0, 2.7.1, 2.8 and 2.9 trace it).
    Before 2.5 the query is not asked while compiling; outside compilation, and from 2.5 on, it is."""
    import daal_triton.backend as backend

    asked = []
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: asked.append(1) or True)
    for torch_v, compiling, want in [((2, 4), True, False), ((2, 4), False, True), ((2, 5), True, True),
                                     ((2, 7), True, True), ((2, 8), True, True), ((2, 14), True, True),
                                     (None, True, True)]:
        monkeypatch.setattr(backend, "TORCH_VERSION", torch_v)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        asked.clear()
        assert backend._functorch_active() is want, (torch_v, compiling)
        assert asked == ([1] if want else []), (torch_v, compiling)


@pytest.mark.interpreter  # CPU tensors on the Triton backend
# PyTorch's forward-mode formulas of some operators are torch.jit.script-ed decompositions
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_mode_ad_runs_on_the_reference():
    """Inside a ``torch.autograd.forward_ad.dual_level`` "auto" runs the reference (the kernels'
    operators have no forward-mode formula: PyTorch's "You must implement the jvp function" came
    from the kernels), whose tangent is the directional derivative the backward gives; a forced
    "triton" says why; outside the level the kernels run again."""
    from torch.autograd import forward_ad as fwad

    z, y, seg = good(B=9, C=3, D=5)
    z = z.double()
    seg = seg.double()
    t = torch.randn_like(z)
    e = z.clone().requires_grad_(True)
    dt.daal_loss(e, y, seg, k=2, backend="reference").backward()
    d_ref, _ = dt.knn(z, z, 2, backend="reference")
    with fwad.dual_level():
        dual = fwad.make_dual(z.float(), t.float())
        tangent = fwad.unpack_dual(dt.daal_loss(dual, y, seg.float(), k=2)).tangent
        d_primal, d_tangent = fwad.unpack_dual(dt.knn(dual, z.float(), 2)[0])
        pw_tangent = fwad.unpack_dual(dt.pairwise_distance(dual, z.float()[:4])).tangent
        assert choose_backend("auto", torch.device("cpu")) == "reference"
        with pytest.raises(ValueError, match=r"forward-mode AD \(torch.autograd.forward_ad\) runs on the reference"):
            dt.daal_loss(dual, y, seg.float(), k=2, backend="triton")
    assert torch.allclose(tangent.double(), (e.grad * t).sum(), rtol=1e-4, atol=1e-6)
    q = z.clone().requires_grad_(True)
    d_back, _ = dt.knn(q, z, 2, backend="reference")
    d_back[:, 1].sum().backward()  # column 0: each row itself, at the clamp (no gradient)
    assert torch.allclose(d_primal.double(), d_ref, rtol=1e-5)
    assert torch.allclose(d_tangent[:, 1].sum().double(), (q.grad * t).sum(), rtol=1e-4, atol=1e-6)
    assert pw_tangent.shape == (9, 4) and torch.isfinite(pw_tangent).all()
    assert choose_backend("auto", torch.device("cpu")) == "triton"


@pytest.mark.interpreter  # CPU tensors on the Triton backend
def test_a_batch_of_gradients_runs_on_the_kernels():
    """``torch.autograd.grad(..., is_grads_batched=True)`` vmaps the backward over its gradients
    after the forward chose the kernels; their backward read the batched tensors' storage
    ("Cannot access storage of BatchedTensorImpl"). The backward operators now go through the
    dispatcher there (vmap's fallback: one call per gradient): each row of the batch is the
    float64 reference's."""
    torch.manual_seed(3)
    z, y, seg = good(B=13, C=4, D=7)
    rows = torch.eye(13)

    def jac(backend, dtype, fn):
        e = z.to(dtype).requires_grad_(True)
        out = fn(e, backend)
        return torch.autograd.grad(out, e, rows.to(dtype)[:, : out.shape[0], None].expand(-1, -1, *out.shape[1:])
                                   if out.dim() > 1 else rows.to(dtype), is_grads_batched=True)[0]

    cases = {"loss": lambda e, b: dt.daal_loss(e, y, seg.to(e.dtype), k=2, reduction="none", backend=b),
             "knn": lambda e, b: dt.knn(e, e, 3, backend=b)[0],
             "pairwise_distance": lambda e, b: dt.pairwise_distance(e, e[:5], backend=b)}
    for name, fn in cases.items():
        got = jac("auto", torch.float32, fn)
        want = jac("reference", torch.float64, fn)
        assert got.shape == want.shape == (13, 13, 7), name
        assert_close(got, want, tolerance(torch.float32), name)


@pytest.mark.interpreter  # "1" means the interpreter runs CPU tensors
@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("ON", True), ("yes", True), ("y", True),
                                      ("0", False), ("false", False), ("off", False), ("no", False), ("", False),
                                      ("2", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """TRITON_INTERPRET=false (off, no) is off for Triton: the CPU runs the reference, and a forced
    "triton" says the tensors are on the CPU, not that the variable was set too late."""
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", value)
    if hasattr(triton, "knobs"):  # Triton's own reading, where this Triton has one
        assert bool(triton.knobs.runtime.interpret) == on
    assert choose_backend("auto", torch.device("cpu")) == ("triton" if on else "reference")
    # the kernels' launch settings read it as Triton does too (they took "false" as the
    # interpreter's: its large CPU blocks and IEEE float32 dots on a GPU)
    from daal_triton.kernels import _common

    assert _common._triton_interprets() == on
    if not on:
        raises("backend='triton' cannot run here: tensors are on 'cpu'", choose_backend, "triton",
               torch.device("cpu"))


def test_kernels_read_triton_interpret_false_as_off():
    """A fresh process with TRITON_INTERPRET=false: Triton compiles its kernels, and the kernels'
    launch settings (block sizes, float32 dot precision) are the GPU's, not the interpreter's."""
    code = ("import triton\nfrom daal_triton.kernels import _common\n"
            "print(bool(triton.knobs.runtime.interpret) if hasattr(triton, 'knobs') else None, _common.interpreting())")
    for value, on in (("false", False), ("1", True)):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET=value),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        knob, ours = out.stdout.split()
        assert ours == str(on) and knob in (str(on), "None"), (value, out.stdout)


@needs_kernels
def test_interpreter_set_after_triton_is_named(tmp_path):
    """TRITON_INTERPRET=1 set after ``import triton`` (a fresh process): "auto" runs the reference
    and a forced "triton" says why, instead of failing inside the interpreter with "Cannot call
    @triton.jit'd outside of the scope of a kernel"."""
    script = tmp_path / "late.py"
    script.write_text(
        "import os, torch, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import daal_triton as dt\n"
        "z, y, seg = torch.randn(6, 4), torch.arange(6) % 3, torch.randn(3, 2, 4)\n"
        "print(float(dt.daal_loss(z, y, seg)) - float(dt.daal_loss(z, y, seg, backend='reference')))\n"
        "try:\n"
        "    dt.daal_loss(z, y, seg, backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    first, second = out.stdout.strip().splitlines()[-2:]
    assert float(first) == 0.0
    assert "TRITON_INTERPRET=1 is set but Triton's interpreter is not active" in second
    assert "set TRITON_INTERPRET=1 before importing triton" in second


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
                                   torch.uint64])
def test_every_integer_label_dtype_gives_the_int64_loss(backend, dtype):
    """Labels of any integer dtype are class ids (torch has no min/max for uint16/32/64, which the
    range check must not need); one out of range is a ValueError naming them, in every dtype."""
    z, y, seg = good(B=7, C=5, D=6)
    z.requires_grad_(True)
    want = dt.daal_loss(z, y, seg, backend=backend, k=2, check_values=True)
    (gwant,) = torch.autograd.grad(want, z)
    got = dt.daal_loss(z, y.to(dtype), seg, backend=backend, k=2, check_values=True)
    (g,) = torch.autograd.grad(got, z)
    assert torch.equal(got, want) and torch.equal(g, gwant)
    bad = y.clone()
    bad[3] = 5
    raises(r"labels must lie in \[0, 5\), got values in \[0, 5\]", dt.daal_loss, z, bad.to(dtype), seg,
           backend=backend, k=2, check_values=True)


def test_uint64_labels_beyond_int64_are_named():
    z, y, seg = good()
    raises(r"labels must lie in \[0, 3\), got values above 2\*\*63 - 1", dt.daal_loss, z,
           torch.tensor([0, 1, 2, 2**64 - 1, 0, 1], dtype=torch.uint64), seg, check_values=True)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_is_refused_by_name(dtype):
    """float8 has no arithmetic in torch (isfinite, promotion): named, not a NotImplementedError."""
    z, y, seg = good()
    for backend in ("reference", "auto"):
        raises(f"embeddings must be float16, bfloat16, float32 or float64, got dtype {dtype}", dt.daal_loss,
               z.to(dtype), y, seg, backend=backend)
        raises("segments must be float16, bfloat16, float32 or float64", dt.daal_loss, z, y, seg.to(dtype),
               backend=backend)
        raises("ref must be float16", dt.knn, z, z.to(dtype), 2, backend=backend)
    raises("dtype must be torch.float16, bfloat16, float32 or float64", dt.MemoryBank, 4, 4, dtype=dtype)


def test_zero_width_embeddings_are_refused():
    z, y, seg = good()
    raises(r"embeddings must have at least one column \(D >= 1\)", dt.daal_loss, z[:, :0], y, seg[..., :0])


@pytest.mark.parametrize("check_values", [None, True, False])
def test_meta_tensors_give_the_loss_shape_whatever_the_value_checks(check_values):
    """Building on the meta device (shape inference) never reads values, even when asked to."""
    z, y, seg = (t.to("meta") for t in good())
    loss = dt.daal_loss(z, y, seg, check_values=check_values, backend="reference")
    assert loss.device.type == "meta" and loss.shape == ()


@pytest.mark.parametrize("check_values", [None, True])
def test_fake_tensors_give_the_loss_shape(check_values):
    """Under ``FakeTensorMode`` (shape propagation on CPU-looking tensors without values) the value
    checks are skipped as while torch.compile traces: reading a value raised
    DataDependentOutputException. Outside it, the same call still checks values."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z, y, seg = good()  # made in the mode: fake
        loss = dt.daal_loss(z, y, seg, check_values=check_values, backend="reference")
        # "auto": the Triton backend where it runs (its operators' fake implementations: a launch
        # on fake tensors failed), and the kNN's
        auto = dt.daal_loss(z, y, seg, check_values=check_values, backend="auto", reduction="none")
        knn_dist, _ = dt.knn(z, z, 2, check_values=check_values)
    assert loss.shape == () and auto.shape == (z.shape[0],) and knn_dist.shape == (z.shape[0], 2)
    z, y, seg = good()
    raises(r"labels must lie in \[0, 3\)", dt.daal_loss, z, y + 100, seg, check_values=check_values)


def test_nothing_is_silently_downcast():
    z, y, seg = good()
    loss = dt.daal_loss(z.double(), y, seg.double(), backend="auto")
    assert loss.dtype == torch.float64
    loss = dt.daal_loss(z.half(), y.int(), seg, backend="reference")  # int32 labels are fine
    assert loss.dtype == torch.float32


def test_labels_follow_the_embeddings_device_as_in_pytorch_metric_learning():
    """CPU labels beside embeddings elsewhere are moved there (pytorch-metric-learning's losses do
    the same; the loss refused them), on the functional and the module API, the reference set's
    labels too; a label outside [0, C) is still refused when values are checked. The meta device
    stands in for CUDA, whose copies the gpu-marked tests make."""
    z, y, seg = good()
    zm, segm = z.to("meta"), seg.to("meta")
    loss = dt.daal_loss(zm, y, segm, backend="reference")
    assert loss.device.type == "meta" and loss.shape == ()
    bank, bank_y = torch.randn(5, 4), torch.arange(5) % 3
    parts = dt.daal_loss(zm, y, segm, ref_embeddings=bank.to("meta"), ref_labels=bank_y, return_parts=True,
                         backend="reference", reduction="none")
    assert parts.loss.shape == (6,) and parts.neighbors.device.type == "meta"
    module = dt.DAALLoss(3, 4, backend="reference").to("meta")
    assert module(zm, y).device.type == "meta"
    raises("labels must lie in", dt.daal_loss, z, y + 3, seg)  # CPU: checked as before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_value_check_finds_every_non_finite_and_passes_overflowing_sums(dtype):
    """``check_finite`` settles most tensors by their sum: a NaN, inf or -inf anywhere (inf and
    -inf together sum to NaN) is refused; finite values whose sum overflows are not; and a
    tensor that requires grad leaves no autograd record."""
    from daal_triton.validation import NonFiniteError, check_finite
    big = torch.finfo(dtype).max
    z = torch.full((37, 129), big, dtype=dtype)
    check_finite(z, "embeddings")  # the sum is inf, every value finite
    check_finite(-z, "embeddings")
    for bad in ([float("nan")], [float("inf")], [-float("inf")], [float("inf"), -float("inf")]):
        w = torch.randn(37, 129).to(dtype)
        w.view(-1)[torch.randperm(w.numel())[:len(bad)]] = torch.tensor(bad, dtype=dtype)
        with pytest.raises(NonFiniteError, match="embeddings contains NaN or inf"):
            check_finite(w, "embeddings")
        z2 = z.clone()
        z2[5, 7] = bad[0]
        with pytest.raises(NonFiniteError):
            check_finite(z2, "embeddings")
    g = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
        check_finite(g, "embeddings")
    assert not seen


def test_knn_and_distance_value_checks_read_each_row_set_once():
    """The value checks of knn and pairwise_distance read each row set once, for finiteness and
    range together (one max-reduction and one host read each): they read it twice, a sum for
    finiteness and a max for the range (a review, 2026-12-07; daal-train's evaluation checks the
    whole test set per chunk of queries). A NaN is still a NonFiniteError naming the argument."""
    from daal_triton.launch_count import LaunchCount
    from daal_triton.validation import validate_knn_inputs

    q, r = torch.randn(7, 5), torch.randn(9, 5)
    for args, sets in (((q, r), 2), ((q, q), 1)):
        with LaunchCount() as n:
            validate_knn_inputs(*args, 3, check_values=True)
        assert n.ops["aten.linalg_vector_norm"] == sets and "aten.sum" not in n.ops, n.ops
        assert n.syncs == {"aten._local_scalar_dense": sets}, n.syncs
    bad = r.clone()
    bad[4, 2] = float("nan")
    for call in (lambda: dt.knn(q, bad, 3), lambda: dt.pairwise_distance(q, bad)):
        with pytest.raises(dt.NonFiniteError, match="^ref contains NaN or inf$|^y contains NaN or inf$"):
            call()
