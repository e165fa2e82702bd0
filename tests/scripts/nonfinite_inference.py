"""
A small VFNet's inference (score threshold 0) on images holding NaN, +inf or -inf everywhere, on
an image with a NaN patch and on a finite one, for tests/modeling/test_numerics.py (in a child process).
Prints one JSON line per image: the number of detections and whether their boxes and scores are
finite and their boxes non-empty.

    python tests/scripts/nonfinite_inference.py
"""
import json
import os
import sys

import torch

from detectron2.modeling import build_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import small_cfg  # noqa: E402


def main():
    torch.manual_seed(0)
    model = build_model(small_cfg("MODEL.VFNET.TEST_SCORE_THRESH", "0.0")).eval()
    finite = torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1)) * 255
    patch = finite.clone()
    patch[:, 30:50, 40:80] = float("nan")
    images = {
        "nan": torch.full_like(finite, float("nan")),
        "+inf": torch.full_like(finite, float("inf")),
        "-inf": torch.full_like(finite, float("-inf")),
        "nan patch": patch,
        "finite": finite,
    }
    for name, image in images.items():
        with torch.no_grad():
            inst = model([{"image": image}])[0]["instances"]
        boxes = inst.pred_boxes.tensor
        print(json.dumps({
            "image": name,
            "detections": len(inst),
            "boxes_finite": bool(torch.isfinite(boxes).all()),
            "scores_finite": bool(torch.isfinite(inst.scores).all()),
            "boxes_nonempty": bool(inst.pred_boxes.nonempty().all()),
        }), flush=True)


if __name__ == "__main__":
    main()
