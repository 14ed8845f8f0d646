// vq_nearest on tensor cores for fp16/bf16 inputs with D up to 256: the ranking scores
// (||e||^2 - 2 z.e for L2, -(z.e) / ||e|| for cosine; a row's own norm does not change its
// ranking) come from mma.sync with fp32 accumulation over 64-code tiles of the codebook, each
// thread keeps its kCand best codes for each of its two rows, and those candidates are scored
// again with the exact kernel's own arithmetic (vq.cu: the same fmaf chain over d in order), so a
// row's index and distance are the exact kernel's whenever its best code is among the candidates
// (4 lanes x kCand per row). A row is scanned exactly over every code by its four lanes instead
// when a ranking score or the best re-checked score is not finite (NaN or inf inputs, or scores
// past the fp32 range), or when a lane dropped a code whose ranking score lies within the rounding
// bound of the chosen code's (near-ties finer than fp32 can rank, exact duplicates included).
//
// One block per 64 rows (4 warps, 16 rows each, whose A fragments stay in registers); the
// codebook streams through shared memory in 64-code tiles, two stages deep (cp.async when the
// rows are 16-byte aligned). No N x K matrix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "common/cuda_utils.cuh"
#include "common/warp_mma.cuh"
#include "vq/vq.h"

namespace genext::vq {
namespace {

using genext::cuda::from_float;
using genext::cuda::to_float;

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // rows of z per block
constexpr int kCodes = 64;          // codes per tile
constexpr int kCand = 4;            // candidates a thread keeps per row

template <int kD>
constexpr int smem_bytes() {  // z rows, two stages of codes, two stages of their bias and weight
  return (kRows + 2 * kCodes) * (kD + 8) * 2 + 4 * kCodes * static_cast<int>(sizeof(float));
}

// The exact kernel's score of code k for row `row`, as a key where lower wins (L2: the squared
// distance; cosine: minus the similarity, an exact negation).
template <class T>
__device__ float exact_key(const NearestParams& p, int64_t row, int64_t k) {
  const T* z = static_cast<const T*>(p.z) + row * p.D;
  const T* e = static_cast<const T*>(p.codebook) + k * p.D;
  float acc = 0.f;
  if (p.cosine) {
    for (int64_t d = 0; d < p.D; ++d) acc = fmaf(to_float(z[d]), to_float(e[d]), acc);
    return -(acc * p.z_inv_norm[row] * p.cb_inv_norm[k]);
  }
  for (int64_t d = 0; d < p.D; ++d) {
    const float t = to_float(z[d]) - to_float(e[d]);
    acc = fmaf(t, t, acc);
  }
  return acc;
}

// (key, k) <- the better of itself and (ok, other_k): lower key, then lower index; NaN keys and
// k < 0 (nothing) never win. The rule is symmetric, so two lanes exchanging agree.
__device__ __forceinline__ void take_better(float& key, int64_t& k, float ok, int64_t other_k) {
  if (other_k < 0 || ok != ok) return;  // ok != ok: NaN
  if (k < 0 || ok < key || (ok == key && other_k < k)) {
    key = ok;
    k = other_k;
  }
}

__device__ __forceinline__ void quad_best(float& key, int64_t& k) {
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    const float ok = __shfl_xor_sync(0xffffffffu, key, m);
    const int64_t other = __shfl_xor_sync(0xffffffffu, static_cast<long long>(k), m);
    take_better(key, k, ok, other);
  }
}

template <class T, int kD>
__global__ void __launch_bounds__(kWarps * 32) nearest_tc_kernel(const NearestParams p) {
  constexpr int kPitch = kD + 8;
  constexpr int kSteps = kD / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sZ = reinterpret_cast<T*>(smem_raw);                                // [kRows][kPitch]
  T* sEs = sZ + kRows * kPitch;                                          // [2][kCodes][kPitch]
  float* sBiases = reinterpret_cast<float*>(sEs + 2 * kCodes * kPitch);  // [2][kCodes]
  float* sMuls = sBiases + 2 * kCodes;                                   // [2][kCodes]
  const T* z = static_cast<const T*>(p.z);
  const T* cb = static_cast<const T*>(p.codebook);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int D = static_cast<int>(p.D);
  const int steps = (D + 15) / 16;  // 16-wide k-steps that touch real columns
  const T zero = from_float<T>(0.f);

  for (int e = threadIdx.x; e < kRows * kD; e += kWarps * 32) {
    const int r = e / kD, d = e % kD;
    const int64_t gr = row0 + r;
    sZ[r * kPitch + d] = (gr < p.N && d < D) ? z[gr * p.D + d] : zero;
  }
  __syncthreads();
  uint32_t a[kSteps][4];
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    if (kk < steps) cuda::load_a(sZ, kPitch, warp * 16, kk * 16, lane, a[kk]);
  }

