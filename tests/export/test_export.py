"""
Export to TorchScript and ONNX (vfnet/export.py, tools/export_model.py): the deformable-conv
mappings, and the exported models' detections against the eager model's, with a small
random-init model whose scores spread (so that it detects things).
"""
import glob
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
from detectron2.modeling import build_model  # noqa: E402

import vfnet  # noqa: E402
from vfnet import export as E  # noqa: E402
from vfnet.export.tracing import _quiet_tracing as quiet_tracing  # noqa: E402

from helpers import BASE_CONFIG, RACCOON_IMAGES, ROOT  # noqa: E402
from helpers import assert_same_detections, eager_predictions, spread_scores  # noqa: E402
from helpers import SMALL as SMALL_MODEL  # noqa: E402
from helpers import StarDeformConv, export_torchvision_star_deform_conv, star_inputs  # noqa: E402
from helpers import small_cfg as small_model_cfg  # noqa: E402

EXPORT_OPTS = [
    # DCNv2 last tower convs too: the exported graphs hold modulated deformable convs as well.
    "MODEL.VFNET.DCN_ON_LAST_CONV", "True",
    "MODEL.VFNET.TEST_SCORE_THRESH", "0.6",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "192",
]  # fmt: skip
SMALL = SMALL_MODEL + EXPORT_OPTS
MIN_SIZE, MAX_SIZE = 128, 192


def onnx_modules():
    onnx = pytest.importorskip("onnx", reason="onnx is not installed")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    return onnx, ort


def small_cfg(*opts):
    return small_model_cfg(*EXPORT_OPTS, *opts)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = spread_scores(build_model(small_cfg()))
    path = tmp_path_factory.mktemp("export_ckpt")
    DetectionCheckpointer(model, save_dir=str(path)).save("random")
    return str(path / "random.pth")


def load_model(checkpoint, impl):
    model = build_model(small_cfg("MODEL.VFNET.DEFORM_CONV_IMPL", impl))
    DetectionCheckpointer(model).load(checkpoint)
    return model.eval()


# -------------------------------------------------------------------------------------------------
# The deformable convolutions alone
# -------------------------------------------------------------------------------------------------


def run_onnx(ort, path, inputs):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]


@pytest.mark.parametrize("modulated", [False, True], ids=["dcn", "dcnv2"])
def test_torchvision_deform_conv_exports_to_onnx_deformconv(tmp_path, modulated):
    onnx, ort = onnx_modules()
    path = str(tmp_path / "dcn.onnx")
    module = export_torchvision_star_deform_conv(path, modulated)
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == 1 and len(nodes[0].input) == (5 if modulated else 4)
    attrs = {a.name: list(a.ints) or a.i for a in nodes[0].attribute}
    assert attrs["pads"] == [1, 1, 1, 1] and attrs["strides"] == [1, 1] and attrs["dilations"] == [1, 1]
    for h, w in [(7, 9), (5, 12)]:  # dynamic sizes
        x, d = star_inputs(h, w)
        expected = module(x, d).detach().numpy()
        np.testing.assert_allclose(run_onnx(ort, path, (x, d)), expected, rtol=0, atol=1e-4)


def test_sampling_deform_conv_exports_to_plain_onnx_ops(tmp_path):
    onnx, ort = onnx_modules()
    module = StarDeformConv("sampling", True).eval()
    path = str(tmp_path / "sampling.onnx")
    x, d = star_inputs()
    with quiet_tracing():
        torch.onnx.export(module, (x, d), path, dynamo=False, opset_version=E.DEFAULT_ONNX_OPSET)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"GridSample", "MatMul"} <= ops and "DeformConv" not in ops
    reference = StarDeformConv("torchvision", True).eval()
    np.testing.assert_allclose(run_onnx(ort, path, (x, d)), reference(x, d).detach().numpy(), rtol=0, atol=1e-4)


