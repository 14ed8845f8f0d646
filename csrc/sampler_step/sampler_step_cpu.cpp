// sampler_step on the CPU: one pass over the sample, in parallel over chunks of elements, with the
// expression of sampler_step_math.h (compiled with -ffp-contract=off, see CMakeLists.txt, so that
// every fp32 operation rounds as PyTorch's separate elementwise ops do).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "sampler_step/sampler_step_checks.h"
#include "sampler_step/sampler_step_math.h"

namespace genext::sampler {
namespace {

constexpr int64_t kGrain = 16384;

template <class T, class M>
void run(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
  const T* x = in.x.data_ptr<T>();
  const M* m = in.m.data_ptr<M>();
  const T* h1 = in.h1.defined() ? in.h1.data_ptr<T>() : nullptr;
  const T* h2 = in.h2.defined() ? in.h2.data_ptr<T>() : nullptr;
  const T* nz = in.noise.defined() ? in.noise.data_ptr<T>() : nullptr;
  const float* s = in.s.defined() ? in.s.data_ptr<float>() : nullptr;
  T* po = prev.data_ptr<T>();
  T* xo = x0.data_ptr<T>();
  const int64_t total = in.x.numel();
  const int64_t cond_off = in.guidance ? total : 0;  // [uncond; cond] along dim 0
  const Coef coef = in.coef;
  const Flags f = in.flags;
  const bool guidance = in.guidance;
  const float w = in.w;
  const int64_t per = in.per > 0 ? in.per : 1;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float mv = static_cast<float>(m[i]);
      if (guidance) mv = guide(mv, static_cast<float>(m[i + cond_off]), w);
      const float sv = s != nullptr ? s[i / per] : 1.f;
      float p, o;
      step_element(coef, f, static_cast<float>(x[i]), mv, h1 ? static_cast<float>(h1[i]) : 0.f,
                   h2 ? static_cast<float>(h2[i]) : 0.f, nz ? static_cast<float>(nz[i]) : 0.f, sv,
                   p, o);
      po[i] = static_cast<T>(p);
      xo[i] = static_cast<T>(o);
    }
  });
}

template <class T>
void run_model_dtype(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
  switch (in.m.scalar_type()) {
    case at::kFloat: return run<T, float>(in, prev, x0);
    case at::kHalf: return run<T, c10::Half>(in, prev, x0);
    case at::kBFloat16: return run<T, c10::BFloat16>(in, prev, x0);
    default: TORCH_CHECK(false, kOp, ": unsupported model_output dtype");
  }
}

std::tuple<at::Tensor, at::Tensor> sampler_step_cpu(
    int64_t mode, const at::Tensor& sample, const at::Tensor& model_output, at::TensorList history,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& threshold_scale,
    c10::ArrayRef<double> coef, int64_t prediction_type, bool clip, bool guidance,
    double guidance_scale) {
  const Inputs in = prepare(mode, sample, model_output, history, noise, threshold_scale, coef,
                            prediction_type, clip, guidance, guidance_scale);
  at::Tensor prev = at::empty(sample.sizes(), in.x.options());
  at::Tensor x0 = at::empty(sample.sizes(), in.x.options());
  if (in.x.numel() == 0) return {prev, x0};
  switch (in.x.scalar_type()) {
    case at::kFloat: run_model_dtype<float>(in, prev, x0); break;
    case at::kHalf: run_model_dtype<c10::Half>(in, prev, x0); break;
    case at::kBFloat16: run_model_dtype<c10::BFloat16>(in, prev, x0); break;
    default: TORCH_CHECK(false, kOp, ": unsupported sample dtype");
  }
  return {prev, x0};
}

}  // namespace
}  // namespace genext::sampler

TORCH_LIBRARY_IMPL(genext, CPU, m) { m.impl("sampler_step", &genext::sampler::sampler_step_cpu); }
