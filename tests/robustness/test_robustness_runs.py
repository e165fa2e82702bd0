"""
Runs: checkpoints that an interrupted write cannot corrupt, a run killed with SIGKILL that
resumes exactly, clear errors for --eval-only weights, config keys, dataset names and
NUM_CLASSES, evaluation of a model that predicts nothing, and unusual images through
tools/train_net.py end to end.
"""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import vfnet  # noqa: E402
from vfnet.checkpoint import detection_checkpoint as vfnet_checkpoint  # noqa: E402
from vfnet.checkpoint.detection_checkpoint import CheckpointError, VFNetCheckpointer, load_for_evaluation  # noqa: E402

from vfnet import engine  # noqa: E402
from vfnet.engine import check_output_dir  # noqa: E402
from vfnet.evaluation import VFNetCOCOEvaluator  # noqa: E402

from helpers import ROOT  # noqa: E402

from helpers import RACCOON_IMAGES, TINY, start_deterministic  # noqa: E402
from helpers import finish as finish_run  # noqa: E402


def train_net_cmd(output_dir, *args):
    return [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        *args, *TINY, "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


def run(output_dir, *args):
    proc = subprocess.run(
        train_net_cmd(output_dir, *args), capture_output=True, text=True, timeout=300
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def small_model(num_classes=3):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-VFNet.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.VFNET.NUM_CLASSES", str(num_classes),
    ])  # fmt: skip
    return build_model(cfg)


def write_dataset(root, sizes, name):
    """
    Write the COCO JSON of images {file_name: (width, height)} in `root`, one box per image, one
    category; returns its --dataset spec.
    """
    entries, annotations = [], []
    for i, (file_name, (width, height)) in enumerate(sorted(sizes.items()), start=1):
        entries.append({"id": i, "file_name": file_name, "width": width, "height": height})
        box = [width * 0.2, height * 0.2, width * 0.5, height * 0.6]
        annotations.append(
            {
                "id": i,
                "image_id": i,
                "category_id": 1,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
        )
    coco = {
        "images": entries,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / f"{name}.json").write_text(json.dumps(coco))
    return f"{name}={root / f'{name}.json'}:{root}"


def pattern(height, width):
    """A noisy background with a rectangle: (H, W, 3) uint8."""
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), 40, np.uint8) + rng.integers(
        0, 30, (height, width, 3), dtype=np.uint8
    )
    image[height // 5 : height * 4 // 5, width // 5 : width * 7 // 10] = (200, 60, 90)
    return image


# --- checkpoints ------------------------------------------------------------------------------


def test_an_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = VFNetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def killed_torch_save(data, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as a signal would, mid-write

    monkeypatch.setattr(vfnet_checkpoint.torch, "save", killed_torch_save)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_0000003")
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    VFNetCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    torch.testing.assert_close(model.state_dict(), saved)


def test_a_tmp_file_left_by_a_killed_save_is_never_read(tmp_path):
    model = torch.nn.Linear(3, 2)
    checkpointer = VFNetCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    (tmp_path / "model_0000003.pth.tmp").write_bytes(b"half")  # what SIGKILL mid-save leaves
    (tmp_path / "last_checkpoint.tmp").write_bytes(b"model_00")
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    assert checkpointer.get_all_checkpoint_files() == [str(tmp_path / "model_0000001.pth")]
    checkpointer.save("model_0000003")  # the next save replaces the leftovers
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]


# --- --eval-only weights ----------------------------------------------------------------------


def test_eval_only_without_weights_is_refused(tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"No weights to evaluate: MODEL.WEIGHTS is empty and "
        rf"OUTPUT_DIR '{tmp_path}' has no last_checkpoint",
    ):
        load_for_evaluation(small_model(), "", str(tmp_path), resume=True)


def test_eval_only_with_a_missing_checkpoint_names_it(tmp_path):
    path = str(tmp_path / "model_final.pth")
    with pytest.raises(FileNotFoundError, match=f"Checkpoint '{path}' does not exist."):
        load_for_evaluation(small_model(), path, str(tmp_path))


def test_eval_only_with_a_truncated_checkpoint_names_it(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": small_model().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(
        CheckpointError,
        match=f"Cannot read checkpoint '{path}': it is not a PyTorch "
        "checkpoint, or it is truncated",
    ):
        load_for_evaluation(small_model(), str(path), str(tmp_path))


def test_eval_only_with_the_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": small_model(num_classes=4).state_dict()}, path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"Checkpoint '{path}' does not fit the model: head.cls_score.weight has shape "
            "(4, 64, 3, 3) in the checkpoint, (3, 64, 3, 3) in the model; head.cls_score.bias"
        ),
    ):
        load_for_evaluation(small_model(num_classes=3), str(path), str(tmp_path))

    backbone_only = {
        k: v for k, v in small_model().state_dict().items() if k.startswith("backbone")
    }
    torch.save({"model": backbone_only}, path)
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the model: \d+ weights of the model are not in it \(head\.",
    ):
        load_for_evaluation(small_model(), str(path), str(tmp_path))

    model = small_model()
    torch.save({"model": model.state_dict()}, path)
    load_for_evaluation(small_model(), str(path), str(tmp_path))  # a model of this config loads


