"""Any ``root/train/<class>/<image>`` + ``root/test/<class>/<image>`` tree (class names sorted)."""
from __future__ import annotations

import os
from typing import Tuple

from .base import IMAGE_EXTENSIONS, DatasetLayoutError, ImageFileDataset, image_transforms

LAYOUT = """  <data-root>/train/<class name>/<image>.jpg|png|...
  <data-root>/test/<class name>/<image>.jpg|png|...
  (train and test should hold different classes, as deep metric learning tests on unseen ones)"""


def _scan(split_dir: str, image_size: int, train: bool) -> ImageFileDataset:
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    paths, labels = [], []
    for i, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(split_dir, c))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(i)
    if not paths:
        raise DatasetLayoutError(f"folder: no images in class folders under {split_dir!r}.\nExpected layout:\n{LAYOUT}")
    used = sorted(set(labels))
    remap = {c: j for j, c in enumerate(used)}  # drop empty class folders, keep labels contiguous
    return ImageFileDataset(paths, [remap[c] for c in labels], [classes[c] for c in used],
                            image_transforms(image_size, train))


def load_folder(data_root: str, image_size: int = 224) -> Tuple[ImageFileDataset, ImageFileDataset]:
    out = []
    for part in ("train", "test"):
        d = os.path.join(data_root, part)
        if not os.path.isdir(d):
            raise DatasetLayoutError(f"folder: missing {part}/ under {os.path.abspath(data_root)!r}.\n"
                                     f"Expected layout:\n{LAYOUT}")
        out.append(_scan(d, image_size, part == "train"))
    return out[0], out[1]
