// GroupNorm(+SiLU) CUDA launchers: plain C++, no torch. The binding (group_norm_silu_cuda.cpp)
// checks tensors, allocates outputs and workspace, and calls these on the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_status.h"
#include "common/dtype.h"

namespace genext::gn {

// x is (N, C, S) with S the product of the spatial sizes, stored either contiguous ("NCS") or
// channels-last ("NSC", channel fastest). y, grad_y and grad_x share x's layout.
struct Shape {
  int64_t N = 0, C = 0, S = 0;
  int64_t G = 1;  // groups; C % G == 0
  bool channels_last = false;
};

struct FwdParams {
  Shape shape;
  DType dtype = DType::kFloat32;  // of x and y
  const void* x = nullptr;
  void* y = nullptr;
  float* mean = nullptr;           // (N, G), float32
  float* rstd = nullptr;           // (N, G), float32
  const void* weight = nullptr;    // (C,) or null; dtype wdtype
  const void* bias = nullptr;      // (C,) or null; dtype wdtype
  DType wdtype = DType::kFloat32;  // float32 or x's dtype
  float eps = 1e-5f;
  bool silu = true;
  void* workspace = nullptr;  // fwd_workspace_bytes(p, num_sms) bytes, any contents
  int num_sms = 0;            // multiprocessors on the device, to size the grid
};

struct BwdParams {
  Shape shape;
  DType dtype = DType::kFloat32;
  const void* grad_y = nullptr;
  const void* x = nullptr;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  const void* weight = nullptr;  // (C,) or null
  const void* bias = nullptr;    // (C,) or null
  DType wdtype = DType::kFloat32;
  bool silu = true;
  void* grad_x = nullptr;        // same dtype and layout as x
  float* grad_weight = nullptr;  // (C,) float32, written when weight != null
  float* grad_bias = nullptr;    // (C,) float32, written when weight != null
  void* workspace = nullptr;     // bwd_workspace_bytes(p, num_sms) bytes, any contents
  int num_sms = 0;
};

size_t fwd_workspace_bytes(const FwdParams& p);
size_t bwd_workspace_bytes(const BwdParams& p);

// Enqueue the kernels on `stream`. Returns the first CUDA error (launch or configuration) and
// where it was met.
// Shapes with N*C*S == 0 are the caller's business (nothing is launched for them).
CudaStatus group_norm_silu_fwd(const FwdParams& p, cudaStream_t stream);
CudaStatus group_norm_silu_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace genext::gn