# --- config, datasets, NUM_CLASSES ------------------------------------------------------------


@pytest.mark.parametrize("source", ["command line", "config file"])
def test_a_config_key_that_does_not_exist_names_it_and_the_nearest_keys(tmp_path, source):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    if source == "command line":
        config_file = os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml")
        opts, where = ["MODEL.VFNET.NUM_CLASS", "3"], "command line"
    else:
        config_file = tmp_path / "typo.yaml"
        config_file.write_text(
            f"_BASE_: {os.path.join(ROOT, 'configs', 'Base-VFNet.yaml')}\n"
            "MODEL:\n  VFNET:\n    NUM_CLASS: 3\n"
        )
        opts, where = [], f"config file '{config_file}'"
    with pytest.raises(
        KeyError,
        match=re.escape(
            f"Config key MODEL.VFNET.NUM_CLASS ({where}) does not exist. "
            "Did you mean MODEL.VFNET.NUM_CLASSES"
        ),
    ):
        engine.merge_config(cfg, str(config_file), opts)


@pytest.fixture
def tiny_dataset(tmp_path):
    image = Image.fromarray(pattern(48, 64))
    image.save(tmp_path / "a.png")
    spec = write_dataset(tmp_path, {"a.png": image.size}, name="robustness_runs_tiny")
    name = vfnet.register_coco_dataset(spec)
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def dataset_cfg(train, test, num_classes):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = train, test
    cfg.MODEL.VFNET.NUM_CLASSES = num_classes
    return cfg


def test_a_dataset_name_that_is_not_registered_is_refused(tiny_dataset):
    cfg = dataset_cfg((tiny_dataset,), ("mine_val",), 1)
    message = (
        r"DATASETS.TEST names dataset 'mine_val', which is not registered. Register a COCO-format "
        r"dataset with --dataset mine_val=JSON:IMAGE_DIR"
    )
    with pytest.raises(KeyError, match=message):
        engine.Trainer(cfg)
    with pytest.raises(KeyError, match=message):  # --eval-only
        engine.Trainer.test(cfg, model=None)


def test_num_classes_not_matching_the_dataset_is_refused(tiny_dataset):
    cfg = dataset_cfg((tiny_dataset,), (), 80)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"MODEL.VFNET.NUM_CLASSES is 80, but dataset '{tiny_dataset}' (DATASETS.TRAIN) has 1 "
            "classes: ['thing']. Set MODEL.VFNET.NUM_CLASSES 1."
        ),
    ):
        engine.Trainer(cfg)
    with pytest.raises(ValueError, match="MODEL.VFNET.NUM_CLASSES is 80"):
        engine.Trainer.test(dataset_cfg((), (tiny_dataset,), 80), model=None)
    engine.check_datasets(dataset_cfg((tiny_dataset,), (tiny_dataset,), 1))


