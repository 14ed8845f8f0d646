// Inner loops of the GroupNorm(+SiLU) CPU kernel, included by group_norm_silu_cpu.cpp only.
// Plain C++ on raw pointers; the float32 entry points are compiled per ISA level and chosen when
// the library loads (GENEXT_CPU_CLONES); exp is a polynomial the compiler vectorises.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cpu_simd.h"

namespace genext::gn {
namespace {

// ---- element math ---------------------------------------------------------------------------

// The reductions over runs use 16-float vectors (common/cpu_simd.h) explicitly, because the
// auto-vectoriser turned the 16-lane accumulator loops into in-order scalar adds.
using simd::f32x16;
using simd::i32x16;
using simd::splat;
constexpr int kVec = simd::kLanes;

GENEXT_INLINE f32x16 load16(const float* p) { return simd::load<f32x16>(p); }
GENEXT_INLINE double hsum(f32x16 v) { return simd::hsum<double>(v); }

// sigmoid(z) from t = exp(-|z|) in (0, 1]: 1/(1+t) for z >= 0, t/(1+t) below. Only a non-positive
// exponent is needed, so the range is handled in integer arithmetic before simd::exp_core (which
// takes [-100, 88]): x = -|z| by setting the sign bit, x clamped at -100 by an integer min on its
// bits (for negative floats a larger bit pattern is a larger magnitude). (A float clamp written as
// ternaries made GCC split the vector loop into masked branches that each ran the division: three
// vdivps per vector instead of one, 5x slower.) V is float or f32x16.
template <class V>
GENEXT_INLINE V sigmoid_v(V z) {
  using I = typename simd::IntLanes<V>::I;
  constexpr int32_t kMinus100 = 0xC2C80000 - 0x100000000LL;  // bits of -100.0f as int32
  I xb = std::bit_cast<I>(z) | splat<I>(INT32_MIN);          // -|z|
  xb = xb < splat<I>(kMinus100) ? xb : splat<I>(kMinus100);  // max(-|z|, -100)
  const V t = simd::exp_core(std::bit_cast<V>(xb));
  return (z >= splat<V>(0.0f) ? splat<V>(1.0f) : t) / (1.0f + t);
}
GENEXT_INLINE float sigmoid_t(float z) { return sigmoid_v(z); }
GENEXT_INLINE f32x16 sigmoid_t(f32x16 z) { return sigmoid_v(z); }
GENEXT_INLINE double sigmoid_t(double z) { return 1.0 / (1.0 + std::exp(-z)); }

template <bool kSilu, class T>
GENEXT_INLINE T act(T z) {
  if constexpr (kSilu) return z * sigmoid_t(z);
  return z;
}
// d act / d z
template <bool kSilu, class T>
GENEXT_INLINE T act_grad(T z) {
  if constexpr (kSilu) {
    const T s = sigmoid_t(z);
    return s * (1.0f + z * (1.0f - s));
  }
  return splat<T>(1.0f);
}

// Per-channel parameters: one value for a whole NCS plane, or an array over C for an NSC row.
template <class T>
struct Bcast {
  T v;
  GENEXT_INLINE T operator[](int64_t) const { return v; }
};
template <class T>
struct Arr {
  const T* __restrict__ p;
  GENEXT_INLINE T operator[](int64_t i) const { return p[i]; }
};

constexpr int64_t kFlush = 1024;  // values summed in float before adding into double

// ---- loops (templates; the float32 instances below are the cloned entry points) -----------------

// s1 += sum(x - shift), s2 += sum((x - shift)^2) over a contiguous run.
template <class T>
GENEXT_INLINE void sums_run(const T* x, int64_t n, T shift, double* s1, double* s2) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {  // 16-wide vectors, added into double every kFlush
    const f32x16 sh = splat<f32x16>(shift);
    for (; i + kVec <= n;) {
      const int64_t end = std::min(n, i + kFlush) - kVec;
      f32x16 a1{}, a2{};
      for (; i <= end; i += kVec) {
        const f32x16 d = load16(x + i) - sh;
        a1 += d;
        a2 += d * d;
      }
      *s1 += hsum(a1);
      *s2 += hsum(a2);
    }
  }
  for (; i < n; ++i) {  // the scalar tail; all of it for double
    const double d = double(x[i]) - double(shift);
    *s1 += d;
    *s2 += d * d;
  }
}

// Column sums of (x - shift[c]) and its square over `rows` rows of C values; s1/s2 are (C,).
template <class T>
GENEXT_INLINE void sums_cols(const T* __restrict__ x, int64_t rows, int64_t C,
                             const T* __restrict__ shift, T* __restrict__ acc1,
                             T* __restrict__ acc2, double* __restrict__ s1,
                             double* __restrict__ s2) {
  for (int64_t r0 = 0; r0 < rows; r0 += kFlush / 8) {
    const int64_t r1 = std::min(rows, r0 + kFlush / 8);
    std::fill(acc1, acc1 + C, T(0));
    std::fill(acc2, acc2 + C, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const T d = xr[c] - shift[c];
        acc1[c] += d;
        acc2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) s1[c] += acc1[c], s2[c] += acc2[c];
  }
}

// y = act((x - m) * a + b)
template <bool kSilu, class T, class P>
GENEXT_INLINE void fwd_loop(const T* __restrict__ x, T* __restrict__ y, int64_t n, P m, P a, P b) {
  for (int64_t i = 0; i < n; ++i) y[i] = act<kSilu>((x[i] - m[i]) * a[i] + b[i]);
}

// Backward sums over a contiguous run: A += sum(g), D += sum(g * xhat), with
// xhat = (x - m) * rs, z = xhat * w + b, g = dy * act'(z).
template <bool kSilu, class T>
GENEXT_INLINE void bwd_sums_run(const T* __restrict__ x, const T* __restrict__ dy, int64_t n, T m,
                                T rs, T w, T b, double* __restrict__ A, double* __restrict__ D) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    const f32x16 vm = splat<f32x16>(m), vrs = splat<f32x16>(rs), vw = splat<f32x16>(w),
                 vb = splat<f32x16>(b);
    for (; i + kVec <= n;) {
      const int64_t end = std::min(n, i + kFlush) - kVec;
      f32x16 a1{}, a2{};
      for (; i <= end; i += kVec) {
        const f32x16 xh = (load16(x + i) - vm) * vrs;
        const f32x16 g = load16(dy + i) * act_grad<kSilu>(xh * vw + vb);
        a1 += g;
        a2 += g * xh;
      }
      *A += hsum(a1);
      *D += hsum(a2);
    }
  }
  for (; i < n; ++i) {
    const T xh = (x[i] - m) * rs;
    const T g = dy[i] * act_grad<kSilu>(xh * w + b);
    *A += double(g);
    *D += double(g * xh);
  }
}

