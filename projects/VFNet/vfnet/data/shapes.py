"""
A deterministic synthetic object-detection dataset of flat-coloured shapes on textured backgrounds,
written in COCO format. Pure numpy + Pillow, used as the project's default demo dataset.

Annotation conventions:

* ``bbox`` is the tight box [x, y, w, h] of the object's full drawn mask (before occlusion by
  objects drawn later), in pixel-edge coordinates: a mask whose pixels span columns x0..x1
  (inclusive) has x = x0 and w = x1 - x0 + 1. Every shape is drawn entirely inside its image, so
  the box is too.
* ``area`` is the pixel count of that same full mask.
* ``category_id`` is the 1-based index into :data:`SHAPE_CLASSES`.

Image ``index`` of a split is drawn from :func:`scene_rng` ``(seed, split, index)`` only, so the
output is reproducible byte for byte and the first N images do not depend on the number of images.
"""

import inspect
import json
import math
import os
import zlib

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..utils.file_io import atomic_write

__all__ = [
    "SHAPE_CLASSES",
    "draw_scene",
    "mask_to_xywh",
    "scene_rng",
    "generate_split",
    "ensure_shapes_dataset",
]

# "circle" includes ellipses (stretched circles); "cross" includes off-centre (Latin) crosses.
SHAPE_CLASSES = ("circle", "rectangle", "triangle", "cross")
# Inclusive (min, max) range of image height and width, each drawn independently.
DEFAULT_IMAGE_SIZE = (128, 192)
# Stored in the JSON info; bump it whenever the drawing changes, so that cached datasets get
# regenerated.
GENERATOR_VERSION = 1


BACKGROUNDS = ("noise", "gradient", "stripes", "blotches")


def _background(rng, height, width, kinds=BACKGROUNDS):
    """
    Returns:
        (H, W, 3) float64 random background of one of `kinds` (of BACKGROUNDS): noise, a gradient,
        stripes/checker or low-contrast blotches.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    base = rng.uniform(0, 255, size=3)
    kind = BACKGROUNDS.index(kinds[rng.integers(len(kinds))])
    if kind == 0:  # uniform noise around a base colour
        amplitude = rng.uniform(10, 40)
        image = base + rng.uniform(-amplitude, amplitude, size=(height, width, 3))
    elif kind == 1:  # linear gradient between two colours
        other = rng.uniform(0, 255, size=3)
        theta = rng.uniform(0, 2 * np.pi)
        t = xs * np.cos(theta) + ys * np.sin(theta)
        t = (t - t.min()) / (t.max() - t.min())
        image = base + t[..., None] * (other - base)
    elif kind == 2:  # stripes or checker of two nearby colours
        direction = rng.normal(size=3)
        other = base + direction / np.linalg.norm(direction) * rng.uniform(20, 60)
        period = rng.uniform(4, 24)
        theta = rng.uniform(0, np.pi)
        u = (xs * np.cos(theta) + ys * np.sin(theta)) / period
        v = (ys * np.cos(theta) - xs * np.sin(theta)) / period
        pattern = np.floor(u) % 2 == 1
        if rng.random() < 0.5:
            pattern ^= np.floor(v) % 2 == 1
        image = np.where(pattern[..., None], other, base)
    else:  # low-contrast gaussian blotches
        image = np.broadcast_to(base, (height, width, 3)).copy()
        for _ in range(rng.integers(3, 9)):
            cx, cy = rng.uniform((0, 0), (width, height))
            sigma = rng.uniform(0.05, 0.3) * min(height, width)
            blob = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
            image += blob[..., None] * rng.uniform(-40, 40, size=3)
    amplitude = rng.uniform(0, 6)
    return image + rng.uniform(-amplitude, amplitude, size=(height, width, 3))


def _axis_box(half_w, half_h, cy=0.0):
    """(4, 2) corners (x, y) of an axis-aligned box centred at (0, cy)."""
    return np.array(
        [
            [-half_w, cy - half_h],
            [half_w, cy - half_h],
            [half_w, cy + half_h],
            [-half_w, cy + half_h],
        ]
    )


def _random_triangle(rng, min_angle_deg=25.0):
    """(3, 2) vertices of a triangle whose interior angles are all >= min_angle_deg."""
    while True:
        a, b = rng.uniform(min_angle_deg, 180.0 - 2 * min_angle_deg, size=2)
        if 180.0 - a - b >= min_angle_deg:
            break
    a, b = math.radians(a), math.radians(b)
    # Vertices (0, 0) and (1, 0) with angles a and b; the law of sines gives the third one.
    r = math.sin(b) / math.sin(a + b)
    return np.array([[0.0, 0.0], [1.0, 0.0], [r * math.cos(a), r * math.sin(a)]])


def _unit_shape(rng, label, max_aspect, max_rotation=180.0):
    """
    Returns:
        list of (N, 2) arrays: convex polygons (x, y) whose union is a random shape of class
        ``label``, in arbitrary units, rotated by an angle uniform in [-max_rotation,
        max_rotation] degrees (any angle for 180).
    """
    name = SHAPE_CLASSES[label]
    stretch = math.sqrt(math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect))))
    sx, sy = stretch, 1.0 / stretch
    if name == "circle":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        polygons = [np.stack([sx * np.cos(t), sy * np.sin(t)], axis=1)]
    elif name == "rectangle":
        polygons = [_axis_box(sx, sy)]
    elif name == "triangle":
        polygons = [_random_triangle(rng)]
    elif name == "cross":
        half_thickness = rng.uniform(0.15, 0.35) * min(sx, sy)
        bar_y = rng.uniform(-0.5, 0.5) * (sy - half_thickness)
        polygons = [_axis_box(sx, half_thickness, bar_y), _axis_box(half_thickness, sy)]
    else:
        raise ValueError(f"Unknown shape {name}")
    if max_rotation >= 180.0:
        theta = rng.uniform(0, 2 * np.pi)
    else:
        theta = math.radians(rng.uniform(-max_rotation, max_rotation))
    rotation = np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
    return [p @ rotation for p in polygons]


def _place(rng, polygons, size, height, width):
    """
    Scales ``polygons`` so that the longer side of their bounding box is ``size`` pixels and moves
    them to a uniformly random position entirely inside a (height, width) image.
    """
    points = np.concatenate(polygons)
    low, high = points.min(axis=0), points.max(axis=0)
    scale = size / (high - low).max()
    extent = (high - low) * scale
    corner = rng.uniform((0.0, 0.0), (width - extent[0], height - extent[1]))
    return [(p - low) * scale + corner for p in polygons]


def _rasterize(polygons, height, width):
    """
    Returns:
        (H, W) bool mask of the pixels whose centres lie inside (or on) any of the convex
        ``polygons``, given in pixel-edge coordinates (x, y).
    """
    mask = np.zeros((height, width), dtype=bool)
    for poly in polygons:
        if np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1]) < 0:
            poly = poly[::-1]  # make the orientation positive: the interior is left of every edge
        x0, y0 = np.maximum(np.floor(poly.min(axis=0)).astype(int), 0)
        x1, y1 = np.ceil(poly.max(axis=0)).astype(int)
        x1, y1 = min(x1, width), min(y1, height)
        px = np.arange(x0, x1)[None, :] + 0.5
        py = np.arange(y0, y1)[:, None] + 0.5
        inside = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for (ax, ay), (bx, by) in zip(poly, np.roll(poly, -1, axis=0)):
            inside &= (bx - ax) * (py - ay) - (by - ay) * (px - ax) >= 0
        mask[y0:y1, x0:x1] |= inside
    return mask


def _box_iou(a, b):
    """IoU of two [x, y, w, h] boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _pick_colour(rng, covered, min_contrast, num_candidates=16):
    """
    Args:
        covered: (N, 3) uint8 pixels the object will cover.

    Returns:
        (3,) uint8 random colour at RGB distance >= min_contrast from the mean of ``covered``,
        or the most distant of ``num_candidates`` random colours if none is.
    """
    candidates = rng.integers(0, 256, size=(num_candidates, 3))
    distance = np.linalg.norm(candidates - covered.mean(axis=0), axis=1)
    good = np.flatnonzero(distance >= min_contrast)
    return candidates[good[0] if good.size else distance.argmax()].astype(np.uint8)


