// The AVX-512 tile routines of kvcache_avx512_cpu.h: intrinsics in functions compiled for
// x86-64-v4 (with AVX512-BF16 for the bfloat16 routines), called only where the kernel uses them
// (bf16_dot_enabled(), f32x16_enabled()).
#include "kvcache_attention/kvcache_avx512_cpu.h"

#include <algorithm>
#include <atomic>

#include "common/cpu_simd.h"
#include "kvcache_attention/kvcache_tiles_cpu.h"

#if GENEXT_CPU_LEVELS
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#define KV_AVX512 1
#if __GNUC__ >= 11 && defined(__linux__)  // GCC 11 brought the AMX intrinsics
#define KV_AMX 1
#else
#define KV_AMX 0
#endif
#if __GNUC__ >= 12
#define KV_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
#define KV_AMX_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16,amx-tile,amx-bf16")))
#else
#define KV_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))
#define KV_AMX_TARGET                                                                              \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,amx-tile,amx-bf16")))
#endif
#else
#define KV_AVX512 0
#define KV_AMX 0
#endif

namespace genext::kv {

bool bf16_dot_supported() {
#if KV_AVX512
  static const bool ok = [] {
    __builtin_cpu_init();
    return simd::cpu_level_detected() == 4 && __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

namespace {
// A routine family's switch: on where the CPU runs it, and never on where it does not.
template <bool (*Supported)()>
struct Switch {
  static std::atomic<bool>& flag() {
    static std::atomic<bool> on{Supported()};
    return on;
  }
  static bool get() { return flag().load(std::memory_order_relaxed); }
  static void set(bool on) { flag().store(on && Supported(), std::memory_order_relaxed); }
};
}  // namespace

bool amx_supported() {
#if KV_AMX
  static const bool ok = [] {
    if (!bf16_dot_supported()) return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1u) || !((d >> 24) & 1u)) return false;  // AMX-BF16, AMX-TILE
    // Linux hands out the tile data state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

bool amx_enabled() { return Switch<amx_supported>::get(); }
void set_amx_enabled(bool on) { Switch<amx_supported>::set(on); }

bool bf16_dot_enabled() { return Switch<bf16_dot_supported>::get(); }
void set_bf16_dot_enabled(bool on) { Switch<bf16_dot_supported>::set(on); }
bool f32x16_enabled() { return KV_AVX512 && simd::cpu_level() == 4; }

#if KV_AVX512

namespace {

using simd::f32x16;

// The low and high halves of a 16-lane float vector added: 8 lanes, for tiles::sum8.
GENEXT_CPU_TARGET_V4 inline simd::f32x8 fold16(__m512 a) {
  const __m256 lo = _mm512_castps512_ps256(a);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
  return __builtin_bit_cast(simd::f32x8, _mm256_add_ps(lo, hi));
}

// Element d of a row (c10::BFloat16 is incomplete here: stepped as uint16_t).
inline const c10::BFloat16* at(const c10::BFloat16* row, int64_t d) {
  return reinterpret_cast<const c10::BFloat16*>(reinterpret_cast<const uint16_t*>(row) + d);
}

// Rows [0, RB) of the block at O (stride ldo), elements [d0, d0 + 16 W): alpha-scaled, then the
// float value rows added with their weights. Each value vector is loaded once for the RB rows;
// `last` masks the elements of the last vector that lie inside the head dim. A single row keeps a
// second sum for the odd keys, added after the pairs of keys: one sum's chain of 4-cycle FMAs would
// bound its speed. The loops over rows and vectors are unrolled before GCC decides where the arrays
// live: left to later passes, it keeps them in memory besides the registers and stores every
// accumulator on each key.
template <int RB, int W>
GENEXT_CPU_TARGET_V4 inline void accum_block(float* O, int64_t ldo, const float* P,
                                             const float* const* vrows, int64_t nc, int64_t d0,
                                             const float* alpha, __mmask16 last) {
  f32x16 acc[RB][W];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w)
      acc[r][w] = _mm512_mul_ps(a, _mm512_loadu_ps(O + r * ldo + d0 + 16 * w));
  }
  int64_t j = 0;
  if constexpr (RB == 1) {
    f32x16 odd[W];
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) odd[w] = _mm512_setzero_ps();
    for (; j + 2 <= nc; j += 2) {
      const float* v0 = vrows[j] + d0;
      const float* v1 = vrows[j + 1] + d0;
      const __m512 p0 = _mm512_set1_ps(P[j]), p1 = _mm512_set1_ps(P[j + 1]);
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) {
        const __mmask16 m = w == W - 1 ? last : __mmask16(0xFFFF);
        acc[0][w] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(m, v0 + 16 * w), acc[0][w]);
        odd[w] = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(m, v1 + 16 * w), odd[w]);
      }
    }
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) acc[0][w] = _mm512_add_ps(acc[0][w], odd[w]);
  }
  for (; j < nc; ++j) {
    const float* v = vrows[j] + d0;
    f32x16 vv[W];
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w)
      vv[w] = _mm512_maskz_loadu_ps(w == W - 1 ? last : __mmask16(0xFFFF), v + 16 * w);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      const __m512 p = _mm512_set1_ps(P[r * kTile + j]);
