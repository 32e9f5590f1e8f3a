"""Parity of the fused kNN (``daal_triton.kernels.knn``) with ``reference.knn`` run in float64:
distances by relative error, indices exactly (where the reference has no near-ties), padding,
the tie rule, labels, self exclusion, gradients, and compilation of every launcher config."""
import pytest
import torch
import triton

from daal_testing import (DEV, assert_close, assert_floors_keep_nan, compile_launches, largest_cpu_allocation,
                           programs_per_sm, require_recorded_compiler_facts, tolerance)

from daal_triton import reference
from daal_triton.kernels import _common, knn as kk
from daal_triton.kernels._common import ALIGN_ENV, POINTER, family

TF32 = DEV == "cuda"


def _labels(n, c):
    return torch.randint(0, c, (n,), device=DEV)


def _separated_rows(q, r, k, ql, rl, exclude_self, gap=1e-4):
    """Rows whose k+1 smallest candidate distances (float64) are pairwise apart by ``gap``
    (relative): there the index order is well defined for any float32 rounding."""
    d = reference.pairwise_distance(q.double(), r.double())
    if ql is not None:
        d = d.masked_fill(ql[:, None] != rl[None, :], float("inf"))
    if exclude_self:
        n = min(d.shape)
        d[torch.arange(n), torch.arange(n)] = float("inf")
    s = torch.sort(d, 1).values[:, : k + 1]
    diff = s[:, 1:] - s[:, :-1]
    finite = torch.isfinite(s[:, 1:])
    ok = torch.where(finite, diff > gap * s[:, 1:].clamp(min=1e-3), torch.ones_like(finite))
    return ok.all(1)


def _run(q, r, k, *, labels=None, exclude_self=False, splits=None, grad=True, tol=None,
         check_index="separated"):
    """Kernel vs float64 reference: dist, index, padding, and d(sum g*dist)/d(query, ref)."""
    same = r is q
    ql, rl = labels if labels is not None else (None, None)
    tol = tol or tolerance(q.dtype, tf32=TF32)
    qk = q.detach().requires_grad_(grad)
    rk = qk if same else r.detach().requires_grad_(grad)
    dist, index = kk._knn(qk, rk, k, query_labels=ql, ref_labels=rl, exclude_self=exclude_self,
                          splits=splits)
    M = q.shape[0]
    assert dist.shape == (M, k) and index.shape == (M, k)
    assert dist.dtype == torch.float32 and index.dtype == torch.int64

    qr = q.detach().double().requires_grad_(grad)
    rr = qr if same else r.detach().double().requires_grad_(grad)
    dref, iref = reference.knn(qr, rr, k, query_labels=ql, ref_labels=rl, exclude_self=exclude_self)

    assert torch.equal(index < 0, iref < 0), "padding differs"
    assert torch.equal(torch.isinf(dist), index < 0)
    if check_index == "all":
        assert torch.equal(index, iref)
    elif check_index == "separated":
        rows = _separated_rows(q, r, k, ql, rl, exclude_self)
        if k <= 16:
            assert rows.float().mean() > 0.5, "test inputs have too many near-ties"
        assert torch.equal(index[rows], iref[rows])
    found = iref >= 0
    if found.any():
        assert_close(dist[found], dref[found], tol, "dist")
    # sorted ascending; equal distances in increasing index order
    assert (dist[:, 1:] >= dist[:, :-1]).all()
    if grad and found.any():
        g = torch.randn(M, k, device=q.device)
        g = torch.where(found, g, torch.zeros_like(g))
        (dist.masked_fill(~found, 0) * g).sum().backward()
        # The oracle of the gradient is the float64 function at the kernel's own selection: where
        # two candidates are within rounding of each other (check_index="none"), either may be
        # selected, with the same distance but another gradient.
        dsel = reference.selected_distance(qr, rr, index.clamp(min=0), found)
        (dsel.masked_fill(~found, 0) * g.double()).sum().backward()
        assert_close(dist[found], dsel[found].detach(), tolerance(torch.float32), "dist at the selection")
        gtol = max(tol, tolerance(q.dtype))
        assert_close(qk.grad, qr.grad, gtol, "d query")
        if not same:
            assert_close(rk.grad, rr.grad, gtol, "d ref")
    return dist, index


CASES = [  # M, N, D, k
    (37, 53, 19, 5),
    (1, 140, 33, 8),  # M = 1, N over one tile
    (70, 9, 1, 4),  # D = 1
    (6, 3, 7, 8),  # N < k
    (40, 60, 24, 17),  # k not a power of two, KP = 32
    (13, 40, 2048, 5),  # wide rows: the D >= 512 blocks
]


@pytest.mark.parametrize("M,N,D,k", CASES)
def test_knn_float32(M, N, D, k):
    _run(torch.randn(M, D, device=DEV), torch.randn(N, D, device=DEV), k)


@pytest.mark.parametrize("M,N,D,k", [(37, 53, 19, 5), (6, 3, 7, 8)])
def test_knn_labels(M, N, D, k):
    """Same-label only; some rows have fewer than k same-label refs (padding inf / -1)."""
    labels = (_labels(M, 3), _labels(N, 3))
    _run(torch.randn(M, D, device=DEV), torch.randn(N, D, device=DEV), k, labels=labels)


def test_knn_exclude_self_with_labels_same_tensor():
    """The loss's use: query is ref, same-class neighbours, self excluded; gradients sum both
    roles of the one tensor."""
    x = torch.randn(50, 12, device=DEV)
    y = _labels(50, 4)
    _run(x, x, 3, labels=(y, y), exclude_self=True)


@pytest.mark.parametrize("side", ["query", "ref"])
def test_knn_refuses_rows_its_int32_indices_cannot_reach(side):
    """Query or reference rows beyond ``ROWS_MAX`` (2^31 - 2^18) are a ValueError naming the side,
    before any launch: at 2^31 query rows the last program's int32 rows wrapped negative (reads and
    writes out of bounds), and at 2^31 - 1 references a column split's end did (its columns
    skipped, silently; a bounds probe, 2026-12-07). Rows broadcast from one (no memory)."""
    big = torch.zeros(1, 4, device=DEV).expand(kk.ROWS_MAX + 1, 4)
    small = torch.randn(3, 4, device=DEV)
    q, r = (big, small) if side == "query" else (small, big)
    with pytest.raises(ValueError, match=f"^{side} has {kk.ROWS_MAX + 1} rows; the kernels' row and column"):
        kk._knn(q, r, 2)
    assert kk.ROWS_MAX + 1024 * 256 <= 2**31  # the last split's end (at most 1024 splits of 256 columns)


def test_knn_exclude_self_no_labels():
    x = torch.randn(30, 5, device=DEV)
    dist, index = _run(x, x, 4, exclude_self=True)
    assert (index != torch.arange(30, device=DEV)[:, None]).all()


def test_knn_exclude_self_off_diagonal_tiles():
    """Self pairs are masked only on the tiles that meet the diagonal: with 64-row query blocks
    and 128-column tiles (KP = 32) and column splits, every other block meets the diagonal in a
    different tile, and the tail tile is partial."""
    x = torch.randn(200, 6, device=DEV)
    for splits in (None, 2):
        dist, index = _run(x, x, 17, exclude_self=True, splits=splits, grad=False)
        assert (index != torch.arange(200, device=DEV)[:, None]).all()


def test_knn_splits_merge():
    """Several column ranges per query block (the GPU's split-N path) merge to the same result."""
    q, r = torch.randn(20, 10, device=DEV), torch.randn(300, 10, device=DEV)
    _run(q, r, 6, splits=3, labels=(_labels(20, 2), _labels(300, 2)))


def test_knn_ties_smaller_index():
    """Exact ties (duplicated integer rows, exact in every precision): smaller index first."""
    base = torch.randint(-3, 4, (10, 6), device=DEV).float()
    r = base[torch.randint(0, 10, (150,), device=DEV)]  # many exact duplicates
    q = torch.cat([base[:5], torch.randint(-3, 4, (4, 6), device=DEV).float()])
    dist, index = _run(q, r, 12, check_index="all", grad=False)
    _run(q, r, 12, check_index="all", grad=False, splits=2)
    # among equal distances, indices increase
    eq = dist[:, 1:] == dist[:, :-1]
    assert (index[:, 1:][eq] > index[:, :-1][eq]).all()


@pytest.fixture(params=[False, True], ids=["tile_loop", "flat_loop"])
def forward_loop(request, monkeypatch):
    """Both loop structures of ``_knn_fwd_kernel`` (``FLAT``: one loop over (tile, D-chunk)
    pairs, a tuning candidate) on every family's KP-16 entry, with tiles small enough that the
    test shapes cross several tiles, diagonal and tail tiles included."""
    for fam in kk.CONFIGS.values():
        cfg = fam["fwd_kp16"]
        monkeypatch.setitem(fam, "fwd_kp16", cfg.with_blocks(FLAT=request.param, BLOCK_M=32, BLOCK_N=32))
    return request.param


@pytest.mark.small_tiles
@pytest.mark.parametrize("M,N,D,k,labelled,splits", [
    (37, 37, 129, 5, True, None),  # self kNN, D over several chunks, labels
    (70, 130, 33, 8, False, 2),  # column splits, tail tiles
    (5, 300, 17, 3, True, 3),
    (1, 40, 16, 16, False, None),  # one query, KP = k
])
def test_knn_forward_loop_structures(forward_loop, M, N, D, k, labelled, splits):
    """The flat loop gives what the tile loop gives: the reference's neighbours and distances,
    and (exact ties) the smaller index first."""
    q = torch.randn(M, D, device=DEV)
    same = M == N
    r = q if same else torch.randn(N, D, device=DEV)
    labels = (_labels(M, 3), None) if labelled else None
    if labelled:
        labels = (labels[0], labels[0] if same else _labels(N, 3))
    _run(q, r, k, labels=labels, exclude_self=same, splits=splits)
    base = torch.randint(-3, 4, (10, 6), device=DEV).float()
    rt = base[torch.randint(0, 10, (150,), device=DEV)]  # exact duplicates
    _run(base[:7], rt, 12, check_index="all", grad=False, splits=2)


@pytest.mark.small_tiles
@pytest.mark.parametrize("flat", [False, True], ids=["tile_loop", "flat_loop"])
@pytest.mark.parametrize("M,N,D,k,labelled,splits,ties", [
    (37, 37, 129, 5, True, None, False),  # self kNN, labels, D over several chunks
    (70, 300, 33, 8, False, 2, False),  # column splits, tail tiles, many rounds per tile
    (40, 200, 6, 12, False, None, True),  # exact ties (integer rows), KP 16 > k
    (33, 97, 16, 16, True, 3, True),  # KP = k, labels and ties
    (50, 120, 8, 1, False, None, False),  # k = 1
])
def test_knn_merges_give_the_same_slots(monkeypatch, flat, M, N, D, k, labelled, splits, ties):
    """The counted merge (default) and the checked one (``DAAL_KNN_MERGE=checked``, kept for
    k <= 16) extract the same entries in the same order: the forward kernel's S x M x KP slots
    are equal bit for bit (values and columns), and both are the reference's neighbours."""
    for fam in kk.CONFIGS.values():
        cfg = fam[kk.CHECKED_ENTRY]
        monkeypatch.setitem(fam, kk.CHECKED_ENTRY, cfg.with_blocks(FLAT=flat, BLOCK_M=32, BLOCK_N=32))
    if ties:
        q = torch.randint(-2, 3, (M, D), device=DEV).float()
        r = q if M == N else torch.randint(-2, 3, (N, D), device=DEV).float()
    else:
        q = torch.randn(M, D, device=DEV)
        r = q if M == N else torch.randn(N, D, device=DEV)
    ql = rl = None
    if labelled:
        ql = _labels(M, 3)
        rl = ql if r is q else _labels(N, 3)
    out = {}
    for policy in kk.MERGE_POLICIES:
        monkeypatch.setenv(kk.MERGE_ENV, policy)
        assert kk.merge_policy() == policy
        out[policy] = kk._candidates(q, r, k, ql, rl, r is q, splits)
        _run(q, r, k, labels=(ql, rl) if labelled else None, exclude_self=r is q, splits=splits,
             grad=False, check_index="all" if ties else "separated")
    (cs, ci), (hs, hi) = out["counted"], out["checked"]
    assert torch.equal(ci, hi)
    assert torch.equal(cs.view(torch.int32), hs.view(torch.int32))
    assert (ci >= 0).any(), "the test must fill slots"


@pytest.mark.small_tiles
@pytest.mark.parametrize("k", [17, 40])
def test_knn_counted_merge_large_k(monkeypatch, k):
    """The KP 32/64 entries (counted merge only) with 64-column tiles and few references, so
    that a tile's entries fill most slots (a merge that stopped early would lose some): exact
    ties (integer rows) give the reference's neighbours in ``(s, j)`` order, with splits,
    labels and self exclusion."""
    for fam in kk.CONFIGS.values():
        for kp in (32, 64):
            cfg = fam[f"fwd_kp{kp}"]
            monkeypatch.setitem(fam, f"fwd_kp{kp}", cfg.with_blocks(BLOCK_M=16, BLOCK_N=64))
    q = torch.randint(-2, 3, (20, 6), device=DEV).float()
    r = torch.randint(-2, 3, (100, 6), device=DEV).float()
    _run(q, r, k, check_index="all", grad=False)
    _run(q, r, k, labels=(_labels(20, 2), _labels(100, 2)), check_index="all", grad=False, splits=2)
    _run(r[:70], r[:70], k, exclude_self=True, check_index="all", grad=False)


