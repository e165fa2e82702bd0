#!/usr/bin/env python
"""
Train and evaluate VarifocalNet with Detectron2's DefaultTrainer.

    python tools/train_net.py --config-file configs/VFNet_Shapes_Demo.yaml
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS model_final.pth \
        TEST.AUG.ENABLED True  # also with test-time augmentation (official scales: *_TTA.yaml)
    python tools/train_net.py --config-file CONFIG --resume
    python tools/train_net.py --config-file CONFIG --dataset mine_train=train.json:images/ \
        --dataset mine_val=val.json:images/ DATASETS.TRAIN "('mine_train',)" \
        DATASETS.TEST "('mine_val',)" MODEL.VFNET.NUM_CLASSES 3
"""
from detectron2.engine import launch

from vfnet.engine import default_argument_parser, main


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
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