// Column version of bwd_sums_run for NSC rows; parameters are (C,) arrays; A/D are (C,).
template <bool kSilu, class T>
GENEXT_INLINE void bwd_sums_cols(const T* __restrict__ x, const T* __restrict__ dy, int64_t rows,
                                 int64_t C, const T* __restrict__ m, const T* __restrict__ rs,
                                 const T* __restrict__ w, const T* __restrict__ b,
                                 T* __restrict__ acc1, T* __restrict__ acc2, double* __restrict__ A,
                                 double* __restrict__ D) {
  for (int64_t r0 = 0; r0 < rows; r0 += kFlush / 8) {
    const int64_t r1 = std::min(rows, r0 + kFlush / 8);
    std::fill(acc1, acc1 + C, T(0));
    std::fill(acc2, acc2 + C, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * C;
      const T* gr = dy + r * C;
      for (int64_t c = 0; c < C; ++c) {
        const T xh = (xr[c] - m[c]) * rs[c];
        const T g = gr[c] * act_grad<kSilu>(xh * w[c] + b[c]);
        acc1[c] += g;
        acc2[c] += g * xh;
      }
    }
    for (int64_t c = 0; c < C; ++c) A[c] += acc1[c], D[c] += acc2[c];
  }
}

// dx = rs * (w * g - k1 - xhat * k2)
template <bool kSilu, class T, class P>
GENEXT_INLINE void bwd_dx_loop(const T* __restrict__ x, const T* __restrict__ dy,
                               T* __restrict__ dx, int64_t n, P m, P rs, P w, P b, P k1, P k2) {
  for (int64_t i = 0; i < n; ++i) {
    const T xh = (x[i] - m[i]) * rs[i];
    const T g = dy[i] * act_grad<kSilu>(xh * w[i] + b[i]);
    dx[i] = rs[i] * (w[i] * g - k1[i] - xh * k2[i]);
  }
}