@pytest.mark.parametrize("env,policy,default,alternative", [
    (kk.MERGE_ENV, kk.merge_policy, "counted", "checked"), (kk.LOADS_ENV, kk.loads_policy, "pointer", "tma"),
    (kk.TILES_ENV, kk.tiles_policy, "narrow", "wide"), (kk.TILES_ENV, kk.tiles_policy, "narrow", "table")],
    ids=["merge", "loads", "tiles-wide", "tiles-table"])
def test_knn_policy_is_checked(monkeypatch, env, policy, default, alternative):
    """``DAAL_KNN_MERGE`` ("counted" by default, "checked" selectable), ``DAAL_KNN_LOADS``
    ("pointer" by default, "tma" selectable) and ``DAAL_KNN_TILES`` ("narrow" by default, "wide"
    and "table" selectable): anything else is a ValueError naming the variable (read at every
    forward), also on the default narrow tiles, which load through descriptors whatever
    ``DAAL_KNN_LOADS`` says (a misspelt value was taken there without a word: a docs audit)."""
    monkeypatch.delenv(env, raising=False)
    assert policy() == default
    monkeypatch.setenv(env, alternative)
    assert policy() == alternative
    monkeypatch.setenv(env, "sorted")
    for x in (torch.randn(8, 4, device=DEV), torch.randn(64, 64, device=DEV).half()):
        with pytest.raises(ValueError, match=env):
            kk._knn(x, x, 2)


def test_a_misspelt_split_policy_names_its_variable(monkeypatch):
    """``DAAL_KNN_SPLITS`` is read at import; a misspelt value is refused at the first kNN call,
    naming the variable as the other switches do (it said "kNN split policy")."""
    monkeypatch.setattr(kk, "SPLIT_POLICY", "wave")
    x = torch.randn(8, 4, device=DEV)
    with pytest.raises(ValueError, match="DAAL_KNN_SPLITS"):
        kk._knn(x, x, 2)


def test_knn_ties_labels_exclude_self():
    x = torch.randint(0, 3, (60, 4), device=DEV).float()
    y = _labels(60, 2)
    _run(x, x, 5, labels=(y, y), exclude_self=True, check_index="all")


def test_knn_shared_neighbour_atomics():
    """Every query's nearest reference is the same row: the atomics must add up, not race."""
    q = torch.randn(70, 8, device=DEV) * 0.01
    r = torch.cat([torch.zeros(1, 8, device=DEV), torch.randn(20, 8, device=DEV) + 5.0])
    _run(q, r, 2)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for one test (warn_only: PyTorch operators
    without a deterministic version warn instead of raising), restored after."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn)


def test_knn_deterministic_ref_gradient(deterministic):
    """Under deterministic algorithms dRef is stored per selected pair and summed by reference
    row with ``index_put_(accumulate=True)`` (no atomics): the same parity with the float64
    reference (queries sharing a neighbour, and padding: N < k), the same bits on a second run,
    and the per-pair path is the one taken."""
    from daal_triton.launch_count import LaunchCount

    q = torch.randn(70, 8, device=DEV) * 0.01
    r = torch.cat([torch.zeros(1, 8, device=DEV), torch.randn(20, 8, device=DEV) + 5.0])
    with LaunchCount() as count:
        _run(q, r, 2)
    assert count.ops["aten.index_put_"] == 1, count.table()
    _run(torch.randn(6, 7, device=DEV), torch.randn(3, 7, device=DEV), 8)  # -1 pairs: zeros
    grads = []
    for _ in range(2):
        rk = r.clone().requires_grad_()
        dist, index = kk.knn(q, rk, 3)
        (dist * torch.linspace(0.5, 1.5, 3, device=DEV)).sum().backward()
        grads.append(rk.grad)
    assert torch.equal(grads[0], grads[1])
    torch.use_deterministic_algorithms(False)
    with LaunchCount() as count:
        _run(q, r, 2)
    assert "aten.index_put_" not in count.ops  # the atomics by default


def test_knn_float16():
    q, r = torch.randn(45, 70, device=DEV).half(), torch.randn(66, 70, device=DEV).half()
    _run(q, r, 6, labels=(_labels(45, 2), _labels(66, 2)))


def test_knn_bfloat16_cpu_skip():
    if DEV == "cpu":
        pytest.skip("Triton's interpreter cannot run bfloat16 dots; bf16 parity runs in the gpu tests")
    _run(torch.randn(45, 70, device=DEV).bfloat16(), torch.randn(66, 70, device=DEV).bfloat16(), 6)


