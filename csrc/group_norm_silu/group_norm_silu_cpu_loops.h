// Inner loops of the GroupNorm(+SiLU) CPU kernel, included by group_norm_silu_cpu.cpp only.
// Plain C++ on raw pointers. Storage types: float, bfloat16 (as its uint16_t bits, converted to and
// from float inside the loops, a vector at a time) and double. The loops are templates over the
// float vector V: 8 lanes (one ymm register at x86-64-v3), compiled per ISA level
// (GENEXT_CPU_CLONES), and 16 lanes (one zmm register), compiled for x86-64-v4 only and used where
// the CPU runs that level. They are written with explicit vectors (common/cpu_simd.h) because the
// auto-vectoriser left the sigmoid loops scalar, and never wider than the machine's register:
// GCC lowers a select (a ? b : c) on vectors wider than that lane by lane through general
// registers, which made a 16-lane version several times slower at x86-64-v3. double runs the same
// formulas one value at a time.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/cpu_simd.h"

namespace genext::gn {
namespace {

using simd::splat;
// Lambdas called from a cloned function must be inlined into it to get its instruction set.
#define GN_INL __attribute__((always_inline))

// bfloat16 is passed as its bits.
using bf16_t = uint16_t;

// The float vectors the loops take.
template <class V>
concept FloatVec = std::is_same_v<V, simd::f32x8> || std::is_same_v<V, simd::f32x16>;

// The companions of a float vector V of kN lanes: its integer lanes I and U, and H (kN 16-bit
// values) and H2 (2 kN of them).
template <class V>
struct Lanes;
template <>
struct Lanes<simd::f32x8> {
  static constexpr int kN = 8;
  using I = simd::i32x8;
  typedef uint32_t U __attribute__((vector_size(8 * sizeof(uint32_t))));
  typedef uint16_t H __attribute__((vector_size(8 * sizeof(uint16_t))));
  typedef uint16_t H2 __attribute__((vector_size(16 * sizeof(uint16_t))));
};
template <>
struct Lanes<simd::f32x16> {
  static constexpr int kN = 16;
  using I = simd::i32x16;
  typedef uint32_t U __attribute__((vector_size(16 * sizeof(uint32_t))));
  typedef uint16_t H __attribute__((vector_size(16 * sizeof(uint16_t))));
  typedef uint16_t H2 __attribute__((vector_size(32 * sizeof(uint16_t))));
};

// ---- loads and stores of a vector of values as floats -------------------------------------------

template <class V>
GENEXT_INLINE V loadv(const float* p) {
  return simd::load<V>(p);
}
// bf16 bits to float: each 16-bit value becomes the high half of a 32-bit lane (interleaving
// with zeros: 3 instructions on x86-64-v3, where a zero-extending conversion took 5; one permute
// at x86-64-v4).
template <class V>
GENEXT_INLINE V loadv(const bf16_t* p) {
  using L = Lanes<V>;
  const typename L::H h = simd::load<typename L::H>(p), z{};
  if constexpr (L::kN == 8) {
    const typename L::H2 w =
        __builtin_shufflevector(z, h, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    return __builtin_bit_cast(V, w);
  } else {
    const typename L::H2 w =
        __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24,
                                9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    return __builtin_bit_cast(V, w);
  }
}
template <class V>
GENEXT_INLINE void storev(float* p, V v) {
  simd::store(p, v);
}
// Round to nearest even, NaN to the quiet NaN 0x7fc0 (as c10::BFloat16 converts).
template <class V>
GENEXT_INLINE void storev(bf16_t* p, V v) {
  using U = typename Lanes<V>::U;
  const U u = __builtin_bit_cast(U, v);
  const U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U o = v != v ? U{} + 0x7fc0u : r;
  simd::store(p, __builtin_convertvector(o, typename Lanes<V>::H));
}
// The first n < kN values; the other lanes are 0.
template <class V, class S>
GENEXT_INLINE V loadv_part(const S* p, int64_t n) {
  S tmp[Lanes<V>::kN] = {};
  std::memcpy(tmp, p, size_t(n) * sizeof(S));
  return loadv<V>(tmp);
}
template <class V, class S>
GENEXT_INLINE void storev_part(S* p, V v, int64_t n) {
  S tmp[Lanes<V>::kN];
  storev(tmp, v);
  std::memcpy(p, tmp, size_t(n) * sizeof(S));
}
GENEXT_INLINE float to_f(float v) { return v; }
GENEXT_INLINE float to_f(bf16_t v) { return std::bit_cast<float>(uint32_t(v) << 16); }
GENEXT_INLINE double to_f(double v) { return v; }

typedef double vd4 __attribute__((vector_size(4 * sizeof(double))));
// The lanes of v in double, folded to 4: two 4-double halves added (and for 16 lanes the two
// 8-float halves first converted and added in double).
template <FloatVec V>
GENEXT_INLINE vd4 fold4(V v) {
  if constexpr (Lanes<V>::kN == 8) {
    return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), vd4) +
           __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), vd4);
  } else {
    typedef double vd8 __attribute__((vector_size(8 * sizeof(double))));
    const vd8 s =
        __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), vd8) +
        __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), vd8);
    return __builtin_shufflevector(s, s, 0, 1, 2, 3) + __builtin_shufflevector(s, s, 4, 5, 6, 7);
  }
}

