"""
The exported models in their runtimes (vfnet/export/runtime.py): onnxruntime and OpenVINO (ONNX
and OpenVINO's own format) give the eager model's detections on raccoon photographs of several
sizes, for the R-50, R-50-DCN and VFNet-X (soft-NMS) configs with random weights whose scores
spread; their COCO evaluation (`--run-eval`) equals the eager model's to the printed digits; a
list of images gives what each image gives alone; bad input is refused by name.
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
pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
ov = pytest.importorskip("openvino", reason="openvino is not installed")

from detectron2.data import DatasetCatalog, build_detection_test_loader  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import vfnet  # noqa: E402
from vfnet import export as E  # noqa: E402
from vfnet.export.api import evaluate_exported  # noqa: E402

from helpers import RACCOON_IMAGES, ROOT, assert_same_detections, copypaste_metrics  # noqa: E402
from helpers import load_config, spread_scores  # noqa: E402
from helpers import export_torchvision_star_deform_conv, star_inputs  # noqa: E402

MIN_SIZE, MAX_SIZE = 128, 192
SMALL_TEST = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.VFNET.NUM_CLASSES", "3",
    "MODEL.VFNET.DEFORM_CONV_IMPL", "sampling", "MODEL.VFNET.TEST_SCORE_THRESH", "0.85",
    "INPUT.MIN_SIZE_TEST", str(MIN_SIZE), "INPUT.MAX_SIZE_TEST", str(MAX_SIZE),
]  # fmt: skip
# The configs, as exported: R-50 (ONNX opset 17, no DeformConv), R-50-DCN (DeformConv, opset 19,
# modulated), VFNet-X (Res2Net-DCN, PAFPNX, soft-NMS after the graph; Res2Net-50 and 64 channels
# to keep it to seconds).
MODELS = {
    "R-50": ("VFNet_R_50_FPN_1x.yaml", []),
    "R-50-DCN": ("VFNet_R_50_DCN_FPN_MS_2x.yaml", []),
    "VFNet-X": ("VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml", [
        "MODEL.RESNETS.DEPTH", "50", "MODEL.PAFPNX.OUT_CHANNELS", "64", "MODEL.VFNET.TEST_SCORE_THRESH", "0.6",
    ]),
}
# A runtime and the file it runs: onnxruntime and OpenVINO on the ONNX graph, OpenVINO on its IR.
RUNS = [("onnxruntime", "model.onnx"), ("openvino", "model.onnx"), ("openvino", "model.xml")]


def assert_equal_detections(eager, exported, rtol=0.0):
    """
    The same detections in the graph's pixels: count, classes, boxes within 1e-3 px (+ `rtol`
    of the coordinate), scores within 1e-5; in any order among scores closer than that.
    """
    assert len(eager) == len(exported) > 0
    a, b = eager.pred_boxes.tensor, exported.pred_boxes.tensor
    # Each exported detection's eager one: the nearest box of its class.
    distance = (a[None] - b[:, None]).abs().amax(dim=2)
    distance[exported.pred_classes[:, None] != eager.pred_classes[None]] = float("inf")
    match = distance.argmin(dim=1)
    assert sorted(match.tolist()) == list(range(len(eager)))
    torch.testing.assert_close(b, a[match], rtol=rtol, atol=1e-3)
    torch.testing.assert_close(exported.scores, eager.scores[match], rtol=0, atol=1e-5)


def raccoons(n):
    paths = sorted(glob.glob(os.path.join(RACCOON_IMAGES, "*.jpg")))[:n]
    if len(paths) < n:
        pytest.skip(f"the raccoon images are not at {RACCOON_IMAGES}")
    return paths


def model_cfg(name, *opts):
    config, extra = MODELS[name]
    return load_config(config, *SMALL_TEST, *extra, *opts)


class Exported:
    """A model of MODELS with random weights, exported to ONNX and OpenVINO in `folder`."""

    def __init__(self, name, folder):
        torch.manual_seed(0)
        self.cfg = model_cfg(name)
        self.model = spread_scores(build_model(self.cfg)).eval()
        self.format = self.cfg.INPUT.FORMAT
        sample = cv2.imread(raccoons(1)[0])
        x = E.resize_for_test(sample, MIN_SIZE, MAX_SIZE, self.format)
        self.opset = E.export_onnx(self.model, x, str(folder / "model.onnx"))
        E.save_openvino(str(folder / "model.onnx"), str(folder / "model.xml"))
        self.folder = folder
        self.predictors = {}

    def predictor(self, runtime, file, min_size=MIN_SIZE, max_size=MAX_SIZE, **kwargs):
        """An ExportedPredictor of `file` in `runtime`, opened once."""
        key = (runtime, file, min_size, max_size, tuple(sorted(kwargs.items())))
        if key not in self.predictors:
            path = str(self.folder / file)
            self.predictors[key] = E.ExportedPredictor(path, min_size, max_size, self.format, runtime=runtime, **kwargs)
        return self.predictors[key]

    def eager(self, inputs):
        """The eager model's detections, one image at a time (a batch pads them to one size)."""
        with torch.no_grad():
            return [self.model([x])[0]["instances"] for x in inputs]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The exported models, each exported once when a test first asks for it."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Exported(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


