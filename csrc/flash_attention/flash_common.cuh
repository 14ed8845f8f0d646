// Device building blocks of the flash-attention kernels: the tensor-core fragment operations
// (common/warp_mma.cuh), cp.async tile loads with zero fill, and per-sequence lengths. No torch
// header. Shared-memory tiles are row-major with a row pitch of kD + 8 elements, so the eight
// 16-byte rows one ldmatrix phase reads fall in distinct bank groups (pitch = 16 mod 128 bytes,
// or 80 for odd multiples of 32 elements: both conflict-free).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/warp_mma.cuh"
#include "flash_attention/flash_attention.h"

namespace genext::fa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using cuda::ldsm_x4;
using cuda::ldsm_x4_trans;
using cuda::load_a;
using cuda::load_a_trans;
using cuda::load_b_kn;
using cuda::load_b_nk;
using cuda::mma16816;
using cuda::pack2;

using cuda::cp_async_commit;
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  cuda::cp_async_wait_group<N>();
}

// Copies rows [0, rows) of a (rows x kD) tile into smem (pitch kD + 8), zero-filling rows at or
// past `valid_rows` and columns at or past D. gmem row r is at base + r * row_stride.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* base, int64_t row_stride,
                                          int valid_rows, int D) {
  constexpr int kChunks = kD / 8;  // 16-byte chunks per row
  constexpr int kPitch = kD + 8;
  constexpr int kIters = (kRows * kChunks + kThreads - 1) / kThreads;
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int i = it * kThreads + static_cast<int>(threadIdx.x);
    if ((kRows * kChunks) % kThreads != 0 && i >= kRows * kChunks) break;
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < valid_rows && c * 8 < D;
    const T* src = ok ? base + r * row_stride + c * 8 : base;
    cuda::cp_async16_zfill(smem + r * kPitch + c * 8, src, ok);
  }
}

// Lengths and base offsets of one sequence.
struct Seq {
  int len_q = 0, len_k = 0;
  int64_t q_row0 = 0, k_row0 = 0;  // first row of the sequence in the packed (varlen) tensors
  int64_t b = 0;                   // batch index into the tensors' batch dim (0 when varlen)
};

__device__ __forceinline__ Seq seq_info(const FwdParams& p, int s) {
  Seq r;
  if (p.cu_q != nullptr) {
    const int q0 = p.cu_q[s], k0 = p.cu_k[s];
    r.q_row0 = q0;
    r.k_row0 = k0;
    r.len_q = p.cu_q[s + 1] - q0;
    r.len_k = p.cu_k[s + 1] - k0;
    r.b = 0;
  } else {
    r.len_q = p.Lq;
    r.len_k = p.Lk;
    r.b = s;
  }
  if (p.seqused_k != nullptr) r.len_k = min(r.len_k, p.seqused_k[s]);
  return r;
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const Strides& st, const Seq& s,
                                            int64_t row0, int head) {
  return static_cast<const T*>(base) + s.b * st.batch + row0 * st.row + head * st.head;
}

}  // namespace genext::fa
