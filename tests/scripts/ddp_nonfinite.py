"""
Two gloo workers train a small VFNet one step each (vfnet.engine.train_loop.SimpleTrainer);
worker 1's image holds NaN. Each worker
writes the message of the FloatingPointError it stops with to OUT_DIR/rank{R}.txt, for
tests/modeling/test_numerics.py.

    python tests/scripts/ddp_nonfinite.py OUT_DIR
"""
import itertools
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.utils import comm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import small_cfg  # noqa: E402
from helpers import training_batch  # noqa: E402

from vfnet.engine.train_loop import SimpleTrainer  # noqa: E402


def worker(out_dir):
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(small_cfg()).train())
    rank = comm.get_rank()
    batch = training_batch(nan_pixels=True)[rank : rank + 1]
    trainer = SimpleTrainer(model, itertools.repeat(batch), torch.optim.SGD(model.parameters(), lr=0.0))
    try:
        trainer.train(0, 1)
        message = "no error"
    except FloatingPointError as e:
        message = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(message)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    launch(worker, 2, dist_url="file://" + os.path.join(out_dir, "dist_init"), args=(out_dir,))
