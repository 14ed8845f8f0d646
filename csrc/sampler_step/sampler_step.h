// sampler_step CUDA launcher: plain C++, no torch. The binding (sampler_step_cuda.cpp) prepares
// contiguous inputs (sampler_step_checks.h) and calls this on the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cuda_status.h"
#include "common/dtype.h"
#include "sampler_step/sampler_step_math.h"

namespace genext::sampler {

struct LaunchParams {
  DType sample_dtype = DType::kFloat32;  // also history, noise, prev and x0
  DType model_dtype = DType::kFloat32;
  const void* x = nullptr;
  const void* m = nullptr;  // total elements, or 2 * total with guidance ([uncond; cond])
  const void* h1 = nullptr;
  const void* h2 = nullptr;
  const void* noise = nullptr;
  const float* s = nullptr;  // (n,) per-sample thresholds or null
  void* prev = nullptr;
  void* x0 = nullptr;
  int64_t total = 0, per = 1;
  bool guidance = false;
  float w = 1.f;
  Coef coef{};
  Flags flags{};
  bool vec4 = false;  // total % 4 == 0 and every pointer aligned for 4-element accesses
};

CudaStatus sampler_step_cuda(const LaunchParams& p, cudaStream_t stream);

}  // namespace genext::sampler
