"""
Damaged image files in a --dataset (issue 14): a JPEG truncated by 20 bytes (which OpenCV decodes
with a warning and PIL refuses), a file of garbage and an empty file. By default registration
stops, naming the files and the two options; with DATASETS.LOAD_TRUNCATED_IMAGES
(--load-truncated-images) the truncated JPEG is loaded as OpenCV decodes it, with a warning per
file; with DATASETS.DROP_UNREADABLE_IMAGES (--drop-unreadable-images) the unreadable images leave
the dataset with their annotations, and the evaluation says how many images it covers.
"""

import json
import logging
import os
import re
import subprocess
import sys
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
cv2 = pytest.importorskip("cv2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import vfnet  # noqa: E402
from vfnet.data.mapper import VFNetDatasetMapper, read_image  # noqa: E402
from vfnet.data.validation import DatasetError, check_image_file  # noqa: E402
from vfnet.engine import default_argument_parser  # noqa: E402
from vfnet.evaluation import VFNetCOCOEvaluator  # noqa: E402

from helpers import BASE_CONFIG, ROOT, SMALL, TINY  # noqa: E402


OPTIONS = (
    "--load-truncated-images",
    "DATASETS.LOAD_TRUNCATED_IMAGES",
    "--drop-unreadable-images",
    "DATASETS.DROP_UNREADABLE_IMAGES",
)
HEIGHT, WIDTH = 48, 64


def pattern(height=HEIGHT, width=WIDTH, seed=0):
    """A noisy background with a rectangle: (H, W, 3) uint8 (noise: every JPEG byte matters)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[height // 5 : height * 4 // 5, width // 5 : width * 7 // 10] = (200, 60, 90)
    return image


def write_truncated_jpeg(path, cut=20):
    """A JPEG with its last `cut` bytes cut off; returns the complete file's bytes."""
    Image.fromarray(pattern()).save(path, quality=95)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-cut])
    return data


# file name -> how to write it; each image is 64 x 48 in the JSON.
FILES = {
    "ok_a.png": lambda p: Image.fromarray(pattern(seed=1)).save(p),
    "ok_b.jpg": lambda p: Image.fromarray(pattern(seed=2)).save(p, quality=95),
    "truncated.jpg": write_truncated_jpeg,
    "garbage.jpg": lambda p: open(p, "wb").write(np.random.default_rng(3).bytes(2000)),
    "empty.png": lambda p: open(p, "wb").close(),
}