// Sum of the lanes in double: fold4, then a short tree (a serial sum of 8 converted lanes was a
// 32-cycle chain per call, as much as the loop itself for S = 64).
template <FloatVec V>
GENEXT_INLINE double hsum(V v) {
  const vd4 s = fold4(v);
  return (s[0] + s[2]) + (s[1] + s[3]);
}

// ---- element math ---------------------------------------------------------------------------

// e^t for t in [-100, 88] (the caller clamps): simd::exp_core's range reduction and Cephes
// coefficients, with the polynomial evaluated in Estrin's scheme (r^2 and three independent
// linear terms) rather than Horner's. The sigmoid loops are bound by the latency of one vector's
// chain of dependent operations (the out-of-order window holds only about three vectors' worth of
// them), and Estrin shortens the exp's part of that chain from about 30 to about 16 cycles on the
// project's Zen 3 machine. Max relative error over every float in [-87, 88] with a normal result,
// against double exp on that machine: 1.2e-7 (Horner's form: 8.3e-8), about 1 ulp.
template <FloatVec V>
GENEXT_INLINE V exp_est(V t) {
  using I = typename Lanes<V>::I;
  const V k = (t * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (t - k * 0.693359375f) + k * 2.12194440e-4f;             // t - k ln2, two parts
  const V r2 = r * r;
  const V p01 = 5.0000001201e-1f + r * 1.6666665459e-1f;
  const V p23 = 4.1665795894e-2f + r * 8.3334519073e-3f;
  const V p45 = 1.3981999507e-3f + r * 1.9875691500e-4f;
  const V er = (r + 1.0f) + r2 * (p01 + r2 * (p23 + r2 * p45));
  I e = __builtin_convertvector(k, I) + 127;
  e = e > splat<I>(0) ? e : splat<I>(0);  // 2^k below the normal range -> 0
  return er * __builtin_bit_cast(V, e << 23);
}

// e^-z: -z clamped into exp_est's range [-100, 88], then +inf where -z > 88, so that for z < -88
// sigmoid(z) = 1 / (1 + e^-z) and silu(z) = z / (1 + e^-z) come out as 0 (with z's sign) however
// large |z| is; below -87 e^-z flushes to 0 (sigmoid 1). NaN stays NaN.
template <FloatVec V>
GENEXT_INLINE V exp_neg(V z) {
  const V neg = -z;
  V t = neg < splat<V>(-100.0f) ? splat<V>(-100.0f) : neg;
  t = t > splat<V>(88.0f) ? splat<V>(88.0f) : t;
  const V e = exp_est(t);
  return neg > splat<V>(88.0f) ? splat<V>(std::numeric_limits<float>::infinity()) : e;
}
template <FloatVec V>
GENEXT_INLINE V sigmoid_t(V z) {
  return 1.0f / (1.0f + exp_neg(z));
}
GENEXT_INLINE double sigmoid_t(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// silu(z) = z / (1 + e^-z)
template <FloatVec V>
GENEXT_INLINE V act(V z, bool silu) {
  return silu ? z / (1.0f + exp_neg(z)) : z;
}
GENEXT_INLINE double act(double z, bool silu) { return silu ? z * sigmoid_t(z) : z; }
// d act / d z
template <class V>
GENEXT_INLINE V act_grad(V z, bool silu) {
  if (!silu) return V{} + 1.0f;
  const V s = sigmoid_t(z);
  return s * (1.0f + z * (1.0f - s));
}

constexpr int64_t kFlush = 1024;  // values summed in float lanes before adding into double

// The SiLU loops (forward and the backward's first pass) take kBlock values at a time in two
// loops: e^-z into a buffer on the stack, then the rest from it. One loop doing both was bound by
// the latency of each vector's chain of dependent operations (load, exp, divide, products: about
// 100 cycles) rather than by the arithmetic units; two shorter loops let more vectors' chains
// overlap.
constexpr int64_t kBlock = 256;

// ---- NCS loops: one contiguous run with scalar parameters ---------------------------------------

// s1 += sum(x - shift), s2 += sum((x - shift)^2) over a contiguous run.
template <class V, class S, class T>
GENEXT_INLINE void sums_run(const S* x, int64_t n, T shift, double* s1, double* s2) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  int64_t i = 0;
  if constexpr (!std::is_same_v<S, double>) {  // 2 vectors, added into double every kFlush
    const V sh = splat<V>(float(shift));
    for (; i + 2 * kN <= n;) {
      const int64_t end = std::min(n, i + kFlush) - 2 * kN;
      V a1{}, a2{}, b1{}, b2{};
      for (; i <= end; i += 2 * kN) {
        const V d = loadv<V>(x + i) - sh, e = loadv<V>(x + i + kN) - sh;
        a1 += d;
        a2 += d * d;
        b1 += e;
        b2 += e * e;
      }
      *s1 += hsum(a1 + b1);
      *s2 += hsum(a2 + b2);
    }
  }
  for (; i < n; ++i) {  // the scalar tail; all of it for double
    const double d = double(to_f(x[i])) - double(shift);
    *s1 += d;
    *s2 += d * d;
  }
}

// y = act((x - m) * a + b)
template <class V, class S, class T>
GENEXT_INLINE void fwd_run(const S* __restrict__ x, S* __restrict__ y, int64_t n, T m, T a, T b,
                           bool silu) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  if constexpr (std::is_same_v<S, double>) {
    for (int64_t i = 0; i < n; ++i) y[i] = act((x[i] - m) * a + b, silu);
  } else {
    const V vm = splat<V>(m), va = splat<V>(a), vb = splat<V>(b);
    auto f = [&](V v) GN_INL { return act((v - vm) * va + vb, silu); };
    int64_t i = 0;
    if (silu) {  // the branch outside the loop, so that each loop is straight-line
      // blocks of kBlock values in two loops: e^-z into a buffer on the stack, then y
      while (i + kN <= n) {
        const int64_t len = std::min(kBlock, (n - i) / kN * kN);  // whole vectors
        alignas(64) float e[kBlock];
        for (int64_t j = 0; j < len; j += kN)
          storev(e + j, exp_neg((loadv<V>(x + i + j) - vm) * va + vb));
        for (int64_t j = 0; j < len; j += kN) {
          const V z = (loadv<V>(x + i + j) - vm) * va + vb;
          storev(y + i + j, z / (1.0f + loadv<V>(e + j)));
        }
        i += len;
      }
    } else {
      for (; i + kN <= n; i += kN) storev(y + i, (loadv<V>(x + i) - vm) * va + vb);
    }
    if (i < n) storev_part(y + i, f(loadv_part<V>(x + i, n - i)), n - i);
  }
}

