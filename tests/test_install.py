"""
tools/install.sh's preflight: a machine that cannot reach Detectron2's git repository is told to
use DETECTRON2_SOURCE before anything is installed.
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_unreachable_detectron2_repository_stops_before_installing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "git_calls"
    # A git that cannot reach any remote, as on a machine without network.
    git = bin_dir / "git"
    git.write_text(
        f'#!/bin/sh\necho "$@" >> {calls}\n'
        'echo "fatal: unable to access: Could not resolve host: github.com" >&2\nexit 128\n'
    )
    git.chmod(git.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable)
    env.pop("DETECTRON2_SOURCE", None)
    env["FORCE_DETECTRON2_BUILD"] = "1"  # the build is needed even where Detectron2 is installed
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "install.sh")], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot reach Detectron2's repository" in proc.stderr
    assert "DETECTRON2_SOURCE=" in proc.stderr
    assert calls.read_text().split()[:2] == ["ls-remote", "--exit-code"]
    # Stopped in the preflight: no pip install ran.
    assert "==> Build tools" not in proc.stdout
    assert "Successfully installed" not in proc.stdout
