"""
Training batches that are a function of the iteration alone, so that a resumed run reads exactly
the batches the interrupted run would have read. Pure torch and numpy (no Detectron2).
"""
from collections import defaultdict
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler", "sample_seed"]


def sample_seed(seed: int, rank: int, position: int) -> int:
    """
    The seed of the augmentations of one sample: a hash of the data seed, the DDP rank and the
    sample's position in that rank's stream of indices (distinct samples get independent seeds).
    """
    return int(np.random.SeedSequence([seed, rank, position]).generate_state(1)[0])


class ResumableBatchSampler(Sampler):
    """
    The batches of one DDP worker, grouped by aspect ratio as Detectron2's
    `AspectRatioGroupedDataset` groups them, but over indices, before any image is loaded.

    Batch ``i`` is a list of ``(dataset index, sample seed)`` pairs: the images of this worker's
    ``i``-th iteration and the seeds of their augmentations (:func:`sample_seed`). It depends
    only on `seed` and ``i``, not on the number of data-loading workers nor on their timing, and
    iterating from `start_iter` yields batches ``start_iter, start_iter + 1, ...`` without
    loading the images of the earlier ones.
    """

    def __init__(
        self,
        index_sampler: Callable[[int], Iterable[int]],
        seed: int,
        batch_size: int,
        groups: Optional[Sequence[int]] = None,
        rank: int = 0,
    ):
        """
        Args:
            index_sampler: seed -> this worker's infinite stream of dataset indices (a
                Detectron2 `TrainingSampler(size, seed=seed)`, say).
            seed: the data seed (index order and augmentations); `state_dict` holds it.
            batch_size: images per batch of this worker.
            groups: the aspect-ratio group of each dataset index (Detectron2's: 0 if its width
                > height, else 1); a batch holds images of one group. None: no grouping.
            rank: this worker's DDP rank (part of the sample seeds).
        """
        self.index_sampler = index_sampler
        self.seed = int(seed)
        self.batch_size = batch_size
        self.groups = groups
        self.rank = rank
        self.start_iter = 0

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        buckets = defaultdict(list)
        iteration = 0
        for position, index in enumerate(self.index_sampler(self.seed)):
            index = int(index)
            bucket = buckets[0 if self.groups is None else self.groups[index]]
            bucket.append((index, position))
            if len(bucket) == self.batch_size:
                batch = bucket[:]
                bucket.clear()
                iteration += 1
                if iteration > self.start_iter:
                    yield [(i, sample_seed(self.seed, self.rank, p)) for i, p in batch]

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
