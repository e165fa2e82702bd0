"""demo/demo.py and Detectron2's DefaultPredictor with VFNet configs, on the CPU with a small model."""
import importlib.util
import json
import os
import numpy as np
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
cv2 = pytest.importorskip("cv2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Instances  # noqa: E402


from helpers import BASE_CONFIG, ROOT  # noqa: E402
from helpers import SMALL as SMALL_MODEL  # noqa: E402
from helpers import small_cfg as small_model_cfg  # noqa: E402

DEMO_OPTS = ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
SMALL = SMALL_MODEL + DEMO_OPTS
# Category ids out of order: the class names follow the ids (load_coco_json's contiguous ids).
CATEGORIES = [{"id": 1, "name": "raccoon"}, {"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
CLASS_NAMES = ["raccoon", "dog", "cat"]


def load_demo():
    spec = importlib.util.spec_from_file_location("vfnet_demo", os.path.join(ROOT, "demo", "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_cfg(*opts):
    return small_model_cfg(*DEMO_OPTS, *opts)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random-init checkpoint whose scores spread around 0.5, and a tiny COCO dataset of 2 images."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = build_model(small_cfg())
    torch.nn.init.normal_(model.head.cls_score.weight, std=0.05)
    torch.nn.init.zeros_(model.head.cls_score.bias)
    DetectionCheckpointer(model, save_dir=str(root)).save("random")

    images = root / "images"
    images.mkdir()
    rng = np.random.RandomState(0)
    entries = []
    for i, (h, w) in enumerate([(48, 64), (60, 44)]):
        image = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 4 : h // 2, w // 4 : w // 2] = (30, 200, 30)
        cv2.imwrite(str(images / f"img{i}.png"), image)
        entries.append({"id": i + 1, "file_name": f"img{i}.png", "height": h, "width": w})
    (images / "notes.txt").write_text("not an image")
    with open(root / "tiny.json", "w") as f:
        json.dump({"images": entries, "annotations": [], "categories": CATEGORIES}, f)
    return root


def demo_args(workdir, *args):
    return [
        "--config-file", BASE_CONFIG,
        "--confidence-threshold", "0.3",
        "--dataset", f"vfnet_tiny_demo={workdir / 'tiny.json'}:{workdir / 'images'}",
        *args,
        "--opts", *SMALL,
        "MODEL.WEIGHTS", str(workdir / "random.pth"),
        "DATASETS.TEST", "('vfnet_tiny_demo',)",
        # Few boxes: drawing labelled boxes is the slow part.
        "MODEL.VFNET.TEST_DETECTIONS_PER_IMAGE", "4",
    ]  # fmt: skip


def test_default_predictor_returns_instances_in_the_original_size():
    torch.manual_seed(0)
    predictor = DefaultPredictor(small_cfg("MODEL.VFNET.TEST_SCORE_THRESH", "0.0"))
    image = np.random.RandomState(1).randint(0, 256, (90, 120, 3), dtype=np.uint8)
    out = predictor(image)
    inst = out["instances"]
    assert isinstance(inst, Instances)
    assert inst.image_size == (90, 120)
    assert 0 < len(inst) <= 100
    boxes = inst.pred_boxes.tensor
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 120).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 90).all()
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
    assert ((inst.pred_classes >= 0) & (inst.pred_classes < 3)).all()
    # Sorted by score, as NMS keeps them.
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])


def test_the_demos_predictor_loads_an_mmdetection_checkpoint_as_it_is(tmp_path):
    from helpers import small_mmdet_file

    load_demo()  # (puts demo/ on the path)
    from predictor import Predictor

    weights = small_mmdet_file(str(tmp_path / "vfnet_small.pth"))
    predictor = Predictor(small_cfg("MODEL.WEIGHTS", weights))
    torch.manual_seed(0)
    served = build_model(small_cfg()).state_dict()  # the weights of that file
    loaded = predictor.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in served.items() if not k.endswith("num_batches_tracked"))


def test_the_demos_predictor_takes_a_list_of_images():
    """One forward of frames of one size: each frame's detections are those it gets alone."""
    load_demo()  # (puts demo/ on the path)
    from predictor import Predictor

    torch.manual_seed(0)
    predictor = Predictor(small_cfg("MODEL.VFNET.TEST_SCORE_THRESH", "0.0"))
    frames = [np.random.RandomState(i).randint(0, 256, (90, 120, 3), dtype=np.uint8) for i in range(3)]
    batch = predictor.batch(frames)
    assert len(batch) == 3
    for frame, out in zip(frames, batch):
        alone = predictor(frame)["instances"]
        assert out["instances"].image_size == (90, 120) and len(alone) > 0
        torch.testing.assert_close(out["instances"].pred_boxes.tensor, alone.pred_boxes.tensor, rtol=0, atol=1e-3)
        torch.testing.assert_close(out["instances"].scores, alone.scores, rtol=0, atol=1e-5)


