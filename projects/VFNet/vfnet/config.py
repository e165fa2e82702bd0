"""
The config keys of this project, one ``add_*_config`` per feature, as Detectron2's projects add
theirs; :func:`add_vfnet_config` adds them all.
"""
from detectron2.config import CfgNode as CN

__all__ = [
    "add_augmentation_config",
    "add_backbone_config",
    "add_data_config",
    "add_iou_aware_retinanet_config",
    "add_solver_config",
    "add_swa_config",
    "add_test_config",
    "add_vfnet_config",
    "add_vfnet_model_config",
]


def add_vfnet_config(cfg):
    """Add every key of this project to a Detectron2 config; the VFNet model's defaults are those
    of the official VarifocalNet R-50 1x model."""
    add_vfnet_model_config(cfg)
    add_backbone_config(cfg)
    add_iou_aware_retinanet_config(cfg)
    add_data_config(cfg)
    add_augmentation_config(cfg)
    add_solver_config(cfg)
    add_swa_config(cfg)
    add_test_config(cfg)


def add_vfnet_model_config(cfg):
    """``MODEL.VFNET``: the VFNet meta-architecture, its head, losses, ATSS and inference."""
    cfg.MODEL.VFNET = v = CN()
    v.NUM_CLASSES = 80
    v.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]

    # The head: NUM_CONVS conv3x3 -> NORM -> ReLU layers in each tower.
    v.NUM_CONVS = 3
    v.NORM = "GN"
    # "reg_denom": the initial box of a level is scaled by 8 x its stride; "stride": by the stride.
    v.BBOX_NORM_TYPE = "reg_denom"
    # Share of the gradient that flows from the star offsets back to the initial box.
    v.GRADIENT_MUL = 0.1
    # The last conv of each tower a DCNv2 conv (the official *_mdconv_* models).
    v.DCN_ON_LAST_CONV = False
    # Initial foreground probability of the classification score.
    v.PRIOR_PROB = 0.01
    # Kernel of the deformable convs: "auto" (Detectron2's CUDA kernel on GPU, "gather" on CPU),
    # "detectron2", "torchvision", "gather" (bilinear gather + 1x1 conv) or "sampling"
    # (grid_sample + matmul, exportable to ONNX); see vfnet/layers/deform_conv.py.
    v.DEFORM_CONV_IMPL = "auto"

    # Classification loss (VarifocalNet, Table 3): "varifocal" (VFL on the IoU-aware targets),
    # "focal" (on the ATSS labels, Table 3's ablation) or "quality_focal" (GFL's QFL on the
    # IoU-aware targets).
    v.CLS_LOSS_TYPE = "varifocal"
    # False: plain 3x3 convs instead of the star deformable convs (Table 3).
    v.USE_STAR_DCN = True
    # False: no box refinement, the initial box is the output (Table 3).
    v.USE_REFINE = True

    # The varifocal loss's alpha and gamma, and its positives weighted by their IoU target.
    v.VFL_ALPHA = 0.75
    v.VFL_GAMMA = 2.0
    v.IOU_WEIGHTED = True
    # The focal loss of CLS_LOSS_TYPE "focal".
    v.FOCAL_ALPHA = 0.25
    v.FOCAL_GAMMA = 2.0
    # The exponent of CLS_LOSS_TYPE "quality_focal".
    v.QFL_BETA = 2.0
    # Weights of the GIoU losses of the initial and the refined boxes.
    v.LOSS_BBOX_WEIGHT = 1.5
    v.LOSS_BBOX_REFINE_WEIGHT = 2.0

    v.ATSS = CN()
    # ATSS sample assignment: the TOPK anchors nearest to each box per level are its candidates.
    v.ATSS.TOPK = 9
    # One square anchor of side ANCHOR_SCALE x stride per location.
    v.ATSS.ANCHOR_SCALE = 8
    # Per image, only the anchors centered inside the image padded to a multiple of SIZE_DIVISOR
    # take part in ATSS (the official valid flags of its padded shape, size divisor 32); 0: all
    # anchors of the padded batch (vfnet/modeling/atss.py).
    v.ATSS.SIZE_DIVISOR = 32

    # Inference: per level the (location, class) scores above TEST_SCORE_THRESH, at most
    # TEST_TOPK_CANDIDATES of them; class-wise NMS at IoU TEST_NMS_THRESH.
    v.TEST_SCORE_THRESH = 0.05
    v.TEST_TOPK_CANDIDATES = 1000
    v.TEST_NMS_THRESH = 0.6
    # "nms": Detectron2's batched_nms; "soft_nms": class-wise soft-NMS as MMCV's (VFNet-X's,
    # vfnet/layers/soft_nms.py) at IoU TEST_NMS_THRESH, with the arguments of SOFT_NMS.
    v.TEST_NMS_TYPE = "nms"
    # MMCV's soft-NMS defaults: the decay ("linear" or "gaussian"), its sigma, the lowest score.
    v.SOFT_NMS = CN({"METHOD": "linear", "SIGMA": 0.5, "MIN_SCORE": 0.001})
    # Detections kept per image after the NMS.
    v.TEST_DETECTIONS_PER_IMAGE = 100


