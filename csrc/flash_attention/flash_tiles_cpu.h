// The tile routines of the flash-attention CPU kernel (flash_attention_cpu.h), included by
// flash_fwd_cpu.cpp and flash_bwd_cpu.cpp: score tiles S = Q K^T, accumulations O += P V with
// per-row rescaling, and the online-softmax steps, on GCC vectors (common/cpu_simd.h). The float
// routines exist once per x86-64 level (GENEXT_CPU_TARGET_V3/_V4 and the baseline), each on the
// level's native vector width (8 lanes on AVX2, 16 on AVX-512, 4 on SSE2) with a register block
// that fits its registers, and are chosen at run time (simd::cpu_level). Not target_clones: a clone
// shares one body, so one block shape, and 16-lane vectors with 4 x 4 blocks (right for AVX-512)
// spill every accumulator on AVX2, whose broadcasts of 16-lane vectors GCC also builds on the
// stack. exp is a polynomial in those vectors. Everything here has internal linkage, so each
// including file gets its own copy.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "common/cpu_simd.h"
#include "flash_attention/flash_attention_cpu.h"

#if GENEXT_CPU_LEVELS
#include <immintrin.h>
#endif

namespace genext::fa::cpu {
namespace {

// Rows of Q, dO, V, K tiles are padded to Dp (tile_dp): whole vectors of the routines in use.
static_assert(kLanes % 8 == 0 && kBc % 16 == 0, "tile rows are whole vectors of every width");

// Dp for head dim D: a multiple of 8 floats where the AVX2 or SSE2 routines run (their blocks are
// 8-float vectors or pairs of 4-float ones), of 16 on AVX-512 and for double (16-lane vectors).
// At D 40 the products then run over 40 columns instead of 48, at D 4 over 8 instead of 16.
template <class T>
inline int64_t tile_dp(int64_t D) {
  return round_up(D, std::is_same_v<T, float> && simd::cpu_level_detected() != 4 ? 8 : kLanes);
}

// ---- vectors (common/cpu_simd.h) ----------------------------------------------------------------

using simd::f32x16;
using simd::f64x16;
using simd::load;
using simd::splat;
using simd::store;

template <class T, class V>
inline constexpr int kLanesOf = int(sizeof(V) / sizeof(T));

// {0, 1, ..., L-1} as T lanes
template <class T, class V>
GENEXT_INLINE V lane_iota() {
  V v{};
  for (int t = 0; t < kLanesOf<T, V>; ++t) v[t] = T(t);
  return v;
}

// v with lanes i and i ^ H swapped (H a power of two below the lane count).
template <int H, class V, int... I>
GENEXT_INLINE V swap_lanes(V v, std::integer_sequence<int, I...>) {
  return __builtin_shufflevector(v, v, (I ^ H)...);
}

// The lanes of v folded in a tree by op (lanes H apart combined, for H = L/2, L/4, ..., 1):
// log2(L) dependent steps instead of the L - 1 of a lane-order chain.
template <class T, class V, class Op, int H = kLanesOf<T, V> / 2>
GENEXT_INLINE T lane_fold(V v, Op op) {
  if constexpr (H == 0) {
    return v[0];
  } else {
    const V w = swap_lanes<H>(v, std::make_integer_sequence<int, kLanesOf<T, V>>{});
    return lane_fold<T, V, Op, H / 2>(op(v, w), op);
  }
}

struct AddLanes {
  template <class V>
  GENEXT_INLINE V operator()(V a, V b) const {
    return a + b;
  }
};
struct MaxLanes {  // for lanes that are never NaN
  template <class V>
  GENEXT_INLINE V operator()(V a, V b) const {
    return b > a ? b : a;
  }
};

// *p in every lane of V. On 8- and 16-lane vectors (the AVX2 and AVX-512 routines) one
// vbroadcastss from memory: GCC builds splat's V{} + x there as a scalar add and a register
// broadcast, two more instructions per broadcast in the innermost loops (about a third of their
// time).
template <class T, class V>
GENEXT_INLINE V bcast(const T* p) {
#if GENEXT_CPU_LEVELS
  if constexpr (std::is_same_v<V, simd::f32x8>) {
    V v;
    __asm__("vbroadcastss %1, %0" : "=x"(v) : "m"(*p));
    return v;
  } else if constexpr (std::is_same_v<V, f32x16>) {  // any of the 32 zmm registers
    V v;
    __asm__("vbroadcastss %1, %0" : "=v"(v) : "m"(*p));
    return v;
  }
#endif
  return splat<V>(*p);
}

// exp of every lane, x <= 0 in use (scores minus their maximum or their lse); callers zero the
// masked lanes themselves. Float: the polynomial of common/cpu_simd.h; float64 (the gradcheck
// path): libm, lane by lane.
template <class T, class V>
GENEXT_INLINE V exp_lanes(V x) {
  if constexpr (std::is_same_v<T, float>) {
    return simd::exp_v(x);
  } else {
    for (int t = 0; t < kLanesOf<T, V>; ++t) x[t] = std::exp(x[t]);
    return x;
  }
}

// ---- tile products ------------------------------------------------------------------------------
// Register blocks of R rows x W vectors of V (L = lanes of V). The block shape is chosen per ISA
// level (the entry points below) so that the R*W accumulators, W right-hand vectors and a
// broadcast fit in the level's vector registers: 4 x 4 x 16 lanes on AVX-512 (16 of 32 zmm),
// 6 x 2 x 8 lanes on AVX2 (12 + 3 of 16 ymm), 6 x 2 x 4 lanes on the SSE2 baseline (16 xmm). The
// shape changes neither the products nor their order: every output element is one accumulator
// summed over d (or j) in increasing order.

// S[i][0 : W*L] = sum_{d < D} A[i][d] * Bt[d][0 : W*L] for i < R. A: rows of stride lda; Bt: rows
// of stride kBc; S: rows of stride kBc.
template <class T, class V, int R, int W>
GENEXT_INLINE void qk_block(const T* __restrict__ A, int64_t lda, const T* __restrict__ Bt,
                            int64_t D, T* __restrict__ S) {
  constexpr int L = kLanesOf<T, V>;
  V acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V b[W];
    for (int w = 0; w < W; ++w) b[w] = load<V>(Bt + d * kBc + w * L);
    for (int r = 0; r < R; ++r) {
      const V a = bcast<T, V>(A + r * lda + d);
      for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store(S + r * kBc + w * L, acc[r][w]);
}

// R rows of S, columns [0, nc) rounded up to whole blocks.
template <class T, class V, int R, int W>
GENEXT_INLINE void qk_rows(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, int64_t nc) {
  constexpr int C = W * kLanesOf<T, V>;
  static_assert(kBc % C == 0, "the column blocks tile kBc");
  for (int64_t c0 = 0; c0 < nc; c0 += C) qk_block<T, V, R, W>(A, lda, Bt + c0, D, S + c0);
}

// n rows of S, 0 < n < R, as one block of n rows.
template <class T, class V, int R, int W>
GENEXT_INLINE void qk_rest(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, int64_t nc,
                           int64_t n) {
  if constexpr (R > 1) {
    if (n == R - 1)
      qk_rows<T, V, R - 1, W>(A, lda, Bt, D, S, nc);
    else
      qk_rest<T, V, R - 1, W>(A, lda, Bt, D, S, nc, n);
  }
}

// S[i][j] = sum_{d < D} A[i][d] * Bt[d][j] for i < nr, j < nc (Bt: [D][kBc]); columns from nc
// to kBc are written up to the end of their block or left as they are. Column blocks outermost:
// a block's strip of Bt (D x W vectors, 8 KiB at D 128) stays in L1 while the row blocks pass
// over it, where rows outermost streamed all of Bt (32 KiB at D 128, L1's size) once per row block.
template <class T, class V, int R, int W>
GENEXT_INLINE void qk_tile_impl(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, int64_t nr,
                                int64_t nc) {
  constexpr int C = W * kLanesOf<T, V>;
  const int64_t full = nr / R * R;
  for (int64_t c0 = 0; c0 < nc; c0 += C)
    for (int64_t i = 0; i < full; i += R)
      qk_block<T, V, R, W>(A + i * lda, lda, Bt + c0, D, S + i * kBc + c0);
  if (full < nr) qk_rest<T, V, R, W>(A + full * lda, lda, Bt, D, S + full * kBc, nc, nr - full);
}

// Out[i][0 : W*L] = Out[i][...] * row_scale[i] + sum_{j < nc} C(i, j) * In[j][...] for i < R, with
// C(i, j) = C[i * cr + j * cc] (so a transposed coefficient matrix costs nothing).
template <class T, class V, int R, int W>
GENEXT_INLINE void accum_block(T* __restrict__ Out, int64_t ldo, const T* __restrict__ C,
                               int64_t cr, int64_t cc, const T* __restrict__ In, int64_t ldi,
                               int64_t nc, const T* __restrict__ row_scale) {
  constexpr int L = kLanesOf<T, V>;
  V acc[R][W];
  for (int r = 0; r < R; ++r) {
    const V s = splat<V>(row_scale ? row_scale[r] : T(1));
    for (int w = 0; w < W; ++w) acc[r][w] = load<V>(Out + r * ldo + w * L) * s;
  }
  for (int64_t j = 0; j < nc; ++j) {
    V b[W];
    for (int w = 0; w < W; ++w) b[w] = load<V>(In + j * ldi + w * L);
    for (int r = 0; r < R; ++r) {
      const V a = bcast<T, V>(C + r * cr + j * cc);
      for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store(Out + r * ldo + w * L, acc[r][w]);
}

// n vectors of columns, 0 < n < W, as one block n vectors wide.
template <class T, class V, int R, int W>
GENEXT_INLINE void accum_cols_rest(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc,
                                   const T* In, int64_t ldi, int64_t nc, const T* row_scale,
                                   int64_t n) {
  if constexpr (W > 1) {
    if (n == W - 1)
      accum_block<T, V, R, W - 1>(Out, ldo, C, cr, cc, In, ldi, nc, row_scale);
    else
      accum_cols_rest<T, V, R, W - 1>(Out, ldo, C, cr, cc, In, ldi, nc, row_scale, n);
  }
}

// R rows of Out, columns [0, Dp) (Dp a multiple of the level's row padding: 16 on AVX-512 and for
// float64, 8 on AVX2 and SSE2; column blocks past the last full W * L run in accum_cols_rest).
template <class T, class V, int R, int W>
GENEXT_INLINE void accum_rows(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc, const T* In,
                              int64_t ldi, int64_t nc, int64_t Dp, const T* row_scale) {
  constexpr int L = kLanesOf<T, V>;
  int64_t d0 = 0;
  for (; d0 + W * L <= Dp; d0 += W * L)
    accum_block<T, V, R, W>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale);
  if (d0 < Dp)
    accum_cols_rest<T, V, R, W>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale,
                                (Dp - d0) / L);
}

// n rows of Out, 0 < n < R, as one block of n rows.
template <class T, class V, int R, int W>
GENEXT_INLINE void accum_rest(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc, const T* In,
                              int64_t ldi, int64_t nc, int64_t Dp, const T* row_scale, int64_t n) {
  if constexpr (R > 1) {
    if (n == R - 1)
      accum_rows<T, V, R - 1, W>(Out, ldo, C, cr, cc, In, ldi, nc, Dp, row_scale);
    else
      accum_rest<T, V, R - 1, W>(Out, ldo, C, cr, cc, In, ldi, nc, Dp, row_scale, n);
  }
}

// Out[i][0:Dp] = Out[i][...] * row_scale[i] + sum_{j < nc} C(i, j) * In[j][...] for i < nr
// (row_scale null: 1). Column blocks outermost, as in qk_tile_impl: a block's strip of In (nc x W
// vectors, 4 KiB) and the coefficients (16 KiB) stay in L1 while the row blocks pass over them,
// where rows outermost streamed all of In (32 KiB at D 128) once per row block.
template <class T, class V, int R, int W>
GENEXT_INLINE void accum_tile_impl(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc,
                                   const T* In, int64_t ldi, int64_t nr, int64_t nc, int64_t Dp,
                                   const T* row_scale) {
  constexpr int L = kLanesOf<T, V>;
  const int64_t full = nr / R * R;
  int64_t d0 = 0;
  for (; d0 + W * L <= Dp; d0 += W * L)
    for (int64_t i = 0; i < full; i += R)
      accum_block<T, V, R, W>(Out + i * ldo + d0, ldo, C + i * cr, cr, cc, In + d0, ldi, nc,
                              row_scale ? row_scale + i : nullptr);
  if (d0 < Dp)
    for (int64_t i = 0; i < full; i += R)
      accum_cols_rest<T, V, R, W>(Out + i * ldo + d0, ldo, C + i * cr, cr, cc, In + d0, ldi, nc,
                                  row_scale ? row_scale + i : nullptr, (Dp - d0) / L);
  if (full < nr)
    accum_rest<T, V, R, W>(Out + full * ldo, ldo, C + full * cr, cr, cc, In, ldi, nc, Dp,
                           row_scale ? row_scale + full : nullptr, nr - full);
}

// Online-softmax step on a score tile S [nr][kBc] whose row r sees its first nvis[r] columns:
// S becomes P = exp(S - m_new) (0 where masked); m, l are updated and alpha[r] = exp(m_old - m_new)
// is the factor the row's output accumulator must be rescaled by. The maximum skips NaN scores,
// which then make P and l NaN (the row's output and lse end NaN); when every visible score is
// -inf the exponent is taken from 0, so P = 0 and l stays 0 (out 0, lse -inf) instead of NaN.
// Only columns below nc (>= every nvis[r]) are read and given a defined P. Lane masks compare T
// lane indices with T(nvis) (exact: both are at most kBc).
template <class T, class V>
GENEXT_INLINE void softmax_fwd_impl(T* S, int64_t nr, int64_t nc, const int32_t* nvis, T* m, T* l,
                                    T* alpha) {
  constexpr int L = kLanesOf<T, V>;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const V lanes = lane_iota<T, V>();
  // Three passes, so that neither the cross-lane folds nor the rescaling factors are chains of
  // scalar operations: the rows' new maxima (lane-wise, folded in a tree), alpha on vectors of
  // rows (the rows past the last whole vector with std::exp), then P and the row sums.
  T m_new[kBr];
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = S + r * kBc;
    const V nvv = splat<V>(T(nvis[r]));
    // NaN is never greater, so the lane maxima (and their fold) skip NaN scores
    V mv = splat<V>(kNegInf);
    V idx = lanes;
    for (int c = 0; c < nc; c += L, idx += T(L)) {
      V x = load<V>(s + c);
      x = idx < nvv ? x : splat<V>(kNegInf);
      mv = x > mv ? x : mv;
    }
    m_new[r] = std::max(m[r], lane_fold<T>(mv, MaxLanes{}));
  }
  int64_t r = 0;
  for (; r + L <= nr; r += L) {
    const V mo = load<V>(m + r);
    const V e = exp_lanes<T, V>(mo - load<V>(m_new + r));
    store(alpha + r, mo == splat<V>(kNegInf) ? V{} : e);
  }
  for (; r < nr; ++r) alpha[r] = m[r] == kNegInf ? T(0) : std::exp(m[r] - m_new[r]);
  for (r = 0; r < nr; ++r) {
    T* s = S + r * kBc;
    const int32_t nv = nvis[r];
    if (nv <= 0) {  // nothing visible: P = 0, m and l kept
      std::memset(s, 0, kBc * sizeof(T));
      alpha[r] = T(1);
      continue;
    }
    const V nvv = splat<V>(T(nv));
    const V mu = splat<V>(m_new[r] == kNegInf ? T(0) : m_new[r]);
    V sum{};
    V idx = lanes;
    for (int c = 0; c < nc; c += L, idx += T(L)) {
      V e = exp_lanes<T, V>(load<V>(s + c) - mu);
      e = idx < nvv ? e : V{};
      store(s + c, e);
      sum += e;
    }
    l[r] = l[r] * alpha[r] + lane_fold<T>(sum, AddLanes{});
    m[r] = m_new[r];
  }
}

// Backward step on S [nr][kBc] (scores) and dP [nr][kBc] (dO . V): S becomes P = exp(S - lse)
// and dP becomes dS = P * (dP - delta), both 0 where masked (columns >= nvis[r]); only columns
// below nc (>= every nvis[r]) are read and given defined values.
template <class T, class V>
GENEXT_INLINE void softmax_bwd_impl(T* S, T* dP, int64_t nr, int64_t nc, const int32_t* nvis,
                                    const T* lse, const T* delta) {
  constexpr int L = kLanesOf<T, V>;
  const V lanes = lane_iota<T, V>();
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * kBc;
    T* dp = dP + r * kBc;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      std::memset(s, 0, kBc * sizeof(T));
      std::memset(dp, 0, kBc * sizeof(T));
      continue;
    }
    const V nvv = splat<V>(T(nv)), ls = splat<V>(lse[r]), dl = splat<V>(delta[r]);
    V idx = lanes;
    for (int c = 0; c < nc; c += L, idx += T(L)) {
      V p = exp_lanes<T, V>(load<V>(s + c) - ls);
      p = idx < nvv ? p : V{};
      store(s + c, p);
      store(dp + c, p * (load<V>(dp + c) - dl));
    }
  }
}

