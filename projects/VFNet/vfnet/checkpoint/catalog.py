"""
The official weights by name (:class:`ModelCatalog`) and their ``vfnet://NAME`` addresses, which
Detectron2's PathManager resolves as it does ``detectron2://`` ones (:class:`VFNetHandler`): to the
official download, converted to a Detectron2 checkpoint where it is MMDetection's. Importing this
module registers the handler (``import vfnet`` does).
"""
from detectron2.utils.file_io import PathHandler, PathManager

from .mmdet_checkpoint import converted_download

__all__ = ["ModelCatalog", "VFNetHandler"]

_MMDET_VFNET = "https://download.openmmlab.com/mmdetection/v2.0/vfnet/"
_DRIVE = "https://drive.google.com/file/d/{}/view?usp=sharing"


class ModelCatalog:
    """
    The official weights of this project's configs: the VarifocalNet models, named after their
    ``configs/mmdet/`` config, and the ImageNet backbones that the training configs start from.
    """

    # name -> download address
    URLS = {
        # MMDetection's model zoo (configs/vfnet/README.md of MMDetection 2.x)
        "VFNet_R_50_FPN_1x": _MMDET_VFNET
        + "vfnet_r50_fpn_1x_coco/vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth",
        "VFNet_R_50_FPN_MS_2x": _MMDET_VFNET
        + "vfnet_r50_fpn_mstrain_2x_coco/vfnet_r50_fpn_mstrain_2x_coco_20201027-7cc75bd2.pth",
        "VFNet_R_50_DCN_FPN_MS_2x": _MMDET_VFNET
        + "vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco/"
        "vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-6879c318.pth",
        "VFNet_R_101_FPN_1x": _MMDET_VFNET
        + "vfnet_r101_fpn_1x_coco/vfnet_r101_fpn_1x_coco_20201027pth-c831ece7.pth",
        "VFNet_R_101_FPN_MS_2x": _MMDET_VFNET
        + "vfnet_r101_fpn_mstrain_2x_coco/vfnet_r101_fpn_mstrain_2x_coco_20201027pth-4a5d53f1.pth",
        "VFNet_R_101_DCN_FPN_MS_2x": _MMDET_VFNET
        + "vfnet_r101_fpn_mdconv_c3-c5_mstrain_2x_coco/"
        "vfnet_r101_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-7729adb5.pth",
        "VFNet_X_101_32x4d_DCN_FPN_MS_2x": _MMDET_VFNET
        + "vfnet_x101_32x4d_fpn_mdconv_c3-c5_mstrain_2x_coco/"
        "vfnet_x101_32x4d_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-d300a6fc.pth",
        "VFNet_X_101_64x4d_DCN_FPN_MS_2x": _MMDET_VFNET
        + "vfnet_x101_64x4d_fpn_mdconv_c3-c5_mstrain_2x_coco/"
        "vfnet_x101_64x4d_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-b5f6da5e.pth",
        # The ImageNet weights of the official training configs (MMDetection's
        # torchvision://resnet50 ... and open-mmlab://resnext101_32x4d ...)
        "ImageNetPretrained/resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "ImageNetPretrained/resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
        "ImageNetPretrained/resnext101_32x4d": "https://download.openmmlab.com/pretrain/"
        "third_party/resnext101_32x4d-a5af3160.pth",
        "ImageNetPretrained/resnext101_64x4d": "https://download.openmmlab.com/pretrain/"
        "third_party/resnext101_64x4d-ee2c6f71.pth",
        "ImageNetPretrained/res2net101_v1d_26w_4s": "https://download.openmmlab.com/pretrain/"
        "third_party/res2net101_v1d_26w_4s_mmdetv2-f0a600f9.pth",
    }
    # name -> the sharing page of weights released only there (the VarifocalNet README's Google
    # Drive links), which no program downloads: they are downloaded by hand
    SHARING_PAGES = {
        "VFNet_X_101_32x4d_FPN_MS_2x": _DRIVE.format("1X-soI6dyFxv0jWOKxthPPsVeyqIRRa-F"),
        "VFNet_X_101_64x4d_FPN_MS_2x": _DRIVE.format("1m0BQ6XyAlxNdJQVbg_4OuEgEctywPVx9"),
        "VFNet_R2_101_FPN_MS_2x": _DRIVE.format("1E4o1CxaWUQV7-HAyqbITw7JD8mOF7tNW"),
        "VFNet_R2_101_DCN_FPN_MS_2x": _DRIVE.format("1kCiEqAA_VQlhbiNuZ3HWGhBD1JvVpK0c"),
        "RetinaNet_VFL_R_50_FPN_1x": _DRIVE.format("1FuWtTdr-NlcqVJW35lhlicCk2hmtIip8"),
    }

    @staticmethod
    def get(name: str) -> str:
        """
        The download address of the official weights `name`.

        Raises:
            RuntimeError: they are only on a sharing page (the message names it and says how to
                load them), or there are none of that name.
        """
        if name in ModelCatalog.URLS:
            return ModelCatalog.URLS[name]
        if name in ModelCatalog.SHARING_PAGES:
            raise RuntimeError(
                f"The official weights {name} are only on a sharing page, which cannot be "
                f"downloaded by a program: {ModelCatalog.SHARING_PAGES[name]} . Download the file "
                "from that page in a browser, then give its path: MODEL.WEIGHTS /path/to/file.pth "
                "(an MMDetection checkpoint is converted when it is loaded)."
            )
        known = ", ".join(sorted(ModelCatalog.URLS) + sorted(ModelCatalog.SHARING_PAGES))
        raise RuntimeError(f"No official weights are named '{name}'. The names: {known}.")


class VFNetHandler(PathHandler):
    """
    Resolve ``vfnet://NAME``: the official weights `NAME` of :class:`ModelCatalog`, downloaded
    once into PathManager's cache and, for an MMDetection checkpoint, converted once beside it
    (:func:`~vfnet.checkpoint.mmdet_checkpoint.converted_download`): a Detectron2 checkpoint.
    """

    PREFIX = "vfnet://"

    def _get_supported_prefixes(self):
        return [self.PREFIX]

    def _get_local_path(self, path, **kwargs):
        return converted_download(ModelCatalog.get(path[len(self.PREFIX) :]), **kwargs)

    def _open(self, path, mode="r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)


PathManager.register_handler(VFNetHandler())
