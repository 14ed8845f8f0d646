// Device building blocks of the flash-attention kernels: tensor-core mma.sync (m16n8k16, fp32
// accumulate), ldmatrix fragment loads, cp.async tile loads with zero fill, and per-sequence
// lengths. No torch header.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                         a3 = (g+8, 2t+8..)
//   B (16x8, "col"):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8, fp32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// Shared-memory tiles are row-major with a row pitch of kD + 8 elements, so the eight 16-byte rows
// one ldmatrix phase reads fall in distinct bank groups (pitch = 16 mod 128 bytes, or 80 for
// odd multiples of 32 elements: both conflict-free).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "flash_attention/flash_attention.h"

namespace genext::fa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldsm_x4(unsigned addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                        uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned addr, uint32_t& r0, uint32_t& r1,
                                              uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "mma16816: fp16 or bf16");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one register of two 16-bit values (lo = x).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<const uint32_t*>(&h);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// A fragment of a 16x16 tile at (r0, c0) of a row-major smem tile with pitch `pitch` elements.
template <typename T>
__device__ __forceinline__ void load_a(const T* tile, int pitch, int r0, int c0, int lane,
                                       uint32_t (&a)[4]) {
  const T* p = tile + (r0 + (lane & 15)) * pitch + c0 + (lane >> 4) * 8;
  ldsm_x4(smem_addr(p), a[0], a[1], a[2], a[3]);
}

// B fragments for two n-tiles (n0..n0+7, n0+8..n0+15) over k = c0..c0+15, where the smem tile
// holds B transposed: row = n, column = k (e.g. K for S = Q K^T). b[0],b[1]: n-tile 0; b[2],b[3]:
// n-tile 1.
template <typename T>
__device__ __forceinline__ void load_b_nk(const T* tile, int pitch, int n0, int c0, int lane,
                                          uint32_t (&b)[4]) {
  const T* p = tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * pitch + c0 + ((lane >> 3) & 1) * 8;
  ldsm_x4(smem_addr(p), b[0], b[1], b[2], b[3]);
}

// B fragments for two n-tiles (columns n0..n0+15) over k = r0..r0+15, where the smem tile holds B
// as is: row = k, column = n (e.g. V for O = P V).
template <typename T>
__device__ __forceinline__ void load_b_kn(const T* tile, int pitch, int r0, int n0, int lane,
                                          uint32_t (&b)[4]) {
  const T* p = tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + n0 + (lane >> 4) * 8;
  ldsm_x4_trans(smem_addr(p), b[0], b[1], b[2], b[3]);
}

// 16-byte global -> shared copy; src_bytes == 0 writes zeros (gmem must still be a valid address).
__device__ __forceinline__ void cp_async_zfill(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
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
    cp_async_zfill(smem + r * kPitch + c * 8, src, ok);
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
