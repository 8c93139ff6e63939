// The emulation's stand-in for CUDA's <cuda_bf16.h>: everything lives in cuemu.h.
#pragma once
#include "../cuemu.h"
