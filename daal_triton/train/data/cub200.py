"""CUB-200-2011 in its official layout; classes 1-100 train, 101-200 test."""
from __future__ import annotations

import os
from typing import Tuple

from .base import DatasetLayoutError, ImageFileDataset, contiguous, image_transforms, locate_root, require_files

LAYOUT = """  <data-root>/CUB_200_2011/        (or <data-root> itself)
      images.txt                   "<image_id> <relative path>" per line
      image_class_labels.txt       "<image_id> <class_id 1..200>" per line
      classes.txt                  (optional) "<class_id> <name>"
      images/<class folder>/<file>.jpg"""


def load_cub200(data_root: str, image_size: int = 224) -> Tuple[ImageFileDataset, ImageFileDataset]:
    """Train on classes 1-100, test on 101-200 (every image of a class goes to its split)."""
    root = locate_root(data_root, "cub200", "CUB_200_2011", "images.txt", LAYOUT)
    require_files(root, ["images.txt", "image_class_labels.txt", "images"], "cub200", LAYOUT)
    paths = dict(_read_pairs(os.path.join(root, "images.txt")))
    labels = {k: int(v) for k, v in _read_pairs(os.path.join(root, "image_class_labels.txt"))}
    names = {}
    if os.path.exists(os.path.join(root, "classes.txt")):
        names = {int(k): v for k, v in _read_pairs(os.path.join(root, "classes.txt"))}
    split = {"train": [], "test": []}
    for image_id in sorted(paths, key=lambda s: (len(s), s)):
        if image_id not in labels:
            raise DatasetLayoutError(f"cub200: image {image_id} has no line in image_class_labels.txt")
        c = labels[image_id]
        split["train" if c <= 100 else "test"].append((os.path.join(root, "images", paths[image_id]), c))
    out = []
    for part in ("train", "test"):
        y, ids = contiguous([c for _, c in split[part]])
        out.append(ImageFileDataset([p for p, _ in split[part]], y, [names.get(i, str(i)) for i in ids],
                                    image_transforms(image_size, part == "train")))
    return out[0], out[1]


def _read_pairs(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.strip().split(maxsplit=1)
            if len(parts) == 2:
                yield parts[0], parts[1]
