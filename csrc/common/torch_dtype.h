// at::ScalarType -> DType for the CUDA bindings (host C++, light torch headers only).
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace genext {

// The DType of a float32, float16 or bfloat16 tensor; any other dtype raises a TypeError that names
// `op` (the bindings check dtypes first, so this is the last line of defence, never a silent
// float32).
inline DType to_dtype(const char* op, c10::ScalarType t) {
  using c10::ScalarType;
  TORCH_CHECK_TYPE(t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16, op,
                   ": the CUDA kernels take float32, float16 or bfloat16, got ", t);
  return t == ScalarType::Float ? DType::kFloat32
                                : (t == ScalarType::Half ? DType::kFloat16 : DType::kBFloat16);
}

}  // namespace genext
