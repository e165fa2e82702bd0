"""
FL vs QFL vs VFL on this project's data (the paper's Table 5): the training runs of Detectron2's
RetinaNet and FCOS and of VFNet with each classification loss, on the shapes demo and then
fine-tuned from those weights on a COCO-format dataset (the raccoons), and the table of their box
AP. Each run is a command of the project's tools; its output directory holds what the tool writes
(metrics.json with the final evaluation), so an interrupted comparison goes on where it stopped.
"""
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "DETECTORS",
    "FINETUNE_CONFIG",
    "LOSSES",
    "Run",
    "finetune_recipe",
    "finetune_runs",
    "final_ap",
    "format_table",
    "run_all",
    "shapes_runs",
]

LOSSES = ("focal", "quality_focal", "varifocal")
LOSS_NAMES = {"focal": "FL", "quality_focal": "QFL", "varifocal": "VFL"}
DETECTORS = ("RetinaNet", "FCOS", "VFNet")
FCOS_CONFIGS = {
    "focal": "configs/lazy/fcos_shapes_demo.py",
    "quality_focal": "configs/lazy/fcos_qfl_shapes_demo.py",
    "varifocal": "configs/lazy/fcos_vfl_shapes_demo.py",
}
# The fine-tuning recipe is VFNet's (configs/VFNet_Raccoon.yaml): RetinaNet and FCOS get its
# schedule and input sizes as overrides.
FINETUNE_CONFIG = "configs/VFNet_Raccoon.yaml"


@dataclass(frozen=True)
class Run:
    """One training run: `argv` (relative to the repository root) writes into `output_dir`."""

    data: str  # "shapes" or "finetune"
    detector: str
    loss: str
    seed: int
    argv: Tuple[str, ...]
    output_dir: str
    parent: Optional[str] = None  # the output_dir of the run whose final weights it starts from


def _output_dir(root: str, data: str, detector: str, loss: str, seed: int) -> str:
    return os.path.join(root, f"{data}_{detector.lower()}_{loss}_{seed}")


def shapes_runs(seed: int, root: str) -> List[Run]:
    """The shapes-demo runs of every detector and loss for `seed`, outputs under `root`."""
    runs = []
    for detector in DETECTORS:
        for loss in LOSSES:
            out = _output_dir(root, "shapes", detector, loss, seed)
            if detector == "FCOS":
                argv = ("tools/lazyconfig_train_net.py", "--config-file", FCOS_CONFIGS[loss],
                        "--resume", f"train.seed={seed}", f"train.output_dir={out}")  # fmt: skip
            elif detector == "RetinaNet":
                argv = ("tools/train_net.py", "--config-file", "configs/RetinaNet_VFL_Shapes_Demo.yaml",
                        "--resume", "SEED", str(seed), "MODEL.RETINANET.CLS_LOSS_TYPE", loss,
                        "OUTPUT_DIR", out)  # fmt: skip
            else:
                argv = ("tools/train_net.py", "--config-file", "configs/VFNet_Shapes_Demo.yaml",
                        "--resume", "SEED", str(seed), "MODEL.VFNET.CLS_LOSS_TYPE", loss,
                        "OUTPUT_DIR", out)  # fmt: skip
            runs.append(Run("shapes", detector, loss, seed, argv, out))
    return runs


def finetune_recipe(config_file: str) -> Dict[str, object]:
    """
    The fine-tuning schedule and input sizes of `config_file` (a VFNet YAML config): SOLVER's
    IMS_PER_BATCH, BASE_LR, WARMUP_ITERS, STEPS, MAX_ITER and INPUT's MIN_SIZE_TRAIN,
    MAX_SIZE_TRAIN, MIN_SIZE_TEST, MAX_SIZE_TEST, as {"SOLVER.BASE_LR": 0.001, ...}.
    """
    from detectron2.config import get_cfg

    from vfnet.config import add_vfnet_config

    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(config_file)
    keys = ["SOLVER." + k for k in ("IMS_PER_BATCH", "BASE_LR", "WARMUP_ITERS", "STEPS", "MAX_ITER")]
    keys += ["INPUT." + k for k in ("MIN_SIZE_TRAIN", "MAX_SIZE_TRAIN", "MIN_SIZE_TEST", "MAX_SIZE_TEST")]
    recipe = {}
    for key in keys:
        node = cfg
        for part in key.split("."):
            node = node[part]
        recipe[key] = node
    return recipe


