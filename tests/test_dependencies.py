"""
Every third-party module that the package, the lab (dev/), tools/, demo/, configs/ and the tests import is
declared: by setup.py (install_requires or an extra) for the main environment, as Detectron2 (the
prerequisite tools/install.sh builds: it is on no package registry), or as one of the MMDetection
parity environment's packages (tools/install.sh --parity-env). An undeclared one passes on a
machine that happens to have it and breaks a new user's `pytest tests`.
"""

import ast
import importlib.metadata
import os
import re
import sys

from helpers import ROOT

SOURCES = ["projects/VFNet/vfnet", "dev", "tools", "demo", "tests", "configs"]
# Modules of the parity environment (tools/install.sh PARITY_PACKAGES), by distribution.
PARITY = {"mmdet": "mmdet", "mmengine": "mmengine", "mmcv": "mmcv-lite"}
# The prerequisite that tools/install.sh builds from source.
PREREQUISITES = {"detectron2": "detectron2"}
# Calls whose first string argument is a module imported at run time.
DYNAMIC_IMPORTS = {"importorskip", "import_module", "__import__"}


def python_files():
    for source in SOURCES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, source)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            yield from (os.path.join(folder, f) for f in files if f.endswith(".py"))


def imported_modules(path):
    """The top-level names of the absolute imports of a file, static and dynamic."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in DYNAMIC_IMPORTS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                yield arg.value.split(".")[0]


def local_names():
    """Modules of this repository: the package, and the files and folders beside the sources
    (the tests' helpers, the demo's predictor, tests importing each other)."""
    names = {"vfnet", "dev"}
    for path in python_files():
        names.add(os.path.splitext(os.path.basename(path))[0])
        names.add(os.path.basename(os.path.dirname(path)))
    return names


def declared_requirements():
    """The distribution names of setup.py's install_requires and extras_require, normalised."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    reqs = list(kwargs.get("install_requires", []))
    for extra in kwargs.get("extras_require", {}).values():
        reqs += extra
    return {normalise(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) for r in reqs}


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_third_party_module_is_declared():
    modules = {}
    for path in python_files():
        for mod in imported_modules(path):
            modules.setdefault(mod, os.path.relpath(path, ROOT))
    local, declared = local_names(), declared_requirements()
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for mod, where in sorted(modules.items()):
        if mod in sys.stdlib_module_names or mod in local or mod in PARITY or mod in PREREQUISITES:
            continue
        if mod.startswith("vfnet_no_such_module"):  # tests/test_ci_rules.py's missing module
            continue
        # A module not installed here (an optional extra's, e.g. "deploy") counts by its own name.
        dists = {normalise(d) for d in distributions.get(mod, [])} or {normalise(mod)}
        if not dists & declared:
            what = f"installed from {sorted(dists)}" if mod in distributions else "not installed here"
            undeclared.append(f"{mod} (imported by {where}; {what})")
    assert not undeclared, (
        "Imported but declared neither in setup.py nor as the parity environment's: "
        + "; ".join(undeclared)
    )


def test_the_rule_catches_an_undeclared_module(tmp_path):
    """The scan sees static, `from` and dynamic imports (importorskip) of a file."""
    path = tmp_path / "t.py"
    path.write_text("import a.b\nfrom c.d import e\nfrom . import f\nimport pytest\npytest.importorskip('g.h')\n")
    assert sorted(set(imported_modules(str(path)))) == ["a", "c", "g", "pytest"]


def test_the_parity_packages_are_those_install_sh_installs():
    install = open(os.path.join(ROOT, "tools", "install.sh")).read()
    packages = re.search(r"PARITY_PACKAGES=\(([^)]*)\)", install).group(1)
    names = {normalise(re.match(r'"?([A-Za-z0-9_.\-]+)', p).group(1)) for p in packages.split()}
    assert set(PARITY.values()) <= names, names
