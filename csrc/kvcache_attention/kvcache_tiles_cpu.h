// Tile routines of the CPU attention_with_kvcache kernel in float32 (the compute type of float32,
// float16 and bfloat16): scores of a group of query rows against a tile of key rows, the value
// accumulation, and the widening of 16-bit cache rows. Plain C++ on 8-lane vectors (one ymm
// register at x86-64-v3 and v4, two xmm at the baseline), each entry point compiled per ISA level
// (GENEXT_CPU_CLONES). No torch header, so that a standalone harness can count their instructions.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/cpu_simd.h"

namespace genext::kv {

constexpr int64_t kTile = 64;  // keys per tile (a multiple of 8)

namespace tiles {

using simd::f32x8;
using simd::load;
using simd::store;
typedef uint16_t u16x8 __attribute__((vector_size(8 * sizeof(uint16_t))));
typedef uint32_t u32x8 __attribute__((vector_size(8 * sizeof(uint32_t))));

// The lanes of a and b summed in pairs, as x86's haddps: {a0+a1, a2+a3, b0+b1, b2+b3} in each
// 128-bit half.
GENEXT_INLINE f32x8 hadd(f32x8 a, f32x8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// {sum(a[0]), ..., sum(a[7])}: eight lane sums in one vector (6 pair-adds and one cross-half add
// instead of eight separate lane sums).
GENEXT_INLINE f32x8 sum8(const f32x8* a) {
  const f32x8 t0 = hadd(hadd(a[0], a[1]), hadd(a[2], a[3]));  // {s0..s3 | s0..s3} halves
  const f32x8 t1 = hadd(hadd(a[4], a[5]), hadd(a[6], a[7]));
  return __builtin_shufflevector(t0, t1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(t0, t1, 4, 5, 6, 7, 12, 13, 14, 15);
}

// S[r * kTile + j] = Q[r] . K[j] for r < nr and j < round_up(nc, 8): eight keys at a time, one
// accumulator per key, the eight lane sums folded into one vector. krows must hold
// round_up(nc, 8) pointers (the caller repeats a valid row past nc; those scores are masked).
// Elements past the last multiple of 8 of D are added by a scalar loop.
GENEXT_INLINE void scores_f32(const float* __restrict__ Q, int64_t ldq, int64_t nr,
                              const float* const* __restrict__ krows, int64_t nc, int64_t D,
                              float* __restrict__ S) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t r = 0; r < nr; ++r) {
    const float* __restrict__ q = Q + r * ldq;
    for (int64_t j0 = 0; j0 < nc; j0 += 8) {
      const float* const* k = krows + j0;
      f32x8 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = f32x8{};
      for (int64_t d = 0; d < D8; d += 8) {
        const f32x8 qv = load<f32x8>(q + d);
        for (int u = 0; u < 8; ++u) acc[u] += qv * load<f32x8>(k[u] + d);
      }
      f32x8 s = sum8(acc);
      for (int64_t d = D8; d < D; ++d)
        for (int u = 0; u < 8; ++u) s[u] += q[d] * k[u][d];
      store(S + r * kTile + j0, s);
    }
  }
}

// o[d0 : d0 + 8W] = alpha * o[...] + sum_{j < nc} p[j] * vrows[j][d0 : ...], in W registers kept
// over the keys.
template <int W>
GENEXT_INLINE void accum_chunk(float* __restrict__ o, const float* __restrict__ p,
                               const float* const* __restrict__ vrows, int64_t nc, int64_t d0,
                               float alpha) {
  f32x8 acc[W];
  for (int w = 0; w < W; ++w) acc[w] = load<f32x8>(o + d0 + 8 * w) * alpha;
  for (int64_t j = 0; j < nc; ++j) {
    const f32x8 pj = f32x8{} + p[j];
    const float* __restrict__ v = vrows[j] + d0;
    for (int w = 0; w < W; ++w) acc[w] += pj * load<f32x8>(v + 8 * w);
  }
  for (int w = 0; w < W; ++w) store(o + d0 + 8 * w, acc[w]);
}

// O[r][0:D] = alpha[r] * O[r][0:D] + sum_{j < nc} P[r * kTile + j] * V[j][0:D] for r < nr, in
// chunks of up to 64 elements held in registers; a scalar loop for the elements past the last
// multiple of 8.
GENEXT_INLINE void accum_f32(float* O, int64_t ldo, int64_t nr, const float* P,
                             const float* const* vrows, int64_t nc, int64_t D, const float* alpha) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t r = 0; r < nr; ++r) {
    float* o = O + r * ldo;
    const float* p = P + r * kTile;
    const float a = alpha[r];
    int64_t d0 = 0;
    for (; d0 + 64 <= D8; d0 += 64) accum_chunk<8>(o, p, vrows, nc, d0, a);
    switch ((D8 - d0) / 8) {
      case 7: accum_chunk<7>(o, p, vrows, nc, d0, a); break;
      case 6: accum_chunk<6>(o, p, vrows, nc, d0, a); break;
      case 5: accum_chunk<5>(o, p, vrows, nc, d0, a); break;
      case 4: accum_chunk<4>(o, p, vrows, nc, d0, a); break;
      case 3: accum_chunk<3>(o, p, vrows, nc, d0, a); break;
      case 2: accum_chunk<2>(o, p, vrows, nc, d0, a); break;
      case 1: accum_chunk<1>(o, p, vrows, nc, d0, a); break;
      default: break;
    }
    if (D8 == D) continue;
    for (int64_t d = D8; d < D; ++d) o[d] *= a;
    for (int64_t j = 0; j < nc; ++j)
      for (int64_t d = D8; d < D; ++d) o[d] += p[j] * vrows[j][d];
  }
}

