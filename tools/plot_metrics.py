#!/usr/bin/env python
"""
Plot a training run's curves from Detectron2's OUTPUT_DIR/metrics.json (one JSON object per line):
the losses, the learning rate and the evaluation AP over iterations.

    python tools/plot_metrics.py output/vfnet_shapes_demo            # PNGs into that directory
    python tools/plot_metrics.py output/vfnet_shapes_demo --out plots/

Writes losses.png (loss_cls, loss_bbox, loss_bbox_refine, total_loss), lr.png and ap.png
(bbox/AP, AP50, AP75, APs, APm, APl); a plot without any data in the file is skipped.
"""
import argparse
import logging

from vfnet.utils.plot_metrics import plot_metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot losses, lr and AP from Detectron2's metrics.json.")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="training output directory (or its metrics.json)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write the PNGs (default: OUTPUT_DIR)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for png in plot_metrics(args.output_dir, args.out):
        print(png)


if __name__ == "__main__":
    main()
