"""
vfnet.model_zoo, as Detectron2's model_zoo: the configs of configs/ found in the installed package
(setup.py links them into it; tests/test_package.py checks a wheel's copy), the official addresses
of configs/mmdet/ (each config names its own in a comment), and the model of a config with its
official weights, the same detections as the explicit convert-then-load path (a local HTTP server
on 127.0.0.1 serves a random official checkpoint at the official address's path).
"""
import glob
import os
import re

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import CfgNode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vfnet import model_zoo  # noqa: E402
from vfnet.checkpoint.catalog import ModelCatalog  # noqa: E402

from helpers import ROOT, assert_identical_detections, eager_predictions, explicit_detections, http_server, official_model_file, raccoon_image, redirect_official_weights, serve  # noqa: E402,E501

CONFIGS = sorted(
    os.path.relpath(p, os.path.join(ROOT, "configs"))
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.*"), recursive=True)
    if p.endswith((".yaml", ".py"))
)


def test_every_config_of_the_repository_is_in_the_package():
    for name in CONFIGS:
        path = model_zoo.get_config_file(name)
        with open(path) as packaged, open(os.path.join(ROOT, "configs", name)) as source:
            assert packaged.read() == source.read(), name
    with pytest.raises(RuntimeError, match="mmdet/VFNet_R_18.yaml is not available in the model zoo"):
        model_zoo.get_config_file("mmdet/VFNet_R_18.yaml")


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.endswith(".yaml")])
def test_get_config_of_a_yaml_config(name):
    cfg = model_zoo.get_config(name)
    assert isinstance(cfg, CfgNode) and "VFNET" in cfg.MODEL  # this project's keys, _BASE_ merged


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.endswith(".py")])
def test_get_config_of_a_lazy_config(name):
    cfg = model_zoo.get_config(name)  # (their relative imports of each other)
    assert isinstance(cfg, DictConfig) and "model" in cfg and "train" in cfg


def official_address_in_comment(name):
    """The official address that configs/`name` names in its first comment lines."""
    with open(os.path.join(ROOT, "configs", name)) as f:
        header = "".join(line for line in f if line.startswith("#"))
    return re.search(r"^#\s+(https://\S+)", header, re.M).group(1)


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith("mmdet/")])
def test_the_official_address_of_each_mmdet_config_is_the_one_of_its_comment(name):
    address = official_address_in_comment(name)
    if address.startswith("https://download.openmmlab.com/"):
        assert model_zoo.get_checkpoint_url(name) == address
        assert model_zoo.get_config(name, trained=True).MODEL.WEIGHTS == address
    else:  # a sharing page: the error names it and says what to do
        assert address.startswith("https://drive.google.com/")
        with pytest.raises(RuntimeError, match=f"only on a sharing page.*{re.escape(address)} .*MODEL.WEIGHTS /path/to/file.pth"):
            model_zoo.get_checkpoint_url(name)


def test_configs_without_official_weights():
    with pytest.raises(RuntimeError, match=r"No official weights for VFNet_R_50_FPN_1x.yaml.*evaluated with mmdet/VFNet_R_50_FPN_1x.yaml"):
        model_zoo.get_checkpoint_url("VFNet_R_50_FPN_1x.yaml")
    with pytest.raises(RuntimeError, match="No official weights for lazy/vfnet_shapes_demo.py"):
        model_zoo.get_config("lazy/vfnet_shapes_demo.py", trained=True)


def test_get_with_the_official_weights_gives_the_detections_of_the_explicit_conversion(tmp_path, monkeypatch):
    name, config = "VFNet_R_50_DCN_FPN_MS_2x", "mmdet/VFNet_R_50_DCN_FPN_MS_2x.yaml"
    image = raccoon_image()
    weights = official_model_file(config, str(tmp_path / "official.pth"))
    path = serve(tmp_path / "www", ModelCatalog.URLS[name], weights)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    with http_server(tmp_path / "www") as (address, requested):
        redirect_official_weights(monkeypatch, address)
        model = model_zoo.get(config, trained=True, device="cpu")
    assert requested == [path]
    assert model.training and model.device.type == "cpu"  # as Detectron2's model_zoo.get
    assert_identical_detections(eager_predictions(model.eval(), image), explicit_detections(config, weights, image, tmp_path))


def test_get_a_lazy_config_without_weights():
    model = model_zoo.get("lazy/vfnet_shapes_demo.py", device="cpu")
    assert model.num_classes == 4 and model.device.type == "cpu"
