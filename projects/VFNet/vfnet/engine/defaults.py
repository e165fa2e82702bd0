"""
The training loop of the project's tools: Detectron2's DefaultTrainer with this project's
checkpointer, resumable data loader, mapper and evaluator, and what tools/train_net.py runs.
"""
import copy
import difflib
import logging
import os
import re
import tempfile
import weakref
from collections import OrderedDict

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.engine import DefaultTrainer, TrainerBase, default_setup, hooks, launch
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.detection_checkpoint import VFNetCheckpointer, load_for_evaluation
from ..config import add_vfnet_config
from ..data.build import build_resumable_train_loader
from ..data.datasets import register_coco_dataset
from ..data.mapper import VFNetDatasetMapper
from ..evaluation import VFNetCOCOEvaluator
from ..modeling.test_time_augmentation import VFNetWithTTA
from ..solver import build_lr_scheduler, build_optimizer, swa_schedule
from ..utils.gallery import write_gallery
from .hooks import Pictures, StochasticWeightAveraging
from .train_loop import build_trainer

__all__ = [
    "Trainer",
    "check_datasets",
    "check_output_dir",
    "default_argument_parser",
    "launch_main",
    "main",
    "merge_config",
    "register_datasets",
    "setup",
]


def create_ddp_model(model, **kwargs):
    """
    Detectron2's `create_ddp_model`, also for CPU workers (gloo, as `launch` starts them without
    GPUs): DistributedDataParallel takes no device_ids for a CPU model.
    """
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_defaults.create_ddp_model(model, **kwargs)


def check_datasets(cfg, keys=("TRAIN", "TEST")):
    """
    Refuse a dataset of DATASETS.TRAIN or DATASETS.TEST (`keys`) that is not registered, or
    whose number of classes (its metadata's thing_classes) is not the model's NUM_CLASSES.
    """
    registered = set(DatasetCatalog.list())
    # The config node that holds the model's number of classes (train_net also trains
    # Detectron2's RetinaNet, for comparisons).
    retina = {"RetinaNet": "RETINANET", "IoUAwareRetinaNet": "RETINANET"}
    head = {"VFNet": "VFNET", **retina}.get(cfg.MODEL.META_ARCHITECTURE, "VFNET")
    for key in keys:
        for name in cfg.DATASETS[key]:
            if name not in registered:
                raise KeyError(
                    f"DATASETS.{key} names dataset '{name}', which is not registered. Register a "
                    f"COCO-format dataset with --dataset {name}=JSON:IMAGE_DIR, or use a name "
                    f"registered by Detectron2 or vfnet (e.g. coco_2017_val, vfnet_shapes_val)."
                )
            classes = MetadataCatalog.get(name).get("thing_classes")
            if classes is not None and len(classes) != cfg.MODEL[head].NUM_CLASSES:
                raise ValueError(
                    f"MODEL.{head}.NUM_CLASSES is {cfg.MODEL[head].NUM_CLASSES}, but dataset "
                    f"'{name}' (DATASETS.{key}) has {len(classes)} classes: {classes[:10]}"
                    f"{' ...' if len(classes) > 10 else ''}. Set MODEL.{head}.NUM_CLASSES "
                    f"{len(classes)}."
                )


