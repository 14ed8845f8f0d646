// The fused CUDA row log-sum-exp of contrastive scores (lse_rows.cu): out[i] = log sum_j
// exp(scale * x_i . y_j + bias) for 16-bit features, the score tiles computed on tensor cores and
// reduced in registers, never stored. The column log-sum-exps are the same call with x and y
// swapped. Plain C++, no torch: the CUDA binding (tiled_lse_cuda.cpp) and the emulation tests
// call it.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cuda_status.h"
#include "common/dtype.h"

namespace genext::contrastive {

struct LseRowsParams {
  DType dtype = DType::kBFloat16;
  const void* x = nullptr;       // (n, d) contiguous
  const void* y = nullptr;       // (m, d) contiguous
  const float* scale = nullptr;  // one element, on the device
  const float* bias = nullptr;   // one element, or null
  float* out = nullptr;          // (n,)
  int64_t n = 0, m = 0, d = 0;
};

// fp16/bf16 features, d a positive multiple of 8 up to kLseRowsMaxDim, rows 16-byte aligned.
constexpr int64_t kLseRowsMaxDim = 1024;
bool lse_rows_supported(DType dtype, int64_t d);
CudaStatus lse_rows_cuda(const LseRowsParams& p, cudaStream_t stream);

}  // namespace genext::contrastive
