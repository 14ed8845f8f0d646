// The element types the CUDA kernels take, as plain C++ (no torch header, usable from .cu files):
// launcher params carry a DType; the bindings convert from at::ScalarType with to_dtype
// (common/torch_dtype.h).
#pragma once

namespace genext {

// The values are fixed: some kernels take the dtype as a plain int (0 float32, 1 float16,
// 2 bfloat16).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace genext