#pragma GCC unroll 16
      for (int w = 0; w < W; ++w) acc[r][w] = _mm512_fmadd_ps(p, vv[w], acc[r][w]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(O + r * ldo + d0 + 16 * w, acc[r][w]);
}

// Elements [0, 32) of a bfloat16 row's chunk as float: the even elements (2i in lane i) and the
// odd ones (2i + 1 in lane i), one integer op each on a single load (a bfloat16 is the high half
// of its float; element 2i is the low half of 32-bit lane i and 2i + 1 its high half). Widening
// sixteen elements in order takes a shuffle and a shift instead, and the shuffles and FMAs of
// 16-lane vectors share two ports.
struct EvenOdd {
  __m512 even, odd;
};
GENEXT_CPU_TARGET_V4 inline EvenOdd load32(const c10::BFloat16* p, __mmask32 n_mask) {
  const __m512i raw = _mm512_maskz_loadu_epi16(n_mask, p);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(raw, 16)),
          _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(int32_t(0xFFFF0000u))))};
}

// accum_block for bfloat16 rows, on the even/odd split of load32: rows [0, RB) of the block at O,
// elements [d0, d0 + 32 C). The accumulators hold each 32-element chunk as its even and odd
// elements; O is split into them when loaded and interleaved back when stored (four shuffles a
// chunk per tile of keys, against two ops per 16 elements for every key). `last` masks the elements
// of the last chunk inside the head dim; O's rows end at the next multiple of 16 (`hi_last`:
// whether the last chunk's upper 16 elements are inside it).
template <int RB, int C>
GENEXT_CPU_TARGET_V4 inline void accum_block_eo(float* O, int64_t ldo, const float* P,
                                                const c10::BFloat16* const* vrows, int64_t nc,
                                                int64_t d0, const float* alpha, __mmask32 last,
                                                bool hi_last) {
  const __m512i even_idx =
      _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd_idx = _mm512_add_epi32(even_idx, _mm512_set1_epi32(1));
  const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
  f32x16 ev[RB][C], od[RB][C];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      const float* o = O + r * ldo + d0 + 32 * c;
      const __m512 lo = _mm512_loadu_ps(o);
      const __m512 hi = c == C - 1 && !hi_last ? _mm512_setzero_ps() : _mm512_loadu_ps(o + 16);
      ev[r][c] = _mm512_mul_ps(a, _mm512_permutex2var_ps(lo, even_idx, hi));
      od[r][c] = _mm512_mul_ps(a, _mm512_permutex2var_ps(lo, odd_idx, hi));
    }
  }
  int64_t j = 0;
  if constexpr (RB == 1) {  // a second pair of sums for the odd keys, as in accum_block
    f32x16 ev2[C], od2[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) ev2[c] = od2[c] = _mm512_setzero_ps();
    for (; j + 2 <= nc; j += 2) {
      const c10::BFloat16* v0 = at(vrows[j], d0);
      const c10::BFloat16* v1 = at(vrows[j + 1], d0);
      const __m512 p0 = _mm512_set1_ps(P[j]), p1 = _mm512_set1_ps(P[j + 1]);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        const __mmask32 m = c == C - 1 ? last : __mmask32(0xFFFFFFFFu);
        const EvenOdd x0 = load32(at(v0, 32 * c), m), x1 = load32(at(v1, 32 * c), m);
        ev[0][c] = _mm512_fmadd_ps(p0, x0.even, ev[0][c]);
        od[0][c] = _mm512_fmadd_ps(p0, x0.odd, od[0][c]);
        ev2[c] = _mm512_fmadd_ps(p1, x1.even, ev2[c]);
        od2[c] = _mm512_fmadd_ps(p1, x1.odd, od2[c]);
      }
    }
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      ev[0][c] = _mm512_add_ps(ev[0][c], ev2[c]);
      od[0][c] = _mm512_add_ps(od[0][c], od2[c]);
    }
  }
  for (; j < nc; ++j) {
    const c10::BFloat16* v = at(vrows[j], d0);
    EvenOdd x[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c)
      x[c] = load32(at(v, 32 * c), c == C - 1 ? last : __mmask32(0xFFFFFFFFu));
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      const __m512 p = _mm512_set1_ps(P[r * kTile + j]);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) {
        ev[r][c] = _mm512_fmadd_ps(p, x[c].even, ev[r][c]);
        od[r][c] = _mm512_fmadd_ps(p, x[c].odd, od[r][c]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) {
      float* o = O + r * ldo + d0 + 32 * c;
      _mm512_storeu_ps(o, _mm512_permutex2var_ps(ev[r][c], lo_idx, od[r][c]));
      if (c < C - 1 || hi_last)
        _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(ev[r][c], hi_idx, od[r][c]));
    }
}

