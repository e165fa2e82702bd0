"""Paths, the small model, the train_net runners and the checkpoint helpers the tests share."""
import os
import re
from collections import OrderedDict
from typing import Callable, List, Mapping, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The raccoon dataset lives beside the project: tests that use it skip where it is absent.
RACCOON = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "raccoon")
RACCOON_IMAGES = os.path.join(RACCOON, "images")
BASE_CONFIG = os.path.join(ROOT, "configs", "Base-VFNet.yaml")
# Overrides of Base-VFNet.yaml for a small, fast model: ResNet-18 with BN, 64-channel FPN and
# head, 3 classes, on the CPU.
SMALL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.VFNET.NUM_CLASSES", "3",
    "MODEL.WEIGHTS", "",
]  # fmt: skip

# Overrides of configs/VFNet_Shapes_Demo.yaml for tools/train_net.py runs of a few seconds.
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "(4,)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "SEED", "7",
]  # fmt: skip


def small_cfg(*opts):
    """Base-VFNet.yaml with the SMALL overrides, then `opts` (needs Detectron2)."""
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(SMALL + list(opts))
    return cfg


def tiny_shapes(root, num_train, num_val, seed=3, image_size=(64, 96)):
    """A shapes dataset of `num_train` + `num_val` small images under `root` (train/val JSON and folders)."""
    from vfnet.data.shapes import generate_split

    for split, n in (("train", num_train), ("val", num_val)):
        generate_split(str(root), split, n, seed=seed, image_size=image_size)
    return root


def dataset_specs(root, prefix):
    """The --dataset NAME=JSON:IMAGE_DIR of the splits of :func:`tiny_shapes` under `root`: {split: spec}."""
    return {split: f"{prefix}_{split}={root / f'{split}.json'}:{root / split}" for split in ("train", "val")}


def train_net(root, output_dir, *args, threads=None, timeout=300):
    """
    Run tools/train_net.py on VFNet_Shapes_Demo.yaml with the tiny_train / tiny_val datasets of
    :func:`tiny_shapes` under `root` and the arguments `args` (options and overrides), into
    `output_dir`; asserts it succeeds (showing its output) and returns its output.
    """
    import subprocess
    import sys

    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        "--dataset", f"tiny_train={root / 'train.json'}:{root / 'train'}",
        "--dataset", f"tiny_val={root / 'val.json'}:{root / 'val'}",
        *args, "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def copypaste_metrics(log):
    """The 'copypaste' AP line that Detectron2 prints after a COCO evaluation."""
    lines = re.findall(r"copypaste: ([-0-9.,nan]+)$", log, flags=re.M)
    assert lines, "no evaluation result in the log"
    return lines[-1]


def metrics(output_dir):
    """The records of OUTPUT_DIR/metrics.json."""
    import json

    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f]


DETERMINISTIC_TRAIN_NET = os.path.join(ROOT, "tests", "scripts", "deterministic_train_net.py")


