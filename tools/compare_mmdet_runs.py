#!/usr/bin/env python
"""
Whole training runs of MMDetection 3.3 and of this project on the same data and recipe (the
shapes demo's), in the MMDetection parity environment (tools/install.sh --parity-env):

  parity    VFNet in both frameworks, each seed from MMDetection's initialisation of that seed
            (converted for this project): the loss curves and AP, and the verdict
  ordering  MMDetection's FCOS and ATSS; Detectron2's FCOS and this project's VFNet with the
            paper's Table 3 rows (raw VFNet = ATSS without centerness, +VFL, +star DCN, VFNet)
  small     small-object shapes sets (8-20 px, and 12-40 px): VFNet against the ATSS anchor
            scale (and the input scale), beside FCOS and RetinaNet, in both frameworks

    python tools/compare_mmdet_runs.py --studies parity --seeds 0 1 2 --jobs 2 --threads 1
    python tools/compare_mmdet_runs.py --studies ordering small --seeds 0 1 2 --jobs 2 --threads 1
    python tools/compare_mmdet_runs.py --table-only     # the tables and the verdict of what has run
    python tools/compare_mmdet_runs.py --smoke --train T.json:T/ --val V.json:V/   # 2 iterations

Each run prints a line when it starts and ends; runs with a result are not run again, and an
interrupted one resumes from its last checkpoint. The results of every finished run go to
--summary (JSON), the loss curves of the parity runs to --plot.
"""
import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # dev/

from vfnet.data.datasets import SHAPES_PARAMS, default_shapes_root  # noqa: E402
from vfnet.data.shapes import ensure_shapes_dataset  # noqa: E402
from dev.loss_comparison import run_all  # noqa: E402
from dev.mmdet_whole_run import (  # noqa: E402
    DEMO_CONFIG,
    SMALL_OBJECT_SETS,
    Plan,
    format_table,
    format_verdict,
    load_d2_recipe,
    mmdet_config,
    ordering_runs,
    parity_runs,
    plot_losses,
    read_result,
    small_object_runs,
    summarize,
    verdict,
    write_init,
)

# Two iterations of 2 images: both frameworks start, log and evaluate.
SMOKE_OPTS = ("SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
              "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0")  # fmt: skip


