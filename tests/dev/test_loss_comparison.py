"""
tools/compare_losses.py (dev/loss_comparison.py): the commands of the FL / QFL / VFL
comparison build each detector with its loss and the recipe it claims, the runner runs what is
missing in order, and the table reports what the runs wrote.
"""
import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import LazyConfig, get_cfg  # noqa: E402

import vfnet  # noqa: E402
from vfnet.engine.defaults import default_argument_parser, merge_config  # noqa: E402
from dev.loss_comparison import (  # noqa: E402
    DETECTORS,
    LOSSES,
    Run,
    final_ap,
    finetune_recipe,
    finetune_runs,
    format_table,
    run_all,
    shapes_runs,
)

from helpers import ROOT  # noqa: E402

TRAIN = "rac_train=/data/train.json:/data/images"
VAL = "rac_val=/data/val.json:/data/images"


def config_of(run: Run):
    """The config a run's command trains with, parsed as its tool parses it."""
    args = default_argument_parser().parse_args(run.argv[1:])
    path = os.path.join(ROOT, args.config_file)
    if run.argv[0].endswith("lazyconfig_train_net.py"):
        return args, LazyConfig.apply_overrides(LazyConfig.load(path), args.opts)
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    merge_config(cfg, path, args.opts)
    return args, cfg


def loss_of(detector, cfg):
    if detector == "FCOS":
        return cfg.model.get("cls_loss_type", "focal")  # Detectron2's own FCOS: the focal loss
    return cfg.MODEL.RETINANET.CLS_LOSS_TYPE if detector == "RetinaNet" else cfg.MODEL.VFNET.CLS_LOSS_TYPE


def test_shapes_commands_differ_only_in_the_loss_and_train_each_detector_with_its_own():
    runs = shapes_runs(1, "out/t5")
    assert [(r.detector, r.loss) for r in runs] == [(d, l) for d in DETECTORS for l in LOSSES]
    assert len({r.output_dir for r in runs}) == len(runs)
    for run in runs:
        args, cfg = config_of(run)
        assert args.resume and loss_of(run.detector, cfg) == run.loss
        if run.detector == "FCOS":
            assert cfg.train.seed == 1 and cfg.train.output_dir == run.output_dir
            assert cfg.train.max_iter == 600 and cfg.optimizer.lr == 0.001
        else:
            assert cfg.SEED == 1 and cfg.OUTPUT_DIR == run.output_dir
            assert cfg.SOLVER.MAX_ITER == 600 and cfg.SOLVER.BASE_LR == 0.001
            arch = {"RetinaNet": "IoUAwareRetinaNet", "VFNet": "VFNet"}[run.detector]
            assert cfg.MODEL.META_ARCHITECTURE == arch


def test_finetune_commands_start_from_their_shapes_weights_with_vfnets_recipe():
    recipe = finetune_recipe(os.path.join(ROOT, "configs", "VFNet_Raccoon.yaml"))
    assert recipe["SOLVER.MAX_ITER"] == 300 and recipe["SOLVER.STEPS"] == (220, 280)
    assert recipe["INPUT.MIN_SIZE_TRAIN"] == (256, 288, 320) and recipe["INPUT.MAX_SIZE_TEST"] == 427
    parents = {r.output_dir for r in shapes_runs(0, "out/t5")}
    for run in finetune_runs(0, "out/t5", TRAIN, VAL, recipe):
        args, cfg = config_of(run)
        assert args.dataset == [TRAIN, VAL] and loss_of(run.detector, cfg) == run.loss
        assert run.parent in parents and f"_{run.loss}_0" in run.parent and run.detector.lower() in run.parent
        weights = os.path.join(run.parent, "model_final.pth")
        if run.detector == "FCOS":
            assert cfg.train.init_checkpoint == weights and cfg.model.num_classes == 1
            assert cfg.dataloader.train.dataset.names == "rac_train"
            assert cfg.dataloader.test.dataset.names == "rac_val"
            assert cfg.train.max_iter == 300 and list(cfg.lr_multiplier.scheduler.milestones) == [220, 280]
            assert cfg.lr_multiplier.warmup_length * 300 == pytest.approx(50)
            assert cfg.dataloader.train.total_batch_size == 8 and cfg.optimizer.lr == 0.001
            assert list(cfg.dataloader.train.mapper.augmentations[0].short_edge_length) == [256, 288, 320]
            assert cfg.dataloader.test.mapper.augmentations[0].max_size == 427
        else:
            assert cfg.MODEL.WEIGHTS == weights
            assert cfg.DATASETS.TRAIN == ("rac_train",) and cfg.DATASETS.TEST == ("rac_val",)
            num_classes = cfg.MODEL.RETINANET.NUM_CLASSES if run.detector == "RetinaNet" else cfg.MODEL.VFNET.NUM_CLASSES
            assert num_classes == 1
            for key, value in recipe.items():
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert node == value, key


def write_metrics(output_dir, *aps):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": 9, "total_loss": 1.0}) + "\n")
        for ap in aps:
            f.write(json.dumps({"iteration": 9, "bbox/AP": ap, "bbox/AP50": ap + 10}) + "\n")


