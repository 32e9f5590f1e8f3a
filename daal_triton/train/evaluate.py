"""Retrieval evaluation on the held-out classes: Recall@K, NMI, MAP@R, R-precision, and the
sub-cluster metric; plus the two reference points every run is compared with (raw pixels and the
untrained network).

Neighbours come from :func:`daal_triton.knn` (self excluded by index), in chunks of query rows, so a
large test set never holds an N x N matrix; with the fused kernel (CUDA) each chunk streams too.
The definitions follow pytorch-metric-learning's ``AccuracyCalculator`` (a test checks the numbers
against it): Recall@K = 1 if any of the K nearest other images shares the query's class; with
``R`` = number of other images of the query's class, R-precision = (same-class among the R nearest) / R
and MAP@R = (1/R) sum_{i<=R} P@i * rel(i); every metric is averaged over the queries with R > 0
(a query whose class has no other image can retrieve nothing right: AccuracyCalculator's
"lone query" rule), NaN when there is none.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

import daal_triton

from .devices import resolve_backend

RECALL_KS = (1, 2, 4, 8)


#: The most elements (2**26) of a chunk's largest block: chunk x N distances, or the reference's
#: chunk x (k + 1) x D direct differences (k is the largest class's size for MAP@R: 2,048 queries
#: of a 1,000-image class at D = 512 asked for 4.2 GB, and up to three such blocks coexist).
CHUNK_ELEMENTS = 2 ** 26


def neighbours(emb: torch.Tensor, k: int, *, backend: str = "auto", chunk: int = 2048) -> torch.Tensor:
    """Indices (N x k, int64) of the ``k`` nearest other rows of ``emb`` (self excluded by index,
    ties to the smaller index; -1 where fewer than ``k`` other rows exist). Ties are float32's:
    distances equal in exact arithmetic may differ in their last bit and be ordered either way
    (:func:`daal_triton.knn`), which can move a metric at such a tie with ``k`` or the backend.
    At most ``chunk`` queries at a time, fewer where a chunk's block would exceed
    :data:`CHUNK_ELEMENTS`."""
    n = emb.shape[0]
    k = max(1, min(k, n - 1)) if n > 1 else 1
    backend = resolve_backend(backend, emb.device)
    chunk = max(1, min(chunk, CHUNK_ELEMENTS // max(1, n, (k + 1) * emb.shape[1])))
    out = []
    for start in range(0, n, chunk):
        q = emb[start:start + chunk]
        _, idx = daal_triton.knn(q, emb, min(k + 1, n), backend=backend)
        rows = torch.arange(start, start + q.shape[0], device=idx.device)[:, None]
        is_self = idx == rows
        # Drop self where it was found, otherwise the last (k+1-th) neighbour.
        no_self = ~is_self.any(1)
        is_self[no_self, -1] = True
        kept = idx[~is_self].view(q.shape[0], -1)
        if kept.shape[1] < k:
            kept = torch.cat([kept, kept.new_full((q.shape[0], k - kept.shape[1]), -1)], 1)
        out.append(kept[:, :k])
    return torch.cat(out, 0)


def retrieval_metrics(emb: torch.Tensor, labels: torch.Tensor, *, ks: Sequence[int] = RECALL_KS,
                      normalize: bool = True, backend: str = "auto") -> Dict[str, float]:
    """``recall@K`` for each K, ``map@r`` and ``r_precision`` of ``emb`` (N x D) with ``labels`` (N)."""
    emb = emb.float()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    labels = labels.to(emb.device).long()
    # any label values (negative, sparse: bincount refused the first and allocated the largest + 1)
    _, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    r = counts[cls] - 1  # other images of the query's class
    k = int(max(max(ks), int(r.max()) if len(r) else 1))
    idx = neighbours(emb, k, backend=backend)
    found = idx >= 0
    same = (labels[idx.clamp_min(0)] == labels[:, None]) & found
    has = r > 0  # lone queries (no other image of their class) count in no metric

    def over_queries(per_query: torch.Tensor) -> float:
        return per_query[has].double().mean().item() if bool(has.any()) else float("nan")

    out: Dict[str, float] = {f"recall@{kk}": over_queries(same[:, :kk].any(1)) for kk in ks}
    cols = torch.arange(1, idx.shape[1] + 1, device=idx.device)[None, :]
    rel = same & (cols <= r[:, None])
    prec_at_i = rel.cumsum(1).double() / cols
    out["map@r"] = over_queries((prec_at_i * rel).sum(1) / r.clamp_min(1))
    out["r_precision"] = over_queries(rel.sum(1).double() / r.clamp_min(1))
    return out


def kmeans_labels(x: np.ndarray, n_clusters: int, *, seed: int = 0, n_init: int = 5) -> np.ndarray:
    """k-means (scikit-learn, ``n_init`` restarts) cluster index of each row of ``x``."""
    from sklearn.cluster import KMeans

    from sklearn.exceptions import ConvergenceWarning

    n_clusters = max(1, min(n_clusters, len(x)))
    with warnings.catch_warnings():  # collapsed embeddings (fewer distinct points than clusters): the
        warnings.simplefilter("ignore", ConvergenceWarning)  # NMI says so, a warning per call does not
        return KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(x)


#: ``--nmi auto`` leaves NMI out above this many test images x classes x D: k-means costs about that
#: times its iterations and restarts (1,000 clusters of 8,000 128-d points, 1e9, took 73 s on this
#: project's 2-core machine; SOP's 60,502 images of 11,316 classes at D = 512, 3.5e14, would take
#: months there by that rate, days on a large machine), and
#: scikit-learn runs it on the CPU also on a GPU machine.
NMI_AUTO_LIMIT = 10 ** 10


def nmi_skipped(emb: torch.Tensor, labels: torch.Tensor, mode: str = "auto") -> Optional[str]:
    """Why ``mode`` (``--nmi``: auto, on, off) leaves NMI out for these embeddings (None: it is computed)."""
    if mode == "off":
        return "NMI left out (--nmi off)"
    classes = len(torch.unique(labels)) if labels.numel() else 0
    size = emb.shape[0] * classes * emb.shape[1]
    if mode == "auto" and size > NMI_AUTO_LIMIT:
        return (f"NMI left out: k-means with {classes:,} clusters of {emb.shape[0]:,} points of dimension "
                f"{emb.shape[1]} ({size:.1e} > {NMI_AUTO_LIMIT:.0e} images x classes x D) would take hours to "
                f"days on a CPU, where scikit-learn runs it; --nmi on computes it")
    return None


def nmi(emb: torch.Tensor, labels: torch.Tensor, *, normalize: bool = True, seed: int = 0) -> float:
    """NMI between the true classes and k-means with as many clusters as classes."""
    from sklearn.metrics import normalized_mutual_info_score

    x = _np(emb, normalize)
    y = labels.cpu().numpy()
    return float(normalized_mutual_info_score(y, kmeans_labels(x, len(np.unique(y)), seed=seed)))


def subcluster_nmi(emb: torch.Tensor, labels: torch.Tensor, modes: Iterable[int], *,
                   normalize: bool = True, seed: int = 0) -> float:
    """Within each class, k-means with the class's number of modes against the true modes (NMI),
    averaged over classes with at least two modes: 1 when every class's sub-clusters survive
    exactly, about 0 when the embedding ignores them."""
    from sklearn.metrics import normalized_mutual_info_score

    x = _np(emb, normalize)
    y = labels.cpu().numpy()
    m = np.asarray(list(modes) if not isinstance(modes, np.ndarray) else modes)
    scores = []
    for c in np.unique(y):
        sel = y == c
        n_modes = len(np.unique(m[sel]))
        if n_modes < 2 or sel.sum() <= n_modes:
            continue
        scores.append(normalized_mutual_info_score(m[sel], kmeans_labels(x[sel], n_modes, seed=seed)))
    return float(np.mean(scores)) if scores else float("nan")


def all_metrics(emb: torch.Tensor, labels: torch.Tensor, modes: Optional[np.ndarray] = None, *,
                normalize: bool = True, backend: str = "auto", seed: int = 0, nmi_mode: str = "on") -> Dict[str, float]:
    """Every retrieval and clustering metric of one set of embeddings (:class:`daal_triton.NonFiniteError`
    when a row holds NaN/inf: neither retrieval nor k-means means anything then); ``nmi_mode``: ``--nmi``
    (NaN where :func:`nmi_skipped` leaves it out)."""
    bad = int((~torch.isfinite(emb).all(dim=1)).sum()) if emb.numel() else 0
    if bad:
        raise daal_triton.NonFiniteError(f"the embeddings of {bad} of {emb.shape[0]} test images contain NaN or inf")
    out = retrieval_metrics(emb, labels, normalize=normalize, backend=backend)
    out["nmi"] = math.nan if nmi_skipped(emb, labels, nmi_mode) else nmi(emb, labels, normalize=normalize, seed=seed)
    if modes is not None:
        out["subcluster_nmi"] = subcluster_nmi(emb, labels, modes, normalize=normalize, seed=seed)
    return out


def _np(emb: torch.Tensor, normalize: bool) -> np.ndarray:
    emb = emb.detach().float().cpu()
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    return emb.numpy().astype(np.float64)


@torch.no_grad()
def embed(model: torch.nn.Module, dataset, device: torch.device, *, batch_size: int = 128,
          amp_dtype: Optional[torch.dtype] = None, features: bool = False, num_workers: Optional[int] = 0,
          progress: bool = False) -> torch.Tensor:
    """Embeddings (N x D, float32, on CPU) of every image of ``dataset`` in order, in eval mode.
    ``features=True`` returns the pooled trunk features instead of the head's output.

    ``amp_dtype``: the forward's autocast dtype (a run's ``--amp``: bf16 on CUDA by default,
    float32 on the CPU). Images go in the layout of the network's weights (channels_last on CUDA,
    :func:`~daal_triton.train.devices.place_model`); ``num_workers`` None: the run's loader
    defaults (:func:`~daal_triton.train.devices.loader_options`). The embeddings stay on the device
    until the last batch: one copy to the host, no wait per batch."""
    from torch.utils.data import DataLoader

    from .devices import input_memory_format, loader_options

    was_training = model.training
    model.eval()
    fmt = input_memory_format(model)
    # a generator of its own: each pass over a DataLoader draws its workers' base seed from it, and
    # from torch's global one without it; training (a loss or miner that draws) then depended on
    # --eval-every and --baselines (a reproducibility probe, 2026-12-07)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                        **loader_options(num_workers, device, persistent=False))
    out = []
    for images, _ in _bar(loader, "embed", progress):
        images = images.to(device, non_blocking=True)
        if fmt is torch.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            e = model.features(images) if features else model(images)  # type: ignore[operator]  # Module attribute
        out.append(e.float())
    model.train(was_training)
    return torch.cat(out, 0).cpu() if out else torch.zeros(0, getattr(model, "embedding_dim", 0))


def _bar(loader, desc: str, progress: bool):
    """``loader``, behind a tqdm bar named ``desc`` when ``progress`` (the bar of every pass over a test set)."""
    if not progress:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=desc, leave=False, dynamic_ncols=True)


def pixel_vectors(dataset, *, batch_size: int = 256, max_side: int = 32, progress: bool = False) -> torch.Tensor:
    """Every test image as the test pipeline gives it (resized, normalised), flattened: the
    raw-pixel baseline's "embedding". Images larger than ``max_side`` are first average-pooled
    to at most ``max_side`` x ``max_side`` (a 224 x 224 photo set would otherwise need 150k
    floats per image); ``shapes`` at 32 x 32 is used as is."""
    from torch.utils.data import DataLoader

    out = []
    for images, _ in _bar(DataLoader(dataset, batch_size=batch_size, generator=torch.Generator()), "raw pixels",
                          progress):  # the global generator untouched, as in embed
        if max(images.shape[-2:]) > max_side:
            images = torch.nn.functional.adaptive_avg_pool2d(images, max_side)
        out.append(images.flatten(1).float())
    return torch.cat(out, 0)


def dataset_labels(dataset) -> torch.Tensor:
    return torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)


def test_split_notes(dataset) -> List[str]:
    """Lines for the log when the test split cannot measure retrieval as it should: one class
    (every neighbour is of it: Recall@K, MAP@R and NMI are 1 whatever the embedding), or classes
    with a single image (their queries have nothing to retrieve and count in no metric; with only
    such classes the retrieval metrics are NaN, no epoch is the best, and NMI is 1 unless images
    share an embedding)."""
    counts = np.unique(np.asarray(dataset.labels), return_counts=True)[1]
    notes = []
    if len(counts) == 1:
        notes.append("the test split has one class: every neighbour is of that class, so Recall@K, MAP@R and NMI "
                     "are 1 whatever the network (deep metric learning tests on several held-out classes)")
    lone = int((counts == 1).sum())
    if lone == len(counts):
        notes.append("every test class has a single image: no query has another image of its class to retrieve, "
                     "so the retrieval metrics are NaN (and no checkpoint_best.pt is written), and NMI is 1 for any "
                     "network that tells the images apart (k-means with a cluster per class puts each image in one "
                     "of its own)")
    elif lone:
        notes.append(f"{lone} of the {len(counts)} test classes {'has' if lone == 1 else 'have'} a single image: "
                     f"their queries have nothing to retrieve and count in no retrieval metric (Recall@K, MAP@R, "
                     f"R-precision)")
    return notes


def table_keys(rows: Dict[str, Dict[str, float]]) -> List[str]:
    """The metric columns of the final table, in a fixed order, that some row has."""
    keys = [f"recall@{k}" for k in RECALL_KS] + ["nmi", "map@r", "r_precision", "subcluster_nmi"]
    return [k for k in keys if any(k in r for r in rows.values())]


def format_table(rows: Dict[str, Dict[str, float]], keys: Optional[Sequence[str]] = None) -> str:
    """A plain-text table: one row per method, one column per metric."""
    if keys is None:
        keys = []
        for m in rows.values():
            keys += [k for k in m if k not in keys and isinstance(m[k], (int, float))]
    width = max([len(r) for r in rows] + [8])
    head = f"{'':<{width}}  " + "  ".join(f"{k:>14}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            cells.append(f"{v:>14.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'-':>14}")
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def dataset_paths(dataset, name: str = "data") -> List[str]:
    """Where each image of ``dataset`` comes from: its file for data sets read from files, else
    ``<name>:test:<index>`` (the generated and in-memory sets, e.g. ``shapes:test:17``)."""
    paths = getattr(dataset, "paths", None)
    if paths is not None:
        return [str(p) for p in paths]
    return [f"{name}:test:{i}" for i in range(len(dataset))]


def save_embeddings(path: str, emb: torch.Tensor, labels: torch.Tensor, paths: Sequence[str], **meta) -> None:
    """``daal-eval --save-embeddings``: ``embeddings`` (N x D float32, as the network outputs them,
    not normalised), ``labels`` (N int64), ``paths`` (N strings) and ``meta`` (plain values: the
    checkpoint, the data set, ``class_names``, ...). A ``.npz`` name writes numpy arrays (``paths``
    and lists as string arrays); any other name a torch file of plain data, so
    ``torch.load(path, weights_only=True)`` opens it. Written to ``path.tmp``, then renamed."""
    import os

    from .files import write_atomically

    emb = emb.detach().float().cpu().contiguous()
    labels = labels.detach().long().cpu().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as --out is
    if path.endswith(".npz"):
        arrays = {k: np.asarray(v, dtype=str) if isinstance(v, (list, tuple)) else np.asarray("" if v is None else v)
                  for k, v in meta.items()}

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, embeddings=emb.numpy(), labels=labels.numpy(), paths=np.asarray(list(paths), dtype=str),
                         **arrays)
    else:
        def write(tmp):
            torch.save(dict(embeddings=emb, labels=labels, paths=list(paths), **meta), tmp)
    write_atomically(path, write)