def add_backbone_config(cfg):
    """``MODEL.RES2NET``, ``MODEL.PAFPNX`` (VFNet-X's neck) and ``MODEL.BACKBONE.NORM_EVAL``."""
    # Res2Net backbone (build_res2net_backbone, build_vfnet_res2net_fpn_backbone; with the keys
    # MODEL.RESNETS.DEPTH, NORM, OUT_FEATURES, DEFORM_*): each bottleneck splits its channels into
    # SCALES groups of BASE_WIDTH x 2**(stage) channels (res2: 26, res3: 52, ...), "26w x 4s".
    cfg.MODEL.RES2NET = CN({"SCALES": 4, "BASE_WIDTH": 26})

    # The PAFPNX neck of VFNet-X (MODEL.BACKBONE.NAME "build_vfnet_pafpnx_backbone",
    # vfnet/modeling/backbone/pafpnx.py).
    cfg.MODEL.PAFPNX = CN()
    # Its bottom-up backbone, a BACKBONE_REGISTRY builder (VFNet-X: "build_res2net_backbone").
    cfg.MODEL.PAFPNX.BOTTOM_UP = "build_resnet_backbone"
    # The features it reads, by increasing stride.
    cfg.MODEL.PAFPNX.IN_FEATURES = ["res3", "res4", "res5"]
    # The channels of its outputs p3-p7.
    cfg.MODEL.PAFPNX.OUT_CHANNELS = 384
    # The norm of all its convs but the 1x1 laterals (official: GN(32)).
    cfg.MODEL.PAFPNX.NORM = "GN"

    # The BatchNorm layers of the bottom-up backbone (MODEL.RESNETS.NORM "BN"/"SyncBN") normalise
    # with their running statistics and never update them, in training too, while their weight
    # and bias train: the official norm_eval=True with BN(requires_grad=True)
    # (vfnet/layers/batch_norm.py). Detectron2's FrozenBN freezes the affine as well.
    cfg.MODEL.BACKBONE.NORM_EVAL = False


def add_iou_aware_retinanet_config(cfg):
    """The IoU-aware losses of the meta-architecture "IoUAwareRetinaNet" (Detectron2's RetinaNet,
    vfnet/modeling/meta_arch/iou_aware_dense.py; Detectron2's "RetinaNet" ignores these keys)."""
    # "focal" (Detectron2's, FOCAL_LOSS_ALPHA, FOCAL_LOSS_GAMMA), "varifocal" (VarifocalNet's, on
    # IoU-aware targets: the IoU of each positive's decoded predicted box with its ground truth)
    # or "quality_focal" (GFL's, same targets, exponent QFL_BETA).
    cfg.MODEL.RETINANET.CLS_LOSS_TYPE = "varifocal"
    # The varifocal loss's parameters, as the official vfl_retinanet config.
    cfg.MODEL.RETINANET.VFL_ALPHA = 0.75
    cfg.MODEL.RETINANET.VFL_GAMMA = 2.0
    cfg.MODEL.RETINANET.VFL_IOU_WEIGHTED = True
    cfg.MODEL.RETINANET.QFL_BETA = 2.0
    # Inference: clip the candidate boxes to the image and drop the empty ones before the NMS, as
    # MMDetection's RetinaHead (configs/mmdet/RetinaNet_VFL_R_50_FPN_1x.yaml, for its converted
    # weights); False: Detectron2's RetinaNet (clipped after the NMS).
    cfg.MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS = False


