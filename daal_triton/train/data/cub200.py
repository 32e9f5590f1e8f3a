"""CUB-200-2011 in its official layout; classes 1-100 train, 101-200 test."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from .base import (DatasetLayoutError, ImageFileDataset, contiguous, image_transforms, locate_root, parse_int,
                   require_files, require_images, require_listed)

LAYOUT = """  <data-root>/CUB_200_2011/        (or <data-root> itself)
      images.txt                   "<image_id> <relative path>" per line
      image_class_labels.txt       "<image_id> <class_id 1..200>" per line
      classes.txt                  (optional) "<class_id> <name>"
      images/<class folder>/<file>.jpg"""


def load_cub200(data_root: str, image_size: int = 224) -> Tuple[ImageFileDataset, ImageFileDataset]:
    """Train on classes 1-100, test on 101-200 (every image of a class goes to its split)."""
    root = locate_root(data_root, "cub200", "CUB_200_2011", "images.txt", LAYOUT)
    require_files(root, ["images.txt", "image_class_labels.txt", "images"], "cub200", LAYOUT)
    paths = _unique(_read_pairs(os.path.join(root, "images.txt")), "images.txt")
    labels_path = os.path.join(root, "image_class_labels.txt")
    labels = {k: parse_int(v, labels_path, i, "cub200") for k, (v, i) in
              _unique(_read_pairs(labels_path), "image_class_labels.txt", lines=True).items()}
    bad = sorted({i for i in labels.values() if not 1 <= i <= 200})
    if bad:
        raise DatasetLayoutError(f"cub200: image_class_labels.txt holds class ids outside 1..200 ({bad[:3]}): "
                                 "is this CUB-200-2011's file?")
    names = {}
    classes_path = os.path.join(root, "classes.txt")
    if os.path.exists(classes_path):
        names = {parse_int(k, classes_path, i, "cub200"): v for k, v, i in _read_pairs(classes_path)}
    split: Dict[str, List[Tuple[str, int]]] = {"train": [], "test": []}
    for image_id in sorted(paths, key=lambda s: (len(s), s)):
        if image_id not in labels:
            raise DatasetLayoutError(f"cub200: image {image_id} has no line in image_class_labels.txt")
        c = labels[image_id]
        split["train" if c <= 100 else "test"].append((os.path.join(root, "images", paths[image_id]), c))
    require_listed([p for part in split.values() for p, _ in part], "cub200", "images.txt")
    out = []
    for part in ("train", "test"):
        y, ids = contiguous([c for _, c in split[part]])
        out.append(ImageFileDataset([p for p, _ in split[part]], y, [names.get(i, str(i)) for i in ids],
                                    image_transforms(image_size, part == "train"), listed=True))
    require_images("cub200", out[0], out[1], "classes 1-100 train, 101-200 test")
    return out[0], out[1]


def _unique(pairs, name: str, lines: bool = False) -> dict:
    """``{id: rest}`` (``lines``: ``{id: (rest, line)}``) of ``pairs``; an id listed twice is a
    :class:`DatasetLayoutError` (a later line would silently replace the first)."""
    out = {}
    for key, rest, i in pairs:
        if key in out:
            raise DatasetLayoutError(f"cub200: {name}, line {i}: image id {key} is listed twice")
        out[key] = (rest, i) if lines else rest
    return out


def _read_pairs(path: str):
    """``(first, rest, line number)`` of every line of ``path`` with two fields."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first id
            for i, line in enumerate(f, 1):
                parts = line.strip().split(maxsplit=1)
                if len(parts) == 2:
                    yield parts[0], parts[1], i
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetLayoutError(f"cub200: cannot read {path} as UTF-8 text ({e})") from None
