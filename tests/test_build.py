"""build_info and the torch-version guard."""
import subprocess
import sys

import pytest
import torch

import safeshape
import safeshape.ops  # noqa: F401  loads the native library


def test_build_info_matches_running_torch():
    info = safeshape.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and all("." in a for a in info["cuda_archs"])
        assert info["cuda_version"]
    else:
        assert info["cuda_version"] is None


def test_cpu_fma_rate_measures_the_active_path():
    # the bench's compute bound: FMAs per second of one thread on registers, for the path build_info names (not a
    # speed threshold: only that both rates were measured and come out finite and positive)
    from safeshape import _native
    rate = _native.cpu_fma_rate(0.002)
    assert set(rate) == {"float64", "float32"}
    assert all(0 < v < float("inf") for v in rate.values()), rate


def test_import_under_another_torch_says_how_to_rebuild():
    code = "import torch; torch.__version__ = '9.9.9'; import safeshape.ops  # loads the native library"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "safeshape was built against torch" in r.stderr and "9.9.9" in r.stderr
    assert "--no-build-isolation" in r.stderr


# manylinux_2_28 (torch's own wheels): glibc symbols up to 2.28, libstdc++ up to GCC 8's GLIBCXX_3.4.25
MANYLINUX_2_28 = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 25), "CXXABI": (1, 3, 11)}


def symbol_versions(path) -> dict[str, tuple[int, ...]]:
    """The newest GLIBC / GLIBCXX / CXXABI version each library needs (from `objdump -T`)."""
    import re
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("objdump not found")
    out = subprocess.run(["objdump", "-T", str(path)], capture_output=True, text=True, check=True).stdout
    newest: dict[str, tuple[int, ...]] = {}
    for name, version in re.findall(r"\b(GLIBC|GLIBCXX|CXXABI)_([0-9.]+)\b", out):
        v = tuple(int(x) for x in version.split("."))
        newest[name] = max(newest.get(name, v), v)
    return newest


def test_libraries_load_on_glibc_2_28():
    import glob
    import os

    from safeshape import _build_config

    if not getattr(_build_config, "GLIBC_COMPAT", False):
        pytest.skip("built without SAFESHAPE_GLIBC_COMPAT (or before it existed)")
    folder = os.path.dirname(safeshape._native._C.__file__)
    libs = glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "libsafeshape_ops.so"))
    assert len(libs) == 2
    for lib in libs:
        for name, newest in symbol_versions(lib).items():
            assert newest <= MANYLINUX_2_28[name], f"{os.path.basename(lib)} needs {name}_{newest}"
