"""Training under Detectron2's launcher (DDP, gloo on CPU) equals training in one process; it trains
under CPU bf16 autocast too."""
import os
import subprocess
import sys
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from helpers import ROOT  # noqa: E402


def test_one_sgd_step_on_two_workers_equals_one_process(tmp_path):
    script = os.path.join(ROOT, "tests", "scripts", "ddp_sgd_step.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]

    def load(name):
        return torch.load(tmp_path / f"{name}.pth")

    grads, params = {}, {}
    for run in ("single", "single_again", "single_swapped", "ddp"):
        grads[run] = load(f"{run}_grads")
        params[run] = {k: v for k, v in load(run).items() if v.is_floating_point()}
    assert set(grads["single"]) == set(grads["ddp"]) and len(grads["single"]) > 50
    assert all(g.abs().max() > 0 for g in grads["single"].values())

    # Two uninterrupted runs of the step under these settings (float64, one thread,
    # deterministic algorithms) are bitwise equal ...
    for name, ref in grads["single"].items():
        assert torch.equal(grads["single_again"][name], ref), name
    for name, ref in params["single"].items():
        assert torch.equal(params["single_again"][name], ref), name

    def largest_relative_difference(ours, reference):
        return max(
            float((ours[k] - ref).abs().max() / ref.abs().max().clamp(min=1e-300))
            for k, ref in reference.items()
        )

    # ... but a step on two workers sums in another order, so it cannot be bitwise equal. Its
    # tolerance comes from the measured spread of an equivalent reordering: the same step with
    # the two images swapped, which differs by float64 rounding (about 1e-15 of each tensor).
    for what in (grads, params):
        spread = largest_relative_difference(what["single_swapped"], what["single"])
        assert spread < 1e-12, spread
        # DDP averages the workers' gradients, and the losses divide by the number of positives
        # and the IoU-weight sums averaged over the workers: gradients and updated parameters
        # agree to the rounding of a reordered sum (a wrong normaliser would differ by > 1e-3).
        difference = largest_relative_difference(what["ddp"], what["single"])
        assert difference <= 10 * max(spread, 1e-16), (difference, spread)


# bf16: the first step's two images (one per worker) are 64 px wide, so P7's input is one column
# wide, whose bf16 weight gradient oneDNN leaves partly unwritten: it held what the workers' heaps
# held, often NaN (tests/layers/test_narrow_input_conv.py checks it on a dirty heap every time).
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_train_net_runs_two_cpu_workers_and_writes_a_checkpoint(tmp_path, amp):
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
        "SOLVER.AMP.ENABLED", str(amp),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "on 2 devices" in proc.stdout + proc.stderr
    ckpt = torch.load(out / "model_final.pth", weights_only=False)
    assert ckpt["iteration"] == 2
    assert {v.dtype for v in ckpt["model"].values() if v.is_floating_point()} == {torch.float32}
    # SOLVER.AMP.ENABLED on CPU workers: both train under bf16 autocast (CPUAutocastTrainer).
    autocast = "Training under torch.autocast('cpu', dtype=torch.bfloat16)."
    for log in (out / "log.txt", out / "log.txt.rank1"):
        assert (autocast in log.read_text()) is amp, log