def test_final_ap_is_the_last_evaluation_and_survives_a_cut_line(tmp_path):
    assert final_ap(str(tmp_path)) is None
    write_metrics(str(tmp_path), 10.0, 12.5)
    with open(tmp_path / "metrics.json", "a") as f:
        f.write('{"iteration": 10, "bbox/A')  # killed while writing
    assert final_ap(str(tmp_path)) == 12.5
    assert final_ap(str(tmp_path), "bbox/AP50") == 22.5


def test_table_cells_are_the_mean_and_each_seed(tmp_path):
    runs = [r for s in (0, 1) for r in shapes_runs(s, "t5")]
    for run in runs:
        if run.detector == "VFNet" and run.loss == "varifocal":
            write_metrics(str(tmp_path / run.output_dir), 60.0 + run.seed)
        elif run.detector == "FCOS" and run.loss == "focal" and run.seed == 0:
            write_metrics(str(tmp_path / run.output_dir), 50.25)
    table = format_table(runs, str(tmp_path), {"shapes": "shapes demo"}).splitlines()
    assert table[0] == "| detector | data | FL | QFL | VFL |"
    assert table[3] == "| FCOS | shapes demo | 50.2 (50.2, ...) | ... | ... |"
    assert table[4] == "| VFNet | shapes demo | ... | ... | 60.5 (60.0, 61.0) |"


def test_runner_runs_what_is_missing_children_after_parents_and_not_after_a_failure(tmp_path):
    # A stand-in training tool: appends its name to a log, fails for "bad", else writes an AP.
    tool = tmp_path / "tool.py"
    tool.write_text(
        "import json, os, sys\n"
        "out, parent = sys.argv[1], sys.argv[2]\n"
        "open(os.path.join(os.path.dirname(out), 'order'), 'a').write(os.path.basename(out) + '\\n')\n"
        "assert parent == '-' or os.path.exists(os.path.join(parent, 'metrics.json')), parent\n"
        "if 'bad' in out: sys.exit(3)\n"
        "os.makedirs(out, exist_ok=True)\n"
        "open(os.path.join(out, 'metrics.json'), 'w').write(json.dumps({'bbox/AP': 1.0}) + '\\n')\n"
    )

    def run(name, parent=None):
        out = str(tmp_path / name)
        return Run("d", "X", "focal", 0, (str(tool), out, parent or "-"), out, parent=parent)

    write_metrics(str(tmp_path / "done"), 5.0)
    runs = [run("done"), run("a"), run("bad"), run("a2", str(tmp_path / "a")),
            run("bad2", str(tmp_path / "bad")), run("done2", str(tmp_path / "done"))]  # fmt: skip
    logs = []
    codes = run_all(runs, ROOT, jobs=2, log=logs.append)
    assert codes == {str(tmp_path / n): c for n, c in (("a", 0), ("bad", 3), ("a2", 0), ("bad2", -1), ("done2", 0))}
    order = (tmp_path / "order").read_text().split()
    assert sorted(order) == ["a", "a2", "bad", "done2"]  # "done" not run again, "bad2" not started
    assert order.index("a") < order.index("a2")
    assert final_ap(str(tmp_path / "a2")) == 1.0 and final_ap(str(tmp_path / "done")) == 5.0
    assert (tmp_path / "bad.log").exists() and any("FAILED (exit 3)" in m for m in logs)
    # A second call finds everything but the failures done.
    assert set(run_all(runs, ROOT, jobs=1, log=logs.append)) == {str(tmp_path / "bad"), str(tmp_path / "bad2")}


def test_runner_messages_from_parallel_runs_do_not_interleave(tmp_path):
    # print() writes a message and its newline in two calls; a log that yields between its two
    # writes, as print can, must still see each message whole when runs end together.
    pieces = []

    def log(message):
        pieces.append(message)
        time.sleep(0.05)
        pieces.append("\n")

    runs = [Run("d", "X", "focal", 0, ("-c", "pass"), str(tmp_path / f"r{i}")) for i in range(4)]
    assert set(run_all(runs, ROOT, jobs=4, log=log).values()) == {0}
    lines = "".join(pieces).splitlines()
    assert len(lines) == 8 and all(l.startswith(("start ", "done ")) for l in lines)
    assert sorted(l.split()[1].rstrip(":") for l in lines) == sorted(r.output_dir for r in runs for _ in "ab")


def test_tool_prints_the_commands_and_refuses_a_malformed_dataset():
    tool = [sys.executable, os.path.join(ROOT, "tools", "compare_losses.py")]
    done = subprocess.run([*tool, "--seeds", "0", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(DETECTORS) * len(LOSSES)
    assert lines[0].startswith("python tools/train_net.py --config-file configs/RetinaNet_VFL_Shapes_Demo.yaml")
    done = subprocess.run(
        [*tool, "--finetune", "rac_train=/x.json", VAL, "--dry-run"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "expected NAME=JSON:IMAGE_DIR" in done.stderr
