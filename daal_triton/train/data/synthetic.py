"""Loaders for the embedded data sets: ``shapes`` (the default) and ``digits`` (scikit-learn's 8x8)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from . import shapes as S
from .base import ArrayDataset, tensor_transforms


def load_shapes(image_size: int = 32, *, seed: int = 0, train_per_class: int = 120,
                test_per_class: int = 100, nuisance: float = 1.0,
                augment: str = "none", progress: bool = False) -> Tuple[ArrayDataset, ArrayDataset]:
    """The ``shapes`` set (see :mod:`daal_triton.train.data.shapes`): classes 0-11 train,
    12-23 test, rendered at ``image_size``; train and test images come from different seeds.
    ``dataset.modes`` holds each image's palette (4 modes per class). ``progress``: a bar while
    the images are drawn, where that takes more than a second."""
    names = S.class_names()
    half = len(names) // 2
    tr_img, tr_lab, tr_mode = S.generate(range(half), train_per_class, image_size, seed, nuisance=nuisance,
                                         progress=progress, desc="shapes (train)")
    te_img, te_lab, te_mode = S.generate(range(half, 2 * half), test_per_class, image_size,
                                         seed + 1_000_003, nuisance=nuisance, progress=progress, desc="shapes (test)")
    train = ArrayDataset(tr_img, tr_lab, names[:half], tensor_transforms(image_size, True, augment=augment),
                         modes=tr_mode, mode_names=list(S.PALETTE_NAMES))
    test = ArrayDataset(te_img, te_lab - half, names[half:], tensor_transforms(image_size, False),
                        modes=te_mode, mode_names=list(S.PALETTE_NAMES))
    return train, test


def load_digits(image_size: int = 32, *, augment: str = "shift") -> Tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 8x8 digits (1,797 images, shipped inside the package), upscaled to
    ``image_size`` and made RGB; digits 0-4 train, 5-9 test."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    img = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # N x 1 x 8 x 8
    img = torch.nn.functional.interpolate(img, size=(image_size, image_size), mode="bilinear",
                                          align_corners=False).clamp_(0, 1)
    pixels = (img.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)
    y = d.target.astype(np.int64)
    tr, te = y < 5, y >= 5
    train = ArrayDataset(pixels[tr], y[tr], [str(i) for i in range(5)],
                         tensor_transforms(image_size, True, augment=augment))
    test = ArrayDataset(pixels[te], y[te] - 5, [str(i) for i in range(5, 10)], tensor_transforms(image_size, False))
    return train, test