// Online-softmax step over a tile of scores, rows r < nr of S (stride kTile), row r seeing its
// first nvis[r] columns: S becomes P = exp(S - m_new) (0 where masked), m and l are updated and
// alpha[r] = exp(m_old - m_new). On 8-lane vectors: the maximum and the sum are lane-wise, then
// folded (a scalar pass over 64 columns is a chain of 64 dependent compares or adds). The maximum
// skips NaN scores, which then make P and l NaN (out and lse end NaN); when every visible score
// is -inf the exponent is taken from 0, so P = 0 and l stays 0 (out 0, lse -inf).
GENEXT_INLINE void softmax_f32(float* __restrict__ S, int64_t nr, const int32_t* __restrict__ nvis,
                               float* __restrict__ m, float* __restrict__ l,
                               float* __restrict__ alpha) {
  typedef int32_t i32x8 __attribute__((vector_size(8 * sizeof(int32_t))));
  constexpr float kNegInf = -__builtin_inff();
  constexpr int kVecs = int(kTile / 8);
  const i32x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t r = 0; r < nr; ++r) {
    float* s = S + r * kTile;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      for (int64_t j = 0; j < kTile; ++j) s[j] = 0.0f;
      alpha[r] = 1.0f;
      continue;
    }
    f32x8 vmax = f32x8{} + kNegInf;
    for (int c = 0; c < kVecs; ++c) {
      const f32x8 x = load<f32x8>(s + 8 * c);
      const f32x8 xm = (lane + 8 * c) < nv ? x : f32x8{} + kNegInf;
      vmax = xm > vmax ? xm : vmax;
    }
    float mx = m[r];
    for (int t = 0; t < 8; ++t) mx = vmax[t] > mx ? vmax[t] : mx;
    alpha[r] = m[r] == kNegInf ? 0.0f : simd::exp_v(m[r] - mx);
    const float m_use = mx == kNegInf ? 0.0f : mx;
    f32x8 acc{};
    for (int c = 0; c < kVecs; ++c) {
      const f32x8 e = simd::exp_v(load<f32x8>(s + 8 * c) - m_use);
      const f32x8 p = (lane + 8 * c) < nv ? e : f32x8{};
      store(s + 8 * c, p);
      acc += p;
    }
    const simd::f32x4 h = __builtin_shufflevector(acc, acc, 0, 1, 2, 3) +
                          __builtin_shufflevector(acc, acc, 4, 5, 6, 7);
    l[r] = l[r] * alpha[r] + ((h[0] + h[1]) + (h[2] + h[3]));
    m[r] = mx;
  }
}

// dst[0:n] = the bfloat16 values src[0:n] (bit patterns) as float: the 16 bits become the high
// half of the float's.
GENEXT_INLINE void widen_bf16(const uint16_t* __restrict__ src, float* __restrict__ dst,
                              int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const u32x8 w = __builtin_convertvector(load<u16x8>(src + i), u32x8) << 16;
    store(dst + i, __builtin_bit_cast(f32x8, w));
  }
  for (; i < n; ++i) {
    const uint32_t w = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &w, sizeof w);
  }
}

}  // namespace tiles

// Entry points (kvcache_tiles_cpu.cpp), one version per ISA level but for widen_f16.
void scores_f32(const float* Q, int64_t ldq, int64_t nr, const float* const* krows, int64_t nc,
                int64_t D, float* S);
void accum_f32(float* O, int64_t ldo, int64_t nr, const float* P, const float* const* vrows,
               int64_t nc, int64_t D, const float* alpha);
void widen_bf16(const uint16_t* src, float* dst, int64_t n);
// dst[0:n] = the float16 values src[0:n] (bit patterns) as float (exact): with F16C when `f16c`
// (f16c_enabled(): the CPU has it and the level cap is 3 or more), else through c10::Half.
bool f16c_enabled();
void widen_f16(const uint16_t* src, float* dst, int64_t n, bool f16c);
void softmax_f32(float* S, int64_t nr, const int32_t* nvis, float* m, float* l, float* alpha);

}  // namespace genext::kv
