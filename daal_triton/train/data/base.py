"""Dataset containers and transforms shared by every loader.

Every loader returns a pair of :class:`MetricDataset` (train, test) whose ``labels`` are
contiguous from 0 within each split, as deep metric learning trains and tests on disjoint classes.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

# ImageNet statistics: the trunk's pretrained weights (when given) expect them.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """The files of a dataset are missing, damaged or not laid out as expected (the message says how)."""


def parse_int(text: str, path: str, line: int, dataset: str) -> int:
    """``int(text)``, read from line ``line`` of ``path``, or a :class:`DatasetLayoutError` naming both."""
    try:
        return int(text)
    except ValueError:
        raise DatasetLayoutError(f"{dataset}: {path}, line {line}: expected an integer, got {text!r}") from None


def contiguous(labels: Sequence[int]) -> tuple:
    """Map arbitrary class ids to ``0..C-1`` in sorted order: ``(new_labels, sorted_ids)``."""
    arr = np.asarray(labels, dtype=np.int64)
    ids, inv = np.unique(arr, return_inverse=True)
    return inv.astype(np.int64), ids.tolist()


class MetricDataset(Dataset):
    """Base: ``labels`` (N, contiguous from 0), ``class_names``, optional ``modes`` (N, the
    sub-cluster each image was drawn from, for datasets that record it), a ``transform`` and
    ``notes`` (lines for the log: what the loader left out)."""

    labels: np.ndarray
    class_names: List[str]
    modes: Optional[np.ndarray] = None
    mode_names: Optional[List[str]] = None
    notes: Sequence[str] = ()  # what the loader left out, for the run's log

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)


class SeededDraws(Dataset):
    """``dataset`` read with ``(index, seed)`` pairs (a :class:`PKSampler` with ``seeded=True``):
    ``dataset[index]`` with torch's CPU generator seeded by ``seed`` for that one call and restored
    after it. The random augmentations (torchvision's, drawn from that generator) then depend on the
    draw alone, not on which loader worker, how many of them, or which rank made it; and the main
    process's generator (the network's, the checkpoints') is never advanced by the data."""

    def __init__(self, dataset: MetricDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU one only (torch.manual_seed reseeds CUDA's too)
            return self.dataset[index]


#: Class indices or modes, one per image: a list or a NumPy array.
Labels = Union[Sequence[int], np.ndarray]


class ArrayDataset(MetricDataset):
    """In-memory uint8 images (N x H x W x 3) with a tensor transform."""

    def __init__(self, images: np.ndarray, labels: Labels, class_names: List[str],
                 transform: Optional[Callable] = None, modes: Optional[np.ndarray] = None,
                 mode_names: Optional[List[str]] = None) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.transform = transform
        self.modes = None if modes is None else np.asarray(modes, dtype=np.int64)
        self.mode_names = mode_names

    def __getitem__(self, index: int):
        img = self.images[index].float().div_(255.0)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


class ImageFileDataset(MetricDataset):
    """Images on disk (any format PIL reads), loaded as RGB and passed through ``transform``.

    ``listed``: the paths come from the data set's index files (CUB, Cars, SOP), so a damaged
    image has to be restored, not removed. Images are turned upright by their EXIF orientation;
    16-bit images are scaled to 8 bits, 32-bit integer and float ones by their own range."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: List[str],
                 transform: Optional[Callable] = None, *, listed: bool = False) -> None:
        self.notes: List[str] = []
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self.transform = transform
        self.listed = listed

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as im:
                img = to_rgb(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL: UnidentifiedImageError (an OSError), truncation, an image over its pixel limit, ...
            advice = "restore the file (the data set's index lists it)" if self.listed else "replace or remove the file"
            raise DatasetLayoutError(f"cannot read the image {self.paths[index]} ({type(e).__name__}: "
                                     f"{str(e).strip() or 'no detail'}): {advice}") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def to_rgb(im):
    """An RGB PIL image of ``im``: upright by its EXIF orientation; 16-bit modes scaled by 1/257 and
    32-bit integer or float ones by their range (``convert`` would clip them to 0/255)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        else:  # by the range of its finite pixels (one NaN or inf pixel made the whole image black)
            finite = np.isfinite(a)
            lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 0.0)
            a = np.where(finite, (a - lo) * (255.0 / (hi - lo)) if hi > lo else 0.0, 0.0)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def require_listed(paths: Sequence[str], dataset: str, index: str) -> None:
    """:class:`DatasetLayoutError` when images that ``index`` (the data set's list file) names are
    not on disk, or are empty files: found when the data is loaded, before any training (a stat per
    image)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DatasetLayoutError(f"{dataset}: {len(missing)} of the {len(paths)} images {index} lists are missing "
                                 f"({shown}): restore them (is --data-root the complete data set?)")
    empty = [p for p in paths if os.path.getsize(p) == 0]
    if empty:
        shown = ", ".join(empty[:3]) + (", ..." if len(empty) > 3 else "")
        raise DatasetLayoutError(f"{dataset}: {len(empty)} of the {len(paths)} images {index} lists are empty "
                                 f"files ({shown}): restore them (an interrupted copy or download?)")


def require_images(dataset: str, train, test, what: str) -> None:
    """:class:`DatasetLayoutError` when a split holds no image (``what``: which classes it takes)."""
    for part, ds in (("training", train), ("test", test)):
        if len(ds) == 0:
            raise DatasetLayoutError(f"{dataset}: no {part} images ({what}): is --data-root the complete data set?")


def require_files(root: str, names: Sequence[str], dataset: str, layout: str) -> None:
    """Raise :class:`DatasetLayoutError` naming the expected layout if any of ``names`` is missing."""
    missing = [n for n in names if not os.path.exists(os.path.join(root, n))]
    if missing:
        raise DatasetLayoutError(
            f"{dataset}: missing {', '.join(missing)} under {os.path.abspath(root)!r}.\n"
            f"Expected layout:\n{layout}\n(pass the folder with --data-root; nothing is downloaded)")


def find_root(data_root: str, candidates: Sequence[str], marker: str) -> Optional[str]:
    """The first of ``data_root`` and ``data_root/<candidate>`` that holds ``marker``."""
    for sub in ("",) + tuple(candidates):
        path = os.path.join(data_root, sub) if sub else data_root
        if os.path.exists(os.path.join(path, marker)):
            return path
    return None


def locate_root(data_root: str, dataset: str, folder: str, marker: str, layout: str) -> str:
    """:func:`find_root` over ``data_root`` and ``data_root/<folder>``, or a
    :class:`DatasetLayoutError` that names ``marker`` and shows the expected ``layout``."""
    root = find_root(data_root, (folder,), marker)
    if root is None:
        raise DatasetLayoutError(f"{dataset}: no {marker} under {os.path.abspath(data_root)!r} or its "
                                 f"{folder}/ folder.\nExpected layout:\n{layout}\n"
                                 "(pass the folder with --data-root; nothing is downloaded)")
    return root


#: The test transform first cuts an image's long side (centred) to at most this many times its
#: short side, then resizes the short side to 8/7 of the size and crops the centre.
MAX_ASPECT = 16


class LimitAspect:
    """A PIL image's long side cut, centred, to at most ``ratio`` times its short side (a
    transform: picklable for the loader's workers)."""

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio

    def __call__(self, img):
        w, h = img.size
        if max(w, h) <= self.ratio * min(w, h):
            return img
        if w > h:
            keep = self.ratio * h
            return img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
        keep = self.ratio * w
        return img.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))


