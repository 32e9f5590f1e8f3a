"""Class-balanced P x K batches: ``P`` classes per batch, ``K`` images of each."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[List[int]]):
    """A batch sampler yielding lists of ``P * K`` dataset indices.

    Each batch draws ``P`` distinct classes (uniformly, without replacement; all of them when
    there are fewer than ``P``) and ``K`` images of each (without replacement when the class has
    at least ``K``, else with). ``batches_per_epoch`` defaults to ``len(labels) // (P * K)``.
    The draw depends only on ``seed`` and the epoch set with :meth:`set_epoch`, so a resumed run
    and every process of a distributed run (which may take ``rank::world_size`` batches) agree.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, samples_per_class: int, *,
                 batches_per_epoch: Optional[int] = None, seed: int = 0) -> None:
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError("classes_per_batch and samples_per_class must be >= 1, got "
                             f"{classes_per_batch} and {samples_per_class}")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.size == 0:
            raise ValueError("labels is empty: no images to sample from")
        self.classes = np.unique(labels)
        self.by_class = {int(c): np.flatnonzero(labels == c) for c in self.classes}
        self.p = min(classes_per_batch, len(self.classes))
        self.k = samples_per_class
        self.batches = batches_per_epoch or max(1, len(labels) // (self.p * self.k))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        for _ in range(self.batches):
            batch: List[int] = []
            for c in rng.choice(self.classes, size=self.p, replace=False):
                pool = self.by_class[int(c)]
                batch.extend(rng.choice(pool, size=self.k, replace=len(pool) < self.k).tolist())
            yield batch
