// VQ CUDA launchers: plain C++, no torch. The binding (vq_cuda.cpp) checks tensors, allocates
// outputs, and calls these on the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cuda_status.h"
#include "common/dtype.h"

namespace genext::vq {

struct NearestParams {
  DType dtype = DType::kFloat32;
  const void* z = nullptr;             // (N, D) contiguous
  const void* codebook = nullptr;      // (K, D) contiguous
  const float* z_inv_norm = nullptr;   // (N,) for cosine, else null
  const float* cb_inv_norm = nullptr;  // (K,) for cosine, else null
  const float* cb_sq_norm = nullptr;   // (K,) ||e||^2 for the tensor-core path's L2 ranking
  const float* cb_sq_max = nullptr;    // max_k ||e_k||^2 (one element), for its rounding bound
  int64_t* indices = nullptr;          // (N,)
  float* distances = nullptr;          // (N,)
  int64_t N = 0, K = 0, D = 0;
  bool cosine = false;
  bool tensor_cores = false;  // the tensor-core path (vq_tc.cu) where it applies
};

struct EmaParams {
  DType dtype = DType::kFloat32;
  const void* z = nullptr;           // (N, D) contiguous
  const int64_t* indices = nullptr;  // (N,) int64
  const int64_t* perm = nullptr;     // deterministic: rows sorted by index (stable)
  const int64_t* offsets = nullptr;  // deterministic: (K + 1,) segment starts in perm
  float* counts = nullptr;           // (K,) zeroed
  float* sums = nullptr;             // (K, D) zeroed
  int64_t N = 0, K = 0, D = 0;
  bool deterministic = false;
};

// Picks the tensor-core path (vq_tc.cu) when p.tensor_cores and it applies, else the exact kernel.
CudaStatus vq_nearest_cuda(const NearestParams& p, cudaStream_t stream);
// The tensor-core path: fp16/bf16, D <= 256, cb_sq_norm and cb_sq_max set for L2.
bool vq_nearest_tc_supported(const NearestParams& p);
CudaStatus vq_nearest_tc(const NearestParams& p, cudaStream_t stream);
CudaStatus vq_ema_update_cuda(const EmaParams& p, cudaStream_t stream);

}  // namespace genext::vq
