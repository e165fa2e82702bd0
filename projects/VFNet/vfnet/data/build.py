"""
The training data loader of the project's trainer: Detectron2's datasets, samplers and mapper,
with batches that a resumed run reads again exactly (see samplers.py).
"""
import random
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from detectron2.config import configurable
from detectron2.data import DatasetFromList
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.utils import comm

from .detection_utils import get_training_dataset_dicts, warn_about_tiny_boxes
from .samplers import ResumableBatchSampler

__all__ = ["SeededMapDataset", "build_resumable_train_loader"]


class SeededMapDataset(Dataset):
    """
    A dataset of dicts mapped by `mapper` (random augmentations included), indexed by
    ``(index, seed)``: numpy's, Python's and torch's global generators are seeded with `seed`
    for the call of `mapper` and restored after it, so a sample's augmentations depend on its
    seed alone, whichever process maps it.
    """

    def __init__(self, dataset_dicts: List[dict], mapper: Callable[[dict], dict]):
        self._dataset = DatasetFromList(dataset_dicts, copy=False)
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index_and_seed: Tuple[int, int]) -> dict:
        index, seed = index_and_seed
        numpy_state, python_state = np.random.get_state(), random.getstate()
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                data = self._mapper(self._dataset[index])
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)
        if data is None:
            raise ValueError(
                f"The dataset mapper returned None for dataset index {index}; the resumable "
                "loader cannot replace a sample (that would change the batches of a resume)."
            )
        return data


def _index_sampler(cfg, dataset_dicts: List[dict]) -> Callable[[int], TrainingSampler]:
    """seed -> Detectron2's DATALOADER.SAMPLER_TRAIN sampler of this DDP worker, seeded."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return lambda seed: TrainingSampler(len(dataset_dicts), seed=seed)
    if name == "RepeatFactorTrainingSampler":
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT
        )
        return lambda seed: RepeatFactorTrainingSampler(factors, seed=seed)
    if name == "RandomSubsetTrainingSampler":
        ratio = cfg.DATALOADER.RANDOM_SUBSET_RATIO
        return lambda seed: RandomSubsetTrainingSampler(
            len(dataset_dicts), ratio, seed_shuffle=seed, seed_subset=seed + 1
        )
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN '{name}' is not supported by the VFNet trainer, whose batches "
        "resume exactly: use TrainingSampler, RepeatFactorTrainingSampler or "
        "RandomSubsetTrainingSampler."
    )


def _train_loader_from_config(cfg, mapper: Callable[[dict], dict]) -> dict:
    dataset_dicts = get_training_dataset_dicts(
        cfg.DATASETS.TRAIN,
        cfg.DATALOADER.TRAIN_FILTER,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_size=cfg.DATALOADER.MIN_IMAGE_SIZE,
    )
    if cfg.MODEL.META_ARCHITECTURE == "VFNet":
        warn_about_tiny_boxes(cfg, dataset_dicts)
    return {
        "dataset": dataset_dicts,
        "mapper": mapper,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "seed": cfg.SEED,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "index_sampler": _index_sampler(cfg, dataset_dicts),
    }


@configurable(from_config=_train_loader_from_config)
def build_resumable_train_loader(
    dataset: List[dict],
    *,
    mapper: Callable[[dict], dict],
    total_batch_size: int,
    seed: int = -1,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    index_sampler: Optional[Callable[[int], Iterable[int]]] = None,
) -> DataLoader:
    """
    Detectron2's `build_detection_train_loader` (same datasets, filtering, sampler, batch size
    per worker and aspect-ratio grouping), whose batches are those of a
    :class:`ResumableBatchSampler`: the same for any number of data-loading workers, and
    continued exactly after a resume from `loader.batch_sampler.start_iter` with the seed of
    `loader.batch_sampler.state_dict()`.

    As Detectron2's, it is called with a config, ``build_resumable_train_loader(cfg, mapper)``
    (DATASETS.TRAIN, DATALOADER.*, SOLVER.IMS_PER_BATCH, SEED), or with explicit arguments, as
    a LazyConfig's ``dataloader.train`` calls it (configs/lazy/).

    Args:
        dataset: the dataset dicts (Detectron2's `get_detection_dataset_dicts`).
        mapper: dataset dict -> model input (a :class:`VFNetDatasetMapper`).
        total_batch_size: images per iteration over all DDP workers.
        seed: the data seed (index order and augmentations); negative: a random one shared by
            the DDP workers.
        aspect_ratio_grouping: batches of images that are all wider than high, or not.
        num_workers: data-loading processes of each DDP worker.
        index_sampler: seed -> this worker's infinite stream of dataset indices; None:
            Detectron2's `TrainingSampler` (DATALOADER.SAMPLER_TRAIN picks it from a config).
    """
    world_size = comm.get_world_size()
    if total_batch_size % world_size:
        raise ValueError(
            f"The total batch size (SOLVER.IMS_PER_BATCH, dataloader.train.total_batch_size: "
            f"{total_batch_size}) must be divisible by the number of workers ({world_size})."
        )
    if index_sampler is None:
        index_sampler = lambda seed: TrainingSampler(len(dataset), seed=seed)  # noqa: E731
    groups = None
    if aspect_ratio_grouping:
        groups = [0 if d["width"] > d["height"] else 1 for d in dataset]
    batch_sampler = ResumableBatchSampler(
        index_sampler,
        seed=seed if seed >= 0 else comm.shared_random_seed(),
        batch_size=total_batch_size // world_size,
        groups=groups,
        rank=comm.get_rank(),
    )
    return DataLoader(
        SeededMapDataset(dataset, mapper),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        worker_init_fn=worker_init_reset_seed,
    )
