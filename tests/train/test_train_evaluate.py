"""Retrieval and clustering metrics, checked by hand and against pytorch-metric-learning."""
import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from daal_triton.train import evaluate as E  # noqa: E402


def test_neighbours_exclude_self_by_index_even_with_duplicates():
    emb = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    idx = E.neighbours(emb, 2, chunk=3)
    assert idx.tolist() == [[1, 2], [0, 2], [0, 1], [2, 0]]
    assert idx.dtype == torch.int64


def test_neighbours_drop_the_farthest_when_self_is_not_among_them():
    """Four identical rows, k = 1: the kNN returns 2 rows (ties to the smaller index), so rows 2
    and 3 do not find themselves; the extra (k+1-th) neighbour is the one dropped, not the
    nearest."""
    assert E.neighbours(torch.zeros(4, 2), 1).tolist() == [[1], [0], [0], [0]]


@pytest.mark.interpreter
def test_neighbours_and_metrics_use_the_backend_asked_for(monkeypatch):
    """``--knn-backend`` reaches daal_triton.knn, through all_metrics and retrieval_metrics
    ("triton": the interpreter here; "auto" would read as the reference on a CPU)."""
    seen = []
    real = E.daal_triton.knn

    def spy(*a, backend="auto", **k):
        seen.append(backend)
        return real(*a, backend=backend, **k)

    monkeypatch.setattr(E.daal_triton, "knn", spy)
    emb, labels = torch.randn(12, 3), torch.arange(12) % 3
    E.neighbours(emb, 2, backend="triton")
    E.all_metrics(emb, labels, backend="triton")
    assert len(seen) == 2 and set(seen) == {"triton"}, seen


def test_neighbours_chunks_agree():
    emb = torch.randn(37, 5)
    assert torch.equal(E.neighbours(emb, 6, chunk=4), E.neighbours(emb, 6, chunk=100))


def test_neighbours_bound_a_chunk_by_the_classes_size(monkeypatch):
    """MAP@R asks for k = the largest class's size; the reference's direct differences hold
    chunk x (k + 1) x D: 2,048 queries of a 1,000-image class at D = 512 asked for 4.2 GB (a
    shapes run with 1,000 test images a class died of it). A chunk now shrinks so that neither
    that block nor chunk x N passes CHUNK_ELEMENTS; the neighbours stay the same."""
    sizes = []
    real = E.daal_triton.knn

    def spy(q, ref, k, **kw):
        sizes.append((q.shape[0], k))
        return real(q, ref, k, **kw)

    emb = torch.randn(300, 16)
    want = E.neighbours(emb, 120)
    monkeypatch.setattr(E, "CHUNK_ELEMENTS", 8_000)
    monkeypatch.setattr(E.daal_triton, "knn", spy)
    got = E.neighbours(emb, 120)
    assert torch.equal(got, want)
    rows = {m for m, _ in sizes}
    assert max(rows) == 8_000 // (121 * 16) == 4 and sum(m for m, _ in sizes) == 300
    sizes.clear()
    E.neighbours(emb, 2)  # a small k: chunk x N is the larger block
    assert max(m for m, _ in sizes) == 8_000 // 300