// sigmoid'(z) * z + sigmoid(z) from e = e^-z, times dy: s (1 + z (1 - s)) dy, s = 1 / (1 + e)
template <FloatVec V>
GENEXT_INLINE V silu_grad(V z, V e, V dy) {
  const V s = 1.0f / (1.0f + e);
  return dy * (s * (1.0f + z * (1.0f - s)));
}

// Sums of the lanes of a and b in double (as hsum, both at once): *A += sum(a), *D += sum(b).
template <FloatVec V>
GENEXT_INLINE void hsum2(V a, V b, double* A, double* D) {
  const vd4 sa = fold4(a), sb = fold4(b);
  const vd4 t =
      __builtin_shufflevector(sa, sb, 0, 1, 4, 5) + __builtin_shufflevector(sa, sb, 2, 3, 6, 7);
  *A += t[0] + t[1];
  *D += t[2] + t[3];
}

// Backward pass 1 over a contiguous run: g = dy * act'(z) is stored (as float) for pass 2, and
// A += sum(g), D += sum(g * xhat), with xhat = (x - m) * rs, z = xhat * w + b. With SiLU, blocks
// of kBlock values in two loops: xhat and e^-z into buffers on the stack, then g from them.
template <class V, class S, class T>
GENEXT_INLINE void bwd_g_run(const S* __restrict__ x, const S* __restrict__ dy, T* __restrict__ g,
                             int64_t n, T m, T rs, T w, T b, bool silu, double* __restrict__ A,
                             double* __restrict__ D) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  if constexpr (std::is_same_v<S, double>) {
    for (int64_t i = 0; i < n; ++i) {
      const T xh = (x[i] - m) * rs;
      g[i] = dy[i] * act_grad(xh * w + b, silu);
      *A += g[i];
      *D += g[i] * xh;
    }
  } else {
    const V vm = splat<V>(m), vrs = splat<V>(rs), vw = splat<V>(w), vb = splat<V>(b);
    auto xhat = [&](V xv) GN_INL { return (xv - vm) * vrs; };
    int64_t i = 0;
    for (; i + kN <= n;) {
      const int64_t end = std::min(n, i + kFlush) - kN;
      V a1{}, a2{};
      if (silu) {
        while (i <= end) {
          const int64_t len = std::min(kBlock, (end - i) / kN * kN + kN);  // whole vectors
          alignas(64) float e[kBlock], xb[kBlock];
          for (int64_t j = 0; j < len; j += kN) {
            const V xh = xhat(loadv<V>(x + i + j));
            storev(xb + j, xh);
            storev(e + j, exp_neg(xh * vw + vb));
          }
          for (int64_t j = 0; j < len; j += kN) {
            const V xh = loadv<V>(xb + j);
            const V gv = silu_grad(xh * vw + vb, loadv<V>(e + j), loadv<V>(dy + i + j));
            a1 += gv;
            a2 += gv * xh;
            storev(g + i + j, gv);
          }
          i += len;
        }
      } else {
        for (; i <= end; i += kN) {
          const V xh = xhat(loadv<V>(x + i)), gv = loadv<V>(dy + i);
          a1 += gv;
          a2 += gv * xh;
          storev(g + i, gv);
        }
      }
      hsum2(a1, a2, A, D);
    }
    if (i < n) {
      // padded lanes: x = m (xhat = 0, so z = b stays finite) and dy = 0, so g = 0 there and
      // they add nothing (with x = 0 there, xhat could overflow and 0 * inf make A and D NaN)
      V xt = loadv_part<V>(x + i, n - i);
      for (int64_t l = n - i; l < kN; ++l) xt[l] = m;
      const V xh = xhat(xt), z = xh * vw + vb, gy = loadv_part<V>(dy + i, n - i);
      const V gv = silu ? silu_grad(z, exp_neg(z), gy) : gy;
      storev_part(g + i, gv, n - i);
      hsum2(gv, gv * xh, A, D);
    }
  }
}

