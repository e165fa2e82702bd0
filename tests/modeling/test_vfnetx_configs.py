"""The VFNet-X configs load, say the official recipe, build, and train a step on CPU."""

import numpy as np
import torch

from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from vfnet.data.mapper import VFNetDatasetMapper
from helpers import load_config as load


def test_configs_follow_the_official_vfnetx():
    cfg = load("VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "build_vfnet_pafpnx_backbone"
    assert cfg.MODEL.PAFPNX.BOTTOM_UP == "build_res2net_backbone" and cfg.MODEL.PAFPNX.OUT_CHANNELS == 384
    assert (cfg.MODEL.VFNET.NUM_CONVS, cfg.MODEL.VFNET.DCN_ON_LAST_CONV) == (4, True)
    assert (cfg.MODEL.VFNET.TEST_NMS_TYPE, cfg.MODEL.VFNET.TEST_NMS_THRESH) == ("soft_nms", 0.65)
    assert (cfg.MODEL.VFNET.SOFT_NMS.METHOD, cfg.MODEL.VFNET.SOFT_NMS.MIN_SCORE) == ("linear", 0.001)
    assert cfg.SOLVER.MAX_ITER == 41 * 7330 and tuple(cfg.SOLVER.STEPS) == (36 * 7330, 40 * 7330)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    swa = load("VFNetX_R2_101_DCN_PAFPNX_MS_2x_SWA.yaml", "SOLVER.MAX_ITER", "0")
    assert swa.SOLVER.MAX_ITER == 0 and swa.SOLVER.SWA.ENABLED and swa.SOLVER.SWA.EPOCHS == 18
    assert tuple(swa.SOLVER.SWA.LR_FACTORS) == (1.0, 0.01) and swa.SOLVER.BASE_LR == 0.01
    big = load("VFNetX_R2_101_DCN_PAFPNX_MS_2x_1200.yaml")
    assert (big.INPUT.MIN_SIZE_TEST, big.INPUT.MAX_SIZE_TEST) == (1200, 2000)


def test_builds_and_trains_a_step_with_the_whole_pipeline(tmp_path):
    from PIL import Image

    cfg = load(
        "VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml",
        "MODEL.PAFPNX.BOTTOM_UP", "build_resnet_backbone", "MODEL.RESNETS.DEPTH", "50",
        "MODEL.DEVICE", "cpu", "MODEL.VFNET.NUM_CLASSES", "3",
        "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN_RANGE", "(128, 160)",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "INPUT.CUTOUT.PROB", "1.0",
    )
    path = tmp_path / "a.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (120, 160, 3)).astype(np.uint8)).save(path)
    d = {"file_name": str(path), "height": 120, "width": 160, "image_id": 1,
         "annotations": [{"bbox": [20, 20, 100, 80], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 1}]}
    mapper = VFNetDatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    np.random.seed(0)
    batch = [mapper(d), mapper(d)]
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.pafpn_convs[0].conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([VFNetDatasetMapper(cfg, is_train=False)(d)])
    assert out[0]["instances"].image_size == (120, 160)