def test_retrieval_metrics_by_hand():
    # 1-D points; classes a = {0, 1, 10}, b = {11, 12}
    emb = torch.tensor([[0.0], [1.0], [10.0], [11.0], [12.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = E.retrieval_metrics(emb, labels, normalize=False, ks=(1, 2))
    # nearest others: 0->1 (a), 1->0 (a), 10->11 (b), 11->10|12 tie (10: index 2 first -> a), 12->11 (b)
    assert m["recall@1"] == pytest.approx(3 / 5)
    # top-2: 0:{1,10} a; 1:{0,... } a; 10:{11,12} none; 11:{10,12} b; 12:{11,10} b
    assert m["recall@2"] == pytest.approx(4 / 5)
    # R: 2 for class a, 1 for class b
    # AP@R: q0: [a,a] -> 1; q1: [a, (10 vs 0? dist 9 vs 1 -> 0)] = [0 a, 10 a] -> 1;
    #       q10: [11 b, 12 b] -> 0; q11: [10 a] -> 0; q12: [11 b] -> 1
    assert m["map@r"] == pytest.approx(3 / 5)
    assert m["r_precision"] == pytest.approx(3 / 5)


def _brute_force_metrics(emb, labels, ks):
    """Float64, one query at a time, straight from the definitions (lone queries skipped)."""
    x = torch.nn.functional.normalize(emb.double(), dim=1)
    per = {f"recall@{k}": [] for k in ks} | {"map@r": [], "r_precision": []}
    for q in range(len(x)):
        others = [i for i in range(len(x)) if i != q]
        order = sorted(others, key=lambda i: (float((x[i] - x[q]).norm()), i))
        rel = [int(labels[i] == labels[q]) for i in order]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            per[f"recall@{k}"].append(float(any(rel[:k])))
        per["r_precision"].append(sum(rel[:r]) / r)
        per["map@r"].append(sum(rel[i] * sum(rel[:i + 1]) / (i + 1) for i in range(r)) / r)
    return {name: float(np.mean(v)) for name, v in per.items()}


@pytest.mark.parametrize("n,c", [(41, 13), (30, 30), (57, 4)])
def test_retrieval_metrics_match_a_brute_force(n, c):
    # Small classes (R below 8, so Recall@8 needs more neighbours than R), single-image classes
    # among them, and (30, 30): every class lone, where every metric is NaN.
    g = torch.Generator().manual_seed(n)
    labels = torch.cat([torch.arange(c), torch.randint(0, c // 2 + 1, (n - c,), generator=g)])
    labels = labels[torch.randperm(n, generator=g)]
    emb = torch.randn(n, 6, generator=g)
    ours = E.retrieval_metrics(emb, labels)
    if n == c:
        assert all(np.isnan(v) for v in ours.values())
        return
    assert int((torch.bincount(labels) == 1).sum()) > 0
    want = _brute_force_metrics(emb, labels, E.RECALL_KS)
    assert set(ours) == set(want)
    for name, value in want.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name


def test_metrics_take_any_label_values():
    """torch.bincount counted the classes: negative labels were a RuntimeError, and labels near
    2**40 asked for 8.8 TB (an evaluation probe). Only equality of labels matters."""
    g = torch.Generator().manual_seed(0)
    emb, y = torch.randn(30, 4, generator=g), torch.randint(0, 4, (30,), generator=g)
    expect = E.retrieval_metrics(emb, y)
    for relabelled in (y - 2, y + 2 ** 40, 7 - 1000 * y, y.int()):
        assert E.retrieval_metrics(emb, relabelled) == expect
    from types import SimpleNamespace

    assert E.test_split_notes(SimpleNamespace(labels=[-3, -3, 2 ** 40])) == E.test_split_notes(
        SimpleNamespace(labels=[0, 0, 1]))
    assert len(E.test_split_notes(SimpleNamespace(labels=[-3, 2 ** 40]))) == 1


def test_lone_queries_count_in_no_metric():
    # Class 2 has one image: it can retrieve nothing right, so (as pytorch-metric-learning's
    # AccuracyCalculator) it is no query at all; every other query is right.
    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    m = E.retrieval_metrics(emb, labels)
    assert m == {"recall@1": 1.0, "recall@2": 1.0, "recall@4": 1.0, "recall@8": 1.0,
                 "map@r": 1.0, "r_precision": 1.0}
    theirs = _pml_metrics(emb, labels)
    assert m["recall@1"] == pytest.approx(theirs["precision_at_1"])
    assert m["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"])


def _pml_metrics(emb, labels, seed=0):
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    calc = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision", "NMI"),
        k="max_bin_count", knn_func=CustomKNN(LpDistance(normalize_embeddings=True)),
        kmeans_func=lambda x, n: torch.as_tensor(E.kmeans_labels(
            torch.nn.functional.normalize(x, dim=1).double().cpu().numpy(), n, seed=seed)))
    return calc.get_accuracy(emb, labels)


@pytest.mark.parametrize("n,c,d", [(120, 6, 8), (97, 9, 3), (60, 40, 4)])
def test_metrics_match_pytorch_metric_learning(n, c, d):
    # (60, 40): many classes with a single image, which pml leaves out as "lone" queries.
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g)
    emb = centres[labels] + 0.9 * torch.randn(n, d, generator=g)
    ours = E.all_metrics(emb, labels)
    theirs = _pml_metrics(emb, labels)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["nmi"] == pytest.approx(theirs["NMI"], abs=1e-6)


def test_nmi_perfect_and_subclusters():
    # two classes, each with two well-separated modes
    rng = np.random.default_rng(0)
    labels, modes, pts = [], [], []
    centres = {(0, 0): (10, 0), (0, 1): (10, 3), (1, 0): (-10, 0), (1, 1): (-10, 3)}
    for (c, m), (x, y) in centres.items():
        for _ in range(20):
            labels.append(c)
            modes.append(m)
            pts.append((x + 0.05 * rng.normal(), y + 0.05 * rng.normal()))
    emb = torch.tensor(pts, dtype=torch.float32)
    labels = torch.tensor(labels)
    assert E.nmi(emb, labels, normalize=False) == pytest.approx(1.0)
    assert E.subcluster_nmi(emb, labels, np.array(modes), normalize=False) == pytest.approx(1.0)
    # collapse the modes: the sub-cluster metric drops to ~0, NMI stays 1
    flat = emb.clone()
    flat[:, 1] = 0.05 * torch.randn(len(flat))
    assert E.nmi(flat, labels, normalize=False) == pytest.approx(1.0)
    assert E.subcluster_nmi(flat, labels, np.array(modes), normalize=False) < 0.2


def _two_mode_classes(n: int = 20, seed: int = 0):
    """Classes 0 and 1, each two well-separated modes (2-D points), as in the test above."""
    rng = np.random.default_rng(seed)
    labels, modes, pts = [], [], []
    for (c, m), (x, y) in {(0, 0): (10, 0), (0, 1): (10, 3), (1, 0): (-10, 0), (1, 1): (-10, 3)}.items():
        for _ in range(n):
            labels.append(c)
            modes.append(m)
            pts.append((x + 0.05 * rng.normal(), y + 0.05 * rng.normal()))
    return torch.tensor(pts, dtype=torch.float32), torch.tensor(labels), np.array(modes)


def test_subcluster_nmi_averages_only_classes_with_modes_to_find():
    """A class with one mode, or with no more images than modes (k-means would split it
    perfectly whatever the embedding), counts in no average: adding either leaves the value as it
    was; with no class left the metric is NaN, not 0 or 1."""
    emb, labels, modes = _two_mode_classes()
    flat = emb.clone()
    flat[:, 1] = 0.05 * torch.randn(len(flat), generator=torch.Generator().manual_seed(1))
    base = E.subcluster_nmi(flat, labels, modes, normalize=False)
    assert base < 0.2
    one_mode = (torch.cat([flat, torch.tensor([[0.0, 50.0], [0.1, 50.0], [0.2, 50.0]])]),
                torch.cat([labels, torch.tensor([2, 2, 2])]), np.concatenate([modes, [0, 0, 0]]))
    assert E.subcluster_nmi(*one_mode, normalize=False) == pytest.approx(base)
    few = (torch.cat([flat, torch.tensor([[0.0, 50.0], [0.1, 50.0]])]),
           torch.cat([labels, torch.tensor([2, 2])]), np.concatenate([modes, [0, 1]]))
    assert E.subcluster_nmi(*few, normalize=False) == pytest.approx(base)
    assert np.isnan(E.subcluster_nmi(flat, labels, np.zeros(len(labels), dtype=int), normalize=False))


def test_subcluster_nmi_normalises_by_default():
    """Modes that differ only in norm (same direction: 1 vs 3 times a class's unit vector) are
    one point after normalisation, which the metric's default (the one daal-train reports)
    applies: about 0 then, 1 without it."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(2).repeat_interleave(40)
    modes = np.tile(np.repeat([0, 1], 20), 2)
    direction = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[labels]
    scale = torch.from_numpy(1.0 + 2.0 * modes).float()[:, None]
    emb = direction * scale * (1 + 0.01 * torch.randn(80, 1, generator=g))
    assert E.subcluster_nmi(emb, labels, modes, normalize=False) == pytest.approx(1.0)
    assert E.subcluster_nmi(emb, labels, modes) < 0.2
    assert E.all_metrics(emb, labels, modes)["subcluster_nmi"] < 0.2


def test_format_table():
    text = E.format_table({"a": {"recall@1": 0.5, "nmi": float("nan")}, "bb": {"recall@1": 1.0}})
    assert "recall@1" in text and "0.5000" in text and "-" in text.splitlines()[2]


def test_pixel_vectors_pool_large_images():
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.rand(3, 3, 64, 64), torch.zeros(3, dtype=torch.long))
    assert E.pixel_vectors(ds).shape == (3, 3 * 32 * 32)
    small = TensorDataset(torch.rand(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
    assert E.pixel_vectors(small).shape == (2, 3 * 16 * 16)


def test_training_curves_legend_covers_neither_the_curves_nor_the_tick_labels(tmp_path, monkeypatch):
    """training_curves.png: the legend sits outside both axes (with their tick labels) and the
    epoch axis has whole-number ticks only (a 2-epoch run had 0.25 steps and the legend over them)."""
    pytest.importorskip("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from daal_triton.train import plots

    kept, save = [], plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path, dpi=110: kept.append(fig) or save(fig, path, dpi))
    history = [{"model": "raw_pixels", "recall@1": 0.1},
               {"model": "untrained", "recall@1": 0.05}]
    history += [{"model": "trained", "epoch": e, "train_loss": 1.0 / e, "recall@1": 0.1 * e} for e in (1, 2)]
    plots.training_curves(history, str(tmp_path / "c.png"))
    (fig,) = kept
    renderer = FigureCanvasAgg(fig).get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == 3
    for ax in fig.axes:
        assert not box.overlaps(ax.get_tightbbox(renderer)), "the legend covers an axis"
    assert list(fig.axes[0].get_xticks()) == [0, 1, 2]
    kept.clear()  # one epoch, no baselines: one point, still a whole-number tick (it had 0.95, 0.96, ...)
    plots.training_curves([{"model": "trained", "epoch": 1, "train_loss": 0.5, "recall@1": 0.3}],
                          str(tmp_path / "d.png"))
    (fig,) = kept
    assert list(fig.axes[0].get_xticks()) == [1]


def test_evaluation_leaves_the_global_generator_as_it_was():
    """A reproducibility probe (2026-12-07): each pass over a DataLoader drew its base seed from
    torch's global generator, so the evaluations (--eval-every) and the baseline rows (--baselines)
    changed a training whose loss or miner draws random numbers. Now they draw from their own."""
    from daal_triton.train import evaluate as E
    from daal_triton.train.data import build_datasets

    _, test_ds = build_datasets("shapes", None, 32, shapes_train_per_class=1, shapes_test_per_class=2)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4))
    torch.manual_seed(3)
    before = torch.get_rng_state()
    emb = E.embed(net, test_ds, torch.device("cpu"), batch_size=5)
    pixels = E.pixel_vectors(test_ds, batch_size=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert emb.shape == (24, 4) and pixels.shape == (24, 3 * 32 * 32)


def test_nmi_is_left_out_where_its_k_means_would_take_hours(monkeypatch):
    """``--nmi``: "auto" leaves NMI out (NaN, with the reason) where test images x classes x D
    exceeds NMI_AUTO_LIMIT (SOP: 60,502 x 11,316 x 512, a k-means of hours on the CPU, where
    scikit-learn runs it also on a GPU machine); "on" computes it whatever the size, "off" never.
    The other metrics are the same either way."""
    emb, labels = torch.randn(60, 8), torch.arange(60) % 6
    assert E.nmi_skipped(emb, labels, "auto") is None and E.nmi_skipped(emb, labels, "on") is None
    assert "--nmi off" in E.nmi_skipped(emb, labels, "off")
    monkeypatch.setattr(E, "NMI_AUTO_LIMIT", 60 * 6 * 8 - 1)
    why = E.nmi_skipped(emb, labels, "auto")
    assert why.startswith("NMI left out: k-means with 6 clusters of 60 points of dimension 8 (2.9e+03 > ")
    assert "--nmi on computes it" in why and E.nmi_skipped(emb, labels, "on") is None
    full = E.all_metrics(emb, labels, nmi_mode="on")
    for mode in ("auto", "off"):
        left = E.all_metrics(emb, labels, nmi_mode=mode)
        assert np.isnan(left.pop("nmi")) and left == {k: v for k, v in full.items() if k != "nmi"}
    assert 0 <= full["nmi"] <= 1
    monkeypatch.setattr(E, "NMI_AUTO_LIMIT", 60 * 6 * 8)  # at the limit: computed
    assert E.all_metrics(emb, labels, nmi_mode="auto")["nmi"] == full["nmi"]
