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
from vfnet.engine import launch_main, main


def invoke_main() -> None:
    launch_main(main)


if __name__ == "__main__":
    invoke_main()
