#!/usr/bin/env python
"""
Train and evaluate VarifocalNet with Detectron2's DefaultTrainer.

    python tools/train_net.py --config-file configs/VFNet_Shapes_Demo.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CONFIG --resume
    python tools/train_net.py --config-file CONFIG --dataset mine_train=train.json:images/ \
        --dataset mine_val=val.json:images/ DATASETS.TRAIN "('mine_train',)" \
        DATASETS.TEST "('mine_val',)" MODEL.VFNET.NUM_CLASSES 3
"""
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator

import vfnet

_create_ddp_model = d2_defaults.create_ddp_model


def create_ddp_model(model, **kwargs):
    """
    Detectron2's `create_ddp_model`, which DefaultTrainer calls, also for CPU workers (gloo, as
    `launch` starts them without GPUs): DistributedDataParallel takes no device_ids for a CPU
    model.
    """
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _create_ddp_model(model, **kwargs)


d2_defaults.create_ddp_model = create_ddp_model


class Trainer(DefaultTrainer):
    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def add_dataset_argument(parser):
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    return parser


def setup(args):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    # Registered in every worker process: launch() starts them fresh.
    for spec in args.dataset:
        vfnet.register_coco_dataset(spec)
    cfg = setup(args)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = add_dataset_argument(default_argument_parser()).parse_args()
    logging.getLogger(__name__).info("Command Line Args: %s", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
