"""Print what CMakeLists.txt needs to know about the torch that will run the extension (NAME=VALUE)."""
import os

import torch
import torch.utils.cpp_extension as ext

root = os.path.dirname(torch.__file__)
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda or ''}")
print(f"TORCH_ROOT={root}")
print(f"TORCH_LIB_DIR={os.path.join(root, 'lib')}")
print(f"TORCH_INCLUDE_DIRS={';'.join(ext.include_paths())}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
