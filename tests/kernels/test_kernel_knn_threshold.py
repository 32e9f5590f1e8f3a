"""Selection by a threshold (kernels/knn_threshold.py, ``DAAL_KNN_SELECT=threshold``): the same
neighbours as the default merge, bit for bit under the interpreter, on odd shapes, self pairs,
close pairs and duplicates, non-finite rows, row chunks, and rows whose lists overflow (the
rescan); its threshold bounds the GEMM form; its rules; no host synchronisation. Its sm_90
builds: tests/kernels/test_kernel_launched_builds.py (the recorded launches)."""
import pytest
import torch

from daal_testing import require_recorded_compiler_facts
from daal_triton import reference
from daal_triton.kernels import knn as kk, knn_threshold as kt
from daal_triton.launch_count import LaunchCount
from gpu_canary import canary, filter_tiles_variant, first_launches, record, unvetted

pytestmark = pytest.mark.interpreter


@pytest.fixture
def small(monkeypatch):
    """The path at test sizes: a sample of one row in 4, at least 8 rows."""
    monkeypatch.setattr(kt, "STRIDE", 4)
    monkeypatch.setattr(kt, "MIN_SAMPLE", 8)


@pytest.fixture(params=["threshold", "half"])
def policy(request):
    """Both threshold paths: the filter on every tile, and (``DAAL_KNN_SELECT=half``) a
    self-search's on half of them (elsewhere the same path)."""
    return request.param


def _both(monkeypatch, q, r, k, exclude_self, policy="threshold"):
    """``(threshold, merge)`` results of ``kk.knn``; asserts the threshold path ran (with
    ``policy`` "half", on half the tiles where :func:`kt.halves` holds, else on all)."""
    from daal_testing import spy_launches

    calls = []
    select = kt.select
    monkeypatch.setattr(kt, "select", lambda *a, **kw: calls.append(a) or select(*a, **kw))
    filters = spy_launches(monkeypatch, kt, ["_knn_filter_kernel", "_knn_filter_half_kernel"])
    monkeypatch.setenv(kk.SELECT_ENV, policy)
    got = kk.knn(q, r, k, exclude_self=exclude_self)
    assert len(calls) == 1, "the threshold path did not run"
    half = policy == "half" and kt.halves(*calls[0][:3])
    assert set(filters) == {"_knn_filter_half_kernel" if half else "_knn_filter_kernel"}, filters
    monkeypatch.setenv(kk.SELECT_ENV, "merge")
    want = kk.knn(q, r, k, exclude_self=exclude_self)
    assert len(calls) == 1
    return got, want


@pytest.mark.parametrize("M, N, D, k, own", [(37, 300, 129, 8, False), (150, 150, 40, 5, True),
                                              (64, 260, 64, 16, True), (33, 129, 16, 1, False),
                                              (96, 96, 16, 1, True)])
def test_threshold_selects_what_the_merge_selects(small, monkeypatch, policy, M, N, D, k, own):
    """Odd shapes, self pairs and not, k from 1 to 16: the same distances and indices as the
    default forward bit for bit, and the float64 reference's. (With self pairs a query in the
    sample would find itself there: its bound is the sample's own kNN without self pairs.)"""
    x = torch.randn(N, D).half()
    q = x if own else torch.randn(M, D).half()
    (dist, index), want = _both(monkeypatch, q, x, k, own, policy)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    ref_d, ref_i = reference.knn(q.double(), x.double(), k, exclude_self=own)
    assert torch.allclose(dist.double(), ref_d, rtol=1e-3, atol=1e-3)
    assert (index == ref_i).float().mean() > 0.99  # near-ties may swap in float16's GEMM form


@pytest.mark.parametrize("noise", [0.0, 0.7])
def test_self_pairs_between_two_tensors(small, monkeypatch, noise):
    """Self pairs (i, i) excluded between queries and references that are two tensors (a copy,
    or each query its reference moved): the bound of query 16 m comes from the strided queries
    against the sample, not the sample against itself; the merge's result."""
    torch.manual_seed(3)
    x = torch.randn(150, 40)
    q = (x + noise * torch.randn(150, 40)).half()
    (dist, index), want = _both(monkeypatch, q, x.half(), 5, True)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    assert not (index == torch.arange(150)[:, None]).any()


def test_close_pairs_and_duplicates_give_the_clamp(small, monkeypatch):
    """Neighbours at d in {0, 1e-3, 0.03, 0.1, 0.3} of each query (issue 13's close pairs): the
    merge's result, and a duplicate reads the clamp, sqrt(eps)."""
    torch.manual_seed(1)
    base = torch.nn.functional.normalize(torch.randn(40, 64), dim=1)
    gaps = torch.tensor([0.0, 1e-3, 0.03, 0.1, 0.3])
    direction = torch.nn.functional.normalize(torch.randn(40, 5, 64), dim=2)
    near = base[:, None, :] + gaps[None, :, None] * direction
    x = torch.cat([base, near.reshape(-1, 64), torch.nn.functional.normalize(torch.randn(60, 64), dim=1)]).half()
    (dist, index), want = _both(monkeypatch, x[:40], x, 4, False)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    clamp = torch.tensor(kk.EPS).sqrt()
    assert (dist[:, 0] == clamp).all() and (dist[:, 1] == clamp).all()  # the row itself and its duplicate