def add_data_config(cfg):
    """How images are read and resized, which are trained on, and damaged image files."""
    # How images are resized: "PIL" (Detectron2's) or "cv2" (MMDetection's, for its weights).
    cfg.INPUT.RESIZE_BACKEND = "PIL"
    # Which images and boxes of DATASETS.TRAIN are trained on: "detectron2" (images with a
    # non-crowd annotation: DATALOADER.FILTER_EMPTY_ANNOTATIONS) or "mmdet" (the official recipe:
    # images with an annotation and MIN_IMAGE_SIZE px or more on a side; boxes overlapping the
    # image, 1 x 1 px or more, of positive area; vfnet/data/detection_utils.py).
    cfg.DATALOADER.TRAIN_FILTER = "detectron2"
    # The shorter side under which TRAIN_FILTER "mmdet" drops an image.
    cfg.DATALOADER.MIN_IMAGE_SIZE = 32
    # Truncated image files of the --dataset datasets that decode as far as their data goes
    # (PIL's ImageFile.LOAD_TRUNCATED_IMAGES, which OpenCV also does; set only while such a file
    # is decoded) are loaded, with a warning per file, at registration and in the data loaders;
    # False: such a file stops the run at registration (vfnet/data/validation.py). The flag
    # --load-truncated-images sets it.
    cfg.DATASETS.LOAD_TRUNCATED_IMAGES = False
    # Images whose file is missing or cannot be read, and annotations of an image id that is not
    # in the JSON, are left out of the dataset at registration, with a warning that counts them
    # (the evaluation says how many images it covers); False: they stop the run at registration.
    # The flag --drop-unreadable-images sets it.
    cfg.DATASETS.DROP_UNREADABLE_IMAGES = False


def add_augmentation_config(cfg):
    """The training augmentations of VFNet-X (vfnet/data/augmentations.py), with Detectron2's
    INPUT.* keys."""
    # The crop of INPUT.CROP (Detectron2's RandomCrop, before the resize) applied with this
    # probability (official RandomCrop crop_p; 1.0: always, as Detectron2).
    cfg.INPUT.CROP.PROB = 1.0
    # (min, max): the long edge drawn from it and, independently, the short edge from
    # INPUT.MIN_SIZE_TRAIN (sampling "range"), the image rescaled keeping its ratio to fit both
    # (MMDetection's Resize, multiscale_mode "range", two (long, short) img_scales); empty:
    # Detectron2's ResizeShortestEdge (long edge at most INPUT.MAX_SIZE_TRAIN).
    cfg.INPUT.MAX_SIZE_TRAIN_RANGE = ()
    # CutOut inside the ground-truth boxes after the resize, before the flip (VarifocalNet's).
    cfg.INPUT.CUTOUT = CN()
    cfg.INPUT.CUTOUT.ENABLED = False
    # (min, max) holes per box.
    cfg.INPUT.CUTOUT.N_HOLES = (5, 10)
    # The (w, h) of each hole, drawn from these, clipped to the box.
    cfg.INPUT.CUTOUT.SHAPES = [
        (4, 4), (4, 8), (8, 4), (8, 8), (16, 8), (8, 16), (16, 16), (16, 32), (32, 16), (32, 32),
        (32, 48), (48, 32), (48, 48),
    ]
    # The probability that a box gets holes.
    cfg.INPUT.CUTOUT.PROB = 0.5
    # Their fill, in pixel values of the input format.
    cfg.INPUT.CUTOUT.FILL = (0, 0, 0)