// ---- tile loads ---------------------------------------------------------------------------------

// Rows [r0, r0 + nr) of one head into a [nr][Dp] tile, times `mul`, with zeros in the padding
// columns [D, Dp) (the products run over whole vectors).
template <class S, class T>
GENEXT_INLINE void load_rows_impl(const View<S>& v, int64_t b, int64_t r0, int64_t nr, int64_t h,
                                  int64_t D, int64_t Dp, T mul, T* dst) {
  for (int64_t r = 0; r < nr; ++r) {
    const S* __restrict__ src = v.row(b, r0 + r, h);
    T* __restrict__ d = dst + r * Dp;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(src[c]) * mul;
    for (int64_t c = D; c < Dp; ++c) d[c] = T(0);
  }
}

// Rows [r0, r0 + n) of one head into a transposed [D][kBc] tile; columns n..kBc-1 are zeroed.
// Eight source rows at a time, so each destination row gets eight contiguous values per step
// (one vector store) instead of one scattered store per element, which at D 160 (40 KiB of tile)
// also evicted the L1 lines being written.
template <class S, class T>
GENEXT_INLINE void load_cols_impl(const View<S>& v, int64_t b, int64_t r0, int64_t n, int64_t h,
                                  int64_t D, T* dst) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kBc + n, dst + (d + 1) * kBc, T(0));
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const S* src[8];
    for (int t = 0; t < 8; ++t) src[t] = v.row(b, r0 + j + t, h);
    for (int64_t d = 0; d < D; ++d) {
      T* __restrict__ o = dst + d * kBc + j;
      for (int t = 0; t < 8; ++t) o[t] = static_cast<T>(src[t][d]);
    }
  }
  for (; j < n; ++j) {
    const S* src = v.row(b, r0 + j, h);
    for (int64_t d = 0; d < D; ++d) dst[d * kBc + j] = static_cast<T>(src[d]);
  }
}