def test_lists_hold_the_counts_of_every_k():
    """The lists' slots per row (``list_cap``) against the count a row lists, about k STRIDE
    (Gamma(k) in units of STRIDE): for every k the path serves, at 60k rows fewer than 0.01
    rows overflow on average (each one a rescan of its row block over every column: at k = 16,
    512 slots would send about 40 there)."""
    import math

    def over(k, cap):  # P(Gamma(k, STRIDE) > cap)
        x = cap / kt.STRIDE
        return math.exp(-x) * sum(x ** i / math.factorial(i) for i in range(k))
    assert [kt.list_cap(k) for k in (1, 8, 9, 16)] == [kt.CAP, kt.CAP, 2 * kt.CAP, 2 * kt.CAP]
    for k in range(1, kt.MAX_K + 1):
        assert 60000 * over(k, kt.list_cap(k)) < 0.01, k
    assert 60000 * over(16, kt.CAP) > 10


def test_sampled_every_scales_the_lists_and_restores(monkeypatch):
    """The probe's other sample strides (``sampled_every``, bench/probe_h200.py): inside, STRIDE
    is the given one and the lists scale with it (about k STRIDE entries per row); after it, even
    past an exception, both are back; under it the path selects what the merge selects."""
    stride, cap = kt.STRIDE, kt.CAP
    for s in kt.PROBE_STRIDES:
        with kt.sampled_every(s):
            assert (kt.STRIDE, kt.CAP) == (s, cap * s // stride)
            assert kt.list_cap(16) == 2 * cap * s // stride
        assert (kt.STRIDE, kt.CAP) == (stride, cap)
    with pytest.raises(RuntimeError), kt.sampled_every(kt.PROBE_STRIDES[0]):
        raise RuntimeError
    assert (kt.STRIDE, kt.CAP) == (stride, cap)
    monkeypatch.setattr(kt, "MIN_SAMPLE", 8)
    x = torch.randn(200, 40).half()
    with kt.sampled_every(8):
        (dist, index), want = _both(monkeypatch, x, x, 5, True)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])


def test_filter_tiles_set_the_filter_and_its_waves_and_restore():
    """The probe's other filter tiles (``filter_tiles``, bench/probe_h200.py): inside, the filter's
    launch takes the alternative's blocks, warps, stages and register cap, and its grid the
    alternative's programs per SM; after it, even past an exception, both are back; blocks not
    in FILTER_ALTERNATIVES are refused. (That each selects what the default tiles select, in the
    interpreter: bench/test_bench_tools.py, ``test_probe_threshold_section_times_each_grid_and_stride``.)"""
    default = kt.CONFIGS["filter"], kt.PROGRAMS_PER_SM
    for blocks, per_sm in kt.FILTER_ALTERNATIVES.items():
        with kt.filter_tiles(blocks):
            launch = kt.CONFIGS["filter"].launch(512)
            got = (launch["BLOCK_M"], launch["BLOCK_N"], launch["num_warps"], launch["num_stages"],
                   launch.get("maxnreg"))
            assert got == blocks and kt.PROGRAMS_PER_SM == per_sm
            assert launch["BLOCK_D"] == default[0].launch(512)["BLOCK_D"]
        assert (kt.CONFIGS["filter"], kt.PROGRAMS_PER_SM) == default
    with pytest.raises(RuntimeError), kt.filter_tiles(next(iter(kt.FILTER_ALTERNATIVES))):
        raise RuntimeError
    assert (kt.CONFIGS["filter"], kt.PROGRAMS_PER_SM) == default
    with pytest.raises(KeyError):
        with kt.filter_tiles((64, 64, 4, 3, None)):
            pass
    assert (kt.CONFIGS["filter"], kt.PROGRAMS_PER_SM) == default


def test_select_stops_after_a_step(small, monkeypatch):
    """``select(..., until=step)`` (bench/probe_h200.py times the steps so): "bounds" launches none
    of the three kernels, "filter" the filter alone, "select" all three; another step is refused."""
    from daal_testing import spy_launches

    launched = spy_launches(monkeypatch, kt, [f"_knn_{step}_kernel" for step in ("filter", "select", "rescan")])
    x = torch.randn(64, 16).half()
    for until, want in (("bounds", []), ("filter", ["filter"]), ("select", ["filter", "select", "rescan"])):
        launched.clear()
        kt.select(x, x, 3, True, until=until)
        assert launched == [f"_knn_{step}_kernel" for step in want], until
    with pytest.raises(ValueError, match="until"):
        kt.select(x, x, 3, True, until="lists")


def test_rows_past_the_list_are_rescanned(small, monkeypatch, policy):
    """Each row with 12 exact duplicates and lists of 6 slots: every row overflows, the rescan
    selects them (ties to the smaller index) as the merge does; without the rescan the result
    would differ (so the test sees it)."""
    monkeypatch.setattr(kt, "CAP", 6)
    base = torch.randn(20, 32)
    x = base.repeat_interleave(12, dim=0).half()
    (dist, index), want = _both(monkeypatch, x, x, 5, True, policy)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])

    class NoRescan:
        def __getitem__(self, grid):
            return lambda *a, **kw: None
    monkeypatch.setattr(kt, "_knn_rescan_kernel", NoRescan())
    monkeypatch.setenv(kk.SELECT_ENV, policy)
    skipped = kk.knn(x, x, 5, exclude_self=True)
    assert not torch.equal(skipped[1], want[1])


