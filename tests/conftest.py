"""
Required dependencies: where a dependency must be present, a test that would skip for want of it
fails instead.

Required are Detectron2 when the environment variable CI is "true" (or 1: CI must not pass by
skipping the integration tests), and every module named in VFNET_REQUIRE (comma-separated, for
example VFNET_REQUIRE=mmdet,mmengine for the MMDetection parity run of .ci/run). A required
module that does not import stops the run before collection; a skip whose reason says a
required module is missing ("Detectron2 is not installed ...", "MMDetection is not installed
...", pytest.importorskip's "could not import 'mmdet'") is reported as a failure.
"""

import os
import re

import pytest

pytest_plugins = ["pytester"]  # tests/test_ci_rules.py runs pytest on this file

# Words by which a skip reason names a module, besides the module's own name.
ALIASES = {"mmdet": ("mmdetection",)}
# What a skip reason says of a missing module.
MISSING = re.compile(r"not installed|could not import|no module named", re.I)


def required_modules():
    mods = []
    if os.environ.get("CI", "").strip().lower() in ("true", "1"):
        mods.append("detectron2")
    mods += _listed()
    return list(dict.fromkeys(mods))


def _listed():
    return [m.strip() for m in os.environ.get("VFNET_REQUIRE", "").split(",") if m.strip()]


def _why_required(mod):
    """The environment variable that makes `mod` required."""
    return "VFNET_REQUIRE" if mod in _listed() else "CI"


def missing_required(reason, mods):
    """The required module that the skip reason says is missing, or None."""
    if not reason or not MISSING.search(reason):
        return None
    low = reason.lower()
    for mod in mods:
        names = (mod, mod.split(".")[0]) + ALIASES.get(mod, ())
        if any(n.lower() in low for n in names):
            return mod
    return None


def pytest_configure(config):
    config._vfnet_required = required_modules()
    for mod in config._vfnet_required:
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