def _lazy_overrides(recipe: Dict[str, object]) -> List[str]:
    """`recipe` as overrides of the FCOS shapes LazyConfigs (their fractions of the run)."""
    max_iter = recipe["SOLVER.MAX_ITER"]
    return [
        f"dataloader.train.total_batch_size={recipe['SOLVER.IMS_PER_BATCH']}",
        f"optimizer.lr={recipe['SOLVER.BASE_LR']}",
        f"train.max_iter={max_iter}",
        f"lr_multiplier.scheduler.num_updates={max_iter}",
        f"lr_multiplier.scheduler.milestones={list(recipe['SOLVER.STEPS'])}",
        f"lr_multiplier.warmup_length={recipe['SOLVER.WARMUP_ITERS'] / max_iter}",
        f"dataloader.train.mapper.augmentations.0.short_edge_length={list(recipe['INPUT.MIN_SIZE_TRAIN'])}",
        f"dataloader.train.mapper.augmentations.0.max_size={recipe['INPUT.MAX_SIZE_TRAIN']}",
        f"dataloader.test.mapper.augmentations.0.short_edge_length={recipe['INPUT.MIN_SIZE_TEST']}",
        f"dataloader.test.mapper.augmentations.0.max_size={recipe['INPUT.MAX_SIZE_TEST']}",
    ]


def _yaml_overrides(recipe: Dict[str, object]) -> List[str]:
    out = []
    for key, value in recipe.items():
        out += [key, str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)]
    return out


def finetune_runs(seed: int, root: str, train: str, val: str, recipe: Dict[str, object]) -> List[Run]:
    """
    The fine-tuning runs for `seed`: each detector and loss from the final weights of its own
    shapes run (same loss and seed), on the one-class COCO-format datasets `train` and `val`
    ("NAME=JSON:IMAGE_DIR", registered with --dataset), with VFNet's fine-tuning `recipe`
    (:func:`finetune_recipe`). The classification layers, of another number of classes, are not
    loaded.
    """
    train_name, val_name = train.split("=", 1)[0], val.split("=", 1)[0]
    datasets = ("--dataset", train, "--dataset", val)
    runs = []
    for parent in shapes_runs(seed, root):
        detector, loss = parent.detector, parent.loss
        out = _output_dir(root, "finetune", detector, loss, seed)
        weights = os.path.join(parent.output_dir, "model_final.pth")
        if detector == "FCOS":
            argv = ("tools/lazyconfig_train_net.py", "--config-file", FCOS_CONFIGS[loss], *datasets,
                    "--resume", f"train.seed={seed}", f"train.output_dir={out}",
                    f"train.init_checkpoint={weights}", "model.num_classes=1",
                    f"dataloader.train.dataset.names={train_name}",
                    f"dataloader.test.dataset.names={val_name}",
                    *_lazy_overrides(recipe))  # fmt: skip
        elif detector == "RetinaNet":
            argv = ("tools/train_net.py", "--config-file", "configs/RetinaNet_VFL_Shapes_Demo.yaml",
                    *datasets, "--resume", "SEED", str(seed), "MODEL.RETINANET.CLS_LOSS_TYPE", loss,
                    "MODEL.RETINANET.NUM_CLASSES", "1", "MODEL.WEIGHTS", weights,
                    "DATASETS.TRAIN", f"('{train_name}',)", "DATASETS.TEST", f"('{val_name}',)",
                    *_yaml_overrides(recipe), "OUTPUT_DIR", out)  # fmt: skip
        else:
            argv = ("tools/train_net.py", "--config-file", FINETUNE_CONFIG, *datasets, "--resume",
                    "SEED", str(seed), "MODEL.VFNET.CLS_LOSS_TYPE", loss,
                    "MODEL.WEIGHTS", weights, "DATASETS.TRAIN", f"('{train_name}',)",
                    "DATASETS.TEST", f"('{val_name}',)", "OUTPUT_DIR", out)  # fmt: skip
        runs.append(Run("finetune", detector, loss, seed, argv, out, parent=parent.output_dir))
    return runs


