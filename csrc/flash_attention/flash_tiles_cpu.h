// The tile routines of the flash-attention CPU kernel (flash_attention_cpu.h), included by
// flash_fwd_cpu.cpp and flash_bwd_cpu.cpp: score tiles S = Q K^T, accumulations O += P V with
// per-row rescaling, and the online-softmax steps, on 16-lane vectors (common/cpu_simd.h). The
// float entry points are compiled per ISA level and chosen when the library loads
// (GENEXT_CPU_CLONES); exp is a polynomial in those vectors. Everything here has internal linkage,
// so each including file gets its own copy: GCC 12 exports the ifunc symbol of a target_clones
// function whatever its visibility, and these should not leave the library.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/cpu_simd.h"
#include "flash_attention/flash_attention_cpu.h"

namespace genext::fa::cpu {
namespace {

static_assert(kLanes == simd::kLanes, "the tiles are made of simd vectors");

// ---- vectors (common/cpu_simd.h) ----------------------------------------------------------------

using simd::f32x16;
using simd::f64x16;
using simd::hsum;
using simd::i32x16;
using simd::lane_index;
using simd::load;
using simd::splat;
using simd::store;
using simd::Vec;

// exp(x) for float lanes (common/cpu_simd.h), x <= 0 in use (scores minus their maximum or their
// lse); callers zero the masked lanes themselves.
GENEXT_INLINE f32x16 exp_v(f32x16 x) { return simd::exp_v(x); }
// float64 (the gradcheck path): libm, lane by lane
GENEXT_INLINE f64x16 exp_v(f64x16 x) {
  for (int t = 0; t < kLanes; ++t) x[t] = std::exp(x[t]);
  return x;
}

// ---- tile routines ------------------------------------------------------------------------------

// S[i][0:kBc] = sum_{d < D} A[i][d] * Bt[d][0:kBc] for i < nr. A: rows of stride lda; Bt: [D][kBc].
template <class T, int R>
GENEXT_INLINE void qk_block(const T* __restrict__ A, int64_t lda, const T* __restrict__ Bt,
                            int64_t D, T* __restrict__ S) {
  using V = typename Vec<T>::V;
  constexpr int W = kBc / kLanes;
  V acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V b[W];
    for (int w = 0; w < W; ++w) b[w] = load<V>(Bt + d * kBc + w * kLanes);
    for (int r = 0; r < R; ++r) {
      const V a = splat<V>(A[r * lda + d]);
      for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store(S + r * kBc + w * kLanes, acc[r][w]);
}

template <class T>
GENEXT_INLINE void qk_tile_impl(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, int64_t nr) {
  int64_t i = 0;
  for (; i + kRows <= nr; i += kRows) qk_block<T, kRows>(A + i * lda, lda, Bt, D, S + i * kBc);
  for (; i < nr; ++i) qk_block<T, 1>(A + i * lda, lda, Bt, D, S + i * kBc);
}

// Out[i][d0 : d0 + W*16] = Out[i][...] * row_scale[i] + sum_{j < nc} C(i, j) * In[j][...], with
// C(i, j) = C[i * cr + j * cc] (so a transposed coefficient matrix costs nothing).
template <class T, int R, int W>
GENEXT_INLINE void accum_block(T* __restrict__ Out, int64_t ldo, const T* __restrict__ C,
                               int64_t cr, int64_t cc, const T* __restrict__ In, int64_t ldi,
                               int64_t nc, const T* __restrict__ row_scale) {
  using V = typename Vec<T>::V;
  V acc[R][W];
  for (int r = 0; r < R; ++r) {
    const V s = splat<V>(row_scale ? row_scale[r] : T(1));
    for (int w = 0; w < W; ++w) acc[r][w] = load<V>(Out + r * ldo + w * kLanes) * s;
  }
  for (int64_t j = 0; j < nc; ++j) {
    V b[W];
    for (int w = 0; w < W; ++w) b[w] = load<V>(In + j * ldi + w * kLanes);
    for (int r = 0; r < R; ++r) {
      const V a = splat<V>(C[r * cr + j * cc]);
      for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store(Out + r * ldo + w * kLanes, acc[r][w]);
}

template <class T, int R>
GENEXT_INLINE void accum_rows(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc, const T* In,
                              int64_t ldi, int64_t nc, int64_t Dp, const T* row_scale) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= Dp; d0 += 4 * kLanes)
    accum_block<T, R, 4>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale);
  switch ((Dp - d0) / kLanes) {
    case 3: accum_block<T, R, 3>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale); break;
    case 2: accum_block<T, R, 2>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale); break;
    case 1: accum_block<T, R, 1>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale); break;
    default: break;
  }
}

