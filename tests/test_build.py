"""build_info and the torch-version guard."""
import subprocess
import sys

import torch

import safeshape


def test_build_info_matches_running_torch():
    info = safeshape.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and all("." in a for a in info["cuda_archs"])
        assert info["cuda_version"]
    else:
        assert info["cuda_version"] is None


def test_import_under_another_torch_says_how_to_rebuild():
    code = "import torch; torch.__version__ = '9.9.9'; import safeshape.ops  # loads the native library"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "safeshape was built against torch" in r.stderr and "9.9.9" in r.stderr
    assert "--no-build-isolation" in r.stderr