// Backward pass 2: dx = cg * g - ck1 - xhat * ck2 (cg = rs * w, ck1 = rs * k1, ck2 = rs * k2).
// g may be dx itself (float data: pass 1 stores g in dx).
template <class V, class S, class T>
GENEXT_INLINE void bwd_dx_run(const S* x, const T* g, S* dx, int64_t n, T m, T rs, T cg, T ck1,
                              T ck2) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  if constexpr (std::is_same_v<S, double>) {
    for (int64_t i = 0; i < n; ++i) dx[i] = cg * g[i] - ck1 - (x[i] - m) * rs * ck2;
  } else {
    const V vm = splat<V>(m), vrs = splat<V>(rs), vg = splat<V>(cg), v1 = splat<V>(ck1),
            v2 = splat<V>(ck2);
    auto f = [&](V xv, V gv) GN_INL { return vg * gv - v1 - (xv - vm) * vrs * v2; };
    int64_t i = 0;
    for (; i + kN <= n; i += kN) storev(dx + i, f(loadv<V>(x + i), loadv<V>(g + i)));
    if (i < n)
      storev_part(dx + i, f(loadv_part<V>(x + i, n - i), loadv_part<V>(g + i, n - i)), n - i);
  }
}

// ---- NSC loops: rows of C channels with per-channel parameters ----------------------------------

