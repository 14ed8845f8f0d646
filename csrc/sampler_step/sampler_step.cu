// sampler_step on CUDA: one elementwise kernel per step, four elements per thread with 16-byte
// (fp32) or 8-byte (fp16/bf16) accesses when the tensors allow it, the expression of
// sampler_step_math.h with round-to-nearest intrinsics (no FMA contraction, exact division), so
// results equal PyTorch's separate fp32 ops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/cuda_dispatch.cuh"
#include "common/cuda_utils.cuh"
#include "sampler_step/sampler_step.h"

namespace genext::sampler {
namespace {

using genext::cuda::from_float;
using genext::cuda::to_float;

template <class X>
struct Raw4 {
  using type = uint2;  // four 16-bit values
};
template <>
struct Raw4<float> {
  using type = float4;
};

template <class X>
__device__ __forceinline__ void load4(const X* p, float (&f)[4]) {
  const typename Raw4<X>::type r = *reinterpret_cast<const typename Raw4<X>::type*>(p);
  const X* e = reinterpret_cast<const X*>(&r);
#pragma unroll
  for (int k = 0; k < 4; ++k) f[k] = to_float(e[k]);
}

template <class X>
__device__ __forceinline__ void store4(X* p, const float (&f)[4]) {
  typename Raw4<X>::type r;
  X* e = reinterpret_cast<X*>(&r);
#pragma unroll
  for (int k = 0; k < 4; ++k) e[k] = from_float<X>(f[k]);
  *reinterpret_cast<typename Raw4<X>::type*>(p) = r;
}

template <class T, class M, int V>
__global__ void step_kernel(const LaunchParams p) {
  const T* x = static_cast<const T*>(p.x);
  const M* m = static_cast<const M*>(p.m);
  const T* h1 = static_cast<const T*>(p.h1);
  const T* h2 = static_cast<const T*>(p.h2);
  const T* nz = static_cast<const T*>(p.noise);
  T* po = static_cast<T*>(p.prev);
  T* xo = static_cast<T*>(p.x0);
  const int64_t cond_off = p.guidance ? p.total : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < p.total;
       i += stride) {
    float xv[V], mv[V], a[V], b[V], n[V], pv[V], ov[V];
    if constexpr (V == 4) {
      load4(x + i, xv);
      load4(m + i, mv);
      if (p.guidance) {
        float cv[4];
        load4(m + i + cond_off, cv);
#pragma unroll
        for (int k = 0; k < 4; ++k) mv[k] = guide(mv[k], cv[k], p.w);
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) a[k] = b[k] = n[k] = 0.f;
      if (h1 != nullptr) load4(h1 + i, a);
      if (h2 != nullptr) load4(h2 + i, b);
      if (nz != nullptr) load4(nz + i, n);
    } else {
      xv[0] = to_float(x[i]);
      mv[0] = to_float(m[i]);
      if (p.guidance) mv[0] = guide(mv[0], to_float(m[i + cond_off]), p.w);
      a[0] = h1 != nullptr ? to_float(h1[i]) : 0.f;
      b[0] = h2 != nullptr ? to_float(h2[i]) : 0.f;
      n[0] = nz != nullptr ? to_float(nz[i]) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float s = p.s != nullptr ? p.s[(i + k) / p.per] : 1.f;
      step_element(p.coef, p.flags, xv[k], mv[k], a[k], b[k], n[k], s, pv[k], ov[k]);
    }
    if constexpr (V == 4) {
      store4(po + i, pv);
      store4(xo + i, ov);
    } else {
      po[i] = from_float<T>(pv[0]);
      xo[i] = from_float<T>(ov[0]);
    }
  }
}

template <class T, class M>
CudaStatus launch(const LaunchParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int v = p.vec4 ? 4 : 1;
  const int64_t work = (p.total + v - 1) / v;
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, 65535LL * 8);
  if (p.vec4) {
    step_kernel<T, M, 4><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    step_kernel<T, M, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace

CudaStatus sampler_step_cuda(const LaunchParams& p, cudaStream_t stream) {
  if (p.total == 0) return {};
  return dispatch_dtype(p.sample_dtype, [&]<typename T>() {
    return dispatch_dtype(p.model_dtype, [&]<typename M>() { return launch<T, M>(p, stream); });
  });
}

}  // namespace genext::sampler