@pytest.mark.parametrize("k", [4, kk.MAX_K + 3], ids=["kernel", "chunked"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_knn_non_finite_rows_are_no_neighbours(k, bad):
    """A row with NaN/inf (value checks off) has no neighbours and is no one's, as in the
    reference: its GEMM-form distances are NaN, which the floor keeps NaN, which never beats a
    slot. (A floor that swallowed NaN made it everyone's nearest neighbour at 1e-6.)"""
    q = torch.randn(30, 9, device=DEV)
    r = torch.randn(kk.MAX_K + 40, 9, device=DEV)
    q[5, 2] = float(bad)
    r[11, 0] = float(bad)
    dist, index = _run(q, r, k, check_index="all")
    assert (index[5] == -1).all() and torch.isinf(dist[5]).all()
    assert not (index == 11).any()
    dist, index = _run(q, q, min(k, 29), exclude_self=True, check_index="all")
    assert (index[5] == -1).all() and not (index == 5).any()


def test_knn_large_k_fallback_and_float64():
    """k > MAX_K runs the chunked PyTorch path (same semantics); float64 is refused (routed to
    the reference by daal_triton.backend, never lowered by a kernel)."""
    q, r = torch.randn(2, 4, device=DEV), torch.randn(kk.MAX_K + 10, 4, device=DEV)
    _run(q, r, kk.MAX_K + 3)
    with pytest.raises(ValueError, match="float64 inputs run on the reference backend"):
        kk.knn(q.double(), r.double(), 4)


def test_knn_large_k_keeps_one_chunk_of_sorted_rows(monkeypatch):
    """The chunked selection (k > MAX_K) keeps the k best of each row chunk as copies: when a
    chunk's rows are sorted, no earlier chunk's sorted rows (step x N distances and indices) are
    alive (until 2026-12-05 views of the distances were: M x N float32 by the end), and the
    selection is the one a single chunk makes."""
    import weakref

    q, r = torch.randn(40, 6, device=DEV), torch.randn(kk.MAX_K + 30, 6, device=DEV)
    k = kk.MAX_K + 3
    whole = kk._select_chunked(q, r, k, None, None, False)
    monkeypatch.setattr(kk, "CHUNK_ELEMS", 8 * r.shape[0])  # 8 rows per chunk: 5 chunks
    sorted_rows, alive_at = [], []
    real = torch.sort

    def recording(*args, **kwargs):
        alive_at.append(sum(ref() is not None for ref in sorted_rows))
        out = real(*args, **kwargs)
        sorted_rows.extend(weakref.ref(t) for t in out)
        return out
    monkeypatch.setattr(torch, "sort", recording)
    got = kk._select_chunked(q, r, k, None, None, False)
    assert alive_at == [0] * 5, alive_at
    assert torch.equal(got[0], whole[0]) and torch.equal(got[1], whole[1])
    assert got[0].untyped_storage().nbytes() == 40 * k * 4


def test_knn_large_k_ties_smaller_index():
    """k > MAX_K (the chunked PyTorch selection, then the re-sort of the selected pairs) with
    exact ties (rows of -1, 0, 1: many equal distances, straddling the k-th): the reference's
    neighbours exactly, ties to the smaller index. PyTorch's unstable sort reorders ties even
    on the CPU, so both sorts must be the stable ones. The first three queries are rows of the
    references: their duplicates read the clamp sqrt(1e-12), never 0."""
    base = torch.randint(-1, 2, (12, 5), device=DEV).float()
    r = base[torch.randint(0, 12, (200,), device=DEV)]
    r[:3] = base[:3]
    q = torch.cat([base[:3], torch.randint(-1, 2, (3, 5), device=DEV).float()])
    dist, index = _run(q, r, kk.MAX_K + 3, check_index="all", grad=False)
    eq = dist[:, 1:] == dist[:, :-1]
    assert eq.any() and (index[:, 1:][eq] > index[:, :-1][eq]).all()
    assert (dist[:3, 0] == torch.tensor(1e-12).sqrt()).all(), dist[:3, 0]


@pytest.mark.parametrize("k", [100, 2000], ids=["kernel", "chunked"])
def test_knn_k_beyond_the_rows_selects_only_the_rows(monkeypatch, k):
    """k > N (a young memory bank; a loss whose k exceeds its batch): the forward selects N, on
    the kernels (k = 100 ran KP 128 for 6 rows) or the chunked path (k = 20,000 recomputed only the
    found columns but took 44 s in the interpreter), and pads the rest with inf / -1 as the
    reference does."""
    seen = []
    forward = kk._knn_forward
    monkeypatch.setattr(kk, "_knn_forward", lambda q, r, k, *a: (seen.append(k), forward(q, r, k, *a))[1])
    q, r = torch.randn(4, 8, device=DEV), torch.randn(6, 8, device=DEV)
    dist, index = _run(q, r, k, check_index="all")
    assert seen == [k, 6]
    assert (index[:, 6:] == -1).all() and torch.isinf(dist[:, 6:]).all() and (index[:, :6] >= 0).all()


@pytest.mark.parametrize("labelled,chunks", [(False, 1), (False, 4), (True, 4)],
                         ids=["one_chunk", "chunks", "chunks_labels"])
def test_knn_large_k_exclude_self(monkeypatch, labelled, chunks):
    """k > MAX_K (the chunked PyTorch selection) with self exclusion, as one chunk and, with
    ``CHUNK_ELEMS`` shrunk, as several: each chunk must drop the diagonal at its own rows
    (``i0 + row``), not the first chunk's, or self comes back as the nearest neighbour at 1e-6.
    Gaussian rows (no ties), more than k candidates per row: distances and indices as in the
    reference (the backward is the one of every k, see test_knn_large_k_fallback_and_float64)."""
    M, k = kk.MAX_K + 12, kk.MAX_K + 3
    if chunks > 1:
        monkeypatch.setattr(kk, "CHUNK_ELEMS", M * -(-M // chunks))
    x = torch.randn(M, 6, device=DEV)
    labels = (lambda y: (y, y))(_labels(M, 2)) if labelled else None
    dist, index = _run(x, x, k, labels=labels, exclude_self=True, check_index="all", grad=False)
    assert (index != torch.arange(M, device=DEV)[:, None]).all()


def test_knn_k64():
    q, r = torch.randn(9, 6, device=DEV), torch.randn(100, 6, device=DEV)
    _run(q, r, 64, labels=(_labels(9, 2), _labels(100, 2)))


def test_knn_no_mxn_buffer():
    """No tensor of M x N (or M x N / 16) float32 elements is made, forward and backward: on the
    CPU (M = N = 512) the largest of the profiler's per-op allocations (which see inside ATen ops
    too), on a GPU (M = N = 4096) the peak of the caching allocator, every tensor of the call
    together (O((M + N) k) there, ~1% of the limit). The same measure sees ``torch.cdist``'s M x N."""
    M = N = 4096 if DEV == "cuda" else 512
    q = torch.randn(M, 4, device=DEV, requires_grad=True)
    r = torch.randn(N, 4, device=DEV, requires_grad=True)
    limit = M * N * 4 // 16
    out = {}

    def run():
        out["dist"], _ = kk.knn(q, r, 4)
        out["dist"].sum().backward()

    def largest(fn):
        if DEV != "cuda":
            return largest_cpu_allocation(fn)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    run()  # one-time set-up (the interpreter, the allocator's first blocks) is not the op's
    q.grad = r.grad = None
    assert largest(run) < limit
    assert largest(lambda: torch.cdist(q.detach(), r.detach())) >= M * N * 4, "the measure can tell"
    dref, iref = reference.knn(q.detach().double(), r.detach().double(), 4)
    assert_close(out["dist"], dref, tolerance(torch.float32, tf32=TF32))


def test_knn_bad_arguments():
    q = torch.randn(3, 2, device=DEV)
    with pytest.raises(ValueError, match="k"):
        kk.knn(q, q, 0)
    with pytest.raises(ValueError, match="together"):
        kk.knn(q, q, 1, query_labels=_labels(3, 2))
    with pytest.raises(ValueError, match="ref"):
        kk.knn(q, torch.randn(3, 5, device=DEV), 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 8, 40, 128])
def test_knn_gpu(dtype, k):
    q = torch.randn(700, 515, device="cuda").to(dtype)
    r = torch.randn(2100, 515, device="cuda").to(dtype)
    labels = (torch.randint(0, 5, (700,), device="cuda"), torch.randint(0, 5, (2100,), device="cuda"))
    _run(q, r, k, labels=labels, tol=tolerance(dtype, tf32=True), check_index="none")
    _run(q, q, k, labels=(labels[0], labels[0]), exclude_self=True, tol=tolerance(dtype, tf32=True),
         check_index="none")


# ------------------------------------------------------------------------- compile for GPUs
@pytest.fixture(scope="module")
def compiled():
    return compile_launches(kk.launches())


@pytest.mark.build
def test_knn_floors_keep_nan(compiled):
    """The selection's ``max(s, eps)`` keeps NaN (so a NaN never beats a slot) and so does the
    finish's."""
    assert_floors_keep_nan(compiled, ("fwd_", "finish_"))


@pytest.mark.build
def test_knn_configs_compile(compiled):
    """Each configuration compiles for sm_80 and sm_90 (generic, and with the hot-path
    specialisation for the D = 512 configurations); GEMM kernels use mma.sync (sm_80) and
    wgmma (sm_90; BLOCK_M = 32 configs fall back to mma.sync, which is fine)."""
    assert any(spec == "aligned" for (_, _, spec), _ in compiled)
    for (cfg, cap, spec), res in compiled:
        what = f"{cfg.name} sm_{cap} {spec}"
        assert not res.get("error"), f"{what}:\n{res.get('error')}"
        if cfg.gemm:
            ptx = res["ptx"]
            want = "mma.sync" if cap == 80 or cfg.constexprs["BLOCK_M"] < 64 else "wgmma.mma_async"
            assert want in ptx, f"{what}: no {want} in the PTX"
            # DAAL_KNN_LOADS=tma: the tiles arrive by TMA copies; the pointer loads never do
            assert ("cp.async.bulk.tensor" in ptx) == bool(cfg.flags.get("TMA")), what
    assert any(c.flags.get("TMA") for (c, _, _), _ in compiled), "the descriptor builds are compiled"


@pytest.mark.build
def test_knn_hot_path_does_not_spill(compiled):
    """sm_90, specialised as a contiguous D = 512 launch: no local memory (cuobjdump STACK 0) for
    every kernel, dtype, KP entry and precision variant (docs/kernels.md, "Compile facts")."""
    require_recorded_compiler_facts()
    hot = [(c, r) for c, r in compiled if c[1] == 90 and c[2] == "aligned"]
    assert {c[0].spec for c, _ in hot} == set(kk.KERNELS.values())
    spills = {c[0].name: r.get("stack", "no cuobjdump report") for c, r in hot if r.get("stack") != 0}
    assert not spills, f"local memory (bytes per thread) on the hot path: {spills}"


@pytest.mark.build
def test_knn_narrow_entry_overlaps_programs(compiled):
    """The default forward's narrow tiles (64 x 128, 4 warps, descriptor loads), as ``launches()``
    lists them (KP 16, labels, with and without the fused finish: the most registers it takes),
    fit at least two programs per sm_90 SM: the overlap of one program's merge with another's
    MMAs that the table's 128 x 128 entry (one per SM) cannot have. TMA copies and wgmma in
    the PTX."""
    hot = [(c, r) for c, r in compiled if c[0].entry == kk.NARROW_ENTRY and c[1] == 90 and c[2] == "aligned"]
    assert {c[0].x_dtype for c, _ in hot} == {torch.float16, torch.bfloat16}
    assert {c[0].flags["FINISH"] for c, _ in hot} == {False, True}
    for (la, _, _), res in hot:
        assert "cp.async.bulk.tensor" in res["ptx"] and "wgmma.mma_async" in res["ptx"], la.name
        got = programs_per_sm(res["registers"], la.num_warps, res["metadata"]["shared"])
        assert got >= 2, (la.name, res["registers"], res["metadata"]["shared"], got)


@pytest.mark.build
def test_knn_lean_epilogue_runs_fewer_instructions():
    """The lean epilogue's sm_90 facts, for the 60k benchmark's build (the narrow entry, bf16,
    KP 8, no labels, self pairs excluded, aligned D = 512, the split width a multiple of 16 as
    launched) against the plain one's (docs/kernels.md, "A leaner epilogue"): a tile that misses
    the diagonal and merges one round runs at most 80% of the plain build's instructions outside
    the K-loop (the lean build without self pairs is that path: the diagonal branch's other arm;
    its first round is peeled out of the rounds loop), and each further round no more; the
    diagonal branch is a branch (two merge-round loops, the plain build one); the registers
    still fit three programs per SM; no local memory."""
    require_recorded_compiler_facts()
    import dataclasses

    from daal_testing import compile_many_for_gpu, gpu_job, sass_loops, tile_loop_parts

    base = next(la for la in kk.launches() if la.entry == kk.NARROW_ENTRY and la.x_dtype == torch.bfloat16
                and not la.flags["FINISH"] and la.flags["LEAN"])
    assert base.config.blocks["DIAG_BRANCH"]
    builds = {"lean": (True, True), "lean_noself": (True, False), "plain": (False, True)}
    jobs = []
    for lean, self_ in builds.values():
        la = dataclasses.replace(base, flags=dict(base.flags, KP=8, HAS_LABELS=False, EXCLUDE_SELF=self_, LEAN=lean))
        job = gpu_job(la, capability=90, specialisation="aligned", with_sass=True)
        job["rows"] = job["rows"] + ["cols_per_split"]  # a multiple of BLOCK_N at every launch
        jobs.append(job)
    facts = {}
    for name, res in zip(builds, compile_many_for_gpu(jobs)):
        assert not res.get("error"), res.get("error")
        if not res["sass"]:
            pytest.skip("cuobjdump is not shipped with this Triton")
        outside, rounds = tile_loop_parts(sass_loops(res["sass"]))
        facts[name] = dict(epilogue=outside, rounds=len(rounds), loop=max(rounds),
                           registers=res["registers"], stack=res["stack"], shared=res["metadata"]["shared"])
    # a tile of R >= 1 merge rounds: lean E + (R - 1) L (its first round is peeled out of the
    # loop, into E), plain E + R L
    one_round = {name: f["epilogue"] + (f["loop"] if name == "plain" else 0) for name, f in facts.items()}
    assert one_round["lean_noself"] <= 0.8 * one_round["plain"], facts
    assert facts["lean_noself"]["loop"] <= facts["plain"]["loop"], facts
    assert facts["lean"]["rounds"] == 2 and facts["plain"]["rounds"] == 1, facts
    assert all(f["stack"] == 0 for f in facts.values()), facts
    lean = facts["lean"]
    assert programs_per_sm(lean["registers"], base.num_warps, lean["shared"]) >= 3, facts


def test_register_cap_reaches_the_launch():
    """``KernelConfig.maxnreg`` (a candidate's register cap) is a launch keyword when set, kept
    by ``with_blocks`` unless replaced; no table entry sets one."""
    cfg = kk.CONFIGS["half"]["fwd_kp16"]
    assert cfg.maxnreg is None and "maxnreg" not in cfg.launch(512)
    capped = cfg.with_blocks(maxnreg=128)
    assert capped.launch(512)["maxnreg"] == 128 and capped.launch(512)["num_warps"] == cfg.num_warps
    assert capped.with_blocks(BLOCK_M=64).maxnreg == 128
    assert "maxnreg" not in capped.with_blocks(maxnreg=None).launch(512)
    assert all(c.maxnreg is None for fam in kk.CONFIGS.values() for c in fam.values())


def test_fwd_alternatives_follow_the_running_triton(monkeypatch):
    """bench/tune_knn.py sizes each candidate's grid for the programs per SM of the running
    Triton's build: 3.8's table, with 3.6's and 3.7's fewer for the candidates that fit fewer
    there."""
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert kk.fwd_alternatives() == kk.FWD_ALTERNATIVES
    fewer = {"3.6.0": {(128, 64, 4, 3, False, None, "tma", True): 2, (128, 64, 8, 3, True): 1},
             "3.7.1": {(128, 64, 8, 3, True): 1}}
    for version, expected in fewer.items():
        monkeypatch.setattr(triton, "__version__", version)
        got = kk.fwd_alternatives()
        assert set(got) == set(kk.FWD_ALTERNATIVES)
        assert {c: r for c, r in got.items() if r != kk.FWD_ALTERNATIVES[c]} == expected, version


#: The uncapped candidates' sm_90 stack by Triton release where not 0 (3.6, the GPU image's: the
#: 256 x 128 tiles through descriptors keep 8 B; 3.8 none).
FWD_ALTERNATIVES_STACK = {"3.6": {(256, 128, 8, 3, False, None, "tma"): 8}}


@pytest.mark.build
def test_knn_forward_alternatives_fit_their_residency():
    """The block sizes bench/tune_knn.py times against the bf16 forward entry (FWD_ALTERNATIVES)
    compile for sm_90 (aligned D = 512) with wgmma and allow the programs per SM the table says
    (what the tool sizes their grids for); the entry itself allows one. None spills, but a
    candidate with a register cap (its sixth field), which spills only outside the K-loop: no
    local-memory access in the loop that holds the MMAs (SASS), and at most 256 B per thread
    for the 60k benchmark's build (KP 8, no labels: 128 B under Triton 3.8, 120 B under 3.6; the
    capped one through descriptors keeps none under 3.6). The programs per SM are the running
    Triton's (``kk.fwd_alternatives()``: two candidates fit fewer under 3.6, one under 3.7).
    Every candidate (and the entry) is compiled as that benchmark launches it: KP 8, no labels,
    the "tma" ones (seventh field) with tensor-descriptor loads (TMA copies in the PTX), with
    self pairs excluded and the default (lean) epilogue, and the ones with an eighth field True
    with its diagonal branch. (Until 2026-12-02 only the capped and "tma" ones were; the others
    were built at KP 16 with labels.)"""
    require_recorded_compiler_facts()
    import dataclasses

    from daal_testing import compile_many_for_gpu, gpu_job, sass_loops

    release = _common.triton_release()
    base = next(la for la in kk.launches() if la.entry == "fwd_kp16" and la.x_dtype == torch.bfloat16
                and la.block_d == 64)
    assert base.flags["LEAN"] and base.flags["EXCLUDE_SELF"] and not base.config.blocks["DIAG_BRANCH"]
    assert any(c[7:] == (True,) for c in kk.FWD_ALTERNATIVES), "a candidate with the diagonal branch"
    blocks = {(128, 128, 8, 3, False): 1, **kk.fwd_alternatives()}  # this Triton's residency
    assert (base.config.blocks["BLOCK_M"], base.config.blocks["BLOCK_N"], base.config.num_warps,
            base.config.num_stages, base.config.blocks["FLAT"]) == (128, 128, 8, 3, False)
    assert any(c[4] for c in kk.FWD_ALTERNATIVES), "the flat loop is among the candidates"
    capped = [c for c in kk.FWD_ALTERNATIVES if len(c) > 5 and c[5]]
    assert capped, "a register-capped candidate is among them"
    assert any(c[6:] == ("tma",) for c in kk.FWD_ALTERNATIVES), "a descriptor-load candidate is among them"
    jobs = []
    for bm, bn, w, st, flat, *rest in blocks:
        cap, tma, diag = (rest + [None, None, False])[:3]
        la = dataclasses.replace(base, config=base.config.with_blocks(
            num_warps=w, num_stages=st, BLOCK_M=bm, BLOCK_N=bn, FLAT=flat, maxnreg=cap, DIAG_BRANCH=bool(diag)))
        # as the 60k benchmark launches it
        la = dataclasses.replace(la, flags=dict(la.flags, KP=8, HAS_LABELS=False, TMA=tma == "tma"))
        jobs.append(gpu_job(la, capability=90, specialisation="aligned", with_sass=bool(cap)))
    for (cfg, resident), res in zip(blocks.items(), compile_many_for_gpu(jobs)):
        assert not res.get("error"), f"{cfg}:\n{res.get('error')}"
        assert "wgmma.mma_async" in res["ptx"], cfg
        got = programs_per_sm(res["registers"], cfg[2], res["metadata"]["shared"])
        assert got == resident, (cfg, res["registers"], res["metadata"]["shared"], got)
        assert ("cp.async.bulk.tensor" in res["ptx"]) == (cfg[6:7] == ("tma",)), cfg
        if len(cfg) == 5 or not cfg[5]:
            assert res["stack"] == FWD_ALTERNATIVES_STACK.get(release, {}).get(cfg, 0), (cfg, res["stack"])
            continue
        assert res["registers"] <= cfg[5] and res["stack"] <= 256, (cfg, res["registers"], res["stack"])
        if not res["sass"]:
            continue  # no cuobjdump with this Triton: the loop check needs the SASS
        mma_loops = [ops for _, _, ops in sass_loops(res["sass"])
                     if any(o.startswith("HGMMA") for o in ops)]
        inner = min(mma_loops, key=len)  # the K-loop (the tile loop holds it and the merge)
        assert not any(o.startswith(("LDL", "STL")) for o in inner), cfg


@pytest.mark.build
def test_counted_merge_rounds_have_no_barrier():
    """sm_90 SASS of the bf16 forward as the 60k benchmark launches it (KP 8, no labels, self
    excluded, aligned D = 512): the counted merge's rounds (a loop with lane shuffles and no MMA)
    hold no ``BAR.SYNC``, and no block-wide reduction runs per round; the checked merge's rounds
    hold its per-round block-wide test (the test can tell). docs/kernels.md, "The counted
    merge"."""
    require_recorded_compiler_facts()
    import dataclasses

    from daal_testing import compile_many_for_gpu, gpu_job, sass_loops

    jobs = []
    for counted in (True, False):
        la = next(la for la in kk.launches() if la.entry == kk.CHECKED_ENTRY and la.block_d == 64
                  and la.x_dtype == torch.bfloat16 and la.flags["COUNTED"] is counted)
        la = dataclasses.replace(la, flags=dict(la.flags, KP=8, HAS_LABELS=False))
        jobs.append(gpu_job(la, capability=90, specialisation="aligned", with_sass=True))
    rounds = {}
    for counted, res in zip((True, False), compile_many_for_gpu(jobs)):
        assert not res.get("error"), res.get("error")
        if not res["sass"]:
            pytest.skip("cuobjdump is not shipped with this Triton")
        rounds[counted] = [ops for _, _, ops in sass_loops(res["sass"])
                           if any(o.startswith("SHFL") for o in ops)
                           and not any(o.startswith("HGMMA") for o in ops)]
        assert rounds[counted], f"no merge loop found (counted={counted})"
    assert all(not any(o.startswith("BAR.SYNC") for o in ops) for ops in rounds[True])
    assert any(sum(o.startswith("BAR.SYNC") for o in ops) >= 1 for ops in rounds[False])


def test_knn_launches_cover_the_launcher():
    """Every configuration the launcher picks on a GPU is one the compile tests build (the
    forward compiled with the largest KP of its entry)."""
    names = {la.name for la in kk.launches()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        variants = ("", "-tf32") if dtype == torch.float32 else ("",)
        for D in (1, 20, 512):
            for k in (1, 3, 8, 16, 17, 64, 100, kk.MAX_K):
                entry = kk.fwd_entry(1 << (k - 1).bit_length())
                for e in (entry, "dist", "bwd", "bwd_noref"):
                    bd = kk.CONFIGS[family(dtype)][e].block_d_for(D)
                    vs = variants if e == entry else ("", "-pairs") if e == "bwd" else ("",)
                    if e == kk.CHECKED_ENTRY:  # DAAL_KNN_MERGE=checked
                        vs = vs + tuple(v + "-checked" for v in vs)
                    if e == kk.TMA_ENTRY and dtype != torch.float32 and bd == kk.TMA_BLOCK_D:
                        vs = vs + ("-tma", "-finish-tma")  # DAAL_KNN_LOADS=tma
                    for v in vs:
                        assert f"knn_{e}-{POINTER[dtype][1:]}-bd{bd}{v}" in names, (e, dtype, D, v)
                bd = kk.CONFIGS[family(dtype)][entry].block_d_for(D)
                if dtype != torch.float32 and bd == kk.TMA_BLOCK_D and k <= kk.WIDE_KP:  # DAAL_KNN_TILES=wide
                    for v in ("-tma-plain", "-finish-tma-plain"):  # the plain epilogue: lean_epilogue
                        assert f"knn_{kk.WIDE_ENTRY}-{POINTER[dtype][1:]}-bd{bd}{v}" in names, (dtype, D, v)


def test_knn_duplicates_give_the_clamp():
    """The selected distances are recomputed by direct differences: a duplicate reads the clamp
    sqrt(1e-12) exactly (the GEMM form leaves ~1e-4 of cancellation noise here), and its gradient
    is zero."""
    r = torch.nn.functional.normalize(torch.randn(40, 64, device=DEV), dim=1) * 30.0
    q = r[[3, 17, 29]].clone().requires_grad_(True)
    dist, index = kk.knn(q, r, 2)
    assert index[:, 0].tolist() == [3, 17, 29]
    assert (dist[:, 0] == 1e-6).all(), dist[:, 0]
    dist[:, 0].sum().backward()
    assert q.grad.abs().max().item() == 0.0


def test_knn_near_duplicates_give_the_clamp():
    """A query ``0 < ||q - r||^2 < eps`` from a reference row (float32: one coordinate 1e-7 where
    the row has an exact 0, so the direct difference reads 1e-14): the distance is the clamp
    sqrt(1e-12) exactly and the pair's gradient is zero for the query and the reference, as the
    float64 reference says. Pins the backward's floor ``sq > eps``: exact duplicates (sq = 0)
    cannot tell it from ``sq > 0``, which gives this pair the gradient ``g (q - r) / 1e-7``."""
    r = torch.randn(40, 16, device=DEV)
    r[[3, 17], 5] = 0.0
    q = r[[3, 17]].clone()
    q[:, 5] = 1e-7
    sq = ((q - r[[3, 17]]) ** 2).sum(1)  # float32 direct differences, as the kernels'
    assert ((sq > 0) & (sq < 1e-12)).all(), sq
    q.requires_grad_(True)
    r.requires_grad_(True)
    dist, index = kk.knn(q, r, 3)
    assert index[:, 0].tolist() == [3, 17]
    assert (dist[:, 0] == 1e-6).all(), dist[:, 0]
    dref, iref = reference.knn(q.detach().double(), r.detach().double(), 3)
    assert torch.equal(index, iref) and (dref[:, 0] == 1e-6).all()
    dist[:, 0].sum().backward()
    assert q.grad.abs().max().item() == 0.0, q.grad
    assert r.grad.abs().max().item() == 0.0, r.grad


def test_knn_pairs_below_the_floor_go_in_index_order():
    """Rows within sqrt(eps) of the query all read the clamp 1e-6: equal distances, so they go in
    index order, as every other tie (docs/method.md). They were re-sorted by the squared distance
    before the floor (rows 2, 1, 3 here), on the kernels and on the reference alike; also among
    k of more such rows than k (the threshold path's finish is this one)."""
    x = torch.tensor([[.5, .25, 0], [.5, .25, 7e-7], [.5, .25, 3e-7], [.5, .25, 9e-7], [3., 3, 3], [1., 1, 1]],
                     device=DEV)
    for k in (3, 2):
        dist, index = kk.knn(x, x, k, exclude_self=True)
        assert index[0].tolist() == [1, 2, 3][:k] and (dist[0] == 1e-6).all(), (dist[0], index[0])
        for q in (x.cpu().double(), x.cpu()):
            dref, iref = reference.knn(q, q, k, exclude_self=True)
            assert iref[0].tolist() == [1, 2, 3][:k] and (dref[0] == 1e-6).all(), (dref[0], iref[0])
            assert torch.equal(iref, index.cpu()), (iref, index)


def test_knn_pair_just_above_the_floor_has_its_full_gradient():
    """A query ``||q - r||^2 = 4e-12`` from a reference row (just above eps = 1e-12: one
    coordinate 2e-6 where the row has an exact 0): the distance is 2e-6, not the clamp, and the
    gradient is the full unit vector ``g (q - r) / d`` for the query and minus it for the
    reference, as the float64 reference says; the backward's ``h = g / sqrt(sq)`` must use the
    recomputed squared distance as it is (any extra eps moves it by 10% here)."""
    r = torch.randn(40, 16, device=DEV)
    r[[3, 17], 5] = 0.0
    q = r[[3, 17]].clone()
    q[:, 5] = 2e-6
    q.requires_grad_(True)
    r.requires_grad_(True)
    dist, index = kk.knn(q, r, 1)
    assert index[:, 0].tolist() == [3, 17]
    qr = q.detach().double().requires_grad_(True)
    rr = r.detach().double().requires_grad_(True)
    dref, iref = reference.knn(qr, rr, 1)
    assert torch.equal(index, iref)
    assert_close(dist, dref, tolerance(torch.float32), "dist")
    g = torch.tensor([[1.0], [-2.0]], device=DEV)
    (dist * g).sum().backward()
    (dref * g.double()).sum().backward()
    assert_close(q.grad, qr.grad, tolerance(torch.float32), "d query")
    assert_close(r.grad, rr.grad, tolerance(torch.float32), "d ref")
    unit = torch.zeros(2, 16, device=DEV)
    unit[:, 5] = g[:, 0]
    assert_close(q.grad, unit, tolerance(torch.float32), "the unit vector")


def test_knn_no_ref_gradient():
    """A reference set that needs no gradient (a memory bank): the backward computes no dRef (no
    N x D buffer, no atomics) and dQuery is unchanged."""
    q, r = torch.randn(30, 12, device=DEV), torch.randn(80, 12, device=DEV)
    dist, index = kk.knn(q.requires_grad_(True), r, 4)
    g = torch.randn_like(dist)
    (dist * g).sum().backward()
    qr = q.detach().double().requires_grad_(True)
    dref, _ = reference.knn(qr, r.double(), 4)
    (dref * g.double()).sum().backward()
    assert_close(q.grad, qr.grad, tolerance(torch.float32, tf32=TF32), "d query")
    dq, dr = torch.ops.daal_triton.knn_backward(g, index, q.detach(), r, False)
    assert dr.shape == (0, 12)
    assert torch.equal(dq, q.grad)
    dq2, dr2 = torch.ops.daal_triton.knn_backward(g, index, q.detach(), r, True)
    assert dr2.shape == r.shape and torch.allclose(dq2, dq)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("ref_grad", [False, True], ids=["detached-ref", "ref-with-grad"])
@pytest.mark.parametrize("pairs", [False, True], ids=["atomics", "deterministic"])
def test_knn_batch_rows_give_the_query_the_reference_role_gradient(impl, ref_grad, pairs, request):
    """``batch_rows=b``: ``ref[:b]`` are ``query[:b]`` (a memory bank's ``cat([batch, bank])``),
    so their reference-role gradient is added to the query's: the same ``(dist, index)`` and the
    same query gradient as the float64 kNN on the grad-carrying ``cat([query[:b], bank])``, and
    ``ref[:b]`` gets none (a reference set with grad: its bank rows get theirs). Labels, self
    exclusion, padding (a row with fewer than k candidates), b < M and odd widths; dRef by atomics
    and per pair (deterministic algorithms). The Triton backward is one kernel launch whichever
    the case: the pairs with a batch row scatter into a b x D dRef in the launch that computes dQ
    (before, a second launch redid the whole dQ work into a scratch)."""
    from daal_triton.launch_count import LaunchCount

    if pairs:
        request.getfixturevalue("deterministic")  # set for this test, restored after
    torch.manual_seed(7)
    M, b, N, D, k = 29, 23, 41, 33, 4
    q = torch.randn(M, D, device=DEV)
    bank = torch.randn(N, D, device=DEV)
    ql = _labels(M, 3)
    ql[0] = 5  # a label no other row has: its one candidate, itself, is excluded (all padding)
    rl = torch.cat([ql[:b], _labels(N, 3)])
    g = torch.rand(M, k, device=DEV) + 0.5
    # the float64 oracle: the grad-carrying cat
    q64, bank64 = q.double().requires_grad_(True), bank.double().requires_grad_(True)
    want_d, want_i = reference.knn(q64, torch.cat([q64[:b], bank64]), k, query_labels=ql, ref_labels=rl,
                                   exclude_self=True)
    (want_d.masked_fill(want_i < 0, 0) * g.double()).sum().backward()
    knn = kk.knn if impl == "triton" else reference.knn
    qq = q.clone().requires_grad_(True)
    ref = torch.cat([q[:b], bank]).requires_grad_(ref_grad)
    dist, index = knn(qq, ref, k, query_labels=ql, ref_labels=rl, exclude_self=True, batch_rows=b)
    assert torch.equal(index, want_i) and (index[0] == -1).all()
    with LaunchCount() as count:
        (dist.masked_fill(index < 0, 0) * g).sum().backward()
    if impl == "triton":
        assert count.triton["_knn_bwd_kernel"] == 1, count.table()
        assert count.ops["aten.index_put_"] == (1 if pairs else 0), count.table()
    tol = tolerance(torch.float32, tf32=TF32)
    assert_close(dist.masked_fill(index < 0, 0), want_d.masked_fill(want_i < 0, 0), tol, "dist")
    assert_close(qq.grad, q64.grad, tol, f"{impl}: d query (both roles)")
    if ref_grad:
        assert torch.equal(ref.grad[:b], torch.zeros_like(ref.grad[:b])), "the batch rows' went to the query"
        assert_close(ref.grad[b:], bank64.grad, tol, f"{impl}: d bank")
    else:
        assert ref.grad is None
    with pytest.raises(ValueError, match=r"batch_rows must be an integer in \[0, min\(M, N\)\] = \[0, 29\]"):
        knn(qq, ref, k, batch_rows=M + 1)


def _spy_flags(monkeypatch, name, *flags):
    """Patch kernel ``name`` of kernels/knn.py to record its launches' ``flags`` (a tuple per
    launch, in the list returned) and launch it as it was."""
    from daal_testing import spy_launches

    return spy_launches(monkeypatch, kk, [name], lambda _name, _args, kw: tuple(kw[f] for f in flags))


def test_knn_memory_bank_backward_takes_the_no_ref_launch(monkeypatch):
    """Through autograd (``DAALLoss``'s memory bank: ``ref`` needs no gradient) the backward
    launches the kernel without dRef (``HAS_DR = False``: no N x D buffer, no atomics), and with
    a reference that needs one it launches the dRef build; dQuery matches the float64 reference
    either way. (Calling the op with ``ref_grad=False`` directly cannot tell whether the autograd
    formula passes it.)"""
    seen = _spy_flags(monkeypatch, "_knn_bwd_kernel", "HAS_DR")
    q, bank = torch.randn(30, 12, device=DEV), torch.randn(80, 12, device=DEV)
    for bank_grad in (False, True):
        qk = q.clone().requires_grad_(True)
        bk = bank.clone().requires_grad_(bank_grad)
        dist, _ = kk.knn(qk, bk, 4)
        g = torch.randn_like(dist)
        (dist * g).sum().backward()
        qr = q.double().requires_grad_(True)
        dref, _ = reference.knn(qr, bank.double(), 4)
        (dref * g.double()).sum().backward()
        assert_close(qk.grad, qr.grad, tolerance(torch.float32, tf32=TF32), "d query")
        assert (bk.grad is not None) == bank_grad
    assert seen == [(False,), (True,)], seen


def test_knn_strided_labels():
    """Labels that are views with a row stride (every other element of a longer tensor, int64:
    ``.to(torch.int64)`` makes no copy) are read as the labels, not as the underlying memory."""
    M, N = 37, 53
    ql = _labels(2 * M, 3)[::2]
    rl = _labels(2 * N, 3)[::2]
    assert not ql.is_contiguous() and not rl.is_contiguous() and ql.dtype == torch.int64
    q, r = torch.randn(M, 19, device=DEV), torch.randn(N, 19, device=DEV)
    _run(q, r, 5, labels=(ql, rl), grad=False)
    x = torch.randn(M, 19, device=DEV)
    _run(x, x, 3, labels=(ql, ql), exclude_self=True, grad=False)


# ------------------------------------------------------------------------- the fused finish
def _exact_sq(index, q, r):
    """The squared distances of the selected pairs by ``_knn_dist_kernel`` (the recompute of the
    k > MAX_K path)."""
    M, K = index.shape
    s = torch.empty(M, K, dtype=torch.float32, device=q.device)
    cfg = kk.CONFIGS[family(q.dtype)]["dist"]
    kk._knn_dist_kernel[(-(-M // cfg.blocks["BLOCK_M"]),)](
        index, q, r, s, M, q.shape[1], K, index.stride(0), q.stride(0), r.stride(0), s.stride(0),
        **cfg.launch(q.shape[1]))
    return s


def _sorted_finish(q, r, k, *, splits=None, query_labels=None, ref_labels=None, exclude_self=False):
    """The fused finish's work done by PyTorch, as an oracle: the forward kernel's candidate
    slots (``kk._candidates``, the same selection), sorted by ``(s, j)`` (``kk._sort_pairs``),
    the ``k`` best kept, their squared distances recomputed by ``_knn_dist_kernel`` and re-sorted
    (``kk._exact``, the k > MAX_K path's finish). (The kernels' "aten finish" did this until the
    2026-11-30 H200 run; it is a test oracle only now.) Returns ``(dist, index)``."""
    from daal_triton.kernels._common import compute_dtype, prepare

    dtype = compute_dtype("knn", q, r)
    qp = prepare(q, dtype)
    rp = qp if r is q else prepare(r, dtype)
    ql = rl = None
    if query_labels is not None:
        ql = query_labels.long().contiguous()
        rl = ql if ref_labels is query_labels else ref_labels.long().contiguous()
    out_s, out_i = kk._candidates(qp, rp, k, ql, rl, exclude_self, splits)
    S, M, kp = out_s.shape
    s, idx = kk._sort_pairs(out_s.permute(1, 0, 2).reshape(M, S * kp),
                            out_i.permute(1, 0, 2).reshape(M, S * kp).long())
    idx = idx[:, :k]
    idx = idx.masked_fill(idx < 0, -1)  # empty slots hold -1 - slot
    return kk._exact(idx.contiguous(), qp, rp)


def _fused_vs_sorted(q, r, k, **kw):
    """The fused finish gives the result of :func:`_sorted_finish`: the same indices, and as
    distances the correctly rounded square roots of the same exact squared distances (torch's CPU
    float32 sqrt is not always correctly rounded, so on the CPU the oracle can differ in the last
    bit; CUDA's is, and there the two are equal)."""
    dist, index = kk._knn(q, r, k, **kw)
    dist_s, index_s = _sorted_finish(q, r, k, **kw)
    assert dist.dtype == torch.float32 and index.dtype == torch.int64
    assert dist.shape == index.shape == (q.shape[0], k)
    assert torch.equal(index, index_s)
    want = _exact_sq(index_s, q, r).clamp(min=1e-12).double().sqrt().float()
    want = want.masked_fill(index_s < 0, float("inf"))
    assert torch.equal(dist, want)
    if DEV == "cuda":
        assert torch.equal(dist, dist_s)
    return dist, index


@pytest.mark.parametrize("k", [1, 3, 5, 8])
@pytest.mark.parametrize("splits", [None, 3])
def test_knn_fused_finish_odd_shapes(k, splits):
    """M = 37, N = 53, D = 129 (a partial D-chunk), several column splits: plain, with labels
    (rows with fewer than k candidates, padded inf / -1), and the loss's use (one
    tensor as query and ref, labels, self excluded)."""
    q, r = torch.randn(37, 129, device=DEV), torch.randn(53, 129, device=DEV)
    _fused_vs_sorted(q, r, k, splits=splits)
    # classes 12 and 13 have no references (and one query each: no candidate without self)
    ql = torch.cat([torch.tensor([12, 13], device=DEV), _labels(35, 12)])
    rl = torch.arange(53, device=DEV) % 12
    dist, index = _fused_vs_sorted(q, r, k, splits=splits, query_labels=ql, ref_labels=rl)
    assert (index[:2] < 0).all() and torch.isinf(dist[:2]).all()
    dist, index = _fused_vs_sorted(q, q, k, splits=splits, query_labels=ql, ref_labels=ql,
                                 exclude_self=True)
    assert (index[:2] < 0).all() and (index != torch.arange(37, device=DEV)[:, None]).all()
    _run(q, r, k, splits=splits, labels=(ql, rl))


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_knn_fused_finish_ties(k):
    """Duplicate rows (exact ties, and duplicates of the query: the clamp): ties to the smaller
    index in both selections, with and without splits and self exclusion."""
    base = torch.randint(-2, 3, (7, 129), device=DEV).float()
    x = base[torch.randint(0, 7, (37,), device=DEV)]
    r = torch.cat([x[:20], base[torch.randint(0, 7, (33,), device=DEV)]])
    for splits in (None, 2):
        dist, index = _fused_vs_sorted(x, r, k, splits=splits)
        eq = dist[:, 1:] == dist[:, :-1]
        assert (index[:, 1:][eq] > index[:, :-1][eq]).all()
        assert (dist[:20, 0] == torch.tensor(1e-12).sqrt()).all()  # each query's duplicate
        _fused_vs_sorted(x, x, k, splits=splits, exclude_self=True)
    _run(x, r, k, check_index="all", grad=False)


def test_knn_fused_finish_k17_float16():
    """KP = 32 (k not a power of two) and float16 rows, against the earlier finish and against the
    float64 reference (distances, indices where no near-tie, gradients)."""
    q, r = torch.randn(37, 70, device=DEV).half(), torch.randn(53, 70, device=DEV).half()
    labels = (_labels(37, 2), _labels(53, 2))
    _fused_vs_sorted(q, r, 17, splits=2, query_labels=labels[0], ref_labels=labels[1])
    _run(q, r, 17, splits=2, labels=labels)


def _count_launches(monkeypatch, fn):
    """``(aten ops that launch work, Triton launches)`` of ``fn()``: aten operators seen by a
    dispatch mode (allocations and views left out) and launches of the kernels of the kNN module
    and the squared-norm kernel."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    from daal_triton.kernels import _common

    free = {"aten.empty", "aten.empty_strided", "aten.detach", "aten.view", "aten.permute",
            "aten.slice", "aten.select", "aten.unsqueeze", "aten.expand", "aten.t", "aten.alias",
            "aten._unsafe_view", "aten.as_strided", "aten.promote_types"}
    ops, kernels = [], []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func.overloadpacket) not in free:
                ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    class Counted:
        def __init__(self, kernel):
            self.kernel = getattr(kernel, "kernel", kernel)  # not a Counted of an earlier call

        def __getitem__(self, grid):
            def launch(*args, **kw):
                kernels.append(getattr(self.kernel, "fn", self.kernel).__name__)
                with _disable_current_modes():  # the interpreter's own copies are not launches
                    return self.kernel[grid](*args, **kw)
            return launch

    for mod, name in [(kk, n) for n in ("_knn_fwd_kernel", "_knn_finish_kernel", "_knn_dist_kernel",
                                        "_knn_bwd_kernel")] + [(_common, "_sqnorm_kernel")]:
        monkeypatch.setattr(mod, name, Counted(getattr(mod, name)))
    with Count():
        fn()
    return ops, kernels


def test_knn_launch_count(monkeypatch):
    """Issue 13: the loss's kNN (one tensor as query and ref) launches three Triton kernels and
    no aten work in its forward (one squared-norm launch, the selection, the fused finish), and
    the backward two operations in float32 (dRef's zero-fill and the kernel; dQ is not
    zero-filled). MAX_K < k <= N selects in PyTorch, then recomputes with ``_knn_dist_kernel``; k > N
    selects N and pads. At a
    width that is no multiple of 16 the forward adds the padded copy's two operations (once:
    query and ref are one tensor here; a separate ref adds two more)."""
    x = torch.randn(37, 32, device=DEV)
    y = _labels(37, 3)
    ops, kernels = _count_launches(monkeypatch, lambda: kk._knn_forward(x, x, 3, y, y, True, 2))
    assert ops == [] and kernels == ["_sqnorm_kernel", "_knn_fwd_kernel", "_knn_finish_kernel"]
    odd = torch.randn(37, 20, device=DEV)  # padded to 32 columns, once for query and ref
    ops, kernels = _count_launches(monkeypatch, lambda: kk._knn_forward(odd, odd, 3, y, y, True, 2))
    assert ops == ["aten.zero_", "aten.copy_"] and kernels == ["_sqnorm_kernel", "_knn_fwd_kernel", "_knn_finish_kernel"]
    big, yb = torch.randn(kk.MAX_K + 9, 32, device=DEV), _labels(kk.MAX_K + 9, 3)
    _, kernels_c = _count_launches(monkeypatch, lambda: kk._knn_forward(big, big, kk.MAX_K + 1, yb, yb, True, None))
    assert kernels_c == ["_knn_dist_kernel"]
    # k > N = 37: the kernels select the 37; the padding is filled and concatenated
    ops, kernels = _count_launches(monkeypatch, lambda: kk._knn_forward(x, x, kk.MAX_K + 1, y, y, True, 2))
    assert ops == ["aten.new_full", "aten.cat"] * 2 and kernels == ["_sqnorm_kernel", "_knn_fwd_kernel", "_knn_finish_kernel"]
    dist, index = kk._knn_forward(x, x, 3, y, y, True, None)
    g = torch.randn_like(dist)
    ops, kernels = _count_launches(monkeypatch, lambda: kk._knn_backward(g, index, x, x, True))
    assert kernels == ["_knn_bwd_kernel"] and len(ops) == 1, ops  # dRef's zero-fill
    ops, kernels = _count_launches(monkeypatch, lambda: kk._knn_backward(g, index, x, x, False))
    assert kernels == ["_knn_bwd_kernel"] and ops == []


def test_knn_backward_no_dq_zero_fill():
    """dQ comes out right without a zero-filled buffer: rows with no neighbour (padding), rows
    whose pairs all hit the clamp, and rows past the last full block all read exactly zero or
    the reference gradient, whatever the buffer held."""
    q = torch.randn(70, 9, device=DEV)
    r = torch.cat([q[:5], torch.randn(30, 9, device=DEV)])
    ql = torch.cat([torch.zeros(60, dtype=torch.long), torch.full((10,), 7)]).to(DEV)  # class 7: no refs
    rl = torch.zeros(35, dtype=torch.long, device=DEV)
    dist, index = kk._knn(q, r, 1, query_labels=ql, ref_labels=rl)
    g = torch.randn_like(dist)
    torch.empty(70 * 9 * 4, device=DEV).fill_(float("nan"))  # leave garbage in the allocator
    dq, dr = kk._knn_backward(g, index, q, r, True)
    assert torch.isfinite(dq).all()
    assert (dq[60:] == 0).all() and (dq[:5] == 0).all()  # padding; the clamp (duplicates)
    qr = q.double().requires_grad_(True)
    dref, _ = reference.knn(qr, r.double(), 1, query_labels=ql, ref_labels=rl)
    found = torch.isfinite(dref)
    (dref.masked_fill(~found, 0) * g.double()).sum().backward()
    assert_close(dq[5:60], qr.grad[5:60], tolerance(torch.float32, tf32=TF32), "d query")


def test_knn_finish_launches_are_compiled():
    """Every fused-finish configuration the launcher picks is one the compile tests build."""
    names = {la.name for la in kk.launches()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for D in (1, 20, 129, 512):
            for k in (1, 3, 8, 16, 17, 64, 100, kk.MAX_K):
                entry = kk.finish_entry(1 << (k - 1).bit_length())
                bd = kk.CONFIGS[family(dtype)][entry].block_d_for(D)
                assert f"knn_{entry}-{POINTER[dtype][1:]}-bd{bd}" in names, (entry, dtype, D)


def _splits(M, N, policy, monkeypatch, sms=132):
    monkeypatch.setattr(kk, "sm_count", lambda device: sms)
    cfg = kk.CONFIGS["half"][kk.fwd_entry(8)]
    bm, bn = cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]
    return kk._num_splits(M, N, bm, bn, torch.device("cuda"), policy), -(-M // bm), -(-N // bn)


@pytest.mark.parametrize("M,N", [(60000, 60000), (1024, 65536), (180, 180), (4096, 4096), (37, 100000),
                                 (20000, 20000)])
def test_forward_grid_waves_policy(M, N, monkeypatch):
    """The splits before the first GPU run (``DAAL_KNN_SPLITS=waves``): the grid in whole waves of
    an H200's 132 SMs, modelled time (waves x column tiles of the longest program) within 5% of
    the ideal plus one tile, never worse than the older fixed ~2-wave split."""
    s, rt, ct = _splits(M, N, "waves", monkeypatch)
    cost = -(-rt * s // 132) * -(-ct // s)
    assert cost <= 1.05 * rt * ct / 132 + 1, (s, cost)
    old = max(1, min(ct, -(-2 * 132 // rt)))
    assert cost <= -(-rt * old // 132) * -(-ct // old)
    assert 1 <= s <= kk.MAX_SPLITS


@pytest.mark.parametrize("M,N", [(60000, 60000), (1024, 65536), (180, 180), (4096, 4096), (37, 100000),
                                 (20000, 20000)])
def test_forward_grid_model_policy(M, N, monkeypatch):
    """The default splits charge each program PROGRAM_OVERHEAD_TILES more: at M = N = 20000 (the
    first H200 run: 157 one-tile programs per row block, 3.85 ms, were slower than one 157-tile
    program, 2.92 ms) it splits 5 ways, not 157; small grids still fill the GPU (the memory
    bank's 8 query blocks: 16 splits, 128 programs), and the choice is optimal for its model."""
    s, rt, ct = _splits(M, N, "model", monkeypatch)
    model = lambda S: -(-rt * S // 132) * (-(-ct // S) + kk.PROGRAM_OVERHEAD_TILES)  # noqa: E731
    assert all(model(s) <= model(S) for S in range(1, min(ct, kk.MAX_SPLITS) + 1))
    waves, _, _ = _splits(M, N, "waves", monkeypatch)
    assert s <= waves and model(s) <= model(waves)
    if (M, N) == (20000, 20000):
        assert (s, waves) == (5, 157)
    if (M, N) == (1024, 65536):
        assert s == 16


def test_split_policy_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="split policy"):
        _splits(100, 100, "fastest", monkeypatch)


def test_knn_wave_splits_match_the_reference():
    """The benchmarks' ``triton_wave_splits`` provider against the float64 reference (on a GPU
    with the old rule's many column splits; on the CPU, which has no SM count to size waves by,
    with knn's own)."""
    q = torch.randn(45, 20, device=DEV)
    d, i = kk.knn_wave_splits(q, q, 3, exclude_self=True)
    dref, iref = reference.knn(q.double(), q.double(), 3, exclude_self=True)
    assert torch.equal(i, iref)
    assert_close(d, dref, tolerance(torch.float32, tf32=TF32))


# ------------------------------------------------------------------ the finish in the forward
@pytest.mark.parametrize("dtype,D,k", [(torch.float32, 129, 3), (torch.float32, 20, 16), (torch.float16, 70, 5)],
                         ids=["fp32-D129-k3", "fp32-D20-k16", "fp16-D70-k5"])
def test_knn_forward_finishes_one_split(monkeypatch, dtype, D, k):
    """``DAAL_LAUNCHES=merged`` (the default): with one split the forward kernel finishes its
    rows itself (``FINISH``): the squared norms and one launch, where ``separate`` launches the
    finish too; the same dist and index bit for bit (plain, labels with padded rows, the loss's
    self-excluded batch, ties). KP > 16 keeps the finish's launch."""
    from daal_triton.kernels import _common

    g = torch.Generator().manual_seed(k * 1000 + D)
    base = torch.randn(9, D, generator=g)
    q = torch.cat([base[torch.randint(0, 9, (12,), generator=g)], torch.randn(25, D, generator=g)]).to(DEV, dtype)
    r = torch.cat([q[:10], torch.randn(43, D, generator=g).to(DEV, dtype)])
    ql = torch.cat([torch.tensor([12, 13]), torch.randint(0, 3, (35,), generator=g)]).to(DEV)
    rl = (torch.arange(53) % 3).to(DEV)
    calls = [dict(q=q, r=r, kw={}), dict(q=q, r=r, kw=dict(query_labels=ql, ref_labels=rl)),
             dict(q=q, r=q, kw=dict(query_labels=ql, ref_labels=ql, exclude_self=True))]
    for c in calls:
        fn = lambda: kk._knn(c["q"], c["r"], k, **c["kw"])  # noqa: E731
        norms = ["_sqnorm_kernel"] * (1 if c["r"] is c["q"] else 2)
        monkeypatch.setenv(_common.LAUNCHES_ENV, "separate")
        d_sep, i_sep = fn()
        assert _count_launches(monkeypatch, fn)[1] == norms + ["_knn_fwd_kernel", "_knn_finish_kernel"]
        monkeypatch.delenv(_common.LAUNCHES_ENV)
        d, i = fn()
        assert _count_launches(monkeypatch, fn)[1] == norms + ["_knn_fwd_kernel"]
        assert torch.equal(i, i_sep) and torch.equal(d, d_sep)
    assert (i[:2] < 0).all() and torch.isinf(d[:2]).all()  # classes 12, 13: no candidate
    _, kernels = _count_launches(monkeypatch, lambda: kk._knn(q, q, 17))
    assert kernels == ["_sqnorm_kernel", "_knn_fwd_kernel", "_knn_finish_kernel"]


def test_knn_forward_finish_keeps_the_k_selected(monkeypatch):
    """The forward that finishes its one split (``FINISH``) recomputes exactly the ``k`` slots the
    GEMM form selected, as the finish kernel does, not the best ``k`` of all ``KP`` slots: with
    near-ties under GEMM-form noise (refs 0.1 from a query of norm 30: the noise, ~1e-4, swamps
    the ~1e-6 spread of their squared distances) the two orders differ at the k-th slot, and the
    merged forward must still give the separate finish's (and the PyTorch oracle's) result bit
    for bit. k = 3: KP = 4, one slot more than k."""
    from daal_triton.kernels import _common

    g = torch.Generator().manual_seed(7)
    M, D, per = 8, 64, 6
    q = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1) * 30.0
    u = torch.nn.functional.normalize(torch.randn(M, per, D, generator=g), dim=2)
    scale = 0.1 * (1.0 + 1e-5 * torch.arange(per, dtype=torch.float32))
    r = (q[:, None, :] + scale[None, :, None] * u).reshape(M * per, D)
    q, r = q.to(DEV), r.to(DEV)
    # the inputs do what they are for: in some row the GEMM form's top 3 of the 4 slots is not
    # the exact top 3
    out_s, out_i = kk._candidates(q, r, 3, None, None, False, 1)
    idx = out_i[0].long()
    exact = ((q[:, None, :].double() - r[idx].double()) ** 2).sum(2)
    gemm_top = torch.sort(torch.argsort(out_s[0], 1)[:, :3], 1).values
    exact_top = torch.sort(torch.argsort(exact, 1)[:, :3], 1).values
    assert (gemm_top != exact_top).any(1).any(), "no row where the GEMM order differs at the k-th slot"
    monkeypatch.setenv(_common.LAUNCHES_ENV, "separate")
    d_sep, i_sep = kk._knn(q, r, 3)
    monkeypatch.delenv(_common.LAUNCHES_ENV)
    d, i = kk._knn(q, r, 3)
    assert torch.equal(i, i_sep) and torch.equal(d, d_sep)
    _fused_vs_sorted(q, r, 3)


def test_knn_checked_merge_only_where_it_is_kept(monkeypatch):
    """``DAAL_KNN_MERGE=checked`` applies to the entry it is kept (and compiled) for, k <= 16;
    the larger entries count whatever the switch says (their checked builds are never compiled)."""
    seen = _spy_flags(monkeypatch, "_knn_fwd_kernel", "KP", "COUNTED")
    x = torch.randn(40, 8, device=DEV)
    for policy in kk.MERGE_POLICIES:
        monkeypatch.setenv(kk.MERGE_ENV, policy)
        for k in (3, 17, 40):
            kk.knn(x, x, k, exclude_self=True)
    assert seen == [(4, True), (32, True), (64, True), (4, False), (32, True), (64, True)], seen


@pytest.mark.parametrize("M,N", [(180, 180), (180, 300), (1024, 1024), (60000, 60000), (1024, 65536)])
def test_forward_grid_charges_the_finish_launch(M, N, monkeypatch):
    """Where the forward can finish one split itself, the model takes one split when that costs at
    most FINISH_LAUNCH_TILES more than its best (the loss's B = 180 batch: 2 x 2 tiles, where 2
    splits save one tile and cost the finish's launch); elsewhere the splits are unchanged."""
    s, rt, ct = _splits(M, N, "model", monkeypatch)
    cfg = kk.CONFIGS["half"][kk.fwd_entry(8)]
    fused = kk._num_splits(M, N, cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], torch.device("cuda"),
                           "model", fused_finish=True)
    model = lambda S: -(-rt * S // 132) * (-(-ct // S) + kk.PROGRAM_OVERHEAD_TILES)  # noqa: E731
    assert fused in (1, s)
    assert (fused == 1) == (model(1) <= model(s) + kk.FINISH_LAUNCH_TILES)
    if (M, N) == (180, 180):
        assert (s, fused) == (2, 1)
    if (M, N) in ((60000, 60000), (1024, 65536)):
        assert fused == s > 1
    waves = kk._num_splits(M, N, cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], torch.device("cuda"),
                           "waves", fused_finish=True)
    assert waves == _splits(M, N, "waves", monkeypatch)[0]  # the old policy: as it was


def test_knn_forward_finish_launches_are_compiled():
    """Every forward that finishes its own split (KP <= FUSED_FINISH_KP, each dtype and D, each
    float32 precision) is one the compile tests build; and each family's recompute (finish,
    dist, backward) takes its forward's D-chunk, so the finishing forward sums as they do."""
    names = {la.name for la in kk.launches()}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        fam = family(dtype)
        for e in ("dist", "bwd", "bwd_noref", *(kk.finish_entry(kp) for kp in kk.KP_ROWS)):
            assert kk.CONFIGS[fam][e].block_d == kk.CONFIGS[fam][kk.fwd_entry(1)].block_d, (fam, e)
        for D in (1, 20, 33, 129, 512):
            for k in (1, 3, 8, 16):
                entry = kk.fwd_entry(1 << (k - 1).bit_length())
                bd = kk.CONFIGS[fam][entry].block_d_for(D)
                for v in ("", "-tf32") if dtype == torch.float32 else ("",):
                    name = f"knn_{entry}-{POINTER[dtype][1:]}-bd{bd}{v}-finish"
                    assert name in names, name
                if dtype != torch.float32 and bd == kk.TMA_BLOCK_D:  # the narrow tiles, by default
                    assert f"knn_{kk.NARROW_ENTRY}-{POINTER[dtype][1:]}-bd{bd}-finish-tma" in names, (dtype, D, k)
    assert not any("-finish" in n and "fwd_kp16" not in n and kk.WIDE_ENTRY not in n
                   and kk.NARROW_ENTRY not in n for n in names)


# ------------------------------------------------------------------------- tensor-descriptor loads
def _count_descriptors(monkeypatch) -> list:
    """The block shapes of the tensor descriptors the forward makes (appended per descriptor)."""
    made, real = [], kk.TensorDescriptor

    def counting(tensor, shape, strides, block_shape):
        made.append(tuple(block_shape))
        return real(tensor, shape, strides, block_shape)

    monkeypatch.setattr(kk, "TensorDescriptor", counting)
    return made


def _tma_here() -> bool:
    """Whether this device takes descriptor loads (sm_90+, or the CPU interpreter)."""
    return DEV != "cuda" or torch.cuda.get_device_capability()[0] >= 9


def _skip_where_the_interpreter_refuses_the_rows(D: int) -> None:
    """Triton 3.5's interpreter checks a descriptor's row stride in elements, not bytes ("stride
    must be 16-byte aligned" for float16 rows of 72 or 136: 144 and 272 bytes); 3.6 checks bytes,
    as the GPU does. Skip there: the test's rows are valid."""
    if DEV != "cuda" and _common.triton_release() == "3.5" and D % 16:
        pytest.skip(f"Triton 3.5's interpreter refuses float16 descriptor rows of {D} (it checks the "
                    "stride in elements, not bytes; 3.6 fixed it)")


@pytest.mark.parametrize("M,N,D,k,labelled,splits,finish", [
    # rows, columns and the last D-chunk past the tensor; finished in the forward
    (37, 45, 136, 3, True, 1, True),
    (45, 45, 72, 8, False, 2, False),  # self excluded (r is q), two column splits
    (130, 150, 64, 16, True, 1, False),  # three row blocks, KP 16, labels
], ids=["D136-finish", "self-2splits", "kp16-labels"])
def test_knn_tma_loads_give_the_same_bits(monkeypatch, M, N, D, k, labelled, splits, finish):
    """``DAAL_KNN_LOADS=tma`` (tensor descriptors; the interpreter emulates them) and the pointer
    loads give the forward's outputs bit for bit (the same dots in the same order): the slots, or
    with ``finish`` the final (dist, index); the result is the float64 reference's. float16: the
    interpreter runs no bfloat16 dots."""
    _skip_where_the_interpreter_refuses_the_rows(D)
    monkeypatch.setenv(kk.TILES_ENV, "table")  # DAAL_KNN_LOADS chooses the table entries' loads
    made = _count_descriptors(monkeypatch)
    q = torch.randn(M, D, device=DEV).half()
    r = q if N == M and not labelled else torch.randn(N, D, device=DEV).half()
    ql = _labels(M, 3) if labelled else None
    rl = (ql if r is q else _labels(N, 3)) if labelled else None
    out = {}
    for policy in ("pointer", "tma"):
        monkeypatch.setenv(kk.LOADS_ENV, policy)
        out[policy] = kk._candidates(q, r, k, ql, rl, r is q, splits, finish)
    assert made == ([(128, 64), (128, 64)] if _tma_here() else []), "the descriptors of one forward"
    for a, b in zip(out["pointer"], out["tma"]):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                                                  b.view(torch.int32) if b.is_floating_point() else b)
    assert (out["tma"][1] >= 0).any(), "the test must fill slots"
    monkeypatch.setenv(kk.LOADS_ENV, "tma")
    _run(q, r, k, labels=(ql, rl) if labelled else None, exclude_self=r is q, splits=splits, grad=False)


@pytest.mark.parametrize("cand", [c for c in kk.FWD_ALTERNATIVES if c[6:] == ("tma",)],
                         ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}w" + (f"-cap{c[5]}" if c[5] else ""))
def test_knn_tma_candidates_give_the_same_bits(monkeypatch, cand):
    """Each descriptor-load candidate of ``FWD_ALTERNATIVES`` (the tiles bench/tune_knn.py times
    on a GPU, the wide 128 x 256 and 256 x 128 ones included), launched as the tool launches it
    (the table's entry replaced): descriptors of the candidate's tile rows, the pointer loads'
    slots bit for bit, and the float64 reference's neighbours. Rows and columns past the tensor
    in both directions (M, N below one wide tile), a partial last D-chunk, labels, two splits."""
    monkeypatch.setenv(kk.TILES_ENV, "table")  # DAAL_KNN_LOADS chooses the table entries' loads
    bm, bn, w, st, flat = cand[:5]
    cfg = kk.CONFIGS["half"][kk.TMA_ENTRY]
    monkeypatch.setitem(kk.CONFIGS["half"], kk.TMA_ENTRY, cfg.with_blocks(
        num_warps=w, num_stages=st, BLOCK_M=bm, BLOCK_N=bn, FLAT=flat, maxnreg=cand[5]))
    made = _count_descriptors(monkeypatch)
    M, N, D, k = 150, 300, 72, 8
    _skip_where_the_interpreter_refuses_the_rows(D)
    q, r = torch.randn(M, D, device=DEV).half(), torch.randn(N, D, device=DEV).half()
    ql, rl = _labels(M, 3), _labels(N, 3)
    out = {}
    for policy in ("pointer", "tma"):
        monkeypatch.setenv(kk.LOADS_ENV, policy)
        out[policy] = kk._candidates(q, r, k, ql, rl, False, 2)
    assert made == ([(bm, 64), (bn, 64)] if _tma_here() else []), "the descriptors of one forward"
    for a, b in zip(out["pointer"], out["tma"]):
        assert torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                           b.view(torch.int32) if b.is_floating_point() else b)
    monkeypatch.setenv(kk.LOADS_ENV, "tma")
    _run(q, r, k, labels=(ql, rl), exclude_self=False, splits=2, grad=False)


def test_knn_wide_tiles_where_they_apply(monkeypatch):
    """``DAAL_KNN_TILES=wide`` picks the wide entry only where its builds apply: k <= 8, no
    labels, the counted merge, and the descriptor loads' rules (float16/bfloat16, the 64-wide
    D-chunk, 16-byte-aligned rows); everywhere else the table's entry, as by default."""
    x = torch.randn(40, 136, device=DEV).half()
    wide = kk.WIDE_ENTRY if _tma_here() else "fwd_kp16"

    def entry(q, kp=8, labels=False, **env):
        for name, value in {kk.TILES_ENV: "wide", **env}.items():
            monkeypatch.setenv(name, value)
        return kk.forward_entry(q, q, kp, labels)

    assert entry(x) == wide and entry(x, kp=1) == wide and entry(x.bfloat16()) == wide
    assert entry(x, **{kk.TILES_ENV: "table"}) == "fwd_kp16"
    assert entry(x, kp=16) == "fwd_kp16"  # KP 16: the wide builds spill
    assert entry(x, labels=True) == "fwd_kp16"
    assert entry(x, **{kk.MERGE_ENV: "checked"}) == "fwd_kp16"
    assert entry(x.float()) == "fwd_kp16"
    assert entry(x[:, :20]) == "fwd_kp16"  # D-chunk 32
    assert entry(x[:, 1:]) == "fwd_kp16"  # base 2 bytes past 16-byte alignment
    assert entry(x, kp=32) == "fwd_kp32"


@pytest.mark.parametrize("M,N,D,k,same,splits", [
    (300, 300, 72, 8, True, 1),  # self excluded, one split: the forward finishes its rows
    (300, 300, 72, 5, True, 2),  # two splits and the finish's own launch; KP 8 > k
    (37, 520, 136, 3, False, None),  # a memory bank's shape: one row block, columns past the tensor
])
def test_knn_wide_tiles_give_the_reference(monkeypatch, M, N, D, k, same, splits):
    """The wide tiles (256 x 128, descriptor loads; the interpreter emulates them) as the launcher
    takes them with ``DAAL_KNN_TILES=wide``: descriptors of their block shapes, and the float64
    reference's neighbours and distances, the gradient included."""
    monkeypatch.setenv(kk.TILES_ENV, "wide")
    made = _count_descriptors(monkeypatch)
    q = torch.randn(M, D, device=DEV).half()
    r = q if same else torch.randn(N, D, device=DEV).half()
    _run(q, r, k, exclude_self=same, splits=splits)
    cfg = kk.CONFIGS["half"][kk.WIDE_ENTRY]
    assert (cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"]) == (256, 128)
    if _tma_here():
        assert made[:2] == [(256, 64), (128, 64)], made


def test_knn_narrow_tiles_where_they_apply(monkeypatch):
    """By default (``DAAL_KNN_TILES`` unset, or "narrow") the forward takes the narrow entry
    (64 x 128, 4 warps, descriptor loads) wherever the descriptor loads' rules hold: float16 and
    bfloat16, k <= 16 with or without labels, the counted merge, the 64-wide D-chunk, 16-byte-
    aligned rows; everywhere else, and with ``DAAL_KNN_TILES=table``, the table's entry."""
    x = torch.randn(40, 136, device=DEV).half()
    narrow = kk.NARROW_ENTRY if _tma_here() else "fwd_kp16"

    def entry(q, kp=8, labels=False, **env):
        monkeypatch.delenv(kk.TILES_ENV, raising=False)
        monkeypatch.delenv(kk.MERGE_ENV, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return kk.forward_entry(q, q, kp, labels)

    assert kk.tiles_policy() == "narrow"
    assert entry(x) == narrow and entry(x, kp=1) == narrow and entry(x, kp=16) == narrow
    assert entry(x, labels=True) == narrow and entry(x.bfloat16()) == narrow
    assert entry(x, **{kk.TILES_ENV: "narrow"}) == narrow
    assert entry(x, **{kk.TILES_ENV: "table"}) == "fwd_kp16"
    assert entry(x, **{kk.MERGE_ENV: "checked"}) == "fwd_kp16"
    assert entry(x.float()) == "fwd_kp16"
    assert entry(x[:, :20]) == "fwd_kp16"  # D-chunk 32
    assert entry(x[:, 1:]) == "fwd_kp16"  # base 2 bytes past 16-byte alignment
    assert entry(x, kp=32) == "fwd_kp32"
    cfg = kk.CONFIGS["half"][kk.NARROW_ENTRY]
    assert (cfg.blocks["BLOCK_M"], cfg.blocks["BLOCK_N"], cfg.num_warps, cfg.num_stages) == (64, 128, 4, 3)
    assert (64, 128, 4, 3, False, None, "tma") in kk.FWD_ALTERNATIVES, "the candidate the GPU timed"


def test_knn_narrow_tiles_only_where_rows_fill_the_gpu(monkeypatch):
    """On a GPU the narrow tiles run only where the table entry's row tiles fill its SMs
    (``NARROW_MIN_WAVES``): the second 2026-12-04 H200 run timed them faster at 60k rows but
    slower on the memory bank (1024 queries) and the loss batch (180). Emulated: 132 SMs."""
    if not _tma_here():
        pytest.skip("no TMA before sm_90")
    monkeypatch.delenv(kk.TILES_ENV, raising=False)
    monkeypatch.setattr(kk, "sm_count", lambda device: 132)
    narrow = kk.NARROW_ENTRY

    def entry(M, labels=False):
        q = torch.empty(M, 512, device=DEV, dtype=torch.float16)
        return kk.forward_entry(q, q[:100], 8, labels)

    assert entry(180) == entry(1024) == entry(128 * 131) == "fwd_kp16"
    assert entry(128 * 131 + 1) == entry(60000) == entry(60000, labels=True) == narrow
    monkeypatch.setattr(kk, "NARROW_MIN_WAVES", 0.0)  # how the GPU tests force them at small M
    assert entry(180) == narrow


@pytest.mark.parametrize("M,N,D,k,labelled,same,splits", [
    (37, 37, 136, 3, True, True, None),  # the loss's shape: labels, self excluded, one split finishes
    (130, 150, 72, 16, True, False, 2),  # three row blocks, KP 16, two splits and the finish's launch
    (300, 300, 64, 5, False, True, 3),  # self-kNN (a retrieval), KP 8
    (37, 520, 136, 8, False, False, None),  # a memory bank's shape: columns past the tensor
], ids=["loss", "kp16-labels-2splits", "self-3splits", "bank"])
def test_knn_narrow_tiles_give_the_reference(monkeypatch, M, N, D, k, labelled, same, splits):
    """The narrow tiles as the launcher takes them by default: descriptors of 64- and 128-row
    blocks, the table entry's outputs bit for bit under the interpreter (the same dots in the
    same D order; on a GPU another tile shape may order the MMA's sums otherwise:
    ``test_knn_narrow_tiles_gpu``), and the float64 reference's neighbours, distances and
    gradient."""
    monkeypatch.delenv(kk.TILES_ENV, raising=False)
    made = _count_descriptors(monkeypatch)
    q = torch.randn(M, D, device=DEV).half()
    r = q if same else torch.randn(N, D, device=DEV).half()
    ql = _labels(M, 3) if labelled else None
    rl = (ql if same else _labels(N, 3)) if labelled else None
    got = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=same, splits=splits)
    if _tma_here():
        assert made[:2] == [(64, 64), (128, 64)], made
    monkeypatch.setenv(kk.TILES_ENV, "table")
    table = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=same, splits=splits)
    if DEV != "cuda":
        assert torch.equal(got[1], table[1]) and torch.equal(got[0].view(torch.int32), table[0].view(torch.int32))
    monkeypatch.delenv(kk.TILES_ENV)
    _run(q, r, k, labels=(ql, rl) if labelled else None, exclude_self=same, splits=splits)


@pytest.mark.parametrize("M,N,D,k,labelled,same,splits,tiles", [
    (37, 37, 136, 3, True, True, None, "narrow"),  # the loss's shape: one split finishes, diagonal branch
    (200, 200, 72, 8, False, True, 3, "narrow"),  # self-kNN, 3 splits: diagonal tiles in some splits
    (130, 301, 64, 16, True, False, 2, "table"),  # KP 16, labels, two splits, columns past a tile
    (150, 150, 64, 5, False, True, None, "table"),  # 128-row tiles with self pairs: no branch there
], ids=["loss-narrow", "self-3splits-narrow", "kp16-labels-2splits-table", "self-table"])
def test_knn_lean_epilogue_gives_the_plain_slots(monkeypatch, M, N, D, k, labelled, same, splits, tiles):
    """``DAAL_KNN_EPILOGUE=lean`` (the default for float16/bfloat16: unmasked padded norms,
    float32 counts, the narrow entry's diagonal branch) writes the plain epilogue's slots bit for
    bit, before the finish (the S x M x KP candidates) and after it; and the float64 reference's
    neighbours, distances and gradient."""
    if tiles == "narrow":  # descriptor loads
        _skip_where_the_interpreter_refuses_the_rows(D)
    monkeypatch.delenv(kk.EPILOGUE_ENV, raising=False)
    monkeypatch.setenv(kk.TILES_ENV, tiles)
    assert kk.epilogue_policy() == "lean" and kk.lean_epilogue(torch.float16, kk.NARROW_ENTRY)
    assert kk.lean_epilogue(torch.bfloat16, "fwd_kp16") and not kk.lean_epilogue(torch.bfloat16, "fwd_kp16", "plain")
    assert not kk.lean_epilogue(torch.float32, "fwd_kp16")  # float32 keeps the plain one
    assert not kk.lean_epilogue(torch.float16, kk.WIDE_ENTRY)  # and so do the wide tiles
    q = torch.randn(M, D, device=DEV).half()
    r = q if same else torch.randn(N, D, device=DEV).half()
    ql = _labels(M, 3) if labelled else None
    rl = (ql if same else _labels(N, 3)) if labelled else None
    entry = kk.forward_entry(q, r, 1 << (k - 1).bit_length(), labelled)
    assert entry == (kk.NARROW_ENTRY if tiles == "narrow" and _tma_here() else "fwd_kp16")
    seen = _spy_flags(monkeypatch, "_knn_fwd_kernel", "LEAN", "DIAG_BRANCH")
    out = {}
    for policy in ("lean", "plain"):
        monkeypatch.setenv(kk.EPILOGUE_ENV, policy)
        slots = kk._candidates(q, r, k, ql, rl, same, splits=splits or 2)
        final = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=same, splits=splits)
        out[policy] = [t.view(torch.int32) if t.dtype == torch.float32 else t for t in (*slots, *final)]
    assert seen[-4:] == [(True, entry == kk.NARROW_ENTRY)] * 2 + [(False, entry == kk.NARROW_ENTRY)] * 2, seen
    for lean, plain in zip(out["lean"], out["plain"]):
        assert torch.equal(lean, plain)
    monkeypatch.delenv(kk.EPILOGUE_ENV)
    _run(q, r, k, labels=(ql, rl) if labelled else None, exclude_self=same, splits=splits)


def test_row_sqnorms_pad_with_inf():
    """``row_sqnorms(pad=P)``: the same norms, ``inf`` to a whole number of P rows (what the lean
    epilogue reads unmasked); a pad that is no multiple of the kernel's 64 rows is refused."""
    x = torch.randn(130, 40, device=DEV).half()
    plain = _common.row_sqnorms(x)
    padded = _common.row_sqnorms(x, pad=128)
    assert plain.shape == (130,) and padded.shape == (256,)
    assert torch.equal(padded[:130], plain) and torch.isinf(padded[130:]).all() and (padded[130:] > 0).all()
    assert _common.row_sqnorms(x[:128], pad=128).shape == (128,)
    assert _common.row_sqnorms(x[:0], pad=128).shape == (0,)
    for bad in (0, 100):
        with pytest.raises(ValueError, match="pad"):
            _common.row_sqnorms(x, pad=bad)


def test_knn_tma_loads_where_eligible(monkeypatch):
    """The descriptors are made only where the compiled descriptor builds apply: float16/bfloat16,
    k <= 16, the 64-wide D-chunk, the counted merge, 16-byte-aligned base and rows; elsewhere the
    pointer loads run (and the result is still right)."""
    monkeypatch.setenv(kk.TILES_ENV, "table")  # DAAL_KNN_LOADS chooses the table entries' loads
    monkeypatch.setenv(kk.LOADS_ENV, "tma")
    made = _count_descriptors(monkeypatch)
    x = torch.randn(40, 136, device=DEV).half()

    def descriptors(q, k, **env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        before = len(made)
        kk._knn(q, q, k, exclude_self=True)
        for name in env:
            monkeypatch.delenv(name)
        return len(made) - before

    two = 2 if _tma_here() else 0
    assert descriptors(x, 3) == two
    wide = torch.randn(40, 144, device=DEV).half()
    assert descriptors(wide[:, :128], 3) == two  # D = 128 read in place from rows of 144 (288 bytes)
    assert descriptors(x[:, :128], 3) == two  # rows of 136 (no multiple of 16): copied to contiguous ones
    assert descriptors(x[:, :130], 3) == two  # D = 130: copied to rows of 144 columns (DAAL_ALIGN_D)
    assert descriptors(x[:, 1:], 3) == two  # base 2 bytes past alignment: copied to aligned rows
    assert descriptors(x[:, 1:], 3, **{ALIGN_ENV: "off"}) == 0  # left so (DAAL_ALIGN_D=off): pointer loads
    assert descriptors(x[:, :20], 3) == 0  # D-chunk 32
    assert descriptors(x, 17) == 0  # KP 32: another entry
    assert descriptors(x.float(), 3) == 0  # float32
    assert descriptors(x, 3, **{kk.MERGE_ENV: "checked"}) == 0
    # one broadcast row (row stride 0, which PyTorch keeps for a single row): pointer loads
    row = torch.randn(128, device=DEV).half().as_strided((1, 128), (0, 1))
    q = x[:, :128].contiguous()
    real = torch.empty(1, 128, device=DEV, dtype=torch.float16).copy_(row)  # row stride 128 (contiguous() keeps 0)
    assert not kk._tma_eligible(q, row, kk.TMA_ENTRY, kk.TMA_BLOCK_D, True)
    assert kk._tma_eligible(q, real, kk.TMA_ENTRY, kk.TMA_BLOCK_D, True) == _tma_here()
    before = len(made)
    assert torch.equal(kk._knn(q, row, 1)[0], kk._knn(q, real, 1)[0]) and len(made) - before == two  # the real row's two
    _run(x[:, 1:], x[:, 1:], 3, exclude_self=True, grad=False)
    monkeypatch.setenv(ALIGN_ENV, "off")
    _run(x[:, 1:], x[:, 1:], 3, exclude_self=True, grad=False)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,k,splits", [(700, 2100, 8, None), (700, 2100, 3, 1), (4100, 4100, 16, None)])
def test_knn_tma_loads_gpu(monkeypatch, M, N, k, splits):
    """On the GPU (bfloat16, D = 512, labels): the descriptor loads (sm_90: TMA copies) give the
    pointer loads' outputs bit for bit, at the model's splits and with one split (the forward
    finishing its rows); and they are the float64 reference's neighbours."""
    monkeypatch.setenv(kk.TILES_ENV, "table")  # DAAL_KNN_LOADS chooses the table entries' loads
    if not _tma_here():
        pytest.skip("no TMA before sm_90")
    made = _count_descriptors(monkeypatch)
    q = torch.randn(M, 512, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, 512, device="cuda").bfloat16()
    ql = _labels(M, 5)
    rl = ql if r is q else _labels(N, 5)
    out = {}
    for policy in ("pointer", "tma"):
        monkeypatch.setenv(kk.LOADS_ENV, policy)
        out[policy] = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=r is q, splits=splits)
    assert len(made) == 2
    assert torch.equal(out["pointer"][1], out["tma"][1])
    assert torch.equal(out["pointer"][0].view(torch.int32), out["tma"][0].view(torch.int32))
    _run(q, r, k, labels=(ql, rl), exclude_self=r is q, splits=splits, grad=False,
         tol=tolerance(torch.bfloat16, tf32=True), check_index="none")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,k,splits", [(4100, 4100, 8, None), (700, 2100, 5, 1)])
def test_knn_wide_tiles_gpu(monkeypatch, M, N, k, splits):
    """On the GPU (bfloat16, D = 512, no labels): ``DAAL_KNN_TILES=wide`` runs the 256 x 128
    descriptor tiles (self-kNN at the model's splits; one split that finishes in the forward; the
    memory bank's shape is the benchmarks' ``triton_wide`` case) and selects what the table's
    tiles select (another tile shape sums the GEMM form in another order: near-ties may swap, so
    99.9% of the rows), with the float64 reference's distances."""
    if not _tma_here():
        pytest.skip("no TMA before sm_90")
    made = _count_descriptors(monkeypatch)
    q = torch.randn(M, 512, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, 512, device="cuda").bfloat16()
    out = {}
    for policy in ("table", "wide"):
        monkeypatch.setenv(kk.TILES_ENV, policy)
        out[policy] = kk._knn(q, r, k, exclude_self=r is q, splits=splits)
    assert made == [(256, 64), (128, 64)], made
    same = (out["table"][1] == out["wide"][1]).all(dim=1).float().mean().item()
    assert same >= 0.999, same
    assert (out["table"][0] - out["wide"][0]).abs().max().item() <= 1e-3
    _run(q, r, k, exclude_self=r is q, splits=splits, grad=False, tol=tolerance(torch.bfloat16, tf32=True),
         check_index="none")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,k,labelled,splits", [(4100, 4100, 8, False, None), (700, 2100, 3, True, 1),
                                                   (1024, 65536, 8, False, None)])