// Column sums of (x - shift[c]) and its square over `rows` rows of C values; s1/s2 are (C,),
// acc1/acc2 (C,) float scratch.
template <class V, class S, class T>
GENEXT_INLINE void sums_cols(const S* __restrict__ x, int64_t rows, int64_t C,
                             const T* __restrict__ shift, T* __restrict__ acc1,
                             T* __restrict__ acc2, double* __restrict__ s1,
                             double* __restrict__ s2) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  for (int64_t r0 = 0; r0 < rows; r0 += kFlush / 8) {
    const int64_t r1 = std::min(rows, r0 + kFlush / 8);
    std::fill(acc1, acc1 + C, T(0));
    std::fill(acc2, acc2 + C, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const S* xr = x + r * C;
      int64_t c = 0;
      if constexpr (!std::is_same_v<S, double>) {
        for (; c + kN <= C; c += kN) {
          const V d = loadv<V>(xr + c) - loadv<V>(shift + c);
          storev(acc1 + c, loadv<V>(acc1 + c) + d);
          storev(acc2 + c, loadv<V>(acc2 + c) + d * d);
        }
      }
      for (; c < C; ++c) {
        const T d = to_f(xr[c]) - shift[c];
        acc1[c] += d;
        acc2[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) s1[c] += acc1[c], s2[c] += acc2[c];
  }
}

// One row: y = act((x - m[c]) * a[c] + b[c]).
template <class V, class S, class T>
GENEXT_INLINE void fwd_row(const S* __restrict__ x, S* __restrict__ y, int64_t C, const T* m,
                           const T* a, const T* b, bool silu) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  if constexpr (std::is_same_v<S, double>) {
    for (int64_t c = 0; c < C; ++c) y[c] = act((x[c] - m[c]) * a[c] + b[c], silu);
  } else {
    int64_t c = 0;
    for (; c + kN <= C; c += kN)
      storev(y + c,
             act((loadv<V>(x + c) - loadv<V>(m + c)) * loadv<V>(a + c) + loadv<V>(b + c), silu));
    if (c < C) {
      const int64_t r = C - c;
      const V z = (loadv_part<V>(x + c, r) - loadv_part<V>(m + c, r)) * loadv_part<V>(a + c, r) +
                  loadv_part<V>(b + c, r);
      storev_part(y + c, act(z, silu), r);
    }
  }
}

