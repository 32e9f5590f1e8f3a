"""Any ``root/train/<class>/<image>`` + ``root/test/<class>/<image>`` tree (class names sorted)."""
from __future__ import annotations

import os
import unicodedata
from typing import Dict, List, Optional, Tuple

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
    ``os.listdir``) shown as escapes (``caf\\xe9``): as U+FFFD, two folders became one name."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk(top: str, unreadable: Optional[List[str]] = None):
    """``(folder, sorted file names)`` below class folder ``top`` in sorted order, following links
    to folders elsewhere, each real folder once; a link back into the split (up the tree, or into
    another class: copies under the wrong label) is not followed; hidden folders are skipped.
    Folders that cannot be listed are added to ``unreadable`` (they were left out unsaid)."""
    seen = set()
    top_real = os.path.realpath(top)
    split_real = os.path.realpath(os.path.dirname(os.path.abspath(top)))  # the split's, even for a linked class

    def failed(e: OSError) -> None:
        if unreadable is not None:
            unreadable.append(f"{e.filename} (a folder that cannot be read: {e.strerror or e})")

    for dirpath, dirs, files in os.walk(top, onerror=failed, followlinks=True):
        real = os.path.realpath(dirpath)
        back = not _inside(real, top_real) and (_inside(real, split_real) or _inside(top_real, real))
        if real in seen or back:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not _hidden(d))  # in place: os.walk descends into these
        yield dirpath, sorted(files)


def _scan(split_dir: str, image_size: int, train: bool) -> Tuple[ImageFileDataset, List[str], List[Tuple[int, int]]]:
    """The images below ``split_dir``'s class folders, with the class folders' names as on the disk
    and each image's file identity ``(st_dev, st_ino)``. Files that cannot be images (empty, or
    links to nothing) and folders that cannot be read are refused here, before any training,
    rather than when the loader first reads them; files of other types, files beside the class
    folders and class folders without images are left out, and one file found under two classes
    (a link or a hard link) kept; each is said in the dataset's ``notes``."""
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)) and not _hidden(d))
    paths: List[str] = []
    labels: List[int] = []
    bad: List[str] = []
    other: Dict[str, int] = {}
    ids: List[Tuple[int, int]] = []
    across: List[str] = []  # files found again under another class
    owner: Dict[Tuple[int, int], str] = {}  # a file's identity: the first path it was found at
    loose = [f for f in os.listdir(split_dir) if not _hidden(f) and os.path.isfile(os.path.join(split_dir, f))]
    for d in sorted(os.listdir(split_dir)):  # a class folder that is a link to nothing: refused, not skipped
        link = os.path.join(split_dir, d)
        if not _hidden(d) and os.path.islink(link) and not os.path.exists(link):
            bad.append(f"{link} (a link to nothing)")
    for i, c in enumerate(classes):
        for dirpath, files in _walk(os.path.join(split_dir, c), bad):
            for f in files:
                if _hidden(f):
                    continue
                path = os.path.join(dirpath, f)
                if not f.lower().endswith(IMAGE_EXTENSIONS):
                    ext = os.path.splitext(f)[1].lower() or "no extension"
                    other[ext] = other.get(ext, 0) + 1
                    continue
                try:
                    st = os.stat(path)
                except OSError as e:
                    bad.append(f"{path} ({'a link to nothing' if os.path.islink(path) else e.strerror or e})")
                    continue
                if st.st_size == 0:
                    bad.append(f"{path} (empty)")
                    continue
                if st.st_ino:  # 0: a file system without inode numbers (some network shares)
                    key = (st.st_dev, st.st_ino)
                    first = owner.setdefault(key, path)
                    if first != path and os.path.relpath(first, split_dir).split(os.sep)[0] != c:
                        across.append(f"{path} (as {first})")
                    ids.append(key)
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
    if loose:
        ds.notes.append(f"folder: {split}/: left out {plural(len(loose), 'file')} beside the class folders "
                        f"({', '.join(sorted(loose)[:3])}{', ...' if len(loose) > 3 else ''}): images go in "
                        f"{split}/<class name>/")
    if across:  # said, not refused: content-addressed stores (git-annex) link identical pictures
        ds.notes.append(f"folder: {split}/: {plural(len(across), 'image')} {'is' if len(across) == 1 else 'are'} "
                        f"the same file as an image of another class (a link or a hard link: one picture under "
                        f"two labels), e.g. {across[0]}: check the class folders")
    repeated = len(ids) - len(set(ids)) - len(across)
    if repeated:
        ds.notes.append(f"folder: {split}/: {plural(repeated, 'image')} {'is' if repeated == 1 else 'are'} the "
                        f"same file as another of its class (links): each copy counts, and in the test split "
                        f"finds the other as its nearest neighbour")
    if other:
        n = sum(other.values())
        kinds = ", ".join(f"{k} ({v})" for k, v in sorted(other.items()))
        ds.notes.append(f"folder: {split}/: left out {plural(n, 'file')} of a type not read as an "
                        f"image: {kinds} (read: {', '.join(IMAGE_EXTENSIONS)})")
    unused = [_display(classes[c]) for c in range(len(classes)) if c not in remap]
    if unused:
        ds.notes.append(f"folder: {split}/: left out {plural(len(unused), 'class folder')} "
                        f"without images: {', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}")
    return ds, [classes[c] for c in used], ids


def load_folder(data_root: str, image_size: int = 224, *, train: bool = True
                ) -> Tuple[ImageFileDataset, ImageFileDataset]:
    """The ``train/`` and ``test/`` splits of ``data_root``; ``train=False`` (daal-eval, which
    embeds the test classes only): ``test/`` alone, the training set empty."""
    out = []
    for part in ("train", "test") if train else ("test",):
        d = os.path.join(data_root, part)
        if not os.path.isdir(d):
            raise DatasetLayoutError(f"folder: missing {part}/ under {os.path.abspath(data_root)!r}.\n"
                                     f"Expected layout:\n{LAYOUT}")
        out.append(_scan(d, image_size, part == "train"))
    if not train:
        return ImageFileDataset([], [], [], image_transforms(image_size, True)), out[0][0]
    (tr, tr_names, tr_ids), (te, te_names, te_ids) = out
    # by their names as on the disk, in one Unicode normal form (macOS writes é as e + U+0301)
    nfc = {unicodedata.normalize("NFC", n) for n in tr_names}
    shared = sorted({_display(n) for n in te_names if unicodedata.normalize("NFC", n) in nfc})
    if shared:
        raise DatasetLayoutError(f"folder: train/ and test/ share the classes {', '.join(shared[:5])}"
                                 f"{', ...' if len(shared) > 5 else ''}: deep metric learning tests on classes it "
                                 f"never trained on (move them to one split).\nExpected layout:\n{LAYOUT}")
    both = set(tr_ids) & set(te_ids)
    if both:  # a link or hard link: the same image in both splits (said: a store may link identical pictures)
        first = next(p for p, key in zip(te.paths, te_ids) if key in both)
        te.notes.append(f"folder: {plural(len(both), 'image')} of test/ {'is' if len(both) == 1 else 'are'} also in "
                        f"train/ (the same file, through a link or a hard link), e.g. {first}: the test measures "
                        f"retrieval on images the network trained on")
    return tr, te
