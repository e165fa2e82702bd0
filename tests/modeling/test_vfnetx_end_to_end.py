"""
VFNet-X end to end, as a user runs it: tools/train_net.py with configs/VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml
(its whole train pipeline: relative RandomCrop, range resize, CutOut, flip; Res2Net-DCN under the
PAFPNX neck, soft-NMS) on a tiny shapes dataset, `--eval-only` on its checkpoint, and the export
(tools/export_model.py; TorchScript and ONNX in process), whose soft-NMS runs outside the graph:
the exported model's detections must still be the eager model's on images it was not traced on.
Small widths and sizes (Res2Net-50, 64-channel PAFPNX) keep it to seconds on the CPU.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
cv2 = pytest.importorskip("cv2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import vfnet  # noqa: E402
from vfnet import export as E  # noqa: E402
from vfnet.data.shapes import generate_split  # noqa: E402
from vfnet.layers.soft_nms import batched_soft_nms  # noqa: E402

from helpers import ROOT  # noqa: E402
from helpers import assert_same_detections, eager_predictions, spread_scores  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml")
TINY_X = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "50",
    "MODEL.PAFPNX.OUT_CHANNELS", "64", "MODEL.VFNET.DEFORM_CONV_IMPL", "sampling",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
]  # fmt: skip


def tiny_x_cfg(*opts):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list([*TINY_X, "MODEL.VFNET.NUM_CLASSES", "3", *opts])
    return cfg


def images():
    """Three images of different sizes and aspect ratios with the same coloured box."""
    rng = np.random.RandomState(0)
    out = []
    for h, w in [(120, 180), (150, 110), (200, 140)]:
        image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        image[20:70, 30:90] = (40, 180, 220)
        out.append(image)
    return out


@pytest.fixture(scope="module")
def tiny_x():
    torch.manual_seed(0)
    return spread_scores(build_model(tiny_x_cfg())).eval()


def test_exported_graph_leaves_soft_nms_out_and_the_predictor_applies_it(tiny_x):
    spec = E.post_processing(tiny_x)
    assert spec == {"type": "soft_nms", "iou_threshold": 0.65, "method": "linear", "sigma": 0.5,
                    "min_score": 0.001, "detections_per_image": 100}  # fmt: skip
    image = E.resize_for_test(images()[1], 128, 192, "RGB")
    candidates = tiny_x.inference_candidates([{"image": image}])[0]
    # What the predictor applies is the soft-NMS of the candidates, computed here directly.
    keep, scores = batched_soft_nms(
        candidates.pred_boxes.tensor, candidates.scores, candidates.pred_classes, 0.65,
        max_num=100, method="linear", sigma=0.5, min_score=0.001,
    )  # fmt: skip
    assert len(candidates) > len(keep) == 100
    # The soft-NMS acts: it decays (out of the top 100) candidates among the 100 best-scored.
    top = set(candidates.scores.topk(100).indices.tolist())
    assert len(top - set(keep.tolist())) > 10
    applied = E.apply_post_processing(candidates, spec)
    assert torch.equal(applied.pred_boxes.tensor, candidates.pred_boxes.tensor[keep])
    assert torch.equal(applied.scores, scores)
    # ... and that is the eager model's inference.
    with torch.no_grad():
        eager = tiny_x([{"image": image}])[0]["instances"]
    assert torch.equal(eager.pred_boxes.tensor, applied.pred_boxes.tensor)
    assert torch.equal(eager.scores, applied.scores)
    with pytest.raises(ValueError, match="'nms_v9'.*vfnet_post_processing.json"):
        E.apply_post_processing(candidates, {**spec, "type": "nms_v9"})


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_vfnetx_matches_eager_on_other_images(tiny_x, tmp_path, fmt):
    sample, *others = images()
    x = E.resize_for_test(sample, 128, 192, "RGB")
    if fmt == "torchscript":
        path = str(tmp_path / "model.ts")
        E.export_torchscript(tiny_x, x, path)
    else:
        onnx = pytest.importorskip("onnx", reason="onnx is not installed")
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
        path = str(tmp_path / "model.onnx")
        assert E.export_onnx(tiny_x, x, path) == 19  # the backbone's DCNv2: DeformConv
        meta = {p.key: p.value for p in onnx.load(path).metadata_props}
        assert json.loads(meta[E.POST_PROCESSING_KEY]) == E.post_processing(tiny_x)
    predictor = E.ExportedPredictor(path, min_size_test=128, max_size_test=192, input_format="RGB")
    assert predictor.post_processing == E.post_processing(tiny_x)
    for image in others:
        exported = predictor(image)["instances"]
        assert_same_detections(eager_predictions_rgb(tiny_x, image), exported)
        assert len(exported) == 100


def eager_predictions_rgb(model, image_bgr):
    """`eager_predictions` for a model of INPUT.FORMAT RGB (the VFNet-X config)."""
    return eager_predictions(model, np.ascontiguousarray(image_bgr[:, :, ::-1]))


# ------------------------------------------------------------------------------ the tools
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes_x")
    for split, n in (("train", 4), ("val", 2)):
        generate_split(str(root), split, n, seed=5, image_size=(64, 96))
    return root


def run_tool(tool, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "tools", tool), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def dataset_args(root):
    return ["--dataset", f"shapes_x_train={root / 'train.json'}:{root / 'train'}",
            "--dataset", f"shapes_x_val={root / 'val.json'}:{root / 'val'}"]  # fmt: skip


SHAPES_OPTS = [
    *TINY_X, "MODEL.VFNET.NUM_CLASSES", "4",
    "DATASETS.TRAIN", "('shapes_x_train',)", "DATASETS.TEST", "('shapes_x_val',)",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96",
    "TEST.GALLERY.NUM_IMAGES", "0", "SEED", "7",
]  # fmt: skip


def test_train_net_trains_evaluates_and_exports_vfnetx(shapes, tmp_path):
    train = tmp_path / "train"
    run_tool(
        "train_net.py", "--config-file", CONFIG, *dataset_args(shapes), *SHAPES_OPTS,
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2",
        "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1,)",
        "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.MAX_SIZE_TRAIN_RANGE", "(96, 120)",
        "INPUT.CROP.PROB", "1.0", "INPUT.CUTOUT.PROB", "1.0", "OUTPUT_DIR", str(train),
    )  # fmt: skip
    weights = train / "model_final.pth"
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1
    assert "backbone.pafpn_convs.0.conv.weight" in ckpt["model"]
    assert "backbone.bottom_up.res3.0.conv2.0.weight" in ckpt["model"]
    assert "total_loss" in open(train / "metrics.json").readline()

    log = run_tool(
        "train_net.py", "--config-file", CONFIG, "--eval-only", *dataset_args(shapes),
        *SHAPES_OPTS, "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval"),
    )  # fmt: skip
    assert "copypaste: AP" in log
    assert os.path.isfile(tmp_path / "eval" / "inference" / "coco_instances_results.json")

    # Two iterations leave every score near the prior (0.01): export with a lower score threshold.
    low = ["MODEL.VFNET.TEST_SCORE_THRESH", "0.005"]
    out = tmp_path / "exported"
    val = sorted((shapes / "val").glob("*.png"))
    run_tool(
        "export_model.py", "--config-file", CONFIG, "--format", "torchscript", "--output", str(out),
        "--sample-image", str(val[0]), *dataset_args(shapes), *SHAPES_OPTS, *low,
        "MODEL.WEIGHTS", str(weights),
    )  # fmt: skip
    info = json.load(open(out / "export_info.json"))
    assert info["post_processing"]["type"] == "soft_nms" and info["input_format"] == "RGB"
    predictor = E.ExportedPredictor(str(out / "model.ts"))
    assert predictor.post_processing == info["post_processing"]
    assert (predictor.min_size_test, predictor.max_size_test) == (64, 96)
    model = build_model(tiny_x_cfg("MODEL.VFNET.NUM_CLASSES", "4", *low)).eval()
    DetectionCheckpointer(model).load(str(weights))
    image = cv2.imread(str(val[1]))
    exported = predictor(image)["instances"]
    h, w = image.shape[:2]
    x = E.resize_for_test(image, 64, 96, "RGB")
    with torch.no_grad():
        eager = model([{"image": x, "height": h, "width": w}])[0]["instances"]
    assert_same_detections(eager, exported)
