"""
What tools/lazyconfig_train_net.py runs: Detectron2's LazyConfig training loop (its
tools/lazyconfig_train_net.py: the config's `model`, `optimizer`, `dataloader.train/test/evaluator`
and `lr_multiplier` instantiated, SimpleTrainer or AMPTrainer, Detectron2's hooks, `train.*` as
in Detectron2's configs/common/train.py), with this project's parts:

* `train.amp.enabled` trains on CPU too, under bf16 autocast, and `train.amp.dtype` ("auto",
  "bfloat16", "float16") picks the dtype as SOLVER.AMP.DTYPE does (`build_trainer`);
* the checkpointer is :class:`VFNetCheckpointer` (atomic writes); the state of a resumable
  training loader (`build_resumable_train_loader`: its data seed) is in the checkpoints as
  "data_loader", and a resumed run goes on with the batches the interrupted one would have read;
* `--eval-only` loads `train.init_checkpoint` (or, with `--resume`, the last checkpoint) as
  tools/train_net.py does, refusing missing or ill-fitting weights (`load_for_evaluation`);
* DDP of a CPU model (the `create_ddp_model` of vfnet.engine.defaults);
* `--dataset NAME=JSON:IMAGE_DIR` registration (vfnet.engine.defaults.register_datasets);
* `train.gallery` (num_images, score_thresh, columns): the pictures of the demos at the end of
  training, as TEST.GALLERY.* (:class:`Pictures`);
* an override of a key that the config does not have is applied, as Detectron2 does, with a
  warning that names the nearest existing keys (a typo would otherwise go unnoticed).

Seeds: `train.seed` is Detectron2's (`default_setup` seeds the generators with it, + the rank,
before the model is built: its initialisation); the project's configs pass it on to the
resumable training loader (`dataloader.train.seed: ${train.seed}`, the data order and
augmentations). Negative: random.
"""
import difflib
import logging
import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Tuple

from omegaconf import OmegaConf

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint.detection_checkpoint import VFNetCheckpointer, load_for_evaluation
from ..utils.gallery import write_dataset_gallery
from .defaults import check_output_dir, create_ddp_model, register_datasets
from .hooks import Pictures
from .train_loop import build_trainer

__all__ = ["do_test", "do_train", "main", "setup", "unknown_override_keys"]

logger = logging.getLogger("detectron2")


def _leaf_keys(node, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        yield prefix[:-1]
        return
    if not items and prefix:
        yield prefix[:-1]
    for key, value in items:
        yield from _leaf_keys(value, f"{prefix}{key}.")


def unknown_override_keys(cfg, overrides: List[str]) -> List[Tuple[str, List[str]]]:
    """
    The keys of the `key=value` overrides that `cfg` does not have (Detectron2 adds them), each
    with the nearest keys it has. A key written "+key=value" (Hydra's explicit addition) is not
    listed.
    """
    keys = set(_leaf_keys(OmegaConf.to_container(cfg, resolve=False)))
    unknown = []
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith("+") or key in keys or any(k.startswith(key + ".") for k in keys):
            continue
        unknown.append((key, difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)))
    return unknown


def _load_truncated_images(cfg) -> None:
    """--load-truncated-images: the mappers of the config load truncated image files too."""
    for part in ("train", "test"):
        mapper = OmegaConf.select(cfg, f"dataloader.{part}.mapper", default=None)
        if mapper is None:
            continue
        if "load_truncated_images" in mapper:
            mapper.load_truncated_images = True
        else:
            logging.getLogger("vfnet").warning(
                f"--load-truncated-images: dataloader.{part}.mapper has no load_truncated_images "
                "argument (a VFNetDatasetMapper has); its images are read as it reads them."
            )


