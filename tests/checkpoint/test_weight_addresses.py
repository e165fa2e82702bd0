"""
MODEL.WEIGHTS given an official MMDetection checkpoint as it is released (vfnet/checkpoint/
mmdet_checkpoint.py, detection_checkpoint.py): an http address (downloaded once through
Detectron2's PathManager, converted once beside the download) or a local file (converted in
memory). Without the internet: a local HTTP server on 127.0.0.1 serves randomly initialised
MMDetection checkpoints of the R-50 and R-50-DCN models under their official file names, and every
cache is in the test's folder (FVCORE_CACHE).
"""
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.modeling import build_model  # noqa: E402

from vfnet.checkpoint import detection_checkpoint, mmdet_checkpoint  # noqa: E402
from vfnet.checkpoint.catalog import ModelCatalog  # noqa: E402
from vfnet.checkpoint.converter import ConversionError  # noqa: E402
from vfnet.checkpoint.detection_checkpoint import CheckpointError, VFNetCheckpointer  # noqa: E402

from helpers import RACCOON, ROOT, assert_identical_detections, detections_of, explicit_detections, http_server, official_model_file, raccoon_image, serve, small_cfg, small_mmdet_file  # noqa: E402,E501

MODELS = {"VFNet_R_50_FPN_1x": "mmdet/VFNet_R_50_FPN_1x.yaml", "VFNet_R_50_DCN_FPN_MS_2x": "mmdet/VFNet_R_50_DCN_FPN_MS_2x.yaml"}


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """{name: the randomly initialised MMDetection checkpoint of the official model `name`}."""
    folder = tmp_path_factory.mktemp("official")
    return {name: official_model_file(config, str(folder / f"{name}.pth")) for name, config in MODELS.items()}


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server of this test's files (a new address: nothing of another test cached) and a download cache of its own."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    with http_server(tmp_path / "www") as (address, requested):
        yield address, requested, tmp_path / "www"


