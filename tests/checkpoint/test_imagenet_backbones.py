"""
The ImageNet backbones of the official configs (torchvision's ResNet-50/101, pytorch style),
converted by tools/convert_mmdet_to_d2.py --imagenet and loaded through MODEL.WEIGHTS, or named
by the training configs' address (vfnet://ImageNetPretrained/..., downloaded and converted on first
use; served here by a local HTTP server): the
Detectron2 ResNet of the config computes torchvision's features (float64, 800x1333), the DCN
config's too (its DCNv2 starts at zero offsets and modulation 1/2: the 3x3 conv at half weight,
at stride 2 as the official one). A random torchvision ResNet with random BatchNorm statistics stands in for the download.
The ResNeXt-101 of open-mmlab: tests/parity/test_mmdet_parity_imagenet.py (MMDetection's ResNeXt).
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from vfnet.checkpoint.catalog import ModelCatalog
from vfnet.checkpoint.converter import convert_imagenet_backbone
from vfnet.checkpoint.detection_checkpoint import VFNetCheckpointer

from helpers import ROOT, http_server, redirect_official_weights, serve
from helpers import load_config as load

TOOL = os.path.join(ROOT, "tools", "convert_mmdet_to_d2.py")
IMAGENET_MEAN = [123.675, 116.28, 103.53]  # torchvision's normalisation, in 0-255 RGB
IMAGENET_STD = [58.395, 57.12, 57.375]


def random_torchvision_resnet(depth, seed=0):
    torch.manual_seed(seed)
    net = getattr(torchvision.models, f"resnet{depth}")()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.4)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.eval()


def torchvision_features(net, x):
    """res3-res5 of torchvision's ResNet: the outputs of layer2-layer4."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    x = net.layer1(x)
    out = {}
    for name, layer in (("res3", net.layer2), ("res4", net.layer3), ("res5", net.layer4)):
        x = layer(x)
        out[name] = x
    return out


def convert(net, tmp_path, config):
    """The torchvision file (a bare state dict, as downloaded) through the tool, checked against `config`."""
    src, dst = tmp_path / "resnet_tv.pth", tmp_path / "resnet_d2.pth"
    torch.save(net.state_dict(), src)
    cmd = [sys.executable, TOOL, "--imagenet", str(src), str(dst), "--config-file", os.path.join(ROOT, "configs", config)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    assert "ImageNet backbone only" in out.stdout and "every key and shape matches" in out.stdout
    return dst


def loaded_bottom_up(config, weights):
    cfg = load(config, "MODEL.DEVICE", "cpu")
    assert cfg.MODEL.WEIGHTS.startswith("vfnet://ImageNetPretrained/")  # see the test below
    assert (list(cfg.MODEL.PIXEL_MEAN), list(cfg.MODEL.PIXEL_STD), cfg.INPUT.FORMAT) == (IMAGENET_MEAN, IMAGENET_STD, "RGB")
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    return model.backbone.bottom_up.double().eval()


@pytest.fixture(scope="module")
def resnet50():
    return random_torchvision_resnet(50).double()


@pytest.mark.parametrize("config, size", [("VFNet_R_50_FPN_1x.yaml", (800, 1333)), ("VFNet_R_50_DCN_FPN_MS_2x.yaml", (256, 352))])
def test_converted_torchvision_resnet50_computes_torchvisions_features(resnet50, tmp_path, config, size):
    weights = convert(resnet50, tmp_path, config)
    bottom_up = loaded_bottom_up(config, weights)
    reference = resnet50
    if "DCN" in config:
        # Zero offsets and a modulation of sigmoid(0) = 1/2 everywhere: the DCNv2 of res3-res5
        # (stride 2 in the first block, as torchvision's conv2) is their conv2 at half weight.
        reference = copy.deepcopy(resnet50)
        with torch.no_grad():
            for layer in (reference.layer2, reference.layer3, reference.layer4):
                for block in layer:
                    block.conv2.weight.mul_(0.5)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = bottom_up(x), torchvision_features(reference, x)
    for name in ("res3", "res4", "res5"):
        assert ours[name].shape == theirs[name].shape
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-9 * theirs[name].abs().max().item())


def test_converted_torchvision_resnet101_fits_the_r101_configs(tmp_path):
    net = random_torchvision_resnet(101)
    weights = convert(net, tmp_path, "VFNet_R_101_FPN_MS_2x.yaml")
    saved = torch.load(weights, weights_only=True)["model"]
    assert len(saved) == len([k for k in net.state_dict() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")])
    torch.testing.assert_close(saved["backbone.bottom_up.res4.22.conv2.weight"], net.layer3[22].conv2.weight.detach())
    torch.testing.assert_close(saved["backbone.bottom_up.res5.0.shortcut.norm.running_var"], net.layer4[0].downsample[1].running_var)
    # The DCN config reads the same file (its offset convs start from their zero init).
    bottom_up = loaded_bottom_up("VFNet_R_101_DCN_FPN_MS_2x.yaml", weights)
    torch.testing.assert_close(bottom_up.res4[22].conv2.weight.float(), net.layer3[22].conv2.weight.detach())


def test_the_training_configs_address_downloads_and_converts_torchvisions_file(resnet50, tmp_path, monkeypatch):
    cfg = load("VFNet_R_50_DCN_FPN_MS_2x.yaml", "MODEL.DEVICE", "cpu")
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    weights = {k: v.float() for k, v in resnet50.state_dict().items()}
    torch.save(weights, tmp_path / "resnet50-0676ba61.pth")
    path = serve(tmp_path / "www", ModelCatalog.URLS["ImageNetPretrained/resnet50"], tmp_path / "resnet50-0676ba61.pth")
    assert path == "/models/resnet50-0676ba61.pth"  # torchvision's file, as published
    with http_server(tmp_path / "www") as (address, requested):
        redirect_official_weights(monkeypatch, address)
        model = build_model(cfg)
        VFNetCheckpointer(model).load(cfg.MODEL.WEIGHTS)  # vfnet://ImageNetPretrained/resnet50
    assert requested == [path]
    converted, _ = convert_imagenet_backbone(weights)  # what the tool writes with --imagenet
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in converted.items())
    assert not any("conv2_offset" in k for k in converted)  # the DCN offsets: the model's init