#if GENEXT_CPU_LEVELS
// load_cols for float32 on AVX2 (x86-64-v3 and v4): blocks of 8 rows x 8 columns read as 8
// vectors and transposed in registers (unpack, shuffle, lane permute: 24 shuffles per 64 values),
// then stored as 8 vectors. The scalar transpose above compiles to single-float loads and stores
// through the stack: with one query tile per key tile (L 64, D 160) it took 11% of a
// forward+backward, as much as a third of the products.
GENEXT_CPU_TARGET_V3 void load_cols_f32_avx2(const View<float>& v, int64_t b, int64_t r0, int64_t n,
                                             int64_t h, int64_t D, float* dst) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kBc + n, dst + (d + 1) * kBc, 0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* src[8];
    for (int t = 0; t < 8; ++t) src[t] = v.row(b, r0 + j + t, h);
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
      __m256 r[8], u[8];
      for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(src[t] + d);
      for (int t = 0; t < 8; t += 2) {  // pairs of rows interleaved
        u[t] = _mm256_unpacklo_ps(r[t], r[t + 1]);
        u[t + 1] = _mm256_unpackhi_ps(r[t], r[t + 1]);
      }
      for (int t = 0; t < 8; t += 4) {  // quads of rows: 4 consecutive values per 128-bit lane
        r[t] = _mm256_shuffle_ps(u[t], u[t + 2], 0x44);
        r[t + 1] = _mm256_shuffle_ps(u[t], u[t + 2], 0xEE);
        r[t + 2] = _mm256_shuffle_ps(u[t + 1], u[t + 3], 0x44);
        r[t + 3] = _mm256_shuffle_ps(u[t + 1], u[t + 3], 0xEE);
      }
      // column d + c: the low lanes of r[c] and r[4 + c] (c < 4), or their high lanes (c >= 4)
      for (int c = 0; c < 4; ++c) {
        _mm256_storeu_ps(dst + (d + c) * kBc + j, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
        _mm256_storeu_ps(dst + (d + 4 + c) * kBc + j, _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
      }
    }
    for (; d < D; ++d)
      for (int t = 0; t < 8; ++t) dst[d * kBc + j + t] = src[t][d];
  }
  for (; j < n; ++j) {
    const float* src = v.row(b, r0 + j, h);
    for (int64_t d = 0; d < D; ++d) dst[d * kBc + j] = src[d];
  }
}
#endif