def test_non_finite_rows(small, monkeypatch):
    """A NaN query row, an infinite reference row and a reference row of NaNs: the merge's
    result (the NaN query finds nothing; the others never enter)."""
    x = torch.randn(120, 48).half()
    q = torch.randn(30, 48).half()
    q[3] = float("nan")
    x[7] = float("inf")
    x[11, 5] = float("nan")
    (dist, index), want = _both(monkeypatch, q, x, 6, False)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    assert (index[3] == -1).all() and not ((index == 7) | (index == 11)).any()
    # a sample of NaN rows: no query has a finite bound, so every row goes to the rescan
    x[::kt.STRIDE] = float("nan")
    (dist, index), want = _both(monkeypatch, q, x, 6, False)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    assert (index[torch.arange(30) != 3] >= 0).all()


def test_query_chunks_keep_the_self_mask(small, monkeypatch, policy):
    """Lists of at most 3 chunks of 128 query rows: the chunks' self masks and outputs line up
    (where the lists of all rows do not fit at once, "half" filters every tile)."""
    monkeypatch.setattr(kt, "LIST_BYTES", 128 * kt.CAP * 8)
    x = torch.randn(300, 24).half()
    (dist, index), want = _both(monkeypatch, x, x, 3, True, policy)
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    assert not (index == torch.arange(300)[:, None]).any()


def test_query_chunks_hold_one_chunks_lists_at_a_time(small, monkeypatch):
    """At most LIST_BYTES of lists at once: when a query chunk's lists are allocated, no earlier
    chunk's are alive (until 2026-12-05 the last chunk's were, bound to their variable until the
    next chunk's had been allocated: twice LIST_BYTES at the peak)."""
    import weakref

    monkeypatch.setattr(kt, "LIST_BYTES", 128 * kt.CAP * 8)
    lists, alive_at = [], []
    real = torch.empty

    def recording(*size, **kwargs):
        is_list = kwargs.get("dtype") == torch.int64 and len(size) == 2 and size[1] == kt.list_cap(3)
        if is_list:
            alive_at.append(sum(ref() is not None for ref in lists))
        out = real(*size, **kwargs)
        if is_list:
            lists.append(weakref.ref(out))
        return out
    monkeypatch.setattr(torch, "empty", recording)
    x = torch.randn(300, 24).half()
    (dist, index), want = _both(monkeypatch, x, x, 3, True)
    assert alive_at == [0, 0, 0], alive_at  # three chunks of at most 128 rows
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])


def test_filter_grid_counts_waves_of_resident_programs(small, monkeypatch):
    """The filter's column splits count waves of PROGRAMS_PER_SM programs per SM (on an H200's
    132 SMs: S = 5 at 60k x 60k, where one per SM gave 7; 32 on the memory bank's 8 row tiles), 1
    on the CPU; ``select`` takes them for each chunk's rows, and any split count selects what the
    merge selects (the splits append to the same lists)."""
    monkeypatch.setattr(kk, "sm_count", lambda device: 132)
    h200 = torch.device("cuda")
    assert kt.PROGRAMS_PER_SM == 2
    assert [kt.filter_splits(60000, 60000, h200), kt.filter_splits(60000, 60000, h200, 1)] == [5, 7]
    assert [kt.filter_splits(1024, 65536, h200), kt.filter_splits(1024, 65536, h200, 1)] == [32, 16]
    assert kt.filter_splits(60000, 60000, torch.device("cpu")) == 1
    monkeypatch.setattr(kt, "LIST_BYTES", 128 * kt.CAP * 8)
    asked = []
    monkeypatch.setattr(kt, "filter_splits", lambda m, n, device: asked.append((m, n)) or 3)
    x = torch.randn(300, 24).half()
    (dist, index), want = _both(monkeypatch, x, x, 4, True)
    assert asked == [(128, 300)]
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])


def _lists(monkeypatch, x, k, policy, splits=None):
    """``(count, lists)`` as the selection reads them after the filter of ``policy``, ``splits``
    runs of each pair's tiles on half (default: the CPU's 1)."""
    from daal_testing import spy_launches

    with monkeypatch.context() as m:
        if splits is not None:
            m.setattr(kt, "half_splits", lambda rows, device: splits)
        seen = spy_launches(m, kt, ["_knn_select_kernel"],
                            record=lambda name, args, kwargs: (args[0].clone(), args[1].clone()))
        m.setenv(kk.SELECT_ENV, policy)
        out = kk.knn(x, x, k, exclude_self=True)
    (count, lists), = seen
    return count, lists, out


