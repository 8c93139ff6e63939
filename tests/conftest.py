import os

import pytest
import torch

import safeshape.ops  # noqa: F401  registers the ops
from tests import cuda_emu

HAS_CUDA = torch.cuda.is_available() and safeshape.build_info()["cuda"]
_EMU_MISSING = cuda_emu.available()

# cuda_emu: the CUDA kernels and their glue under CPU emulation (docs/cuda-emulation.md), on CPU tensors
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")),
           pytest.param("cpu", id="cuda_emu",
                        marks=[pytest.mark.cuda_emu, pytest.mark.skipif(bool(_EMU_MISSING), reason=str(_EMU_MISSING))])]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda_emu: runs the safeshape ops' CUDA kernels under CPU emulation")


# cuda_emu cases that take seconds each under emulation (thousands of blocks); run by `make cuda-emu-all`
_EMU_SLOW = {"test_opcheck", "test_large_rank_and_rows"}


def _emu_slow(node) -> bool:
    params = node.callspec.params if hasattr(node, "callspec") else {}
    return node.originalname in _EMU_SLOW or (node.originalname == "test_lora_cosine_matches_fp64"
                                              and params.get("r", 0) > 16)


@pytest.fixture(autouse=True)
def _cuda_emulation(request):
    """A cuda_emu case runs with the safeshape ops routed to the emulated CUDA glue and kernels."""
    if request.node.get_closest_marker("cuda_emu") is None:
        yield
        return
    if _emu_slow(request.node) and os.environ.get("SAFESHAPE_EMU_ALL") != "1":
        pytest.skip("slow under CPU emulation (SAFESHAPE_EMU_ALL=1, make cuda-emu-all)")
    with cuda_emu.routed():
        yield


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline. huggingface_hub reads its constants at import, so patch them too."""
    from huggingface_hub import constants

    root = tmp_path / "hub-cache"
    root.mkdir()
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(root)), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root
