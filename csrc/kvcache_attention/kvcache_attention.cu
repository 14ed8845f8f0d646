// attention_with_kvcache on CUDA: append kernel, split-KV attention kernel, split merge kernel.
//
// Decode reads every cached key and value once and does little arithmetic on them, so the kernels
// are written for memory throughput on CUDA cores: K/V tiles of 64 keys stream into shared memory
// with cp.async (double-buffered), each thread scores one key against the block's query rows, a
// warp per four rows runs the online softmax, and threads owning two output columns accumulate P V.
// Keys of a paged cache are located row by row through the block table; a block index outside the
// pool, or a position past the capacity, is never read or written (it counts as a masked key).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_dispatch.cuh"
#include "common/cuda_utils.cuh"
#include "common/head_dim.h"
#include "kvcache_attention/kvcache_attention.h"

namespace genext::kv {
namespace {

using genext::cuda::cp_async16_zfill;
using genext::cuda::cp_async_commit;
using genext::cuda::cp_async_wait_group;
using genext::cuda::kVec;
using genext::cuda::unpack16;
using genext::cuda::warp_max;
using genext::cuda::warp_sum;

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Element offset of key `pos` of sequence b, kv head hk, in a cache; -1 when the position is past
// the capacity or its block index lies outside the pool.
__device__ __forceinline__ int64_t cache_offset(const Params& p, const Strides& s, int b, int pos,
                                                int hk) {
  if (pos < 0 || pos >= p.capacity) return -1;
  if (p.block_table != nullptr) {
    const int blk = p.block_table[b * p.bt_stride + pos / p.block_size];
    if (blk < 0 || blk >= p.num_blocks) return -1;
    return blk * s.batch + static_cast<int64_t>(pos % p.block_size) * s.row + hk * s.head;
  }
  return b * s.batch + static_cast<int64_t>(pos) * s.row + hk * s.head;
}

// Writes k_new/v_new rows at positions seqlens[b] + i. One block per (i, kv head, sequence).
template <typename T>
__global__ void append_kernel(const Params p) {
  const int i = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int pos = p.seqlens[b] + i;
  const int64_t ko = cache_offset(p, p.skc, b, pos, hk);
  const int64_t vo = cache_offset(p, p.svc, b, pos, hk);
  const T* kn = static_cast<const T*>(p.k_new) + b * p.skn.batch + i * p.skn.row + hk * p.skn.head;
  const T* vn = static_cast<const T*>(p.v_new) + b * p.svn.batch + i * p.svn.row + hk * p.svn.head;
  for (int d = threadIdx.x; d < p.D; d += blockDim.x) {
    if (ko >= 0) static_cast<T*>(p.k_cache)[ko + d] = kn[d];
    if (vo >= 0) static_cast<T*>(p.v_cache)[vo + d] = vn[d];
  }
}

template <typename T, int kD>
struct SplitSmem {
  static constexpr int kPitch = kD + kVec<T>;  // row pitch = 16 mod 128 bytes: conflict-free rows
  static constexpr int kTileElems = kKeysPerTile * kPitch;
  // Two stages (the next tile loads while this one is used), one for fp32 at D > 128 so that
  // the block fits in shared memory.
  static constexpr int kStages = (sizeof(T) == 4 && kD > 128) ? 1 : 2;
  static constexpr int kBytes = 2 * kStages * kTileElems * static_cast<int>(sizeof(T))  // K, V
                                + kMaxRows * kD * 4                                     // q, scaled
                                + 2 * kMaxRows * kKeysPerTile * 4                       // scores, P
                                + 4 * kMaxRows * 4  // m, l, alpha, pad
                                + (kThreads / (kD / 2) > 1 ? kMaxRows * kD * 4 : 0);  // PV groups
};

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) split_kernel(const Params p) {
  using Sm = SplitSmem<T, kD>;
  constexpr int kPitch = Sm::kPitch, kV = kVec<T>;
  constexpr int kN = kKeysPerTile;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int kStages = Sm::kStages;
  T* sK = reinterpret_cast<T*>(smem_raw);                               // [kStages][kN][kPitch]
  T* sV = sK + kStages * Sm::kTileElems;                                // [kStages][kN][kPitch]
  float* sQ = reinterpret_cast<float*>(sV + kStages * Sm::kTileElems);  // [kMaxRows][kD]
  float* sS = sQ + kMaxRows * kD;   // [kMaxRows][kN] scores, then P
  float* sM = sS + kMaxRows * kN;   // running max per row (base 2)
  float* sL = sM + kMaxRows;        // running sum per row
  float* sA = sL + kMaxRows;        // this tile's rescale per row
  float* sRed = sA + 2 * kMaxRows;  // PV partials of key groups

  const int split = blockIdx.x, b = blockIdx.z;
  const int hk = blockIdx.y / p.row_chunks, rc = blockIdx.y % p.row_chunks;
  const int group = p.Hq / p.Hk;
  const int r0 = rc * kMaxRows;
  const int R = min(kMaxRows, group * p.Lq - r0);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int D = p.D;

  const int append = p.k_new != nullptr ? p.Lq : 0;
  const int len_k = min(p.seqlens[b] + append, p.capacity);
  const int k_begin = split * p.keys_per_split;
  const int k_end = min(len_k, k_begin + p.keys_per_split);

  // Row r of the block: query i = (r0 + r) % Lq of head hk * group + (r0 + r) / Lq.
  auto row_head = [&](int r) { return hk * group + (r0 + r) / p.Lq; };
  auto row_query = [&](int r) { return (r0 + r) % p.Lq; };
  auto part_index = [&](int r) {
    return ((static_cast<int64_t>(split) * p.B + b) * p.Hq + row_head(r)) * p.Lq + row_query(r);
  };

  if (k_begin >= k_end) {
    for (int r = tid; r < R; r += kThreads) p.part_lse[part_index(r)] = -INFINITY;
    return;
  }

  // Issues the cp.async copies of key tile t (keys k_begin + 64 t ...) into stage t % kStages.
  const int n_tiles = (k_end - k_begin + kN - 1) / kN;
  auto issue = [&](int t) {
    const int st = t % kStages;
    constexpr int kChunks = kD / kV;
    for (int c = tid; c < kN * kChunks; c += kThreads) {
      const int jj = c / kChunks, ch = c % kChunks;
      const int pos = k_begin + t * kN + jj;
      const bool in = pos < k_end && ch * kV < D;
      const int64_t ko = in ? cache_offset(p, p.skc, b, pos, hk) : -1;
      const int64_t vo = in ? cache_offset(p, p.svc, b, pos, hk) : -1;
      const T* kc = static_cast<const T*>(p.k_cache);
      const T* vc = static_cast<const T*>(p.v_cache);
      cp_async16_zfill(sK + st * Sm::kTileElems + jj * kPitch + ch * kV,
                       ko >= 0 ? kc + ko + ch * kV : kc, ko >= 0);
      cp_async16_zfill(sV + st * Sm::kTileElems + jj * kPitch + ch * kV,
                       vo >= 0 ? vc + vo + ch * kV : vc, vo >= 0);
    }
  };
  issue(0);
  cp_async_commit();  // tile 0 lands while q is staged below

  // q rows, scaled to base-2 logits; rows past R and columns past D are zero.
  const float qscale = p.scale * kLog2e;
  for (int e = tid; e < kMaxRows * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    float v = 0.f;
    if (r < R && d < D) {
      const T* qr = static_cast<const T*>(p.q) + b * p.sq.batch + row_query(r) * p.sq.row +
                    row_head(r) * p.sq.head;
      v = genext::cuda::to_float(qr[d]) * qscale;
    }
    sQ[e] = v;
  }
  if (tid < kMaxRows) {
    sM[tid] = -INFINITY;
    sL[tid] = 0.f;
  }

  // PV ownership: two output columns, one group of keys per thread.
  constexpr int kPairs = kD / 2;
  constexpr int kGroups = kThreads / kPairs > 0 ? kThreads / kPairs : 1;
  constexpr int kKeysPerGroup = kN / kGroups;
  const int pair = tid % kPairs, kgroup = tid / kPairs;  // kgroup >= kGroups: idle in PV
  float acc[kMaxRows][2];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r][0] = acc[r][1] = 0.f;

