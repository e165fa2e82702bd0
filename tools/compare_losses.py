#!/usr/bin/env python
"""
FL vs QFL vs VFL (the paper's Table 5) on this project's data: trains Detectron2's RetinaNet and
FCOS and VFNet with each classification loss on the shapes demo (its configs, schedule and
seeds), optionally fine-tunes each on a one-class COCO-format dataset from its own shapes weights
(VFNet_Raccoon.yaml's schedule and sizes), then prints the table of box AP.

    python tools/compare_losses.py --seeds 0 1 --jobs 2 --threads 1
    R=../shared/datasets/raccoon
    python tools/compare_losses.py --seeds 0 1 --jobs 2 --threads 1 \\
        --finetune raccoon_train=$R/train.json:$R/images raccoon_val=$R/val.json:$R/images
    python tools/compare_losses.py --seeds 0 1 --table-only     # the table of what has run
    python tools/compare_losses.py --seeds 0 1 --dry-run        # the commands

Runs that already have their final evaluation in OUTPUT_ROOT are not run again; an interrupted
one continues from its last checkpoint (--resume).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from vfnet.data.datasets import SHAPES_PARAMS, default_shapes_root  # noqa: E402
from vfnet.data.shapes import ensure_shapes_dataset  # noqa: E402
from dev.loss_comparison import (  # noqa: E402

    FINETUNE_CONFIG,
    finetune_recipe,
    finetune_runs,
    format_table,
    run_all,
    shapes_runs,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--output-root", default="output/table5", help="relative to the repository root")
    p.add_argument("--finetune", nargs=2, metavar=("TRAIN", "VAL"),
                   help="NAME=JSON:IMAGE_DIR of the one-class training and validation sets")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--table-only", action="store_true", help="print the table of the runs done")
    p.add_argument("--dry-run", action="store_true", help="print the commands")
    args = p.parse_args(argv)
    if args.finetune:
        specs = []
        for spec in args.finetune:
            name, _, paths = spec.partition("=")
            json_file, _, image_dir = paths.partition(":")
            if not (name and json_file and image_dir):
                p.error(f"--finetune {spec}: expected NAME=JSON:IMAGE_DIR")
            # The runs start in the repository root.
            specs.append(f"{name}={os.path.abspath(json_file)}:{os.path.abspath(image_dir)}")
        args.finetune = specs

    runs = [r for s in args.seeds for r in shapes_runs(s, args.output_root)]
    datasets = {"shapes": "shapes demo"}
    if args.finetune:
        recipe = finetune_recipe(os.path.join(ROOT, FINETUNE_CONFIG))
        runs += [r for s in args.seeds for r in finetune_runs(s, args.output_root, *args.finetune, recipe)]
        datasets["finetune"] = args.finetune[1].split("=", 1)[0]
    if args.dry_run:
        for run in runs:
            print("python " + " ".join(f'"{a}"' if any(c in a for c in " ()[]'") else a for a in run.argv))
        return 0
    failed = []
    if not args.table_only:
        # Generated here once: parallel runs would each generate it at the same time.
        ensure_shapes_dataset(os.path.join(ROOT, default_shapes_root()), **SHAPES_PARAMS)
        codes = run_all(runs, ROOT, jobs=args.jobs, threads=args.threads,
                        log=lambda m: print(m, flush=True))  # fmt: skip
        failed = [out for out, code in codes.items() if code != 0]
    print(format_table(runs, ROOT, datasets))
    if failed:
        print(f"{len(failed)} runs failed (their logs: OUTPUT_DIR.log): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