def draw_scene(
    rng,
    height,
    width,
    max_objects=6,
    empty_prob=0.1,
    min_object_size=10,
    max_object_frac=0.7,
    max_aspect=3.0,
    max_rotation=180.0,
    max_occlusion=0.4,
    max_box_iou=0.6,
    min_contrast=96,
    max_attempts=20,
    backgrounds=BACKGROUNDS,
):
    """
    Draws one image: a random background and, with probability ``1 - empty_prob``, 1..max_objects
    flat-coloured shapes on top of each other. The longer box side of a shape is uniform in
    [min_object_size, max_object_frac * min(height, width)] pixels; ellipses, rectangles and crosses
    are stretched to aspect ratios up to ``max_aspect`` (either way) and every shape is rotated by
    an angle uniform in [-max_rotation, max_rotation] degrees.
    A placement is retried (at most ``max_attempts`` times, then the object is dropped) if it hides
    more than ``max_occlusion`` of an earlier object's pixels or if its box IoU with an earlier one
    exceeds ``max_box_iou``. The background is one of ``backgrounds`` (of BACKGROUNDS).

    Args:
        rng (np.random.Generator): the only source of randomness.

    Returns:
        image: (H, W, 3) uint8 RGB image.
        masks: list of (H, W) bool arrays, the full drawn mask of each object, in drawing order
            (later objects may occlude earlier ones).
        labels: list of int, the 0-based index in SHAPE_CLASSES of each object.
    """
    image = np.clip(np.rint(_background(rng, height, width, backgrounds)), 0, 255).astype(np.uint8)
    num_objects = 0 if rng.random() < empty_prob else int(rng.integers(1, max_objects + 1))
    max_size = max(min_object_size, max_object_frac * min(height, width))
    masks, labels, boxes, visible = [], [], [], []
    for _ in range(num_objects):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        for _ in range(max_attempts):
            size = rng.uniform(min_object_size, max_size)
            shape = _unit_shape(rng, label, max_aspect, max_rotation)
            polygons = _place(rng, shape, size, height, width)
            mask = _rasterize(polygons, height, width)
            if not mask.any():
                continue
            box = mask_to_xywh(mask)
            if all(_box_iou(box, b) <= max_box_iou for b in boxes) and all(
                np.count_nonzero(v & ~mask) >= (1 - max_occlusion) * np.count_nonzero(m)
                for v, m in zip(visible, masks)
            ):
                break
        else:
            continue
        image[mask] = _pick_colour(rng, image[mask], min_contrast)
        visible = [v & ~mask for v in visible] + [mask]
        masks.append(mask)
        labels.append(label)
        boxes.append(box)
    return image, masks, labels