# -------------------------------------------------------------------------------------------------
# The graphs in OpenVINO


def test_openvino_runs_onnx_deformconv_as_torchvision_computes_it(tmp_path):
    """OpenVINO's ONNX frontend has no DeformConv: the runtime's conversion rule, both kinds."""
    for modulated in (False, True):
        path = str(tmp_path / f"dcn{int(modulated)}.onnx")
        module = export_torchvision_star_deform_conv(path, modulated)
        with pytest.raises(RuntimeError, match="DeformConv"):  # OpenVINO alone
            ov.Core().read_model(path)
        compiled = E.openvino_core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        for h, w in [(7, 9), (5, 12)]:
            x, d = star_inputs(h, w)
            out = compiled([x.numpy(), d.numpy()])[0]
            np.testing.assert_allclose(out, module(x, d).detach().numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_models_match_eager_in_every_runtime_at_several_sizes(exported, name):
    m = exported(name)
    assert m.opset == (17 if name == "R-50" else 19)  # DeformConv in the DCN backbones
    images = [cv2.imread(p) for p in raccoons(3)[1:]]  # not the traced one: portrait, landscape
    for min_size, max_size in [(MIN_SIZE, MAX_SIZE), (256, 384)]:
        inputs = [{"image": E.resize_for_test(image, min_size, max_size, m.format)} for image in images]
        eager = m.eager(inputs)
        for runtime, file in RUNS:
            predictor = m.predictor(runtime, file)
            assert predictor.post_processing == E.post_processing(m.model)
            for expected, out in zip(eager, predictor.inference(inputs)):
                assert_equal_detections(expected, out["instances"])


def test_r50_matches_eager_at_the_test_size_users_run(exported):
    """
    800 x 1333 (MIN_SIZE_TEST 800): tens of detections, boxes up to 1333 px, where float32 differs
    in its last bits between the runtimes' kernels: OpenVINO's boxes are within 3e-3 px there
    (5e-6 of the coordinate).
    """
    m = exported("R-50")
    predictors = [m.predictor("onnxruntime", "model.onnx", 800, 1333), m.predictor("openvino", "model.xml", 800, 1333)]
    x = {"image": predictors[0].test_input(cv2.imread(raccoons(3)[2]))["image"]}
    assert x["image"].shape[1:] == (800, 1333)
    eager = m.eager([x])[0]
    assert len(eager) > 30
    for predictor in predictors:
        assert_equal_detections(eager, predictor.inference([x])[0]["instances"], rtol=5e-6)


def test_openvino_runs_f32_unless_asked_for_bf16(exported):
    """OpenVINO's CPU default is bf16 where the CPU has it (Xeons with AMX, EPYCs with AVX512-BF16)."""
    core = E.openvino_core()
    has_bf16 = "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert (core.get_property("CPU", "INFERENCE_PRECISION_HINT") == ov.Type.bf16) == has_bf16
    m = exported("R-50")
    for precision, expected in [("f32", ov.Type.f32), ("bf16", ov.Type.bf16 if has_bf16 else ov.Type.f32)]:
        compiled = m.predictor("openvino", "model.xml", precision=precision).runtime.compiled
        assert compiled.get_property("INFERENCE_PRECISION_HINT") == expected


# In a child process: signals after OpenVINO models were closed in any order.
SIGNAL_AFTER_CLOSING = """
import gc, signal, subprocess, sys
from vfnet.export import open_runtime

first, second = open_runtime(sys.argv[1], "openvino"), open_runtime(sys.argv[1], "openvino")
del first; gc.collect()  # first in, first out
del second; gc.collect()
signal.signal(signal.SIGCHLD, lambda *args: print("handled SIGCHLD"))  # as torch's DataLoader does
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("done")
"""


def test_models_closed_in_any_order_leave_signal_handlers_working(exported):
    """
    OpenVINO's CPU plugin swaps the compiling thread's alternate signal stack per Core and puts
    the old one back when the Core goes: with a Core per model, two models closed first-in-first-out
    left it on freed memory, and the next Python signal handler (SIGCHLD when a child process
    ended) killed the process with SIGSEGV (the pytest process of the whole suite, at a
    subprocess.run). One Core for the process (`openvino_core`).
    """
    m = exported("R-50")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_CLOSING, str(m.folder / "model.xml")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert proc.stdout.split() == ["handled", "SIGCHLD", "done"]


# -------------------------------------------------------------------------------------------------
# Lists of images


@pytest.mark.parametrize("runtime, streams", [("onnxruntime", None), ("openvino", 2)])
def test_a_list_of_images_gives_what_each_image_gives_alone(exported, runtime, streams):
    """One after the other in onnxruntime, two at once in OpenVINO's streams."""
    m = exported("VFNet-X")
    predictor = m.predictor(runtime, "model.onnx" if runtime == "onnxruntime" else "model.xml", num_streams=streams)
    images = [cv2.imread(p) for p in raccoons(3)]
    batch = predictor.batch(images)
    assert len(batch) == len(images)
    for image, out in zip(images, batch):
        alone = predictor(image)["instances"]
        assert out["instances"].image_size == image.shape[:2]
        assert torch.equal(alone.pred_boxes.tensor, out["instances"].pred_boxes.tensor)
        assert torch.equal(alone.scores, out["instances"].scores)


# -------------------------------------------------------------------------------------------------
# COCO evaluation of the exported models (--run-eval)


@pytest.fixture(scope="module")
def pseudo_dataset(tmp_path_factory, exported):
    """
    Six raccoon photographs labelled with the R-50's eager detections, every other one kept and
    moved by 2.5% to 32.5% of its width: an AP well inside (0, 100) that moves with any box or score
    the exported model gets wrong.
    """
    root = tmp_path_factory.mktemp("pseudo")
    m = exported("R-50")
    paths = raccoons(6)
    predictor = m.predictor("onnxruntime", "model.onnx")
    images, annotations = [], []
    for i, path in enumerate(paths):
        inst = m.eager([predictor.test_input(cv2.imread(path))])[0]
        h, w = inst.image_size
        images.append({"id": i + 1, "file_name": os.path.basename(path), "height": h, "width": w})
        for j, (box, cls) in enumerate(zip(inst.pred_boxes.tensor.tolist(), inst.pred_classes.tolist())):
            if j % 2:
                continue
            x0, y0, x1, y1 = box
            # IoUs with its detection (also 1 - f where the box is clipped at the border) far
            # from COCO's thresholds 0.5, 0.55, ..., 0.95.
            shift = (0.025 + 0.1 * (j // 2 % 4)) * (x1 - x0)
            bbox = [x0 + shift, y0, x1 - x0, y1 - y0]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})  # fmt: skip
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(3)]
    with open(root / "pseudo.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    spec = f"vfnet_raccoon_pseudo={root / 'pseudo.json'}:{RACCOON_IMAGES}"
    if "vfnet_raccoon_pseudo" not in DatasetCatalog.list():
        vfnet.register_coco_dataset(spec)
    return spec


def eval_cfg(name):
    return model_cfg(name, "DATASETS.TEST", "('vfnet_raccoon_pseudo',)", "DATALOADER.NUM_WORKERS", "0")


def printed(metrics):
    """
    The bbox metrics as Detectron2's print_csv_format prints them. (COCO's AP ranks each class's
    detections of all images by score: exported scores within 1e-5 of the eager ones keep that
    order unless two of them score closer than that; the labels' IoUs are away from COCO's
    thresholds, so that boxes within 1e-3 px match the same labels.)
    """
    return {k: f"{v:.4f}" for k, v in metrics["bbox"].items()}


@pytest.fixture(scope="module")
def eager_ap(exported, pseudo_dataset, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cfg = eval_cfg(name)
            loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
            evaluator = COCOEvaluator(cfg.DATASETS.TEST[0], output_dir=str(tmp_path_factory.mktemp("eager_eval")))
            cache[name] = inference_on_dataset(exported(name).model, loader, evaluator)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(MODELS))
def test_coco_evaluation_of_each_exported_model_equals_the_eager_models(exported, eager_ap, name, tmp_path):
    m, expected = exported(name), printed(eager_ap(name))
    if name == "R-50":
        assert 20 < float(expected["AP"]) < 90
    for runtime, file in RUNS:
        metrics = evaluate_exported(eval_cfg(name), m.predictor(runtime, file), str(tmp_path / runtime))
        assert printed(metrics) == expected, (runtime, file)


def test_export_tool_openvino_with_run_eval(exported, eager_ap, pseudo_dataset, tmp_path):
    """One command: tools/export_model.py --format openvino --run-eval, then ExportedPredictor."""
    m = exported("R-50")
    weights = tmp_path / "weights.pth"
    torch.save({"model": m.model.state_dict()}, weights)
    out = tmp_path / "exported"
    config, extra = MODELS["R-50"]
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "export_model.py"),
        "--config-file", os.path.join(ROOT, "configs", config), "--format", "openvino",
        "--output", str(out), "--run-eval", "--dataset", pseudo_dataset,
        *SMALL_TEST, *extra, "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", "('vfnet_raccoon_pseudo',)",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    expected = printed(eager_ap("R-50"))
    assert copypaste_metrics(proc.stdout + proc.stderr) == ",".join(expected[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl"))
    assert {"export_info.json", "model.bin", "model.xml"} <= set(os.listdir(out))
    assert "model.onnx" not in os.listdir(out)
    info = json.load(open(out / "export_info.json"))
    assert (info["format"], info["file"], info["onnx_opset"]) == ("openvino", "model.xml", 17)
    predictor = E.ExportedPredictor(str(out / "model.xml"))
    assert predictor.runtime.name == "openvino" and predictor.min_size_test == MIN_SIZE
    image = cv2.imread(raccoons(2)[1])
    x = predictor.test_input(image)
    # The boxes within 1e-3 px of the graph's 128-192 px input: 1.4e-3 px of the image on an AMD
    # EPYC (Zen 3, AVX2), where OpenVINO's kernels round differently than on AVX-512.
    assert_same_detections(m.eager([x])[0], predictor(image)["instances"], input_size=x["image"].shape[1:])


# -------------------------------------------------------------------------------------------------
# Bad input


def test_bad_runtime_files_and_missing_packages_are_named(exported, tmp_path, monkeypatch):
    m = exported("R-50")
    onnx_path = str(m.folder / "model.onnx")
    with pytest.raises(ValueError, match="Unknown runtime 'tensorrt'.*onnxruntime"):
        E.open_runtime(onnx_path, "tensorrt")
    with pytest.raises(ValueError, match="'torchscript' cannot run .*model.onnx"):
        E.open_runtime(onnx_path, "torchscript")
    with pytest.raises(ValueError, match="model.pt: expected a file ending in"):
        E.open_runtime(str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="Unknown OpenVINO precision 'fp16'"):
        E.open_runtime(onnx_path, "openvino", precision="fp16")
    xml = tmp_path / "lonely.xml"
    xml.write_bytes((m.folder / "model.xml").read_bytes())
    with pytest.raises(FileNotFoundError, match="lonely.xml needs its weights .*lonely.bin"):
        E.ExportedPredictor(str(xml))
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(ImportError, match="pip install openvino"):
        E.ExportedPredictor(onnx_path, runtime="openvino")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="model.onnx with onnxruntime .*pip install onnxruntime"):
        E.ExportedPredictor(onnx_path)