def test_knn_narrow_tiles_gpu(monkeypatch, M, N, k, labelled, splits):
    """On the GPU (bfloat16, D = 512): the default narrow tiles (64 x 128 through descriptors)
    select what the table's 128 x 128 tiles select (another tile shape may sum the GEMM form in
    another order: near-ties may swap, so 99.9% of the rows), with the float64 reference's
    distances: self-kNN at the model's splits, the loss's labelled search finishing in one
    split, and the memory bank's shape."""
    if not _tma_here():
        pytest.skip("no TMA before sm_90")
    monkeypatch.setattr(kk, "NARROW_MIN_WAVES", 0.0)  # these shapes' rows fill no H200: forced
    made = _count_descriptors(monkeypatch)
    q = torch.randn(M, 512, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, 512, device="cuda").bfloat16()
    ql = _labels(M, 5) if labelled else None
    rl = (ql if r is q else _labels(N, 5)) if labelled else None
    out = {}
    for policy in ("table", "narrow"):
        monkeypatch.setenv(kk.TILES_ENV, policy)
        out[policy] = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=r is q, splits=splits)
    assert made == [(64, 64), (128, 64)], made
    same = (out["table"][1] == out["narrow"][1]).all(dim=1).float().mean().item()
    assert same >= 0.999, same
    assert (out["table"][0] - out["narrow"][0]).abs().max().item() <= 1e-3
    _run(q, r, k, labels=(ql, rl) if labelled else None, exclude_self=r is q, splits=splits, grad=False,
         tol=tolerance(torch.bfloat16, tf32=True), check_index="none")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,k,labelled,splits,tiles", [
    (4100, 4100, 8, False, None, "narrow"), (4100, 4100, 16, True, 3, "narrow"), (700, 2100, 3, True, 1, "narrow"),
    (4100, 4100, 8, False, None, "table"), (1024, 65536, 8, False, None, "table")])
