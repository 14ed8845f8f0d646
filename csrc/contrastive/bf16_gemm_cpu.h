// bfloat16 x bfloat16 -> float32 matrix products on the CPU, through MKL's
// cblas_gemm_bf16bf16f32 (exported by torch's libtorch_cpu.so where torch is built with MKL): its
// kernels run on the AMX tiles (Sapphire Rapids on), products of bfloat16 values exact in float
// and float accumulation, so a score tile is as exact as one from the widened features on sgemm
// and several times faster. Used only where the CPU has AMX-BF16 (measured there); elsewhere
// (builds without MKL, CPUs without AMX, where MKL's bfloat16 path was not measured) the callers
// use sgemm on the widened features.
#pragma once
#include <dlfcn.h>

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace genext::contrastive::cpu {

namespace bf16_gemm_detail {

// CBLAS constants (mkl_cblas.h; the values are fixed by the CBLAS standard).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// cblas_gemm_bf16bf16f32 with MKL's LP64 integers, as torch links it.
using Fn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                    const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                    int ldc);

inline Fn lookup() {
  static const Fn fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return reinterpret_cast<Fn>(
        dlsym(lib != nullptr ? lib : RTLD_DEFAULT, "cblas_gemm_bf16bf16f32"));
  }();
  return fn;
}

// CPUID leaf 7: EDX bit 22 is AMX-BF16 (whether the OS grants the tile state is MKL's affair: it
// falls back to other kernels where it is not granted).
inline bool cpu_has_amx_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22) & 1u;
#else
  return false;
#endif
}

inline std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on{lookup() != nullptr && cpu_has_amx_bf16()};
  return on;
}

}  // namespace bf16_gemm_detail

// Whether this process can use the bfloat16 products (MKL's entry point found, AMX-BF16).
inline bool bf16_gemm_supported() {
  return bf16_gemm_detail::lookup() != nullptr && bf16_gemm_detail::cpu_has_amx_bf16();
}
// Whether the kernels use them now (tests switch them off to check the widened path here too).
inline bool bf16_gemm_enabled() {
  return bf16_gemm_detail::enabled_flag().load(std::memory_order_relaxed);
}
inline void set_bf16_gemm_enabled(bool on) {
  bf16_gemm_detail::enabled_flag().store(on && bf16_gemm_supported(), std::memory_order_relaxed);
}

// C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C, row-major, op(X) = X or X^T; A, B
// bfloat16 bit patterns. Only when bf16_gemm_enabled().
inline void gemm_bf16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const uint16_t* a, int64_t lda, const uint16_t* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  using namespace bf16_gemm_detail;
  lookup()(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, int(m), int(n),
           int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

// dst[i] = src[i] rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), for i < n: the
// backward's weights before their products (bf16_gemm_cpu.cpp, one version per ISA level).
void round_to_bf16(const float* src, uint16_t* dst, int64_t n);

}  // namespace genext::contrastive::cpu
