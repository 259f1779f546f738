// Plain types shared by the pure kernels (CPU and CUDA) and the torch glue. No torch types here.
#pragma once
#include <cstdint>

namespace fastkd {

// Element type of a tensor handed to a kernel.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

}  // namespace fastkd