template <class T>
GENEXT_INLINE void accum_tile_impl(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc,
                                   const T* In, int64_t ldi, int64_t nr, int64_t nc, int64_t Dp,
                                   const T* row_scale) {
  int64_t i = 0;
  for (; i + kRows <= nr; i += kRows)
    accum_rows<T, kRows>(Out + i * ldo, ldo, C + i * cr, cr, cc, In, ldi, nc, Dp,
                         row_scale ? row_scale + i : nullptr);
  for (; i < nr; ++i)
    accum_rows<T, 1>(Out + i * ldo, ldo, C + i * cr, cr, cc, In, ldi, nc, Dp,
                     row_scale ? row_scale + i : nullptr);
}

// Online-softmax step on a score tile S [nr][kBc] whose row r sees its first nvis[r] columns:
// S becomes P = exp(S - m_new) (0 where masked); m, l are updated and alpha[r] = exp(m_old - m_new)
// is the factor the row's output accumulator must be rescaled by. The maximum skips NaN scores,
// which then make P and l NaN (the row's output and lse end NaN); when every visible score is
// -inf the exponent is taken from 0, so P = 0 and l stays 0 (out 0, lse -inf) instead of NaN.
template <class T>
GENEXT_INLINE void softmax_fwd_impl(T* S, int64_t nr, const int32_t* nvis, T* m, T* l, T* alpha) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const I lanes = lane_index<I>();
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * kBc;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      std::memset(s, 0, kBc * sizeof(T));
      alpha[r] = T(1);
      continue;
    }
    T mx = kNegInf;
    for (int32_t j = 0; j < nv; ++j) mx = s[j] > mx ? s[j] : mx;
    const T m_new = std::max(m[r], mx);
    const T m_use = m_new == kNegInf ? T(0) : m_new;
    alpha[r] = m[r] == kNegInf ? T(0) : std::exp(m[r] - m_new);
    V sum{};
    for (int w = 0; w < kBc / kLanes; ++w) {
      V e = exp_v(load<V>(s + w * kLanes) - m_use);
      e = (lanes + w * kLanes) < splat<I>(nv) ? e : V{};
      store(s + w * kLanes, e);
      sum += e;
    }
    l[r] = l[r] * alpha[r] + hsum<T>(sum);
    m[r] = m_new;
  }
}

// Backward step on S [nr][kBc] (scores) and dP [nr][kBc] (dO . V): S becomes P = exp(S - lse)
// and dP becomes dS = P * (dP - delta), both 0 where masked (columns >= nvis[r]).
template <class T>
GENEXT_INLINE void softmax_bwd_impl(T* S, T* dP, int64_t nr, const int32_t* nvis, const T* lse,
                                    const T* delta) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  const I lanes = lane_index<I>();
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * kBc;
    T* dp = dP + r * kBc;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      std::memset(s, 0, kBc * sizeof(T));
      std::memset(dp, 0, kBc * sizeof(T));
      continue;
    }
    for (int w = 0; w < kBc / kLanes; ++w) {
      V p = exp_v(load<V>(s + w * kLanes) - lse[r]);
      p = (lanes + w * kLanes) < splat<I>(nv) ? p : V{};
      store(s + w * kLanes, p);
      store(dp + w * kLanes, p * (load<V>(dp + w * kLanes) - delta[r]));
    }
  }
}

// Entry points: float compiled per ISA level (GENEXT_CPU_CLONES), double once. The two passes use
// three of the four each.
#define FA_ENTRY_POINTS(T, ATTR)                                                                   \
  [[maybe_unused]] ATTR void qk_tile(const T* A, int64_t lda, const T* Bt, int64_t D, T* S,        \
                                     int64_t nr) {                                                 \
    qk_tile_impl<T>(A, lda, Bt, D, S, nr);                                                         \
  }                                                                                                \
  [[maybe_unused]] ATTR void accum_tile(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc,   \
                                        const T* In, int64_t ldi, int64_t nr, int64_t nc,          \
                                        int64_t Dp, const T* row_scale) {                          \
    accum_tile_impl<T>(Out, ldo, C, cr, cc, In, ldi, nr, nc, Dp, row_scale);                       \
  }                                                                                                \
  [[maybe_unused]] ATTR void softmax_fwd(T* S, int64_t nr, const int32_t* nvis, T* m, T* l,        \
                                         T* alpha) {                                               \
    softmax_fwd_impl<T>(S, nr, nvis, m, l, alpha);                                                 \
  }                                                                                                \
  [[maybe_unused]] ATTR void softmax_bwd(T* S, T* dP, int64_t nr, const int32_t* nvis,             \
                                         const T* lse, const T* delta) {                           \
    softmax_bwd_impl<T>(S, dP, nr, nvis, lse, delta);                                              \
  }

FA_ENTRY_POINTS(float, GENEXT_CPU_CLONES)
FA_ENTRY_POINTS(double, )
#undef FA_ENTRY_POINTS

}  // namespace
}  // namespace genext::fa::cpu
