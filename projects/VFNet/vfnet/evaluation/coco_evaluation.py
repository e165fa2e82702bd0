"""COCO evaluation of the project's tools."""
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

__all__ = ["VFNetCOCOEvaluator"]

MAX_LISTED = 10


class VFNetCOCOEvaluator(COCOEvaluator):
    """
    COCOEvaluator whose metrics are 0, not NaN, when the model predicts nothing, and which warns
    when images of the dataset's JSON were left out at registration
    (DATASETS.DROP_UNREADABLE_IMAGES): the metrics are those of the other images (the ground
    truth, the metadata's json_file, is the registration's copy without the dropped images, so
    their boxes do not count as missed detections).
    """

    def evaluate(self, img_ids=None):
        if not self._distributed or comm.is_main_process():
            self._report_left_out_images()
        return super().evaluate(img_ids)

    def _report_left_out_images(self):
        dropped = self._metadata.get("dropped_images") or []
        if not dropped:
            return
        total = self._metadata.get("num_source_images")
        names = ", ".join(f"'{f}'" for f in dropped[:MAX_LISTED])
        if len(dropped) > MAX_LISTED:
            names += f", ... ({len(dropped) - MAX_LISTED} more)"
        self._logger.warning(
            f"The evaluation of '{self._metadata.name}' covers {total - len(dropped)} of {total} "
            f"images: {len(dropped)} left out of the dataset at registration, with their "
            f"annotations, as their files are missing or cannot be read "
            f"(DATASETS.DROP_UNREADABLE_IMAGES): {names}."
        )

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if coco_eval is None:
            self._logger.warning(
                f"The model made no {iou_type} prediction with a score above its threshold on "
                f"'{self._metadata.name}': its {iou_type} AP is 0."
            )
            results = dict.fromkeys(results, 0.0)
        return results
