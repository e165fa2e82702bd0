"""
Stochastic weight averaging (SOLVER.SWA.*): the cyclic learning rate against mmcv's formula, the
average against the epoch-end weights the run checkpointed, BatchNorm statistics recomputed for
the average, the average evaluated and loadable by --eval-only, a resume within the SWA phase,
and SWA under two DDP workers.
"""
import collections
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.solver import build_lr_scheduler as detectron2_lr_scheduler  # noqa: E402

import vfnet  # noqa: E402
from vfnet.solver import build_lr_scheduler  # noqa: E402

from helpers import ROOT, TINY, dataset_specs, start_deterministic, tiny_shapes  # noqa: E402
from helpers import finish as finish_run  # noqa: E402



def official_cyclic_lr(base_lr, iteration, epoch_iters, target_ratio=(1.0, 0.01)):
    """mmcv's CyclicLrUpdaterHook, step_ratio_up 0: annealing_cos over each cycle."""
    start, end = base_lr * target_ratio[0], base_lr * target_ratio[1]
    progress = (iteration % epoch_iters) / epoch_iters
    return end + 0.5 * (start - end) * (math.cos(math.pi * progress) + 1)


def schedule_cfg(*opts):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.01", "SOLVER.SWA.ENABLED", "True", *opts])
    return cfg


def lr_at(scheduler, iteration):
    scheduler.last_epoch = iteration
    return scheduler.get_lr()


def test_the_swa_learning_rate_is_the_official_cyclic_one_after_detectron2s_schedule():
    # A short run stepped through: 10 normal iterations (warm-up 3, steps at 6 and 8), then 3
    # SWA epochs of 5 iterations.
    opts = ["SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(6, 8)", "SOLVER.WARMUP_ITERS", "3",
            "SOLVER.SWA.EPOCHS", "3", "SOLVER.SWA.EPOCH_ITERS", "5"]  # fmt: skip
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": params[:1], "lr": 0.01}], lr=0.01)
    scheduler = build_lr_scheduler(schedule_cfg(*opts), optimizer)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    normal = detectron2_lr_scheduler(schedule_cfg(*opts[:6], "SOLVER.SWA.ENABLED", "False"), reference)
    for i in range(10):
        assert lrs[i] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12), i
        reference.step()
        normal.step()
    assert lrs[9] == pytest.approx(0.01 * 0.1 * 0.1)
    for i in range(10, 25):
        assert lrs[i] == pytest.approx(official_cyclic_lr(0.01, i - 10, 5), rel=1e-12), i
    # Each epoch starts at the base lr; its middle is (1 + 0.01) / 2 of it (cos(pi / 2) = 0).
    assert lrs[10] == lrs[15] == lrs[20] == pytest.approx(0.01)
    assert official_cyclic_lr(0.01, 2, 4) == pytest.approx(0.00505)


@pytest.mark.parametrize("normal_iters", [87960, 0])
def test_the_swa_learning_rate_at_the_official_coco_iterations(normal_iters):
    # VFNet R-50 1x (12 epochs of 7330 iterations) then SWA for 12 epochs, or SWA only
    # (SOLVER.MAX_ITER 0, from MODEL.WEIGHTS). Parameter groups keep their own factor (the
    # biases' lr x 2).
    cfg = schedule_cfg("SOLVER.MAX_ITER", str(normal_iters), "SOLVER.STEPS", "(58640, 80630)",
                       "SOLVER.SWA.EPOCHS", "12", "SOLVER.SWA.EPOCH_ITERS", "7330")  # fmt: skip
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in (0.01, 0.02)]
    scheduler = build_lr_scheduler(cfg, torch.optim.SGD(groups, lr=0.01))
    if normal_iters:
        assert lr_at(scheduler, 0) == pytest.approx([0.01e-3, 0.02e-3])  # WARMUP_FACTOR 0.001
        assert lr_at(scheduler, 58639) == pytest.approx([0.01, 0.02])
        assert lr_at(scheduler, 58640) == pytest.approx([0.001, 0.002])
        assert lr_at(scheduler, 87959) == pytest.approx([0.0001, 0.0002])
    for j in (0, 1, 3665, 7329, 7330, 7331, 40000, 87959):
        expected = [official_cyclic_lr(base, j, 7330) for base in (0.01, 0.02)]
        assert lr_at(scheduler, normal_iters + j) == pytest.approx(expected, rel=1e-9), j
    assert lr_at(scheduler, normal_iters + 3665) == pytest.approx([0.00505, 0.0101])


# --- runs -------------------------------------------------------------------------------------

# 4 normal iterations, then 3 SWA epochs of 2 iterations (the last of each: 5, 7, 9), with a
# checkpoint every 2 iterations, so that each SWA epoch's last weights are checkpointed.
SWA_OPTS = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)",
            "SOLVER.SWA.ENABLED", "True", "SOLVER.SWA.EPOCHS", "3", "SOLVER.SWA.EPOCH_ITERS", "2",
            "SOLVER.SWA.BN_UPDATE_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "2"]  # fmt: skip