  // Score ownership: key jj, rows rpar, rpar + 2, ...
  const int jj = tid % kN, rpar = tid / kN;
  constexpr int kRowsPerThread = kMaxRows * kN / kThreads;  // 8

  for (int t = 0; t < n_tiles; ++t) {
    const int st = t % kStages;
    cp_async_wait_group<0>();
    __syncthreads();  // tile t visible; every thread is done with tile t - 1 (its stage and P)
    if (kStages == 2 && t + 1 < n_tiles) {
      issue(t + 1);  // into tile t - 1's stage, overlapping tile t's work
      cp_async_commit();
    }

    // Scores of key jj against this thread's rows.
    {
      const T* krow = sK + st * Sm::kTileElems + jj * kPitch;
      float s[kRowsPerThread];
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) s[k] = 0.f;
      for (int ch = 0; ch * kV < D; ++ch) {
        float kf[kV];
        unpack16<T>(*reinterpret_cast<const uint4*>(krow + ch * kV), kf);
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k) {
          const int r = rpar + 2 * k;
          if (r < R) {
            const float* qr = sQ + r * kD + ch * kV;
#pragma unroll
            for (int e = 0; e < kV; ++e) s[k] = fmaf(qr[e], kf[e], s[k]);
          }
        }
      }
      const int pos = k_begin + t * kN + jj;
      const bool key_ok = pos < k_end && cache_offset(p, p.skc, b, pos, hk) >= 0 &&
                          cache_offset(p, p.svc, b, pos, hk) >= 0;
#pragma unroll
      for (int k = 0; k < kRowsPerThread; ++k) {
        const int r = rpar + 2 * k;
        bool ok = key_ok && r < R;
        if (ok && p.causal) ok = pos <= len_k - p.Lq + row_query(r);
        sS[r * kN + jj] = ok ? s[k] : -INFINITY;
      }
    }
    __syncthreads();

    // Online softmax: warp w owns rows 4w .. 4w + 3; lanes cover the 64 keys in two halves.
