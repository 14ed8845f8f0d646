// The CUDA launcher's parameters from the checked inputs (sampler_step_checks.h): shared by the
// CUDA binding and the tests that run the kernel under the CPU emulation (tests/cuda_emu).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common/torch_dtype.h"
#include "sampler_step/sampler_step.h"
#include "sampler_step/sampler_step_checks.h"

namespace genext::sampler {

inline bool aligned(const at::Tensor& t, int64_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

inline LaunchParams launch_params(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
  LaunchParams p;
  p.sample_dtype = to_dtype(kOp, in.x.scalar_type());
  p.model_dtype = to_dtype(kOp, in.m.scalar_type());
  p.x = in.x.data_ptr();
  p.m = in.m.data_ptr();
  p.h1 = in.h1.defined() ? in.h1.data_ptr() : nullptr;
  p.h2 = in.h2.defined() ? in.h2.data_ptr() : nullptr;
  p.noise = in.noise.defined() ? in.noise.data_ptr() : nullptr;
  p.s = in.s.defined() ? in.s.data_ptr<float>() : nullptr;
  p.prev = prev.data_ptr();
  p.x0 = x0.data_ptr();
  p.total = in.x.numel();
  p.per = in.per > 0 ? in.per : 1;
  p.guidance = in.guidance;
  p.w = in.w;
  p.coef = in.coef;
  p.flags = in.flags;
  const int64_t xb = 4 * in.x.element_size(), mb = 4 * in.m.element_size();
  p.vec4 = p.total % 4 == 0 && aligned(in.x, xb) && aligned(in.m, mb) && aligned(in.h1, xb) &&
           aligned(in.h2, xb) && aligned(in.noise, xb) && aligned(prev, xb) && aligned(x0, xb);
  return p;
}

}  // namespace genext::sampler
