"""
Required dependencies: where a dependency must be present, a test that would skip for want of it
fails instead.

With the environment variable CI "true" (or 1) every package of the main environment is required:
Detectron2 must import (else the run stops before collection), and a skip whose reason says a
module is missing ("Detectron2 is not installed ...", "onnxscript ... is not installed",
pytest.importorskip's "could not import 'x'") is reported as a failure: CI must not pass by
skipping what a declared dependency runs. The MMDetection parity environment's packages (mmdet,
mmengine, mmcv) are required only where VFNET_REQUIRE names them (comma-separated, for example
VFNET_REQUIRE=mmdet,mmengine for the parity run of .ci/run), as is every module it names.

Long tests (`@pytest.mark.long`: minutes each on 2 cores, at the sizes users train) run with
`pytest --long` (or VFNET_LONG=1) and are skipped, with that said, in the default run and CI.
So are the tests marked `bf16_full_size` (bf16 convolutions at 800x1333: seconds on a CPU with
native bf16, minutes where torch emulates it) on a CPU without native bf16
(vfnet.engine.train_loop.has_native_bf16), where bf16 is not a mode to train or infer in.

The parity tests (tests/parity/test_mmdet_parity*.py) belong to that environment: where MMDetection does not
import, `pytest tests` does not collect them, and its header says where they run.
"""

import functools
import os
import re

import pytest

pytest_plugins = ["pytester"]  # tests/test_ci_rules.py runs pytest on this file

# Words by which a skip reason names a module, besides the module's own name.
ALIASES = {"mmdet": ("mmdetection",)}
# What a skip reason says of a missing module.
MISSING = re.compile(r"not installed|could not import|no module named", re.I)
# The parity environment's modules (tools/install.sh --parity-env), and the tests that need them.
PARITY_MODULES = ("mmdet", "mmengine", "mmcv")
PARITY_TESTS = "test_mmdet_parity*.py"
# Stands for "any module" among the required ones: every missing one fails under CI=true.
ANY_MODULE = "*"


def _ci():
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def required_modules():
    mods = []
    if _ci():
        mods.append("detectron2")
    mods += _listed()
    if _ci():
        mods.append(ANY_MODULE)
    return list(dict.fromkeys(mods))


def _listed():
    return [m.strip() for m in os.environ.get("VFNET_REQUIRE", "").split(",") if m.strip()]


def _why_required(mod):
    """The environment variable that makes `mod` required."""
    return "VFNET_REQUIRE" if mod in _listed() else "CI"


@functools.lru_cache(maxsize=None)
def _parity_environment():
    try:
        import mmdet  # noqa: F401
    except Exception:
        return False
    return True


def pytest_ignore_collect(collection_path, config):
    # Not for files named on the command line (pytest does not ask for those).
    if collection_path.match(PARITY_TESTS) and not _parity_environment():
        return True
    return None


def pytest_report_header(config):
    if not _parity_environment():
        return (
            f"vfnet: the MMDetection parity tests (tests/parity/{PARITY_TESTS}) run in the parity "
            "environment, not this one (no mmdet): bash tools/install.sh --parity-env "
            f".venv-mmdet, then .venv-mmdet/bin/python -m pytest tests/{PARITY_TESTS} -q"
        )
    return None


def _names(mod, low):
    names = (mod, mod.split(".")[0]) + ALIASES.get(mod, ())
    return any(n.lower() in low for n in names)


def missing_required(reason, mods):
    """The required module that the skip reason says is missing ("a package" for one of the
    main environment's under CI=true), or None."""
    if not reason or not MISSING.search(reason):
        return None
    low = reason.lower()
    for mod in mods:
        if mod != ANY_MODULE and _names(mod, low):
            return mod
    if ANY_MODULE in mods and not any(_names(m, low) for m in PARITY_MODULES):
        return "a package"
    return None


LONG_REASON = "long test (minutes on 2 cores): pytest --long (or VFNET_LONG=1) runs it"
EMULATED_BF16_REASON = (
    "bf16 at 800x1333 on a CPU without native bf16 (torch emulates it: minutes, not seconds): "
    "pytest --long (or VFNET_LONG=1) runs it"
)


def _native_bf16():
    """Whether the CPU computes bf16 natively (True where vfnet does not import: its tests skip)."""
    try:
        from vfnet.engine.train_loop import has_native_bf16
    except Exception:  # ImportError, or Detectron2 built against another torch: its tests say so
        return True
    return has_native_bf16()


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long")


def _long(config):
    return config.getoption("--long") or os.environ.get("VFNET_LONG", "").strip().lower() in ("true", "1")


def pytest_collection_modifyitems(config, items):
    if _long(config):
        return
    native_bf16 = None
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(pytest.mark.skip(reason=LONG_REASON))
        elif item.get_closest_marker("bf16_full_size") is not None:
            native_bf16 = _native_bf16() if native_bf16 is None else native_bf16
            if not native_bf16:
                item.add_marker(pytest.mark.skip(reason=EMULATED_BF16_REASON))


def pytest_configure(config):
    config.addinivalue_line("markers", "long: minutes on 2 cores; runs with --long or VFNET_LONG=1")
    config.addinivalue_line(
        "markers", "bf16_full_size: bf16 convolutions at 800x1333; long on a CPU without native bf16"
    )
    config._vfnet_required = required_modules()
    for mod in config._vfnet_required:
        if mod == ANY_MODULE:
            continue
        try:
            __import__(mod)
        except Exception as e:  # ImportError, or an extension built against another torch
            var = _why_required(mod)
            raise pytest.UsageError(
                f"{mod} is required here ({var}={os.environ.get(var)}), but it does not import: "
                f"{type(e).__name__}: {e}. Install it (bash tools/install.sh; MMDetection: "
                f"bash tools/install.sh --parity-env DIR, see README: Install), or unset {var}."
            )


def _skip_reason(report):
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def _fail_if_required(report, config):
    mods = getattr(config, "_vfnet_required", None)
    if not mods or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    mod = missing_required(reason, mods)
    if mod is not None:
        report.outcome = "failed"
        report.longrepr = (
            f"skipped for want of {mod}, which is required here "
            f"({_why_required(mod)}={os.environ.get(_why_required(mod))}): {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_required(outcome.get_result(), item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A module-level pytest.importorskip skips the whole module at collection.
    outcome = yield
    _fail_if_required(outcome.get_result(), collector.config)