// Blocks of RB rows over the head dim in chunks of up to 64 elements (4 x 4 accumulators and 4
// value vectors fit the 32 registers): float rows in 16-lane vectors, bfloat16 rows in 32-element
// even/odd chunks.
template <int RB>
GENEXT_CPU_TARGET_V4 inline void accum_rows(float* O, int64_t ldo, const float* P,
                                            const c10::BFloat16* const* vrows, int64_t nc,
                                            int64_t D, const float* alpha) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t left = std::min<int64_t>(64, D - d0);
    const int64_t in_last = left - (left > 32 ? 32 : 0);  // 1..32 elements
    const __mmask32 last =
        in_last >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((uint32_t(1) << in_last) - 1);
    const bool hi_last = in_last > 16;
    if (left > 32)
      accum_block_eo<RB, 2>(O, ldo, P, vrows, nc, d0, alpha, last, hi_last);
    else
      accum_block_eo<RB, 1>(O, ldo, P, vrows, nc, d0, alpha, last, hi_last);
  }
}
template <int RB>
GENEXT_CPU_TARGET_V4 inline void accum_rows(float* O, int64_t ldo, const float* P,
                                            const float* const* vrows, int64_t nc, int64_t D,
                                            const float* alpha) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int64_t left = D - d0;
    const int nv = int(std::min<int64_t>(4, (left + 15) / 16));
    const int64_t in_last = left - 16 * (nv - 1);  // 1..16 elements
    const __mmask16 last = in_last >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << in_last) - 1);
    switch (nv) {
      case 4: accum_block<RB, 4>(O, ldo, P, vrows, nc, d0, alpha, last); break;
      case 3: accum_block<RB, 3>(O, ldo, P, vrows, nc, d0, alpha, last); break;
      case 2: accum_block<RB, 2>(O, ldo, P, vrows, nc, d0, alpha, last); break;
      default: accum_block<RB, 1>(O, ldo, P, vrows, nc, d0, alpha, last); break;
    }
  }
}

