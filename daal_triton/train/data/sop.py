"""Stanford Online Products: its own split (``Ebay_train.txt``: 11,318 classes, ``Ebay_test.txt``: 11,316)."""
from __future__ import annotations

import os
from typing import Tuple

from .base import (DatasetLayoutError, ImageFileDataset, contiguous, image_transforms, locate_root, parse_int,
                   require_files, require_images, require_listed)

LAYOUT = """  <data-root>/Stanford_Online_Products/   (or <data-root> itself)
      Ebay_train.txt   header "image_id class_id super_class_id path", then one line per image
      Ebay_test.txt
      <super class>_final/<file>.JPG ...  (the paths named in the lists)"""


def _read_list(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().split()
            if header[:2] != ["image_id", "class_id"]:
                raise DatasetLayoutError(f"sop: {path} should start with the header "
                                         f"'image_id class_id super_class_id path', got {' '.join(header)!r}")
            for i, line in enumerate(f, 2):
                parts = line.split()
                if len(parts) >= 4:
                    yield parse_int(parts[1], path, i, "sop"), parts[3]
    except DatasetLayoutError:  # a FileNotFoundError too: ours, already worded (header, class id)
        raise
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetLayoutError(f"sop: cannot read {path} as UTF-8 text ({e})") from None


def load_sop(data_root: str, image_size: int = 224) -> Tuple[ImageFileDataset, ImageFileDataset]:
    root = locate_root(data_root, "sop", "Stanford_Online_Products", "Ebay_train.txt", LAYOUT)
    require_files(root, ["Ebay_train.txt", "Ebay_test.txt"], "sop", LAYOUT)
    out = []
    for part in ("train", "test"):
        rows = list(_read_list(os.path.join(root, f"Ebay_{part}.txt")))
        paths = [os.path.join(root, p) for _, p in rows]
        require_listed(paths, "sop", f"Ebay_{part}.txt")
        y, ids = contiguous([c for c, _ in rows])
        out.append(ImageFileDataset(paths, y, [str(i) for i in ids], image_transforms(image_size, part == "train"),
                                    listed=True))
    require_images("sop", out[0], out[1], "Ebay_train.txt, Ebay_test.txt")
    return out[0], out[1]
