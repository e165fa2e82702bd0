"""The training loop: Detectron2's DefaultTrainer for VFNet, and what tools/train_net.py runs."""
from .defaults import Trainer, check_datasets, default_argument_parser, main, merge_config, setup