// All nr rows: blocks of 4, then the 1 to 3 left.
template <class Row>
GENEXT_CPU_TARGET_V4 inline void accum_all(float* O, int64_t ldo, int64_t nr, const float* P,
                                           const Row* const* vrows, int64_t nc, int64_t D,
                                           const float* alpha) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4)
    accum_rows<4>(O + r * ldo, ldo, P + r * kTile, vrows, nc, D, alpha + r);
  switch (nr - r) {
    case 3: accum_rows<3>(O + r * ldo, ldo, P + r * kTile, vrows, nc, D, alpha + r); break;
    case 2: accum_rows<2>(O + r * ldo, ldo, P + r * kTile, vrows, nc, D, alpha + r); break;
    case 1: accum_rows<1>(O + r * ldo, ldo, P + r * kTile, vrows, nc, D, alpha + r); break;
    default: break;
  }
}

// softmax_f32x16 on R rows at once: each row's 64 scores in four 16-lane vectors, the rows'
// chains of maxima, exponentials and sums independent of each other, so that their latencies
// overlap (one row at a time waits on its own reductions and on the scalar exponential of
// alpha). The rows' results are those of tiles::softmax_f32 but for the order of the sum.
template <int R>
GENEXT_CPU_TARGET_V4 inline void softmax_rows(float* S, const int32_t* nvis, float* m, float* l,
                                              float* alpha) {
  static_assert(kTile == 64, "four 16-lane vectors a row");
  constexpr float kNegInf = -__builtin_inff();
  __mmask16 k[R][4];
  __m512 x[R][4];
  float mx[R], m_use[R];
  __m512 mrow[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const int32_t nv = std::clamp<int32_t>(nvis[r], 0, int32_t(kTile));
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const int32_t n = std::clamp<int32_t>(nv - 16 * c, 0, 16);
      k[r][c] = __mmask16((uint32_t(1) << n) - 1);
      x[r][c] = _mm512_loadu_ps(S + r * kTile + 16 * c);
    }
    // the maximum of the visible scores: max_ps(x, v) keeps v where x is NaN, as the 8-lane
    // routine's compare does
    __m512 v = _mm512_set1_ps(kNegInf);
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) v = _mm512_mask_max_ps(v, k[r][c], x[r][c], v);
    const float red = _mm512_reduce_max_ps(v);
    mx[r] = red > m[r] ? red : m[r];
    m_use[r] = mx[r] == kNegInf ? 0.0f : mx[r];
    mrow[r] = _mm512_set1_ps(m_use[r]);
  }
  float sum[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    __m512 acc = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const f32x16 e = simd::exp_v(f32x16(_mm512_sub_ps(x[r][c], mrow[r])));
      const __m512 p = _mm512_maskz_mov_ps(k[r][c], e);
      _mm512_storeu_ps(S + r * kTile + 16 * c, p);
      acc = _mm512_add_ps(acc, p);
    }
    sum[r] = simd::hsum_tree(f32x16(acc));
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    if (nvis[r] <= 0) {  // P is zero (every lane masked); m and l stay
      alpha[r] = 1.0f;
      continue;
    }
    alpha[r] = m[r] == kNegInf ? 0.0f : simd::exp_v(m[r] - mx[r]);
    l[r] = l[r] * alpha[r] + sum[r];
    m[r] = mx[r];
  }
}

}  // namespace

GENEXT_CPU_TARGET_V4 void softmax_f32x16(float* S, int64_t nr, const int32_t* nvis, float* m,
                                         float* l, float* alpha) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) softmax_rows<4>(S + r * kTile, nvis + r, m + r, l + r, alpha + r);
  switch (nr - r) {
    case 3: softmax_rows<3>(S + r * kTile, nvis + r, m + r, l + r, alpha + r); break;
    case 2: softmax_rows<2>(S + r * kTile, nvis + r, m + r, l + r, alpha + r); break;
    case 1: softmax_rows<1>(S + r * kTile, nvis + r, m + r, l + r, alpha + r); break;
    default: break;
  }
}

