// The sampler step's CUDA launcher on CPU tensors, under the emulation: the checks and parameters
// of the CUDA binding (sampler_step_checks.h, sampler_step_params.h), then sampler_step_cuda from
// sampler_step.cu compiled for the host.
#include "sampler_step/sampler_step.h"

#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "sampler_step/sampler_step_checks.h"
#include "sampler_step/sampler_step_params.h"

namespace {

using namespace genext::sampler;

void run(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
  const LaunchParams p = launch_params(in, prev, x0);
  const genext::CudaStatus st = sampler_step_cuda(p, nullptr);
  TORCH_CHECK(st.ok(), "sampler_step_cuda (emulated) returned error ", int(st.err), " at ", st.file,
              ":", st.line);
}

Inputs inputs(int64_t mode, const at::Tensor& sample, const at::Tensor& model_output,
              const std::vector<at::Tensor>& history, const std::optional<at::Tensor>& noise,
              const std::optional<at::Tensor>& threshold_scale, const std::vector<double>& coef,
              int64_t prediction_type, bool clip, bool guidance, double guidance_scale) {
  return prepare(mode, sample, model_output, history, noise, threshold_scale, coef, prediction_type,
                 clip, guidance, guidance_scale);
}

std::tuple<at::Tensor, at::Tensor> step(int64_t mode, const at::Tensor& sample,
                                        const at::Tensor& model_output,
                                        const std::vector<at::Tensor>& history,
                                        const std::optional<at::Tensor>& noise,
                                        const std::optional<at::Tensor>& threshold_scale,
                                        const std::vector<double>& coef, int64_t prediction_type,
                                        bool clip, bool guidance, double guidance_scale) {
  const Inputs in = inputs(mode, sample, model_output, history, noise, threshold_scale, coef,
                           prediction_type, clip, guidance, guidance_scale);
  at::Tensor prev = at::empty(sample.sizes(), in.x.options());
  at::Tensor x0 = at::empty(sample.sizes(), in.x.options());
  run(in, prev, x0);
  return {prev, x0};
}

// The out variant: prev and x0 given (prev may be the sample itself).
void step_out(int64_t mode, const at::Tensor& sample, const at::Tensor& model_output,
              const std::vector<at::Tensor>& history, const std::optional<at::Tensor>& noise,
              const std::optional<at::Tensor>& threshold_scale, const std::vector<double>& coef,
              int64_t prediction_type, bool clip, bool guidance, double guidance_scale,
              at::Tensor prev, at::Tensor x0) {
  const Inputs in = inputs(mode, sample, model_output, history, noise, threshold_scale, coef,
                           prediction_type, clip, guidance, guidance_scale);
  check_out("prev", prev, sample);
  check_out("x0", x0, sample);
  run(in, prev, x0);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sampler_step", &step);
  m.def("sampler_step_out", &step_out);
}