// The loads per ISA level, like the products: the conversions (bf16, fp16) and the scaling then
// run on the level's vectors.
template <class S, class T>
GENEXT_CPU_TARGET_V3 void load_rows_v3(const View<S>& v, int64_t b, int64_t r0, int64_t nr,
                                       int64_t h, int64_t D, int64_t Dp, T mul, T* dst) {
  load_rows_impl(v, b, r0, nr, h, D, Dp, mul, dst);
}
template <class S, class T>
GENEXT_CPU_TARGET_V3 void load_cols_v3(const View<S>& v, int64_t b, int64_t r0, int64_t n,
                                       int64_t h, int64_t D, T* dst) {
  load_cols_impl(v, b, r0, n, h, D, dst);
}
template <class S, class T>
GENEXT_CPU_TARGET_V4 void load_rows_v4(const View<S>& v, int64_t b, int64_t r0, int64_t nr,
                                       int64_t h, int64_t D, int64_t Dp, T mul, T* dst) {
  load_rows_impl(v, b, r0, nr, h, D, Dp, mul, dst);
}
template <class S, class T>
GENEXT_CPU_TARGET_V4 void load_cols_v4(const View<S>& v, int64_t b, int64_t r0, int64_t n,
                                       int64_t h, int64_t D, T* dst) {
  load_cols_impl(v, b, r0, n, h, D, dst);
}
template <class S, class T>
void load_rows(const View<S>& v, int64_t b, int64_t r0, int64_t nr, int64_t h, int64_t D,
               int64_t Dp, T mul, T* dst) {
  switch (simd::cpu_level_detected()) {
    case 4: return load_rows_v4(v, b, r0, nr, h, D, Dp, mul, dst);
    case 3: return load_rows_v3(v, b, r0, nr, h, D, Dp, mul, dst);
    default: return load_rows_impl(v, b, r0, nr, h, D, Dp, mul, dst);
  }
}
template <class S, class T>
void load_cols(const View<S>& v, int64_t b, int64_t r0, int64_t n, int64_t h, int64_t D, T* dst) {
#if GENEXT_CPU_LEVELS
  if constexpr (std::is_same_v<S, float> && std::is_same_v<T, float>) {
    if (simd::cpu_level_detected() >= 3) return load_cols_f32_avx2(v, b, r0, n, h, D, dst);
  }
#endif
  switch (simd::cpu_level_detected()) {
    case 4: return load_cols_v4(v, b, r0, n, h, D, dst);
    case 3: return load_cols_v3(v, b, r0, n, h, D, dst);
    default: return load_cols_impl(v, b, r0, n, h, D, dst);
  }
}

