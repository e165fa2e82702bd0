"""
The training augmentations of VFNet-X (official train pipeline) that Detectron2 lacks: resizing
with the long and the short edge drawn independently (MMDetection's Resize, multiscale_mode
"range", keep_ratio), and CutOut inside the ground-truth boxes (VarifocalNet's CutOut).
"""
from typing import List, Sequence, Tuple
import numpy as np

from detectron2.data import transforms as T
from fvcore.transforms.transform import Transform


def keep_ratio_size(h: int, w: int, long_edge: int, short_edge: int) -> Tuple[int, int]:
    """
    (new_h, new_w) of an h x w image rescaled by the largest factor that fits its long side in
    `long_edge` and its short side in `short_edge` (mmcv's imrescale: sizes rounded half up).
    """
    scale = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


class RandomKeepRatioResize(T.Augmentation):
    """
    Resize keeping the aspect ratio, to a scale of two edges drawn uniformly and independently
    from the integers of `long_range` and of `short_range`; the larger of the two bounds the long
    side, the smaller the short side (MMDetection's Resize with two img_scales, multiscale_mode
    "range", keep_ratio True: mmcv's imrescale takes max and min of the scale, so a short draw
    above the long one swaps them).
    """

    def __init__(self, long_range: Sequence[int], short_range: Sequence[int], interp=None):
        super().__init__()
        if len(long_range) != 2 or len(short_range) != 2:
            raise ValueError(f"Expected two (min, max) ranges, got {long_range} and {short_range}.")
        self.long_range = (int(min(long_range)), int(max(long_range)))
        self.short_range = (int(min(short_range)), int(max(short_range)))
        self.interp = interp

    def get_transform(self, image):
        h, w = image.shape[:2]
        long_edge = np.random.randint(self.long_range[0], self.long_range[1] + 1)
        short_edge = np.random.randint(self.short_range[0], self.short_range[1] + 1)
        new_h, new_w = keep_ratio_size(h, w, max(long_edge, short_edge), min(long_edge, short_edge))
        return T.ResizeTransform(h, w, new_h, new_w, self.interp)


class FillRectanglesTransform(Transform):
    """Sets the pixels of rectangles (x1, y1, x2, y2), integer, end-exclusive, to `fill`."""

    def __init__(self, rects: np.ndarray, fill: Sequence[float]):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        img = img.copy()
        for x1, y1, x2, y2 in self.rects:
            img[y1:y2, x1:x2] = self.fill
        return img

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def inverse(self) -> Transform:
        raise NotImplementedError("CutOut cannot be inverted.")


def sample_box_cutout(
    boxes: np.ndarray, n_holes: Tuple[int, int], shapes: List[Tuple[int, int]], prob: float,
) -> np.ndarray:
    """
    The holes of VarifocalNet's CutOut: for each box (x1, y1, x2, y2) with probability `prob`,
    n in [n_holes[0], n_holes[1]] holes, each with its top-left corner uniform over the integers
    of [x1, x2] x [y1, y2] (as numpy truncates the box's float coordinates), a (w, h) drawn from
    `shapes`, and its bottom-right corner clipped to the box.

    Returns:
        (K, 4) int64 rectangles (x1, y1, x2, y2), end-exclusive, possibly empty.
    """
    rects = []
    for x1, y1, x2, y2 in boxes:
        if not np.random.choice([True, False], p=[prob, 1 - prob]):
            continue
        for _ in range(np.random.randint(n_holes[0], n_holes[1] + 1)):
            cx = np.random.randint(int(x1), int(x2 + 1))
            cy = np.random.randint(int(y1), int(y2 + 1))
            w, h = shapes[np.random.randint(0, len(shapes))]
            rects.append((cx, cy, int(np.clip(cx + w, x1, x2)), int(np.clip(cy + h, y1, y2))))
    return np.asarray(rects, dtype=np.int64).reshape(-1, 4)


class RandomBoxCutOut(T.Augmentation):
    """CutOut inside the ground-truth boxes (see :func:`sample_box_cutout`), filled with `fill`."""

    def __init__(self, n_holes: Sequence[int], shapes: Sequence[Sequence[int]], prob: float,
                 fill: Sequence[float] = (0, 0, 0)):
        super().__init__()
        if len(n_holes) != 2 or not 0 <= n_holes[0] <= n_holes[1]:
            raise ValueError(f"INPUT.CUTOUT.N_HOLES must be (min, max) with 0 <= min <= max, got {n_holes}.")
        if not shapes or any(len(s) != 2 for s in shapes):
            raise ValueError(f"INPUT.CUTOUT.SHAPES must be a non-empty list of (w, h), got {shapes}.")
        self.n_holes = (int(n_holes[0]), int(n_holes[1]))
        self.shapes = [(int(w), int(h)) for w, h in shapes]
        self.prob = float(prob)
        self.fill = tuple(fill)

    def get_transform(self, image, boxes):
        rects = sample_box_cutout(np.asarray(boxes).reshape(-1, 4), self.n_holes, self.shapes, self.prob)
        return FillRectanglesTransform(rects, self.fill)


def build_train_augmentations(cfg, augmentations: List[T.Augmentation]) -> List[T.Augmentation]:
    """
    Detectron2's training augmentations (crop, shortest-edge resize, flip) with the VFNet-X
    options: the crop applied with probability INPUT.CROP.PROB, the resize drawing the long edge
    from INPUT.MAX_SIZE_TRAIN_RANGE when set, and CutOut (INPUT.CUTOUT) before the flip.
    """
    out = []
    for aug in augmentations:
        if isinstance(aug, T.RandomCrop) and cfg.INPUT.CROP.PROB < 1:
            aug = T.RandomApply(aug, prob=cfg.INPUT.CROP.PROB)
        elif isinstance(aug, T.ResizeShortestEdge) and len(cfg.INPUT.MAX_SIZE_TRAIN_RANGE):
            if cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING != "range" or len(cfg.INPUT.MIN_SIZE_TRAIN) != 2:
                raise ValueError(
                    "INPUT.MAX_SIZE_TRAIN_RANGE needs INPUT.MIN_SIZE_TRAIN_SAMPLING 'range' and "
                    f"INPUT.MIN_SIZE_TRAIN (min, max), got {cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING} "
                    f"{cfg.INPUT.MIN_SIZE_TRAIN}."
                )
            aug = RandomKeepRatioResize(cfg.INPUT.MAX_SIZE_TRAIN_RANGE, cfg.INPUT.MIN_SIZE_TRAIN, aug.interp)
        elif isinstance(aug, T.RandomFlip) and cfg.INPUT.CUTOUT.ENABLED:
            c = cfg.INPUT.CUTOUT
            out.append(RandomBoxCutOut(c.N_HOLES, c.SHAPES, c.PROB, c.FILL))
        out.append(aug)
    if cfg.INPUT.CUTOUT.ENABLED and not any(isinstance(a, RandomBoxCutOut) for a in out):
        c = cfg.INPUT.CUTOUT
        out.append(RandomBoxCutOut(c.N_HOLES, c.SHAPES, c.PROB, c.FILL))
    return out
