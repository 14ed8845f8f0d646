// bfloat16 x bfloat16 -> float32 matrix products on the CPU, through MKL's
// cblas_gemm_bf16bf16f32 (exported by torch's libtorch_cpu.so where torch is built with MKL): its
// kernels run on the AMX tiles (Sapphire Rapids on) with float accumulation. A product of two
// bfloat16 values is exact in float, so a score tile carries the float rounding of its sums, as
// one from the widened features on sgemm does, with one difference at the edge of the range:
// bfloat16 subnormal inputs (below 1.2e-38) and subnormal products count as zero. Several times
// faster than sgemm here. Used only where the CPU has AMX-BF16 and the OS lets this process use
// the tiles (measured there; where the permission is refused MKL falls back to slower kernels),
// and only after a small product checked its result; elsewhere (builds without MKL, CPUs without
// AMX, where MKL's bfloat16 path was not measured) the callers use sgemm on the widened features.
#pragma once
#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace genext::contrastive::cpu {

namespace bf16_gemm_detail {

// CBLAS constants (mkl_cblas.h; the values are fixed by the CBLAS standard).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// cblas_gemm_bf16bf16f32 with MKL's LP64 integers, as torch links it.
using Fn = void (*)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                    const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                    int ldc);

// C = A B^T for a 2 x 3 A and a 2 x 3 B with strided rows: whether the entry point computes what
// an LP64 CBLAS call asks (an ILP64 interface would misread the integer arguments).
inline bool answers_right(Fn fn) {
  const auto bf = [](float x) {  // small whole numbers: exact in bfloat16
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return uint16_t(u >> 16);
  };
  const uint16_t a[2][4] = {{bf(1), bf(2), bf(3), 0}, {bf(4), bf(5), bf(6), 0}};
  const uint16_t b[2][4] = {{bf(1), bf(0), bf(2), 0}, {bf(3), bf(1), bf(1), 0}};
  float c[2][3] = {{-1, -1, -1}, {-1, -1, -1}};
  fn(kRowMajor, kNoTrans, kTrans, 2, 2, 3, 1.0f, &a[0][0], 4, &b[0][0], 4, 0.0f, &c[0][0], 3);
  return c[0][0] == 7 && c[0][1] == 8 && c[1][0] == 16 && c[1][1] == 23 && c[0][2] == -1;
}

// The entry point in torch's libtorch_cpu.so (no other library's: an MKL loaded beside torch may
// have another integer interface), or nullptr.
inline Fn lookup() {
  static const Fn fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) return Fn(nullptr);
    const Fn f = reinterpret_cast<Fn>(dlsym(lib, "cblas_gemm_bf16bf16f32"));
    return f != nullptr && answers_right(f) ? f : Fn(nullptr);
  }();
  return fn;
}

// CPUID leaf 7: EDX bit 22 is AMX-BF16; XCR0 bits 17 and 18 say the OS manages the tile state,
// and on Linux the process asks for it (ARCH_REQ_XCOMP_PERM for XTILEDATA, as oneDNN does; MKL
// asks too, and falls back to slower kernels when refused).
inline bool amx_bf16_usable() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1u)) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if ((lo & (3u << 17)) != (3u << 17)) return false;
#if defined(__linux__)
  constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
#else
  return true;
#endif
#else
  return false;
#endif
}

inline bool supported() {
  static const bool ok = amx_bf16_usable() && lookup() != nullptr;
  return ok;
}

inline std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on{supported()};
  return on;
}

}  // namespace bf16_gemm_detail

// Whether this process can use the bfloat16 products (AMX-BF16 usable, MKL's entry point found
// in torch and checked).
inline bool bf16_gemm_supported() { return bf16_gemm_detail::supported(); }
// Whether the kernels use them now (tests switch them off to check the widened path here too;
// each op reads it once, into Args).
inline bool bf16_gemm_enabled() {
  return bf16_gemm_detail::enabled_flag().load(std::memory_order_relaxed);
}
inline void set_bf16_gemm_enabled(bool on) {
  bf16_gemm_detail::enabled_flag().store(on && bf16_gemm_supported(), std::memory_order_relaxed);
}

// C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C, row-major, op(X) = X or X^T; A, B
// bfloat16 bit patterns. Only when bf16_gemm_enabled(), with every size and stride below 2^31.
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
