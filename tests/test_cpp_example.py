"""examples/cpp builds against the installed package with find_package(safeshape) and its checks pass."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import safeshape

ROOT = Path(__file__).resolve().parents[1]


def _cmake():
    try:
        import cmake

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        return shutil.which("cmake")


@pytest.mark.slow
def test_cpp_example_builds_and_runs(tmp_path):
    cmake = _cmake()
    if cmake is None:
        pytest.skip("cmake not found")
    gen = []
    try:
        import ninja

        gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={os.path.join(ninja.BIN_DIR, 'ninja')}"]
    except ImportError:
        pass
    build = tmp_path / "build"
    r = subprocess.run([cmake, "-S", str(ROOT / "examples" / "cpp"), "-B", str(build), *gen,
                        f"-DCMAKE_PREFIX_PATH={safeshape.cmake_prefix_path}", "-DCMAKE_BUILD_TYPE=Release"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    r = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    exe = build / "safeshape_example"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "safeshape C++ example: OK" in run.stdout
    assert f"against torch {safeshape.build_info()['torch_version']}" in run.stdout