def add_solver_config(cfg):
    """The optimizer and its parameter groups (vfnet/solver/build.py), the dtype of AMP training."""
    # Which parameters SOLVER.BIAS_LR_FACTOR and SOLVER.WEIGHT_DECAY_BIAS apply to. "mmdet": as
    # the official VarifocalNet (mmcv's DefaultOptimizerConstructor with bias_lr_mult,
    # bias_decay_mult): the biases of the convs and linear layers; the norm layers' weights and
    # biases keep the base lr with decay SOLVER.WEIGHT_DECAY_NORM, the offset convs of the
    # deformable convs the base lr and decay. "detectron2": Detectron2's
    # get_default_optimizer_params, every parameter named bias (norm layers' included).
    # configs/Base-VFNet.yaml sets "mmdet".
    cfg.SOLVER.PARAM_GROUPS = "detectron2"
    # "SGD" (Detectron2's, SOLVER.MOMENTUM and NESTEROV) or "AdamW" (torch.optim.AdamW with
    # SOLVER.BETAS); both over SOLVER.PARAM_GROUPS, with SOLVER.BASE_LR and WEIGHT_DECAY.
    cfg.SOLVER.OPTIMIZER = "SGD"
    # AdamW's betas.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # The autocast dtype of SOLVER.AMP.ENABLED (Detectron2's key; vfnet/engine/train_loop.py):
    # "auto" is float16 on CUDA (Detectron2's AMPTrainer, with its GradScaler) and bfloat16 on
    # CPU (CPUAutocastTrainer: faster on CPUs with AMX or AVX-512 BF16, slower without them);
    # "bfloat16" on CUDA trains without loss scaling; "float16" is for CUDA only.
    cfg.SOLVER.AMP.DTYPE = "auto"


def add_swa_config(cfg):
    """``SOLVER.SWA``: stochastic weight averaging, the official SWA phase (vfnet/engine/hooks.py)."""
    cfg.SOLVER.SWA = CN()
    # After the SOLVER.MAX_ITER iterations of the normal schedule (0: none, from MODEL.WEIGHTS),
    # the SWA phase; the weights at the end of each epoch are averaged into
    # OUTPUT_DIR/model_swa.pth, evaluated when TEST.EVAL_PERIOD > 0.
    cfg.SOLVER.SWA.ENABLED = False
    # Its epochs.
    cfg.SOLVER.SWA.EPOCHS = 12
    # Iterations per epoch; 0: DATASETS.TRAIN's images / SOLVER.IMS_PER_BATCH.
    cfg.SOLVER.SWA.EPOCH_ITERS = 0
    # In each epoch the learning rate goes from LR_FACTORS[0] to LR_FACTORS[1] x the normal one
    # along a cosine (mmcv's cyclic policy, step_ratio_up 0).
    cfg.SOLVER.SWA.LR_FACTORS = (1.0, 0.01)
    # BatchNorm layers that train their statistics get them recomputed for the average over
    # this many training batches (0: one epoch).
    cfg.SOLVER.SWA.BN_UPDATE_ITERS = 0


def add_test_config(cfg):
    """Inference under autocast, test-time augmentation's scales, the pictures of a run."""
    # Inference under autocast (the backbone and the head; post-processing in float32):
    # bfloat16 on CPU (AMX/AVX-512 bf16 CPUs run it faster), float16 or bfloat16 on CUDA.
    cfg.TEST.AMP = CN({"ENABLED": False, "DTYPE": "bfloat16"})
    # Test-time augmentation (vfnet/modeling/test_time_augmentation.py), with Detectron2's
    # TEST.AUG keys (ENABLED, MIN_SIZES, MAX_SIZE, FLIP): the long-side limit of each of
    # TEST.AUG.MIN_SIZES, as MMDetection's (long, short) test scales give it; empty:
    # TEST.AUG.MAX_SIZE for all. configs/VFNet_R_50_FPN_1x_TTA.yaml sets the official scales.
    cfg.TEST.AUG.MAX_SIZES = ()
    # The pictures at the end of training (vfnet/engine/hooks.py Pictures): the first NUM_IMAGES
    # images of DATASETS.TEST[0] with the detections scoring >= SCORE_THRESH drawn by Detectron2's
    # Visualizer, COLUMNS per row, in OUTPUT_DIR/detections.png, and the training curves
    # (OUTPUT_DIR/losses.png, lr.png, ap.png); 0 images: none.
    cfg.TEST.GALLERY = CN({"NUM_IMAGES": 0, "SCORE_THRESH": 0.3, "COLUMNS": 4})