// ---- cloned entry points: one per loop and compute type -----------------------------------------
// float: compiled once per ISA level (GENEXT_CPU_CLONES); double: the same templates, compiled
// once.

#define GN_ENTRY_POINTS(T, ATTR, SUF)                                                              \
  ATTR void sums_run_##SUF(const T* x, int64_t n, T shift, double* s1, double* s2) {               \
    sums_run<T>(x, n, shift, s1, s2);                                                              \
  }                                                                                                \
  ATTR void sums_cols_##SUF(const T* x, int64_t rows, int64_t C, const T* shift, T* a1, T* a2,     \
                            double* s1, double* s2) {                                              \
    sums_cols<T>(x, rows, C, shift, a1, a2, s1, s2);                                               \
  }                                                                                                \
  ATTR void fwd_run_##SUF(const T* x, T* y, int64_t n, T m, T a, T b, bool silu) {                 \
    if (silu)                                                                                      \
      fwd_loop<true>(x, y, n, Bcast<T>{m}, Bcast<T>{a}, Bcast<T>{b});                              \
    else                                                                                           \
      fwd_loop<false>(x, y, n, Bcast<T>{m}, Bcast<T>{a}, Bcast<T>{b});                             \
  }                                                                                                \
  ATTR void fwd_row_##SUF(const T* x, T* y, int64_t C, const T* m, const T* a, const T* b,         \
                          bool silu) {                                                             \
    if (silu)                                                                                      \
      fwd_loop<true>(x, y, C, Arr<T>{m}, Arr<T>{a}, Arr<T>{b});                                    \
    else                                                                                           \
      fwd_loop<false>(x, y, C, Arr<T>{m}, Arr<T>{a}, Arr<T>{b});                                   \
  }                                                                                                \
  ATTR void bwd_sums_run_##SUF(const T* x, const T* dy, int64_t n, T m, T rs, T w, T b, bool silu, \
                               double* A, double* D) {                                             \
    if (silu)                                                                                      \
      bwd_sums_run<true>(x, dy, n, m, rs, w, b, A, D);                                             \
    else                                                                                           \
      bwd_sums_run<false>(x, dy, n, m, rs, w, b, A, D);                                            \
  }                                                                                                \
  ATTR void bwd_sums_cols_##SUF(const T* x, const T* dy, int64_t rows, int64_t C, const T* m,      \
                                const T* rs, const T* w, const T* b, bool silu, T* a1, T* a2,      \
                                double* A, double* D) {                                            \
    if (silu)                                                                                      \
      bwd_sums_cols<true>(x, dy, rows, C, m, rs, w, b, a1, a2, A, D);                              \
    else                                                                                           \
      bwd_sums_cols<false>(x, dy, rows, C, m, rs, w, b, a1, a2, A, D);                             \
  }                                                                                                \
  ATTR void bwd_dx_run_##SUF(const T* x, const T* dy, T* dx, int64_t n, T m, T rs, T w, T b, T k1, \
                             T k2, bool silu) {                                                    \
    if (silu)                                                                                      \
      bwd_dx_loop<true>(x, dy, dx, n, Bcast<T>{m}, Bcast<T>{rs}, Bcast<T>{w}, Bcast<T>{b},         \
                        Bcast<T>{k1}, Bcast<T>{k2});                                               \
    else                                                                                           \
      bwd_dx_loop<false>(x, dy, dx, n, Bcast<T>{m}, Bcast<T>{rs}, Bcast<T>{w}, Bcast<T>{b},        \
                         Bcast<T>{k1}, Bcast<T>{k2});                                              \
  }                                                                                                \
  ATTR void bwd_dx_row_##SUF(const T* x, const T* dy, T* dx, int64_t C, const T* m, const T* rs,   \
                             const T* w, const T* b, const T* k1, const T* k2, bool silu) {        \
    if (silu)                                                                                      \
      bwd_dx_loop<true>(x, dy, dx, C, Arr<T>{m}, Arr<T>{rs}, Arr<T>{w}, Arr<T>{b}, Arr<T>{k1},     \
                        Arr<T>{k2});                                                               \
    else                                                                                           \
      bwd_dx_loop<false>(x, dy, dx, C, Arr<T>{m}, Arr<T>{rs}, Arr<T>{w}, Arr<T>{b}, Arr<T>{k1},    \
                         Arr<T>{k2});                                                              \
  }