def image_transforms(image_size: int, train: bool, *, normalize: bool = True):
    """Usual augmentations for real photos: random resized crop + horizontal flip for training,
    resize (to 8/7 of the size) + centre crop for testing; then ImageNet normalisation."""
    from torchvision import transforms as T

    norm = [T.ToTensor()] + ([T.Normalize(MEAN, STD)] if normalize else [])
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                          T.RandomHorizontalFlip()] + norm)
    # the long side cut (centred) to at most MAX_ASPECT times the short one first: a 100000 x 1
    # image (177 bytes as a PNG) resized to 256 on its short side took 21 GB
    return T.Compose([LimitAspect(MAX_ASPECT), T.Resize(int(round(image_size * 8 / 7))),
                      T.CenterCrop(image_size)] + norm)


def tensor_transforms(image_size: int, train: bool, *, augment: str = "none", normalize: bool = True):
    """Transforms for in-memory tensors (3 x H x W in [0, 1]): resize to ``image_size``, then for
    training ``augment`` = ``"none"``, ``"shift"`` (reflect-pad by 1/8 and random-crop back) or
    ``"crop"`` (random resized crop + flip, as for photos); then ImageNet normalisation."""
    from torchvision import transforms as T

    steps: List[Callable] = [T.Resize(image_size, antialias=True)]
    if train and augment == "shift":
        pad = max(1, image_size // 8)
        steps += [T.Pad(pad, padding_mode="reflect"), T.RandomCrop(image_size)]
    elif train and augment == "crop":
        steps += [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True), T.RandomHorizontalFlip()]
    elif augment not in ("none", "shift", "crop"):
        raise ValueError(f"augment must be 'none', 'shift' or 'crop', got {augment!r}")
    if normalize:
        steps.append(T.Normalize(MEAN, STD))
    return T.Compose(steps)