class Trainer(DefaultTrainer):
    """
    Detectron2's DefaultTrainer with this project's checkpointer, resumable data loader, mapper
    and evaluator; with SOLVER.SWA.ENABLED, the run goes on after SOLVER.MAX_ITER with the SWA
    phase (:class:`StochasticWeightAveraging`, SOLVER.SWA.*), which writes OUTPUT_DIR/model_swa.pth.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__'s steps, with this project's DDP wrapper (CPU workers too),
        # train loop (vfnet/engine/train_loop.py: CPU bf16 autocast too) and checkpointer.
        check_datasets(cfg)
        schedule = swa_schedule(cfg)
        if schedule.epochs and schedule.epoch_iters != cfg.SOLVER.SWA.EPOCH_ITERS:
            cfg = cfg.clone()  # an epoch's iterations, counted once from DATASETS.TRAIN
            cfg.defrost()
            cfg.SOLVER.SWA.EPOCH_ITERS = schedule.epoch_iters
            cfg.freeze()
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_trainer(
            model, data_loader, optimizer, cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED,
            cfg.SOLVER.AMP.DTYPE,
        )  # fmt: skip
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = VFNetCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = schedule.max_iter  # the writers' ETA and the hooks count the SWA phase
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        schedule = swa_schedule(self.cfg)
        ret = super().build_hooks()
        if schedule.epochs:
            # Before the checkpointer, whose checkpoints hold the average of that iteration.
            first = next(
                i for i, h in enumerate(ret)
                if isinstance(h, (hooks.PeriodicCheckpointer, hooks.EvalHook))
            )  # fmt: skip
            ret.insert(first, self._build_swa_hook(schedule))
        gallery = self.cfg.TEST.GALLERY
        if gallery.NUM_IMAGES > 0 and self.cfg.DATASETS.TEST:
            mapper = VFNetDatasetMapper(self.cfg, is_train=False)
            ret.append(
                Pictures(
                    self.cfg.OUTPUT_DIR,
                    lambda model: write_gallery(
                        model, self.cfg, mapper, os.path.join(self.cfg.OUTPUT_DIR, "detections.png"),
                        gallery.NUM_IMAGES, gallery.SCORE_THRESH, gallery.COLUMNS,
                    ),
                    lambda: OrderedDict(
                        getattr(self, "_last_eval_results", None) or {},
                        **getattr(self, "_last_swa_results", {}),
                    ),
                )
            )  # fmt: skip
        return ret

    def _build_swa_hook(self, schedule):
        cfg = self.cfg
        eval_function = None
        if cfg.TEST.EVAL_PERIOD > 0 and cfg.DATASETS.TEST:

            def eval_function(model):
                folder = os.path.join(cfg.OUTPUT_DIR, "inference_swa")
                evaluators = [
                    self.build_evaluator(cfg, name, output_folder=folder)
                    for name in cfg.DATASETS.TEST
                ]
                results = self.test(cfg, model, evaluators)
                self._last_swa_results = OrderedDict((k + "_swa", v) for k, v in results.items())
                return results

        bn_iters = cfg.SOLVER.SWA.BN_UPDATE_ITERS or schedule.epoch_iters
        return StochasticWeightAveraging(
            schedule.start_iter,
            schedule.epoch_iters,
            schedule.epochs,
            cfg.OUTPUT_DIR,
            eval_function=eval_function,
            bn_update_loader=lambda: self.build_train_loader(cfg),
            bn_update_iters=bn_iters,
        )

    def train(self):
        """
        Train; return the last evaluation's results (main process), with those of the SWA model
        under their keys + "_swa" ("bbox_swa") when it was evaluated.
        """
        self._last_swa_results = OrderedDict()
        results = super().train()
        if self._last_swa_results and comm.is_main_process():
            results = OrderedDict(results or {}, **self._last_swa_results)
        return results

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        # The batches go on from the iteration the run starts at (vfnet/data/samplers.py).
        self._trainer.data_loader.batch_sampler.start_iter = self.start_iter

    def state_dict(self):
        ret = super().state_dict()
        ret["data_loader"] = self._trainer.data_loader.batch_sampler.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "data_loader" in state_dict:  # checkpoints of this project before 2026-12
            self._trainer.data_loader.batch_sampler.load_state_dict(state_dict["data_loader"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg, VFNetDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=VFNetDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return VFNetCOCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        check_datasets(cfg, keys=("TEST",))
        return super().test(cfg, model, evaluators)

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """
        Evaluate `model` with test-time augmentation (:class:`VFNetWithTTA`, TEST.AUG.*), as
        Detectron2's tools/train_net.py does: the evaluators write to OUTPUT_DIR/inference_TTA,
        the results are returned under the evaluation's keys + "_TTA" ("bbox_TTA").
        """
        logging.getLogger("vfnet").info("Running inference with test-time augmentation ...")
        model = VFNetWithTTA(cfg, model)
        evaluators = [
            cls.build_evaluator(
                cfg, name, output_folder=os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
            )
            for name in cfg.DATASETS.TEST
        ]
        # The test loader gives the original images (MIN_SIZE_TEST 0: no resize), which each
        # view is resized from, as MMDetection's MultiScaleFlipAug does.
        loader_cfg = cfg.clone()
        loader_cfg.defrost()
        loader_cfg.INPUT.MIN_SIZE_TEST = 0
        loader_cfg.freeze()
        res = cls.test(loader_cfg, model, evaluators)
        return OrderedDict((k + "_TTA", v) for k, v in res.items())


def launch_main(main_func) -> None:
    """Parse the command line (:func:`default_argument_parser`) and `launch` `main_func(args)`
    on its workers, as Detectron2's tools do."""
    args = default_argument_parser().parse_args()
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


def default_argument_parser(epilog=None):
    """
    Detectron2's `default_argument_parser`, with `--dataset NAME=JSON:IMAGE_DIR` and the options
    for its damaged image files, `--load-truncated-images` and `--drop-unreadable-images` (which
    set DATASETS.LOAD_TRUNCATED_IMAGES and DATASETS.DROP_UNREADABLE_IMAGES).
    """
    parser = d2_defaults.default_argument_parser(epilog)
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    parser.add_argument(
        "--load-truncated-images",
        action="store_true",
        help="load truncated image files of the --dataset datasets as far as their data goes "
        "(as OpenCV does), with a warning per file, instead of stopping at registration "
        "(sets DATASETS.LOAD_TRUNCATED_IMAGES True)",
    )
    parser.add_argument(
        "--drop-unreadable-images",
        action="store_true",
        help="leave the images of the --dataset datasets whose files are missing or cannot be "
        "read out of them, with their annotations (a warning names them; the evaluation covers "
        "the other images), instead of stopping at registration "
        "(sets DATASETS.DROP_UNREADABLE_IMAGES True)",
    )
    return parser