KV_BF16_TARGET void scores_bf16(const uint16_t* Q, int64_t ldq, int64_t nr,
                                const c10::BFloat16* const* krows, int64_t nc, int64_t D,
                                float scale, float* S) {
  const int64_t full = D / 32, rem = D % 32;
  const __mmask32 tail = rem ? __mmask32((uint32_t(1) << rem) - 1) : __mmask32(0);
  for (int64_t r = 0; r < nr; ++r) {
    const uint16_t* q = Q + r * ldq;
    for (int64_t j0 = 0; j0 < nc; j0 += 8) {
      const uint16_t* k[8];
#pragma GCC unroll 16
      for (int u = 0; u < 8; ++u) k[u] = reinterpret_cast<const uint16_t*>(krows[j0 + u]);
      f32x16 acc[8];
#pragma GCC unroll 16
      for (int u = 0; u < 8; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t c = 0; c < full; ++c) {
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + 32 * c);
#pragma GCC unroll 16
        for (int u = 0; u < 8; ++u)
          acc[u] = _mm512_dpbf16_ps(acc[u], qv, (__m512bh)_mm512_loadu_si512(k[u] + 32 * c));
      }
      if (rem) {  // the query row is zero-padded; the key rows end at D
        const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + 32 * full);
#pragma GCC unroll 16
        for (int u = 0; u < 8; ++u)
          acc[u] = _mm512_dpbf16_ps(acc[u], qv,
                                    (__m512bh)_mm512_maskz_loadu_epi16(tail, k[u] + 32 * full));
      }
      simd::f32x8 h[8];
#pragma GCC unroll 16
      for (int u = 0; u < 8; ++u) h[u] = fold16(acc[u]);
      simd::store(S + r * kTile + j0, tiles::sum8(h) * scale);
    }
  }
}

KV_BF16_TARGET void accum_bf16(float* O, int64_t ldo, int64_t nr, const float* P,
                               const c10::BFloat16* const* vrows, int64_t nc, int64_t D,
                               const float* alpha) {
  accum_all(O, ldo, nr, P, vrows, nc, D, alpha);
}

GENEXT_CPU_TARGET_V4 void scores_f32x16(const float* Q, int64_t ldq, int64_t nr,
                                        const float* const* krows, int64_t nc, int64_t D,
                                        float* S) {
  const int64_t full = D / 16, rem = D % 16;
  const __mmask16 tail = rem ? __mmask16((1u << rem) - 1) : __mmask16(0);
  for (int64_t r = 0; r < nr; ++r) {
    const float* q = Q + r * ldq;
    for (int64_t j0 = 0; j0 < nc; j0 += 8) {
      const float* const* k = krows + j0;
      f32x16 acc[8];
#pragma GCC unroll 16
      for (int u = 0; u < 8; ++u) acc[u] = _mm512_setzero_ps();
      for (int64_t c = 0; c < full; ++c) {
        const __m512 qv = _mm512_loadu_ps(q + 16 * c);
#pragma GCC unroll 16
        for (int u = 0; u < 8; ++u)
          acc[u] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k[u] + 16 * c), acc[u]);
      }
      if (rem) {  // both rows end at D (the query's padding is not zeroed)
        const __m512 qv = _mm512_maskz_loadu_ps(tail, q + 16 * full);
#pragma GCC unroll 16
        for (int u = 0; u < 8; ++u)
          acc[u] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(tail, k[u] + 16 * full), acc[u]);
      }
      simd::f32x8 h[8];
#pragma GCC unroll 16
      for (int u = 0; u < 8; ++u) h[u] = fold16(acc[u]);
      simd::store(S + r * kTile + j0, tiles::sum8(h));
    }
  }
}

