#!/usr/bin/env python
"""
Run a VFNet on images, a video or a webcam and draw its detections (Detectron2's demo/demo.py
for VFNet configs).

    python demo/demo.py --config-file configs/VFNet_Shapes_Demo.yaml \
        --input datasets/vfnet_shapes/val --output out/ \
        --opts MODEL.WEIGHTS output/vfnet_shapes_demo/model_final.pth
    python demo/demo.py --config-file configs/VFNet_R_50_FPN_1x.yaml \
        --dataset mine_val=/data/mine/val.json:/data/mine/images \
        --input "photos/*.jpg" --output out/ \
        --opts MODEL.WEIGHTS model_final.pth DATASETS.TEST "('mine_val',)" MODEL.VFNET.NUM_CLASSES 3
    python demo/demo.py --config-file CONFIG --video-input video.mp4 --output out/ --opts ...
    python demo/demo.py --config-file CONFIG --webcam --opts MODEL.WEIGHTS model_final.pth

The class names come from the config's DATASETS.TEST[0].
"""
import argparse
import glob
import logging
import os
import sys
import tempfile
import time
from typing import List, Tuple
import cv2
import numpy as np
import torch
import tqdm

from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

import vfnet
from vfnet.data.mapper import read_image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import VisualizationDemo  # noqa: E402

WINDOW_NAME = "VFNet detections"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

logger = logging.getLogger("vfnet.demo")


def setup_cfg(args):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # Detections under the threshold are dropped by the model, before NMS (as Detectron2's demo
    # does with RetinaNet's SCORE_THRESH_TEST).
    cfg.MODEL.VFNET.TEST_SCORE_THRESH = args.confidence_threshold
    # The flags for damaged image files set their config keys (a config may set them too).
    d = cfg.DATASETS
    d.LOAD_TRUNCATED_IMAGES = d.LOAD_TRUNCATED_IMAGES or args.load_truncated_images
    d.DROP_UNREADABLE_IMAGES = d.DROP_UNREADABLE_IMAGES or args.drop_unreadable_images
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="VFNet demo: draw detections on images or videos")
    parser.add_argument(
        "--config-file",
        default="configs/VFNet_Shapes_Demo.yaml",
        metavar="FILE",
        help="path to config file",
    )
    parser.add_argument("--webcam", action="store_true", help="take inputs from the webcam")
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument(
        "--input",
        nargs="+",
        help="images: files, folders (their images) or glob patterns such as 'directory/*.jpg'",
    )
    parser.add_argument(
        "--output",
        help="a directory for the drawings (a file name for one input image or a video); "
        "if not given, the drawings are shown in an OpenCV window",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the detections drawn",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable); set DATASETS.TEST to it "
        "(--opts DATASETS.TEST \"('NAME',)\") for its class names",
    )
    parser.add_argument(
        "--load-truncated-images",
        action="store_true",
        help="load truncated image files (of --dataset and --input) as far as their data goes, "
        "as OpenCV does, with a warning per file (sets DATASETS.LOAD_TRUNCATED_IMAGES True)",
    )
    parser.add_argument(
        "--drop-unreadable-images",
        action="store_true",
        help="leave the images of the --dataset datasets whose files are missing or cannot be "
        "read out of them, with a warning that names them (sets "
        "DATASETS.DROP_UNREADABLE_IMAGES True)",
    )
    parser.add_argument(
        "--opts",
        help="modify config options with 'KEY VALUE' pairs (must come last)",
        default=[],
        nargs=argparse.REMAINDER,
    )
    return parser


def expand_inputs(inputs: List[str]) -> List[str]:
    """Image paths from files, folders (their images, sorted) and glob patterns, in order."""
    paths = []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            paths += sorted(
                os.path.join(item, f)
                for f in os.listdir(item)
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f))
            )
        elif os.path.isfile(item):
            paths.append(item)
        else:
            paths += sorted(p for p in glob.glob(item) if os.path.isfile(p))
    return paths


def output_path(output: str, input_path: str, num_inputs: int) -> str:
    """Where the drawing of `input_path` goes: into `output` as a folder, or `output` itself."""
    is_file = (
        num_inputs == 1
        and not os.path.isdir(output)
        and os.path.splitext(output)[1].lower() in IMAGE_EXTENSIONS
    )
    if is_file:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        return output
    os.makedirs(output, exist_ok=True)
    return os.path.join(output, os.path.basename(input_path))


def opencv_video_format(codec: str, file_ext: str) -> bool:
    """Whether OpenCV can write a video with `codec` into a `file_ext` file."""
    with tempfile.TemporaryDirectory(prefix="video_format_test") as dir:
        filename = os.path.join(dir, "test_file" + file_ext)
        writer = cv2.VideoWriter(
            filename=filename,
            fourcc=cv2.VideoWriter_fourcc(*codec),
            fps=float(30),
            frameSize=(10, 10),
            isColor=True,
        )
        for _ in range(30):
            writer.write(np.zeros((10, 10, 3), np.uint8))
        writer.release()
        return os.path.isfile(filename) and os.path.getsize(filename) > 0


