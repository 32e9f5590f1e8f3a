"""Figures: a Barnes-Hut t-SNE of the test embeddings coloured by class (and, for data sets that
record modes, a second panel coloured by mode), and the training curves (loss, Recall@1 per epoch)."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .data.base import Labels
from .files import unlink_if_link


def _matplotlib():
    """``matplotlib``, imported whatever MPLBACKEND says: its import refused a bad one, and every
    plot of a finished run was lost with a warning that did not name it (a probe, 2026-12-06). A
    valid one is set as matplotlib's import sets it (an in-process caller's: a notebook's)."""
    if "matplotlib" in sys.modules:
        return sys.modules["matplotlib"]
    before = os.environ.pop("MPLBACKEND", None)
    try:
        import matplotlib
    finally:  # the process's environment as it was (an in-process caller, child processes)
        if before is not None:
            os.environ["MPLBACKEND"] = before
    if before is not None:
        try:
            matplotlib.rcParams["backend"] = before
        except ValueError:  # not a backend: matplotlib's own choice stands (the plots need none)
            pass
    return matplotlib


def figure(nrows: int = 1, ncols: int = 1, *, figsize: Tuple[float, float], squeeze: bool = True):
    """``(fig, axes)`` as ``pyplot.subplots`` makes them, without pyplot: a bare ``Figure``, drawn
    by Agg when saved (:func:`save`). No backend is chosen for the process and no figure is kept
    in pyplot's list: ``matplotlib.use("Agg")`` had changed an in-process caller's backend (a
    notebook lost its inline plots; a probe, 2026-12-07)."""
    _matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def colormap(name: str):
    """Matplotlib's colormap ``name`` (``tab10``, ``tab20``)."""
    return _matplotlib().colormaps[name]


def save(fig, path: str, dpi: int = 110) -> str:
    """Write ``fig`` (:func:`figure`) as a PNG at ``path``: a link there is replaced, not written
    through."""
    unlink_if_link(path)
    fig.savefig(path, dpi=dpi)
    return path


@contextmanager
def ticking(desc: str, progress: bool = True):
    """A tqdm bar (as the program's others) for one long step that reports no progress of its own
    (scikit-learn's t-SNE): it shows ``desc`` and the time elapsed, refreshed every second."""
    if not progress:
        yield
        return
    import threading

    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc=desc, leave=False, dynamic_ncols=True, bar_format="{desc}: {elapsed}")
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def tsne_2d(emb: np.ndarray, *, seed: int = 0, perplexity: float = 30.0, threads: Optional[int] = None) -> np.ndarray:
    """Barnes-Hut t-SNE (scikit-learn) of L2-normalised embeddings, PCA-initialised (randomly for
    two points or one dimension, where PCA has no second component), for any number of points >= 2
    and any width, on at most ``threads`` threads (default: torch's thread count, the
    share of the machine the run was given)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(emb, dtype=np.float32)
    n = len(x)
    if n < 2:
        raise ValueError(f"t-SNE needs at least 2 points, got {n}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    threads = threads or torch.get_num_threads()
    with threadpool_limits(limits=threads):
        components = min(50, n, x.shape[1])
        if x.shape[1] > components:  # the usual PCA pre-reduction keeps Barnes-Hut fast
            from sklearn.decomposition import PCA

            x = PCA(n_components=components, random_state=seed).fit_transform(x)
        # about n / 3 neighbours per point for small sets; scikit-learn needs perplexity < n
        perplexity = float(min(perplexity, max(2.0, (n - 1) / 3), n - 1 if n > 2 else 0.5))
        init = "pca" if n > 2 and x.shape[1] >= 2 else "random"
        return TSNE(n_components=2, method="barnes_hut", perplexity=perplexity, init=init,
                    random_state=seed, n_jobs=threads).fit_transform(x)


def tsne_plot(emb, labels: Labels, path: str, *, modes: Optional[Labels] = None,
              class_names: Optional[List[str]] = None, mode_names: Optional[List[str]] = None,
              max_points: int = 2000, seed: int = 0, title: str = "", progress: bool = False) -> str:
    """Save a t-SNE PNG of ``emb`` coloured by class (left) and by mode (right, when given);
    ``progress``: a bar while the t-SNE runs."""
    emb = emb.detach().float().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
    labels = np.asarray(labels)
    sel = np.arange(len(labels))
    if len(sel) > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(len(sel), max_points, replace=False))
    with ticking(f"t-SNE of {len(sel)} points", progress):
        xy = tsne_2d(emb[sel], seed=seed)
    y = labels[sel]
    panels = [("class", y, class_names)]
    if modes is not None:
        panels.append(("mode", np.asarray(modes)[sel], mode_names))
    fig, axes = figure(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    for ax, (what, c, names) in zip(axes[0], panels):
        n = int(c.max()) + 1 if len(c) else 1
        cmap = colormap("tab20" if n > 10 else "tab10")
        for v in range(n):
            m = c == v
            if m.any():
                lab = names[v] if names is not None and v < len(names) else str(v)
                ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(v % cmap.N), label=lab)
        if n <= 24:
            ax.legend(fontsize=6, markerscale=2, loc="best", ncol=2 if n > 12 else 1)
        ax.set_title(f"coloured by {what}")
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def training_curves(history: List[Dict[str, Any]], path: str) -> str:
    """Save the training loss and held-out Recall@1 per epoch (from metrics.jsonl records)."""
    tr = [r for r in history if r.get("model") == "trained"]
    fig, ax1 = figure(figsize=(6, 4))
    ep = [r["epoch"] for r in tr if "train_loss" in r]
    ax1.plot(ep, [r["train_loss"] for r in tr if "train_loss" in r], "o-", color="tab:blue", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    ev = [r for r in tr if "recall@1" in r]
    base = {r["model"]: r["recall@1"] for r in history if r.get("model") in ("untrained", "raw_pixels")}
    start = [(0, base["untrained"])] if "untrained" in base else []
    pts = start + [(r["epoch"], r["recall@1"]) for r in ev]
    ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color="tab:red", label="test Recall@1")
    if "raw_pixels" in base:
        ax2.axhline(base["raw_pixels"], color="tab:gray", ls="--", label="raw pixels Recall@1")
    ax2.set_ylabel("held-out Recall@1", color="tab:red")
    ax2.set_ylim(0, 1)
    from matplotlib.ticker import MaxNLocator

    epochs = sorted({p[0] for p in pts} | set(ep))
    if len(epochs) <= 12:  # epochs: whole numbers (a run of 1 or 2 had ticks 0.25 or 0.95 apart)
        ax1.set_xticks(epochs)
    else:
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    # above the axes, in one row: inside, it covered the curves or the tick labels
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return save(fig, path)
