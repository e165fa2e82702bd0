"""
The model: `meta_arch/` (the VFNet dense detector), `backbone/`, the head (`vfnet_head.py`), and
the algorithms it runs as pure functions of tensors (`atss.py`, `box_coding.py`, `losses.py`,
`star_dcn.py`, which import no Detectron2). This file imports nothing, so that those four can be
used without Detectron2; ``import vfnet`` registers the Detectron2 parts.
"""