  // this thread's candidates for rows g and g + 8 of the warp, best first
  float cv[2][kCand];
  int64_t ck[2][kCand];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int j = 0; j < kCand; ++j) {
      cv[r][j] = INFINITY;
      ck[r][j] = -1;
    }
  }

  // a ranking score of this thread's was not finite (overflow, NaN or inf inputs): the row's
  // candidates may have missed its best code, whatever they re-check to
  bool unranked[2] = {false, false};

  // Code tile i goes to stage i & 1: 16-byte cp.async copies when rows are 16-byte aligned (D a
  // multiple of 8), else element loads; tile i + 1 is requested before tile i is used.
  const bool vec = p.D % 8 == 0;
  auto issue = [&](int64_t c0) {
    const int st = static_cast<int>((c0 / kCodes) & 1);
    T* dst = sEs + st * kCodes * kPitch;
    if (vec) {
      for (int e = threadIdx.x; e < kCodes * (kD / 8); e += kWarps * 32) {
        const int c = e / (kD / 8), d = (e % (kD / 8)) * 8;
        const int64_t gc = c0 + c;
        const bool ok = gc < p.K && d < D;
        cuda::cp_async16_zfill(dst + c * kPitch + d, ok ? cb + gc * p.D + d : cb, ok);
      }
    } else {
      for (int e = threadIdx.x; e < kCodes * kD; e += kWarps * 32) {
        const int c = e / kD, d = e % kD;
        const int64_t gc = c0 + c;
        dst[c * kPitch + d] = (gc < p.K && d < D) ? cb[gc * p.D + d] : zero;
      }
    }
    for (int c = threadIdx.x; c < kCodes; c += kWarps * 32) {
      const int64_t gc = c0 + c;
      const bool in = gc < p.K;
      sBiases[st * kCodes + c] = p.cosine || !in ? 0.f : p.cb_sq_norm[gc];
      sMuls[st * kCodes + c] = !in ? 0.f : (p.cosine ? -p.cb_inv_norm[gc] : -2.f);
    }
  };
  issue(0);
  cuda::cp_async_commit();

  for (int64_t c0 = 0; c0 < p.K; c0 += kCodes) {
    if (c0 + kCodes < p.K) issue(c0 + kCodes);  // into the stage the previous tile used
    cuda::cp_async_commit();
    cuda::cp_async_wait_group<1>();
    __syncthreads();  // this tile's stage is complete and visible to every warp
    const int st = static_cast<int>((c0 / kCodes) & 1);
    const T* sE = sEs + st * kCodes * kPitch;
    const float* sBias = sBiases + st * kCodes;
    const float* sMul = sMuls + st * kCodes;

    float s[kCodes / 8][4];
#pragma unroll
    for (int i = 0; i < kCodes / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      if (kk < steps) {
#pragma unroll
        for (int nn = 0; nn < kCodes / 16; ++nn) {
          uint32_t b[4];
          cuda::load_b_nk(sE, kPitch, nn * 16, kk * 16, lane, b);
          cuda::mma16816<T>(s[2 * nn], a[kk], b[0], b[1]);
          cuda::mma16816<T>(s[2 * nn + 1], a[kk], b[2], b[3]);
        }
      }
    }

#pragma unroll
    for (int i = 0; i < kCodes / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = i * 8 + 2 * t + (e & 1);
        const int64_t k = c0 + col;
        const int r = e >> 1;
        const float v = sBias[col] + sMul[col] * s[i][e];
        if (k < p.K && !(fabsf(v) < INFINITY)) unranked[r] = true;
        // strict: a later code with an equal score stays behind the earlier one; NaN never enters
        if (k < p.K && v < cv[r][kCand - 1]) {
          cv[r][kCand - 1] = v;
          ck[r][kCand - 1] = k;
#pragma unroll
          for (int j = kCand - 1; j > 0; --j) {
            if (cv[r][j] < cv[r][j - 1]) {
              const float tv = cv[r][j];
              cv[r][j] = cv[r][j - 1];
              cv[r][j - 1] = tv;
              const int64_t tk = ck[r][j];
              ck[r][j] = ck[r][j - 1];
              ck[r][j - 1] = tk;
            }
          }
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before the next tile but one refills it
  }
  cuda::cp_async_wait_all();

  // ||z||^2 of rows g and g + 8 (from the block's copy; the quad splits the features)
  float zsq[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const T* zr = sZ + (warp * 16 + g + 8 * r) * kPitch;
    float acc = 0.f;
    for (int d = t; d < D; d += 4) acc = fmaf(to_float(zr[d]), to_float(zr[d]), acc);
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    zsq[r] = acc;
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + warp * 16 + g + 8 * r;
    const bool live = row < p.N;
    float key = NAN;
    int64_t best = -1;
    if (live) {
#pragma unroll
      for (int j = 0; j < kCand; ++j) {
        if (ck[r][j] >= 0) take_better(key, best, exact_key<T>(p, row, ck[r][j]), ck[r][j]);
      }
    }
    quad_best(key, best);
    // a ranking score or the re-checked best not finite (NaN or inf inputs, or scores past the
    // fp32 range): the ranking says nothing reliable, so scan every code
    bool scan = unranked[r];
    scan |= __shfl_xor_sync(0xffffffffu, scan, 1);
    scan |= __shfl_xor_sync(0xffffffffu, scan, 2);
    // The chosen code's ranking score (it is in exactly one lane's list), and the lowest score at
    // or above which a lane may have dropped codes (its last kept one, when its list is full).
    float rank_b = INFINITY, dropped = ck[r][kCand - 1] >= 0 ? cv[r][kCand - 1] : INFINITY;
#pragma unroll
    for (int j = 0; j < kCand; ++j) {
      if (best >= 0 && ck[r][j] == best) rank_b = cv[r][j];
    }
#pragma unroll
    for (int m = 1; m <= 2; m <<= 1) {
      rank_b = fminf(rank_b, __shfl_xor_sync(0xffffffffu, rank_b, m));
      dropped = fminf(dropped, __shfl_xor_sync(0xffffffffu, dropped, m));
    }
    // A dropped code can beat the chosen one (in the exact kernel's fp32 values) only if its
    // ranking score is within the rounding of both computations: with products exact, fp32 sums
    // of D terms err by at most about D u times the sum of magnitudes (u = 2^-24), which is at
    // most 2 (||z||^2 + max ||e||^2) for L2 and ||z|| for cosine (scores scaled by 1 / ||e||).
    // Both scores of both codes under round-to-nearest need a factor of about 8; the tensor
    // cores' accumulation may round worse (truncation), hence 16. Rows within it (near-ties
    // finer than fp32 can rank, exact duplicates included) are scanned.
    const float gamma = static_cast<float>(p.D + 4) * 5.9604645e-8f;
    const float bound = p.cosine ? 16.f * gamma / (live ? p.z_inv_norm[row] : 1.f)
                                 : 16.f * gamma * (zsq[r] + *p.cb_sq_max);
    scan |= best >= 0 && dropped - rank_b <= bound;
    if (live && (scan || !(best >= 0 && fabsf(key) < INFINITY))) {
      key = NAN;
      best = -1;
      for (int64_t k = t; k < p.K; k += 4) take_better(key, best, exact_key<T>(p, row, k), k);
    }
    quad_best(key, best);
    if (live && t == 0) {  // every score NaN: index 0, distance NaN (as the exact kernel)
      p.indices[row] = best < 0 ? 0 : best;
      p.distances[row] = best < 0 ? NAN : (p.cosine ? 1.f + key : sqrtf(key));
    }
  }
}

template <class T, int kD>
CudaStatus run(const NearestParams& p, cudaStream_t stream) {
  auto* kernel = &nearest_tc_kernel<T, kD>;
  constexpr int kSmem = smem_bytes<kD>();
  if (kSmem > 48 * 1024) {
    GENEXT_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  }
  const int64_t blocks = (p.N + kRows - 1) / kRows;
  kernel<<<static_cast<unsigned>(blocks), kWarps * 32, kSmem, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace

bool vq_nearest_tc_supported(const NearestParams& p) {
  return (p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16) && p.D <= 256 &&
         (p.cosine || (p.cb_sq_norm != nullptr && p.cb_sq_max != nullptr));
}

CudaStatus vq_nearest_tc(const NearestParams& p, cudaStream_t stream) {
  if (p.N == 0) return {};
  return dispatch_dtype(p.dtype, [&]<typename T>() -> CudaStatus {
    if constexpr (std::is_same_v<T, float>) {
      return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
    } else {
      if (p.D <= 32) return run<T, 32>(p, stream);
      if (p.D <= 64) return run<T, 64>(p, stream);
      if (p.D <= 128) return run<T, 128>(p, stream);
      return run<T, 256>(p, stream);
    }
  });
}

}  // namespace genext::vq
