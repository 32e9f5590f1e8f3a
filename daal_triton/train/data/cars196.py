"""Stanford Cars (CARS196); classes 1-98 train, 99-196 test (all images of a class, both official halves).

Two layouts are read: the original ``cars_annos.mat`` + ``car_ims/`` and torchvision's
``stanford_cars/`` (``devkit/cars_train_annos.mat``, ``cars_test_annos_withlabels.mat``,
``cars_train/``, ``cars_test/``, ``devkit/cars_meta.mat``).
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

from .base import (DatasetLayoutError, ImageFileDataset, contiguous, find_root, image_transforms, require_images,
                   require_listed)

LAYOUT = """  either <data-root>/ (or <data-root>/cars196/) with
      cars_annos.mat               the 'annotations' struct: relative_im_path, class (1..196), ...
      car_ims/000001.jpg ...
  or torchvision's layout, <data-root>/stanford_cars/ (or <data-root> itself) with
      devkit/cars_train_annos.mat  'annotations': fname, class
      devkit/cars_meta.mat         (optional) class_names
      cars_test_annos_withlabels.mat
      cars_train/*.jpg  cars_test/*.jpg"""


def _loadmat(path: str):
    try:
        import scipy.io as sio
    except ImportError as e:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError("cars196 needs scipy to read .mat files: pip install scipy") from e
    try:
        return sio.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy: ValueError (not a .mat file), TypeError, OSError, ... on a damaged file
        raise DatasetLayoutError(f"cars196: cannot read {path} as a MATLAB .mat file ({type(e).__name__}: "
                                 f"{str(e).strip() or 'no detail'})") from None


def _annotations(mat, path: str, fields: Tuple[str, ...]) -> List[Tuple]:
    """The ``fields`` of every entry of the ``annotations`` struct of ``mat`` (read from ``path``)."""
    try:
        return [tuple(_field(a, name) for name in fields) for a in np.atleast_1d(mat["annotations"]).ravel()]
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise DatasetLayoutError(f"cars196: {path} holds no 'annotations' struct with the fields "
                                 f"{', '.join(fields)} ({type(e).__name__}: {e})") from None


def _class_names(mat) -> List[str]:
    return [str(n) for n in np.atleast_1d(mat.get("class_names", [])).ravel()]


def _class_id(value, path: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DatasetLayoutError(f"cars196: {path}: a class that is not an integer: {value!r}") from None


def _field(annotation, name):
    return annotation[name].item() if hasattr(annotation[name], "item") else annotation[name]


def load_cars196(data_root: str, image_size: int = 224) -> Tuple[ImageFileDataset, ImageFileDataset]:
    """Train on classes 1-98, test on 99-196."""
    samples: List[Tuple[str, int]] = []
    names: List[str] = []
    root = find_root(data_root, ("cars196", "CARS196", "stanford_cars"), "cars_annos.mat")
    tv_root = find_root(data_root, ("stanford_cars",), os.path.join("devkit", "cars_train_annos.mat"))
    if root is not None:
        path = os.path.join(root, "cars_annos.mat")
        mat = _loadmat(path)
        for rel, c in _annotations(mat, path, ("relative_im_path", "class")):
            samples.append((os.path.join(root, str(rel)), _class_id(c, path)))
        names = _class_names(mat)
    elif tv_root is not None:
        parts = [(os.path.join(tv_root, "devkit", "cars_train_annos.mat"), "cars_train"),
                 (os.path.join(tv_root, "cars_test_annos_withlabels.mat"), "cars_test")]
        for mat_path, folder in parts:
            if not os.path.exists(mat_path):
                raise DatasetLayoutError(f"cars196: missing {mat_path}.\nExpected layout:\n{LAYOUT}")
            for fname, c in _annotations(_loadmat(mat_path), mat_path, ("fname", "class")):
                samples.append((os.path.join(tv_root, folder, str(fname)), _class_id(c, mat_path)))
        meta = os.path.join(tv_root, "devkit", "cars_meta.mat")
        names = _class_names(_loadmat(meta)) if os.path.exists(meta) else []
    else:
        raise DatasetLayoutError(f"cars196: neither cars_annos.mat nor stanford_cars/devkit/cars_train_annos.mat "
                                 f"under {os.path.abspath(data_root)!r}.\nExpected layout:\n{LAYOUT}\n"
                                 "(pass the folder with --data-root; nothing is downloaded)")
    bad = sorted({c for _, c in samples if not 1 <= c <= 196})
    if bad:
        raise DatasetLayoutError(f"cars196: class ids outside 1..196 ({bad[:3]}): is this Stanford Cars' annotation?")
    require_listed([p for p, _ in samples], "cars196", "the annotation .mat")
    out = []
    for part, keep in (("train", lambda c: c <= 98), ("test", lambda c: c > 98)):
        chosen = [(p, c) for p, c in samples if keep(c)]
        y, ids = contiguous([c for _, c in chosen])
        cls = [names[i - 1] if 0 < i <= len(names) else str(i) for i in ids]
        out.append(ImageFileDataset([p for p, _ in chosen], y, cls, image_transforms(image_size, part == "train"),
                                    listed=True))
    require_images("cars196", out[0], out[1], "classes 1-98 train, 99-196 test")
    return out[0], out[1]