def video_codec() -> Tuple[str, str]:
    """(fourcc, extension): x264 in .mkv where OpenCV has it, else mp4v in .mp4."""
    if opencv_video_format("x264", ".mkv"):
        return "x264", ".mkv"
    logger.warning("x264 codec not available, switching to mp4v")
    return "mp4v", ".mp4"


def run_on_images(demo, paths: List[str], output=None, load_truncated=False) -> List[str]:
    written = []
    for path in tqdm.tqdm(paths, desc="images", unit="image"):
        # PIL, as the evaluation reads images.
        img = read_image(path, format="BGR", load_truncated=load_truncated)
        start = time.time()
        predictions, visualized = demo.run_on_image(img)
        logger.info(
            "%s: detected %d instances in %.2fs", path, len(predictions["instances"]), time.time() - start
        )
        if output:
            out = output_path(output, path, len(paths))
            visualized.save(out)
            written.append(out)
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, visualized.get_image()[:, :, ::-1])
            if cv2.waitKey(0) == 27:
                break  # esc to quit
    return written


def run_on_video(demo, video_input: str, output=None) -> List[str]:
    if not os.path.isfile(video_input):
        raise FileNotFoundError(f"--video-input '{video_input}' does not exist.")
    video = cv2.VideoCapture(video_input)
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    frames_per_second = video.get(cv2.CAP_PROP_FPS) or 30.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    basename = os.path.basename(video_input)
    written, writer = [], None
    if output:
        codec, file_ext = video_codec()
        if os.path.isdir(output) or not os.path.splitext(output)[1]:
            os.makedirs(output, exist_ok=True)
            output_fname = os.path.splitext(os.path.join(output, basename))[0] + file_ext
        else:
            output_fname = output
        if os.path.isfile(output_fname):
            raise FileExistsError(f"{output_fname} exists: not overwriting it.")
        writer = cv2.VideoWriter(
            filename=output_fname,
            # Some OpenCV builds have no x264 (its license); mp4v is the fallback.
            fourcc=cv2.VideoWriter_fourcc(*codec),
            fps=float(frames_per_second),
            frameSize=(width, height),
            isColor=True,
        )
        written.append(output_fname)
    for vis_frame in tqdm.tqdm(demo.run_on_video(video), total=num_frames or None, desc="frames"):
        if writer is not None:
            writer.write(vis_frame)
        else:
            cv2.namedWindow(basename, cv2.WINDOW_NORMAL)
            cv2.imshow(basename, vis_frame)
            if cv2.waitKey(1) == 27:
                break  # esc to quit
    video.release()
    if writer is not None:
        writer.release()
    else:
        cv2.destroyAllWindows()
    return written


def run_on_webcam(demo):
    cam = cv2.VideoCapture(0)
    for vis in tqdm.tqdm(demo.run_on_video(cam), desc="frames"):
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
        cv2.imshow(WINDOW_NAME, vis)
        if cv2.waitKey(1) == 27:
            break  # esc to quit
    cam.release()
    cv2.destroyAllWindows()


def main(argv=None) -> List[str]:
    """Returns the paths written."""
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="vfnet")
    logger.info("Arguments: %s", args)
    sources = [bool(args.input), args.webcam, bool(args.video_input)]
    if sum(sources) != 1:
        raise SystemExit("Give exactly one of --input, --video-input, --webcam.")
    cfg = setup_cfg(args)
    for spec in args.dataset:
        vfnet.register_coco_dataset(
            spec,
            load_truncated_images=cfg.DATASETS.LOAD_TRUNCATED_IMAGES,
            drop_unreadable_images=cfg.DATASETS.DROP_UNREADABLE_IMAGES,
        )
    demo = VisualizationDemo(cfg)
    classes = demo.metadata.get("thing_classes")
    if classes is not None and len(classes) != cfg.MODEL.VFNET.NUM_CLASSES:
        msg = (
            f"DATASETS.TEST[0] '{demo.metadata.name}' has {len(classes)} classes, the model "
            f"{cfg.MODEL.VFNET.NUM_CLASSES} (MODEL.VFNET.NUM_CLASSES)."
        )
        if len(classes) < cfg.MODEL.VFNET.NUM_CLASSES:
            raise SystemExit(msg + " Set DATASETS.TEST to the dataset the model was trained on.")
        logger.warning(msg)

    if args.input:
        paths = expand_inputs(args.input)
        if not paths:
            raise SystemExit(f"No image found in --input {args.input}.")
        return run_on_images(demo, paths, args.output, cfg.DATASETS.LOAD_TRUNCATED_IMAGES)
    if args.webcam:
        if args.output:
            raise SystemExit("--output is not supported with --webcam.")
        run_on_webcam(demo)
        return []
    return run_on_video(demo, args.video_input, args.output)


if __name__ == "__main__":
    main()  # pragma: no cover
