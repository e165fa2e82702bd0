"""
The installed package is only the detector: `pip install .` (not editable) gives a `vfnet`
whose every module is reached from the product's own entry points (the detector, training,
evaluation, conversion, export, the model zoo), which runs without the source checkout, and which
holds none of the lab (dev/), the tools or the tests, but the configs of its model zoo (a copy of
configs/, as Detectron2's wheel holds its own).
"""
import ast
import json
import os
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

# What a user's program imports: the registrations, the trainer, the converters, the exporter.
ENTRY_POINTS = [
    "vfnet",
    "vfnet.engine",
    "vfnet.engine.lazy",
    "vfnet.export",
    "vfnet.model_zoo",
    "vfnet.checkpoint.converter",
    "vfnet.checkpoint.retinanet_converter",
]

# The checkout, and its folders of Python sources.
SOURCE = [ROOT] + [os.path.join(ROOT, d) for d in ("projects", "dev", "tests", "tools", "demo")]

# Imports every installed module, from outside the checkout, with the checkout off the path.
CHILD = r"""
import importlib, json, pkgutil, sys
sys.path[:0] = json.loads(sys.argv[1])
import vfnet
every = ["vfnet"] + sorted(m.name for m in pkgutil.walk_packages(vfnet.__path__, "vfnet."))
for name in every:
    importlib.import_module(name)
source = json.loads(sys.argv[2])  # the checkout and its source folders (a venv may lie inside it)
print(json.dumps({"file": vfnet.__file__, "every": every,
                  "checkout_on_path": [p for p in sys.path if p.rstrip("/") in source
                                       or any(p.startswith(s + "/") for s in source[1:])]}))
"""


def imported_by(path: str, module: str, is_package: bool) -> set:
    """The vfnet modules that the source `path` of `module` imports, anywhere in it (also in functions)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "vfnet" or m.startswith("vfnet.")}


def reached_from(entry_points, site) -> set:
    """Every installed module that the entry points import, directly or through each other."""
    def source(module):
        base = os.path.join(site, *module.split("."))
        if os.path.isfile(os.path.join(base, "__init__.py")):
            return os.path.join(base, "__init__.py"), True
        return (base + ".py", False) if os.path.isfile(base + ".py") else (None, False)

    reached, todo = set(), list(entry_points)
    while todo:
        module = todo.pop()
        path, is_package = source(module)
        if path is None or module in reached:
            continue
        reached.add(module)
        # A module's import runs its packages' __init__ too.
        todo += [module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)]
        todo += sorted(imported_by(path, module, is_package))
    return reached


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), ROOT],
        check=True, capture_output=True, text=True, timeout=300,
    )
    (path,) = [p for p in out.iterdir() if p.suffix == ".whl"]
    target = out / "site"
    with zipfile.ZipFile(path) as z:
        z.extractall(target)
    return path, target


def test_the_wheel_holds_the_package_only(wheel):
    path, _ = wheel
    tops = {n.split("/")[0] for n in zipfile.ZipFile(path).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"vfnet"}


def test_every_installed_module_is_reached_from_the_entry_points_without_the_checkout(wheel):
    _, site = wheel
    import site as site_module

    # The environment's packages (torch, Detectron2) but not the editable install of this
    # checkout: `-S` skips the .pth files that put projects/VFNet on the path.
    paths = [str(site)] + [p for p in site_module.getsitepackages() if os.path.isdir(p)]
    done = subprocess.run(
        [sys.executable, "-S", "-c", CHILD, json.dumps(paths), json.dumps(SOURCE)],
        capture_output=True, text=True, cwd="/", timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["file"].startswith(str(site)) and result["checkout_on_path"] == []
    assert sorted(set(result["every"]) - reached_from(ENTRY_POINTS, str(site))) == []


def test_the_import_graph_sees_a_module_nobody_imports(tmp_path):
    package = tmp_path / "vfnet"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .sub import used\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "used.py").write_text("def f():\n    from ..other import g\n")
    (package / "other.py").write_text("")
    (package / "orphan.py").write_text("")
    reached = reached_from(["vfnet"], str(tmp_path))
    assert reached == {"vfnet", "vfnet.sub", "vfnet.sub.used", "vfnet.other"}


def test_no_installed_module_locates_files_relative_to_itself():
    package = os.path.join(ROOT, "projects", "VFNet", "vfnet")
    found = []
    for folder, _, files in os.walk(package):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                for node in ast.walk(ast.parse(open(path).read())):
                    if isinstance(node, ast.Name) and node.id == "__file__":
                        found.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert found == []


# The model zoo's configs from the wheel, outside the checkout: a YAML config with its _BASE_ chain
# and a LazyConfig with its relative imports.
MODEL_ZOO_CHILD = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from vfnet import model_zoo
cfg = model_zoo.get_config("mmdet/VFNet_R_50_DCN_FPN_MS_2x.yaml", trained=True)
lazy = model_zoo.get_config("lazy/fcos_vfl_shapes_demo.py")
print(json.dumps({"file": model_zoo.get_config_file("mmdet/VFNet_R_50_FPN_1x.yaml"),
                  "weights": cfg.MODEL.WEIGHTS, "deform": list(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE),
                  "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN), "lazy": lazy.model._target_.__name__}))
"""