def mask_to_xywh(mask):
    """
    Args:
        mask: (H, W) bool array, not empty.

    Returns:
        [x, y, w, h] ints: the tight box of the mask in pixel-edge coordinates (pixel columns
        x0..x1 give x = x0, w = x1 - x0 + 1).
    """
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        raise ValueError("mask_to_xywh() got an empty mask")
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def scene_rng(seed, split, index):
    """The np.random.Generator that draws image ``index`` of ``split`` (a str) for a seed >= 0."""
    return np.random.default_rng([int(seed), zlib.crc32(split.encode("utf-8")), int(index)])


def _dataset_info(split, num_images, seed, image_size, scene_kwargs):
    """The JSON "info" section: everything the generated content depends on, as it reads back."""
    scene = inspect.signature(draw_scene).bind(None, 0, 0, **scene_kwargs)
    scene.apply_defaults()
    params = {k: v for k, v in scene.arguments.items() if k not in ("rng", "height", "width")}
    info = {
        "description": "Synthetic shapes detection dataset (vfnet.data.shapes)",
        "version": GENERATOR_VERSION,
        "split": split,
        "seed": int(seed),
        "num_images": int(num_images),
        "params": dict(params, image_size=list(image_size)),
    }
    return json.loads(json.dumps(info))


def generate_split(out_dir, split, num_images, seed, image_size=DEFAULT_IMAGE_SIZE, **scene_kwargs):
    """
    Generates ``num_images`` images into ``out_dir/<split>/%06d.png`` and their COCO annotations
    into ``out_dir/<split>.json`` (written last and atomically; an existing one is deleted first,
    so a complete JSON always matches its images).

    Args:
        image_size: inclusive (min, max) range of the image height and width, drawn independently.
        scene_kwargs: forwarded to :func:`draw_scene`.

    Returns:
        str: path of the JSON file.
    """
    info = _dataset_info(split, num_images, seed, image_size, scene_kwargs)
    image_dir = os.path.join(out_dir, split)
    json_path = os.path.join(out_dir, f"{split}.json")
    os.makedirs(image_dir, exist_ok=True)
    if os.path.exists(json_path):
        os.remove(json_path)

    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"Generating shapes/{split}", disable=None):
        rng = scene_rng(seed, split, index)
        height, width = (int(s) for s in rng.integers(image_size[0], image_size[1] + 1, size=2))
        image, masks, labels = draw_scene(rng, height, width, **scene_kwargs)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(os.path.join(image_dir, file_name), compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for mask, label in zip(masks, labels):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": mask_to_xywh(mask),
                    "area": int(np.count_nonzero(mask)),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(SHAPE_CLASSES)
    ]
    coco = {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    text = json.dumps(coco, sort_keys=True, separators=(",", ":")).encode()
    atomic_write(json_path, lambda f: f.write(text), shared=True)  # DDP workers may generate it too
    return json_path


def _is_up_to_date(json_path, image_dir, info):
    """Whether ``json_path`` exists with exactly this ``info`` and all its images exist."""
    try:
        with open(json_path) as f:
            coco = json.load(f)
    except (OSError, ValueError):
        return False
    return coco.get("info") == info and all(
        os.path.isfile(os.path.join(image_dir, im["file_name"])) for im in coco["images"]
    )


def ensure_shapes_dataset(
    root, seed=0, num_train=1000, num_val=100, image_size=DEFAULT_IMAGE_SIZE, **scene_kwargs
):
    """
    Generates the "train" and "val" splits under ``root`` unless they already exist with the same
    parameters (recorded in each JSON's "info"); a split generated with other parameters is
    regenerated, never reused. Image files left over from a larger earlier split are not removed.

    Args:
        image_size, scene_kwargs: see :func:`generate_split`.

    Returns:
        dict: {"train": (json_path, image_dir), "val": (json_path, image_dir)}.
    """
    splits = {}
    for split, num_images in (("train", num_train), ("val", num_val)):
        json_path = os.path.join(root, f"{split}.json")
        image_dir = os.path.join(root, split)
        info = _dataset_info(split, num_images, seed, image_size, scene_kwargs)
        if not _is_up_to_date(json_path, image_dir, info):
            generate_split(root, split, num_images, seed, image_size, **scene_kwargs)
        splits[split] = (json_path, image_dir)
    return splits
