"""Class-balanced P x K batches: ``P`` classes per batch, ``K`` images of each."""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
from torch.utils.data import Sampler


#: A batch of dataset indices, or of (index, seed) pairs where the sampler is ``seeded``.
Batch = Union[List[int], List[Tuple[int, int]]]


class PKSampler(Sampler[Batch]):
    """A batch sampler yielding lists of ``P * K`` dataset indices.

    Each batch draws ``P`` distinct classes (uniformly, without replacement; all of them when
    there are fewer than ``P``) and ``K`` images of each (without replacement when the class has
    at least ``K``, else with). ``batches_per_epoch`` defaults to ``len(labels) // (P * K)``.
    The draw depends only on ``seed`` and the epoch set with :meth:`set_epoch`, so a resumed run
    and every process of a distributed run (:class:`DistributedPKSampler`) agree.

    ``seeded``: each entry is ``(index, augmentation seed)`` instead of the index, the seed drawn
    (from ``seed``, the epoch and the entry's place in the global batch, by a generator apart from
    the one that draws the indices) for :class:`~daal_triton.train.data.base.SeededDraws`: an
    image's augmentation then depends on neither the number of loader workers nor the world size.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, samples_per_class: int, *,
                 batches_per_epoch: Optional[int] = None, seed: int = 0, seeded: bool = False) -> None:
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError("classes_per_batch and samples_per_class must be >= 1, got "
                             f"{classes_per_batch} and {samples_per_class}")
        label_array = np.asarray(labels, dtype=np.int64)
        if label_array.size == 0:
            raise ValueError("labels is empty: no images to sample from")
        self.classes = np.unique(label_array)
        self.by_class = {int(c): np.flatnonzero(label_array == c) for c in self.classes}
        self.p = min(classes_per_batch, len(self.classes))
        self.k = samples_per_class
        self.batches = batches_per_epoch or max(1, len(labels) // (self.p * self.k))
        self.seed = seed
        self.seeded = seeded
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    @property
    def global_batch_size(self) -> int:
        """Images in a batch of all ranks together (P x K)."""
        return self.p * self.k

    def __len__(self) -> int:
        return self.batches

    def _global_batches(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self.seed, self.epoch])
        seeds = np.random.default_rng([self.seed, self.epoch, 1])  # its own stream: the indices stay as before
        for _ in range(self.batches):
            batch: List[int] = []
            for c in rng.choice(self.classes, size=self.p, replace=False):
                pool = self.by_class[int(c)]
                batch.extend(rng.choice(pool, size=self.k, replace=len(pool) < self.k).tolist())
            if self.seeded:
                yield list(zip(batch, seeds.integers(0, 2**63, size=len(batch)).tolist()))
            else:
                yield batch

    def __iter__(self) -> Iterator[Batch]:
        return self._global_batches()


class DistributedPKSampler(PKSampler):
    """Rank ``rank``'s share of the global P x K batches of a run over ``world_size`` processes.

    Every rank draws the *same* global batches as :class:`PKSampler` (from ``seed`` and the epoch
    only) and keeps the classes ``rank::world_size`` of each, with all ``K`` images of each of them,
    so a class's samples stay together on one rank and the ranks' shares, gathered in rank order,
    hold exactly the global batch's images. ``P`` (after capping at the number of classes) must be
    divisible by ``world_size``; each rank's batches have ``P / world_size * K`` images.
    """

    def __init__(self, labels: Sequence[int], classes_per_batch: int, samples_per_class: int, *,
                 rank: int, world_size: int, batches_per_epoch: Optional[int] = None, seed: int = 0,
                 seeded: bool = False) -> None:
        super().__init__(labels, classes_per_batch, samples_per_class, batches_per_epoch=batches_per_epoch,
                         seed=seed, seeded=seeded)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if self.p % world_size:
            capped = ("" if self.p == classes_per_batch
                      else f" (capped from {classes_per_batch} at the number of classes)")
            raise ValueError(f"classes per batch P = {self.p}{capped} must be divisible by the world size "
                             f"{world_size}: each rank takes P / world_size whole classes of every batch")
        self.rank, self.world_size = rank, world_size

    @property
    def batch_size(self) -> int:
        return self.p // self.world_size * self.k

    def __iter__(self) -> Iterator[Batch]:
        k = self.k
        for batch in self._global_batches():  # the global batch: P blocks of K indices, one block per class
            blocks = [batch[i * k:(i + 1) * k] for i in range(self.p)]
            yield cast(Batch, [i for block in blocks[self.rank::self.world_size] for i in block])
