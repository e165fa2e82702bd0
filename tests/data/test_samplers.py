"""The resumable training batches: a function of the iteration, of no data-loading worker."""
import itertools

import numpy as np
import pytest
import torch

from vfnet.data.samplers import ResumableBatchSampler, sample_seed


def shuffled_stream(size):
    """seed -> an infinite stream of indices: one random permutation of `size` per epoch."""

    def stream(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield from torch.randperm(size, generator=g).tolist()

    return stream


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


GROUPS = [0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1]  # 13 images, 6 wide and 7 tall


def test_batches_from_any_iteration_are_the_tail_of_those_from_the_start():
    full = take(ResumableBatchSampler(shuffled_stream(13), 5, 4, GROUPS), 60)
    for start in (1, 2, 7, 31):
        sampler = ResumableBatchSampler(shuffled_stream(13), 5, 4, GROUPS)
        sampler.start_iter = start
        assert take(sampler, 60 - start) == full[start:], start


def test_batches_are_those_of_detectron2_aspect_ratio_grouping_of_the_same_stream():
    common = pytest.importorskip(
        "detectron2.data.common", reason="Detectron2 is not installed (see README: Install)"
    )
    stream = shuffled_stream(13)
    dicts = (
        {"index": i, "position": p, "width": 20 if GROUPS[i] == 0 else 10, "height": 15}
        for p, i in enumerate(stream(5))
    )
    expected = list(itertools.islice(iter(common.AspectRatioGroupedDataset(dicts, 4)), 40))
    batches = take(ResumableBatchSampler(stream, 5, 4, GROUPS, rank=1), 40)
    assert [[i for i, _ in b] for b in batches] == [[d["index"] for d in b] for b in expected]
    assert [[s for _, s in b] for b in batches] == [
        [sample_seed(5, 1, d["position"]) for d in b] for b in expected
    ]
    assert all(len({GROUPS[i] for i, _ in b}) == 1 for b in batches)


def test_without_grouping_batches_are_consecutive_indices_of_the_stream():
    stream = shuffled_stream(7)
    batches = take(ResumableBatchSampler(stream, 3, 2), 10)
    assert [i for b in batches for i, _ in b] == list(itertools.islice(stream(3), 20))


def test_sample_seeds_differ_between_samples_ranks_and_data_seeds():
    seeds = {sample_seed(s, r, p) for s in (0, 1) for r in (0, 1, 2) for p in range(500)}
    assert len(seeds) == 2 * 3 * 500
    assert sample_seed(0, 0, 7) == sample_seed(0, 0, 7)


def test_the_data_seed_is_the_state_and_changes_the_batches():
    a = ResumableBatchSampler(shuffled_stream(13), 5, 4, GROUPS)
    b = ResumableBatchSampler(shuffled_stream(13), 6, 4, GROUPS)
    assert take(a, 10) != take(b, 10)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"seed": 5} and take(a, 10) == take(b, 10)


# --- the loader, with Detectron2 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_train(tmp_path_factory):
    pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
    import vfnet
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from vfnet.data.shapes import generate_split

    root = tmp_path_factory.mktemp("shapes")
    generate_split(str(root), "train", 10, seed=2, image_size=(40, 80))
    name = vfnet.register_coco_dataset(f"samplers_train={root / 'train.json'}:{root / 'train'}")
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def loader_cfg(name, *opts):
    from helpers import small_cfg

    return small_cfg(
        "DATASETS.TRAIN", f"('{name}',)", "MODEL.VFNET.NUM_CLASSES", "4",
        "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(32, 48, 64)",
        "INPUT.MAX_SIZE_TRAIN", "200", "INPUT.RANDOM_FLIP", "horizontal", "SEED", "3", *opts,
    )  # fmt: skip


def first_batches(cfg, n):
    from vfnet.data.build import build_resumable_train_loader
    from vfnet.data.mapper import VFNetDatasetMapper

    loader = build_resumable_train_loader(cfg, VFNetDatasetMapper(cfg, is_train=True))
    return list(itertools.islice(iter(loader), n))


def test_loaded_batches_do_not_depend_on_the_number_of_data_workers(shapes_train):
    batches = {
        w: first_batches(loader_cfg(shapes_train, "DATALOADER.NUM_WORKERS", str(w)), 12)
        for w in (0, 2)
    }
    for b0, b2 in zip(batches[0], batches[2]):
        assert [d["file_name"] for d in b0] == [d["file_name"] for d in b2]
        for d0, d2 in zip(b0, b2):
            assert torch.equal(d0["image"], d2["image"])
            assert torch.equal(d0["instances"].gt_boxes.tensor, d2["instances"].gt_boxes.tensor)
    # The augmentations are random, and are those configured: each sample is its image resized
    # to a shorter side of 32, 48 or 64 and flipped or not (its boxes say which); all occur.
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BoxMode

    records = {r["file_name"]: r for r in DatasetCatalog.get(shapes_train)}
    sizes, flips = set(), set()
    for d in (d for b in batches[0] for d in b):
        record = records[d["file_name"]]
        height, width = d["image"].shape[1:]
        sizes.add(min(height, width))
        sx, sy = width / record["width"], height / record["height"]
        box = BoxMode.convert(record["annotations"][0]["bbox"], record["annotations"][0]["bbox_mode"], BoxMode.XYXY_ABS)
        plain = torch.tensor([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
        mirrored = torch.tensor([width - plain[2], plain[1], width - plain[0], plain[3]])
        got = d["instances"].gt_boxes.tensor[0]
        is_plain, is_mirrored = (torch.allclose(got, b, atol=1.0) for b in (plain, mirrored))
        assert is_plain != is_mirrored, (got, plain, mirrored)
        flips.add(is_mirrored)
    assert sizes == {32, 48, 64} and flips == {True, False}


def test_the_loader_leaves_the_global_generators_alone(shapes_train):
    np.random.seed(11)
    expected = np.random.rand(3)
    np.random.seed(11)
    first_batches(loader_cfg(shapes_train, "DATALOADER.NUM_WORKERS", "0"), 3)
    assert np.array_equal(np.random.rand(3), expected)


def test_a_sampler_that_cannot_resume_exactly_is_refused(shapes_train):
    with pytest.raises(ValueError, match="DATALOADER.SAMPLER_TRAIN 'WeightedTrainingSampler'"):
        first_batches(loader_cfg(shapes_train, "DATALOADER.SAMPLER_TRAIN", "WeightedTrainingSampler"), 1)