def write_dataset(root, file_names, name):
    """The files, and a COCO JSON with one box per image; returns the --dataset spec."""
    images, annotations = [], []
    for i, file_name in enumerate(file_names, start=1):
        FILES[file_name](str(root / file_name))
        images.append({"id": i, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
        box = [WIDTH * 0.2, HEIGHT * 0.2, WIDTH * 0.5, HEIGHT * 0.6]
        for j in range(2):  # two annotations per image: their count is logged
            annotations.append(
                {
                    "id": 2 * i + j,
                    "image_id": i,
                    "category_id": 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "x"}]}
    (root / f"{name}.json").write_text(json.dumps(coco))
    return f"{name}={root / f'{name}.json'}:{root}"


@pytest.fixture
def vfnet_log(caplog):
    """caplog, also for the "vfnet" and Detectron2 loggers when they do not reach the root."""
    loggers = [logging.getLogger(n) for n in ("vfnet", "detectron2.evaluation.coco_evaluation")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    with caplog.at_level(logging.WARNING):
        yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def messages(caplog, part=""):
    """The messages of the records caplog took that contain `part`, each once (a record can reach
    its handler through two loggers)."""
    records = {id(r): r for r in caplog.records}.values()
    return [r.getMessage() for r in records if part in r.getMessage()]


@pytest.fixture
def register(tmp_path, request):
    """register(file_names, **kw) -> dataset name; unregistered after the test."""
    names = []

    def register(file_names, **kwargs):
        name = f"damaged_{request.node.name}_{len(names)}"
        names.append(name)
        return vfnet.register_coco_dataset(write_dataset(tmp_path, file_names, name), **kwargs)

    yield register
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def vfnet_cfg(*opts):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_list(list(opts))
    return cfg


# --- the truncated JPEG: what PIL and OpenCV make of it -----------------------------------------


def test_the_truncated_jpeg_is_what_the_issue_describes(tmp_path):
    path = str(tmp_path / "truncated.jpg")
    write_truncated_jpeg(path)
    with pytest.raises(OSError, match=r"image file is truncated \(\d+ bytes not processed\)"):
        Image.open(path).load()
    assert cv2.imread(path) is not None  # OpenCV decodes it (warning on stderr)


# --- default: refused, naming the file and both options ---------------------------------------


def test_by_default_a_truncated_image_stops_registration_naming_it_and_both_options(
    tmp_path, register
):
    with pytest.raises(DatasetError) as info:
        register(["ok_a.png", "truncated.jpg"])
    message = str(info.value)
    assert "1 of 2 image files cannot be used" in message
    path = tmp_path / "truncated.jpg"
    assert f"'{path}' (image id 2) is not a readable image (OSError: " in message
    assert "image file is truncated" in message
    assert "decodes as far as its data goes with --load-truncated-images" in message
    for option in OPTIONS:
        assert option in message, option


def test_every_truncated_file_is_found_though_the_checks_run_in_threads(tmp_path, register):
    # The files that fail are decoded again with PIL's global LOAD_TRUNCATED_IMAGES only after
    # the threads of the check are done: none of them passes the check meanwhile.
    path = str(tmp_path / "truncated.jpg")
    write_truncated_jpeg(path)
    data = open(path, "rb").read()
    images = []
    for i in range(1, 25):
        (tmp_path / f"t{i}.jpg").write_bytes(data)
        images.append({"id": i, "file_name": f"t{i}.jpg", "width": WIDTH, "height": HEIGHT})
    coco = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "many.json").write_text(json.dumps(coco))
    try:
        with pytest.raises(DatasetError, match="24 of 24 image files cannot be used"):
            vfnet.register_coco_dataset(f"damaged_many={tmp_path / 'many.json'}:{tmp_path}")
    finally:
        assert "damaged_many" not in DatasetCatalog.list()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_an_undecodable_file_names_only_the_option_that_helps(tmp_path, register):
    with pytest.raises(DatasetError) as info:
        register(["ok_a.png", "garbage.jpg", "empty.png"])
    message = str(info.value)
    assert "2 of 3 image files cannot be used" in message
    assert f"'{tmp_path / 'garbage.jpg'}' (image id 2) is not a readable image" in message
    assert f"'{tmp_path / 'empty.png'}' (image id 3) is not a readable image" in message
    assert "--drop-unreadable-images" in message and "DATASETS.DROP_UNREADABLE_IMAGES" in message
    assert "--load-truncated-images" not in message  # it would not help
    # Loading truncated images does not make garbage readable.
    with pytest.raises(DatasetError, match="2 of 3 image files cannot be used"):
        register(["ok_a.png", "garbage.jpg", "empty.png"], load_truncated_images=True)


# --- load truncated images ------------------------------------------------------------------


def test_load_truncated_registers_with_a_warning_and_reads_what_opencv_decodes(
    tmp_path, register, vfnet_log
):
    name = register(["ok_a.png", "truncated.jpg"], load_truncated_images=True)
    path = str(tmp_path / "truncated.jpg")
    warnings = messages(vfnet_log, path)
    assert len(warnings) == 1, vfnet_log.text
    assert "(image id 2) is truncated (OSError: image file is truncated" in warnings[0]
    assert "loaded as far as its data goes (DATASETS.LOAD_TRUNCATED_IMAGES)" in warnings[0]
    assert len(DatasetCatalog.get(name)) == 2
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # not left set
    assert check_image_file(path, WIDTH, HEIGHT, load_truncated=True) is None

    # read_image: refused by default; with load_truncated, OpenCV's pixels, and the undamaged
    # part is the complete file's.
    with pytest.raises(OSError, match="image file is truncated"):
        read_image(path, format="BGR")
    image = read_image(path, format="BGR", load_truncated=True)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    np.testing.assert_array_equal(image, cv2.imread(path))
    complete = tmp_path / "complete.jpg"
    Image.fromarray(pattern()).save(complete, quality=95)
    expected = cv2.imread(str(complete))
    differ = np.flatnonzero((image != expected).any(axis=(1, 2)))
    # Only the last row of 16 x 16 blocks (4:2:0 chroma) is damaged, and the row above it, which
    # the chroma upsampling blends with it.
    assert 0 < len(differ) and differ.min() >= HEIGHT - 16 - 1


def test_the_mapper_loads_a_truncated_image_with_the_config_key_and_warns_once(
    tmp_path, vfnet_log
):
    path = str(tmp_path / "truncated.jpg")
    write_truncated_jpeg(path)
    record = {"file_name": path, "image_id": 5, "height": HEIGHT, "width": WIDTH}
    with pytest.raises(
        RuntimeError,
        match=r"Cannot load image .*\(image id 5\): OSError: image file is truncated .*"
        r"--load-truncated-images, config DATASETS.LOAD_TRUNCATED_IMAGES True",
    ):
        VFNetDatasetMapper(vfnet_cfg(), is_train=False)(record)

    mapper = VFNetDatasetMapper(vfnet_cfg("DATASETS.LOAD_TRUNCATED_IMAGES", "True"), is_train=False)
    assert mapper.load_truncated_images
    vfnet_log.clear()
    for _ in range(2):
        out = mapper(record)
    assert out["image"].shape == (3, 800, round(800 * WIDTH / HEIGHT))
    warnings = messages(vfnet_log, path)
    assert len(warnings) == 1 and "is truncated" in warnings[0], vfnet_log.text
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# --- drop unreadable images -------------------------------------------------------------------


def test_drop_unreadable_leaves_the_images_and_their_annotations_out(tmp_path, register, vfnet_log):
    files = ["ok_a.png", "garbage.jpg", "ok_b.jpg", "truncated.jpg", "empty.png"]
    name = register(files, drop_unreadable_images=True)
    dicts = DatasetCatalog.get(name)
    assert sorted(os.path.basename(d["file_name"]) for d in dicts) == ["ok_a.png", "ok_b.jpg"]
    assert all(len(d["annotations"]) == 2 for d in dicts)
    message = "\n".join(messages(vfnet_log))
    assert "dropped 3 of 5 images, whose files are missing or cannot be read" in message
    assert "DATASETS.DROP_UNREADABLE_IMAGES" in message and "with their 6 annotations" in message
    for i, file_name in ((2, "garbage.jpg"), (4, "truncated.jpg"), (5, "empty.png")):
        assert f"'{file_name}' (image id {i})" in message
    assert "use the other 2 images" in message
    assert "1 of them are truncated, and decode as far as their data goes with " in message
    meta = MetadataCatalog.get(name)
    assert meta.dropped_images == ["garbage.jpg", "truncated.jpg", "empty.png"]
    assert meta.num_source_images == 5
    with open(meta.json_file) as f:  # the evaluator's ground truth
        gt = json.load(f)
    assert [img["id"] for img in gt["images"]] == [1, 3]
    assert sorted({a["image_id"] for a in gt["annotations"]}) == [1, 3]


def test_both_options_load_the_truncated_image_and_drop_the_rest(tmp_path, register, vfnet_log):
    files = ["ok_a.png", "truncated.jpg", "garbage.jpg"]
    name = register(files, load_truncated_images=True, drop_unreadable_images=True)
    assert [os.path.basename(d["file_name"]) for d in DatasetCatalog.get(name)] == [
        "ok_a.png",
        "truncated.jpg",
    ]
    assert "dropped 1 of 3 images" in vfnet_log.text and "is truncated" in vfnet_log.text


def test_the_images_another_process_dropped_are_dropped_without_checking(tmp_path, register):
    # The DDP workers of train_net take the main process's list (the files are not read).
    name = register(["ok_a.png", "garbage.jpg", "ok_b.jpg"], check_files=False, drop_image_ids=[2])
    assert [d["image_id"] for d in DatasetCatalog.get(name)] == [1, 3]
    assert MetadataCatalog.get(name).dropped_images == ["garbage.jpg"]


def test_a_dataset_with_no_readable_image_is_refused(register):
    with pytest.raises(DatasetError, match="none of its 2 image files can be read"):
        register(["garbage.jpg", "empty.png"], drop_unreadable_images=True)


def test_the_evaluation_says_how_many_images_it_covers_and_does_not_count_dropped_ones(
    tmp_path, register, vfnet_log
):
    name = register(["ok_a.png", "garbage.jpg", "ok_b.jpg"], drop_unreadable_images=True)
    evaluator = VFNetCOCOEvaluator(name, output_dir=str(tmp_path / "eval"))
    evaluator.reset()
    for record in DatasetCatalog.get(name):  # perfect detections of the images left
        boxes = torch.tensor([a["bbox"] for a in record["annotations"]], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY
        instances = Instances(
            (record["height"], record["width"]),
            pred_boxes=Boxes(boxes),
            scores=torch.ones(len(boxes)),
            pred_classes=torch.zeros(len(boxes), dtype=torch.int64),
        )
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert (
        f"The evaluation of '{name}' covers 2 of 3 images: 1 left out of the dataset at "
        "registration, with their annotations, as their files are missing or cannot be read "
        "(DATASETS.DROP_UNREADABLE_IMAGES): 'garbage.jpg'." in vfnet_log.text
    )
    assert "'garbage.jpg'" in vfnet_log.text
    # The dropped image's boxes are not in the ground truth: no missed detection.
    assert results["bbox"]["AP"] == pytest.approx(100.0)


# --- the command lines --------------------------------------------------------------------------


def test_the_flags_are_next_to_dataset_in_train_net_and_demo():
    args = default_argument_parser().parse_args(
        ["--dataset", "a=b:c", "--load-truncated-images", "--drop-unreadable-images"]
    )
    assert args.load_truncated_images and args.drop_unreadable_images
    args = default_argument_parser().parse_args(["--dataset", "a=b:c"])
    assert not args.load_truncated_images and not args.drop_unreadable_images


def test_train_net_with_both_flags_trains_and_evaluates_saying_what_was_left_out(tmp_path):
    spec = write_dataset(tmp_path, ["ok_a.png", "truncated.jpg", "garbage.jpg"], name="damaged")
    out = tmp_path / "out"
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        "--dataset", spec, "--load-truncated-images", "--drop-unreadable-images",
        *TINY,
        "MODEL.VFNET.NUM_CLASSES", "1",
        "DATASETS.TRAIN", "('damaged',)", "DATASETS.TEST", "('damaged',)",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.ASPECT_RATIO_GROUPING", "False",
        "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "dropped 1 of 3 images, whose files are missing or cannot be read" in log
    assert "'garbage.jpg' (image id 3)" in log
    assert re.search(r"truncated\.jpg' \(image id 2\) is truncated", log)  # registration
    assert re.search(r"Image '\S*truncated\.jpg' is truncated", log)  # the data loaders
    assert "MMDetection's filter: 2 of 2 images kept" in log  # the training set (DATALOADER.TRAIN_FILTER)
    assert "Start inference on 2 batches" in log
    assert "The evaluation of 'damaged' covers 2 of 3 images" in log
    assert re.search(r"copypaste: [\d.]+,[\d.]+", log)
    with open(out / "config.yaml") as f:
        config = f.read()
    assert "DROP_UNREADABLE_IMAGES: true" in config and "LOAD_TRUNCATED_IMAGES: true" in config


def test_demo_registers_with_the_flags_and_reads_a_truncated_input(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "vfnet_demo", os.path.join(ROOT, "demo", "demo.py")
    )
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    dataset = write_dataset(tmp_path, ["ok_a.png", "truncated.jpg", "garbage.jpg"], "damaged_demo")
    args = [
        "--config-file", BASE_CONFIG, "--dataset", dataset,
        "--input", str(tmp_path / "truncated.jpg"), "--output", str(tmp_path / "out"),
    ]  # fmt: skip
    opts = [
        "--opts", *SMALL, "MODEL.VFNET.NUM_CLASSES", "1", "DATASETS.TEST", "('damaged_demo',)",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    ]  # fmt: skip
    try:
        with pytest.raises(DatasetError, match="--load-truncated-images"):
            demo.main(args + opts)
        flags = ["--load-truncated-images", "--drop-unreadable-images"]
        written = demo.main(args + flags + opts)
        assert written == [str(tmp_path / "out" / "truncated.jpg")]
        assert MetadataCatalog.get("damaged_demo").dropped_images == ["garbage.jpg"]
    finally:
        if "damaged_demo" in DatasetCatalog.list():
            DatasetCatalog.remove("damaged_demo")
            MetadataCatalog.remove("damaged_demo")