def test_evaluating_a_model_that_predicts_nothing_gives_ap_0_with_a_warning(
    tiny_dataset, tmp_path, caplog
):
    evaluator = VFNetCOCOEvaluator(tiny_dataset, output_dir=str(tmp_path))
    evaluator.reset()
    record = DatasetCatalog.get(tiny_dataset)[0]
    nothing = Instances(
        (record["height"], record["width"]),
        pred_boxes=Boxes(torch.zeros(0, 4)),
        scores=torch.zeros(0),
        pred_classes=torch.zeros(0, dtype=torch.int64),
    )
    evaluator.process([{"image_id": record["image_id"]}], [{"instances": nothing}])
    logger = logging.getLogger("detectron2.evaluation.coco_evaluation")
    logger.addHandler(caplog.handler)  # Detectron2's loggers may not propagate to the root
    try:
        results = evaluator.evaluate()
    finally:
        logger.removeHandler(caplog.handler)
    assert results["bbox"] == {
        "AP": 0.0,
        "AP50": 0.0,
        "AP75": 0.0,
        "APs": 0.0,
        "APm": 0.0,
        "APl": 0.0,
    }
    assert (
        "The model made no bbox prediction with a score above its threshold on "
        f"'{tiny_dataset}': its bbox AP is 0." in caplog.text
    )  # noqa: E501


# --- tools/train_net.py end to end ------------------------------------------------------------


def unusual_images(root):
    """Images of every awkward kind (and the raccoon dataset's grayscale JPEGs, if present)."""
    base = Image.fromarray(pattern(48, 64))
    sizes = {}
    for file_name, mode in (
        ("gray.jpg", "L"),
        ("rgba.png", "RGBA"),
        ("cmyk.jpg", "CMYK"),
        ("palette.png", "P"),
    ):
        base.convert(mode).save(root / file_name)
        sizes[file_name] = base.size
    Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257)).save(root / "gray16.png")
    sizes["gray16.png"] = base.size
    exif = base.getexif()
    exif[0x0112] = 8  # shown turned 90 degrees counter-clockwise: 48 wide, 64 high
    base.save(root / "exif.jpg", exif=exif)
    sizes["exif.jpg"] = base.size[::-1]
    if os.path.isdir(RACCOON_IMAGES):
        for file_name in ("raccoon-150.jpg", "raccoon-152.jpg", "raccoon-161.jpg"):
            shutil.copy(os.path.join(RACCOON_IMAGES, file_name), root / file_name)
            with Image.open(root / file_name) as im:
                assert im.mode == "L"
                sizes[file_name] = im.size
    return sizes


def test_unusual_images_train_and_evaluate_and_an_untrained_model_scores_0(tmp_path):
    sizes = unusual_images(tmp_path)
    spec = write_dataset(tmp_path, sizes, name="unusual")
    # One batch of all images (no aspect-ratio grouping): every image is trained on once.
    log = run(
        tmp_path / "out",
        "--dataset",
        spec,
        "MODEL.VFNET.NUM_CLASSES",
        "1",
        "DATASETS.TRAIN",
        "('unusual',)",
        "DATASETS.TEST",
        "('unusual',)",
        "SOLVER.IMS_PER_BATCH",
        str(len(sizes)),
        "DATALOADER.ASPECT_RATIO_GROUPING",
        "False",
        "SOLVER.MAX_ITER",
        "1",
    )
    n = len(sizes)
    assert f"MMDetection's filter: {n} of {n} images kept" in log  # DATALOADER.TRAIN_FILTER "mmdet"
    assert f"Start inference on {n} batches" in log and "Total inference time" in log
    # The untrained model scores below the threshold everywhere: AP 0, not NaN.
    assert "its bbox AP is 0." in log
    assert re.search(
        r"copypaste: 0\.0000,0\.0000,0\.0000,0\.0000,0\.0000,0\.0000$", log, flags=re.M
    )


def metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f]