GENEXT_CPU_TARGET_V4 void accum_f32x16(float* O, int64_t ldo, int64_t nr, const float* P,
                                       const float* const* vrows, int64_t nc, int64_t D,
                                       const float* alpha) {
  accum_all(O, ldo, nr, P, vrows, nc, D, alpha);
}

#if KV_AMX

namespace {

// The tiles: C0-C3 the scores of four 16-key blocks (16 rows of nr floats), A4-A5 16 key rows of
// 32 elements (alternating between blocks), B6-B7 the query pairs of a 32-element chunk (16 rows
// of nr pairs). The layout of LDTILECFG's 64-byte operand.
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64);

// Whether the 16 rows from krows[0] on are equally spaced; their first row and spacing in bytes.
inline bool strided16(const c10::BFloat16* const* krows, const char** base, int64_t* stride) {
  const char* p0 = reinterpret_cast<const char*>(krows[0]);
  const int64_t s = reinterpret_cast<const char*>(krows[1]) - p0;
  for (int i = 2; i < 16; ++i)
    if (reinterpret_cast<const char*>(krows[i]) - p0 != int64_t(i) * s) return false;
  *base = p0;
  *stride = s;
  return true;
}

// GCC's tile intrinsics paste their tile numbers into the instruction text: literal numbers only.
// Block i of nb (at most four) adds the products of its rows' chunk at byte `off` with the query
// pairs in tile B into C0-C3, its key rows loaded into A4 or A5 in turn.
#define KV_AMX_CHUNK(B, nb, base, stride, off)                                                     \
  do {                                                                                             \
    _tile_loadd(4, (base)[0] + (off), (stride)[0]);                                                \
    _tile_dpbf16ps(0, 4, B);                                                                       \
    if ((nb) > 1) {                                                                                \
      _tile_loadd(5, (base)[1] + (off), (stride)[1]);                                              \
      _tile_dpbf16ps(1, 5, B);                                                                     \
    }                                                                                              \
    if ((nb) > 2) {                                                                                \
      _tile_loadd(4, (base)[2] + (off), (stride)[2]);                                              \
      _tile_dpbf16ps(2, 4, B);                                                                     \
    }                                                                                              \
    if ((nb) > 3) {                                                                                \
      _tile_loadd(5, (base)[3] + (off), (stride)[3]);                                              \
      _tile_dpbf16ps(3, 5, B);                                                                     \
    }                                                                                              \
  } while (0)

}  // namespace

KV_AMX_TARGET void amx_begin(int64_t nr) {
  TileConfig cfg;
  const uint16_t row_bytes = uint16_t(nr * 4);
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = t == 4 || t == 5 ? uint16_t(64) : row_bytes;
  }
  // GCC does not see LDTILECFG read its operand and drops the stores above without this
  asm volatile("" : : "m"(cfg) : "memory");
  _tile_loadconfig(&cfg);
}

KV_AMX_TARGET void amx_end() { _tile_release(); }

void amx_pack_q(const uint16_t* Q, int64_t ldq, int64_t nr, int64_t D, uint16_t* Qv) {
  for (int64_t c = 0; c < D / 32; ++c)
    for (int64_t i = 0; i < 16; ++i)
      for (int64_t n = 0; n < nr; ++n)
        for (int64_t e = 0; e < 2; ++e)
          Qv[(16 * c + i) * 2 * nr + 2 * n + e] = Q[n * ldq + 32 * c + 2 * i + e];
}