GN_ENTRY_POINTS(float, GENEXT_CPU_CLONES, f32)
GN_ENTRY_POINTS(double, , f64)
#undef GN_ENTRY_POINTS

// Overloads so the drivers below can be written once for float and double.
#define GN_OVERLOADS(T, SUF)                                                                       \
  inline void sums_run_k(const T* x, int64_t n, T s, double* s1, double* s2) {                     \
    sums_run_##SUF(x, n, s, s1, s2);                                                               \
  }                                                                                                \
  inline void sums_cols_k(const T* x, int64_t r, int64_t C, const T* s, T* a1, T* a2, double* s1,  \
                          double* s2) {                                                            \
    sums_cols_##SUF(x, r, C, s, a1, a2, s1, s2);                                                   \
  }                                                                                                \
  inline void fwd_run_k(const T* x, T* y, int64_t n, T m, T a, T b, bool silu) {                   \
    fwd_run_##SUF(x, y, n, m, a, b, silu);                                                         \
  }                                                                                                \
  inline void fwd_row_k(const T* x, T* y, int64_t C, const T* m, const T* a, const T* b,           \
                        bool silu) {                                                               \
    fwd_row_##SUF(x, y, C, m, a, b, silu);                                                         \
  }                                                                                                \
  inline void bwd_sums_run_k(const T* x, const T* dy, int64_t n, T m, T rs, T w, T b, bool silu,   \
                             double* A, double* D) {                                               \
    bwd_sums_run_##SUF(x, dy, n, m, rs, w, b, silu, A, D);                                         \
  }                                                                                                \
  inline void bwd_sums_cols_k(const T* x, const T* dy, int64_t r, int64_t C, const T* m,           \
                              const T* rs, const T* w, const T* b, bool silu, T* a1, T* a2,        \
                              double* A, double* D) {                                              \
    bwd_sums_cols_##SUF(x, dy, r, C, m, rs, w, b, silu, a1, a2, A, D);                             \
  }                                                                                                \
  inline void bwd_dx_run_k(const T* x, const T* dy, T* dx, int64_t n, T m, T rs, T w, T b, T k1,   \
                           T k2, bool silu) {                                                      \
    bwd_dx_run_##SUF(x, dy, dx, n, m, rs, w, b, k1, k2, silu);                                     \
  }                                                                                                \
  inline void bwd_dx_row_k(const T* x, const T* dy, T* dx, int64_t C, const T* m, const T* rs,     \
                           const T* w, const T* b, const T* k1, const T* k2, bool silu) {          \
    bwd_dx_row_##SUF(x, dy, dx, C, m, rs, w, b, k1, k2, silu);                                     \
  }
GN_OVERLOADS(float, f32)
GN_OVERLOADS(double, f64)
#undef GN_OVERLOADS

}  // namespace
}  // namespace genext::gn
