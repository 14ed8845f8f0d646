// Warp-wide tensor-core building blocks for sm_80+ (mma.sync m16n8k16 with fp32 accumulation,
// ldmatrix fragment loads from shared memory) and the fragment loaders the kernels share. Under
// the CPU emulation (tests/cuda_emu, GENEXT_CUDA_EMULATION) the two warp-wide operations go to its
// models of them. No torch header.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4):
//   A (16x16, row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..),
//                         a3 = (g+8, 2t+8..)
//   B (16x8, "col"):      b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8, fp32):       c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
// The loaders read row-major shared-memory tiles of 16-bit values whose row pitch (in elements) is
// given; rows must start 16-byte aligned.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace genext::cuda {

// Four 8x8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8
// (16-byte aligned). Plain: lane l receives elements (l / 4, 2 (l % 4) .. +1) of each matrix;
// .trans: elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4). Under the CPU emulation
// (tests/cuda_emu) both go to its model of the warp-wide load.
__device__ __forceinline__ void ldsm_x4(const void* row, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                        uint32_t& r3) {
#if defined(GENEXT_CUDA_EMULATION)
  ::emu::ldmatrix_x4(row, /*trans=*/false, r0, r1, r2, r3);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(const void* row, uint32_t& r0, uint32_t& r1,
                                              uint32_t& r2, uint32_t& r3) {
#if defined(GENEXT_CUDA_EMULATION)
  ::emu::ldmatrix_x4(row, /*trans=*/true, r0, r1, r2, r3);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
#endif
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(GENEXT_CUDA_EMULATION)
  ::emu::mma16816<std::is_same_v<T, __nv_bfloat16>>(c, a, b0, b1);
#else
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
#endif
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
  ldsm_x4(p, a[0], a[1], a[2], a[3]);
}

// B fragments for two n-tiles (n0..n0+7, n0+8..n0+15) over k = c0..c0+15, where the smem tile
// holds B transposed: row = n, column = k (e.g. K for S = Q K^T). b[0],b[1]: n-tile 0; b[2],b[3]:
// n-tile 1.
template <typename T>
__device__ __forceinline__ void load_b_nk(const T* tile, int pitch, int n0, int c0, int lane,
                                          uint32_t (&b)[4]) {
  const T* p = tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * pitch + c0 + ((lane >> 3) & 1) * 8;
  ldsm_x4(p, b[0], b[1], b[2], b[3]);
}

// B fragments for two n-tiles (columns n0..n0+15) over k = r0..r0+15, where the smem tile holds B
// as is: row = k, column = n (e.g. V for O = P V).
template <typename T>
__device__ __forceinline__ void load_b_kn(const T* tile, int pitch, int r0, int n0, int lane,
                                          uint32_t (&b)[4]) {
  const T* p = tile + (r0 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch + n0 + (lane >> 4) * 8;
  ldsm_x4_trans(p, b[0], b[1], b[2], b[3]);
}

// A fragments of a 16x16 tile of A = (rows r0.., columns c0..) from a smem tile that holds A
// transposed: smem row = A's column, smem column = A's row (e.g. dS from dS^T).
template <typename T>
__device__ __forceinline__ void load_a_trans(const T* tile, int pitch, int r0, int c0, int lane,
                                             uint32_t (&a)[4]) {
  const T* p = tile + (c0 + (lane & 7) + ((lane >> 4) << 3)) * pitch + r0 + ((lane >> 3) & 1) * 8;
  ldsm_x4_trans(p, a[0], a[1], a[2], a[3]);
}

}  // namespace genext::cuda
