"""COCO evaluation of the project's tools."""
from detectron2.evaluation import COCOEvaluator

__all__ = ["VFNetCOCOEvaluator"]


class VFNetCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator whose metrics are 0, not NaN, when the model predicts nothing."""

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if coco_eval is None:
            self._logger.warning(
                f"The model made no {iou_type} prediction with a score above its threshold on "
                f"'{self._metadata.name}': its {iou_type} AP is 0."
            )
            results = dict.fromkeys(results, 0.0)
        return results
