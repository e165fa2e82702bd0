"""
Checkpoints: `detection_checkpoint.py` (Detectron2's checkpointer with atomic writes, clear
loading errors and MMDetection checkpoints converted on load), `mmdet_checkpoint.py` (their
recognition, conversion and cache), `catalog.py` (the official weights by name, `vfnet://`),
`converter.py` (MMDetection VFNet checkpoints to this project's names, which imports no
Detectron2) and `retinanet_converter.py`. This file imports nothing, so that the converter works
without Detectron2.
"""
