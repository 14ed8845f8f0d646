// Small device helpers shared by genext's CUDA kernels: the launch checks (common/cuda_status.h),
// warp/block sums, a Welford step, fp32/fp16/bf16 conversions, 16-byte vector loads/stores
// (4 floats or 8 halfs) and a loop that issues several independent loads before using them. No
// torch header.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_status.h"

namespace genext::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ __forceinline__ constexpr int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
__host__ __device__ __forceinline__ constexpr int64_t max64(int64_t a, int64_t b) {
  return a > b ? a : b;
}

// ---- division by a run-time invariant -----------------------------------------------------------

// n / d for 64-bit unsigned n by a divisor fixed on the host, with a multiply-high instead of the
// 64-bit division subroutine (Granlund & Montgomery 1994, "Division by invariant integers using
// multiplication", figure 4.1): m = floor(2^64 (2^l - d) / d) + 1, l = ceil(log2 d),
// q = (t + ((n - t) >> min(l, 1))) >> max(l - 1, 0), t = mulhi(m, n). Exact for all n < 2^64.
struct FastDiv {
  uint64_t d = 1, m = 1;
  int s1 = 0, s2 = 0;
  FastDiv() = default;
  __host__ explicit FastDiv(uint64_t divisor) : d(divisor < 1 ? 1 : divisor) {
    int l = 0;
    while (l < 64 && (uint64_t{1} << l) < d) ++l;
    const unsigned __int128 two_l = static_cast<unsigned __int128>(1) << l;
    m = static_cast<uint64_t>(((two_l - d) << 64) / d + 1);
    s1 = l < 1 ? l : 1;
    s2 = l > 1 ? l - 1 : 0;
  }
  __device__ __forceinline__ int64_t div(int64_t n) const {
    const uint64_t un = static_cast<uint64_t>(n);
    const uint64_t t = __umul64hi(m, un);
    return static_cast<int64_t>((t + ((un - t) >> s1)) >> s2);
  }
  __device__ __forceinline__ int64_t value() const { return static_cast<int64_t>(d); }
};

// ---- reductions ---------------------------------------------------------------------------------

// Sum (max) of v over the 32 lanes of a full warp, by butterfly shuffles: every lane gets the
// result, the same bits on every lane.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// Sums a and b over the block (blockDim.x a multiple of 32, all threads must call it); every thread
// gets the totals. Fixed order, so deterministic. scratch: 64 entries of shared memory. Safe to
// call repeatedly with the same scratch (it synchronises before writing).
template <typename T>
__device__ __forceinline__ void block_sum2(T& a, T& b, T* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = a;
    scratch[32 + warp] = b;
  }
  __syncthreads();
  a = lane < nwarps ? scratch[lane] : T(0);
  b = lane < nwarps ? scratch[32 + lane] : T(0);
  a = warp_sum(a);
  b = warp_sum(b);
}

// ---- running statistics -------------------------------------------------------------------------

// 1/x from one approximate-reciprocal instruction (rcp.approx, within 1 ulp; same bits every
// run) on the GPU; the exact quotient elsewhere. For Welford weights 1/k, where 1 ulp does not
// matter.
__device__ __forceinline__ float rcp_approx(float x) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else
  return 1.f / x;
#endif
}

// One Welford step (Welford 1962): d is the new element minus a fixed shift, w = 1/k with k the
// count including it; m is the running mean of the shifted elements and q their sum of squared
// deviations from it (M2). No cancellation: q only grows, by (d - m_old) * (d - m_new) >= 0.
// Keep runs short (GroupNorm folds every 128 steps) and fold them into wider accumulators: with a
// shift D away from the data (D >> sigma), m sits near -D and its updates, ~sigma / k, fall below
// half an ulp of D once k exceeds ~2 sigma / (2^-24 D) and are rounded away; and the fp32 M2's
// error grows with k.
__device__ __forceinline__ void welford_step(float d, float w, float& m, float& q) {
  const float e = d - m;
  m = fmaf(e, w, m);
  q = fmaf(e, d - m, q);
}

// ---- conversions --------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- 16-byte vectors ----------------------------------------------------------------------------

template <typename T>
inline constexpr int kVec = static_cast<int>(16 / sizeof(T));  // elements per 16 bytes

__device__ __forceinline__ uint4 ld_vec(const void* p) {
  return __ldg(static_cast<const uint4*>(p));
}
// Last use of the data: streaming (evict-first) load.
__device__ __forceinline__ uint4 ld_vec_cs(const void* p) {
  return __ldcs(static_cast<const uint4*>(p));
}
__device__ __forceinline__ void st_vec(void* p, const uint4& v) { *static_cast<uint4*>(p) = v; }
__device__ __forceinline__ void st_vec_cs(void* p, const uint4& v) {
  __stcs(static_cast<uint4*>(p), v);
}

