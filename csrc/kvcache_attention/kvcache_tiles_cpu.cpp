// The float32 tile routines of kvcache_tiles_cpu.h, compiled once per ISA level, and the float16
// widening (F16C where the CPU has it).
#include "kvcache_attention/kvcache_tiles_cpu.h"

#include <c10/util/Half.h>

#if GENEXT_CPU_LEVELS
#include <immintrin.h>
#endif

namespace genext::kv {

GENEXT_CPU_CLONES void scores_f32(const float* Q, int64_t ldq, int64_t nr,
                                  const float* const* krows, int64_t nc, int64_t D, float* S) {
  tiles::scores_f32(Q, ldq, nr, krows, nc, D, S);
}

GENEXT_CPU_CLONES void accum_f32(float* O, int64_t ldo, int64_t nr, const float* P,
                                 const float* const* vrows, int64_t nc, int64_t D,
                                 const float* alpha) {
  tiles::accum_f32(O, ldo, nr, P, vrows, nc, D, alpha);
}

GENEXT_CPU_CLONES void widen_bf16(const uint16_t* src, float* dst, int64_t n) {
  tiles::widen_bf16(src, dst, n);
}

// F16C's conversion eight elements at a time; GCC converts float16 vectors of generic code element
// by element, even in an AVX-512 clone.
#if GENEXT_CPU_LEVELS
__attribute__((target("avx2,f16c"))) static void widen_f16_f16c(const uint16_t* __restrict__ src,
                                                                float* __restrict__ dst,
                                                                int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}
#endif

bool f16c_enabled() {
#if GENEXT_CPU_LEVELS
  // every x86-64-v3 CPU has F16C, but a virtual machine may hide it; the level cap lets tests run
  // c10's conversion
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c") != 0;
  }();
  return has && simd::cpu_level() >= 3;
#else
  return false;
#endif
}

void widen_f16(const uint16_t* src, float* dst, int64_t n, bool f16c) {
#if GENEXT_CPU_LEVELS
  if (f16c) return widen_f16_f16c(src, dst, n);
#else
  (void)f16c;
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = float(c10::Half(src[i], c10::Half::from_bits()));
}

GENEXT_CPU_CLONES void softmax_f32(float* S, int64_t nr, const int32_t* nvis, float* m, float* l,
                                   float* alpha) {
  tiles::softmax_f32(S, nr, nvis, m, l, alpha);
}

}  // namespace genext::kv