EPOCH_ENDS = ["model_0000005.pth", "model_0000007.pth", "model_0000009.pth"]


@pytest.fixture(scope="module")
def swa_data(tmp_path_factory):
    root = tiny_shapes(tmp_path_factory.mktemp("swa_data"), 8, 3, seed=11, image_size=(56, 80))
    return dataset_specs(root, "swa")


def train_net(output_dir, *args, num_gpus=1):
    return [
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        "--num-gpus", str(num_gpus), *args, *TINY, *SWA_OPTS,
        "MODEL.VFNET.NUM_CLASSES", "4", "DATASETS.TRAIN", "('swa_train',)",
        "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip


def parameters_of(path):
    return torch.load(path, weights_only=False)["model"]


def assert_is_the_mean_of_the_epoch_ends(output_dir):
    swa = torch.load(output_dir / "model_swa.pth", weights_only=False)
    assert swa["swa_n_averaged"] == 3 and swa["iteration"] == 9
    snapshots = [parameters_of(output_dir / f) for f in EPOCH_ENDS]
    names = [n for n, v in snapshots[0].items() if v.is_floating_point() and "norm.running" not in n]
    moved = 0
    for name in names:
        mean = sum(s[name].double() for s in snapshots) / 3
        scale = float(mean.abs().max().clamp(min=1e-12))
        assert float((swa["model"][name].double() - mean).abs().max()) <= 1e-6 * scale, name
        moved += not torch.equal(snapshots[0][name], snapshots[2][name])
    assert moved > 0.9 * len(names)  # the weights changed between the epochs' ends
    return swa


def test_swa_under_two_ddp_workers_averages_the_epoch_ends_evaluates_and_reloads(tmp_path, swa_data):
    out = tmp_path / "ddp"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
           *train_net(out, "--dataset", swa_data["train"], "--dataset", swa_data["val"],
                      "DATASETS.TEST", "('swa_val',)", "TEST.EVAL_PERIOD", "100",
                      "MODEL.VFNET.TEST_SCORE_THRESH", "0.0", "TEST.GALLERY.NUM_IMAGES", "2",
                      num_gpus=2)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "on 2 devices" in log and (out / "log.txt.rank1").exists()
    assert "recomputing the statistics of 20 BatchNorm layers" in log  # ResNet-18 with BN
    assert_is_the_mean_of_the_epoch_ends(out)
    # The run ends with its pictures (main process) and says where they are, after its AP.
    pictures = [out / f for f in ("detections.png", "ap.png", "losses.png", "lr.png")]
    assert all(p.stat().st_size > 1000 for p in pictures)
    last = [line for line in log.splitlines() if "vfnet.engine.hooks" in line][-3:]
    assert "bbox: AP " in last[0] and "bbox_swa: AP " in last[1]
    assert last[2].endswith("Pictures: " + ", ".join(str(p) for p in pictures))

    # Evaluated after each SWA epoch, and the final model's once; the last of each in metrics.
    assert log.count("Evaluation results for swa_val") == 3 + 1
    metrics = [json.loads(line) for line in open(out / "metrics.json")]
    assert any("bbox_swa/AP" in m for m in metrics) and any("bbox/AP" in m for m in metrics)
    with open(out / "inference_swa" / "coco_instances_results.json") as f:
        during_training = json.load(f)
    # Score threshold 0: every one of the 3 images has detections, at most 100 (the cap; NMS may
    # leave fewer).
    per_image = collections.Counter(d["image_id"] for d in during_training)
    assert len(per_image) == 3 and all(0 < n <= 100 for n in per_image.values()), per_image

    # --eval-only loads model_swa.pth like any checkpoint and gives the same detections.
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
           *train_net(tmp_path / "eval", "--eval-only", "--dataset", swa_data["val"],
                      "DATASETS.TEST", "('swa_val',)", "MODEL.VFNET.TEST_SCORE_THRESH", "0.0",
                      "MODEL.WEIGHTS", str(out / "model_swa.pth"))]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with open(tmp_path / "eval" / "inference" / "coco_instances_results.json") as f:
        evaluated = json.load(f)
    assert by_image_and_class(evaluated).keys() == by_image_and_class(during_training).keys()
    for key, scores in by_image_and_class(during_training).items():
        assert by_image_and_class(evaluated)[key] == pytest.approx(scores, abs=1e-4), key
    best = lambda dets: {d["image_id"]: d for d in sorted(dets, key=lambda d: d["score"])}  # noqa: E731
    for image_id, det in best(during_training).items():
        assert best(evaluated)[image_id]["bbox"] == pytest.approx(det["bbox"], abs=1e-2)


def by_image_and_class(detections):
    """{(image_id, category_id): the detections' scores, sorted}"""
    groups = {}
    for d in detections:
        groups.setdefault((d["image_id"], d["category_id"]), []).append(d["score"])
    return {k: sorted(v) for k, v in groups.items()}