def test_knn_lean_epilogue_gpu(monkeypatch, M, N, k, labelled, splits, tiles):
    """On the GPU (bfloat16, D = 512): the lean epilogue (the default) and the plain one
    (``DAAL_KNN_EPILOGUE=plain``) give the same neighbours and distances bit for bit (the same
    tiles, dots and order: only the epilogue's instructions differ), on the narrow tiles (self
    pairs excluded: their diagonal branch; labels with three splits; the loss's one split) and
    the table's (self-kNN, the memory bank's shape); and the float64 reference's."""
    if tiles == "narrow" and not _tma_here():
        pytest.skip("no TMA before sm_90")
    monkeypatch.setattr(kk, "NARROW_MIN_WAVES", 0.0)  # these shapes' rows fill no H200: forced
    monkeypatch.setenv(kk.TILES_ENV, tiles)
    q = torch.randn(M, 512, device="cuda").bfloat16()
    r = q if M == N else torch.randn(N, 512, device="cuda").bfloat16()
    ql = _labels(M, 5) if labelled else None
    rl = (ql if r is q else _labels(N, 5)) if labelled else None
    seen = _spy_flags(monkeypatch, "_knn_fwd_kernel", "LEAN")
    out = {}
    for policy in kk.EPILOGUE_POLICIES:
        monkeypatch.setenv(kk.EPILOGUE_ENV, policy)
        out[policy] = kk._knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=r is q, splits=splits)
    assert seen == [(True,), (False,)], seen
    assert torch.equal(out["lean"][1], out["plain"][1])
    assert torch.equal(out["lean"][0].view(torch.int32), out["plain"][0].view(torch.int32))
    monkeypatch.delenv(kk.EPILOGUE_ENV)
    _run(q, r, k, labels=(ql, rl) if labelled else None, exclude_self=r is q, splits=splits, grad=False,
         tol=tolerance(torch.bfloat16, tf32=True), check_index="none")


