"""``shapes``: a procedurally generated, seeded, multi-modal image set for deep metric learning.

Nothing is downloaded: every image is drawn from a seed. The set is made so that a metric
learner has something real to learn and something real to keep:

* **Classes** are a silhouette x an inner pattern (6 shapes x 4 patterns = 24 classes). The
  class order is chosen so that the first 12 (the training classes of the usual "first half /
  second half" split) hold every shape twice and every pattern three times, and the held-out
  12 are the *other* combinations: a test class is a new pairing of parts seen in training
  (as a new bird species combines a known beak with a known wing pattern).
* **Modes** are four colour palettes (background, shape and pattern colours) that every class
  shares, like cars of one model painted in different colours. The mode of every image is
  recorded (``dataset.modes``), so a sub-cluster metric can check whether the learned space
  keeps them apart inside each class.
* **Nuisances** dominate the pixels: random position, scale and rotation of the shape (the
  pattern turns with it), a random background gradient, per-image colour jitter, a few
  distractor strokes and pixel noise. Nearest neighbours in pixel space therefore mostly find
  images of the same palette and a similar placement, not of the same class.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "crescent")
PATTERNS: Tuple[str, ...] = ("solid", "stripes", "checker", "dots")
# (background, shape, pattern) colours in [0, 1] RGB; each palette is one mode of every class.
PALETTES: Tuple[Tuple[Tuple[float, float, float], ...], ...] = (
    ((0.10, 0.12, 0.35), (0.95, 0.85, 0.20), (0.85, 0.15, 0.10)),  # navy / yellow / red
    ((0.80, 0.80, 0.78), (0.10, 0.10, 0.10), (0.95, 0.95, 0.95)),  # grey / black / white
    ((0.15, 0.45, 0.15), (0.85, 0.25, 0.75), (0.30, 0.90, 0.90)),  # green / magenta / cyan
    ((0.60, 0.35, 0.10), (0.98, 0.98, 0.90), (0.15, 0.25, 0.85)),  # brown / cream / blue
)
PALETTE_NAMES: Tuple[str, ...] = ("navy", "grey", "green", "brown")


def class_table() -> List[Tuple[int, int]]:
    """The 24 classes as ``(shape, pattern)`` index pairs, in class-index order.

    Classes 0-11 are the pairs with ``(shape + pattern)`` even, 12-23 those with it odd: each
    half holds every shape twice and every pattern three times, and no pair is in both.
    """
    pairs = [(s, p) for s in range(len(SHAPES)) for p in range(len(PATTERNS))]
    return [sp for sp in pairs if (sp[0] + sp[1]) % 2 == 0] + [sp for sp in pairs if (sp[0] + sp[1]) % 2 == 1]


def class_names() -> List[str]:
    return [f"{SHAPES[s]}-{PATTERNS[p]}" for s, p in class_table()]


def _silhouette(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-mask of a shape in its local frame (``u``, ``v`` roughly in [-1, 1])."""
    r = np.sqrt(u * u + v * v)
    th = np.arctan2(v, u)
    name = SHAPES[shape]
    if name == "circle":
        return r <= 0.85
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.68
    if name == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * math.pi * k / 3 + math.pi / 2
            inside &= (u * math.cos(a) + v * math.sin(a)) <= 0.5
        return inside & (r <= 1.0)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.9)) | ((av <= 0.3) & (au <= 0.9))
    if name == "star":
        return r <= 0.62 + 0.33 * np.cos(5 * th)
    if name == "crescent":
        return (r <= 0.88) & (np.sqrt((u - 0.45) ** 2 + v * v) >= 0.62)
    raise ValueError(shape)


