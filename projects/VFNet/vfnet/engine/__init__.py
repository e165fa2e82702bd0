"""
The training loops: Detectron2's DefaultTrainer for VFNet and what tools/train_net.py runs
(defaults.py), and Detectron2's LazyConfig loop, what tools/lazyconfig_train_net.py runs (lazy.py).
"""
from .defaults import (
    Trainer,
    check_datasets,
    check_output_dir,
    default_argument_parser,
    launch_main,
    main,
    merge_config,
    register_datasets,
    setup,
)