def no_conversion(monkeypatch):
    """Make every conversion fail: what loads afterwards converts nothing."""
    def refuse(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(mmdet_checkpoint, "convert_mmdet_checkpoint", refuse)
    monkeypatch.setattr(detection_checkpoint, "convert_mmdet_checkpoint", refuse)


@pytest.mark.parametrize("name", list(MODELS))
def test_an_official_address_gives_the_detections_of_the_explicit_conversion(name, official_files, server, tmp_path, monkeypatch):
    address, requested, www = server
    path = serve(www, ModelCatalog.URLS[name], official_files[name])
    image = raccoon_image()
    explicit = explicit_detections(MODELS[name], official_files[name], image, tmp_path)
    assert_identical_detections(detections_of(MODELS[name], address + path, image), explicit)
    assert requested == [path]
    cached = [f for f in os.listdir(tmp_path / "cache" / os.path.dirname(path.lstrip("/"))) if not f.endswith(".lock")]
    assert sorted(cached) == sorted([os.path.basename(path), os.path.basename(path) + mmdet_checkpoint.CONVERTED_SUFFIX])

    no_conversion(monkeypatch)  # the second load reads the conversion
    assert_identical_detections(detections_of(MODELS[name], address + path, image), explicit)
    assert requested == [path]


def one_image_dataset(folder):
    """--dataset NAME=JSON:IMAGE_DIR of the first raccoon validation image, under the 80 classes of the official models."""
    with open(os.path.join(RACCOON, "val.json")) as f:
        val = json.load(f)
    image = val["images"][0]
    annotations = [dict(a, category_id=1) for a in val["annotations"] if a["image_id"] == image["id"]]
    categories = [{"id": i + 1, "name": f"class{i}"} for i in range(80)]
    path = folder / "one.json"
    path.write_text(json.dumps({"images": [image], "annotations": annotations, "categories": categories}))
    return f"{path}:{os.path.join(RACCOON, 'images')}"


def test_eval_only_with_an_official_address_then_again_without_download_or_conversion(official_files, server, tmp_path, monkeypatch):
    name, config = "VFNet_R_50_FPN_1x", os.path.join(ROOT, "configs", MODELS["VFNet_R_50_FPN_1x"])
    address, requested, www = server
    path = serve(www, ModelCatalog.URLS[name], official_files[name])
    raccoon_image()  # (skips without the dataset)
    dataset = one_image_dataset(tmp_path)
    opts = ["DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", config, "--eval-only",
        "--dataset", f"one_raccoon={dataset}", *opts, "DATASETS.TEST", "('one_raccoon',)", "MODEL.WEIGHTS", address + path, "MODEL.DEVICE", "cpu",
        "OUTPUT_DIR", str(tmp_path / "cli"),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "Converted the MMDetection checkpoint" in done.stderr + done.stdout
    assert requested == [path]

    # The explicit path, in this process: the tool's conversion, loaded, evaluated alike.
    from vfnet.checkpoint.converter import convert_checkpoint_file
    from vfnet.data.datasets import register_coco_dataset
    from vfnet.engine import Trainer, setup
    from vfnet.engine.defaults import default_argument_parser

    register_coco_dataset(f"one_raccoon_explicit={dataset}")
    explicit_file = str(tmp_path / "explicit_d2.pth")
    convert_checkpoint_file(official_files[name], explicit_file, config)
    outputs = {}
    for label, weights in (("explicit", explicit_file), ("again", address + path)):
        if label == "again":
            no_conversion(monkeypatch)  # the download and its conversion of the command above
        args = default_argument_parser().parse_args(["--config-file", config, *opts, "DATASETS.TEST", "('one_raccoon_explicit',)", "MODEL.DEVICE", "cpu", "OUTPUT_DIR", str(tmp_path / label)])  # noqa: E501
        cfg = setup(args)
        model = Trainer.build_model(cfg)
        VFNetCheckpointer(model, strict=True).load(weights)
        Trainer.test(cfg, model)
        outputs[label] = tmp_path / label / "inference" / "coco_instances_results.json"
    cli = json.loads((tmp_path / "cli" / "inference" / "coco_instances_results.json").read_text())
    assert len(cli) > 0
    assert json.loads(outputs["explicit"].read_text()) == cli == json.loads(outputs["again"].read_text())
    assert requested == [path]


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """The MMDetection checkpoint of the small model of helpers.small_cfg."""
    return small_mmdet_file(str(tmp_path_factory.mktemp("small") / "vfnet_small.pth"))


def test_a_truncated_download_is_refused_naming_it_and_nothing_is_cached(small_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    www = tmp_path / "www"
    path = serve(www, "https://example.org/cut/vfnet_small.pth", small_file)
    with http_server(www, truncated=[path]) as (address, _):
        with pytest.raises(OSError, match=f"Cannot download '{address + path}': .*retrieval incomplete: got only"):
            VFNetCheckpointer(build_model(small_cfg())).load(address + path)
    left = [f for _, _, files in os.walk(tmp_path / "cache") for f in files if not f.endswith(".lock")]
    assert left == []


def test_a_download_that_is_not_a_checkpoint_is_refused_naming_it_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    www = tmp_path / "www"
    (www / "wrong").mkdir(parents=True)
    (www / "wrong" / "vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth").write_bytes(b"<html>a sharing page</html>")
    with http_server(www) as (address, _):
        url = f"{address}/wrong/vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth"
        with pytest.raises(ConversionError, match=f"(?s)Cannot read the checkpoint downloaded from '{url}'.*truncated.*The download is removed"):
            VFNetCheckpointer(build_model(small_cfg())).load(url)
    assert [f for _, _, files in os.walk(tmp_path / "cache") for f in files if not f.endswith(".lock")] == []


def test_a_checkpoint_of_neither_kind_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    www = tmp_path / "www"
    (www / "other").mkdir(parents=True)
    torch.save({"encoder.weight": torch.zeros(2)}, www / "other" / "weights.pth")
    with http_server(www) as (address, _):
        url = f"{address}/other/weights.pth"
        with pytest.raises(CheckpointError, match=f"Checkpoint '{url}' \\(file .*weights.pth'\\) is neither a Detectron2 checkpoint .* nor an MMDetection checkpoint"):  # noqa: E501
            VFNetCheckpointer(build_model(small_cfg())).load(url)
    with pytest.raises(CheckpointError, match=f"Checkpoint '{www / 'other' / 'weights.pth'}' is neither"):
        VFNetCheckpointer(build_model(small_cfg())).load(str(www / "other" / "weights.pth"))


def test_a_local_mmdet_file_loads_converted_and_must_fit_the_model(small_file, tmp_path):
    model = build_model(small_cfg())
    VFNetCheckpointer(model, strict=True).load(small_file)
    torch.manual_seed(0)
    reference = build_model(small_cfg()).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert os.listdir(os.path.dirname(small_file)) == ["vfnet_small.pth"]  # nothing written beside it
    with pytest.raises(CheckpointError, match=f"(?s)Checkpoint '{small_file}', an MMDetection checkpoint \\(vfnet\\) converted on load, does not fit the model .*shape mismatch: head.cls_score.weight"):  # noqa: E501
        VFNetCheckpointer(build_model(small_cfg("MODEL.VFNET.NUM_CLASSES", "5"))).load(small_file)


# --------------------------------------------------------------------------- DDP ranks

CHILD = r"""
import hashlib, logging, os, sys, time
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
sys.path.insert(0, sys.argv[1])
from detectron2.modeling import build_model
from helpers import small_cfg
from vfnet.checkpoint import mmdet_checkpoint
from vfnet.checkpoint.detection_checkpoint import VFNetCheckpointer
save = mmdet_checkpoint.save_converted
def slow_save(*args, **kwargs):  # a conversion that lasts: the other rank comes meanwhile
    time.sleep(1.5)
    save(*args, **kwargs)
mmdet_checkpoint.save_converted = slow_save
model = build_model(small_cfg())
open(sys.argv[3] + ".ready", "w").close()
deadline = time.time() + 120
while not os.path.exists(sys.argv[4]):
    assert time.time() < deadline, "never told to go"
    time.sleep(0.01)
VFNetCheckpointer(model).load(sys.argv[2])
digest = hashlib.sha256()
for k, v in sorted(model.state_dict().items()):
    digest.update(k.encode() + v.numpy().tobytes())
print("weights", digest.hexdigest())
"""


def test_two_processes_loading_one_address_at_once_convert_it_once(small_file, tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    www, go = tmp_path / "www", tmp_path / "go"
    path = serve(www, "https://example.org/ranks/vfnet_small.pth", small_file)
    with http_server(www) as (address, requested):
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, os.path.join(ROOT, "tests"), address + path, str(tmp_path / f"rank{i}"), str(go)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            for i in range(2)
        ]  # fmt: skip
        deadline = time.time() + 120
        while not all(os.path.exists(tmp_path / f"rank{i}.ready") for i in range(2)):
            assert time.time() < deadline and all(r.poll() is None for r in ranks), [r.communicate() for r in ranks]
            time.sleep(0.05)
        go.touch()  # both load now
        outputs = [r.communicate(timeout=120) for r in ranks]
    assert [r.returncode for r in ranks] == [0, 0], outputs
    logs = "".join(out + err for out, err in outputs)
    assert logs.count("Converted the MMDetection checkpoint") == 1
    assert logs.count("the conversion cached in") == 1  # the other rank waited, then read it
    assert requested == [path]  # one download too (iopath's own lock)
    digests = {line for out, _ in outputs for line in out.splitlines() if line.startswith("weights ")}
    model = build_model(small_cfg())
    VFNetCheckpointer(model).load(small_file)
    expected = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        expected.update(k.encode() + v.numpy().tobytes())
    assert digests == {f"weights {expected.hexdigest()}"}
