"""Reference pairwise distances and kNN: the oracles of the kernels, checked from first principles."""
import pytest
import torch

from daal_triton import reference as R


def test_pairwise_matches_direct_differences():
    x = torch.randn(13, 7, dtype=torch.float64)
    y = torch.randn(5, 7, dtype=torch.float64)
    direct = ((x[:, None] - y[None]) ** 2).sum(-1).clamp(min=1e-12).sqrt()
    assert torch.allclose(R.pairwise_distance(x, y), direct, atol=1e-12)


def test_pairwise_duplicates_clamp_and_zero_gradient():
    x = torch.randn(3, 4, dtype=torch.float64)
    x = torch.cat([x, x[:1]]).requires_grad_(True)
    d = R.pairwise_distance(x, x)
    assert abs(d[0, 3].item() - 1e-6) < 1e-12
    d[0, 3].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() == 0.0


def _brute_knn(q, r, k, ql=None, rl=None, exclude_self=False):
    out_d, out_i = [], []
    for i in range(q.shape[0]):
        cand = []
        for j in range(r.shape[0]):
            if exclude_self and i == j:
                continue
            if ql is not None and int(ql[i]) != int(rl[j]):
                continue
            cand.append((float(((q[i] - r[j]) ** 2).sum().clamp(min=1e-12).sqrt()), j))
        cand.sort()
        cand = cand[:k] + [(float("inf"), -1)] * (k - len(cand[:k]))
        out_d.append([c[0] for c in cand])
        out_i.append([c[1] for c in cand])
    return torch.tensor(out_d, dtype=torch.float64), torch.tensor(out_i)


@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 4, 9])
def test_knn_matches_brute_force(labels, exclude_self, k):
    q = torch.randn(11, 3, dtype=torch.float64)
    r = torch.cat([q[:6], torch.randn(3, 3, dtype=torch.float64)])  # shared rows: self pairs
    ql = torch.randint(0, 3, (11,)) if labels else None
    rl = torch.randint(0, 3, (9,)) if labels else None
    d, i = R.knn(q, r, k, query_labels=ql, ref_labels=rl, exclude_self=exclude_self)
    bd, bi = _brute_knn(q, r, k, ql, rl, exclude_self)
    assert torch.equal(i, bi)
    assert torch.allclose(d, bd, atol=1e-12)
    assert i.dtype == torch.int64


def test_knn_sorts_close_pairs_by_their_exact_distance():
    """Points ~1e-4 apart in float32: the GEMM form selects, but its rounding (~1e-7 on squared
    distances ~1e-8) scrambles the order; the returned distances (direct differences) are sorted,
    ties to the smaller index, as the kernels' finish returns them."""
    g = torch.Generator().manual_seed(3)
    centre = torch.randn(1, 64, generator=g)
    x = centre + 1e-4 * torch.randn(40, 64, generator=g)
    y = torch.arange(40) % 2
    d, i = R.knn(x, x, 6, query_labels=y, ref_labels=y, exclude_self=True)
    assert (d[:, 1:] >= d[:, :-1]).all(), "distances out of order"
    tie = d[:, 1:] == d[:, :-1]
    assert (i[:, 1:][tie] > i[:, :-1][tie]).all()
    assert torch.equal(d, R.selected_distance(x, x, i))
    # the same neighbour sets as the GEMM-form selection, only their order changed
    gemm = R.pairwise_distance(x, x).masked_fill(y[:, None] != y[None, :], float("inf"))
    gemm.fill_diagonal_(float("inf"))
    chosen = torch.sort(gemm, dim=1, stable=True).indices[:, :6]
    assert torch.equal(i.sort(1).values, chosen.sort(1).values)
    assert not torch.equal(i, chosen), "the case no longer tells: the GEMM order is already exact"


def test_knn_selects_on_squared_distances_as_the_kernels_do():
    """The reference selected on the root of the GEMM form: squared distances one unit in the
    last place apart (0.99999994 and 1.0) became a tie, broken by index, and strictly nearer rows
    were left out (an evaluation probe: Recall@8 0.9375 on the reference, 0.875 on the kernels and
    in float64). It selects on the squared GEMM form, as the kernels do."""
    e = torch.nn.functional.normalize(torch.tensor([[0., 0], [-1, 0], [-1, 0], [-1, 0], [-1, 2], [-1, 2]]), dim=1)
    sq = R.pairwise_distance_sq(e[:1], e)[0]
    assert sq[4] < sq[1] and torch.sqrt(sq[4]) == torch.sqrt(sq[1])  # the case tells: the root ties them
    d, i = R.knn(e[:1], e, 3)
    assert i.tolist() == [[0, 4, 5]] and bool(d[0, 1] <= d[0, 2])
    assert torch.equal(R.pairwise_distance(e, e), torch.sqrt(R.pairwise_distance_sq(e, e)))


def test_knn_ties_go_to_the_smaller_index_and_padding():
    r = torch.tensor([[1.0], [0.0], [1.0], [-1.0], [2.0]], dtype=torch.float64)
    q = torch.tensor([[0.0]], dtype=torch.float64)
    d, i = R.knn(q, r, 7)
    assert i.tolist() == [[1, 0, 2, 3, 4, -1, -1]]
    assert d[0, :5].tolist() == [1e-6, 1.0, 1.0, 1.0, 2.0] and torch.isinf(d[0, 5:]).all()


