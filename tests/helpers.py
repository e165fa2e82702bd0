"""Paths and the small model the tests share (imported by the test modules)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The raccoon dataset lives beside the project: tests that use it skip where it is absent.
RACCOON = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "raccoon")
RACCOON_IMAGES = os.path.join(RACCOON, "images")
BASE_CONFIG = os.path.join(ROOT, "configs", "Base-VFNet.yaml")
# Overrides of Base-VFNet.yaml for a small, fast model: ResNet-18 with BN, 64-channel FPN and
# head, 3 classes, on the CPU.
SMALL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.VFNET.NUM_CLASSES", "3",
    "MODEL.WEIGHTS", "",
]  # fmt: skip

# Overrides of configs/VFNet_Shapes_Demo.yaml for tools/train_net.py runs of a few seconds.
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "(4,)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "SEED", "7",
]  # fmt: skip


def small_cfg(*opts):
    """Base-VFNet.yaml with the SMALL overrides, then `opts` (needs Detectron2)."""
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(SMALL + list(opts))
    return cfg


DETERMINISTIC_TRAIN_NET = os.path.join(ROOT, "tests", "scripts", "deterministic_train_net.py")


def start_deterministic(log_path, kill, train_net_args):
    """
    Start tests/scripts/deterministic_train_net.py (tools/train_net.py under bitwise-reproducible
    settings, one thread) in the background with `kill` (its --kill-* options) and
    `train_net_args`, its output appended to `log_path`.
    """
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, DETERMINISTIC_TRAIN_NET, *kill, "--", *train_net_args]
    log = open(log_path, "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(proc, log_path, returncode=0):
    """Wait for a run of :func:`start_deterministic`; assert its exit status (showing its log)."""
    assert proc.wait(timeout=600) == returncode, open(log_path).read()[-6000:]