def setup(args):
    """
    The lazy config of `args` (`--config-file`, then the `key=value` overrides), set up as
    Detectron2's tools/lazyconfig_train_net.py does (`default_setup`: logging, the config saved
    to train.output_dir/config.yaml, the seed train.seed).
    """
    cfg = LazyConfig.load(args.config_file)
    unknown = unknown_override_keys(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if getattr(args, "load_truncated_images", False):
        _load_truncated_images(cfg)
    check_output_dir(cfg.train.output_dir, key="train.output_dir")
    default_setup(cfg, args)
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="vfnet")
    for key, close in unknown:
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        logging.getLogger("vfnet").warning(
            f"The override of {key} adds a key that {args.config_file} does not have.{hint}"
        )
    return cfg


def do_test(cfg, model) -> Dict:
    """
    Detectron2's: evaluate `model` on `dataloader.test` with `dataloader.evaluator`, print the
    results in Detectron2's "copypaste" format; the results (empty on the other DDP workers).
    """
    if "evaluator" not in cfg.dataloader:
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    return ret


def _pictures_hook(cfg, results) -> Pictures:
    """The pictures at the end of training (train.gallery), of dataloader.test's first dataset."""
    gallery = cfg.train.gallery
    names = cfg.dataloader.test.dataset.names
    name = names if isinstance(names, str) else names[0]
    mapper = instantiate(cfg.dataloader.test.mapper)
    output_dir = cfg.train.output_dir
    return Pictures(
        output_dir,
        lambda model: write_dataset_gallery(
            model, name, mapper, os.path.join(output_dir, "detections.png"),
            gallery.num_images, gallery.score_thresh, gallery.columns,
        ),
        lambda: results,
    )  # fmt: skip


def do_train(args, cfg) -> Dict:
    """
    Train as Detectron2's tools/lazyconfig_train_net.py does (see the module's docstring for
    what this project's adds); evaluate at the end (and every train.eval_period iterations when
    it is positive). Returns the last evaluation's results (main process).
    """
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)

    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, **cfg.train.ddp)
    amp = cfg.train.amp
    trainer = build_trainer(
        model, train_loader, optim, cfg.train.device, amp.enabled, amp.get("dtype", "auto"),
        key="train.amp.dtype",
    )  # fmt: skip
    # The resumable loader's batches are a function of the iteration and its seed.
    batch_sampler = getattr(train_loader, "batch_sampler", None)
    resumable = all(hasattr(batch_sampler, a) for a in ("start_iter", "state_dict"))
    checkpointables = {"data_loader": batch_sampler} if resumable else {}
    checkpointer = VFNetCheckpointer(
        model, cfg.train.output_dir, trainer=trainer, **checkpointables
    )

    results = OrderedDict()

    def test_and_keep_results():
        results.clear()
        results.update(do_test(cfg, model))
        return results

    gallery = cfg.train.get("gallery", None)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, test_and_keep_results),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
            (
                _pictures_hook(cfg, results)
                if gallery and gallery.num_images > 0 and comm.is_main_process()
                else None
            ),
        ]
    )

    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    if args.resume and checkpointer.has_checkpoint():
        # The checkpoint stores the training iteration that just finished, thus we start
        # at the next iteration
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    if resumable:
        batch_sampler.start_iter = start_iter
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def main(args) -> Dict:
    """
    What tools/lazyconfig_train_net.py runs in each worker: set up the config, register the
    `--dataset`s, then train (resuming with `--resume`), or with `--eval-only` evaluate
    train.init_checkpoint (with `--resume`: the last checkpoint of train.output_dir, if any).
    """
    cfg = setup(args)
    register_datasets(
        getattr(args, "dataset", []),
        load_truncated_images=getattr(args, "load_truncated_images", False),
        drop_unreadable_images=getattr(args, "drop_unreadable_images", False),
    )
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        load_for_evaluation(
            model, cfg.train.init_checkpoint, cfg.train.output_dir, resume=args.resume,
            weights_key="train.init_checkpoint",
        )  # fmt: skip
        return do_test(cfg, model)
    return do_train(args, cfg)
