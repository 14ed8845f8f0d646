// GroupNorm (+ optional fused SiLU) on CUDA: what the kernel files share. The kernels and their
// launchers are in group_norm_silu_fwd.cu and group_norm_silu_bwd.cu, the launch planning in
// group_norm_silu_plan.h/.cu; NOTES.md beside them keeps the history of the statistics and the
// figures measured on the way. No torch header: pointers, sizes and a stream in, a CudaStatus out
// (group_norm_silu.h).
//
// All per-element arithmetic in fp32 (partials combined in double); x/y fp32, fp16 or bf16.
// Numerics: the fused path is an exact two-pass (mean, then centred sum of squares) in shared
// memory. The split and NSC statistics are fp32 Welford recurrences per thread (per vector slot or
// per channel) in runs of at most kWelfordRun = 128 elements, each run on x minus its own first
// element; runs are folded into double (mean, M2) "moments" and combined with Chan et al.'s
// formula; no step subtracts two large sums, so the result does not depend on where the data sits
// or on outliers (NOTES.md: versions 2 and 3). The mean is carried as a hi + lo float
// pair inside the forward so (x - hi) - lo loses nothing to the mean's fp32 rounding.
#pragma once
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "group_norm_silu/group_norm_silu.h"
#include "group_norm_silu/group_norm_silu_plan.h"

namespace genext::gn {

using genext::cuda::batched_loop;
using genext::cuda::block_sum2;
using genext::cuda::cp_async16;
using genext::cuda::cp_async_wait_all;
using genext::cuda::FastDiv;
using genext::cuda::from_float;
using genext::cuda::kVec;
using genext::cuda::ld_raw;
using genext::cuda::max64;
using genext::cuda::min64;
using genext::cuda::pack16;
using genext::cuda::pack_raw;
using genext::cuda::RawT;
using genext::cuda::rcp_approx;
using genext::cuda::st_raw;
using genext::cuda::st_vec_cs;
using genext::cuda::to_float;
using genext::cuda::unpack16;
using genext::cuda::unpack_raw;
using genext::cuda::warp_sum;
using genext::cuda::welford_step;

struct Affine {
  const void* w;  // (C,) or null
  const void* b;  // (C,) or null
  bool f32;       // float32 parameters (else x's dtype)
};

template <typename T>
__device__ __forceinline__ float ld_param(const void* p, bool f32, int64_t c) {
  return f32 ? __ldg(static_cast<const float*>(p) + c) : to_float(static_cast<const T*>(p)[c]);
}

template <typename T>
__device__ __forceinline__ void load_affine(const Affine& a, int64_t c, float& w, float& b) {
  w = a.w != nullptr ? ld_param<T>(a.w, a.f32, c) : 1.f;
  b = a.b != nullptr ? ld_param<T>(a.b, a.f32, c) : 0.f;
}

// One element of any of the three dtypes (0 float32, 1 float16, 2 bfloat16; DType's values).
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }
__device__ __forceinline__ float act(float z, bool silu) { return silu ? z * sigmoid(z) : z; }
// dL/dz from dL/dy.
__device__ __forceinline__ float act_grad(float dy, float z, bool silu) {
  if (!silu) return dy;
  const float s = sigmoid(z);
  return dy * (s * (1.f + z * (1.f - s)));
}

// 1/sqrt(v) for v = var + eps in double: the fp32 approximation refined by one Newton step in
// double (no double division or sqrt subroutine). Special values without the Newton step (it would
// give inf * 0 = NaN): inf for v == 0 (as 1/sqrt(0)), 0 for v = +inf or v > 1e300 (the result
// underflows float anyway), NaN for NaN or negative v. v outside [1e-36, 1e36] is scaled by
// 2^-+128 for the fp32 estimate, so variances up to float's limit (~3.4e38) get their rstd. Larger
// ones do not reach here finite: the statistics square deviations and sum partial M2s in fp32 (a
// fused thread's sum; a Welford run of at most kWelfordRun elements on the split and NSC paths), so
// a deviation |x - shift| over ~1.8e19, or sigma over ~1.8e19 / sqrt(count) for a partial of count
// elements (~1.6e18 for a full run), makes M2 inf and rstd 0 (y = bias), not the rstd of the true
// variance.
__device__ __forceinline__ float rsqrt_refined(double v) {
  if (!(v > 0.0 && v <= 1.0e300)) {
    if (v == 0.0) return __uint_as_float(0x7f800000u);    // +inf
    return v > 0.0 ? 0.f : __uint_as_float(0x7fc00000u);  // +inf (or huge) -> 0; NaN, < 0 -> NaN
  }
  double vs = v;
  float k = 1.f;
  if (v > 1.0e36) {
    vs = v * 0x1p-128;
    k = 0x1p-64f;
  } else if (v < 1.0e-36) {
    vs = v * 0x1p128;
    k = 0x1p64f;
  }
  const float r = rsqrtf(static_cast<float>(vs));
  if (!(r <= 3.0e38f)) return r;  // inf: v below ~1e-77, 1/sqrt(v) overflows float
  const double rd = static_cast<double>(r) * k;
  return static_cast<float>(rd * (1.5 - 0.5 * v * rd * rd));
}

