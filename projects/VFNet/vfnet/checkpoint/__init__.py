"""
Checkpoints: `detection_checkpoint.py` (Detectron2's checkpointer with atomic writes and clear
loading errors) and `converter.py` (MMDetection VFNet checkpoints to this project's names, which
imports no Detectron2). This file imports nothing, so that the converter works without it.
"""
