import pytest
import torch

import safeshape.ops  # noqa: F401  registers the ops

HAS_CUDA = torch.cuda.is_available() and safeshape.build_info()["cuda"]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param