def test_expand_inputs(tmp_path):
    demo = load_demo()
    for name in ("b.jpg", "a.PNG", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert demo.expand_inputs([str(tmp_path)]) == [str(tmp_path / "a.PNG"), str(tmp_path / "b.jpg")]
    assert demo.expand_inputs([str(tmp_path / "*.jpg"), str(tmp_path / "c.txt")]) == [
        str(tmp_path / "b.jpg"),
        str(tmp_path / "c.txt"),
    ]
    assert demo.expand_inputs([str(tmp_path / "missing*.png")]) == []


def test_output_path(tmp_path):
    demo = load_demo()
    # One input and an image file name: that file; otherwise a folder, created.
    assert demo.output_path(str(tmp_path / "a" / "out.jpg"), "in/x.png", 1) == str(tmp_path / "a" / "out.jpg")
    assert demo.output_path(str(tmp_path / "b"), "in/x.png", 1) == str(tmp_path / "b" / "x.png")
    assert (tmp_path / "b").is_dir()
    assert demo.output_path(str(tmp_path / "c.jpg"), "in/x.png", 2) == str(tmp_path / "c.jpg" / "x.png")


def test_demo_draws_detections_with_the_dataset_class_names(workdir, tmp_path, monkeypatch):
    import detectron2.utils.visualizer as visualizer

    labels = []
    create_text_labels = visualizer._create_text_labels

    def recording(classes, scores, class_names, is_crowd=None):
        out = create_text_labels(classes, scores, class_names, is_crowd)
        labels.append((class_names, out))
        return out

    monkeypatch.setattr(visualizer, "_create_text_labels", recording)
    out_dir = tmp_path / "out"
    written = load_demo().main(demo_args(workdir, "--input", str(workdir / "images"), "--output", str(out_dir)))

    assert sorted(os.path.basename(p) for p in written) == ["img0.png", "img1.png"]
    for path in written:
        drawn = cv2.imread(path)
        original = cv2.imread(str(workdir / "images" / os.path.basename(path)))
        assert drawn.shape == original.shape
        assert np.abs(drawn.astype(int) - original.astype(int)).sum() > 0  # boxes were drawn
    assert MetadataCatalog.get("vfnet_tiny_demo").thing_classes == CLASS_NAMES
    assert len(labels) == 2
    for class_names, texts in labels:
        assert class_names == CLASS_NAMES
        assert texts and all(t.split(" ")[0] in CLASS_NAMES for t in texts)


def write_video(path, frames, fps=5.0):
    h, w = frames[0].shape[:2]
    for fourcc, ext in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        filename = str(path) + ext
        writer = cv2.VideoWriter(filename, cv2.VideoWriter_fourcc(*fourcc), fps, (w, h), True)
        if not writer.isOpened():
            continue
        for frame in frames:
            writer.write(frame)
        writer.release()
        video = cv2.VideoCapture(filename)
        ok = video.isOpened() and video.read()[0]
        video.release()
        if ok:
            return filename
    return None


def count_frames(path):
    video = cv2.VideoCapture(path)
    n, size = 0, None
    while True:
        ok, frame = video.read()
        if not ok:
            break
        n, size = n + 1, frame.shape
    video.release()
    return n, size


def test_demo_on_video(workdir, tmp_path):
    rng = np.random.RandomState(2)
    frames = [rng.randint(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    video = write_video(tmp_path / "clip", frames)
    if video is None:
        pytest.skip("OpenCV here cannot write a video (no mp4v or MJPG codec)")
    demo = load_demo()
    written = demo.main(demo_args(workdir, "--video-input", video, "--output", str(tmp_path / "out")))
    assert len(written) == 1 and os.path.dirname(written[0]) == str(tmp_path / "out")
    assert os.path.splitext(written[0])[1] in (".mkv", ".mp4")
    num, size = count_frames(written[0])
    if num == 0:
        pytest.skip("OpenCV here cannot read back the video it wrote")
    assert num == 3 and size == (48, 64, 3)


def test_demo_needs_one_source(workdir):
    with pytest.raises(SystemExit):
        load_demo().main(demo_args(workdir))


def test_demo_refuses_fewer_class_names_than_classes(workdir, tmp_path):
    args = demo_args(workdir, "--input", str(workdir / "images"), "--output", str(tmp_path))
    with pytest.raises(SystemExit, match="NUM_CLASSES"):
        load_demo().main(args + ["MODEL.VFNET.NUM_CLASSES", "5"])
