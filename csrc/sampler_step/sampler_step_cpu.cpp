// sampler_step on the CPU: one pass over the sample (in blocks that stay in L1), in parallel over
// chunks of elements, with the expression of sampler_step_math.h (compiled with -ffp-contract=off,
// see CMakeLists.txt, so that every fp32 operation rounds as PyTorch's separate elementwise ops
// do).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "common/cpu_simd.h"
#include "sampler_step/sampler_step_checks.h"
#include "sampler_step/sampler_step_math.h"

namespace genext::sampler {
namespace {

// one core's time per element (fp32, AVX2, guidance and noise: about 1 ns), for the thread count
constexpr double kNsPerElement = 1.0;
constexpr int64_t kBlock = 512;  // elements per pass; the passes' buffers stay in L1

// The block loops are compiled per ISA level (GENEXT_CPU_CLONES). The x86-64-v3/v4 levels have
// FMA, but it stays unused: this file is built with -ffp-contract=off, so no multiply-add is ever
// fused and every level gives PyTorch's bits.

// One block's inputs and outputs as float buffers (h1, h2, noise may be null when unused).
struct Block {
  const float* x;
  const float* m;
  const float* h1;
  const float* h2;
  const float* noise;
  float* x0;
  float* prev;
  float* tmp;
  int64_t n;
};

// The expression of sampler_step_math.h over one block, pass by pass: each pass is one operation
// of the expression, a loop the compiler vectorises, with the flags tested once per block. The
// operations and their order are those of step_element, so the results are identical to it.
// `s` is the block's per-element threshold run: (value, count) pairs cover the block in order.
GENEXT_CPU_CLONES
void compute_block(const Block& b, const float* c, const Flags f, const float* s_val,
                   const int64_t* s_len, int s_runs) {
  const int64_t n = b.n;
  const float* xb = b.x;
  const float* mb = b.m;
  float* ob = b.x0;
  float* pb = b.prev;
  float* tb = b.tmp;
  if (f.mode == kFlow) {
    if (b.noise == nullptr) {
      for (int64_t k = 0; k < n; ++k) ob[k] = mb[k];
      for (int64_t k = 0; k < n; ++k) pb[k] = add(xb[k], mul(c[3], mb[k]));
    } else {
      for (int64_t k = 0; k < n; ++k) ob[k] = sub(xb[k], mul(c[4], mb[k]));
      for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[5], ob[k]), mul(c[6], b.noise[k]));
    }
    return;
  }
  if (f.pred == kEpsilon) {
    for (int64_t k = 0; k < n; ++k) ob[k] = divide(sub(xb[k], mul(c[1], mb[k])), c[0]);
  } else if (f.pred == kSample) {
    for (int64_t k = 0; k < n; ++k) ob[k] = mb[k];
  } else {
    for (int64_t k = 0; k < n; ++k) ob[k] = sub(mul(c[0], xb[k]), mul(c[1], mb[k]));
  }
  if (s_runs > 0) {
    int64_t k = 0;
    for (int r = 0; r < s_runs; ++r) {
      const float sv = s_val[r];
      const int64_t stop = k + s_len[r];
      for (; k < stop; ++k) ob[k] = divide(clampf(ob[k], -sv, sv), sv);
    }
  } else if (f.clip) {
    const float r = c[2];
    for (int64_t k = 0; k < n; ++k) ob[k] = clampf(ob[k], -r, r);
  }
  if (f.mode == kDDIM) {
    if (f.pred == kEpsilon) {
      for (int64_t k = 0; k < n; ++k) tb[k] = mb[k];
    } else if (f.pred == kSample) {  // the unclipped x0 (= m), as diffusers does
      for (int64_t k = 0; k < n; ++k) tb[k] = divide(sub(xb[k], mul(c[0], mb[k])), c[1]);
    } else {
      for (int64_t k = 0; k < n; ++k) tb[k] = add(mul(c[0], mb[k]), mul(c[1], xb[k]));
    }
    if (c[6] != 0.f) {
      for (int64_t k = 0; k < n; ++k) tb[k] = divide(sub(xb[k], mul(c[0], ob[k])), c[1]);
    }
    for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[3], ob[k]), mul(c[4], tb[k]));
    if (b.noise != nullptr) {
      for (int64_t k = 0; k < n; ++k) pb[k] = add(pb[k], mul(c[5], b.noise[k]));
    }
  } else if (f.mode == kDDPM) {
    for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[3], ob[k]), mul(c[4], xb[k]));
    if (b.noise != nullptr) {
      for (int64_t k = 0; k < n; ++k) pb[k] = add(pb[k], mul(c[5], b.noise[k]));
    }
  } else {  // kDPM
    for (int64_t k = 0; k < n; ++k) pb[k] = add(mul(c[3], xb[k]), mul(c[4], ob[k]));
    if (f.n_hist == 1) {
      for (int64_t k = 0; k < n; ++k) {
        const float d1 = mul(c[8], sub(ob[k], b.h1[k]));
        pb[k] = add(pb[k], mul(c[5], d1));
      }
    } else if (f.n_hist == 2) {
      for (int64_t k = 0; k < n; ++k) {
        const float d1_0 = mul(c[8], sub(ob[k], b.h1[k]));
        const float d1_1 = mul(c[9], sub(b.h1[k], b.h2[k]));
        const float d1 = add(d1_0, mul(c[10], sub(d1_0, d1_1)));
        const float d2 = mul(c[11], sub(d1_0, d1_1));
        pb[k] = add(add(pb[k], mul(c[5], d1)), mul(c[6], d2));
      }
    }
    if (b.noise != nullptr) {
      for (int64_t k = 0; k < n; ++k) pb[k] = add(pb[k], mul(c[7], b.noise[k]));
    }
  }
}