KV_AMX_TARGET int64_t amx_scores_bf16(const uint16_t* Qv, int64_t nr,
                                      const c10::BFloat16* const* krows, int64_t nc, int64_t D,
                                      float scale, float* S, float* buf) {
  // GCC's tile loads take their addresses in registers and declare no memory read: the query
  // pairs written before this call (and the key rows) must not look dead to it
  asm volatile("" : : : "memory");
  const int64_t chunks = D / 32, qbytes = 4 * nr;
  const auto q_chunk = [&](int64_t c) { return Qv + 32 * nr * c; };
  if (chunks <= 2) {  // the query pairs stay in B6 (and B7) for every block
    _tile_loadd(6, q_chunk(0), qbytes);
    if (chunks == 2) _tile_loadd(7, q_chunk(1), qbytes);
  }
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i rows_idx =
      _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_epi32(int32_t(nr)));
  int64_t done = 0;
  while (done + 16 <= nc) {
    // up to four 16-key blocks of equally spaced rows
    const char* base[4];
    int64_t stride[4];
    int nb = 0;
    while (nb < 4 && done + 16 * (nb + 1) <= nc &&
           strided16(krows + done + 16 * nb, &base[nb], &stride[nb]))
      ++nb;
    if (nb == 0) break;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < chunks; ++c) {
      if (chunks <= 2) {
        if (c == 0)
          KV_AMX_CHUNK(6, nb, base, stride, 0);
        else
          KV_AMX_CHUNK(7, nb, base, stride, 64);
      } else if (c % 2 == 0) {
        _tile_loadd(6, q_chunk(c), qbytes);
        KV_AMX_CHUNK(6, nb, base, stride, 64 * c);
      } else {
        _tile_loadd(7, q_chunk(c), qbytes);
        KV_AMX_CHUNK(7, nb, base, stride, 64 * c);
      }
    }
    for (int i = 0; i < nb; ++i) {
      // block i's scores are 16 keys x nr rows; S holds each query row's keys in a row
      switch (i) {
        case 0: _tile_stored(0, buf, qbytes); break;
        case 1: _tile_stored(1, buf, qbytes); break;
        case 2: _tile_stored(2, buf, qbytes); break;
        default: _tile_stored(3, buf, qbytes); break;
      }
      for (int64_t r = 0; r < nr; ++r)
        _mm512_storeu_ps(S + r * kTile + done + 16 * i,
                         _mm512_mul_ps(_mm512_i32gather_ps(rows_idx, buf + r, 4), vs));
    }
    done += 16 * nb;
    if (nb < 4) break;  // the end, or a block whose rows are not equally spaced
  }
  return done;
}

#endif  // KV_AMX

KV_BF16_TARGET void store_bf16(const float* O, float inv, int64_t D, uint16_t* out) {
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512i qnan = _mm512_set1_epi32(0x7fc0);
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 k = D - d >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (D - d)) - 1);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, O + d), vi);
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, bias), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), qnan);
    _mm256_mask_storeu_epi16(out + d, k, _mm512_cvtepi32_epi16(r));
  }
}

#else  // no per-ISA versions: bf16_dot_supported() and f32x16_enabled() are false, these never run

void scores_bf16(const uint16_t*, int64_t, int64_t, const c10::BFloat16* const*, int64_t, int64_t,
                 float, float*) {
  __builtin_trap();
}
void accum_bf16(float*, int64_t, int64_t, const float*, const c10::BFloat16* const*, int64_t,
                int64_t, const float*) {
  __builtin_trap();
}
void store_bf16(const float*, float, int64_t, uint16_t*) { __builtin_trap(); }
void softmax_f32x16(float*, int64_t, const int32_t*, float*, float*, float*) { __builtin_trap(); }
void scores_f32x16(const float*, int64_t, int64_t, const float* const*, int64_t, int64_t, float*) {
  __builtin_trap();
}
void accum_f32x16(float*, int64_t, int64_t, const float*, const float* const*, int64_t, int64_t,
                  const float*) {
  __builtin_trap();
}

#endif

#if !KV_AMX  // amx_supported() is false: these never run
void amx_begin(int64_t) { __builtin_trap(); }
void amx_end() { __builtin_trap(); }
void amx_pack_q(const uint16_t*, int64_t, int64_t, int64_t, uint16_t*) { __builtin_trap(); }
int64_t amx_scores_bf16(const uint16_t*, int64_t, const c10::BFloat16* const*, int64_t, int64_t,
                        float, float*, float*) {
  __builtin_trap();
}
#endif

}  // namespace genext::kv
