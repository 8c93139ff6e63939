"""`make setup` is incremental (issue 25): a stamp file over the sources, so make does nothing when nothing changed,
and a persistent scikit-build-core build folder, so a reinstall recompiles only what changed.

The make-level checks run everywhere (make -q, no build). The compiler-level check (build a wheel twice in one
build folder; the second compiles 0 objects) takes a full CPU build: opt in with SAFESHAPE_BUILD_CHECK=1."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make(*args, venv):
    if shutil.which("make") is None:
        pytest.skip("make not found")
    return subprocess.run(["make", "-C", str(ROOT), *args, f"VENV={venv}"], capture_output=True, text=True)


def test_setup_is_a_file_target_that_is_up_to_date_when_nothing_changed(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    later = time.time() + 3600
    for stamp in (".deps", ".installed"):
        (venv / stamp).touch()
        os.utime(venv / stamp, (later, later))
    assert _make("-q", "setup", venv=venv).returncode == 0  # up to date: nothing to build, pip not even run
    os.utime(venv / ".installed", (0, 0))  # older than the sources: as after a source edit
    assert _make("-q", "setup", venv=venv).returncode == 1
    plan = _make("-n", "setup", venv=venv).stdout
    assert "pip install -v --no-build-isolation" in plan and "build/setup.log" in plan
    assert f"touch {venv}/.installed" in plan and "python3 -m venv" not in plan  # .deps is still fresh
    sources = _make("-n", "-p", "setup", venv=venv).stdout
    line = next(x for x in sources.splitlines() if x.startswith(f"{venv}/.installed:"))
    for src in ("cpp/projection_cpu.cpp", "cuda/token_loss.cu", "CMakeLists.txt", "python/safeshape/ops/projection.py"):
        assert src in line, src
    assert ".pyc" not in line and "_C" not in line and "_build_config.py " not in line + " "


def test_the_build_folder_persists():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^build-dir = "build/\{wheel_tag\}"', text, re.M)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SAFESHAPE_BUILD_CHECK") != "1", reason="a full CPU build: SAFESHAPE_BUILD_CHECK=1")
def test_a_rebuild_with_nothing_changed_compiles_nothing(tmp_path):
    def build():
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps",
                            "-C", "build-dir=build/incremental-check", "-C", "cmake.define.SAFESHAPE_CUDA=OFF",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return re.findall(r"Building (?:CXX|CUDA) object", r.stdout + r.stderr)

    build()  # the first may compile everything (or nothing, when the folder is warm)
    assert build() == []
