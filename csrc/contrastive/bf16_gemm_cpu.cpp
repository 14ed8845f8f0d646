// The rounding of bf16_gemm_cpu.h, compiled once per ISA level.
#include "contrastive/bf16_gemm_cpu.h"

#include <cstring>

#include "common/cpu_simd.h"

namespace genext::contrastive::cpu {

GENEXT_CPU_CLONES void round_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, src + i, sizeof u);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
  }
}

}  // namespace genext::contrastive::cpu
