// sampler_step on the CPU: one pass over the sample (in blocks that stay in L1), in parallel over
// chunks of elements, with the expression of sampler_step_math.h (compiled with -ffp-contract=off,
// see CMakeLists.txt, so that every fp32 operation rounds as PyTorch's separate elementwise ops do).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "sampler_step/sampler_step_checks.h"
#include "sampler_step/sampler_step_math.h"

namespace genext::sampler {
namespace {

constexpr int64_t kGrain = 16384;
constexpr int64_t kBlock = 512;  // elements per pass; the passes' buffers stay in L1

// The expression of sampler_step_math.h evaluated pass by pass over blocks of kBlock elements:
// each pass is one operation of the expression over the block, a loop the compiler vectorises,
// with the flags tested once per block. The operations and their order are those of
// step_element, so the results are identical to it.
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
  const float* c = in.coef.c;
  const Flags f = in.flags;
  const bool guidance = in.guidance;
  const float w = in.w;
  const int64_t per = in.per > 0 ? in.per : 1;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    alignas(64) float xb[kBlock], mb[kBlock], ob[kBlock], pb[kBlock], tb[kBlock], ub[kBlock];
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
      const int64_t n = std::min(kBlock, end - i0);
      for (int64_t k = 0; k < n; ++k) xb[k] = static_cast<float>(x[i0 + k]);
      for (int64_t k = 0; k < n; ++k) mb[k] = static_cast<float>(m[i0 + k]);
      if (guidance) {
        for (int64_t k = 0; k < n; ++k) ub[k] = static_cast<float>(m[i0 + k + cond_off]);
        for (int64_t k = 0; k < n; ++k) mb[k] = guide(mb[k], ub[k], w);
      }
      if (nz != nullptr) {
        for (int64_t k = 0; k < n; ++k) ub[k] = static_cast<float>(nz[i0 + k]);
      }
      if (f.mode == kFlow) {
        if (nz == nullptr) {
          for (int64_t k = 0; k < n; ++k) ob[k] = mb[k];
          for (int64_t k = 0; k < n; ++k) pb[k] = add(xb[k], mul(c[3], mb[k]));
        } else {
          for (int64_t k = 0; k < n; ++k) ob[k] = sub(xb[k], mul(c[4], mb[k]));
          for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[5], ob[k]), mul(c[6], ub[k]));
        }
      } else {
        if (f.pred == kEpsilon) {
          for (int64_t k = 0; k < n; ++k) ob[k] = divide(sub(xb[k], mul(c[1], mb[k])), c[0]);
        } else if (f.pred == kSample) {
          for (int64_t k = 0; k < n; ++k) ob[k] = mb[k];
        } else {
          for (int64_t k = 0; k < n; ++k) ob[k] = sub(mul(c[0], xb[k]), mul(c[1], mb[k]));
        }
        if (s != nullptr) {
          for (int64_t k = 0; k < n;) {  // segments of one sample each
            const int64_t sample_idx = (i0 + k) / per;
            const int64_t stop = std::min(n, (sample_idx + 1) * per - i0);
            const float sv = s[sample_idx];
            for (; k < stop; ++k) ob[k] = divide(clampf(ob[k], -sv, sv), sv);
          }
        } else if (f.clip) {
          const float r = c[2];
          for (int64_t k = 0; k < n; ++k) ob[k] = clampf(ob[k], -r, r);
        }
        if (f.mode == kDDIM) {
          if (f.pred == kEpsilon) {
            for (int64_t k = 0; k < n; ++k) tb[k] = mb[k];
          } else if (f.pred == kSample) {
            for (int64_t k = 0; k < n; ++k) tb[k] = divide(sub(xb[k], mul(c[0], ob[k])), c[1]);
          } else {
            for (int64_t k = 0; k < n; ++k) tb[k] = add(mul(c[0], mb[k]), mul(c[1], xb[k]));
          }
          if (c[6] != 0.f) {
            for (int64_t k = 0; k < n; ++k) tb[k] = divide(sub(xb[k], mul(c[0], ob[k])), c[1]);
          }
          for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[3], ob[k]), mul(c[4], tb[k]));
          if (nz != nullptr) {
            for (int64_t k = 0; k < n; ++k) pb[k] = add(pb[k], mul(c[5], ub[k]));
          }
        } else if (f.mode == kDDPM) {
          for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[3], ob[k]), mul(c[4], xb[k]));
          if (nz != nullptr) {
            for (int64_t k = 0; k < n; ++k) pb[k] = add(pb[k], mul(c[5], ub[k]));
          }
        } else {  // kDPM
          for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[3], xb[k]), mul(c[4], ob[k]));
          if (f.n_hist == 1) {
            for (int64_t k = 0; k < n; ++k) {
              const float d1 = mul(c[8], sub(ob[k], static_cast<float>(h1[i0 + k])));
              pb[k] = add(pb[k], mul(c[5], d1));
            }
          } else if (f.n_hist == 2) {
            for (int64_t k = 0; k < n; ++k) {
              const float a = static_cast<float>(h1[i0 + k]), b = static_cast<float>(h2[i0 + k]);
              const float d1_0 = mul(c[8], sub(ob[k], a));
              const float d1_1 = mul(c[9], sub(a, b));
              const float d1 = add(d1_0, mul(c[10], sub(d1_0, d1_1)));
              const float d2 = mul(c[11], sub(d1_0, d1_1));
              pb[k] = add(add(pb[k], mul(c[5], d1)), mul(c[6], d2));
            }
          }
          if (nz != nullptr) {
            for (int64_t k = 0; k < n; ++k) pb[k] = add(pb[k], mul(c[7], ub[k]));
          }
        }
      }
      for (int64_t k = 0; k < n; ++k) po[i0 + k] = static_cast<T>(pb[k]);
      for (int64_t k = 0; k < n; ++k) xo[i0 + k] = static_cast<T>(ob[k]);
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
