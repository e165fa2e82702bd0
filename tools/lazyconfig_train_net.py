#!/usr/bin/env python
"""
Train and evaluate with a Python (LazyConfig) config, as Detectron2's
tools/lazyconfig_train_net.py does (see vfnet/engine/lazy.py for what this project's adds).

    python tools/lazyconfig_train_net.py --config-file configs/lazy/vfnet_shapes_demo.py
    python tools/lazyconfig_train_net.py --config-file configs/lazy/fcos_shapes_demo.py train.seed=1
    python tools/lazyconfig_train_net.py --config-file CONFIG --eval-only \
        train.init_checkpoint=output/vfnet_shapes_demo/model_final.pth
    python tools/lazyconfig_train_net.py --config-file CONFIG --resume
    python tools/lazyconfig_train_net.py --config-file CONFIG --dataset mine_train=train.json:images/ \
        --dataset mine_val=val.json:images/ dataloader.train.dataset.names=mine_train \
        dataloader.test.dataset.names=mine_val model.num_classes=3
"""
from vfnet.engine import launch_main
from vfnet.engine.lazy import main


def invoke_main() -> None:
    launch_main(main)


if __name__ == "__main__":
    invoke_main()