@pytest.mark.interpreter  # registrations: the CPU's to check; GPU time goes to the kernels
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_custom_ops_opcheck(layout):
    """Schema, fake (shapes *and strides*: the backward's results are contiguous whatever the
    inputs' layout, so its fake must be too, or inductor miscompiles the backward of a transposed
    input) and autograd registration of ``daal_triton::knn`` and its backward."""
    def rows(n, d):
        t = torch.randn(d, n, device="cpu").t() if layout == "transposed" else torch.randn(n, d, device="cpu")
        return t.requires_grad_(True)

    q, r = rows(7, 5), rows(11, 5)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.daal_triton.knn.default, (q, r, 3, None, None, False, None), test_utils=utils)
    # batch_rows (the loss's memory bank: ref[:b] are the query's rows), with ref carrying no grad
    # and with it
    for ref_rows in (r.detach(), r):
        torch.library.opcheck(torch.ops.daal_triton.knn.default, (q, ref_rows, 3, None, None, True, None, 5),
                              test_utils=utils)
    _, index = torch.ops.daal_triton.knn(q, r, 3, None, None, False, None)
    for ref_grad in (True, False):
        torch.library.opcheck(torch.ops.daal_triton.knn_backward.default,
                              (torch.randn(7, 3, device="cpu"), index, q.detach(), r.detach(), ref_grad),
                              test_utils=("test_schema", "test_faketensor"))


def test_descriptor_loads_only_where_their_builds_fit(monkeypatch):
    """The kNN's tensor-descriptor builds (switches gpu_check times) take TMA and up to 144 KB of
    shared memory: sm_90 and sm_100 only, not sm_80 (no TMA) nor the 99 KB sm_120 GPUs."""
    for capability, fits in (((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True), ((12, 0), False)):
        monkeypatch.setattr(_common, "_CAPABILITY", {0: capability})
        assert kk.tma_device(torch.device("cuda", 0)) == fits, capability