def checkpoint_state(path):
    """
    What a checkpoint holds of a run: iteration, weights, the optimizer's state (AdamW's moments
    and step counts, the demo's optimizer; SGD's momenta), LR scheduler, data seed.
    """
    ckpt = torch.load(path, weights_only=False)
    trainer = ckpt["trainer"]
    return {
        "iteration": ckpt["iteration"],
        "model": ckpt["model"],
        "optimizer_state": [
            value
            for state in trainer["_trainer"]["optimizer"]["state"].values()
            for _, value in sorted(state.items())
        ],
        "hooks": trainer["hooks"],
        "data_loader": trainer["data_loader"],
    }


def assert_bitwise_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict) and key == "model":
            for name in x:
                assert torch.equal(x[name], y[name]), (what, name)
        elif isinstance(x, list):
            assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y)), (what, key)
        else:
            assert x == y, (what, key)


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """24 shapes images of 48-96 px (both aspect-ratio groups), registered as --dataset."""
    from vfnet.data.shapes import generate_split

    root = tmp_path_factory.mktemp("many_images")
    generate_split(str(root), "train", 24, seed=3, image_size=(48, 96))
    return f"resume_train={root / 'train.json'}:{root / 'train'}"


def test_a_run_killed_with_sigkill_resumes_exactly_with_0_and_2_data_workers(tmp_path, many_images):
    # Shuffled data, random flips and multi-scale resize, batches of 2 images grouped by aspect
    # ratio; checkpoints after iterations 1, 3, 5, 7 and 9, and model_final.
    opts = ["MODEL.VFNET.NUM_CLASSES", "4", "DATASETS.TRAIN", "('resume_train',)",
            "DATASETS.TEST", "()", "SOLVER.IMS_PER_BATCH", "2", "INPUT.RANDOM_FLIP", "horizontal",
            "INPUT.MIN_SIZE_TRAIN", "(48, 64, 80)", "INPUT.MAX_SIZE_TRAIN", "128",
            "SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.MAX_ITER", "10"]  # fmt: skip
    def start(output_dir, workers, kill=(), resume=()):
        args = [*train_net_cmd(output_dir, *resume, "--dataset", many_images)[2:],
                *opts, "DATALOADER.NUM_WORKERS", str(workers)]  # fmt: skip
        return start_deterministic(f"{output_dir}.log", kill, args)

    def finish(proc, output_dir, returncode=0):
        finish_run(proc, f"{output_dir}.log", returncode)

    straight = {0: tmp_path / "straight0", 2: tmp_path / "straight2"}
    killed = {  # output dir: (data workers, how it is killed)
        tmp_path / "killed0": (0, ("--kill-after-iter", "4")),
        tmp_path / "killed2": (2, ("--kill-writing", "model_0000005.pth")),
    }
    procs = [start(d, workers) for workers, d in straight.items()]  # two processes at a time
    for proc, d in zip(procs, straight.values()):
        finish(proc, d)
    procs = [start(d, workers, kill) for d, (workers, kill) in killed.items()]
    for proc, d in zip(procs, killed):
        finish(proc, d, -signal.SIGKILL)

    files = sorted(f for f in os.listdir(straight[0]) if f.endswith(".pth"))
    assert files == ["model_0000001.pth", "model_0000003.pth", "model_0000005.pth",
                     "model_0000007.pth", "model_0000009.pth", "model_final.pth"]  # fmt: skip
    reference = {f: checkpoint_state(straight[0] / f) for f in files}
    # First, these settings are reproducible: two uninterrupted runs are bitwise equal (they
    # also differ in their number of data workers, which the batches do not depend on).
    for f in files:
        assert_bitwise_equal(checkpoint_state(straight[2] / f), reference[f], f"straight {f}")

    # The killed runs left their last complete checkpoint, killed while writing also a .tmp.
    for d in killed:
        assert (d / "last_checkpoint").read_text() == "model_0000003.pth", d
        assert not (d / "model_0000005.pth").exists() and not (d / "model_final.pth").exists()
    assert (tmp_path / "killed2" / "model_0000005.pth.tmp").exists()

    procs = [start(d, workers, resume=("--resume",)) for d, (workers, _) in killed.items()]
    for proc, d in zip(procs, killed):
        finish(proc, d)
        assert "Starting training from iteration 4" in open(f"{d}.log").read()
        for f in files[2:]:  # every checkpoint written after the resume
            assert_bitwise_equal(checkpoint_state(d / f), reference[f], f"{d.name} {f}")
    assert not (tmp_path / "killed2" / "model_0000005.pth.tmp").exists()  # replaced by the save
    assert metrics(tmp_path / "killed0")[-1]["lr"] == metrics(straight[0])[-1]["lr"]