// Column version of bwd_g_run's sums for NSC rows (g is not kept): parameters are (C,) arrays,
// A/D (C,) doubles, acc1/acc2 (C,) float scratch.
template <class V, class S, class T>
GENEXT_INLINE void bwd_sums_cols(const S* __restrict__ x, const S* __restrict__ dy, int64_t rows,
                                 int64_t C, const T* __restrict__ m, const T* __restrict__ rs,
                                 const T* __restrict__ w, const T* __restrict__ b, bool silu,
                                 T* __restrict__ acc1, T* __restrict__ acc2, double* __restrict__ A,
                                 double* __restrict__ D) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  for (int64_t r0 = 0; r0 < rows; r0 += kFlush / 8) {
    const int64_t r1 = std::min(rows, r0 + kFlush / 8);
    std::fill(acc1, acc1 + C, T(0));
    std::fill(acc2, acc2 + C, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const S* xr = x + r * C;
      const S* gr = dy + r * C;
      int64_t c = 0;
      if constexpr (!std::is_same_v<S, double>) {
        for (; c + kN <= C; c += kN) {
          const V xh = (loadv<V>(xr + c) - loadv<V>(m + c)) * loadv<V>(rs + c);
          const V g = loadv<V>(gr + c) * act_grad(xh * loadv<V>(w + c) + loadv<V>(b + c), silu);
          storev(acc1 + c, loadv<V>(acc1 + c) + g);
          storev(acc2 + c, loadv<V>(acc2 + c) + g * xh);
        }
      }
      for (; c < C; ++c) {
        const T xh = (to_f(xr[c]) - m[c]) * rs[c];
        const T g = to_f(gr[c]) * act_grad(xh * w[c] + b[c], silu);
        acc1[c] += g;
        acc2[c] += g * xh;
      }
    }
    for (int64_t c = 0; c < C; ++c) A[c] += acc1[c], D[c] += acc2[c];
  }
}

// One row: dx = rs (w g - k1 - xhat k2), g = dy * act'(xhat * w + b), per-channel parameters.
template <class V, class S, class T>
GENEXT_INLINE void bwd_dx_row(const S* __restrict__ x, const S* __restrict__ dy, S* __restrict__ dx,
                              int64_t C, const T* m, const T* rs, const T* w, const T* b,
                              const T* k1, const T* k2, bool silu) {
  [[maybe_unused]] constexpr int64_t kN = Lanes<V>::kN;
  if constexpr (std::is_same_v<S, double>) {
    for (int64_t c = 0; c < C; ++c) {
      const T xh = (x[c] - m[c]) * rs[c];
      const T g = dy[c] * act_grad(xh * w[c] + b[c], silu);
      dx[c] = rs[c] * (w[c] * g - k1[c] - xh * k2[c]);
    }
  } else {
    auto f = [&](V xv, V gy, int64_t c, auto ld) GN_INL {
      const V vrs = ld(rs + c), vw = ld(w + c);
      const V xh = (xv - ld(m + c)) * vrs;
      const V g = gy * act_grad(xh * vw + ld(b + c), silu);
      return vrs * (vw * g - ld(k1 + c) - xh * ld(k2 + c));
    };
    int64_t c = 0;
    auto full = [](const T* p) GN_INL { return loadv<V>(p); };
    for (; c + kN <= C; c += kN) storev(dx + c, f(loadv<V>(x + c), loadv<V>(dy + c), c, full));
    if (c < C) {
      const int64_t r = C - c;
      auto part = [r](const T* p) GN_INL { return loadv_part<V>(p, r); };
      storev_part(dx + c, f(loadv_part<V>(x + c, r), loadv_part<V>(dy + c, r), c, part), r);
    }
  }
}

// ---- NCS groups: Cg channels of S values, one call per group ------------------------------------
// Per-channel parameters w, b (nullptr: 1 and 0) point at the group's first channel. One call per
// group rather than per channel: at S = 64 the per-call set-up (constants, sums) cost as much as
// the loop.

template <class V, class S, class T>
GENEXT_INLINE void fwd_group(const S* x, S* y, int64_t Cg, int64_t n, T m, T rs, const T* w,
                             const T* b, bool silu) {
  for (int64_t ci = 0; ci < Cg; ++ci)
    fwd_run<V, S, T>(x + ci * n, y + ci * n, n, m, w ? rs * w[ci] : rs, b ? b[ci] : T(0), silu);
}

