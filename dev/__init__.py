"""
The lab: what checks the detector rather than being it. Parity with MMDetection
(:mod:`dev.mmdet_parity`), benchmarks, the GPU check, the loss comparisons and the autocast
comparison. Not installed: ``tools/`` and ``tests/`` import it from the source checkout, whose
configs and data it reads (:data:`REPO`).
"""
import os

# The root of the source checkout this package lies in.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