def test_deform_conv_translation_table_for_the_dynamo_exporter(tmp_path):
    onnx, ort = onnx_modules()
    pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's) is not installed")
    module = StarDeformConv("torchvision", True).eval()
    path = str(tmp_path / "dynamo.onnx")
    x, d = star_inputs()
    program = torch.onnx.export(
        module, (x, d), dynamo=True, opset_version=19, verbose=False,
        custom_translation_table=E.deform_conv_onnx_translation_table(),
    )  # fmt: skip
    program.save(path)
    assert "DeformConv" in {n.op_type for n in onnx.load(path).graph.node}
    np.testing.assert_allclose(run_onnx(ort, path, (x, d)), module(x, d).detach().numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("impl", ["detectron2", "gather", "auto"])
def test_untraceable_deform_conv_kernels_are_refused(impl, tmp_path):
    # "auto" is "gather" on the CPU: its chunk loop depends on the input size.
    model = build_model(small_cfg("MODEL.VFNET.DEFORM_CONV_IMPL", impl)).eval()
    expected = "detectron2" if impl == "detectron2" else "gather"
    with pytest.raises(ValueError, match=f"'{expected}'.*DEFORM_CONV_IMPL"):
        E.export_torchscript(model, torch.zeros(3, 64, 64))
    assert E.set_deform_conv_impl(model, "torchvision") == 4  # 2 star convs + 2 DCNv2 tower convs
    with pytest.raises(ValueError, match="opset"):
        E.export_onnx(model, torch.zeros(3, 64, 64), str(tmp_path / "m.onnx"), opset_version=17)


# -------------------------------------------------------------------------------------------------
# Whole models on real images
# -------------------------------------------------------------------------------------------------


def raccoon_images():
    paths = sorted(glob.glob(os.path.join(RACCOON_IMAGES, "*.jpg")))[:4]
    if len(paths) < 4:
        pytest.skip(f"the raccoon images are not at {RACCOON_IMAGES}")
    return [cv2.imread(p) for p in paths]


@pytest.mark.parametrize(
    "fmt, impl",
    [("torchscript", "sampling"), ("onnx", "sampling"), ("onnx", "torchvision")],
)
def test_exported_model_matches_eager_on_real_images(checkpoint, tmp_path, fmt, impl):
    if fmt == "onnx":
        onnx, _ = onnx_modules()
    images = raccoon_images()
    model = load_model(checkpoint, impl)
    path = str(tmp_path / ("model.ts" if fmt == "torchscript" else "model.onnx"))
    # Traced on one image, run on three others of other sizes and aspect ratios.
    sample = E.resize_for_test(images[0], MIN_SIZE, MAX_SIZE)
    if fmt == "torchscript":
        E.export_torchscript(model, sample, path)
    else:
        opset = E.export_onnx(model, sample, path)
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert opset == (19 if impl == "torchvision" else 17)
        assert ("DeformConv" in ops) == (impl == "torchvision")
    predictor = E.ExportedPredictor(path, min_size_test=MIN_SIZE, max_size_test=MAX_SIZE)
    sizes = set()
    for image in images[1:]:
        eager = eager_predictions(model, image)
        exported = predictor(image)["instances"]
        assert exported.image_size == image.shape[:2]
        assert_same_detections(eager, exported)
        sizes.add(E.resize_for_test(image, MIN_SIZE, MAX_SIZE).shape)
    assert len(sizes) > 1


def test_dcn_backbone_exports_to_onnx_deformconv(tiny_dataset, tmp_path):
    """The DCN configs: modulated deformable convs in res3-res5 (torchvision's on the CPU)."""
    onnx, _ = onnx_modules()
    torch.manual_seed(0)
    cfg = small_cfg(
        "MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]",
        "MODEL.RESNETS.DEFORM_MODULATED", "True", "MODEL.VFNET.DEFORM_CONV_IMPL", "sampling",
    )  # fmt: skip
    model = spread_scores(build_model(cfg)).eval()
    assert E.deform_conv_impls(model) == {"sampling", "torchvision"}
    path = str(tmp_path / "model.onnx")
    sample, image = (cv2.imread(str(tiny_dataset / f"img{i}.png")) for i in range(2))
    assert E.export_onnx(model, E.resize_for_test(sample, MIN_SIZE, MAX_SIZE), path) == 19
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("DeformConv") == 13 and "GridSample" in ops  # 4 + 6 + 3 blocks; the head
    predictor = E.ExportedPredictor(path, min_size_test=MIN_SIZE, max_size_test=MAX_SIZE)
    assert_same_detections(eager_predictions(model, image), predictor(image)["instances"])


# -------------------------------------------------------------------------------------------------
# vfnet.export.export_model and tools/export_model.py
# -------------------------------------------------------------------------------------------------

TOOL = os.path.join(ROOT, "tools", "export_model.py")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Two synthetic images with one box each, as a COCO-format dataset."""
    root = tmp_path_factory.mktemp("export_data")
    rng = np.random.RandomState(0)
    images, annotations = [], []
    for i, (h, w) in enumerate([(120, 180), (150, 110)]):
        image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        image[20:70, 30:90] = (40, 180, 220)
        cv2.imwrite(str(root / f"img{i}.png"), image)
        images.append({"id": i + 1, "file_name": f"img{i}.png", "height": h, "width": w})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [30, 20, 60, 50], "area": 3000, "iscrowd": 0})
    categories = [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "star"}]
    with open(root / "tiny.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_model_tool(checkpoint, tiny_dataset, tmp_path, fmt):
    if fmt == "onnx":
        onnx_modules()
    out = tmp_path / "exported"
    dataset = f"vfnet_tiny_export={tiny_dataset / 'tiny.json'}:{tiny_dataset}"
    opts = [*SMALL, "MODEL.WEIGHTS", checkpoint, "DATASETS.TEST", "('vfnet_tiny_export',)"]
    if fmt == "torchscript":  # the tool's command line
        argv = [
            "--config-file", BASE_CONFIG, "--format", fmt, "--output", str(out),
            "--sample-image", str(tiny_dataset / "img0.png"), "--dataset", dataset, *opts,
        ]  # fmt: skip
        run = subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
    else:  # what the tool runs, with --run-eval: its metrics are returned
        vfnet.register_coco_dataset(dataset)
        cfg = E.setup_cfg(BASE_CONFIG, opts, "sampling")
        result = E.export_model(cfg, str(out), fmt, str(tiny_dataset / "img0.png"), run_eval=True)

    filename = "model.ts" if fmt == "torchscript" else "model.onnx"
    assert os.path.isfile(out / filename)
    with open(out / "export_info.json") as f:
        info = json.load(f)
    assert info["file"] == filename and info["outputs"] == ["boxes", "classes", "scores", "image_size"]
    assert info["class_names"] == ["box", "disc", "star"]
    assert (info["min_size_test"], info["max_size_test"], info["input_format"]) == (MIN_SIZE, MAX_SIZE, "BGR")
    assert info["deform_conv"] == "sampling" and info["deform_conv_kernels"] == ["sampling"]
    if fmt == "onnx":
        assert info["onnx_opset"] == 17
        assert "bbox" in result and "AP" in result["bbox"]

    # The exported model reads its test resize from export_info.json.
    predictor = E.ExportedPredictor(str(out / filename))
    model = load_model(checkpoint, "sampling")
    image = cv2.imread(str(tiny_dataset / "img1.png"))
    assert_same_detections(eager_predictions(model, image), predictor(image)["instances"])
