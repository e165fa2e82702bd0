"""End to end: tools/train_net.py trains, checkpoints, evaluates, resumes, on a tiny dataset."""
import glob
import math
import os
import re
import pytest
import torch
from torch import nn

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from helpers import ROOT, copypaste_metrics, metrics, tiny_shapes  # noqa: E402
from helpers import train_net as run_train_net  # noqa: E402

TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.VFNET.NUM_CLASSES", "4",
    "DATASETS.TRAIN", "('tiny_train',)",
    "DATASETS.TEST", "('tiny_val',)",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "(3,)",
    "SOLVER.CHECKPOINT_PERIOD", "2",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "SEED", "7",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("tiny"), 6, 4)


def train_net(root, output_dir, *args):
    return run_train_net(root, output_dir, *args, *TINY)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    log = train_net(tiny, out, "SOLVER.MAX_ITER", "4")
    return out, log


def test_training_writes_a_model_zoo_style_checkpoint(trained):
    out, log = trained
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    # Detectron2's trainer checkpoint: model, iteration, and the trainer's state with the
    # optimizer and the LR scheduler.
    assert {"model", "trainer", "iteration"} <= set(ckpt)
    assert ckpt["iteration"] == 3
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    assert ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 4
    assert "head.cls_score.weight" in ckpt["model"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    # Detectron2 writes metrics every 20 iterations and at the end.
    rows = [r for r in metrics(out) if "total_loss" in r]
    assert [r["iteration"] for r in rows] == [3]
    assert all(r["total_loss"] == r["total_loss"] for r in rows)  # not NaN
    copypaste_metrics(log)


# The official recipe (VarifocalNet's configs, MMDetection 2.10 / mmcv 1.2), written out.
BASE_LR, WEIGHT_DECAY = 0.01, 1e-4
# COCO train2017 has 118,287 images; MMDetection trains on the 117,266 with annotations.
COCO_TRAIN2017_IMAGES_WITH_ANNOTATIONS = 117266
BATCH = 16
ITERS_PER_EPOCH = math.ceil(COCO_TRAIN2017_IMAGES_WITH_ANNOTATIONS / BATCH)  # 7330
# lr_config step (lr x0.1 after these epochs) and the number of epochs of each schedule.
OFFICIAL_EPOCHS = {"1x": ((8, 11), 12), "2x": ((16, 22), 24), "vfnetx": ((36, 40), 41)}


def build_vfnet(config, *opts):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg, build_model(cfg)


def lr_and_decay_of_each_parameter(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9
        for p in group["params"]:
            assert names[id(p)] not in found, names[id(p)]
            found[names[id(p)]] = (group["lr"], group["weight_decay"])
    return found


@pytest.mark.parametrize(
    "config, opts",
    [
        # R-18, with trainable BatchNorm in the backbone (the official ResNets train theirs).
        ("VFNet_R_50_FPN_1x.yaml", ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"]),
        # DCNv2 in res3-res5 and on the last conv of the head towers: their offset convs.
        ("VFNet_R_50_DCN_FPN_MS_2x.yaml", []),
    ],
)
@pytest.mark.parametrize("param_groups", ["mmdet", "detectron2"])
def test_optimizer_groups_follow_the_official_recipe(config, opts, param_groups):
    from vfnet.engine import Trainer

    cfg, model = build_vfnet(config, "MODEL.RESNETS.NORM", "BN", *opts)
    assert cfg.SOLVER.PARAM_GROUPS == "mmdet"  # the official configs'
    cfg.SOLVER.PARAM_GROUPS = param_groups
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    found = lr_and_decay_of_each_parameter(optimizer, model)

    # Each parameter by the type of its module: mmcv's DefaultOptimizerConstructor with
    # paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.) gives lr x2 and no decay to the
    # biases of the convs, but not to those of the norm layers or of the offset convs of the
    # deformable convs (mmcv's conv2.conv_offset, here conv2_offset and conv_offset), which keep
    # the base lr and decay as every other parameter; Detectron2's gives lr x2 and
    # WEIGHT_DECAY_BIAS to every bias and WEIGHT_DECAY_NORM to the norm layers' weights.
    expected, kinds = {}, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):  # frozen-statistics BN too
                kind = f"{'BatchNorm2d' if isinstance(module, nn.BatchNorm2d) else 'GroupNorm'} {name}"
            elif module_name.endswith(("conv2_offset", ".conv_offset")):
                assert isinstance(module, nn.Conv2d)
                kind = f"offset conv {name}"
            elif name == "bias":
                assert isinstance(module, nn.Conv2d), module_name
                kind = "conv bias"
            else:
                kind = name  # conv weights, the head's scales and scales_refine
            kinds.add(kind)
            official = (BASE_LR * 2, 0.0) if kind == "conv bias" else (BASE_LR, WEIGHT_DECAY)
            detectron2 = (BASE_LR * 2, 0.0) if name == "bias" else (BASE_LR, WEIGHT_DECAY)
            expected[f"{module_name}.{name}"] = official if param_groups == "mmdet" else detectron2
    assert found == expected
    must = {"conv bias", "weight", "scales", "BatchNorm2d bias", "GroupNorm bias"}
    assert must <= kinds
    if "DCN" in config:
        assert {"offset conv weight", "offset conv bias"} <= kinds


@pytest.mark.parametrize("config, schedule", [("VFNet_R_50_FPN_1x.yaml", "1x"), ("VFNet_R_50_FPN_MS_2x.yaml", "2x")])
def test_lr_schedule_follows_the_official_recipe(config, schedule):
    from detectron2.solver import build_lr_scheduler

    from vfnet.engine import Trainer

    cfg, model = build_vfnet(config, "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")
    optimizer = Trainer.build_optimizer(cfg, model)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    assert sorted(set(base_lrs)) == [BASE_LR, 2 * BASE_LR]
    scheduler = build_lr_scheduler(cfg, optimizer)
    steps, epochs = OFFICIAL_EPOCHS[schedule]

    def mmcv_factor(it):
        # mmcv 1.2's LrUpdaterHook: policy 'step' by epoch (x0.1 from the start of each epoch
        # of `steps`), warmup='linear', warmup_iters=500, warmup_ratio=0.1.
        regular = 0.1 ** sum(it // ITERS_PER_EPOCH >= s for s in steps)
        if it < 500:
            return regular * (1 - (1 - it / 500) * (1 - 0.1))
        return regular

    boundaries = [s * ITERS_PER_EPOCH + d for s in steps for d in (-1, 0)]
    iterations = [*range(0, 501, 25), *boundaries, epochs * ITERS_PER_EPOCH - 1]
    for it in iterations:
        scheduler.last_epoch = it
        for lr, base_lr in zip(scheduler.get_lr(), base_lrs):
            assert lr == pytest.approx(base_lr * mmcv_factor(it), rel=1e-12), it
    assert cfg.SOLVER.MAX_ITER == epochs * ITERS_PER_EPOCH


def test_configs_train_for_the_official_epochs():
    """Every config that claims an official schedule trains its epochs of COCO train2017."""
    from detectron2.config import get_cfg

    import vfnet

    demos = {"VFNet_Shapes_Demo.yaml", "VFNet_Raccoon.yaml", "RetinaNet_Shapes_Demo.yaml",
             "RetinaNet_VFL_Shapes_Demo.yaml", "RetinaNet_QFL_Shapes_Demo.yaml"}  # fmt: skip
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
    checked = 0
    for path in paths:
        name = os.path.basename(path)
        if name in demos:
            continue
        found = re.search(r"(1x|2x)", name)
        schedule = "1x" if name == "Base-VFNet.yaml" else found and found.group(1)
        if name.startswith("VFNetX_"):  # VFNet-X's own 41 epochs (steps at 36, 40)
            schedule = "vfnetx"
        assert schedule, f"{path} names no official schedule"
        cfg = get_cfg()
        vfnet.add_vfnet_config(cfg)
        cfg.merge_from_file(path)
        steps, epochs = OFFICIAL_EPOCHS[schedule]
        s = cfg.SOLVER
        assert tuple(s.STEPS) == tuple(e * ITERS_PER_EPOCH for e in steps), path
        assert s.MAX_ITER == epochs * ITERS_PER_EPOCH, path
        assert s.OPTIMIZER == "SGD", path
        assert (s.IMS_PER_BATCH, s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY) == (BATCH, BASE_LR, 0.9, WEIGHT_DECAY)
        assert (s.WARMUP_METHOD, s.WARMUP_FACTOR, s.WARMUP_ITERS) == ("linear", 0.1, 500), path
        # VFNet's paramwise_cfg; the official vfl_retinanet config has none (one group).
        groups = ("detectron2", 1.0, WEIGHT_DECAY) if name.startswith("RetinaNet") else ("mmdet", 2.0, 0.0)
        assert (s.PARAM_GROUPS, s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS) == groups, path
        assert s.WEIGHT_DECAY_NORM == WEIGHT_DECAY, path
        checked += 1
    assert checked >= 20  # the base configs, the models, the ablations, configs/mmdet


def test_eval_only_reproduces_the_in_training_evaluation(trained, tiny, tmp_path):
    out, log = trained
    eval_log = train_net(tiny, tmp_path, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"))
    assert copypaste_metrics(eval_log) == copypaste_metrics(log)


def test_resume_continues_at_the_saved_iteration_with_the_same_lr(trained, tiny, tmp_path):
    out, _ = trained
    # Continue the 4-iteration run to 6 iterations from its last checkpoint ...
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_final.pth", "last_checkpoint"):
        (resumed / name).write_bytes((out / name).read_bytes())
    log = train_net(tiny, resumed, "--resume", "SOLVER.MAX_ITER", "6")
    assert "Starting training from iteration 4" in log
    # ... and compare with a run of 6 iterations without interruption.
    straight = tmp_path / "straight"
    train_net(tiny, straight, "SOLVER.MAX_ITER", "6")
    last_resumed = [r for r in metrics(resumed) if "lr" in r][-1]
    last_straight = [r for r in metrics(straight) if "lr" in r][-1]
    assert last_resumed["iteration"] == last_straight["iteration"] == 5
    assert last_resumed["lr"] == last_straight["lr"]
