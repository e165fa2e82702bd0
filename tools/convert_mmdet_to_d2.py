#!/usr/bin/env python3
"""
Convert an MMDetection VarifocalNet checkpoint (e.g. the official
``vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth``) to a Detectron2 checkpoint of this project.

    python tools/convert_mmdet_to_d2.py IN.pth OUT.pth \
        [--config-file configs/mmdet/VFNet_R_50_FPN_1x.yaml] [KEY VALUE ...]

The output is ``{"model": state_dict, "__author__": "mmdetection", "matching_heuristics":
False}``: ``DetectionCheckpointer(model).load(OUT)`` loads it by exact names (no heuristic
renaming). With ``--config-file`` (and optional config overrides after it) the model of that
config is built on the CPU and every key and shape is checked; all problems are reported at
once and nothing is written. The output is written to a temporary file in the target folder
and renamed into place, so a failed run leaves no partial file.
"""

import argparse
import os
import sys
import tempfile

import torch

try:
    from vfnet.converter import (
        ConversionError,
        convert_mmdet_to_d2,
        describe_mmdet_state_dict,
        extract_state_dict,
    )
except ModuleNotFoundError:  # not installed: use the source tree
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects", "VFNet")
    )
    from vfnet.converter import (
        ConversionError,
        convert_mmdet_to_d2,
        describe_mmdet_state_dict,
        extract_state_dict,
    )


def load_checkpoint(path: str, allow_unsafe: bool = False):
    """
    torch.load with ``weights_only=True``. MMDetection checkpoints carry a ``meta`` dict
    (versions, class names, config text, sometimes numpy scalars); the numpy scalar/dtype
    reconstructors are allow-listed for the safe loader. Anything else needs ``allow_unsafe``
    (a full unpickling, only for files you trust).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - re-raised below with context
        error = first
    try:
        import numpy as np

        allowed = [np.dtype, np.ndarray]
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                allowed.append(__import__(mod, fromlist=["scalar"]).scalar)
                allowed.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
            except (ImportError, AttributeError):
                pass
        allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int32", "int64", "bool")]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as second:  # noqa: BLE001
        error = second
    if allow_unsafe:
        return torch.load(path, map_location="cpu", weights_only=False)
    raise SystemExit(
        f"error: cannot load '{path}' with torch.load(weights_only=True): {error}\n"
        "If you trust this file, rerun with --allow-unsafe-pickle."
    )


def check_against_model(converted, config_file: str, opts):
    """Build the config's model on the CPU; return a list of problems (empty when it fits)."""
    import vfnet  # noqa: F401 - registers the VFNet meta-architecture and backbone
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model_sd = build_model(cfg).state_dict()
    problems = []
    for k in model_sd:
        if k not in converted:
            problems.append(f"missing in checkpoint: {k} {tuple(model_sd[k].shape)}")
    for k, v in converted.items():
        if k not in model_sd:
            problems.append(f"not in the model: {k} {tuple(v.shape)}")
        elif tuple(v.shape) != tuple(model_sd[k].shape):
            problems.append(
                f"shape mismatch: {k} checkpoint {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
            )
    return problems


def save_atomic(obj, path: str):
    """torch.save to a temporary file next to `path`, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="MMDetection checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument(
        "--config-file", default="", help="check keys and shapes against this config's model"
    )
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="fall back to torch.load(weights_only=False) for files the safe loader refuses",
    )
    parser.add_argument(
        "opts", nargs="*", help="config overrides (KEY VALUE pairs), with --config-file"
    )
    args = parser.parse_intermixed_args(argv)

    if not os.path.isfile(args.input):
        raise SystemExit(f"error: no such file: {args.input}")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise SystemExit("error: the output would overwrite the input.")
    checkpoint = load_checkpoint(args.input, args.allow_unsafe_pickle)
    try:
        state_dict = extract_state_dict(checkpoint)
        converted, report = convert_mmdet_to_d2(state_dict)
    except ConversionError as e:
        raise SystemExit(f"error: {args.input}: {e}")
    info = describe_mmdet_state_dict(state_dict)

    if args.config_file:
        problems = check_against_model(converted, args.config_file, args.opts)
        if problems:
            lines = "\n  ".join(problems)
            raise SystemExit(
                f"error: the converted checkpoint does not fit {args.config_file} "
                f"({len(problems)} problem(s)); nothing written:\n  {lines}"
            )
    elif args.opts:
        raise SystemExit("error: config overrides need --config-file.")

    save_atomic(
        {"model": converted, "__author__": "mmdetection", "matching_heuristics": False},
        args.output,
    )
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    version = meta.get("mmdet_version") if isinstance(meta, dict) else None
    print(f"{args.input}" + (f" (mmdet {version})" if version else ""))
    print(
        f"  {len(state_dict)} tensors -> {len(converted)} "
        f"({len(report['dropped'])} num_batches_tracked dropped, "
        f"{len(report['stacked'])} per-level scales stacked into head.scales/head.scales_refine)"
    )
    print(
        "  architecture: ResNet{depth} blocks {blocks} groups {g} x width {w}, DCNv2 in {dcn}, "
        "DCN tower conv: {tower}, {k} classes, {lv} levels".format(
            depth=info["depth"] or "?",
            blocks=info["blocks_per_stage"],
            g=info["num_groups"],
            w=info["width_per_group"],
            dcn=info["deform_stages"] or "none",
            tower=info["dcn_on_last_conv"],
            k=info["num_classes"],
            lv=info["num_levels"],
        )
    )
    if args.config_file:
        print(f"  checked against {args.config_file}: every key and shape matches")
    print(f"  wrote {args.output}")


if __name__ == "__main__":
    main()