def test_knn_distance_gradient_flows_to_query_and_ref():
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: R.knn(a, b, 3)[0], (q, r))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sort_columns", [0, 512], ids=["topk", "sort"])
def test_smallest_is_the_stable_sorts_first_k(seed, sort_columns, monkeypatch):
    """``smallest`` (topk, then the ties at the k-th value in index order; narrow rows: the sort
    itself) picks and orders exactly what a stable sort's first k columns do: rows full of ties,
    inf padding, k = 1 .. N."""
    from daal_triton.reference import distance

    monkeypatch.setattr(distance, "SORT_COLUMNS", sort_columns)
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (23, 17), generator=g).double()
    values[torch.rand(23, 17, generator=g) < 0.3] = float("inf")
    values[0] = float("inf")  # a row with no finite value
    values[1] = 2.0  # a row of one tie
    for k in (1, 2, 5, 16, 17):
        want = torch.sort(values, dim=1, stable=True).indices[:, :k]
        assert torch.equal(R.smallest(values, k), want), k
    assert R.smallest(values, 0).shape == (23, 0)
    assert R.smallest(values[:, :0], 0).shape == (23, 0)


def test_smallest_holds_no_int64_copy_of_the_rows():
    """Its masks and counts are int32: an int64 sum and an int64 comparison were the two largest
    blocks of a 512 x 20,000 reference kNN (2 x 78 MiB beside a 39 MiB float32 distance matrix)."""
    from torch.profiler import ProfilerActivity, profile

    values = torch.randn(64, 2000)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        R.smallest(values, 9)
    # the largest single allocation, inside the operators too (a dispatch mode sees only results)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest <= 4 * values.numel(), largest / values.numel()


def test_a_bank_below_batch_rows_sends_its_gradient_to_the_query_only():
    """``batch_rows``: neighbours among the first rows of ``ref`` are read from ``query`` (the
    gradient goes there, as with a reference set built by ``cat([query, bank])`` that carries it),
    and a detached bank builds no gradient of its own size: the same distances and gradients as
    the grad-carrying cat, float64."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(9, 6, generator=g, dtype=torch.float64)
    bank = torch.randn(30, 6, generator=g, dtype=torch.float64)
    a = q.clone().requires_grad_(True)
    d1, i1 = R.knn(a, torch.cat([a, bank]), 4, exclude_self=True)
    b = q.clone().requires_grad_(True)
    d2, i2 = R.knn(b, torch.cat([q, bank]), 4, exclude_self=True, batch_rows=9)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64)
    (d1 * w).sum().backward()
    (d2 * w).sum().backward()
    assert torch.equal(i1, i2) and torch.allclose(d1, d2, rtol=1e-15, atol=0)
    assert (i2 < 9).any() and (i2 >= 9).any()  # both kinds of neighbour
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    # a reference set that carries a gradient: its batch rows get none, its bank rows theirs
    ref = torch.cat([q, bank]).requires_grad_(True)
    d3, _ = R.knn(q, ref, 4, exclude_self=True, batch_rows=9)
    (d3 * w).sum().backward()
    assert ref.grad[:9].abs().max() == 0 and ref.grad[9:].abs().max() > 0


def test_a_detached_bank_costs_no_bank_sized_copy_or_gradient():
    """With ``batch_rows`` and a detached bank the reference neither copies the bank (it built
    ``cat([query[:B], ref[B:]])``, (B + N) x D, every call) nor gives it a (B + N) x D gradient
    buffer (the backward of indexing that cat): one bank-sized allocation is left, the squares
    of the selection's row norms."""
    from torch.profiler import ProfilerActivity, profile

    q = torch.randn(8, 256, requires_grad=True)
    ref = torch.cat([q.detach(), torch.randn(3000, 256)])  # what MemoryBank.with_batch gives
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        d, _ = R.knn(q, ref, 3, exclude_self=True, batch_rows=8)
        d.sum().backward()
    bank_bytes = ref.numel() * ref.element_size()
    big = [e.name for e in prof.events() if e.self_cpu_memory_usage >= bank_bytes * 0.9]
    assert len(big) == 1, big


def test_a_double_backward_inside_autocast_keeps_float32():
    """The backward's own GEMMs go through ``matmul_nt`` too: a second derivative taken inside a
    bfloat16 autocast region (a gradient penalty) was 2.9e-3 off the one taken outside it."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(9, 17, generator=g), torch.randn(7, 17, generator=g)

    def second(inside):
        a, b = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            (ga,) = torch.autograd.grad((R.pairwise_distance(a, b) ** 2).sum(), a, create_graph=True)
            (gb,) = torch.autograd.grad((ga ** 2).sum(), b)
        return gb

    assert torch.equal(second(True), second(False))


@pytest.mark.parametrize("qdt,rdt", [(torch.int64, torch.uint32), (torch.int16, torch.uint64), (torch.uint8, torch.uint16),
                                     (torch.int32, torch.uint32)])
def test_knn_labels_of_mixed_integer_types(qdt, rdt):
    """Labels of two integer types PyTorch cannot promote (unsigned 16/32/64-bit with another):
    compared as int64, the same neighbours as int64 labels (it raised PyTorch's "Promotion for
    uint16, uint32, uint64 types is not supported"; a layouts probe, 2026-12-07)."""
    q, r = torch.randn(9, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    ql, rl = torch.arange(9) % 3, torch.arange(11) % 3
    want = R.knn(q, r, 3, query_labels=ql, ref_labels=rl)
    got = R.knn(q, r, 3, query_labels=ql.to(qdt), ref_labels=rl.to(rdt))
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
