"""
The official weights by name (vfnet/checkpoint/catalog.py): ``vfnet://NAME`` resolves through
Detectron2's PathManager to the official address, downloaded and converted once, so that
Detectron2's own DetectionCheckpointer loads it; names whose weights are only on a sharing page
say so and how to load them; the training configs name their ImageNet weights so. A local HTTP
server on 127.0.0.1 stands in for the official hosts.
"""
import glob
import os
import re

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.file_io import PathManager  # noqa: E402

from vfnet.checkpoint.catalog import ModelCatalog  # noqa: E402
from vfnet.checkpoint.detection_checkpoint import VFNetCheckpointer  # noqa: E402
from vfnet.checkpoint.mmdet_checkpoint import CONVERTED_SUFFIX  # noqa: E402

from helpers import ROOT, http_server, load_config, redirect_official_weights, serve, small_cfg, small_mmdet_file  # noqa: E402


def test_a_vfnet_address_is_a_detectron2_checkpoint_for_detectron2s_own_checkpointer(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    weights = small_mmdet_file(str(tmp_path / "vfnet_small.pth"))
    path = serve(tmp_path / "www", ModelCatalog.URLS["VFNet_R_50_FPN_1x"], weights)
    with http_server(tmp_path / "www") as (address, requested):
        redirect_official_weights(monkeypatch, address)
        local = PathManager.get_local_path("vfnet://VFNet_R_50_FPN_1x")
        assert local == str(tmp_path / "cache" / path.lstrip("/")) + CONVERTED_SUFFIX
        torch.manual_seed(1)  # (weights other than the served ones)
        model = build_model(small_cfg())
        DetectionCheckpointer(model).load("vfnet://VFNet_R_50_FPN_1x")
    assert requested == [path]
    torch.manual_seed(0)
    reference = build_model(small_cfg()).state_dict()  # the served weights
    saved = torch.load(local, weights_only=True)["model"]
    assert set(saved) == {k for k in reference if not k.endswith("num_batches_tracked")}
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if k in saved)


@pytest.mark.parametrize("name", sorted(ModelCatalog.SHARING_PAGES))
def test_weights_on_a_sharing_page_name_it_and_the_manual_steps(name):
    page = re.escape(ModelCatalog.SHARING_PAGES[name])
    with pytest.raises(RuntimeError, match=f"{name} are only on a sharing page.*{page} .*in a browser.*MODEL.WEIGHTS /path/to/file.pth"):
        PathManager.get_local_path(f"vfnet://{name}")


def test_an_unknown_name_is_refused_with_the_names():
    with pytest.raises(RuntimeError, match="No official weights are named 'VFNet_R_18'. The names: .*VFNet_R_50_FPN_1x"):
        VFNetCheckpointer(build_model(small_cfg())).load("vfnet://VFNet_R_18")


def test_the_training_configs_start_from_official_imagenet_addresses():
    named = {}
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        weights = load_config(os.path.basename(path)).MODEL.WEIGHTS
        if weights.startswith("vfnet://"):
            named[os.path.basename(path)] = weights[len("vfnet://"):]
        else:  # a Detectron2 address, or none (trained from scratch, or given on the command line)
            assert weights == "" or weights.startswith("detectron2://"), (path, weights)
    assert set(named.values()) == {n for n in ModelCatalog.URLS if n.startswith("ImageNetPretrained/")}
    assert named["VFNet_R_50_FPN_1x.yaml"] == "ImageNetPretrained/resnet50"
    assert named["VFNet_X_101_64x4d_FPN_MS_2x.yaml"] == "ImageNetPretrained/resnext101_64x4d"
    assert named["VFNet_R2_101_FPN_MS_2x.yaml"] == "ImageNetPretrained/res2net101_v1d_26w_4s"
