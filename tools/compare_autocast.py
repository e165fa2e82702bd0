#!/usr/bin/env python
"""
Run a checkpoint on the images of DATASETS.TEST[0] in float32 and under TEST.AMP (autocast,
bfloat16 on CPU) and compare the detections above a score: how many, how many have no match in
the other run, the largest box and score differences of the matched ones.

    python tools/compare_autocast.py --config-file configs/VFNet_Raccoon.yaml \
        --dataset raccoon_val=$R/val.json:$R/images --score-thresh 0.3 \
        MODEL.WEIGHTS output/vfnet_raccoon/model_final.pth
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from vfnet.checkpoint.detection_checkpoint import load_for_evaluation  # noqa: E402
from vfnet.data.datasets import register_coco_dataset  # noqa: E402
from vfnet.engine import Trainer, default_argument_parser, setup  # noqa: E402
from dev.autocast_parity import compare_on_loader  # noqa: E402


def main():
    parser = default_argument_parser()
    parser.add_argument("--score-thresh", type=float, default=0.3)
    args = parser.parse_args()
    for spec in args.dataset:
        register_coco_dataset(spec)
    cfg = setup(args)
    models = {}
    for amp in (False, True):
        c = cfg.clone()
        c.defrost()
        c.TEST.AMP.ENABLED = amp
        models[amp] = Trainer.build_model(c)
        load_for_evaluation(models[amp], c.MODEL.WEIGHTS, c.OUTPUT_DIR)
        models[amp].eval()
    loader = Trainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    summary = compare_on_loader(models[False], models[True], loader, args.score_thresh)
    print(json.dumps({"dataset": cfg.DATASETS.TEST[0], "score_thresh": args.score_thresh, **summary}))


if __name__ == "__main__":
    main()