def start_deterministic(log_path, kill, train_net_args):
    """
    Start tests/scripts/deterministic_train_net.py (tools/train_net.py under bitwise-reproducible
    settings, one thread) in the background with `kill` (its --kill-* options) and
    `train_net_args`, its output appended to `log_path`.
    """
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, DETERMINISTIC_TRAIN_NET, *kill, "--", *train_net_args]
    log = open(log_path, "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(proc, log_path, returncode=0):
    """Wait for a run of :func:`start_deterministic`; assert its exit status (showing its log)."""
    assert proc.wait(timeout=600) == returncode, open(log_path).read()[-6000:]


def random_d2_state_dict(config, num_classes=3, seed=0):
    """(random values in the shapes of the state dict of the model of configs/`config`, its cfg)."""
    import pytest

    pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.MODEL.VFNET.NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    g = torch.Generator().manual_seed(seed)
    sd = build_model(cfg).state_dict()
    return {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}, cfg


def mmdet_style(d2_sd):
    """MMDetection-style state dict of `d2_sd`: inverse names, per-level scales, num_batches_tracked."""
    mm = dict(d2_to_mmdet(d2_sd))
    for k in list(mm):
        if k.endswith(".running_var"):
            mm[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(12345)
    return mm


# The converter's rules run backwards: Detectron2 names of this project's VFNet to MMDetection's.
# Needs only torch (the converter module imports no Detectron2).
import torch  # noqa: E402

from vfnet.checkpoint.converter import _BN, _GN, _WB, ConversionError  # noqa: E402

_INVERSE: List[Tuple["re.Pattern", Callable[["re.Match"], str]]] = [
    (re.compile(r"backbone\.bottom_up\.stem\.conv1\.weight"), lambda m: "backbone.conv1.weight"),
    (
        re.compile(rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_BN}"),
        lambda m: f"backbone.bn1.{m.group(1)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([123])\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.conv{m.group(3)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([123])\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.bn{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2_offset\.{_WB}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.conv2.conv_offset.{m.group(3)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.0.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.{m.group(3)}",
    ),
    (
        re.compile(rf"backbone\.fpn_lateral([3-5])\.{_WB}"),
        lambda m: f"neck.lateral_convs.{int(m.group(1)) - 3}.conv.{m.group(2)}",
    ),
    (
        re.compile(rf"backbone\.fpn_output([3-5])\.{_WB}"),
        lambda m: f"neck.fpn_convs.{int(m.group(1)) - 3}.conv.{m.group(2)}",
    ),
    (
        re.compile(rf"backbone\.top_block\.p6\.{_WB}"),
        lambda m: f"neck.fpn_convs.3.conv.{m.group(1)}",
    ),
    (
        re.compile(rf"backbone\.top_block\.p7\.{_WB}"),
        lambda m: f"neck.fpn_convs.4.conv.{m.group(1)}",
    ),
    (
        re.compile(rf"head\.(cls|reg)_tower\.(\d+)\.conv_offset\.{_WB}"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.conv.conv_offset.{m.group(3)}",
    ),
    (
        re.compile(r"head\.(cls|reg)_tower\.(\d+)\.conv\.weight"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.conv.weight",
    ),
    (
        re.compile(rf"head\.(cls|reg)_tower\.(\d+)\.norm\.{_GN}"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.gn.{m.group(3)}",
    ),
    (
        re.compile(rf"head\.(cls|reg)_tower\.(\d+)\.{_WB}"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.conv.{m.group(3)}",
    ),
    (
        re.compile(rf"head\.reg_init_conv\.norm\.{_GN}"),
        lambda m: f"bbox_head.vfnet_reg_conv.gn.{m.group(1)}",
    ),
    (
        re.compile(rf"head\.reg_init_conv\.{_WB}"),
        lambda m: f"bbox_head.vfnet_reg_conv.conv.{m.group(1)}",
    ),
    (re.compile(rf"head\.reg_init\.{_WB}"), lambda m: f"bbox_head.vfnet_reg.{m.group(1)}"),
    (
        re.compile(r"head\.reg_refine_conv\.weight"),
        lambda m: "bbox_head.vfnet_reg_refine_dconv.weight",
    ),
    (re.compile(rf"head\.reg_refine\.{_WB}"), lambda m: f"bbox_head.vfnet_reg_refine.{m.group(1)}"),
    (re.compile(r"head\.cls_conv\.weight"), lambda m: "bbox_head.vfnet_cls_dconv.weight"),
    (re.compile(rf"head\.cls_score\.{_WB}"), lambda m: f"bbox_head.vfnet_cls.{m.group(1)}"),
]


# Res2Net's names where they differ from ResNet's (tried first for a Res2Net backbone).
_INVERSE_RES2NET: List[Tuple["re.Pattern", Callable[["re.Match"], str]]] = [
    (
        re.compile(r"backbone\.bottom_up\.stem\.conv([123])\.weight"),
        lambda m: f"backbone.stem.{3 * (int(m.group(1)) - 1)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.stem\.conv([123])\.norm\.{_BN}"),
        lambda m: f"backbone.stem.{3 * (int(m.group(1)) - 1) + 1}.{m.group(2)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2\.(\d+)\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.convs.{m.group(3)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2\.(\d+)\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.bns.{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2_offset\.(\d+)\.{_WB}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.convs.{m.group(3)}"
        f".conv_offset.{m.group(4)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.2.{m.group(3)}",
    ),
]


def d2_to_mmdet(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """
    Inverse of vfnet.checkpoint.converter.convert_mmdet_to_d2 (without ``num_batches_tracked``): Detectron2 names
    of this project's VFNet (ResNet or Res2Net, told by ``stem.conv2``) to MMDetection's.
    ``head.scales`` / ``head.scales_refine`` are split into per-level 0-dim tensors. Builds
    MMDetection-style state dicts for the converter's and the parity tests.
    """
    res2net = "backbone.bottom_up.stem.conv2.weight" in state_dict
    inverse = _INVERSE_RES2NET + _INVERSE if res2net else _INVERSE
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        m = re.fullmatch(r"head\.(scales|scales_refine)", key)
        if m:
            for i, v in enumerate(value.unbind(0)):
                out[f"bbox_head.{m.group(1)}.{i}.scale"] = v
            continue
        for pattern, fn in inverse:
            m = pattern.fullmatch(key)
            if m:
                out[fn(m)] = value
                break
        else:
            raise ConversionError(f"No inverse rule for Detectron2 key '{key}'.")
    return out


def load_config(name, *opts):
    """configs/`name` with the overrides `opts` (needs Detectron2)."""
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", name))
    cfg.merge_from_list(list(opts))
    return cfg


# A batch of two images for the checks of non-finite values (the second one made non-finite).
def training_batch(nan_pixels=False, nan_box=False):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(2)
    batch = []
    for i in range(2):
        image = torch.rand(3, 64, 96, generator=g) * 255
        boxes = torch.tensor([[8.0, 8, 60, 50], [30, 20, 90, 60]])
        if i == 1 and nan_pixels:
            image[:, 10:20, 30:40] = float("nan")
        if i == 1 and nan_box:
            boxes[1, 2] = float("nan")
        instances = Instances((64, 96), gt_boxes=Boxes(boxes), gt_classes=torch.tensor([0, 2]))
        batch.append({"image": image, "instances": instances, "file_name": f"img{i}.png", "image_id": 10 + i})
    return batch


# The exported model against the eager one.
def spread_scores(model):
    """Random-init scores are all ~prior_prob: spread them over (0, 1) and move the DCNv2 offsets."""
    from vfnet.modeling.vfnet_head import ModulatedDeformConvBlock

    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.cls_score.weight, std=0.2)
    torch.nn.init.zeros_(model.head.cls_score.bias)
    for m in model.modules():
        if isinstance(m, ModulatedDeformConvBlock):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.01)
    return model


def eager_predictions(model, image_bgr, min_size=128, max_size=192):
    """What DefaultPredictor returns: the detections in the original image's coordinates."""
    h, w = image_bgr.shape[:2]
    from vfnet.export import resize_for_test

    x = resize_for_test(image_bgr, min_size, max_size)
    with torch.no_grad():
        return model([{"image": x, "height": h, "width": w}])[0]["instances"]


def assert_same_detections(eager, exported, input_size=None):
    """
    The same detections: count, classes, scores within 1e-4, boxes within 1e-3 px of the graph's
    input (`input_size`, (h, w)), that is 1e-3 px times the resize's scale in the image's pixels
    where the detections are (default: the image's own size).
    """
    assert eager.image_size == exported.image_size
    assert len(eager) == len(exported) > 0
    assert torch.equal(eager.pred_classes, exported.pred_classes)
    scale = 1.0 if input_size is None else max(a / b for a, b in zip(eager.image_size, input_size))
    torch.testing.assert_close(exported.pred_boxes.tensor, eager.pred_boxes.tensor, rtol=0, atol=1e-3 * scale)
    torch.testing.assert_close(exported.scores, eager.scores, rtol=0, atol=1e-4)


class StarDeformConv(torch.nn.Module):
    """A VFNet star deformable conv (optionally modulated) of kernel `impl` on random distances (the export tests)."""

    def __init__(self, impl, modulated):
        from vfnet.layers.deform_conv import DeformConv2d

        super().__init__()
        torch.manual_seed(0)
        self.conv = DeformConv2d(8, 6, 3, padding=1, bias=True, impl=impl)
        torch.nn.init.normal_(self.conv.bias)
        self.modulated = modulated

    def forward(self, x, distances):
        from vfnet.modeling.star_dcn import star_dcn_offsets

        offsets = star_dcn_offsets(distances, 0.1, 8)
        mask = torch.sigmoid(distances[:, :1].repeat(1, 9, 1, 1) / 20) if self.modulated else None
        return self.conv(x, offsets, mask)


def star_inputs(h=7, w=9):
    """The input (1, 8, h, w) and distances (1, 4, h, w) of a StarDeformConv."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(1, 8, h, w, generator=g), torch.rand(1, 4, h, w, generator=g) * 40


def export_torchvision_star_deform_conv(path, modulated):
    """A "torchvision" StarDeformConv exported to ONNX DeformConv (opset 19, inputs x and d of dynamic size) at `path`; returns it."""
    from vfnet import export as E
    from vfnet.export.tracing import _quiet_tracing

    module = StarDeformConv("torchvision", modulated).eval()
    E.register_deform_conv_onnx_symbolic(19)
    with _quiet_tracing():
        torch.onnx.export(
            module, star_inputs(), path, dynamo=False, opset_version=19, input_names=["x", "d"],
            dynamic_axes={"x": {2: "h", 3: "w"}, "d": {2: "h", 3: "w"}},
        )  # fmt: skip
    return module


# Detectron2's deformable-conv CUDA kernel on the CPU: what it asserts, computed by torchvision.
from torchvision.ops import deform_conv2d  # noqa: E402


def check_kernel_inputs(x, offset, mask, weight, bias):
    """What Detectron2's deform_conv_cuda.cu asserts, or reads through raw NCHW pointers."""
    assert x.dim() == 4, "4D input expected"
    assert weight.is_contiguous(), "weight tensor has to be contiguous"  # shape_check
    # Modulated: TORCH_CHECK(input.is_contiguous()). Both: offset[b] and mask[b] read through
    # data_ptr, the gradients written as NCHW into zeros_like(input), zeros_like(offset).
    assert x.is_contiguous(), "input tensor has to be contiguous (its gradient is written as NCHW)"
    assert offset.is_contiguous(), "offset read (and its gradient written) as NCHW"
    assert mask is None or mask.is_contiguous(), "mask read (and its gradient written) as NCHW"
    for name, t in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
        if t is not None:  # data_ptr<scalar_t> of the input's scalar type, addmm_
            assert t.dtype == x.dtype, f"{name} is {t.dtype}, input {x.dtype}"
            assert t.device == x.device, f"{name} on {t.device}, input on {x.device}"


class StandInKernel(torch.autograd.Function):
    """Detectron2's (modulated) deformable CUDA kernel, checked, computed by torchvision."""

    @staticmethod
    def forward(ctx, x, offset, mask, weight, bias, stride, padding, dilation):
        check_kernel_inputs(x, offset, mask, weight, bias)
        ctx.save_for_backward(x, offset, mask, weight, bias)
        ctx.conv = (stride, padding, dilation)
        with torch.autocast(x.device.type, enabled=False):  # the kernel ignores autocast
            return deform_conv2d(x, offset, weight, bias, *ctx.conv, mask=mask)

    @staticmethod
    def backward(ctx, grad_output):
        x = ctx.saved_tensors[0]
        assert grad_output.dtype == x.dtype, "grad_output meets the input's dtype in addmm_"
        tensors = [None if t is None else t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x, offset, mask, weight, bias = tensors
            out = deform_conv2d(x, offset, weight, bias, *ctx.conv, mask=mask)
        given = [t for t in tensors if t is not None]
        grads = iter(torch.autograd.grad(out, given, grad_output))
        return tuple(None if t is None else next(grads) for t in tensors) + (None,) * 3


def stand_in_deform_conv(x, offset, weight, stride=1, padding=0, dilation=1, groups=1, deformable_groups=1, im2col_step=64):
    assert groups == 1 and deformable_groups == 1
    return StandInKernel.apply(x, offset, None, weight, None, stride, padding, dilation)


def stand_in_modulated_deform_conv(x, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, deformable_groups=1):
    assert groups == 1 and deformable_groups == 1
    return StandInKernel.apply(x, offset, mask, weight, bias, stride, padding, dilation)


# Official weights without the internet: MMDetection checkpoints served by a local HTTP server.
import contextlib  # noqa: E402


@contextlib.contextmanager
def http_server(root, truncated=()):
    """
    Serve the files under `root` at http://127.0.0.1:PORT (a free port; a thread, stopped on
    exit). Yields (that address, the list of the paths requested). The paths `truncated` are sent
    with their whole Content-Length but half of their bytes, then the connection is closed: a
    download cut short.
    """
    import functools
    import http.server
    import threading

    requested = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        timeout = 60  # a client that stops reading does not hold the server longer

        def do_GET(self):
            requested.append(self.path)
            if self.path not in truncated:
                return super().do_GET()
            with open(self.translate_path(self.path), "rb") as f:
                data = f.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def serve(root, url, file):
    """Put `file` under `root` where a server of `root` serves it at the path of the address `url` (a hard link); returns that path."""
    from urllib.parse import urlparse

    path = urlparse(url).path
    target = os.path.join(str(root), path.lstrip("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.link(file, target)
    return path


def redirect_official_weights(monkeypatch, server):
    """ModelCatalog's download addresses, on `server` (the paths of the official addresses)."""
    from urllib.parse import urlparse

    from vfnet.checkpoint.catalog import ModelCatalog

    urls = {name: server + urlparse(url).path for name, url in ModelCatalog.URLS.items()}
    monkeypatch.setattr(ModelCatalog, "URLS", urls)


def mmdet_checkpoint_of(model, path):
    """Write the weights of the Detectron2 VFNet `model` to `path` as an official MMDetection 2.x checkpoint ({"state_dict", "meta"})."""
    weights = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": mmdet_style(weights), "meta": {"mmdet_version": "2.6.0", "epoch": 12}}, path)
    return path


def small_mmdet_file(path):
    """An MMDetection checkpoint (`path`) of the small model of :func:`small_cfg` (seed 0)."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return mmdet_checkpoint_of(build_model(small_cfg()), path)


def official_model_file(config, path, seed=0):
    """An official MMDetection checkpoint (`path`) of the model of configs/`config` at a random initialisation (spread scores: detections on a photograph)."""
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = spread_scores(build_model(load_config(config, "MODEL.DEVICE", "cpu")))
    return mmdet_checkpoint_of(model, path)


def raccoon_image():
    """The first raccoon photograph (BGR), or a skip where the dataset is absent."""
    import glob

    import cv2
    import pytest

    paths = sorted(glob.glob(os.path.join(RACCOON_IMAGES, "*.jpg")))
    if not paths:
        pytest.skip(f"the raccoon images are not at {RACCOON_IMAGES}")
    return cv2.imread(paths[0])


def detections_of(config, weights, image, strict=True):
    """The detections on `image` (min size 128) of the model of configs/`config` with `weights` loaded by VFNetCheckpointer."""
    from detectron2.modeling import build_model

    from vfnet.checkpoint.detection_checkpoint import VFNetCheckpointer

    model = build_model(load_config(config, "MODEL.DEVICE", "cpu")).eval()
    VFNetCheckpointer(model, strict=strict).load(str(weights))
    return eager_predictions(model, image)


def explicit_detections(config, mmdet_file, image, tmp_path):
    """The detections of the MMDetection checkpoint `mmdet_file` converted by the tool's function for configs/`config`, then loaded: the explicit path."""
    from vfnet.checkpoint.converter import convert_checkpoint_file

    converted = os.path.join(str(tmp_path), "explicit_d2.pth")
    convert_checkpoint_file(str(mmdet_file), converted, os.path.join(ROOT, "configs", config))
    return detections_of(config, converted, image)


def assert_identical_detections(a, b):
    """The same detections, bit for bit."""
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