def _rows_of(count, lists):
    cap = lists.shape[1]
    return [sorted(lists[i, :min(int(c), cap)].tolist()) if c <= cap else None for i, c in enumerate(count)]


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_half_lists_what_every_tile_lists(small, monkeypatch, splits):
    """The filter of a self-search on half the tiles (``DAAL_KNN_SELECT=half``) lists each row's
    entries, keys (s, j) bit for bit, as the filter on every tile does: clustered rows (many
    entries in other row blocks' tiles), duplicates across blocks, a NaN row and an infinite row,
    4 row blocks and a tail of 71 rows, each pair's tiles in 1, 2 or 5 runs (a run may cross from
    the pair's first row block to its second); the selection then gives the merge's result."""
    torch.manual_seed(11)
    centers = torch.randn(9, 40)
    x = (centers[torch.randint(0, 9, (455,))] + 0.3 * torch.randn(455, 40)).half()
    x[300] = x[17]
    x[451] = x[2]
    x[40] = float("nan")
    x[200] = float("inf")
    count, lists, got = _lists(monkeypatch, x, 8, "threshold")
    count_h, lists_h, got_h = _lists(monkeypatch, x, 8, "half", splits)
    assert torch.equal(count, count_h)
    assert _rows_of(count, lists) == _rows_of(count_h, lists_h)
    assert sum(len(r) for r in _rows_of(count, lists) if r) > 455 * 8  # the lists are not empty
    monkeypatch.setenv(kk.SELECT_ENV, "merge")
    want = kk.knn(x, x, 8, exclude_self=True)
    for out in (got, got_h):
        assert torch.equal(out[0], want[0]) and torch.equal(out[1], want[1])


def test_half_lists_close_rows_of_large_norm_once(small, monkeypatch):
    """Close pairs of rows with norms near 2000 (float16): the GEMM form's s rounds below -1 for
    some, and a diagonal tile's "no column threshold" was -1, so such a pair was listed from both
    sides, twice in each row's list (a races probe, 2026-12-07; wrong where the two keys differ,
    slower where the lists overflow). Now -inf: the half filter lists what the full one does."""
    torch.manual_seed(4)
    base = torch.randn(128, 64) * 250
    x = torch.cat([base, base + 0.01 * torch.randn_like(base)])[torch.randperm(256)].half()
    xf = x.float()
    s = (xf * xf).sum(1)[:, None] + (xf * xf).sum(1)[None, :] - 2 * xf @ xf.T
    assert (s.fill_diagonal_(0) <= -1).any()  # the case: some pair's s below -1
    count, lists, got = _lists(monkeypatch, x, 3, "threshold")
    count_h, lists_h, got_h = _lists(monkeypatch, x, 3, "half")
    assert torch.equal(count, count_h), (count_h - count).nonzero().flatten().tolist()
    assert _rows_of(count, lists) == _rows_of(count_h, lists_h)
    assert torch.equal(got[1], got_h[1])


@pytest.mark.parametrize("N, D, k", [(129, 64, 1), (260, 129, 5), (520, 16, 16)])
def test_half_with_self_pairs_kept(small, monkeypatch, N, D, k):
    """A self-search that keeps self pairs (the diagonal tiles list ``j = i``), one tail row,
    odd D, k up to 16: the merge's result on half the tiles."""
    x = torch.randn(N, D).half()
    (dist, index), want = _both(monkeypatch, x, x, k, False, "half")
    assert torch.equal(dist, want[0]) and torch.equal(index, want[1])
    assert (index[:, 0] == torch.arange(N)).all()


def test_half_applies_to_square_tiles_of_one_self_search(small, monkeypatch):
    """``halves``: the same tensor as queries and references (not a copy), square filter tiles
    (not 256 x 128), and every row's list at once (not the query chunks of a smaller LIST_BYTES)."""
    x = torch.randn(300, 32).half()
    assert kt.halves(x, x, 8) and not kt.halves(x, x.clone(), 8)
    with kt.filter_tiles((256, 128, 8, 3, None)):
        assert not kt.halves(x, x, 8)
    with kt.filter_tiles((128, 128, 8, 3, 128)):
        assert kt.halves(x, x, 8)
    monkeypatch.setattr(kt, "LIST_BYTES", 299 * kt.CAP * 8)
    y = x[:299]
    assert not kt.halves(x, x, 8) and kt.halves(y, y, 8)
    assert not kt.halves(y, y, 9)  # twice the slots per row from k = 9