# --- a training set without annotations, OUTPUT_DIR, a full disk -------------------------------


def test_train_net_on_a_training_set_without_annotations_stops_before_training(tmp_path):
    (tmp_path / "data").mkdir()
    image = Image.fromarray(pattern(64, 80))
    for i in range(4):
        image.save(tmp_path / "data" / f"{i}.png")
    spec = write_dataset(tmp_path / "data", {f"{i}.png": image.size for i in range(4)}, name="empty_train")
    coco = json.load(open(tmp_path / "data" / "empty_train.json"))
    coco["annotations"] = []
    json.dump(coco, open(tmp_path / "data" / "empty_train.json", "w"))
    proc = subprocess.run(
        train_net_cmd(
            tmp_path / "out", "--dataset", spec, "DATASETS.TRAIN", "('empty_train',)",
            "DATASETS.TEST", "()", "MODEL.VFNET.NUM_CLASSES", "1",
        ),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "DatasetError: No training image is left of DATASETS.TRAIN ('empty_train',)" in log, log[-3000:]
    assert "dataset 'empty_train' has 4 images" in log
    assert "need at least one array to concatenate" not in log
    assert "Starting training" not in log
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".pth")]


def test_an_output_dir_that_is_a_file_or_under_one_is_refused_naming_the_key(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("kept")
    with pytest.raises(ValueError, match=rf"^OUTPUT_DIR '{a_file}' exists and is not a directory"):
        check_output_dir(str(a_file))
    with pytest.raises(ValueError, match=rf"^train.output_dir '{a_file}/run' cannot be created or written \(NotADirectoryError"):
        check_output_dir(str(a_file / "run"), key="train.output_dir")
    assert a_file.read_text() == "kept"
    with pytest.raises(ValueError, match=r"^OUTPUT_DIR '/sys/vfnet_out' cannot be created or written \(PermissionError"):
        check_output_dir("/sys/vfnet_out")
    check_output_dir(str(tmp_path / "new" / "run"))  # created
    assert os.listdir(tmp_path / "new" / "run") == []  # the write check leaves nothing


@pytest.mark.parametrize("tool", ["train_net", "lazyconfig_train_net"])
def test_the_tools_refuse_an_output_dir_that_is_a_file_before_anything_runs(tmp_path, tool):
    a_file = tmp_path / "out"
    a_file.write_text("kept")
    if tool == "train_net":
        cmd, key = train_net_cmd(a_file), "OUTPUT_DIR"
    else:
        cmd = [
            sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"),
            "--config-file", os.path.join(ROOT, "configs", "lazy", "vfnet_shapes_demo.py"),
            f"train.output_dir={a_file}",
        ]  # fmt: skip
        key = "train.output_dir"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"ValueError: {key} '{a_file}' exists and is not a directory" in log, log[-3000:]
    assert "NotADirectoryError" not in log
    assert "Environment info" not in log  # default_setup did not run
    assert a_file.read_text() == "kept"


def test_a_checkpoint_on_a_full_disk_names_it_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    checkpointer = VFNetCheckpointer(torch.nn.Linear(3, 2), str(tmp_path))
    checkpointer.save("model_0000009")
    before = (tmp_path / "model_0000009.pth").read_bytes()

    def full_disk_save(obj, f):  # what torch.save meets on a full disk, after some bytes
        f.write(b"\0" * 3 * 2**20)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError) as e:
        checkpointer.save("model_0000019")
    message = str(e.value)
    assert e.value.errno == errno.ENOSPC
    assert f"Cannot write '{tmp_path / 'model_0000019.pth'}': no space left on its disk" in message
    assert "after 3.0 MiB" in message and "MiB are free in" in message and "--resume" in message
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
    assert (tmp_path / "model_0000009.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
