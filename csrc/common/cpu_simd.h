// CPU SIMD helpers shared by the CPU kernels: the function-multiversioning macro, 16-lane vectors
// (GCC vector extensions) with loads, stores, broadcasts and lane sums, and the vectorised exp.
// Plain C++, no torch header.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

// A function marked GENEXT_CPU_CLONES is compiled once per x86-64 micro-architecture level and the
// best version the CPU supports is picked when the library loads (GCC target_clones: an ifunc
// resolver that reads the CPU's feature bits): the baseline (SSE2), x86-64-v3 (AVX2, FMA, BMI;
// Haswell, Zen and later) and x86-64-v4 (AVX-512 F/BW/CD/DQ/VL; Skylake-SP, Zen 4 and later).
// Levels rather than single features because GCC's "avx2" target does not enable FMA and its
// "fma" target does not enable AVX2. Inline helpers called from such a function are compiled into
// each version. GCC 11 knows no "arch=x86-64-vN" clones: there the single features closest to
// those levels ("avx2" lacks FMA there, so that version rounds each multiply-add twice). Other
// compilers and architectures build the baseline only.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define GENEXT_CPU_CLONES                                                                          \
  __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GENEXT_CPU_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define GENEXT_CPU_CLONES
#endif
#define GENEXT_INLINE __attribute__((always_inline)) inline

// Explicit per-level versions, for routines whose best code shape (register blocking) differs per
// level and so cannot be one target_clones body: GENEXT_CPU_TARGET_V3/_V4 mark a function compiled
// for x86-64-v3/v4 (the levels of GENEXT_CPU_CLONES), and genext::simd::cpu_level() says which of
// them this CPU runs (3 or 4; 0 for the baseline, and always 0 where GENEXT_CPU_LEVELS is 0).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define GENEXT_CPU_LEVELS 1
#define GENEXT_CPU_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#define GENEXT_CPU_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GENEXT_CPU_LEVELS 1
#define GENEXT_CPU_TARGET_V3 __attribute__((target("avx2,fma")))
#define GENEXT_CPU_TARGET_V4 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#else
#define GENEXT_CPU_LEVELS 0
#define GENEXT_CPU_TARGET_V3
#define GENEXT_CPU_TARGET_V4
#endif

namespace genext::simd {

// The highest level cpu_level() reports (4 unless lowered): tests lower it to run GroupNorm's
// 8-lane loops and the decode attention's 8-lane float tiles on a machine of a higher level. Only
// routines that may switch level between two calls of one op read cpu_level(); the others (flash
// attention's, whose row padding is fixed per call) and GENEXT_CPU_CLONES versions follow the
// machine alone.
inline std::atomic<int>& cpu_level_cap() {
  static std::atomic<int> cap{4};
  return cap;
}

// The highest of the levels above that this CPU supports: 4 (x86-64-v4), 3 (x86-64-v3) or 0.
inline int cpu_level_detected() {
#if GENEXT_CPU_LEVELS && __GNUC__ >= 12
  static const int level = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 0;
  }();
#elif GENEXT_CPU_LEVELS
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return 4;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 3 : 0;
  }();
#else
  constexpr int level = 0;
#endif
  return level;
}

// cpu_level_detected(), at most cpu_level_cap().
inline int cpu_level() {
  const int level = cpu_level_detected(), cap = cpu_level_cap().load(std::memory_order_relaxed);
  return level < cap ? level : cap;
}

// ---- 16-lane vectors ----------------------------------------------------------------------------
// Each clone lowers them to its ISA (one zmm, two ymm or four xmm registers per float vector).

constexpr int kLanes = 16;
typedef float f32x16 __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t i32x16 __attribute__((vector_size(kLanes * sizeof(int32_t))));
typedef double f64x16 __attribute__((vector_size(kLanes * sizeof(double))));
typedef int64_t i64x16 __attribute__((vector_size(kLanes * sizeof(int64_t))));
// Narrower float vectors: one ymm (x86-64-v3) or one xmm (baseline) register, for register blocks
// that must fit in 16 such registers.
typedef float f32x8 __attribute__((vector_size(8 * sizeof(float))));
typedef float f32x4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t i32x8 __attribute__((vector_size(8 * sizeof(int32_t))));
typedef int32_t i32x4 __attribute__((vector_size(4 * sizeof(int32_t))));

// The vector of 16 T and the integer vector of the same lane width.
template <class T>
struct Vec;
template <>
struct Vec<float> {
  using V = f32x16;
  using I = i32x16;
};
template <>
struct Vec<double> {
  using V = f64x16;
  using I = i64x16;
};

template <class V>
inline constexpr bool kIsVector =
    std::is_same_v<V, f32x16> || std::is_same_v<V, i32x16> || std::is_same_v<V, f64x16> ||
    std::is_same_v<V, i64x16> || std::is_same_v<V, f32x8> || std::is_same_v<V, f32x4> ||
    std::is_same_v<V, i32x8> || std::is_same_v<V, i32x4>;