def _pattern(pattern: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the pattern colour replaces the shape colour, in the shape's local frame."""
    name = PATTERNS[pattern]
    if name == "solid":
        return np.zeros_like(u, dtype=bool)
    if name == "stripes":
        return np.mod(u / 0.5, 1.0) < 0.5
    if name == "checker":
        return (np.floor(u / 0.45) + np.floor(v / 0.45)) % 2 == 0
    if name == "dots":
        cu = np.mod(u, 0.55) - 0.275
        cv = np.mod(v, 0.55) - 0.275
        return cu * cu + cv * cv <= 0.13 ** 2
    raise ValueError(pattern)


def render(shape: int, pattern: int, palette: int, size: int, rng: np.random.Generator,
           *, nuisance: float = 1.0, supersample: int = 2) -> np.ndarray:
    """One ``size`` x ``size`` x 3 uint8 image of ``(shape, pattern)`` in ``palette``.

    ``nuisance`` scales every nuisance factor (0: centred, upright, clean; 1: the default set).
    """
    n = size * supersample
    coords = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # [-1, 1]
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    scale = 0.62 - 0.22 * nuisance * rng.random()  # half-size of the shape, in image units
    cx, cy = (rng.random(2) * 2 - 1) * (0.95 - scale) * nuisance
    ang = rng.random() * 2 * math.pi * nuisance
    ca, sa = math.cos(ang), math.sin(ang)
    dx, dy = (xx - cx) / scale, (yy - cy) / scale
    u = ca * dx + sa * dy
    v = -sa * dx + ca * dy
    inside = _silhouette(shape, u, v)
    pat = _pattern(pattern, u, v) & inside

    bg, fg, pc = (np.asarray(c, dtype=np.float64) for c in PALETTES[palette])
    jit = 0.08 * nuisance
    bg = np.clip(bg + rng.uniform(-jit, jit, 3), 0, 1)
    fg = np.clip(fg + rng.uniform(-jit, jit, 3), 0, 1)
    pc = np.clip(pc + rng.uniform(-jit, jit, 3), 0, 1)
    # Background: a random linear gradient around the palette's colour.
    g = rng.normal(size=2)
    g = g / max(float(np.linalg.norm(g)), 1e-9)
    grad = (xx * g[0] + yy * g[1])[..., None] * (0.25 * nuisance) * rng.uniform(-1, 1, 3)
    img = np.clip(bg + grad, 0, 1)
    # Distractor strokes in random colours, under the shape.
    for _ in range(int(rng.integers(0, 3)) if nuisance > 0 else 0):
        p0 = rng.uniform(-1, 1, 2)
        d = rng.normal(size=2)
        d = d / max(float(np.linalg.norm(d)), 1e-9)
        dist = np.abs((xx - p0[0]) * d[1] - (yy - p0[1]) * d[0])
        img = np.where((dist < 0.05)[..., None], rng.random(3), img)
    img = np.where(inside[..., None], fg, img)
    img = np.where(pat[..., None], pc, img)
    if supersample > 1:
        img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    img = img + rng.normal(scale=0.06 * nuisance, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def generate(classes: Sequence[int], per_class: int, size: int, seed: int,
             *, nuisance: float = 1.0, progress: bool = False,
             desc: str = "shapes") -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N x size x size x 3 uint8), class indices (global, into :func:`class_table`) and
    modes (palette index) for ``per_class`` images of each class, palettes balanced within a class.
    ``progress``: a tqdm bar named ``desc``, shown once the drawing has taken a second (a large
    ``--image-size``: about 27 ms an image at 224 px, 0.8 ms at 32 px, on this project's CPU).

    Image ``i`` of class ``c`` is drawn from its own seed ``(seed, c, i)``: a class's images do not
    depend on which other classes are generated.
    """
    table = class_table()
    n_pal = len(PALETTES)
    # allocated up front: a count beyond any memory (--shapes-train-per-class 10**30) fails here, at
    # once, instead of drawing for ever; and no list of images is stacked (twice the memory)
    images = np.empty((len(classes) * per_class, size, size, 3), np.uint8)
    labels: List[int] = []
    modes: List[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(classes) * per_class, desc=desc, unit="image", leave=False, dynamic_ncols=True, delay=1.0)
    for c in classes:
        s, p = table[c]
        for i in range(per_class):
            rng = np.random.default_rng([seed, c, i])
            mode = i % n_pal
            images[len(labels)] = render(s, p, mode, size, rng, nuisance=nuisance)
            labels.append(c)
            modes.append(mode)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return images, np.asarray(labels, dtype=np.int64), np.asarray(modes, dtype=np.int64)