#pragma unroll
    for (int k = 0; k < kMaxRows / 4; ++k) {
      const int r = warp * (kMaxRows / 4) + k;
      float* srow = sS + r * kN;
      const float a = srow[lane], c = srow[lane + 32];
      const float mx = warp_max(fmaxf(a, c));
      const float m_old = sM[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float pa = exp2f(a - m_use), pc = exp2f(c - m_use);
      const float sum = warp_sum(pa + pc);
      srow[lane] = pa;
      srow[lane + 32] = pc;
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp2f(m_old - m_use);  // m_old = -inf -> 0
        sA[r] = alpha;
        sL[r] = sL[r] * alpha + sum;
        sM[r] = m_new;
      }
    }
    __syncthreads();

    // O += P V over this thread's keys and columns.
    if (kgroup < kGroups) {
      const int col = 2 * pair;
#pragma unroll
      for (int r = 0; r < kMaxRows; ++r) {
        const float alpha = sA[r];
        acc[r][0] *= alpha;
        acc[r][1] *= alpha;
      }
      if (col < D) {
        const T* vt = sV + st * Sm::kTileElems + col;
        for (int j = kgroup * kKeysPerGroup; j < (kgroup + 1) * kKeysPerGroup; ++j) {
          const float v0 = genext::cuda::to_float(vt[j * kPitch]);
          const float v1 = genext::cuda::to_float(vt[j * kPitch + 1]);
#pragma unroll
          for (int r = 0; r < kMaxRows; ++r) {
            if (r < R) {
              const float pr = sS[r * kN + j];
              acc[r][0] = fmaf(pr, v0, acc[r][0]);
              acc[r][1] = fmaf(pr, v1, acc[r][1]);
            }
          }
        }
      }
    }
    if (kStages == 1 && t + 1 < n_tiles) {
      __syncthreads();  // the only stage is free once every thread is done with it
      issue(t + 1);
      cp_async_commit();
    }
  }
  __syncthreads();

  // Merge the key groups' partial sums (group 0 keeps the total), normalise, write the split.
  if constexpr (kGroups > 1) {
    for (int g = 1; g < kGroups; ++g) {
      if (kgroup == g) {
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          sRed[(r * kPairs + pair) * 2] = acc[r][0];
          sRed[(r * kPairs + pair) * 2 + 1] = acc[r][1];
        }
      }
      __syncthreads();
      if (kgroup == 0) {
#pragma unroll
        for (int r = 0; r < kMaxRows; ++r) {
          acc[r][0] += sRed[(r * kPairs + pair) * 2];
          acc[r][1] += sRed[(r * kPairs + pair) * 2 + 1];
        }
      }
      __syncthreads();
    }
  }
  if (kgroup == 0) {
    const int col = 2 * pair;
    for (int r = 0; r < R; ++r) {
      const float l = sL[r];
      // l == 0: no visible key, or every score -inf; a NaN score left l NaN: out and lse NaN
      const float inv = l == 0.f ? 0.f : 1.f / l;
      float* o = p.part_o + part_index(r) * D;
      if (col < D) {
        o[col] = acc[r][0] * inv;
        o[col + 1] = acc[r][1] * inv;
      }
    }
  }
  for (int r = tid; r < R; r += kThreads) {
    const float l = sL[r];
    p.part_lse[part_index(r)] = l == 0.f ? -INFINITY : sM[r] + __log2f(l);
  }
}

