"""End to end: tools/train_net.py trains, checkpoints, evaluates, resumes, on a tiny dataset."""
import json
import os
import re
import subprocess
import sys
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from vfnet.data.shapes import generate_split  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 6), ("val", 4)):
        generate_split(str(root), split, n, seed=3, image_size=(64, 96))
    return root


def train_net(root, output_dir, *args):
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        "--dataset", f"tiny_train={root / 'train.json'}:{root / 'train'}",
        "--dataset", f"tiny_val={root / 'val.json'}:{root / 'val'}",
        *args, *TINY, "OUTPUT_DIR", str(output_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def copypaste_metrics(log):
    """The 'copypaste' AP line that Detectron2 prints after a COCO evaluation."""
    lines = re.findall(r"copypaste: ([-0-9.,nan]+)$", log, flags=re.M)
    assert lines, "no evaluation result in the log"
    return lines[-1]


def metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f]


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


def test_optimizer_follows_the_official_schedule():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.solver import build_lr_scheduler

    import vfnet

    from vfnet.engine import Trainer

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    model = build_model(cfg)
    optimizer = Trainer.build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        assert group["momentum"] == 0.9
        for p in group["params"]:
            if names[id(p)].endswith(".bias"):  # biases: lr x 2, no weight decay
                assert (group["lr"], group["weight_decay"]) == (0.02, 0.0), names[id(p)]
            else:
                assert (group["lr"], group["weight_decay"]) == (0.01, 1e-4), names[id(p)]
    # Linear warm-up from 0.1 x lr over 500 iterations, x0.1 at 60k and 80k.
    scheduler = build_lr_scheduler(cfg, optimizer)
    for it, expected in [(0, 0.1), (250, 0.55), (500, 1.0), (59999, 1.0), (60000, 0.1), (80000, 0.01)]:
        scheduler.last_epoch = it
        assert scheduler.get_last_lr() and scheduler.get_lr()[0] == pytest.approx(0.01 * expected), it


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