// ---- entry points -------------------------------------------------------------------------------
// Float: one explicit version per ISA level, each on the level's own vector width and register
// block, picked at run time (simd::cpu_level). Double (the gradcheck path): once, baseline. The two
// passes use three of the four routines each.

#define FA_ROUTINES(T, NAME, ATTR, V, R, W)                                                        \
  [[maybe_unused]] ATTR void qk_tile_##NAME(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, \
                                            int64_t nr, int64_t nc) {                              \
    qk_tile_impl<T, V, R, W>(A, lda, Bt, D, S, nr, nc);                                            \
  }                                                                                                \
  [[maybe_unused]] ATTR void accum_tile_##NAME(T* Out, int64_t ldo, const T* C, int64_t cr,        \
                                               int64_t cc, const T* In, int64_t ldi, int64_t nr,   \
                                               int64_t nc, int64_t Dp, const T* row_scale) {       \
    accum_tile_impl<T, V, R, W>(Out, ldo, C, cr, cc, In, ldi, nr, nc, Dp, row_scale);              \
  }                                                                                                \
  [[maybe_unused]] ATTR void softmax_fwd_##NAME(T* S, int64_t nr, int64_t nc, const int32_t* nvis, \
                                                T* m, T* l, T* alpha) {                            \
    softmax_fwd_impl<T, V>(S, nr, nc, nvis, m, l, alpha);                                          \
  }                                                                                                \
  [[maybe_unused]] ATTR void softmax_bwd_##NAME(                                                   \
      T* S, T* dP, int64_t nr, int64_t nc, const int32_t* nvis, const T* lse, const T* delta) {    \
    softmax_bwd_impl<T, V>(S, dP, nr, nc, nvis, lse, delta);                                       \
  }