@pytest.mark.parametrize("M, splits", [(1000, 1), (1100, 3)])
def test_half_tiles_share_their_column_blocks(small, monkeypatch, M, splits):
    """The half filter's tiles (each tile's blocks, read under the interpreter): every pair
    ``I <= J`` of the ``nb`` row blocks once (nb even and odd, in 1 and 3 runs per pair), and
    the k-th tile of every pair of row blocks on the same column block, or one of two (the L2
    footprint of the other filter: the programs of a wave share their column blocks)."""
    seen = []
    dot = kt._dot_tile

    def spy(q_rows, r_ptr, q_desc, r_desc, row_lo, n0, *rest):
        seen.append((int(row_lo) // 128, int(n0) // 128))
        return dot(q_rows, r_ptr, q_desc, r_desc, row_lo, n0, *rest)
    monkeypatch.setattr(kt, "_dot_tile", spy)
    monkeypatch.setattr(kt, "half_splits", lambda m, device: splits)
    x = torch.randn(M, 16).half()
    kt.select(x, x, 4, True, until="filter", half=True)
    nb = -(-M // 128)
    assert sorted(seen) == [(i, j) for i in range(nb) for j in range(i, nb)]
    pairs = {}
    for i, j in seen:  # each pair's tiles in their order (its runs launch in order)
        pairs.setdefault(min(i, nb - 1 - i), []).append(j)
    assert len(pairs) == -(-nb // 2)
    for k in range(nb + 1):
        assert len({cols[k] for cols in pairs.values() if k < len(cols)}) <= 2, k


def test_half_grid_counts_waves_of_resident_programs(monkeypatch):
    """Runs per pair of row blocks (``half_splits``): at 60k rows on an H200's 132 SMs, 235 pairs
    of 470 tiles in 10 runs at two programs per SM (2,350 programs: 8.9 waves of 264), 5 at one;
    1 on the CPU."""
    monkeypatch.setattr(kk, "sm_count", lambda device: 132)
    h200 = torch.device("cuda")
    assert [kt.half_splits(60000, h200), kt.half_splits(60000, h200, 1)] == [10, 5]
    assert kt.half_splits(60000, torch.device("cpu")) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_thresholds_bound_the_gemm_form(dtype):
    """``thresholds`` lies above the GEMM form ``max(qn + rn - 2 q.r, eps)`` (float32 sums, in
    two orders: one pass and 64-wide chunks) of every pair whose exact squared distance is at
    most the row's bound, for close pairs of large and of unit vectors at D = 512; and above it
    by little for unit vectors (at most 0.2% of the bound plus 5e-4)."""
    torch.manual_seed(2)
    for scale in (1.0, 30.0):
        q = (torch.randn(64, 512) * scale / 22.6).to(dtype)
        r = torch.cat([q + (torch.randn(64, 512) * 1e-3 * scale).to(dtype), (torch.randn(192, 512) * scale / 22.6).to(dtype)])
        qf, rf = q.float(), r.float()
        exact = torch.cdist(q.double(), r.double()).square()
        qn, rn = (qf * qf).sum(1), (rf * rf).sum(1)
        one = (qn[:, None] + rn[None, :] - 2.0 * (qf @ rf.T)).clamp_min(kk.EPS)
        chunked = sum(qf[:, d:d + 64] @ rf[:, d:d + 64].T for d in range(0, 512, 64))
        two = (qn[:, None] + rn[None, :] - 2.0 * chunked).clamp_min(kk.EPS)
        bound = exact.sort(1).values[:, 9]  # a row's 10th nearest: the sample's largest kept
        e = bound.float()
        t = kt.thresholds(e, qn, rn, 512)
        inside = exact <= bound[:, None]
        assert (one[inside] <= t[:, None].expand_as(one)[inside]).all()
        assert (two[inside] <= t[:, None].expand_as(two)[inside]).all()
        if scale == 1.0:
            assert ((t - e) <= 2e-3 * e + 5e-4).all()


def test_thresholds_cover_the_worst_case_error_at_every_width():
    """The margin above ``e_i (1 + 2^-10)`` covers the GEMM form's worst-case error for float16 /
    bfloat16 inputs, ``2 D 2^-24 (qn_i + rn_j) + 2^-22 (qn_i + rn_j)``, at every width D: a fixed
    2^-12 covered it up to D = 2^10 only (wide embeddings, D = 2048, could lose a true neighbour to
    the filter), so the margin grows with D beyond it."""
    qn = torch.tensor([1.0, 4.0, 900.0])
    rn = torch.tensor([2.0, 0.5, 30.0])
    e = torch.tensor([0.1, 0.0, 5.0])
    for d in (1, 64, 512, 1024, 1025, 2048, 4096, 1 << 14):
        margin = kt.thresholds(e, qn, rn, d).double() - e.double() * (1.0 + 2.0 ** -10)
        worst = (2 * d * 2.0 ** -24 + 2.0 ** -22) * (qn.double() + rn.max().double())
        assert (margin >= worst * (1 - 1e-6)).all(), (d, margin, worst)
        assert (margin <= 4 * worst + 2.0 ** -12 * (qn + rn.max())).all(), (d, margin, worst)  # and not loose


def test_eligibility_and_the_switch(small, monkeypatch):
    """float16/bfloat16, no labels, 0 < k <= 16, a sample of at least MIN_SAMPLE (and k + 2)
    rows, descriptor loads (an sm_90/sm_100 device, 16-byte-aligned rows: not an A100, not a
    misaligned view); labels, float32, an explicit split count and k > 16 run the merge; a
    misspelt DAAL_KNN_SELECT is a ValueError naming it."""
    x = torch.randn(200, 32).half()
    assert kt.eligible(x, x, 8, False) and kt.eligible(x.bfloat16(), x.bfloat16(), 16, False)
    assert not kt.eligible(x.float(), x.float(), 8, False)
    assert not kt.eligible(x, x, 8, True) and not kt.eligible(x, x, 17, False) and not kt.eligible(x, x, 0, False)
    assert not kt.eligible(x, x[:28], 8, False)  # a sample of 7 rows
    odd = torch.randn(200, 33).half()[:, 1:]  # rows of 32 columns, 66 bytes apart
    assert not kt.eligible(odd, odd, 8, False) and not kt.eligible(x, odd, 8, False)
    with monkeypatch.context() as m:  # no descriptor loads (a CPU tensor outside the interpreter)
        m.setattr(kt, "interpreting", lambda: False)
        assert not kt.eligible(x, x, 8, False)
    calls = []
    monkeypatch.setattr(kt, "select", lambda *a, **kw: calls.append(a))
    monkeypatch.setenv(kk.SELECT_ENV, "threshold")
    labels = torch.randint(0, 5, (200,))
    kk.knn(x, x, 4, query_labels=labels, ref_labels=labels, exclude_self=True)
    kk.knn(x.float(), x.float(), 4)
    kk.knn(x, x, 20)
    kk._knn_forward(x, x, 4, None, None, False, 2)
    assert calls == []
    monkeypatch.setenv(kk.SELECT_ENV, "Threshold")
    with pytest.raises(ValueError, match="DAAL_KNN_SELECT"):
        kk.knn(x, x, 4)


def test_the_threshold_path_never_syncs(small):
    """Its bound, counts and chunks stay on the device, on every tile or half of them: no
    operator copies a value to the host."""
    x = torch.randn(200, 32).half()
    for half, name in ((False, "_knn_filter_kernel"), (True, "_knn_filter_half_kernel")):
        with LaunchCount() as count:
            kt.select(x, x, 5, True, half=half)
        assert not count.syncs, (half, count.syncs)
        launched = {name.split(".")[-1] for name in count.triton}  # the sample's forward, then these three
        assert {name, "_knn_select_kernel", "_knn_rescan_kernel"} <= launched, count.triton


#: The threshold path's first launches on a GPU, in a child process (``gpu_canary.first_launches``):
#: the 60k evaluation's self-search as the benchmarks and the probe launch it, the memory bank's
#: shape (on every tile), then 24-slot lists at 4100 rows (most rows overflow: the rescan); each
#: result's indices in range. ``policy``: "threshold" or "half"; ``blocks``: one of the filter's
#: other tiles (``FILTER_ALTERNATIVES``), or None; the sizes: :data:`GPU_SIZES`.
_SMOKE = """
import contextlib, torch
from daal_triton.kernels import knn_threshold as kt
policy, blocks = {policy!r}, {blocks!r}
unit = lambda n: torch.nn.functional.normalize(torch.randn(n, {d}, device={device!r}), dim=1).to(torch.{dtype})
x = unit({n})
inputs = [(x, x)] + ([(unit({bank[0]}), unit({bank[1]}))] if policy == "threshold" and blocks is None else [])
with kt.filter_tiles(blocks) if blocks else contextlib.nullcontext():
    for q, r in inputs:
        assert kt.eligible(q, r, 8, False) and (policy != "half" or kt.halves(q, r, 8))
        dist, index = kt.select(q, r, 8, r is q, half=policy == "half")
        torch.cuda.synchronize() if q.is_cuda else None
        assert bool(torch.isfinite(dist).all()) and bool(((index >= 0) & (index < r.shape[0])).all())
    kt.CAP = 24
    y = x[:{small}]
    kt.select(y, y, 8, True, half=policy == "half")
    torch.cuda.synchronize() if y.is_cuda else None
print("ok")
"""
GPU_SIZES = dict(device="cuda", dtype="bfloat16", n=60000, bank=(1024, 65536), small=4100, d=512)


def smoke(policy: str, blocks=None, **sizes) -> str:
    """The code of :data:`_SMOKE` for ``policy`` and ``blocks`` at :data:`GPU_SIZES` (``sizes``
    replacing some: the CPU test's)."""
    return _SMOKE.format(policy=policy, blocks=blocks, **{**GPU_SIZES, **sizes})


#: Seconds a child may take (a Python start, the path's JIT builds, its launches: about 10-20 s
#: expected, an estimate): a hang costs this.
SMOKE_S = 60


def _on_gpu(variant: str, name: str, policy: str = "threshold", blocks=None) -> None:
    """Skip where the threshold path does not run (no GPU, no descriptor loads); else fail, and
    record the failure in the canary, unless its first launches returned in a child process:
    a filter that faults would otherwise take this test process and the tests after it (and
    until 2026-12-05 the benchmarks timed it unvetted). The filter on other tiles (``blocks``)
    fails at once where the canary records a failure of the path on its own tiles."""
    x = torch.empty(4100, 512, device="cuda", dtype=torch.bfloat16)
    if not kt.eligible(x, x, 8, False):
        pytest.skip("the threshold path needs the filter's descriptor loads (sm_90, sm_100)")
    why = unvetted("threshold")
    if blocks is not None and why and "failed" in why:  # the path on its own tiles failed: no child
        record(variant, "fail", name)
        pytest.fail(f"not tried: {why}")
    first_launches(variant, smoke(policy, blocks), SMOKE_S, name)


def _against_merge(monkeypatch, q, r, k, own, policy) -> tuple:
    """``policy``'s ``(dist, index)`` of ``kk.knn``, checked against the merge's: the same
    neighbours in 99.9% of the rows (the filter's tiles may sum the GEMM form in another order
    than the merge's: near-ties may swap) and distances within 1e-3; with the default lists and
    with 24 slots (most rows overflow and are rescanned)."""
    for cap in (kt.CAP, 24):
        monkeypatch.setattr(kt, "CAP", cap)
        monkeypatch.setenv(kk.SELECT_ENV, policy)
        got = kk.knn(q, r, k, exclude_self=own)
        monkeypatch.setenv(kk.SELECT_ENV, "merge")
        want = kk.knn(q, r, k, exclude_self=own)
        same = (got[1] == want[1]).all(dim=1).float().mean().item()
        assert same >= 0.999, (policy, cap, same)
        assert (got[0] - want[0]).abs().max().item() <= 1e-3, (policy, cap)
        assert torch.isfinite(got[0]).all() and (got[1] >= 0).all()
    return got


def _unit(n: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 512, device="cuda"), dim=1).bfloat16()


@pytest.mark.gpu
@pytest.mark.parametrize("M, N, k, own, policy", [
    # each policy's first test launches it in a child first (shard_weight: an estimate,
    # tests/conftest.py; a Python start and about seven JIT builds: the sample's forwards, the
    # filters at two list sizes, with and without self pairs, the selection, the rescan)
    pytest.param(4100, 4100, 8, True, "threshold", marks=pytest.mark.shard_weight(15)),
    pytest.param(4100, 4100, 8, True, "half", marks=pytest.mark.shard_weight(12)),
    (1024, 65536, 8, False, "threshold"), (3000, 20000, 16, False, "threshold")])
def test_threshold_gpu(monkeypatch, request, M, N, k, own, policy):
    """On the GPU (bfloat16, D = 512; the filter through descriptors), after the path's first
    launches returned in a child process: the merge's neighbours and the float64 reference's
    distances, self-kNN (also with the filter on half the tiles, ``DAAL_KNN_SELECT=half``), a
    memory bank's shape, k = 16. Each outcome goes to the canary (tests/gpu_canary.py) under
    the policy's name: the benchmarks and the probe time a policy only after passes and no
    failure."""
    _on_gpu(policy, request.node.name, policy)
    with canary(policy, request.node.name):
        q = _unit(M)
        r = q if own else _unit(N)
        got = _against_merge(monkeypatch, q, r, k, own, policy)
        if not own:
            ref_d, _ = reference.knn(q[:512].double(), r.double(), k, exclude_self=False)
            assert (got[0][:512].double() - ref_d).abs().max().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.shard_weight(8)  # a child each: a Python start, the filter's two builds (an estimate)
@pytest.mark.parametrize("blocks", sorted(kt.FILTER_ALTERNATIVES, key=str), ids=filter_tiles_variant)
def test_filter_tiles_gpu(monkeypatch, request, blocks):
    """On the GPU, after its first launches returned in a child process: the filter on each of
    the probe's other tiles (``FILTER_ALTERNATIVES``) selects the merge's neighbours (self-kNN,
    4100 rows, default and 24-slot lists). The outcome goes to the canary under
    ``gpu_canary.filter_tiles_variant(blocks)``: the probe times those tiles only after a pass."""
    variant = filter_tiles_variant(blocks)
    _on_gpu(variant, request.node.name, blocks=blocks)
    with canary(variant, request.node.name), kt.filter_tiles(blocks):
        q = _unit(4100)
        _against_merge(monkeypatch, q, q, 8, True, "threshold")


@pytest.mark.parametrize("policy, blocks", [("threshold", None), ("half", None),
                                           ("threshold", next(iter(kt.FILTER_ALTERNATIVES)))],
                         ids=["threshold", "half", "other-tiles"])
def test_first_launches_code_runs(monkeypatch, capsys, small, policy, blocks):
    """The code the GPU tests first run in a child process (``smoke``), here in-process under
    the interpreter at small sizes: it takes the path it names and checks what it returns (an
    error in it would fail every GPU test of the path, and hold back its benchmarks)."""
    from daal_testing import spy_launches

    monkeypatch.setattr(kt, "CAP", kt.CAP)  # it sets 24: restored after
    name = "_knn_filter_half_kernel" if policy == "half" else "_knn_filter_kernel"
    launched = spy_launches(monkeypatch, kt, [name])
    seen = []
    tiles = kt.filter_tiles
    monkeypatch.setattr(kt, "filter_tiles", lambda b: seen.append(b) or tiles(b))
    exec(smoke(policy, blocks, device="cpu", dtype="float16", n=300, bank=(64, 1100), small=200, d=64), {})
    assert capsys.readouterr().out.strip().endswith("ok")
    assert launched.count(name) == (3 if policy == "threshold" and blocks is None else 2), launched
    assert seen == ([blocks] if blocks else [])


def _filter_job(exclude_self: bool, capability: int = 90, half: bool = False) -> dict:
    """A compile job (tests/daal_testing.py, ``compile_many_for_gpu``) of the filter as the 60k
    evaluation (self pairs excluded) or the memory bank (not) launches it (``half``: the 60k
    evaluation's filter on half the tiles): bfloat16 through descriptors, D = 512, ints and
    pointers divisible by 16 (as recorded by tests/kernels/launch_recorder.py), with its SASS."""
    cfg = kt.CONFIGS["filter"]
    launch = cfg.launch(512)
    desc = lambda rows: f"tensordesc<bf16[{rows}, {launch['BLOCK_D']}]>"  # noqa: E731
    types = {"q_ptr": "*bf16", "r_ptr": "*bf16", "q_desc": desc(cfg.blocks["BLOCK_M"]),
             "r_desc": desc(cfg.blocks["BLOCK_N"]), "qn_ptr": "*fp32", "rn_ptr": "*fp32", "thr_ptr": "*fp32",
             "count_ptr": "*i32", "list_ptr": "*i64", "x_ptr": "*bf16", "x_desc": desc(cfg.blocks["BLOCK_M"]),
             "xn_ptr": "*fp32"}
    jit = kt._knn_filter_half_kernel if half else kt._knn_filter_kernel
    blocks = {k: v for k, v in launch.items() if k not in ("num_warps", "num_stages")}
    if half:
        blocks = {"BLOCK": blocks.pop("BLOCK_M"), "BLOCK_D": blocks["BLOCK_D"]}
    constexprs = {"CAP": kt.CAP, "EXCLUDE_SELF": exclude_self, "TMA": True, "INPUT_PRECISION": "ieee",
                  "ROUND_TF32": False, **blocks}
    signature = {name: types.get(name, "i32") for name in jit.arg_names if name not in constexprs}
    return {"module": jit.fn.__module__, "name": jit.fn.__name__, "signature": signature, "constexprs": constexprs,
            "divisible": [n for n in signature if not n.endswith("_desc")], "capability": capability,
            "num_warps": launch["num_warps"], "num_stages": launch["num_stages"], "maxnreg": None,
            "specialisation": "recorded", "unit": [], "rows": [], "sass": True}


@pytest.mark.build
def test_filter_lists_with_one_conversion_per_round():
    """The filter's sm_90 SASS (docs/kernels.md, "Selection by a threshold"): every global load of
    a tile (the column norms) is issued before its first MMA, so none waits after the K-loop;
    a listing round (the loop without MMAs that stores) writes one 64-bit key per row (one
    ``STG.E.64``, no load) after one layout conversion (at most two ``BAR.SYNC``: the two
    fields stored apart took two conversions, four); the first round stands before the loop
    (a tile of R rounds knocks out R - 1 entries, not R); and the tile's compare keeps no clamp
    (``FMNMX`` per entry). Both the 60k evaluation's build and the bank's."""
    import re

    from daal_testing import compile_many_for_gpu, sass_loops

    for exclude_self, res in zip((True, False), compile_many_for_gpu([_filter_job(True), _filter_job(False)])):
        assert not res.get("error"), res.get("error")
        if not res["sass"]:
            pytest.skip("cuobjdump is not shipped with this Triton")
        ops = [(int(m.group(1), 16), m.group(2)) for m in
               re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", res["sass"])]
        mma = [a for a, o in ops if o.startswith("HGMMA")]
        loops = sass_loops(res["sass"])
        listing = [lp for lp in loops if "STG.E.64" in lp[2] and not any(o.startswith("HGMMA") for o in lp[2])]
        assert len(listing) == 1, [(lp[0], lp[1], len(lp[2])) for lp in loops]
        start, end, body = listing[0]
        assert body.count("STG.E.64") == 1 and not [o for o in body if o.startswith(("LDG", "STG.E "))], body
        assert sum(o.startswith("BAR.SYNC") for o in body) <= 2, (exclude_self, body.count("BAR.SYNC.DEFER_BLOCKING"))
        tile_end = max(a for a, o in ops if o == "EXIT")
        loads = [a for a, o in ops if o.startswith("LDG") and mma[0] < a < tile_end]
        assert not loads, (exclude_self, [hex(a) for a in loads])
        # the first round before the loop (R rounds, R - 1 knock-outs), its four rows' keys clamped
        assert sum(o == "STG.E.64" for a, o in ops if mma[-1] < a < start) == 1, exclude_self
        clamps = [a for a, o in ops if o.startswith("FMNMX") and mma[-1] < a < start]
        assert len(clamps) <= 8, (exclude_self, len(clamps))  # a clamp per entry: 128


@pytest.mark.build
def test_half_filter_lists_both_ways_by_rows():
    """The sm_90 SASS of the filter on half the tiles (docs/kernels.md, "Half the tiles of a
    self-search"): no local memory; its norms and thresholds loaded before the MMAs (no global
    load after the first); two listing loops, each one 64-bit key store a round: the columns'
    entries with one atomic a round (the slot) and at most 8 ``BAR.SYNC`` (a column reduction
    took 33), the rows' with no atomic and at most 2."""
    require_recorded_compiler_facts()
    import re

    from daal_testing import compile_many_for_gpu, sass_loops

    res, = compile_many_for_gpu([_filter_job(True, half=True)])
    assert not res.get("error"), res.get("error")
    if not res["sass"]:
        pytest.skip("cuobjdump is not shipped with this Triton")
    ops = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", res["sass"])]
    assert res["stack"] == 0 and not [o for _, o in ops if o.startswith(("LDL", "STL"))]
    mma = [a for a, o in ops if o.startswith("HGMMA")]
    tile_end = max(a for a, o in ops if o == "EXIT")
    assert not [a for a, o in ops if o.startswith("LDG") and mma[0] < a < tile_end]
    listing = [body for _, _, body in sass_loops(res["sass"])
               if "STG.E.64" in body and not any(o.startswith("HGMMA") for o in body)]
    assert len(listing) == 2, [len(body) for body in listing]
    columns, rows = listing
    assert columns.count("STG.E.64") == 1 and sum(o.startswith("ATOMG") for o in columns) == 1
    assert sum(o.startswith("BAR.SYNC") for o in columns) <= 8, columns
    assert rows.count("STG.E.64") == 1 and not any(o.startswith("ATOMG") for o in rows)
    assert sum(o.startswith("BAR.SYNC") for o in rows) <= 2, rows
