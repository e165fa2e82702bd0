"""
The LazyConfig configs (configs/lazy/) against their YAML counterparts, and
tools/lazyconfig_train_net.py end to end on a tiny dataset.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import LRMultiplier  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import vfnet  # noqa: E402
from vfnet.engine import Trainer  # noqa: E402
from vfnet.solver import build_lr_scheduler, build_optimizer  # noqa: E402

from helpers import ROOT, copypaste_metrics, dataset_specs, metrics, tiny_shapes  # noqa: E402
LAZY = os.path.join(ROOT, "configs", "lazy")


def yaml_config(name, *opts):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def lazy_config(name, *overrides):
    return LazyConfig.apply_overrides(LazyConfig.load(os.path.join(LAZY, name)), list(overrides))


def both_models(yaml_name, lazy_name, seed=0):
    """The YAML config's model and the lazy config's, each built after torch.manual_seed(seed)."""
    ycfg, lcfg = yaml_config(yaml_name), lazy_config(lazy_name)
    torch.manual_seed(seed)
    ymodel = build_model(ycfg)
    torch.manual_seed(seed)
    lmodel = instantiate(lcfg.model).to("cpu")
    return ycfg, ymodel, lcfg, lmodel


def assert_same_structure(ymodel, lmodel):
    """Same parameter and buffer names and shapes, same module types, same initial values."""
    shapes = lambda named: [(n, tuple(t.shape)) for n, t in named]  # noqa: E731
    assert shapes(lmodel.named_parameters()) == shapes(ymodel.named_parameters())
    assert shapes(lmodel.named_buffers()) == shapes(ymodel.named_buffers())
    types = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    assert types(lmodel) == types(ymodel)
    # Built in the same order after the same seed: the same initialisation.
    ystate = ymodel.state_dict()
    for name, value in lmodel.state_dict().items():
        assert torch.equal(value, ystate[name]), name
    for attr in ("num_classes", "test_score_thresh", "test_topk_candidates", "test_nms_thresh",
                 "max_detections_per_image", "loss_bbox_weight", "loss_bbox_refine_weight",
                 "vfl_alpha", "vfl_gamma", "iou_weighted", "cls_loss_type", "qfl_beta", "head_in_features"):  # fmt: skip
        assert getattr(lmodel, attr) == getattr(ymodel, attr), attr
    assert torch.equal(lmodel.pixel_mean, ymodel.pixel_mean)
    assert torch.equal(lmodel.pixel_std, ymodel.pixel_std)


def small_batch(num_classes):
    """Two images of different sizes with two boxes each."""
    g = torch.Generator().manual_seed(5)
    batch = []
    for h, w in ((96, 128), (112, 88)):
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.tensor([[8.0, 10.0, 60.0, 70.0], [30.0, 20.0, 84.0, 90.0]]))
        instances.gt_classes = torch.tensor([1, num_classes - 1])
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "height": h, "width": w, "instances": instances})
    return batch


def test_r50_yaml_and_lazy_configs_build_the_same_model():
    ycfg, ymodel, _, lmodel = both_models("VFNet_R_50_FPN_1x.yaml", "vfnet_R_50_FPN_1x.py")
    assert_same_structure(ymodel, lmodel)
    assert lmodel.backbone.bottom_up.stem.conv1.weight.requires_grad is False  # freeze_at 2
    # Weights whose scores pass the threshold, for a comparison of detections; loaded into both.
    state = ymodel.state_dict()
    state["head.cls_score.bias"] = torch.zeros_like(state["head.cls_score.bias"])
    ymodel.load_state_dict(state)
    lmodel.load_state_dict(state)
    batch = small_batch(ycfg.MODEL.VFNET.NUM_CLASSES)

    ymodel.eval(), lmodel.eval()
    with torch.no_grad():
        youts, louts = ymodel(batch), lmodel(batch)
    for yout, lout in zip(youts, louts):
        y, lz = yout["instances"], lout["instances"]
        assert len(y) > 0 and len(lz) == len(y)
        torch.testing.assert_close(lz.pred_boxes.tensor, y.pred_boxes.tensor)
        torch.testing.assert_close(lz.scores, y.scores)
        assert torch.equal(lz.pred_classes, y.pred_classes)

    ymodel.train(), lmodel.train()
    with EventStorage(0):
        ylosses, llosses = ymodel(batch), lmodel(batch)
    assert set(llosses) == set(ylosses) == {"loss_cls", "loss_bbox", "loss_bbox_refine"}
    for key in ylosses:
        torch.testing.assert_close(llosses[key], ylosses[key])
        assert float(ylosses[key].detach()) > 0


def parameter_groups(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for group in optimizer.param_groups:
        settings = tuple(sorted((k, v) for k, v in group.items() if k not in ("params", "initial_lr")))
        for p in group["params"]:
            found[names[id(p)]] = settings
    return found


def test_shapes_demo_yaml_and_lazy_configs_build_the_same_model_optimizer_and_schedule():
    ycfg, ymodel, lcfg, lmodel = both_models("VFNet_Shapes_Demo.yaml", "vfnet_shapes_demo.py")
    assert_same_structure(ymodel, lmodel)
    assert lcfg.train.seed == ycfg.SEED == 0 and lcfg.train.max_iter == ycfg.SOLVER.MAX_ITER

    yopt = build_optimizer(ycfg, ymodel)
    lcfg.optimizer.params.model = lmodel
    lopt = instantiate(lcfg.optimizer)
    assert type(lopt) is type(yopt)
    ygroups = parameter_groups(yopt, ymodel)
    assert parameter_groups(lopt, lmodel) == ygroups
    lr_wd = {(dict(s)["lr"], dict(s)["weight_decay"]) for s in ygroups.values()}
    assert lr_wd == {(0.001, 0.05), (0.001, 0.0)}  # AdamW, no decay on norms and biases

    # The lr of every group at every iteration, as the trainers' LRScheduler hooks set it.
    ysched = build_lr_scheduler(ycfg, yopt)
    lsched = LRMultiplier(lopt, instantiate(lcfg.lr_multiplier), max_iter=lcfg.train.max_iter)
    ylrs, llrs = [], []
    for _ in range(ycfg.SOLVER.MAX_ITER):
        ylrs.append([g["lr"] for g in yopt.param_groups])
        llrs.append([g["lr"] for g in lopt.param_groups])
        yopt.step(), lopt.step()  # no gradients: nothing changes
        ysched.step(), lsched.step()
    assert len(llrs) == len(ylrs)
    for lr, ylr in zip(llrs, ylrs):  # 0.01 in the lazy config, 0.1 ** 2 in Detectron2's
        assert lr == pytest.approx(ylr, rel=1e-12)
    # Warm-up from 0.1 x lr over 100 iterations, x0.1 at 480 and 570 (of 600).
    assert sorted({round(lr, 9) for lr in llrs[100]}) == [0.001]
    ratios = [round(llrs[i][0] / llrs[100][0], 6) for i in (0, 50, 99, 479, 480, 569, 570, 599)]
    assert ratios == [0.1, 0.55, 0.991, 1, 0.1, 0.1, 0.01, 0.01]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dataset_specs(tiny_shapes(tmp_path_factory.mktemp("lazy_tiny"), 6, 4), "lazy")


def test_shapes_demo_yaml_and_lazy_loaders_give_the_same_batches(tiny):
    from detectron2.data import DatasetCatalog

    from vfnet.data.datasets import register_coco_dataset

    for spec in tiny.values():
        if spec.split("=")[0] not in DatasetCatalog.list():
            register_coco_dataset(spec)
    ycfg = yaml_config("VFNet_Shapes_Demo.yaml", "DATASETS.TRAIN", "('lazy_train',)",
                       "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SEED", "4",
                       "INPUT.MIN_SIZE_TRAIN", "(96, 112, 128)", "INPUT.MAX_SIZE_TRAIN", "192")  # fmt: skip
    lcfg = lazy_config("vfnet_shapes_demo.py", "dataloader.train.dataset.names=lazy_train",
                       "dataloader.train.num_workers=0", "dataloader.train.total_batch_size=2",
                       "train.seed=4", "dataloader.train.mapper.augmentations.0.short_edge_length=[96,112,128]",
                       "dataloader.train.mapper.augmentations.0.max_size=192")  # fmt: skip
    ybatches, lbatches = iter(Trainer.build_train_loader(ycfg)), iter(instantiate(lcfg.dataloader.train))
    sizes = set()
    for _ in range(4):
        for y, lz in zip(next(ybatches), next(lbatches)):
            assert y["file_name"] == lz["file_name"]
            assert torch.equal(y["image"], lz["image"])
            assert torch.equal(y["instances"].gt_boxes.tensor, lz["instances"].gt_boxes.tensor)
            sizes.add(min(y["image"].shape[1:]))
    assert len(sizes) > 1  # the short side is drawn from (96, 112, 128): the same draws


def test_fcos_shapes_demo_is_detectron2s_fcos_on_the_demo_backbone():
    from detectron2.modeling.meta_arch.fcos import FCOS, FCOSHead

    torch.manual_seed(0)
    fcos = instantiate(lazy_config("fcos_shapes_demo.py").model)
    torch.manual_seed(0)
    demo = instantiate(lazy_config("vfnet_shapes_demo.py").model)
    assert type(fcos) is FCOS and type(fcos.head) is FCOSHead
    assert fcos.num_classes == 4 and fcos.head.cls_score.out_channels == 4
    assert [m.out_channels for m in fcos.head.cls_subnet if isinstance(m, torch.nn.Conv2d)] == [64] * 4
    backbone = lambda m: [(n, tuple(p.shape)) for n, p in m.backbone.state_dict().items()]  # noqa: E731
    assert backbone(fcos) == backbone(demo)
    assert fcos.backbone.output_shape() == demo.backbone.output_shape()
    assert (fcos.test_score_thresh, fcos.center_sampling_radius) == (0.2, 1.5)  # FCOS's
    assert torch.equal(fcos.pixel_mean, demo.pixel_mean) and torch.equal(fcos.pixel_std, demo.pixel_std)


def lazy_train_net(config, tiny, output_dir, *args):
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"),
        "--config-file", os.path.join(LAZY, config),
        "--dataset", tiny["train"], "--dataset", tiny["val"], *args,
        f"train.output_dir={output_dir}",
        "dataloader.train.dataset.names=lazy_train", "dataloader.test.dataset.names=lazy_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "train.checkpointer.period=2", "train.seed=7",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


# FCOS's score threshold 0.2 would leave no detections after 3 iterations from scratch.
FCOS_OPTS = ["model.test_score_thresh=0.01", "train.gallery.num_images=0"]


@pytest.fixture(scope="module")
def fcos_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("fcos")
    log = lazy_train_net("fcos_shapes_demo.py", tiny, out, "train.max_iter=3", *FCOS_OPTS)
    return out, log


def test_lazy_fcos_trains_checkpoints_and_evaluates(fcos_run):
    out, log = fcos_run
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    with open(out / "inference" / "coco_instances_results.json") as f:
        assert json.load(f)  # detections, which the --eval-only run must reproduce
    ckpt = checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 2 and ckpt["trainer"]["optimizer"]["state"]
    assert ckpt["data_loader"] == {"seed": 7}  # train.seed, the resumable loader's data seed
    assert "head.cls_score.weight" in ckpt["model"] and "head.ctrness.weight" in ckpt["model"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "model_0000001.pth").exists()  # train.checkpointer.period 2
    rows = metrics(out)
    assert [r["iteration"] for r in rows if "total_loss" in r] == [2]
    assert any("bbox/AP" in r for r in rows)
    saved = LazyConfig.load(str(out / "config.yaml"))  # the lazy config, with the overrides
    assert saved.train.max_iter == 3 and saved.train.seed == 7
    assert saved.model._target_.endswith(".FCOS")


def test_lazy_fcos_eval_only_reproduces_the_evaluation_and_resume_continues(fcos_run, tiny, tmp_path):
    out, log = fcos_run
    eval_log = lazy_train_net(
        "fcos_shapes_demo.py", tiny, tmp_path / "eval", "--eval-only",
        f"train.init_checkpoint={out / 'model_final.pth'}", "train.max_itr=9", *FCOS_OPTS,
    )  # fmt: skip
    assert copypaste_metrics(eval_log) == copypaste_metrics(log)
    assert "Starting training" not in eval_log
    assert "The override of train.max_itr adds a key that" in eval_log
    assert "Did you mean train.max_iter" in eval_log

    resume_log = lazy_train_net("fcos_shapes_demo.py", tiny, out, "--resume", "train.max_iter=5", *FCOS_OPTS)
    assert "Starting training from iteration 3" in resume_log
    assert checkpoint(out / "model_final.pth")["iteration"] == 4
    assert [r["iteration"] for r in metrics(out) if "total_loss" in r] == [2, 4]
    copypaste_metrics(resume_log)


def test_lazy_vfnet_shapes_demo_trains_and_evaluates(tiny, tmp_path):
    out = tmp_path / "vfnet"
    log = lazy_train_net("vfnet_shapes_demo.py", tiny, out, "train.max_iter=2", "train.gallery.num_images=2")
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert checkpoint(out / "model_final.pth")["iteration"] == 1
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "config.yaml").exists() and (out / "detections.png").exists()
    assert "Pictures: " in log


def test_lazy_train_amp_trains_under_cpu_bf16_autocast(tiny, tmp_path):
    out = tmp_path / "vfnet_amp"
    log = lazy_train_net(
        "vfnet_shapes_demo.py", tiny, out, "train.max_iter=2", "train.gallery.num_images=0",
        "train.amp.enabled=True",
    )  # fmt: skip
    assert "Training under torch.autocast('cpu', dtype=torch.bfloat16)." in log
    ckpt = checkpoint(out / "model_final.pth")
    assert ckpt["iteration"] == 1
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    assert all(map(math.isfinite, (r["total_loss"] for r in metrics(out) if "total_loss" in r)))
    with pytest.raises(AssertionError, match="train.amp.dtype is 'float16', which trains on CUDA only"):
        lazy_train_net("vfnet_shapes_demo.py", tiny, tmp_path / "fp16", "train.max_iter=2",
                       "train.amp.enabled=True", "train.amp.dtype=float16")  # fmt: skip