FA_ROUTINES(float, v4, GENEXT_CPU_TARGET_V4, f32x16, 4, 4)
FA_ROUTINES(float, v3, GENEXT_CPU_TARGET_V3, simd::f32x8, 6, 2)
FA_ROUTINES(float, base, , simd::f32x4, 6, 2)
FA_ROUTINES(double, base, , f64x16, 4, 4)
#undef FA_ROUTINES

// The routine for this CPU's level (double: the one version).
#define FA_DISPATCH(NAME, ...)                                                                     \
  switch (simd::cpu_level_detected()) {                                                            \
    case 4: return NAME##_v4(__VA_ARGS__);                                                         \
    case 3: return NAME##_v3(__VA_ARGS__);                                                         \
    default: return NAME##_base(__VA_ARGS__);                                                      \
  }

[[maybe_unused]] void qk_tile(const float* A, int64_t lda, const float* Bt, int64_t D, float* S,
                              int64_t nr, int64_t nc) {
  FA_DISPATCH(qk_tile, A, lda, Bt, D, S, nr, nc)
}
[[maybe_unused]] void accum_tile(float* Out, int64_t ldo, const float* C, int64_t cr, int64_t cc,
                                 const float* In, int64_t ldi, int64_t nr, int64_t nc, int64_t Dp,
                                 const float* row_scale) {
  FA_DISPATCH(accum_tile, Out, ldo, C, cr, cc, In, ldi, nr, nc, Dp, row_scale)
}
[[maybe_unused]] void softmax_fwd(float* S, int64_t nr, int64_t nc, const int32_t* nvis, float* m,
                                  float* l, float* alpha) {
  FA_DISPATCH(softmax_fwd, S, nr, nc, nvis, m, l, alpha)
}
[[maybe_unused]] void softmax_bwd(float* S, float* dP, int64_t nr, int64_t nc, const int32_t* nvis,
                                  const float* lse, const float* delta) {
  FA_DISPATCH(softmax_bwd, S, dP, nr, nc, nvis, lse, delta)
}
#undef FA_DISPATCH

[[maybe_unused]] void qk_tile(const double* A, int64_t lda, const double* Bt, int64_t D, double* S,
                              int64_t nr, int64_t nc) {
  qk_tile_base(A, lda, Bt, D, S, nr, nc);
}
[[maybe_unused]] void accum_tile(double* Out, int64_t ldo, const double* C, int64_t cr, int64_t cc,
                                 const double* In, int64_t ldi, int64_t nr, int64_t nc, int64_t Dp,
                                 const double* row_scale) {
  accum_tile_base(Out, ldo, C, cr, cc, In, ldi, nr, nc, Dp, row_scale);
}
[[maybe_unused]] void softmax_fwd(double* S, int64_t nr, int64_t nc, const int32_t* nvis, double* m,
                                  double* l, double* alpha) {
  softmax_fwd_base(S, nr, nc, nvis, m, l, alpha);
}
[[maybe_unused]] void softmax_bwd(double* S, double* dP, int64_t nr, int64_t nc,
                                  const int32_t* nvis, const double* lse, const double* delta) {
  softmax_bwd_base(S, dP, nr, nc, nvis, lse, delta);
}

}  // namespace
}  // namespace genext::fa::cpu
