"""Evaluation: Detectron2's COCOEvaluator, with AP 0 (not NaN) for a model that detects nothing."""
from .coco_evaluation import VFNetCOCOEvaluator
