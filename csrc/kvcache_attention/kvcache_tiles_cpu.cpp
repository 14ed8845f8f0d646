// The float32 tile routines of kvcache_tiles_cpu.h, compiled once per ISA level.
#include "kvcache_attention/kvcache_tiles_cpu.h"

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

GENEXT_CPU_CLONES void softmax_f32(float* S, int64_t nr, const int32_t* nvis, float* m, float* l,
                                   float* alpha) {
  tiles::softmax_f32(S, nr, nvis, m, l, alpha);
}

}  // namespace genext::kv
