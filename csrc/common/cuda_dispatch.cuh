// DType -> C++ element type for the .cu launchers: the one switch over the three dtypes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_status.h"
#include "common/dtype.h"

namespace genext {

// Returns f.template operator()<T>() with T = float, __half or __nv_bfloat16 as dt says, e.g.
//   return dispatch_dtype(p.dtype, [&]<typename T>() { return launch<T>(p, stream); });
// A dt outside the enum (a corrupt params struct) is cudaErrorInvalidValue.
template <typename F>
CudaStatus dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f.template operator()<float>();
    case DType::kFloat16: return f.template operator()<__half>();
    case DType::kBFloat16: return f.template operator()<__nv_bfloat16>();
  }
  return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
}

}  // namespace genext
