#!/usr/bin/env python
"""
Train MMDetection 3.3's own VFNet, FCOS or ATSS with its runner on a COCO-format dataset, with
the recipe of a Detectron2 config of this project (default: the shapes demo's), then evaluate it
with its COCO metric; OUTPUT_DIR/result.json holds the box AP and the loss curve (see
dev/mmdet_whole_run.py). Runs in the MMDetection parity environment (tools/install.sh
--parity-env); an interrupted run resumes from its last checkpoint.

    python tools/mmdet_train_net.py --detector VFNet --seed 0 \\
        --train datasets/vfnet_shapes/train.json:datasets/vfnet_shapes/train \\
        --val datasets/vfnet_shapes/val.json:datasets/vfnet_shapes/val --output-dir output/mm_vfnet
    python tools/mmdet_train_net.py ... --load-from init.pth      # MMDetection weights to start from
    python tools/mmdet_train_net.py ... --anchor-scale 4 --input-scale 2 SOLVER.MAX_ITER 300
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev.mmdet_whole_run import DEMO_CONFIG, MMDET_BASE, load_d2_recipe, mmdet_config, scaled_sizes, train_mmdet  # noqa: E402


def split_spec(p, option, spec):
    json_file, sep, image_dir = spec.partition(":")
    if not (sep and os.path.isfile(json_file) and os.path.isdir(image_dir)):
        p.error(f"{option} {spec}: expected JSON:IMAGE_DIR of an existing file and folder")
    return json_file, image_dir


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", choices=sorted(MMDET_BASE), required=True)
    p.add_argument("--config-file", default=DEMO_CONFIG, help="the Detectron2 config whose recipe is trained")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", required=True, metavar="JSON:IMAGE_DIR")
    p.add_argument("--val", required=True, metavar="JSON:IMAGE_DIR")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--load-from", help="an MMDetection checkpoint of the model to start from")
    p.add_argument("--anchor-scale", type=int, help="the ATSS anchor's side in strides (default 8)")
    p.add_argument("--input-scale", type=float, default=1.0, help="x the config's input sizes")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="overrides of the Detectron2 config (KEY VALUE ...)")
    args = p.parse_args(argv)
    train = split_spec(p, "--train", args.train)
    val = split_spec(p, "--val", args.val)
    if args.load_from and not os.path.isfile(args.load_from):
        p.error(f"--load-from {args.load_from}: no such file")
    with open(train[0]) as f:
        classes = [c["name"] for c in sorted(json.load(f)["categories"], key=lambda c: c["id"])]

    cfg = load_d2_recipe(args.config_file, args.opts)
    if args.input_scale != 1.0:
        cfg.merge_from_list([x for k, v in scaled_sizes(cfg, args.input_scale).items() for x in (k, v)])
    mm = mmdet_config(args.detector, cfg, train, val, classes, args.seed, args.output_dir, args.anchor_scale)
    bbox = train_mmdet(mm, load_from=args.load_from)
    print("box AP {AP:.2f}, AP50 {AP50:.2f}, AP75 {AP75:.2f}".format(**bbox))
    return 0


if __name__ == "__main__":
    sys.exit(main())