def final_ap(output_dir: str, metric: str = "bbox/AP") -> Optional[float]:
    """The last `metric` in `output_dir`/metrics.json (the run's final evaluation); None if none."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    value = None
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by an interruption
                continue
            if metric in record:
                value = record[metric]
    return value


def run_all(
    runs: Sequence[Run],
    repo_root: str,
    jobs: int = 1,
    threads: int = 0,
    log: Callable[[str], None] = print,
    result: Callable[[str], Optional[float]] = final_ap,
) -> Dict[str, int]:
    """
    Runs each of `runs` that has no final AP yet (`result` of its output directory: None;
    `jobs` at a time, each with `threads` torch threads when positive), after the run it starts
    from; its output goes to `output_dir`.log. Returns {output_dir: exit status} of the runs
    started (-1: not started, as its parent failed).
    """
    env = dict(os.environ)
    if threads > 0:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    futures: Dict[str, Future] = {}
    lock = threading.Lock()  # one message at a time from the pool's threads

    def report(message: str) -> None:
        with lock:
            log(message)

    def execute(run: Run) -> int:
        if run.parent is not None and run.parent in futures and futures[run.parent].result() != 0:
            report(f"skipped {run.output_dir}: {run.parent} failed")
            return -1
        os.makedirs(os.path.dirname(os.path.abspath(run.output_dir)) or ".", exist_ok=True)
        report(f"start {run.output_dir}: {' '.join(run.argv)}")
        with open(run.output_dir + ".log", "w") as out:
            code = subprocess.run(
                [sys.executable, *run.argv], cwd=repo_root, env=env, stdout=out, stderr=subprocess.STDOUT
            ).returncode
        ap = result(os.path.join(repo_root, run.output_dir))
        report(f"{'done' if code == 0 else f'FAILED (exit {code})'} {run.output_dir}: AP {ap}")
        return code

    # Parents come before their children in `runs`, and the pool starts runs in order: a child
    # waits only for a run already started.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for run in runs:
            if result(os.path.join(repo_root, run.output_dir)) is None:
                futures[run.output_dir] = pool.submit(execute, run)
    return {out: f.result() for out, f in futures.items()}


def format_table(runs: Sequence[Run], repo_root: str, datasets: Dict[str, str]) -> str:
    """
    A Markdown table of the final box AP of `runs`: a row per detector and data (`datasets`:
    their names in the table, {"shapes": "shapes demo", ...}), a column per loss, each cell
    "mean (seed a, seed b, ...)"; "..." for runs without a result.
    """
    seeds = sorted({r.seed for r in runs})
    lines = [
        "| detector | data | " + " | ".join(LOSS_NAMES[l] for l in LOSSES) + " |",
        "|---|---|" + "---|" * len(LOSSES),
    ]
    by_key = {(r.data, r.detector, r.loss, r.seed): r for r in runs}
    for data, data_name in datasets.items():
        for detector in DETECTORS:
            cells = []
            for loss in LOSSES:
                aps = []
                for seed in seeds:
                    run = by_key.get((data, detector, loss, seed))
                    aps.append(None if run is None else final_ap(os.path.join(repo_root, run.output_dir)))
                done = [a for a in aps if a is not None]
                per_seed = ", ".join("..." if a is None else f"{a:.1f}" for a in aps)
                cells.append(f"{sum(done) / len(done):.1f} ({per_seed})" if done else "...")
            lines.append(f"| {detector} | {data_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
