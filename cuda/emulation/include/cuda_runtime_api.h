// The emulation's stand-in for CUDA's <cuda_runtime_api.h>: everything lives in cuemu.h.
#pragma once
#include "../cuemu.h"
