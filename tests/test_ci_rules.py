"""
The rule of tests/conftest.py: with CI=true a test skipped for want of Detectron2 fails, and with
VFNET_REQUIRE=mmdet one skipped for want of MMDetection fails; without them they skip.

Each case runs pytest on a small test file with this project's conftest.py (pytester), and a
stand-in `detectron2` / `mmdet` module on the path, so the cases hold with or without the real
packages.
"""

import os

import pytest

CONFTEST = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")).read()
D2_REASON = "Detectron2 is not installed (see README: Install)"
MMDET_REASON = "MMDetection is not installed (optional: see README, parity with MMDetection)"

TESTS = f"""
import pytest

def test_needs_detectron2():
    pytest.skip({D2_REASON!r})

def test_needs_mmdet():
    pytest.skip({MMDET_REASON!r})

def test_needs_mmdet_importorskip():
    pytest.importorskip("vfnet_no_such_module_mmdet")  # "could not import '...mmdet'"

@pytest.mark.skipif(True, reason={D2_REASON!r})
def test_marked():
    pass

def test_needs_gpu():
    pytest.skip("needs a CUDA GPU")

def test_plain():
    pass
"""


@pytest.fixture
def run(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("VFNET_REQUIRE", raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # untruncated short summaries
    pytester.makeconftest(CONFTEST)
    pytester.mkpydir("detectron2")  # stand-ins: the required modules import
    pytester.mkpydir("mmdet")
    pytester.syspathinsert()

    def run(env=None, tests=TESTS, subprocess=False):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        pytester.makepyfile(test_it=tests)
        if subprocess:
            return pytester.runpytest_subprocess("-rfEs")
        return pytester.runpytest("-rfEs", "-p", "no:cacheprovider")

    return run


def test_without_ci_the_skips_skip(run):
    result = run()
    result.assert_outcomes(passed=1, skipped=5)


def test_ci_true_fails_a_detectron2_skip(run):
    result = run({"CI": "true"})
    # A skip in setup (the skipif mark) that fails is reported as an error.
    result.assert_outcomes(passed=1, skipped=3, failed=1, errors=1)
    result.stdout.fnmatch_lines([
        "FAILED test_it.py::test_needs_detectron2 - *required here (CI=true)*Detectron2 is not installed*",
        "ERROR test_it.py::test_marked - *Detectron2 is not installed*",
    ])  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_vfnet_require_fails_an_mmdet_skip(run):
    result = run({"VFNET_REQUIRE": "mmdet"})
    result.assert_outcomes(passed=1, skipped=3, failed=2)
    result.stdout.fnmatch_lines([
        "FAILED test_it.py::test_needs_mmdet - *(VFNET_REQUIRE=mmdet)*MMDetection is not installed*",
        "FAILED test_it.py::test_needs_mmdet_importorskip - *could not import*",
    ])  # fmt: skip


def test_ci_true_with_vfnet_require(run):
    result = run({"CI": "true", "VFNET_REQUIRE": "mmdet"})
    result.assert_outcomes(passed=1, skipped=1, failed=3, errors=1)


def test_module_level_importorskip(run):
    tests = f"""
import pytest
pytest.importorskip("vfnet_no_such_module", reason={D2_REASON!r})

def test_a():
    pass
"""
    run(tests=tests).assert_outcomes(skipped=1)
    result = run({"CI": "true"}, tests=tests)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*skipped for want of detectron2*: Detectron2 is not installed*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED  # an error in collection


def test_a_required_module_that_does_not_import_stops_the_run(run, pytester):
    result = run({"VFNET_REQUIRE": "vfnet_no_such_module"})
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*vfnet_no_such_module is required here (VFNET_REQUIRE=*"])


def test_ci_true_without_detectron2_stops_the_run(run, pytester):
    # A Detectron2 whose import fails, first on the path of a fresh interpreter.
    pytester.path.joinpath("detectron2", "__init__.py").write_text(
        "raise ImportError('undefined symbol: stand-in for a build against another torch')\n"
    )
    result = run({"CI": "true"}, subprocess=True)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*detectron2 is required here (CI=true)*undefined symbol*"])


def test_ci_true_fails_a_skip_for_any_missing_package_but_the_parity_environments(run):
    tests = """
import pytest

def test_needs_onnxscript():
    pytest.skip("onnxscript (the dynamo exporter's) is not installed")

def test_importorskip_scipy():
    pytest.importorskip("vfnet_no_such_module_scipy")

def test_needs_mmengine():
    pytest.skip("mmengine is not installed")

def test_needs_data():
    pytest.skip("the raccoon dataset is absent")
"""
    run(tests=tests).assert_outcomes(skipped=4)
    result = run({"CI": "true"}, tests=tests)
    result.assert_outcomes(failed=2, skipped=2)
    result.stdout.fnmatch_lines([
        "FAILED test_it.py::test_needs_onnxscript - *skipped for want of a package, which is required here (CI=true)*",
        "FAILED test_it.py::test_importorskip_scipy - *could not import*",
    ])  # fmt: skip


def test_the_parity_tests_are_not_collected_without_mmdetection(pytester, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mmdet_parity_x="def test_x():\n    pass\n", test_other="def test_y():\n    pass\n")
    # No mmdet on the path: this environment is not the parity one.
    monkeypatch.setitem(__import__("sys").modules, "mmdet", None)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["vfnet: the MMDetection parity tests*run in the parity environment*"])
    # Named on the command line, it is collected (and would skip or fail there).
    pytester.runpytest("-p", "no:cacheprovider", "test_mmdet_parity_x.py").assert_outcomes(passed=1)


def test_test_files_have_unique_names():
    """pytest imports the test folders (no __init__.py) by their basename: two files of one name in
    two folders stop the whole collection ("import file mismatch"), as CI once did."""
    here = os.path.dirname(os.path.abspath(__file__))
    seen = {}
    for folder, _, files in os.walk(here):
        for name in files:
            if name.startswith("test_") and name.endswith(".py"):
                seen.setdefault(name, []).append(os.path.relpath(os.path.join(folder, name), here))
    assert {n: p for n, p in seen.items() if len(p) > 1} == {}


LONG_TESTS = """
import pytest

@pytest.mark.long
def test_long():
    pass

def test_short():
    pass
"""


def test_long_tests_skip_by_default_and_under_ci_and_run_with_long(run, monkeypatch):
    run(tests=LONG_TESTS).assert_outcomes(passed=1, skipped=1)
    run({"CI": "true"}, tests=LONG_TESTS).assert_outcomes(passed=1, skipped=1)
    monkeypatch.delenv("CI")
    run({"VFNET_LONG": "1"}, tests=LONG_TESTS).assert_outcomes(passed=2)
    monkeypatch.delenv("VFNET_LONG")
    result = run(tests=LONG_TESTS)
    result.stdout.fnmatch_lines(["SKIPPED *long test (minutes on 2 cores): pytest --long*"])


BF16_TESTS = """
import pytest

@pytest.mark.bf16_full_size
def test_bf16_at_800x1333():
    pass

def test_other():
    pass
"""


@pytest.mark.parametrize("native", [True, False])
def test_full_size_bf16_tests_are_long_only_without_native_bf16(run, pytester, native):
    # A stand-in vfnet (first on the child's sys.path) whose CPU has native bf16 or not.
    pytester.mkpydir("vfnet")
    pytester.mkpydir("vfnet/engine")
    pytester.path.joinpath("vfnet/engine/train_loop.py").write_text(f"def has_native_bf16():\n    return {native}\n")
    result = run(tests=BF16_TESTS, subprocess=True)
    if native:
        result.assert_outcomes(passed=2)
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED *bf16 at 800x1333 on a CPU without native bf16*pytest --long*"])
    result = run({"VFNET_LONG": "1"}, tests=BF16_TESTS, subprocess=True)
    result.assert_outcomes(passed=2)