def start(output_dir, swa_data, kill=(), resume=()):
    """A deterministic tools/train_net.py run of SWA_OPTS on swa_data's training set."""
    args = train_net(output_dir, *resume, "--dataset", swa_data["train"], "DATASETS.TEST", "()")
    return start_deterministic(f"{output_dir}.log", kill, args)


def finish(proc, output_dir, returncode=0):
    finish_run(proc, f"{output_dir}.log", returncode)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, swa_data):
    """Two uninterrupted single-process runs (their output directories)."""
    root = tmp_path_factory.mktemp("swa_runs")
    runs = [root / "straight", root / "again"]
    procs = [start(d, swa_data) for d in runs]  # two processes at a time
    for proc, d in zip(procs, runs):
        finish(proc, d)
    return runs


def test_a_run_killed_within_swa_resumes_to_the_same_average(tmp_path, swa_data, uninterrupted):
    straight, again = uninterrupted
    killed = tmp_path / "killed"
    # Killed after iteration 6: after the first average (iteration 5, checkpointed), before
    # the second.
    finish(start(killed, swa_data, kill=("--kill-after-iter", "6")), killed, -9)
    assert (killed / "last_checkpoint").read_text() == "model_0000005.pth"
    assert torch.load(killed / "model_swa.pth", weights_only=False)["swa_n_averaged"] == 1
    finish(start(killed, swa_data, resume=("--resume",)), killed)
    assert "Starting training from iteration 6" in open(f"{killed}.log").read()

    reference = torch.load(straight / "model_swa.pth", weights_only=False)
    # Two uninterrupted runs under these settings are bitwise equal, and so is the resumed
    # run's average.
    for d in (again, killed):
        ours = torch.load(d / "model_swa.pth", weights_only=False)
        assert ours["swa_n_averaged"] == reference["swa_n_averaged"] == 3, d
        assert ours["model"].keys() == reference["model"].keys()
        for name, value in reference["model"].items():
            assert torch.equal(ours["model"][name], value), (d.name, name)
    assert_is_the_mean_of_the_epoch_ends(straight)
    # The average is in the trainer's checkpoints: at iteration 9 it is model_swa.pth's.
    hooks = torch.load(straight / "model_final.pth", weights_only=False)["trainer"]["hooks"]
    averaged = hooks["StochasticWeightAveraging"]["averaged"]
    assert int(averaged["n_averaged"]) == 3
    for name in ("head.cls_score.weight", "backbone.fpn_output3.weight"):
        assert torch.equal(averaged[f"module.{name}"], reference["model"][name])


def test_swa_recomputes_trainable_batchnorm_statistics_for_the_average(swa_data, uninterrupted):
    """The stem's BatchNorm statistics of model_swa.pth, computed here from the same batches."""
    from vfnet.data.datasets import register_coco_dataset
    from vfnet.engine import Trainer

    out = uninterrupted[0]
    swa = torch.load(out / "model_swa.pth", weights_only=False)["model"]
    if "swa_train" not in DatasetCatalog.list():
        register_coco_dataset(swa_data["train"])
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(str(out / "config.yaml"))
    model = Trainer.build_model(cfg)
    model.load_state_dict(swa)
    stem = model.backbone.bottom_up.stem.conv1
    means, variances = [], []
    with torch.no_grad():
        # update_bn's batches: the first BN_UPDATE_ITERS (2) of a new training loader.
        for batch in itertools.islice(Trainer.build_train_loader(cfg), 2):
            x = model.preprocess_image(batch).tensor
            y = F.conv2d(x, stem.weight, stride=2, padding=3).transpose(0, 1).flatten(1)
            means.append(y.mean(1))
            variances.append(y.var(1, unbiased=True))
    # update_bn's cumulative average (momentum None): the mean over the batches.
    prefix = "backbone.bottom_up.stem.conv1.norm."
    assert torch.allclose(swa[prefix + "running_mean"], sum(means) / 2, rtol=1e-4, atol=1e-5)
    assert torch.allclose(swa[prefix + "running_var"], sum(variances) / 2, rtol=1e-4, atol=1e-5)
    final = parameters_of(out / "model_final.pth")
    assert not torch.allclose(final[prefix + "running_mean"], sum(means) / 2, rtol=1e-3)


def test_the_r50_swa_config_continues_the_1x_schedule_with_12_swa_epochs():
    from vfnet.solver import swa_schedule

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_R_50_FPN_1x_SWA.yaml"))
    schedule = swa_schedule(cfg)
    assert schedule.start_iter == cfg.SOLVER.MAX_ITER == 12 * 7330
    assert (schedule.epochs, schedule.epoch_iters, schedule.max_iter) == (12, 7330, 24 * 7330)
    assert tuple(cfg.SOLVER.SWA.LR_FACTORS) == (1.0, 0.01) and cfg.SOLVER.BASE_LR == 0.01