// The integer lanes matching float lanes V (float or f32x16), and the conversion to them
// (truncating; the arguments here are already whole numbers).
template <class V>
struct IntLanes {
  using I = int32_t;
  static GENEXT_INLINE I convert(V v) { return static_cast<int32_t>(v); }
};
template <>
struct IntLanes<f32x16> {
  using I = i32x16;
  static GENEXT_INLINE I convert(f32x16 v) { return __builtin_convertvector(v, i32x16); }
};
template <>
struct IntLanes<f32x8> {
  using I = i32x8;
  static GENEXT_INLINE I convert(f32x8 v) { return __builtin_convertvector(v, i32x8); }
};
template <>
struct IntLanes<f32x4> {
  using I = i32x4;
  static GENEXT_INLINE I convert(f32x4 v) { return __builtin_convertvector(v, i32x4); }
};

// s in every lane of V (V a vector), or s converted to V (V a scalar).
template <class V, class S>
GENEXT_INLINE V splat(S s) {
  if constexpr (kIsVector<V>) {
    using E = std::remove_reference_t<decltype(std::declval<V&>()[0])>;
    return V{} + static_cast<E>(s);
  } else {
    return static_cast<V>(s);
  }
}

template <class V, class T>
GENEXT_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class T>
GENEXT_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// {0, 1, ..., 15}
template <class I>
GENEXT_INLINE I lane_index() {
  I v{};
  for (int t = 0; t < kLanes; ++t) v[t] = t;
  return v;
}

// Sum of the lanes in lane order, accumulated in Acc.
template <class Acc, class V>
GENEXT_INLINE Acc hsum(V v) {
  Acc s = 0;
  for (int t = 0; t < kLanes; ++t) s += v[t];
  return s;
}

// Sum of the lanes by halving (8 + 8, 4 + 4, 2 + 2, 1 + 1): fewer dependent adds than hsum. For
// vectors of 16 or 8 lanes.
template <class V>
GENEXT_INLINE auto hsum_tree(V v) {
  using E = std::remove_reference_t<decltype(std::declval<V&>()[0])>;
  typedef E V8 __attribute__((vector_size(8 * sizeof(E))));
  typedef E V4 __attribute__((vector_size(4 * sizeof(E))));
  typedef E V2 __attribute__((vector_size(2 * sizeof(E))));
  constexpr size_t kN = sizeof(V) / sizeof(E);
  static_assert(kN == 16 || kN == 8, "hsum_tree: 16 or 8 lanes");
  V8 a;
  if constexpr (kN == 16) {
    a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
        __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  } else {
    a = v;
  }
  const V4 b =
      __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const V2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
  return c[0] + c[1];
}

// ---- exp ----------------------------------------------------------------------------------------

// e^x on float lanes (V = float, so that a plain loop vectorises, or f32x16), for x in [-100, 88]
// (exp_v clamps into that range). e^x = 2^k e^r with k = round(x / ln2) (by the 1.5 * 2^23
// rounding trick) and r = x - k ln2, ln2 in two parts so that k * ln2_hi is exact and
// |r| <= ln2 / 2; e^r = 1 + r + r^2 P(r) with Cephes' degree-5 minimax P (expf). 2^k is built in
// the exponent bits; below the normal range (k < -126) it is 0, so results under ~1e-38 flush to
// zero. Max relative error over every float in [-87, 0] on an x86-64-v3 machine: 8.3e-8 compiled
// without FMA and 8.5e-8 with FMA contraction (about 1 ulp).
template <class V>
GENEXT_INLINE V exp_core(V x) {
  using I = typename IntLanes<V>::I;
  const V k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const V r = (x - k * 0.693359375f) + k * 2.12194440e-4f;             // x - k*ln2, two parts
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V er = p * r * r + r + 1.0f;
  I e = IntLanes<V>::convert(k) + 127;
  e = e > splat<I>(0) ? e : splat<I>(0);  // 2^k below the normal range -> 0
  // __builtin_bit_cast, not std::bit_cast: a function returning a vector by value, which GCC warns
  // about (-Wpsabi) when LTO compiles it outside a clone
  return er * __builtin_bit_cast(V, e << 23);
}

// e^x for any float x (NaN stays NaN): x clamped to [-100, 88] (e^88 ~ 1.7e38 is finite), then
// exp_core.
template <class V>
GENEXT_INLINE V exp_v(V x) {
  x = x < splat<V>(-100.0f) ? splat<V>(-100.0f) : x;
  x = x > splat<V>(88.0f) ? splat<V>(88.0f) : x;
  return exp_core(x);
}

}  // namespace genext::simd