def split_spec(p, option, spec):
    json_file, sep, image_dir = spec.partition(":")
    if not (sep and os.path.isfile(json_file) and os.path.isdir(image_dir)):
        p.error(f"{option} {spec}: expected JSON:IMAGE_DIR of an existing file and folder")
    return os.path.abspath(json_file), os.path.abspath(image_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", nargs="+", choices=("parity", "ordering", "small"), default=["parity"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--small-seeds", type=int, nargs="+", default=[0], help="seeds of the small-object study")
    p.add_argument("--no-table3", action="store_true", help="ordering: the raw VFNet and VFNet only")
    p.add_argument("--train", metavar="JSON:IMAGE_DIR", help="default: the shapes demo's training set")
    p.add_argument("--val", metavar="JSON:IMAGE_DIR", help="default: the shapes demo's validation set")
    p.add_argument("--output-root", default="output/mmdet_runs", help="relative to the repository root")
    p.add_argument("--summary", help="the results as JSON (default: OUTPUT_ROOT/summary.json)")
    p.add_argument("--plot", help="the parity runs' loss curves (default: OUTPUT_ROOT/losses.png)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    p.add_argument("--smoke", action="store_true", help="2 iterations of the parity study, seed 0")
    p.add_argument("--table-only", action="store_true", help="the tables of the runs done")
    p.add_argument("--dry-run", action="store_true", help="print the commands")
    p.add_argument("--only", metavar="REGEX", help="run (or print) only the runs whose output folder's name matches; "
                   "the tables still show every run done")
    args = p.parse_args(argv)
    if bool(args.train) != bool(args.val):
        p.error("--train and --val go together")
    if args.smoke:
        if not args.train:
            p.error("--smoke needs --train and --val (a small dataset)")
        args.studies, args.seeds = ["parity"], [0]
    root = os.path.join(ROOT, args.output_root)
    summary_path = args.summary or os.path.join(root, "summary.json")
    plot_path = args.plot or os.path.join(root, "losses.png")

    if args.train:
        data = {"demo": (split_spec(p, "--train", args.train), split_spec(p, "--val", args.val))}
    else:
        shapes = ensure_shapes_dataset(os.path.join(ROOT, default_shapes_root()), **SHAPES_PARAMS)
        data = {"demo": (shapes["train"], shapes["val"])}
    if "small" in args.studies:
        for name, params in SMALL_OBJECT_SETS.items():
            small = ensure_shapes_dataset(os.path.join(ROOT, f"{default_shapes_root()}_{name}"), **params)
            data[name] = (small["train"], small["val"])
    with open(data["demo"][0][0]) as f:
        classes = tuple(c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"]))
    opts = SMOKE_OPTS if args.smoke else ()
    lazy_opts = ("train.max_iter=2",) if args.smoke else ()
    plans = {name: Plan(train, val, classes, os.path.join(root, name), opts, lazy_opts)
             for name, (train, val) in data.items()}  # fmt: skip

    runs = []
    if "parity" in args.studies:
        runs += parity_runs(plans["demo"], args.seeds)
    if "ordering" in args.studies:
        runs += ordering_runs(plans["demo"], args.seeds, table3=not args.no_table3)
    if "small" in args.studies:
        runs += small_object_runs(plans["small"], args.small_seeds)
        runs += small_object_runs(plans["small_12_40"], args.small_seeds, "small_12_40", anchor_scales=(8, 4, 2),
                                  input_scales=(), retinanet=False)  # fmt: skip
    chosen = [r for r in runs if not args.only or re.search(args.only, os.path.basename(r.output_dir))]
    if args.dry_run:
        for run in chosen:
            print("python " + " ".join(f'"{a}"' if any(c in a for c in " ()[]'") else a for a in run.argv))
        return 0

    failed = []
    if not args.table_only:
        # MMDetection's initialisation of each parity seed, for both frameworks.
        plan = plans["demo"]
        cfg = load_d2_recipe(DEMO_CONFIG, opts)
        for seed in sorted({r.seed for r in chosen if r.init}):
            init_mm, init_d2 = plan.init_paths(seed)
            if not (os.path.isfile(init_mm) and os.path.isfile(init_d2)):
                os.makedirs(os.path.dirname(init_mm), exist_ok=True)
                mm = mmdet_config("VFNet", cfg, plan.train, plan.val, classes, seed, os.path.dirname(init_mm))
                write_init("VFNet", mm, init_mm, seed, init_d2, DEMO_CONFIG,
                           ["MODEL.VFNET.NUM_CLASSES", str(len(classes))])  # fmt: skip
                print(f"init {init_mm}, {init_d2}: MMDetection's initialisation, seed {seed}", flush=True)
        codes = run_all(
            chosen, ROOT, jobs=args.jobs, threads=args.threads, log=lambda m: print(m, flush=True),
            result=lambda out: (read_result(out) or {}).get("bbox", {}).get("AP"),
        )
        failed = [out for out, code in codes.items() if code != 0]

    summary = summarize(runs)
    os.makedirs(os.path.dirname(os.path.abspath(summary_path)), exist_ok=True)
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=1)
    for study in args.studies:
        for name in (s for s in sorted({r.study for r in runs}) if s.startswith(study)):
            print(f"\n{name}:\n{format_table(summary, name)}")
    if "parity" in args.studies:
        try:
            rows = verdict(summary)
        except ValueError as e:
            print(f"\nno verdict yet: {e}")
        else:
            print("\nverdict (framework means within the larger seed spread):\n" + format_verdict(rows))
            plot_losses(summary, plot_path)
            print(f"loss curves: {plot_path}")
    if failed:
        print(f"{len(failed)} runs failed (their logs: OUTPUT_DIR.log): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