// Pass 1 of the backward over a group: g per channel into g (float), A[ci], D[ci] set.
template <class V, class S, class T>
GENEXT_INLINE void bwd_g_group(const S* x, const S* dy, T* g, int64_t Cg, int64_t n, T m, T rs,
                               const T* w, const T* b, bool silu, double* A, double* D) {
  for (int64_t ci = 0; ci < Cg; ++ci) {
    A[ci] = D[ci] = 0;
    bwd_g_run<V, S, T>(x + ci * n, dy + ci * n, g + ci * n, n, m, rs, w ? w[ci] : T(1),
                       b ? b[ci] : T(0), silu, &A[ci], &D[ci]);
  }
}

// Pass 2 over a group: dx = rs w g - ck1 - xhat ck2.
template <class V, class S, class T>
GENEXT_INLINE void bwd_dx_group(const S* x, const T* g, S* dx, int64_t Cg, int64_t n, T m, T rs,
                                const T* w, T ck1, T ck2) {
  for (int64_t ci = 0; ci < Cg; ++ci)
    bwd_dx_run<V, S, T>(x + ci * n, g + ci * n, dx + ci * n, n, m, rs, w ? rs * w[ci] : rs, ck1,
                        ck2);
}

// ---- entry points: one per loop and storage type ------------------------------------------------
// float and bfloat16 storage: on 8 lanes compiled once per ISA level (GENEXT_CPU_CLONES, suffix
// _k8), and on 16 lanes for x86-64-v4 (suffix _k16); double: once (_k8, its loops are scalar).
// The unsuffixed entry points below choose.

#define GN_ENTRY_POINTS(S, T, V, K, ATTR)                                                          \
  ATTR void fwd_group##K(const S* x, S* y, int64_t Cg, int64_t n, T m, T rs, const T* w,           \
                         const T* b, bool silu) {                                                  \
    fwd_group<V, S, T>(x, y, Cg, n, m, rs, w, b, silu);                                            \
  }                                                                                                \
  ATTR void bwd_g_group##K(const S* x, const S* dy, T* g, int64_t Cg, int64_t n, T m, T rs,        \
                           const T* w, const T* b, bool silu, double* A, double* D) {              \
    bwd_g_group<V, S, T>(x, dy, g, Cg, n, m, rs, w, b, silu, A, D);                                \
  }                                                                                                \
  ATTR void bwd_dx_group##K(const S* x, const T* g, S* dx, int64_t Cg, int64_t n, T m, T rs,       \
                            const T* w, T ck1, T ck2) {                                            \
    bwd_dx_group<V, S, T>(x, g, dx, Cg, n, m, rs, w, ck1, ck2);                                    \
  }                                                                                                \
  ATTR void sums_run##K(const S* x, int64_t n, T shift, double* s1, double* s2) {                  \
    sums_run<V, S, T>(x, n, shift, s1, s2);                                                        \
  }                                                                                                \
  ATTR void sums_cols##K(const S* x, int64_t rows, int64_t C, const T* shift, T* a1, T* a2,        \
                         double* s1, double* s2) {                                                 \
    sums_cols<V, S, T>(x, rows, C, shift, a1, a2, s1, s2);                                         \
  }                                                                                                \
  ATTR void fwd_rows##K(const S* x, S* y, int64_t rows, int64_t C, const T* m, const T* a,         \
                        const T* b, bool silu) {                                                   \
    for (int64_t r = 0; r < rows; ++r) fwd_row<V, S, T>(x + r * C, y + r * C, C, m, a, b, silu);   \
  }                                                                                                \
  ATTR void bwd_sums_cols##K(const S* x, const S* dy, int64_t rows, int64_t C, const T* m,         \
                             const T* rs, const T* w, const T* b, bool silu, T* a1, T* a2,         \
                             double* A, double* D) {                                               \
    bwd_sums_cols<V, S, T>(x, dy, rows, C, m, rs, w, b, silu, a1, a2, A, D);                       \
  }                                                                                                \
  ATTR void bwd_dx_rows##K(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, const T* m,    \
                           const T* rs, const T* w, const T* b, const T* k1, const T* k2,          \
                           bool silu) {                                                            \
    for (int64_t r = 0; r < rows; ++r)                                                             \
      bwd_dx_row<V, S, T>(x + r * C, dy + r * C, dx + r * C, C, m, rs, w, b, k1, k2, silu);        \
  }

