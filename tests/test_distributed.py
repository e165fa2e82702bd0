"""Training under Detectron2's launcher (DDP, gloo on CPU) equals training in one process."""
import os
import subprocess
import sys
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_sgd_step_on_two_workers_equals_one_process(tmp_path):
    script = os.path.join(ROOT, "tests", "scripts", "ddp_sgd_step.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    single, ddp = torch.load(tmp_path / "single.pth"), torch.load(tmp_path / "ddp.pth")
    grads_single = torch.load(tmp_path / "single_grads.pth")
    grads_ddp = torch.load(tmp_path / "ddp_grads.pth")
    assert set(grads_single) == set(grads_ddp) and len(grads_single) > 50

    def assert_same(ours, reference):
        """Each tensor to 1e-5 of its largest value; tensors 1e7 times smaller than the largest
        of the model are only held to float32 rounding of the whole."""
        floor = 1e-7 * max(t.abs().max() for t in reference.values())
        for name, ref in reference.items():
            err = (ours[name] - ref).abs().max()
            assert err <= 1e-5 * ref.abs().max() + floor, f"{name}: {err} vs {ref.abs().max()}"

    # The gradients agree: DDP averages the workers' gradients, and the losses divide by the
    # number of positives and the IoU-weight sums averaged over the workers ...
    assert all(g.abs().max() > 0 for g in grads_single.values())
    assert_same(grads_ddp, grads_single)
    # ... and so do the updated parameters.
    assert_same(ddp, {k: v for k, v in single.items() if v.is_floating_point()})


def test_train_net_runs_two_cpu_workers_and_writes_a_checkpoint(tmp_path):
    from vfnet.data.shapes import generate_split

    for split, n in (("train", 4), ("val", 2)):
        generate_split(str(tmp_path), split, n, seed=5, image_size=(64, 80))
    out = tmp_path / "out"
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        "--num-gpus", "2",
        "--dataset", f"ddp_train={tmp_path / 'train.json'}:{tmp_path / 'train'}",
        "--dataset", f"ddp_val={tmp_path / 'val.json'}:{tmp_path / 'val'}",
        "MODEL.FPN.OUT_CHANNELS", "64", "DATASETS.TRAIN", "('ddp_train',)",
        "DATASETS.TEST", "('ddp_val',)", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "3",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "80",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "on 2 devices" in proc.stdout + proc.stderr
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 2
    assert (out / "log.txt.rank1").exists()