def _config_keys(cfg, prefix=""):
    for key, value in cfg.items():
        if isinstance(value, dict):
            yield from _config_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def merge_config(cfg, config_file, opts):
    """
    `cfg.merge_from_file(config_file)` then `cfg.merge_from_list(opts)`; a key that does not
    exist raises a KeyError that names it, where it comes from and the nearest existing keys.
    """
    for source, merge in (
        (f"config file '{config_file}'", lambda: cfg.merge_from_file(config_file)),
        ("command line", lambda: cfg.merge_from_list(opts)),
    ):
        try:
            merge()
        except (KeyError, AssertionError) as e:  # yacs raises either, depending on the source
            found = re.search(r"Non-existent (?:config )?key: (\S+?)'?$", str(e))
            if not found:
                raise
            key = found.group(1)
            close = difflib.get_close_matches(key, list(_config_keys(cfg)), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            raise KeyError(f"Config key {key} ({source}) does not exist.{hint}") from None


def check_output_dir(path: str, key: str = "OUTPUT_DIR") -> None:
    """
    Refuse an output directory (the config key `key`) that is not a directory, or cannot be
    created or written, before anything is written to it; create it when it is missing. A
    PathManager address (``scheme://...``) is left to its handler.
    """
    if not path or "://" in path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"{key} '{path}' exists and is not a directory: give a directory for the logs, "
            "checkpoints and results (it is created when it does not exist)."
        )
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vfnet_write_check_"):
            pass
    except OSError as e:
        raise ValueError(
            f"{key} '{path}' cannot be created or written ({type(e).__name__}: {e}): give a "
            "directory this process can write the logs, checkpoints and results to."
        ) from None


def setup(args):
    """The frozen config of `args` (config file, then overrides), set up as Detectron2 does."""
    cfg = get_cfg()
    add_vfnet_config(cfg)
    merge_config(cfg, args.config_file, args.opts)
    cfg.freeze()
    check_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="vfnet")
    return cfg


def register_datasets(
    specs, load_truncated_images: bool = False, drop_unreadable_images: bool = False
) -> None:
    """
    Register the `--dataset NAME=JSON:IMAGE_DIR` datasets `specs` (see
    :func:`vfnet.data.datasets.register_coco_dataset`), in every worker process (launch() starts
    them fresh); the image files are checked once, by the main process. With
    `drop_unreadable_images` under DDP, the other workers drop the images the main process
    dropped.
    """
    main_process, drop = comm.is_main_process(), drop_unreadable_images
    options = dict(load_truncated_images=load_truncated_images, drop_unreadable_images=drop)
    for spec in specs:
        if not (drop and comm.get_world_size() > 1):
            register_coco_dataset(spec, check_files=main_process, **options)
            continue
        dropped = None
        if main_process:
            name = register_coco_dataset(spec, check_files=True, **options)
            dropped = MetadataCatalog.get(name).dropped_image_ids
        dropped = comm.all_gather(dropped)[0]
        if not main_process:
            register_coco_dataset(spec, check_files=False, drop_image_ids=dropped, **options)


def main(args):
    """
    What tools/train_net.py runs in each worker: register the `--dataset`s, then train (resuming
    with `--resume`), or with `--eval-only` evaluate the weights; with TEST.AUG.ENABLED, also
    with test-time augmentation (after the evaluation, or at the end of training).
    """
    # The flags for damaged image files set their config keys (saved in OUTPUT_DIR/config.yaml).
    flags = (
        ("load_truncated_images", "DATASETS.LOAD_TRUNCATED_IMAGES"),
        ("drop_unreadable_images", "DATASETS.DROP_UNREADABLE_IMAGES"),
    )
    extra_opts = [x for flag, key in flags if getattr(args, flag, False) for x in (key, "True")]
    if extra_opts:
        args = copy.copy(args)
        args.opts = list(args.opts) + extra_opts
    cfg = setup(args)
    register_datasets(
        args.dataset,
        load_truncated_images=cfg.DATASETS.LOAD_TRUNCATED_IMAGES,
        drop_unreadable_images=cfg.DATASETS.DROP_UNREADABLE_IMAGES,
    )

    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_for_evaluation(model, cfg.MODEL.WEIGHTS, cfg.OUTPUT_DIR, resume=args.resume)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if cfg.TEST.AUG.ENABLED:  # an evaluation with TTA at the end of training (Detectron2's)
        trainer.register_hooks(
            [hooks.EvalHook(0, lambda: trainer.test_with_TTA(cfg, trainer.model))]
        )
    return trainer.train()