GN_ENTRY_POINTS(float, float, simd::f32x8, _k8, GENEXT_CPU_CLONES)
GN_ENTRY_POINTS(bf16_t, float, simd::f32x8, _k8, GENEXT_CPU_CLONES)
GN_ENTRY_POINTS(double, double, simd::f32x8, _k8, )
#if GENEXT_CPU_LEVELS
GN_ENTRY_POINTS(float, float, simd::f32x16, _k16, GENEXT_CPU_TARGET_V4)
GN_ENTRY_POINTS(bf16_t, float, simd::f32x16, _k16, GENEXT_CPU_TARGET_V4)
#endif
#undef GN_ENTRY_POINTS

// The entry points the kernel calls: the 16-lane loops where the CPU runs x86-64-v4, else the
// 8-lane clones (and double's loops).
#if GENEXT_CPU_LEVELS
#define GN_PICK(name, S, ...)                                                                      \
  if constexpr (!std::is_same_v<S, double>) {                                                      \
    if (simd::cpu_level() == 4) return name##_k16(__VA_ARGS__);                                    \
  }                                                                                                \
  return name##_k8(__VA_ARGS__)
#else
#define GN_PICK(name, S, ...) return name##_k8(__VA_ARGS__)
#endif

template <class S, class T>
void fwd_group_k(const S* x, S* y, int64_t Cg, int64_t n, T m, T rs, const T* w, const T* b,
                 bool silu) {
  GN_PICK(fwd_group, S, x, y, Cg, n, m, rs, w, b, silu);
}
template <class S, class T>
void bwd_g_group_k(const S* x, const S* dy, T* g, int64_t Cg, int64_t n, T m, T rs, const T* w,
                   const T* b, bool silu, double* A, double* D) {
  GN_PICK(bwd_g_group, S, x, dy, g, Cg, n, m, rs, w, b, silu, A, D);
}
template <class S, class T>
void bwd_dx_group_k(const S* x, const T* g, S* dx, int64_t Cg, int64_t n, T m, T rs, const T* w,
                    T ck1, T ck2) {
  GN_PICK(bwd_dx_group, S, x, g, dx, Cg, n, m, rs, w, ck1, ck2);
}
template <class S, class T>
void sums_run_k(const S* x, int64_t n, T shift, double* s1, double* s2) {
  GN_PICK(sums_run, S, x, n, shift, s1, s2);
}
template <class S, class T>
void sums_cols_k(const S* x, int64_t rows, int64_t C, const T* shift, T* a1, T* a2, double* s1,
                 double* s2) {
  GN_PICK(sums_cols, S, x, rows, C, shift, a1, a2, s1, s2);
}
template <class S, class T>
void fwd_rows_k(const S* x, S* y, int64_t rows, int64_t C, const T* m, const T* a, const T* b,
                bool silu) {
  GN_PICK(fwd_rows, S, x, y, rows, C, m, a, b, silu);
}
template <class S, class T>
void bwd_sums_cols_k(const S* x, const S* dy, int64_t rows, int64_t C, const T* m, const T* rs,
                     const T* w, const T* b, bool silu, T* a1, T* a2, double* A, double* D) {
  GN_PICK(bwd_sums_cols, S, x, dy, rows, C, m, rs, w, b, silu, a1, a2, A, D);
}
template <class S, class T>
void bwd_dx_rows_k(const S* x, const S* dy, S* dx, int64_t rows, int64_t C, const T* m, const T* rs,
                   const T* w, const T* b, const T* k1, const T* k2, bool silu) {
  GN_PICK(bwd_dx_rows, S, x, dy, dx, rows, C, m, rs, w, b, k1, k2, silu);
}
#undef GN_PICK
#undef GN_INL

}  // namespace
}  // namespace genext::gn
