// CUDA binding of sampler_step: shared checks, output allocation, launch on the current stream.
// No host synchronisation: a sampling loop of these calls can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/device_name.h"
#include "common/torch_dtype.h"
#include "sampler_step/sampler_step.h"
#include "sampler_step/sampler_step_checks.h"

namespace genext::sampler {
namespace {

bool aligned(const at::Tensor& t, int64_t bytes) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

void launch(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
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
  check_cuda(kOp, sampler_step_cuda(p, c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cuda_op(
    int64_t mode, const at::Tensor& sample, const at::Tensor& model_output, at::TensorList history,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& threshold_scale,
    c10::ArrayRef<double> coef, int64_t prediction_type, bool clip, bool guidance,
    double guidance_scale) {
  TORCH_CHECK(sample.is_cuda(), kOp, ": sample must be a CUDA tensor, got ",
              genext::device_name(sample));
  const c10::cuda::CUDAGuard guard(sample.device());
  const Inputs in = prepare(mode, sample, model_output, history, noise, threshold_scale, coef,
                            prediction_type, clip, guidance, guidance_scale);
  at::Tensor prev = at::empty(sample.sizes(), in.x.options());
  at::Tensor x0 = at::empty(sample.sizes(), in.x.options());
  launch(in, prev, x0);
  return {prev, x0};
}

// Each thread reads its elements before writing them, so prev may be the sample itself.
void sampler_step_out_cuda_op(int64_t mode, const at::Tensor& sample,
                              const at::Tensor& model_output, at::TensorList history,
                              const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& threshold_scale,
                              c10::ArrayRef<double> coef, int64_t prediction_type, bool clip,
                              bool guidance, double guidance_scale, at::Tensor& prev,
                              at::Tensor& x0) {
  TORCH_CHECK(sample.is_cuda(), kOp, ": sample must be a CUDA tensor, got ",
              genext::device_name(sample));
  const c10::cuda::CUDAGuard guard(sample.device());
  const Inputs in = prepare(mode, sample, model_output, history, noise, threshold_scale, coef,
                            prediction_type, clip, guidance, guidance_scale);
  check_out("prev", prev, sample);
  check_out("x0", x0, sample);
  check_no_overlap(in, prev, x0);
  launch(in, prev, x0);
}

}  // namespace
}  // namespace genext::sampler

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("sampler_step", &genext::sampler::sampler_step_cuda_op);
  m.impl("sampler_step_out", &genext::sampler::sampler_step_out_cuda_op);
}