template <typename T>
__device__ __forceinline__ void unpack16(const uint4& r, float (&f)[kVec<T>]) {
  if constexpr (std::is_same_v<T, float>) {
    f[0] = __uint_as_float(r.x);
    f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z);
    f[3] = __uint_as_float(r.w);
  } else if constexpr (std::is_same_v<T, __half>) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "unsupported element type");
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack16(const float (&f)[kVec<T>]) {
  uint4 r;
  if constexpr (std::is_same_v<T, float>) {
    r.x = __float_as_uint(f[0]);
    r.y = __float_as_uint(f[1]);
    r.z = __float_as_uint(f[2]);
    r.w = __float_as_uint(f[3]);
  } else if constexpr (std::is_same_v<T, __half>) {
    __half2* h = reinterpret_cast<__half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>, "unsupported element type");
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  }
  return r;
}

// V elements as one register item: V == kVec<T> is a 16-byte vector, V == 1 a scalar.
template <typename T, int V>
using RawT = std::conditional_t<V == 1, T, uint4>;

template <typename T, int V, bool kStream>
__device__ __forceinline__ RawT<T, V> ld_raw(const T* p) {
  static_assert(V == 1 || V == kVec<T>, "V must be 1 or 16 bytes' worth");
  if constexpr (V == 1) {
    return *p;
  } else if constexpr (kStream) {
    return ld_vec_cs(p);
  } else {
    return ld_vec(p);
  }
}

template <typename T, int V, bool kStream>
__device__ __forceinline__ void st_raw(T* p, const RawT<T, V>& r) {
  if constexpr (V == 1) {
    *p = r;
  } else if constexpr (kStream) {
    st_vec_cs(p, r);
  } else {
    st_vec(p, r);
  }
}

template <typename T, int V>
__device__ __forceinline__ void unpack_raw(const RawT<T, V>& r, float (&f)[V]) {
  if constexpr (V == 1) {
    f[0] = to_float(r);
  } else {
    unpack16<T>(r, f);
  }
}

template <typename T, int V>
__device__ __forceinline__ RawT<T, V> pack_raw(const float (&f)[V]) {
  if constexpr (V == 1) {
    return from_float<T>(f[0]);
  } else {
    return pack16<T>(f);
  }
}

// for (i = start; i < end; i += step) proc(i, load(i)), with the loads issued U at a time before
// any of them is used (memory-level parallelism). proc sees the indices in increasing order.
template <int U, typename LoadF, typename ProcF>
__device__ __forceinline__ void batched_loop(int64_t i, int64_t end, int64_t step, LoadF&& load,
                                             ProcF&& proc) {
  using R = decltype(load(i));
  for (; i + (U - 1) * step < end; i += U * step) {
    R r[U];
#pragma unroll
    for (int k = 0; k < U; ++k) r[k] = load(i + k * step);
#pragma unroll
    for (int k = 0; k < U; ++k) proc(i + k * step, r[k]);
  }
#pragma unroll 1
  for (; i < end; i += step) {
    const R r = load(i);
    proc(i, r);
  }
}

// ---- asynchronous global -> shared copies (sm_80+; plain copies before) -------------------------
// On sm_80+ each copy lands some time before a wait that covers it (cp_async_wait_all, or
// cp_async_wait_group<N>: all but the N most recent committed groups); before sm_80 and on the
// host they are plain copies. Under the CPU emulation (tests/cuda_emu) they go to its model of
// asynchronous copies, which lands them at such a wait in some blocks and at once in others (the
// two ends of what a GPU may do).

// 16 bytes from gmem to smem.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
#elif defined(GENEXT_CUDA_EMULATION)
  ::emu::cp_async(smem, gmem, 16);
#else
  *static_cast<uint4*>(smem) = *static_cast<const uint4*>(gmem);
#endif
}

// 16 bytes from gmem to smem when `valid`, else 16 zero bytes (gmem is then not read).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
#elif defined(GENEXT_CUDA_EMULATION)
  ::emu::cp_async(smem, gmem, valid ? 16 : 0);
#else
  *static_cast<uint4*>(smem) = valid ? *static_cast<const uint4*>(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

// Closes the group of the copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#elif defined(GENEXT_CUDA_EMULATION)
  ::emu::cp_async_commit();
#endif
}

// Waits for the calling thread's committed groups but the N most recent.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#elif defined(GENEXT_CUDA_EMULATION)
  ::emu::cp_async_wait(N);
#endif
}

// Waits for every copy the calling thread issued.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#elif defined(GENEXT_CUDA_EMULATION)
  ::emu::cp_async_wait(-1);
#endif
}

}  // namespace genext::cuda
