// Element types shared by the CPU and CUDA kernels and the dtype codes Python passes in.
// The codes match pytrain/kernels/_backend.py (DTYPE_CODES).
#pragma once
#include <cstdint>

namespace pytrain {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace pytrain