// The mean and variance of a group from its parts' moments (part i holds count(i) elements, M in
// all, inv_m = 1/M): Chan et al.'s parallel combination done in two passes over the parts, so
// nothing cancels: mean = sum count_i mean_i / M, M2 = sum (M2_i + count_i (mean_i - mean)^2).
// Called by a whole warp (lane = its lane); fixed order, every lane gets the same bits.
template <typename CountF>
__device__ __forceinline__ void group_moments(const Moments* __restrict__ pg, int parts,
                                              CountF count, double inv_m, int lane, double& mean,
                                              double& var) {
  double s = 0.0;
  for (int i = lane; i < parts; i += 32) s += count(i) * pg[i].mean;
  s = warp_sum(s);
  mean = s * inv_m;
  double q = 0.0;
  for (int i = lane; i < parts; i += 32) {
    const Moments p = pg[i];
    const double d = p.mean - mean;
    q += p.m2 + count(i) * d * d;
  }
  q = warp_sum(q);
  var = q * inv_m;
}

// mean/rstd of a group from its mean and (biased) variance. The mean is returned as hi + lo floats
// so that (x - hi) - lo keeps the precision of a double mean.
__device__ __forceinline__ void finalize_stats(double mean, double var, float eps, float& mhi,
                                               float& mlo, float& rstd) {
  if (var < 0.0) var = 0.0;  // NaN stays NaN
  mhi = static_cast<float>(mean);
  mlo = static_cast<float>(mean - static_cast<double>(mhi));
  rstd = rsqrt_refined(var + static_cast<double>(eps));
}

// 1/n in double without the division subroutine (a call, which costs spills): the fp32 estimate
// refined by two Newton steps (relative error 2^-23 -> 2^-46 -> double rounding).
__device__ __forceinline__ double recip(double n) {
  double r = rcp_approx(static_cast<float>(n));
  r = fma(r, fma(-n, r, 1.0), r);
  return fma(r, fma(-n, r, 1.0), r);
}

// Sums about ref (a = sum (x - ref), b = sum (x - ref)^2, n elements) -> moments. In double, with
// ref one of the elements or a sub-mean: (mean - ref)^2 <= n * var, so b - a^2/n loses at most
// log2(n) of double's 53 bits.
__device__ __forceinline__ Moments moments_from_sums(double ref, double a, double b, double n) {
  const double mu = a * recip(n);
  double m2 = b - a * mu;
  if (m2 < 0.0) m2 = 0.0;  // NaN stays NaN
  return Moments{ref + mu, m2};
}

// Tracks (q, r) = divmod(e, S) while e advances by a fixed step: the channel (q) and position (r)
// of an element of a contiguous (channel, S) run, without a division per element.
struct ChanIter {
  int64_t q, r, dq, dr, S;
  __device__ __forceinline__ ChanIter(int64_t e, int64_t step, const FastDiv& Sd) : S(Sd.value()) {
    q = Sd.div(e);
    r = e - q * S;
    dq = Sd.div(step);
    dr = step - dq * S;
  }
  __device__ __forceinline__ void advance() {
    q += dq;
    r += dr;
    if (r >= S) {
      r -= S;
      ++q;
    }
  }
};

// Splits the element range [A0, A1) of p into a scalar head [A0, a0), nvec 16-byte-aligned vectors
// from a0, and a scalar tail [a0 + nvec*V, A1). Without vec everything is head.
template <typename T>
__device__ __forceinline__ void vec_span(const T* p, int64_t A0, int64_t A1, bool vec, int64_t& a0,
                                         int64_t& nvec) {
  constexpr int V = kVec<T>;
  if (!vec) {
    a0 = A1;
    nvec = 0;
    return;
  }
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % V);
  const int64_t r = (mis + A0) % V;
  a0 = min64(A0 + (r ? V - r : 0), A1);
  nvec = (A1 - a0) / V;
}

}  // namespace genext::gn
