"""
One SGD step of a small VFNet in float64 on two images: in one process (twice, and once with the
two images swapped), and in two gloo processes that take one image each under
DistributedDataParallel. One thread and torch's deterministic algorithms. Saves the updated
state dicts and the gradients for tests/engine/test_distributed.py.

    python tests/scripts/ddp_sgd_step.py OUT_DIR
"""
import os
import sys
import torch
from torch.nn.parallel import DistributedDataParallel

from detectron2.config import get_cfg
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

import vfnet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build():
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-VFNet.yaml"))
    # FrozenBN backbone and GN head: no batch statistics that depend on the split.
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
         "MODEL.BACKBONE.FREEZE_AT", "0", "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.VFNET.NUM_CLASSES", "3"]
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg).double()


def images():
    g = torch.Generator().manual_seed(1)

    def inst(boxes, classes):
        boxes = Boxes(torch.tensor(boxes, dtype=torch.float64))
        return Instances((96, 128), gt_boxes=boxes, gt_classes=torch.tensor(classes))

    return [
        # Different numbers of positives on the two images, so that the normalisers matter.
        {"image": torch.rand(3, 96, 128, generator=g, dtype=torch.float64) * 255,
         "instances": inst([[10.0, 12, 60, 80], [50, 20, 120, 70], [5, 60, 40, 90]], [0, 2, 1])},
        {"image": torch.rand(3, 96, 128, generator=g, dtype=torch.float64) * 255,
         "instances": inst([[30.0, 30, 44, 46]], [1])},
    ]  # fmt: skip


def sgd_step(model, batch):
    """One SGD step; returns the gradients it took."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    optimizer.step()
    named = getattr(model, "module", model).named_parameters()  # without the DDP prefix
    return {n: p.grad for n, p in named if p.grad is not None}


def deterministic():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def worker(out_dir):
    deterministic()
    model = build()
    model.load_state_dict(torch.load(os.path.join(out_dir, "initial.pth")))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    rank = comm.get_rank()
    grads = sgd_step(ddp, images()[rank : rank + 1])
    if rank == 0:
        torch.save(model.state_dict(), os.path.join(out_dir, "ddp.pth"))
        torch.save(grads, os.path.join(out_dir, "ddp_grads.pth"))


def main(out_dir):
    deterministic()
    torch.save(build().state_dict(), os.path.join(out_dir, "initial.pth"))
    for name, batch in (
        ("single", images()), ("single_again", images()), ("single_swapped", images()[::-1])
    ):
        model = build()
        model.load_state_dict(torch.load(os.path.join(out_dir, "initial.pth")))
        grads = sgd_step(model, batch)
        torch.save(model.state_dict(), os.path.join(out_dir, f"{name}.pth"))
        torch.save(grads, os.path.join(out_dir, f"{name}_grads.pth"))
    launch(worker, 2, dist_url="file://" + os.path.join(out_dir, "dist_init"), args=(out_dir,))


if __name__ == "__main__":
    main(sys.argv[1])