// Guidance pass, cloned like compute_block: m = u + w * (c - u).
GENEXT_CPU_CLONES
void guide_block(float* mb, const float* cb, int64_t n, float w) {
  for (int64_t k = 0; k < n; ++k) mb[k] = guide(mb[k], cb[k], w);
}

// Loads n values of type X as floats (a plain copy for float, no conversion pass).
template <class X>
inline const float* as_float(const X* src, float* buf, int64_t n) {
  if constexpr (std::is_same_v<X, float>) {
    return src;
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(src[k]);
    return buf;
  }
}

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
  genext::cpu::parallel_for(
      0, total, kNsPerElement,
      [&](int64_t begin, int64_t end) {
        alignas(64) float xb[kBlock], mb[kBlock], cb[kBlock], h1b[kBlock], h2b[kBlock], nb[kBlock],
            ob[kBlock], pb[kBlock], tb[kBlock];
        float s_val[kBlock];
        int64_t s_len[kBlock];
        for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
          const int64_t n = std::min(kBlock, end - i0);
          Block b;
          b.n = n;
          b.x = as_float(x + i0, xb, n);
          // the model output is modified in place by guidance: always its own buffer then
          float* mbuf = mb;
          if constexpr (std::is_same_v<M, float>) {
            if (!guidance) {
              b.m = m + i0;
            } else {
              std::copy(m + i0, m + i0 + n, mbuf);
              b.m = mbuf;
            }
          } else {
            for (int64_t k = 0; k < n; ++k) mbuf[k] = static_cast<float>(m[i0 + k]);
            b.m = mbuf;
          }
          if (guidance) guide_block(mbuf, as_float(m + i0 + cond_off, cb, n), n, w);
          b.h1 = h1 != nullptr ? as_float(h1 + i0, h1b, n) : nullptr;
          b.h2 = h2 != nullptr ? as_float(h2 + i0, h2b, n) : nullptr;
          b.noise = nz != nullptr ? as_float(nz + i0, nb, n) : nullptr;
          float* out0 = ob;
          float* outp = pb;
          if constexpr (std::is_same_v<T, float>) {  // write straight into the outputs
            out0 = xo + i0;
            outp = po + i0;
          }
          b.x0 = out0;
          b.prev = outp;
          b.tmp = tb;
          int runs = 0;
          if (s != nullptr) {
            for (int64_t k = 0; k < n; ++runs) {  // runs of one sample each
              const int64_t idx = (i0 + k) / per;
              const int64_t stop = std::min(n, (idx + 1) * per - i0);
              s_val[runs] = s[idx];
              s_len[runs] = stop - k;
              k = stop;
            }
          }
          compute_block(b, coef.c, f, s_val, s_len, runs);
          if constexpr (!std::is_same_v<T, float>) {
            for (int64_t k = 0; k < n; ++k) po[i0 + k] = static_cast<T>(pb[k]);
            for (int64_t k = 0; k < n; ++k) xo[i0 + k] = static_cast<T>(ob[k]);
          }
        }
      },
      kBlock);
}

// The sample's and the model output's dtypes (no float64 kernel; the arithmetic is float).
void compute(const Inputs& in, at::Tensor& prev, at::Tensor& x0) {
  if (in.x.numel() == 0) return;
  dispatch_cpu_dtype</*kDouble=*/false>(kOp, in.x.scalar_type(), [&]<class T, class>() {
    dispatch_cpu_dtype</*kDouble=*/false>(kOp, in.m.scalar_type(),
                                          [&]<class M, class>() { run<T, M>(in, prev, x0); });
  });
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
  compute(in, prev, x0);
  return {prev, x0};
}

// Elementwise with each element read before it is written, so prev may be the sample itself (the
// only sharing of memory check_no_overlap lets through).
void sampler_step_out_cpu(int64_t mode, const at::Tensor& sample, const at::Tensor& model_output,
                          at::TensorList history, const std::optional<at::Tensor>& noise,
                          const std::optional<at::Tensor>& threshold_scale,
                          c10::ArrayRef<double> coef, int64_t prediction_type, bool clip,
                          bool guidance, double guidance_scale, at::Tensor& prev, at::Tensor& x0) {
  const Inputs in = prepare(mode, sample, model_output, history, noise, threshold_scale, coef,
                            prediction_type, clip, guidance, guidance_scale);
  check_out("prev", prev, sample);
  check_out("x0", x0, sample);
  check_no_overlap(in, prev, x0);
  compute(in, prev, x0);
}

}  // namespace
}  // namespace genext::sampler

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("sampler_step", &genext::sampler::sampler_step_cpu);
  m.impl("sampler_step_out", &genext::sampler::sampler_step_out_cpu);
}
