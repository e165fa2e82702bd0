"""
vfnet/engine/train_loop.py: the check of the losses costs what Detectron2's own trainer's costs
when everything is finite (one collective, one host read per loss, no search for the culprit),
records the same metrics, stops with the image's name when a loss is not finite; importing
vfnet changes nothing in Detectron2. AMP: the trainer SOLVER.AMP.* picks on each device, CPU bf16
autocast (its convolutions in bf16, its weights in float32), the warning on a CPU without native
bf16.
"""
import json
import logging
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.engine import train_loop as d2_train_loop  # noqa: E402
from detectron2.utils import comm  # noqa: E402

from vfnet.engine.train_loop import AMPTrainer, NonFiniteLossError, SimpleTrainer  # noqa: E402


class Toy(nn.Module):
    """Two losses of one weight over the batch's "x"; records the calls of locate_non_finite."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
        self.located = []

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        return {"loss_a": (self.w * x).pow(2).mean(), "loss_b": (self.w * x).abs().mean()}

    def locate_non_finite(self, batch):
        self.located.append(batch)
        image = next(i for i, b in enumerate(batch) if not torch.isfinite(b["x"]).all())
        return "the pixels of the input image (after normalisation)", image


def batches(n, bad=None):
    """`n` batches of two images; image 1 of batch `bad` holds a NaN."""
    out = []
    for step in range(n):
        batch = []
        for i in range(2):
            x = torch.arange(4.0) + step + i
            if step == bad and i == 1:
                x[2] = float("nan")
            batch.append({"x": x, "file_name": f"img_{step}_{i}.jpg", "image_id": 10 * step + i})
        out.append(batch)
    return out


def run(trainer_class, data, monkeypatch, iters):
    """Train `iters` steps; returns (trainer, model, {collective: calls}, Tensor.item calls)."""
    counts = {"gather": 0, "all_gather": 0, "item": 0}
    for name in ("gather", "all_gather"):
        original = getattr(comm, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(comm, name, counted)
    item = torch.Tensor.item

    def counted_item(self):
        counts["item"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    torch.manual_seed(0)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = trainer_class(model, data, optimizer)
    try:
        trainer.train(0, iters)
    finally:
        monkeypatch.undo()
    return trainer, model, counts


def test_finite_steps_cost_what_detectron2s_cost_and_record_the_same_metrics(monkeypatch):
    data = batches(4)
    d2, d2_model, d2_counts = run(d2_train_loop.SimpleTrainer, data, monkeypatch, 4)
    ours, model, counts = run(SimpleTrainer, data, monkeypatch, 4)
    # Detectron2: one gather per step; here one all_gather instead; the same host reads.
    assert d2_counts == {"gather": 4, "all_gather": 0, "item": 8}
    assert counts == {"gather": 0, "all_gather": 4, "item": 8}
    assert model.located == []
    assert torch.equal(model.w, d2_model.w)
    for key in ("total_loss", "loss_a", "loss_b"):
        theirs = [v for v, _ in d2.storage.history(key).values()]
        mine = [v for v, _ in ours.storage.history(key).values()]
        assert mine == theirs and len(mine) == 4
    # The metric is the sum of the losses, computed here from the losses themselves.
    x = torch.stack([torch.arange(4.0), torch.arange(4.0) + 1])  # batch 0
    assert math.isclose(ours.storage.history("total_loss").values()[0][0],
                        ((0.5 * x) ** 2).mean().item() + (0.5 * x).abs().mean().item(), rel_tol=1e-6)
    assert {"data_time", "rank_data_time"} <= set(ours.storage.histories())


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="Detectron2's AMPTrainer needs CUDA")


@pytest.mark.parametrize("trainer_class", [SimpleTrainer, pytest.param(AMPTrainer, marks=CUDA)])
def test_a_non_finite_loss_names_the_step_the_image_and_its_file(trainer_class, monkeypatch):
    data = batches(4, bad=2)
    with pytest.raises(NonFiniteLossError) as info:
        run(trainer_class, data, monkeypatch, 4)
    message = str(info.value)
    assert "iteration 2" in message and "img_2_1.jpg" in message and "image id 21" in message
    assert "the pixels of the input image" in message and info.value.image == 1


def test_a_worker_with_finite_losses_names_the_others():
    from vfnet.engine.train_loop import non_finite_error

    losses = [{"loss_a": 1.0}, {"loss_a": float("inf")}]
    error = non_finite_error(losses, rank=0, iteration=5, batch=None, model=None)
    assert "worker(s) [1]" in str(error) and "iteration 5" in str(error) and error.image is None
    error = non_finite_error(losses, rank=1, iteration=5, batch=None, model=None)
    assert "loss_a became inf at iteration 5" in str(error)


CHILD = r"""
import importlib, json, sys, types
import detectron2
names = json.loads(sys.argv[1])
mods = [importlib.import_module(n) for n in names]
def snapshot():
    out = {}
    for m in mods:
        for k, v in vars(m).items():
            out[f"{m.__name__}.{k}"] = id(v)
            if isinstance(v, type) and v.__module__ == m.__name__:
                for a, w in vars(v).items():
                    out[f"{m.__name__}.{k}.{a}"] = id(w)
    return out