// Merges the splits of one (sequence, head, query) row per warp.
template <typename T>
__global__ void merge_kernel(const Params p) {
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  // fmaxf skips a NaN split lse; that split then makes total, out and lse NaN below
  float mx = -INFINITY;
  bool seen = false;  // some split saw a key (finite or NaN lse)
  for (int s = 0; s < p.num_splits; ++s) {
    const float l = p.part_lse[s * rows + row];
    mx = fmaxf(mx, l);
    seen |= l != -INFINITY;
  }
  // row = (b * Hq + h) * Lq + i; out is (B, Lq, Hq, D)
  const int i = static_cast<int>(row % p.Lq);
  const int64_t bh = row / p.Lq;
  const int h = static_cast<int>(bh % p.Hq);
  const int64_t b = bh / p.Hq;
  T* out = static_cast<T*>(p.out) + ((b * p.Lq + i) * p.Hq + h) * p.D;
  if (!seen) {
    for (int d = lane; d < p.D; d += 32) out[d] = genext::cuda::from_float<T>(0.f);
    if (lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float l = p.part_lse[s * rows + row];
    if (l != -INFINITY) total += exp2f(l - mx);
  }
  for (int d = lane; d < p.D; d += 32) {
    float v = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float l = p.part_lse[s * rows + row];
      if (l != -INFINITY) v += exp2f(l - mx) * p.part_o[(s * rows + row) * p.D + d];
    }
    out[d] = genext::cuda::from_float<T>(v / total);
  }
  if (lane == 0) p.lse[row] = (mx + __log2f(total)) * kLn2;
}

template <typename T, int kD>
CudaStatus run(const Params& p, cudaStream_t stream) {
  if (p.k_new != nullptr && p.Lq > 0) {
    append_kernel<T><<<dim3(p.Lq, p.Hk, p.B), 64, 0, stream>>>(p);
    GENEXT_LAUNCH_CHECK();
  }
  using Sm = SplitSmem<T, kD>;
  auto* kern = &split_kernel<T, kD>;
  if (Sm::kBytes > 48 * 1024) {
    GENEXT_CUDA_TRY(
        cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, Sm::kBytes));
  }
  const dim3 grid(p.num_splits, p.Hk * p.row_chunks, p.B);
  kern<<<grid, kThreads, Sm::kBytes, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Lq;
  merge_kernel<T><<<static_cast<unsigned>((rows + 3) / 4), 128, 0, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

template <typename T>
CudaStatus run_dtype(const Params& p, cudaStream_t stream) {
  if (p.D <= 64) return run<T, 64>(p, stream);
  if (p.D <= 128) return run<T, 128>(p, stream);
  if (p.D <= kCudaMaxHeadDim) return run<T, kCudaMaxHeadDim>(p, stream);
  return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
}

}  // namespace

void plan_splits(Params& p, int num_sms) {
  const int group = p.Hk > 0 ? p.Hq / p.Hk : 1;
  p.row_chunks = std::max(1, (group * p.Lq + kMaxRows - 1) / kMaxRows);
  const int64_t base_blocks = static_cast<int64_t>(p.B) * p.Hk * p.row_chunks;
  // Enough blocks for about four per SM, each split at least four tiles of keys.
  const int64_t want =
      std::max<int64_t>(1, (4LL * std::max(num_sms, 1) + base_blocks - 1) / base_blocks);
  const int64_t max_by_len = std::max<int64_t>(1, p.capacity / (4 * kKeysPerTile));
  const int splits = static_cast<int>(std::min<int64_t>({want, max_by_len, 128}));
  const int64_t per = (static_cast<int64_t>(p.capacity) + splits - 1) / splits;
  p.keys_per_split = static_cast<int>(
      std::max<int64_t>(kKeysPerTile, (per + kKeysPerTile - 1) / kKeysPerTile * kKeysPerTile));
  p.num_splits =
      std::max(1, static_cast<int>((p.capacity + p.keys_per_split - 1) / p.keys_per_split));
}

CudaStatus kvcache_attention(const Params& p, cudaStream_t stream) {
  if (p.B == 0 || p.Lq == 0 || p.Hq == 0) return {};
  return dispatch_dtype(p.dtype, [&]<typename T>() { return run_dtype<T>(p, stream); });
}

}  // namespace genext::kv
