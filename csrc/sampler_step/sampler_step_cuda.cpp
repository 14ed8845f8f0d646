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
#include "sampler_step/sampler_step.h"
#include "sampler_step/sampler_step_checks.h"
#include "sampler_step/sampler_step_params.h"

namespace genext::sampler {
namespace {

void launch(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
  const LaunchParams p = launch_params(in, prev, x0);
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
