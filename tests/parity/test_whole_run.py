"""
The whole-run comparison (tools/compare_mmdet_runs.py, dev/mmdet_whole_run.py) in the MMDetection
parity environment: the recipe written for MMDetection is the demo's (the same parameter groups,
learning rate at every iteration, input sizes and starting weights as this project's run), and a
two-iteration smoke of the tool, in which both frameworks start, log their losses and evaluate.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

mp = pytest.importorskip("dev.mmdet_parity")
pytest.importorskip("mmdet")

from dev import mmdet_whole_run as wr  # noqa: E402
from helpers import ROOT, tiny_shapes  # noqa: E402

CLASSES = ("circle", "rectangle", "triangle", "cross")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("whole_run_data")
    tiny_shapes(root, 8, 4)
    return (str(root / "train.json"), str(root / "train")), (str(root / "val.json"), str(root / "val"))


@pytest.fixture(scope="module")
def models(data, tmp_path_factory):
    """The demo's VFNet in both frameworks from MMDetection's initialisation (seed 0), with each
    one's optimizer and learning-rate schedule built by its own framework from the recipe."""
    from detectron2.modeling import build_model
    from mmdet.registry import MODELS
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    from vfnet.engine import Trainer

    work = tmp_path_factory.mktemp("whole_run_init")
    cfg = wr.load_d2_recipe()
    mm_cfg = wr.mmdet_config("VFNet", cfg, *data, CLASSES, 0, str(work))
    init_mm, init_d2 = str(work / "init.pth"), str(work / "init_d2.pth")
    wr.write_init("VFNet", mm_cfg, init_mm, 0, init_d2)

    mm = MODELS.build(mm_cfg.model)
    mm.load_state_dict(torch.load(init_mm, weights_only=False)["state_dict"])
    wrapper = build_optim_wrapper(mm, mm_cfg.optim_wrapper)
    mm_scheds = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in mm_cfg.param_scheduler]

    d2 = build_model(cfg)
    missing = d2.load_state_dict(torch.load(init_d2, weights_only=True)["model"], strict=False)
    assert not missing.unexpected_keys
    assert all(k.endswith("num_batches_tracked") for k in missing.missing_keys)
    d2_opt = Trainer.build_optimizer(cfg, d2)
    d2_sched = Trainer.build_lr_scheduler(cfg, d2_opt)
    return cfg, mm_cfg, (mm, wrapper, mm_scheds), (d2, d2_opt, d2_sched)


def test_same_starting_weights(models):
    """Every tensor of this project's model is MMDetection's initial one (converted)."""
    from vfnet.checkpoint.converter import convert_mmdet_to_d2

    _, _, (mm, _, _), (d2, _, _) = models
    mm_sd = convert_mmdet_to_d2(mm.state_dict())[0]
    d2_sd = d2.state_dict()
    compared = [k for k in d2_sd if not k.endswith("num_batches_tracked")]
    assert len(compared) > 100
    assert all(torch.equal(d2_sd[k], mm_sd[k]) for k in compared)


def test_same_parameter_groups(models):
    """Each trained parameter has the same learning rate and weight decay in both optimizers
    (AdamW, betas and eps alike): none on the norm layers' weights and biases and the convs'
    biases, 0.05 on the conv weights and the per-level scales."""
    from vfnet.checkpoint.converter import convert_key

    _, _, (mm, wrapper, _), (d2, d2_opt, _) = models
    mm_opt = wrapper.optimizer
    assert type(mm_opt) is type(d2_opt) is torch.optim.AdamW

    def settings(opt):
        out = {}
        for g in opt.param_groups:
            for p in g["params"]:
                out[id(p)] = (g["lr"], g["weight_decay"], tuple(g["betas"]), g["eps"])
        return out

    mm_set, d2_set = settings(mm_opt), settings(d2_opt)
    d2_params = dict(d2.named_parameters())
    decays = set()
    for name, p in mm.named_parameters():
        target = convert_key(name)[1]
        d2_name = target[0] if isinstance(target, tuple) else target  # a per-level scale: stacked
        assert mm_set[id(p)] == d2_set[id(d2_params[d2_name])], (name, d2_name)
        decays.add(mm_set[id(p)][1])
    assert decays == {0.0, 0.05}  # both kinds are there: the comparison can fail


def test_same_learning_rate_at_every_iteration(models):
    """Warm-up from 0.1 x lr over 100 iterations, x0.1 at 480 and 570: mmengine's schedulers and
    Detectron2's, each stepped after every iteration as their runners do, for all 600."""
    cfg, _, (_, wrapper, mm_scheds), (_, d2_opt, d2_sched) = models
    lrs = []
    for it in range(cfg.SOLVER.MAX_ITER):
        lrs.append((wrapper.optimizer.param_groups[0]["lr"], d2_opt.param_groups[0]["lr"]))
        for s in mm_scheds:
            s.step()
        d2_sched.step()
    bad = [(i, a, b) for i, (a, b) in enumerate(lrs) if abs(a - b) > 1e-9]
    assert not bad, bad[:5] + bad[-5:]
    assert lrs[0][0] == pytest.approx(1e-4) and lrs[100][0] == pytest.approx(1e-3)
    assert lrs[479][0] == pytest.approx(1e-3) and lrs[480][0] == pytest.approx(1e-4)
    assert lrs[570][0] == pytest.approx(1e-5)


@pytest.mark.parametrize("hw", [(96, 128), (128, 96), (100, 120), (128, 128), (97, 101)])
def test_same_input_sizes(models, hw):
    """MMDetection's Resize (keep ratio, scale (128, 96)) gives each image the size Detectron2's
    ResizeShortestEdge (96, max 128) gives it, in training and at test time."""
    import numpy as np
    from detectron2.data.transforms import ResizeShortestEdge
    from mmdet.datasets.transforms import Resize

    cfg, mm_cfg, _, _ = models
    img = np.zeros((*hw, 3), np.uint8)
    for pipeline, d2_resize in (
        (mm_cfg.train_dataloader.dataset.pipeline, ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, "choice")),
        (mm_cfg.val_dataloader.dataset.pipeline, ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)),
    ):  # fmt: skip
        spec = next(t for t in pipeline if t["type"] == "Resize")
        out = Resize(scale=spec["scale"], keep_ratio=spec["keep_ratio"])({"img": img})["img"]
        assert out.shape[:2] == d2_resize.get_transform(img).apply_image(img).shape[:2]


def test_tool_smoke_both_frameworks_train_log_and_evaluate(data, tmp_path):
    """tools/compare_mmdet_runs.py --smoke: each framework's run trains 2 iterations from the same
    initialisation, logs its losses, evaluates, and the comparison tabulates both."""
    (train, val), out = data, tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "compare_mmdet_runs.py"), "--smoke",
         "--train", ":".join(train), "--val", ":".join(val), "--output-root", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["framework"]: r for r in summary["runs"]}
    assert set(runs) == {"mmdet", "detectron2"}
    for fw, names in (("mmdet", wr.LOSS_NAMES), ("detectron2", wr.LOSS_NAMES.values())):
        r = runs[fw]
        assert {"AP", "AP50", "AP75"} <= set(r["bbox"]), fw
        assert list(r["losses"]) == ["1"], fw  # the window that ends at the last iteration
        assert all(0 < r["losses"]["1"][n] < 10 for n in names), (fw, r["losses"])
    assert "verdict" in proc.stdout and (out / "losses.png").stat().st_size > 10000
    for line in ("start", "done"):
        assert proc.stdout.count(f"\n{line} ") + proc.stdout.startswith(f"{line} ") == 2, line