before = snapshot()
import vfnet, vfnet.engine, vfnet.export
after = snapshot()
print(json.dumps(sorted(k for k in before if after.get(k) != before[k])))
"""


def test_importing_vfnet_changes_nothing_in_detectron2():
    listed = subprocess.run(
        [sys.executable, "-c", "import sys, json, vfnet, vfnet.engine, vfnet.export; print(json.dumps(sorted("
         "n for n in sys.modules if n.startswith('detectron2') and sys.modules[n] is not None)))"],
        capture_output=True, text=True, check=True, cwd="/",
    )
    names = json.loads(listed.stdout.splitlines()[-1])
    assert "detectron2.engine.defaults" in names and "detectron2.engine.train_loop" in names
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(names)],
                          capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


# --- AMP: CPU bf16 autocast, Detectron2's AMPTrainer on CUDA ----------------------------------------

from vfnet.engine.train_loop import CPUAutocastTrainer, build_trainer, has_native_bf16  # noqa: E402

# torch.cpu.get_capabilities() of CPUs with and without native bf16 (the features lscpu names).
ZEN2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False, "amx_bf16": False}
SAPPHIRE_RAPIDS = dict(ZEN2, avx512_f=True, avx512_bf16=True, amx_bf16=True, amx_tile=True)
ZEN4 = dict(ZEN2, avx512_f=True, avx512_bf16=True)
GRAVITON3 = {"architecture": "aarch64", "neon": True, "bf16": True}


@pytest.mark.parametrize(
    "capabilities, native",
    [(ZEN2, False), (SAPPHIRE_RAPIDS, True), (ZEN4, True), (GRAVITON3, True),
     ({"architecture": "aarch64", "neon": True}, False)],
    ids=["zen2", "sapphire-rapids", "zen4", "graviton3", "arm-without-bf16"],
)  # fmt: skip
def test_native_bf16_is_avx512_bf16_amx_bf16_or_arm_bf16(capabilities, native):
    assert has_native_bf16(capabilities) is native


@pytest.mark.parametrize(
    "device, amp, dtype, trainer_class, precision",
    [("cpu", False, "auto", SimpleTrainer, None), ("cpu", True, "auto", CPUAutocastTrainer, torch.bfloat16),
     ("cpu", True, "bfloat16", CPUAutocastTrainer, torch.bfloat16),
     ("cuda", True, "auto", AMPTrainer, torch.float16), ("cuda:0", True, "bfloat16", AMPTrainer, torch.bfloat16)],
)  # fmt: skip
def test_the_trainer_of_solver_amp_per_device(device, amp, dtype, trainer_class, precision):
    # Built, not run: Detectron2's AMPTrainer runs on CUDA only.
    model = Toy()
    trainer = build_trainer(model, batches(1), torch.optim.SGD(model.parameters(), lr=0.1), device, amp, dtype)
    assert type(trainer) is trainer_class
    assert getattr(trainer, "precision", None) == precision
    if trainer_class is AMPTrainer and precision == torch.bfloat16:
        assert not trainer.grad_scaler.is_enabled()  # bf16 needs no loss scaling


def test_nothing_trains_under_autocast_unless_asked():
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    assert (cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.DTYPE) == (False, "auto")
    model = Toy()
    trainer = build_trainer(model, batches(1), torch.optim.SGD(model.parameters(), lr=0.1), "cpu")
    assert type(trainer) is SimpleTrainer


@pytest.mark.parametrize(
    "device, dtype, key, message",
    [("cpu", "float64", "SOLVER.AMP.DTYPE", r"SOLVER.AMP.DTYPE must be one of \('auto', 'bfloat16', 'float16'\), got 'float64'"),
     ("cpu", "float16", "SOLVER.AMP.DTYPE", "SOLVER.AMP.DTYPE is 'float16', which trains on CUDA only"),
     ("cpu", "half", "train.amp.dtype", "train.amp.dtype must be one of")],
)  # fmt: skip
def test_an_amp_dtype_the_device_cannot_train_in_is_refused_by_its_key(device, dtype, key, message):
    model = Toy()
    with pytest.raises(ValueError, match=message):
        build_trainer(model, batches(1), torch.optim.SGD(model.parameters(), lr=0.1), device, True, dtype, key)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.parametrize("capabilities", [ZEN2, SAPPHIRE_RAPIDS], ids=["zen2", "sapphire-rapids"])
def test_bf16_training_warns_once_on_a_cpu_without_native_bf16(capabilities, monkeypatch):
    # The CPU is simulated: the capabilities torch reads from cpuinfo.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    handler = Records()
    log = logging.getLogger("vfnet.engine.train_loop")
    log.addHandler(handler)
    try:
        model = Toy()
        trainer = build_trainer(model, batches(3), torch.optim.SGD(model.parameters(), lr=0.1), "cpu", True)
        trainer.train(0, 3)
    finally:
        log.removeHandler(handler)
    warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    if capabilities is ZEN2:
        assert len(warnings) == 1, warnings
        assert "on a CPU without native bf16" in warnings[0] and "slower than float32" in warnings[0]
        assert "avx512_bf16, amx_bf16" in warnings[0] and "SOLVER.AMP.ENABLED False" in warnings[0]
    else:
        assert warnings == []


def test_a_bf16_training_step_runs_its_convolutions_in_bf16_and_keeps_float32_weights():
    # Not silently float32: every convolution of the step, forward and backward, runs on bf16
    # operands (oneDNN's bf16 kernels); the parameters, their gradients and the optimizer's
    # state are float32.
    import itertools

    from detectron2.modeling import build_model
    from torch.utils._python_dispatch import TorchDispatchMode

    from vfnet.layers import NarrowInputConv2d

    from helpers import small_cfg, training_batch

    class Convolutions(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("convolution", "convolution_backward"):
                self.dtypes.setdefault(name, []).append((args[0].dtype, args[1].dtype))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_model(small_cfg())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    trainer = build_trainer(model, itertools.repeat(training_batch()), optimizer, "cpu", True)
    assert isinstance(trainer, CPUAutocastTrainer)
    # Its strided nn.Conv2d, P6 and P7, convolve inputs narrower than their stride in float32
    # (none here: the batch is 96 px wide); the backbone's strided convs are Detectron2's Conv2d.
    narrow = {name for name, m in model.named_modules() if type(m) is NarrowInputConv2d}
    assert narrow == {"backbone.top_block.p6", "backbone.top_block.p7"}
    recorded = Convolutions()
    with recorded:
        trainer.train(0, 1)
    forward, backward = recorded.dtypes["convolution"], recorded.dtypes["convolution_backward"]
    # The backbone's, the FPN's, the head's and the deformable convs' 1x1 products.
    assert len(forward) > 60 and len(backward) > 60
    assert set(forward) == {(torch.bfloat16, torch.bfloat16)}
    assert set(backward) == {(torch.bfloat16, torch.bfloat16)}
    for key in ("loss_cls", "loss_bbox", "loss_bbox_refine"):
        assert math.isfinite(trainer.storage.history(key).latest())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    state = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert state and {s.dtype for s in state} == {torch.float32}
