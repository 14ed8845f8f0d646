// VQ on CUDA. vq_nearest: one thread per row of z, 128 rows per block; tiles of 32 codes x 32
// dims of the codebook and the block's 128 x 32 slice of z pass through shared memory; each
// thread keeps 32 partial distances in registers and a running minimum: no N x K matrix. Exact
// squared differences in fp32 (cosine: dot products scaled by the inverse norms). CUDA cores
// only; vq_tc.cu holds a tensor-core path for 16-bit inputs that re-checks its best candidates
// with this arithmetic.
// vq_ema_update: atomics, or (deterministic) one block per code summing its rows in sorted order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dispatch.cuh"
#include "common/cuda_utils.cuh"
#include "vq/vq.h"

namespace genext::vq {
namespace {

using genext::cuda::to_float;

constexpr int kRowsPerBlock = 128;
constexpr int kTileCodes = 32;
constexpr int kTileDims = 32;

template <class T>
__global__ void __launch_bounds__(kRowsPerBlock) nearest_kernel(const NearestParams p) {
  __shared__ float sZ[kTileDims][kRowsPerBlock];   // [d][row]: row-consecutive, no conflicts
  __shared__ float sE[kTileCodes][kTileDims + 1];  // broadcast reads
  const T* z = static_cast<const T*>(p.z);
  const T* cb = static_cast<const T*>(p.codebook);
  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t row = row0 + tid;
  float best = p.cosine ? -INFINITY : INFINITY;
  int64_t arg = -1;  // no code accepted yet
  for (int64_t c0 = 0; c0 < p.K; c0 += kTileCodes) {
    float acc[kTileCodes];
#pragma unroll
    for (int c = 0; c < kTileCodes; ++c) acc[c] = 0.f;
    for (int64_t d0 = 0; d0 < p.D; d0 += kTileDims) {
      __syncthreads();  // the previous tile is consumed
      for (int e = tid; e < kRowsPerBlock * kTileDims; e += kRowsPerBlock) {
        const int r = e / kTileDims, d = e % kTileDims;
        const int64_t gr = row0 + r, gd = d0 + d;
        sZ[d][r] = (gr < p.N && gd < p.D) ? to_float(z[gr * p.D + gd]) : 0.f;
      }
      for (int e = tid; e < kTileCodes * kTileDims; e += kRowsPerBlock) {
        const int c = e / kTileDims, d = e % kTileDims;
        const int64_t gc = c0 + c, gd = d0 + d;
        sE[c][d] = (gc < p.K && gd < p.D) ? to_float(cb[gc * p.D + gd]) : 0.f;
      }
      __syncthreads();
      const int dims = static_cast<int>(p.D - d0 < kTileDims ? p.D - d0 : kTileDims);
      if (p.cosine) {
        for (int d = 0; d < dims; ++d) {
          const float zv = sZ[d][tid];
#pragma unroll
          for (int c = 0; c < kTileCodes; ++c) acc[c] = fmaf(zv, sE[c][d], acc[c]);
        }
      } else {
        for (int d = 0; d < dims; ++d) {
          const float zv = sZ[d][tid];
#pragma unroll
          for (int c = 0; c < kTileCodes; ++c) {
            const float t = zv - sE[c][d];
            acc[c] = fmaf(t, t, acc[c]);
          }
        }
      }
    }
    if (row < p.N) {
      const float zn = p.cosine ? p.z_inv_norm[row] : 1.f;
#pragma unroll
      for (int c = 0; c < kTileCodes; ++c) {
        const int64_t k = c0 + c;
        // strict comparisons in increasing k: ties keep the smallest index; a NaN score never
        // wins, an infinite one only while no code has been accepted (as the CPU kernel)
        if (k < p.K) {
          if (p.cosine) {
            const float v = acc[c] * zn * p.cb_inv_norm[k];
            if (v > best || (arg < 0 && v == best)) {
              best = v;
              arg = k;
            }
          } else if (acc[c] < best || (arg < 0 && acc[c] == best)) {
            best = acc[c];
            arg = k;
          }
        }
      }
    }
  }
  if (row < p.N) {  // every score NaN: index 0, distance NaN
    p.indices[row] = arg < 0 ? 0 : arg;
    p.distances[row] = arg < 0 ? NAN : (p.cosine ? 1.f - best : sqrtf(best));
  }
}

template <class T>
__global__ void ema_atomic_kernel(const EmaParams p) {
  const T* z = static_cast<const T*>(p.z);
  const int64_t total = p.N * p.D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / p.D, d = e % p.D;
    const int64_t k = p.indices[i];
    if (k < 0 || k >= p.K) continue;
    atomicAdd(p.sums + k * p.D + d, to_float(z[e]));
    if (d == 0) atomicAdd(p.counts + k, 1.f);
  }
}

// One block per code: its rows (perm[offsets[k] .. offsets[k+1]]) summed in order.
template <class T>
__global__ void ema_sorted_kernel(const EmaParams p) {
  const T* z = static_cast<const T*>(p.z);
  const int64_t k = blockIdx.x;
  const int64_t begin = p.offsets[k], end = p.offsets[k + 1];
  if (threadIdx.x == 0) p.counts[k] = static_cast<float>(end - begin);
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    float s = 0.f;
    for (int64_t j = begin; j < end; ++j) s += to_float(z[p.perm[j] * p.D + d]);
    p.sums[k * p.D + d] = s;
  }
}

template <class T>
CudaStatus nearest_run(const NearestParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.N + kRowsPerBlock - 1) / kRowsPerBlock;
  nearest_kernel<T><<<static_cast<unsigned>(blocks), kRowsPerBlock, 0, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

template <class T>
CudaStatus ema_run(const EmaParams& p, cudaStream_t stream) {
  if (p.deterministic) {
    ema_sorted_kernel<T><<<static_cast<unsigned>(p.K), 128, 0, stream>>>(p);
  } else {
    const int64_t total = p.N * p.D;
    const int64_t blocks = total > 0 ? std::min<int64_t>((total + 255) / 256, 65535) : 0;
    if (blocks > 0) ema_atomic_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
  }
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace

CudaStatus vq_nearest_cuda(const NearestParams& p, cudaStream_t stream) {
  if (p.N == 0) return {};
  if (p.tensor_cores && vq_nearest_tc_supported(p)) return vq_nearest_tc(p, stream);
  return dispatch_dtype(p.dtype, [&]<typename T>() { return nearest_run<T>(p, stream); });
}

CudaStatus vq_ema_update_cuda(const EmaParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&]<typename T>() { return ema_run<T>(p, stream); });
}

}  // namespace genext::vq