def test_the_wheel_holds_the_model_zoos_configs_which_load_outside_the_checkout(wheel):
    path, site = wheel
    configs = os.path.join(ROOT, "configs")
    expected = {
        "vfnet/model_zoo/configs/" + os.path.relpath(os.path.join(folder, f), configs)
        for folder, _, files in os.walk(configs) for f in files if f.endswith((".yaml", ".py"))
    }  # fmt: skip
    held = {n for n in zipfile.ZipFile(path).namelist() if n.startswith("vfnet/model_zoo/configs/")}
    assert held == expected and len(held) > 30
    import site as site_module

    paths = [str(site)] + [p for p in site_module.getsitepackages() if os.path.isdir(p)]
    done = subprocess.run(
        [sys.executable, "-S", "-c", MODEL_ZOO_CHILD, json.dumps(paths)],
        capture_output=True, text=True, cwd="/", timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["file"] == os.path.join(str(site), "vfnet", "model_zoo", "configs", "mmdet", "VFNet_R_50_FPN_1x.yaml")
    assert result["weights"].endswith("vfnet_r50_fpn_mdconv_c3-c5_mstrain_2x_coco_20201027pth-6879c318.pth")
    # (the values of the bases: Base-VFNet-MS-2x.yaml and ../VFNet_R_50_DCN_FPN_MS_2x.yaml)
    assert result["deform"] == [False, True, True, True] and result["min_size_train"] == [480, 960]
    assert result["lazy"] == "IoUAwareFCOS"


GET_TRAINED_CHILD = r"""
import json, sys
paths, server, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[:0] = paths
import torch
from urllib.parse import urlparse
from vfnet import model_zoo
from vfnet.checkpoint.catalog import ModelCatalog
ModelCatalog.URLS = {n: server + urlparse(u).path for n, u in ModelCatalog.URLS.items()}
model = model_zoo.get("mmdet/VFNet_R_50_FPN_1x.yaml", trained=True, device="cpu")
torch.save(model.state_dict(), out)
import vfnet
print(json.dumps({"vfnet": vfnet.__file__, "url": model_zoo.get_checkpoint_url("mmdet/VFNet_R_50_FPN_1x.yaml")}))
"""


def test_the_wheel_loads_official_weights_by_address_as_the_explicit_conversion(wheel, tmp_path):
    """From the installed (not editable) package, outside the checkout: model_zoo.get(trained=True)
    downloads the official checkpoint (a random one, from a server on 127.0.0.1 at the official
    path), converts and loads it: the same weights as the explicit conversion of that file."""
    import torch

    from vfnet.checkpoint.catalog import ModelCatalog
    from vfnet.checkpoint.converter import convert_checkpoint_file

    from helpers import http_server, official_model_file, serve

    _, site = wheel
    config = "mmdet/VFNet_R_50_FPN_1x.yaml"
    weights = official_model_file(config, str(tmp_path / "official.pth"))
    url_path = serve(tmp_path / "www", ModelCatalog.URLS["VFNet_R_50_FPN_1x"], weights)
    import site as site_module

    paths = [str(site)] + [p for p in site_module.getsitepackages() if os.path.isdir(p)]
    env = dict(os.environ, FVCORE_CACHE=str(tmp_path / "cache"))
    with http_server(tmp_path / "www") as (address, requested):
        done = subprocess.run(
            [sys.executable, "-S", "-c", GET_TRAINED_CHILD, json.dumps(paths), address, str(tmp_path / "got.pth")],
            capture_output=True, text=True, cwd="/", timeout=600, env=env,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert requested == [url_path]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["vfnet"].startswith(str(site)) and result["url"] == address + url_path
    convert_checkpoint_file(weights, str(tmp_path / "explicit.pth"), os.path.join(ROOT, "configs", config))
    explicit = torch.load(str(tmp_path / "explicit.pth"), map_location="cpu", weights_only=False)["model"]
    got = torch.load(str(tmp_path / "got.pth"), map_location="cpu")
    assert len(explicit) > 200
    for key, value in explicit.items():
        assert torch.equal(got[key], torch.as_tensor(value)), key
