"""
Model zoo API, as Detectron2's ``detectron2.model_zoo``, over this project's configs (packaged in
``vfnet/model_zoo/configs``) and the official weights (``vfnet.checkpoint.catalog``).
"""
from .model_zoo import get, get_checkpoint_url, get_config, get_config_file

__all__ = ["get_checkpoint_url", "get", "get_config_file", "get_config"]
