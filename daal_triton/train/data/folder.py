"""Any ``root/train/<class>/<image>`` + ``root/test/<class>/<image>`` tree (class names sorted)."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

from ..log import plural
from .base import IMAGE_EXTENSIONS, DatasetLayoutError, ImageFileDataset, image_transforms

LAYOUT = """  <data-root>/train/<class name>/<image>.jpg|png|...
  <data-root>/test/<class name>/<image>.jpg|png|...
  (train and test should hold different classes, as deep metric learning tests on unseen ones)"""


def _hidden(name: str) -> bool:
    """Hidden files and folders, and what macOS leaves in archives (``__MACOSX/``, ``._x.jpg``)."""
    return name.startswith(".") or name == "__MACOSX"


def _display(name: str) -> str:
    """A folder name for tables and plots: bytes that are not UTF-8 (surrogate-escaped by
    ``os.listdir``) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(top: str):
    """``(folder, sorted file names)`` below class folder ``top`` in sorted order, following links
    to folders elsewhere, each real folder once; a link back into the split (up the tree, or into
    another class: copies under the wrong label) is not followed; hidden folders are skipped."""
    seen = set()
    top_real = os.path.realpath(top)
    split_real = os.path.realpath(os.path.dirname(os.path.abspath(top)))  # the split's, even for a linked class
    for dirpath, dirs, files in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        back = not _inside(real, top_real) and (_inside(real, split_real) or _inside(top_real, real))
        if real in seen or back:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not _hidden(d))  # in place: os.walk descends into these
        yield dirpath, sorted(files)


def _scan(split_dir: str, image_size: int, train: bool) -> ImageFileDataset:
    """The images below ``split_dir``'s class folders. Files that cannot be images (empty, or links
    to nothing) are refused here, before any training, rather than when the loader first reads
    them; files of other types and class folders without images are left out, and said so in the
    dataset's ``notes``."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)) and not _hidden(d))
    paths: List[str] = []
    labels: List[int] = []
    bad: List[str] = []
    other: Dict[str, int] = {}
    for d in sorted(os.listdir(split_dir)):  # a class folder that is a link to nothing: refused, not skipped
        link = os.path.join(split_dir, d)
        if not _hidden(d) and os.path.islink(link) and not os.path.exists(link):
            bad.append(f"{link} (a link to nothing)")
    for i, c in enumerate(classes):
        for dirpath, files in _walk(os.path.join(split_dir, c)):
            for f in files:
                if _hidden(f):
                    continue
                path = os.path.join(dirpath, f)
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    ext = os.path.splitext(f)[1].lower() or "no extension"
                    other[ext] = other.get(ext, 0) + 1
                    continue
                try:
                    empty = os.stat(path).st_size == 0
                except OSError as e:
                    bad.append(f"{path} ({'a link to nothing' if os.path.islink(path) else e.strerror or e})")
                    continue
                if empty:
                    bad.append(f"{path} (empty)")
                    continue
                paths.append(path)
                labels.append(i)
    if bad:
        raise DatasetLayoutError(f"folder: {plural(len(bad), 'file')} under {split_dir!r} cannot "
                                 f"be read as images: {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}: "
                                 "replace or remove them")
    if not paths:
        raise DatasetLayoutError(f"folder: no images in class folders under {split_dir!r}.\nExpected layout:\n{LAYOUT}")
    used = sorted(set(labels))
    remap = {c: j for j, c in enumerate(used)}  # drop empty class folders, keep labels contiguous
    ds = ImageFileDataset(paths, [remap[c] for c in labels], [_display(classes[c]) for c in used],
                          image_transforms(image_size, train))
    split = os.path.basename(os.path.normpath(split_dir))
    if other:
        n = sum(other.values())
        kinds = ", ".join(f"{k} ({v})" for k, v in sorted(other.items()))
        ds.notes.append(f"folder: {split}/: left out {plural(n, 'file')} of a type not read as an "
                        f"image: {kinds} (read: {', '.join(IMAGE_EXTENSIONS)})")
    unused = [_display(classes[c]) for c in range(len(classes)) if c not in remap]
    if unused:
        ds.notes.append(f"folder: {split}/: left out {plural(len(unused), 'class folder')} "
                        f"without images: {', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}")
    return ds


def load_folder(data_root: str, image_size: int = 224) -> Tuple[ImageFileDataset, ImageFileDataset]:
    out = []
    for part in ("train", "test"):
        d = os.path.join(data_root, part)
        if not os.path.isdir(d):
            raise DatasetLayoutError(f"folder: missing {part}/ under {os.path.abspath(data_root)!r}.\n"
                                     f"Expected layout:\n{LAYOUT}")
        out.append(_scan(d, image_size, part == "train"))
    shared = sorted(set(out[0].class_names) & set(out[1].class_names))
    if shared:
        raise DatasetLayoutError(f"folder: train/ and test/ share the classes {', '.join(shared[:5])}"
                                 f"{', ...' if len(shared) > 5 else ''}: deep metric learning tests on classes it "
                                 f"never trained on (move them to one split).\nExpected layout:\n{LAYOUT}")
    return out[0], out[1]
