"""Data sets of the training program, each with the deep-metric-learning split (train on one half
of the classes, test on the other), and the P x K class-balanced batch sampler.

``build_datasets(name, ...)`` -> ``(train, test)``; see :data:`DATASETS` for the names.
"""
from __future__ import annotations

from typing import Optional, Tuple

from .base import DatasetLayoutError, MetricDataset, SeededDraws
from .sampler import DistributedPKSampler, PKSampler

DATASETS = ("shapes", "digits", "cub200", "cars196", "sop", "folder")
NEEDS_ROOT = ("cub200", "cars196", "sop", "folder")
#: The training classes of the data sets split by class number (a photo set's folder may hold fewer:
#: an upper bound), so a ``-P`` above it is refused before any data is read (daal-study: before
#: any cell runs); ``sop``'s and ``folder``'s are known only once their files are read
MOST_TRAIN_CLASSES = {"shapes": 12, "digits": 5, "cub200": 100, "cars196": 98}


def build_datasets(name: str, data_root: Optional[str] = None, image_size: int = 32, *, seed: int = 0,
                   augment: str = "none", shapes_train_per_class: int = 120,
                   shapes_test_per_class: int = 100,
                   shapes_nuisance: float = 1.0, progress: bool = False,
                   train: bool = True) -> Tuple[MetricDataset, MetricDataset]:
    """``(train, test)`` of data set ``name`` (one of :data:`DATASETS`); ``progress``: a bar while
    ``shapes`` draws its images, where that takes more than a second. ``train=False`` (daal-eval,
    daal-study's t-SNE: the test split only): ``shapes`` draws no training images (its training
    split is empty: at 224 px, about 27 ms an image, the default 1,440 took about 39 s).

    ``augment`` applies to the in-memory sets (``shapes``, ``digits``); photos always get random
    resized crop + flip for training and resize + centre crop for testing.
    """
    if name == "shapes":
        from .synthetic import load_shapes

        return load_shapes(image_size, seed=seed, train_per_class=shapes_train_per_class if train else 0,
                           test_per_class=shapes_test_per_class, nuisance=shapes_nuisance, augment=augment,
                           progress=progress)
    if name == "digits":
        from .synthetic import load_digits

        return load_digits(image_size, augment=augment)
    if name in NEEDS_ROOT and not data_root:
        raise DatasetLayoutError(f"--dataset {name} needs --data-root (the folder that holds it)")
    root = data_root or ""  # the sets below need one: checked above
    if name == "cub200":
        from .cub200 import load_cub200

        return load_cub200(root, image_size)
    if name == "cars196":
        from .cars196 import load_cars196

        return load_cars196(root, image_size)
    if name == "sop":
        from .sop import load_sop

        return load_sop(root, image_size)
    if name == "folder":
        from .folder import load_folder

        return load_folder(root, image_size, train=train)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


__all__ = ["DATASETS", "DatasetLayoutError", "DistributedPKSampler", "MOST_TRAIN_CLASSES", "MetricDataset", "PKSampler",
           "SeededDraws", "build_datasets"]
