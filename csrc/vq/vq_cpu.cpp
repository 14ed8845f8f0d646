// VQ on the CPU.
//
// vq_nearest, metric l2: a screen and an exact pass. The screen scores every code by the dot
// form s = |e|^2 - 2 z.e (the squared distance less |z|^2) with a register-blocked kernel: blocks
// of kRows rows of z against tiles of kCodes codes of a transposed copy of the codebook, one FMA
// per (row, code, dimension), the accumulators in registers, no N x K buffer. A code whose score is
// within a rounding bound of the row's smallest one becomes a candidate, and the candidates alone
// are rescored exactly as sums of squared differences (no |z|^2 - 2 z.e + |e|^2 cancellation), in
// fp32 (fp64 for fp64), one multiply-add per term in order of d. The bound covers the rounding of
// both forms, so the pick and its distance are those of the exact scan over every code. A block
// whose candidates are many (data far from the origin widens the bound), or with a row of
// non-finite or huge norm, takes that exact scan instead, vectorised across codes with the same
// multiply-add per term in order of d: the same distances bit for bit. metric cosine: the exact
// kernel's dot products of the normalised vectors. 16-bit inputs are widened once (the codebook)
// or per block (z). Parallel over row blocks; each row's result depends on that row alone.
//
// vq_ema_update: counts and sums per code, parallel over columns, rows in order: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "common/cpu_simd.h"
#include "vq/vq_checks.h"

namespace genext::vq {
namespace {

typedef double f64x4 __attribute__((vector_size(4 * sizeof(double))));
typedef int64_t i64x4 __attribute__((vector_size(4 * sizeof(int64_t))));

// One register vector of A on x86-64-v3 (a ymm register) and its comparison mask.
template <class A>
struct Lanes;
template <>
struct Lanes<float> {
  using V = simd::f32x8;
  using M = simd::i32x8;
};
template <>
struct Lanes<double> {
  using V = f64x4;
  using M = i64x4;
};
template <class A>
constexpr int kLanes = int(sizeof(typename Lanes<A>::V) / sizeof(A));

// The register block: kRows rows of z by kVecs vectors of codes, 12 accumulators of AVX2's 16
// registers beside the codes' vectors and a broadcast row value (fewer would leave the FMA latency
// exposed, more would spill).
constexpr int kRows = 6;
constexpr int kVecs = 2;
template <class A>
constexpr int64_t kCodes = int64_t(kVecs) * kLanes<A>;  // codes per transposed codebook tile
constexpr int64_t kRowsPerTask = 8 * kRows;
// One core's time per (row, code, dimension) of the search (fp32, AVX2: N1024 D64 K1024 in about
// 2.4 ms of core time, N16384 in 35 ms, on a loaded machine) and per (row, column) of the EMA sums,
// for the thread count.
constexpr double kNsPerSearchTerm = 0.03;
constexpr double kNsPerSumTerm = 0.5;

// out[r][c] = tile[D][c] + sum over d of z2[r][d] * tile[d][c], for kRows rows of z2 = -2 z (row
// stride D; exact) against one tile (D + 1 rows of kCodes: the transposed codes, then the starting
// values); the code loop is the vector loop, the accumulators stay in registers. Returns whether
// some out[r][c] <= thr[r] (never for a NaN on either side). -2 z e is exact, so each term is one
// FMA.
template <class A>
GENEXT_INLINE bool screen_body(const A* z, const A* tile, int64_t D, const A* thr, A* out) {
  using V = typename Lanes<A>::V;
  using M = typename Lanes<A>::M;
  constexpr int L = kLanes<A>;
  constexpr int64_t C = kCodes<A>;
  V acc[kRows][kVecs];
  for (int v = 0; v < kVecs; ++v) {
    const V start = simd::load<V>(tile + D * C + v * L);
    for (int r = 0; r < kRows; ++r) acc[r][v] = start;
  }
  for (int64_t d = 0; d < D; ++d) {
    V e[kVecs];
    for (int v = 0; v < kVecs; ++v) e[v] = simd::load<V>(tile + d * C + v * L);
    for (int r = 0; r < kRows; ++r) {
      const V zr = z[r * D + d] - V{};  // a broadcast (adding 0 would cost an add: -0 + 0 is +0)
      for (int v = 0; v < kVecs; ++v) acc[r][v] += zr * e[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) simd::store(out + r * C + v * L, acc[r][v]);
  M hit{};
  for (int r = 0; r < kRows; ++r) {
    const V t = V{} + thr[r];
    for (int v = 0; v < kVecs; ++v) hit |= acc[r][v] <= t;
  }
  for (int l = 0; l < L; ++l)
    if (hit[l]) return true;
  return false;
}

// out[r][c] = sum over d of (z[r][d] - tile[d][c])^2, one multiply-add per term in order of d (a
// fused one where the ISA level has FMA, as GCC contracts it): the exact score, bit for bit that
// of sqdist below. For cosine (dot) the dot products z.e instead, in the same order.
template <class A>
GENEXT_INLINE void exact_body(const A* z, const A* tile, int64_t D, bool dot, A* out) {
  using V = typename Lanes<A>::V;
  constexpr int L = kLanes<A>;
  constexpr int64_t C = kCodes<A>;
  V acc[kRows][kVecs];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = V{};
  if (dot) {
    for (int64_t d = 0; d < D; ++d) {
      V e[kVecs];
      for (int v = 0; v < kVecs; ++v) e[v] = simd::load<V>(tile + d * C + v * L);
      for (int r = 0; r < kRows; ++r) {
        const V zr = z[r * D + d] - V{};  // a broadcast (adding 0 would cost an add: -0 + 0 is +0)
        for (int v = 0; v < kVecs; ++v) acc[r][v] += zr * e[v];
      }
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      V e[kVecs];
      for (int v = 0; v < kVecs; ++v) e[v] = simd::load<V>(tile + d * C + v * L);
      for (int r = 0; r < kRows; ++r) {
        const V zr = z[r * D + d] - V{};
        for (int v = 0; v < kVecs; ++v) {
          const V t = zr - e[v];
          acc[r][v] += t * t;
        }
      }
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < kVecs; ++v) simd::store(out + r * C + v * L, acc[r][v]);
}

// The sum of squared differences of two rows, one multiply-add per term in order of d: the exact
// score. Not vectorised: GCC would vectorise it over d as an in-order reduction with separate
// multiplies and adds, which rounds differently from the fused multiply-add of exact_body.
template <class A>
GENEXT_INLINE A sqdist_body(const A* z, const A* e, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) {
    const A t = z[d] - e[d];
    s += t * t;
  }
  return s;
}

// The loops compiled per ISA level (target_clones needs plain functions, not templates).
GENEXT_CPU_CLONES bool screen_f32(const float* z, const float* tile, int64_t D, const float* thr,
                                  float* out) {
  return screen_body<float>(z, tile, D, thr, out);
}
GENEXT_CPU_CLONES bool screen_f64(const double* z, const double* tile, int64_t D, const double* thr,
                                  double* out) {
  return screen_body<double>(z, tile, D, thr, out);
}
GENEXT_CPU_CLONES void exact_f32(const float* z, const float* tile, int64_t D, bool dot,
                                 float* out) {
  exact_body<float>(z, tile, D, dot, out);
}
GENEXT_CPU_CLONES void exact_f64(const double* z, const double* tile, int64_t D, bool dot,
                                 double* out) {
  exact_body<double>(z, tile, D, dot, out);
}
__attribute__((optimize("no-tree-vectorize"))) GENEXT_CPU_CLONES float sqdist_f32(const float* z,
                                                                                  const float* e,
                                                                                  int64_t D) {
  return sqdist_body<float>(z, e, D);
}
__attribute__((optimize("no-tree-vectorize"))) GENEXT_CPU_CLONES double sqdist_f64(const double* z,
                                                                                   const double* e,
                                                                                   int64_t D) {
  return sqdist_body<double>(z, e, D);
}
inline bool screen(const float* z, const float* tile, int64_t D, const float* thr, float* out) {
  return screen_f32(z, tile, D, thr, out);
}
inline bool screen(const double* z, const double* tile, int64_t D, const double* thr, double* out) {
  return screen_f64(z, tile, D, thr, out);
}
inline void exact(const float* z, const float* tile, int64_t D, bool dot, float* out) {
  exact_f32(z, tile, D, dot, out);
}
inline void exact(const double* z, const double* tile, int64_t D, bool dot, double* out) {
  exact_f64(z, tile, D, dot, out);
}
inline float sqdist(const float* z, const float* e, int64_t D) { return sqdist_f32(z, e, D); }
inline double sqdist(const double* z, const double* e, int64_t D) { return sqdist_f64(z, e, D); }

// sum over d of x[d]^2 in eight interleaved partial sums (no chain of D dependent FMAs), for the
// screen's |e|^2 and its bound, which any summation order serves.
template <class A>
A sum_squares(const A* x, int64_t D) {
  A part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += x[d + j] * x[d + j];
  for (; d < D; ++d) part[0] += x[d] * x[d];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

template <class A>
A row_norm(const A* x, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += x[d] * x[d];
  return std::sqrt(s);
}

template <class A>
void normalise_rows(A* x, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    A* xr = x + r * D;
    const A n = row_norm(xr, D);
    // a zero row stays zero; a NaN norm stays NaN (the row's scores are NaN, it matches nothing)
    const A inv = n > 0 ? A(1) / n : (n == 0 ? A(0) : n);
    for (int64_t d = 0; d < D; ++d) xr[d] *= inv;
  }
}

// The codebook prepared for the search: cbf (K x D) in A, normalised for cosine; tiles of kCodes
// codes transposed, each followed by its starting values: for l2 the codes times -2 (exact) and
// |e|^2, so a tile's scores are the dot form s = |e|^2 - 2 z.e; for cosine the codes and zeros.
// Padding codes past K start at NaN (l2: never a candidate) or are skipped (cosine).
template <class A>
struct Codebook {
  int64_t K = 0, D = 0, tiles = 0;
  std::vector<A> rows, tiles_t;
  A max_norm = 0;       // the largest |e| among codes with a finite |e|^2
  bool finite = false;  // some code has a finite |e|^2
};

template <class T, class A>
Codebook<A> prepare(const at::Tensor& cb, bool cosine) {
  constexpr int64_t C = kCodes<A>;
  Codebook<A> c;
  c.K = cb.size(0);
  c.D = cb.size(1);
  const int64_t K = c.K, D = c.D;
  c.tiles = (K + C - 1) / C;
  c.rows.resize(static_cast<size_t>(K * D));
  const T* cp = cb.data_ptr<T>();
  for (int64_t i = 0; i < K * D; ++i) c.rows[i] = static_cast<A>(cp[i]);
  if (cosine) normalise_rows(c.rows.data(), K, D);
  c.tiles_t.assign(static_cast<size_t>(c.tiles * (D + 1) * C),
                   cosine ? A(0) : std::numeric_limits<A>::quiet_NaN());
  for (int64_t k = 0; k < K; ++k) {
    A* tile = c.tiles_t.data() + (k / C) * (D + 1) * C + k % C;
    const A* e = c.rows.data() + k * D;
    for (int64_t d = 0; d < D; ++d) tile[d * C] = e[d];
    const A e2 = sum_squares(e, D);
    tile[D * C] = cosine ? A(0) : e2;
    if (std::isfinite(e2)) {
      c.finite = true;
      c.max_norm = std::max(c.max_norm, std::sqrt(e2));
    }
  }
  return c;
}

// The margin around a row's smallest dot-form score within which a code may still be the exact
// nearest. With u the unit roundoff, b = (|z| + max |e|)^2 and |z|, |e| <= sqrt(b): |e|^2 summed
// in eight parts is within (D / 8 + 11) u b of its value, and the D FMAs of -2 z.e onto it add at
// most (D + 1) 2 u b more (each partial sum is within 3b of zero), so a dot-form score is within
// about (2.2 D + 13) u b of its exact value; each exact score (D FMAs of squares, partial sums
// within b) is within (D + 1) u b of the true squared distance. Two codes whose dot-form scores
// differ by more than twice both bounds, about (4.4 D + 28) u b, keep their order in the exact
// scores; the margin takes 5 D + 32 terms of u b (room for the second-order terms and the rounding
// of the threshold itself) and an absolute term for underflow. Returns NaN (no screening: the
// exact scan) when |z| is not finite, no code has a finite norm, or b is so large that a score
// could overflow.
template <class A>
A screen_margin(A z_norm, const Codebook<A>& c) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  if (!c.finite || !std::isfinite(z_norm)) return nan;
  const A b = (z_norm + c.max_norm) * (z_norm + c.max_norm);
  constexpr A kHuge = std::numeric_limits<A>::max() / A(1 << 20);
  if (!(b <= kHuge)) return nan;
  const A u = std::numeric_limits<A>::epsilon() / 2;
  const A terms = A(5 * c.D + 32);
  return terms * u * b + terms * std::numeric_limits<A>::min();
}

// The exact scan of every code for the first `rows` rows of a block zb (kRows x D): dot scores
// (cosine: the largest wins) or squared distances (l2: the smallest wins). Strict comparisons, so
// ties keep the smallest index; a NaN score never wins; an infinite one only while no code has
// been accepted. arg[r] is -1 when every score of row r was NaN.
template <class A, bool kLargest>
void scan_block(const A* zb, const Codebook<A>& book, int64_t rows, A* scores, A* best,
                int64_t* arg) {
  constexpr int64_t C = kCodes<A>;
  const A start =
      kLargest ? -std::numeric_limits<A>::infinity() : std::numeric_limits<A>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    best[r] = start;
    arg[r] = -1;
  }
  for (int64_t t = 0; t < book.tiles; ++t) {
    exact(zb, book.tiles_t.data() + t * (book.D + 1) * C, book.D, /*dot=*/kLargest, scores);
    const int64_t codes = std::min(C, book.K - t * C);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < codes; ++c) {
        const A v = scores[r * C + c];
        if ((kLargest ? v > best[r] : v < best[r]) || (arg[r] < 0 && v == best[r])) {
          best[r] = v;
          arg[r] = t * C + c;
        }
      }
    }
  }
}

template <class T, class A>
void nearest(const at::Tensor& z, const at::Tensor& cb, bool cosine, at::Tensor& idx,
             at::Tensor& dist) {
  constexpr int64_t C = kCodes<A>;
  const int64_t N = z.size(0), D = z.size(1);
  const Codebook<A> book = prepare<T, A>(cb, cosine);
  const int64_t K = book.K, tiles = book.tiles;
  const T* zp = z.data_ptr<T>();
  int64_t* ip = idx.data_ptr<int64_t>();
  A* dp = dist.data_ptr<A>();
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const A inf = std::numeric_limits<A>::infinity();
  const double task_ns = kNsPerSearchTerm * double(kRowsPerTask) * double(K) * double(D);
  // Candidates per block of kRows rows beyond which the exact scan is cheaper than rescoring them
  // one by one (a chain of D dependent FMAs each against about 0.75 K D cycles for the scan).
  const int64_t cand_limit = std::max<int64_t>(4 * kRows, K / 4);
  genext::cpu::parallel_for(
      0, (N + kRowsPerTask - 1) / kRowsPerTask, task_ns, [&](int64_t b0, int64_t b1) {
        std::vector<A> zb(static_cast<size_t>(kRows * D)), z2(zb.size());
        std::vector<std::pair<int64_t, A>> cand[kRows];
        A scores[kRows * C];
        for (int64_t task = b0; task < b1; ++task) {
          const int64_t t_end = std::min(N, (task + 1) * kRowsPerTask);
          for (int64_t r0 = task * kRowsPerTask; r0 < t_end; r0 += kRows) {
            const int64_t rows = std::min<int64_t>(kRows, t_end - r0);
            for (int64_t r = 0; r < kRows; ++r) {  // rows past the end repeat the last one
              const T* src = zp + std::min(r0 + r, N - 1) * D;
              for (int64_t d = 0; d < D; ++d) zb[r * D + d] = static_cast<A>(src[d]);
            }
            if (cosine) {
              normalise_rows(zb.data(), kRows, D);
              A best[kRows];
              int64_t arg[kRows];
              scan_block<A, true>(zb.data(), book, rows, scores, best, arg);
              for (int64_t r = 0; r < rows; ++r) {  // every score NaN: index 0, distance NaN
                ip[r0 + r] = arg[r] < 0 ? 0 : arg[r];
                dp[r0 + r] = arg[r] < 0 ? nan : A(1) - best[r];
              }
              continue;
            }
            // l2: screen every code by its dot-form score, keeping as candidates the codes
            // within the margin of the row's smallest score so far (the smallest only falls, so
            // a code left out stays out), then rescore the candidates exactly. Where the
            // candidates are many (data far from the origin, where the margin is wide), the
            // block takes the exact vectorised scan over every code instead: its distances are
            // those of sqdist bit for bit, so the results do not depend on which path ran.
            A margin[kRows], low[kRows], thr[kRows];
            bool screened = true;
            for (int64_t r = 0; r < kRows; ++r) {
              margin[r] = r < rows
                              ? screen_margin(std::sqrt(sum_squares(zb.data() + r * D, D)), book)
                              : A(0);
              low[r] = inf;
              thr[r] = inf;
              screened = screened && !std::isnan(margin[r]);
              cand[r].clear();
            }
            int64_t pending = 0;  // candidates kept since the last pruning
            for (size_t i = 0; i < zb.size(); ++i) z2[i] = A(-2) * zb[i];  // exact
            for (int64_t t = 0; screened && t < tiles; ++t) {
              if (!screen(z2.data(), book.tiles_t.data() + t * (D + 1) * C, D, thr, scores))
                continue;
              for (int64_t r = 0; r < rows; ++r) {
                for (int64_t c = 0; c < C; ++c) {
                  const A v = scores[r * C + c];
                  if (!(v <= thr[r])) continue;
                  cand[r].emplace_back(t * C + c, v);
                  ++pending;
                  if (v < low[r]) {
                    low[r] = v;
                    thr[r] = low[r] + margin[r];
                  }
                }
              }
              if (pending > cand_limit) {
                // drop the codes the falling thresholds have left behind; if the survivors, at
                // the rate they came so far, would still be too many by the last tile, the exact
                // scan is the cheaper way
                pending = 0;
                for (int64_t r = 0; r < rows; ++r) {
                  std::erase_if(cand[r], [&](const auto& kv) { return !(kv.second <= thr[r]); });
                  pending += static_cast<int64_t>(cand[r].size());
                }
                screened = pending * tiles <= cand_limit * (t + 1);
              }
            }
            if (!screened) {
              A best[kRows];
              int64_t arg[kRows];
              scan_block<A, false>(zb.data(), book, rows, scores, best, arg);
              for (int64_t r = 0; r < rows; ++r) {  // every score NaN: index 0, distance NaN
                ip[r0 + r] = arg[r] < 0 ? 0 : arg[r];
                dp[r0 + r] = arg[r] < 0 ? nan : std::sqrt(best[r]);
              }
              continue;
            }
            for (int64_t r = 0; r < rows; ++r) {
              const A* zr = zb.data() + r * D;
              A best = inf;
              int64_t arg = -1;  // no code accepted yet
              // the candidates come in code order: strict, so ties keep the smallest index
              for (const auto& [k, v] : cand[r]) {
                if (!(v <= thr[r])) continue;
                const A s = sqdist(zr, book.rows.data() + k * D, D);
                if (arg < 0 || s < best) {
                  best = s;
                  arg = k;
                }
              }
              if (arg < 0) {
                // no candidate (every score NaN): the exact scan, with the same rules as above
                for (int64_t k = 0; k < K; ++k) {
                  const A s = sqdist(zr, book.rows.data() + k * D, D);
                  if (s < best || (arg < 0 && s == best)) {
                    best = s;
                    arg = k;
                  }
                }
              }
              ip[r0 + r] = arg < 0 ? 0 : arg;  // every score NaN: index 0, distance NaN
              dp[r0 + r] = arg < 0 ? nan : std::sqrt(best);
            }
          }
        }
      });
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cpu(const at::Tensor& z_in, const at::Tensor& cb_in,
                                                  bool cosine) {
  check_nearest("vq_nearest", z_in, cb_in, /*allow_double=*/true);
  const at::Tensor z = z_in.contiguous(), cb = cb_in.contiguous();
  const bool dbl = z.scalar_type() == at::kDouble;
  at::Tensor idx = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({z.size(0)}, z.options().dtype(dbl ? at::kDouble : at::kFloat));
  if (z.size(0) == 0) return {idx, dist};
  dispatch_cpu_dtype("vq_nearest", z.scalar_type(),
                     [&]<class T, class A>() { nearest<T, A>(z, cb, cosine, idx, dist); });
  return {idx, dist};
}

template <class T, class A, class I>
void ema(const at::Tensor& ind, const at::Tensor& z, int64_t K, at::Tensor& counts,
         at::Tensor& sums) {
  const int64_t N = z.size(0), D = z.size(1);
  const I* ip = ind.data_ptr<I>();
  const T* zp = z.data_ptr<T>();
  A* cp = counts.data_ptr<A>();
  A* sp = sums.data_ptr<A>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = static_cast<int64_t>(ip[i]);
    TORCH_CHECK_VALUE(k >= 0 && k < K, "vq_ema_update: indices[", i, "] = ", k,
                      " is outside [0, num_codes = ", K, ")");
    cp[k] += 1;
  }
  // columns in parallel, rows in order within each: the same sums every run
  genext::cpu::parallel_for(
      0, D, kNsPerSumTerm * double(N),
      [&](int64_t d0, int64_t d1) {
        for (int64_t i = 0; i < N; ++i) {
          A* dst = sp + static_cast<int64_t>(ip[i]) * D;
          const T* src = zp + i * D;
          for (int64_t d = d0; d < d1; ++d) dst[d] += static_cast<A>(src[d]);
        }
      },
      /*min_chunk=*/16);  // a cache line of columns or more per pass over the rows
}

std::tuple<at::Tensor, at::Tensor> vq_ema_update_cpu(const at::Tensor& indices_in,
                                                     const at::Tensor& z_in, int64_t num_codes,
                                                     bool deterministic) {
  check_ema("vq_ema_update", indices_in, z_in, num_codes, /*allow_double=*/true);
  const at::Tensor ind = indices_in.contiguous(), z = z_in.contiguous();
  const bool dbl = z.scalar_type() == at::kDouble;
  const auto opts = z.options().dtype(dbl ? at::kDouble : at::kFloat);
  at::Tensor counts = at::zeros({num_codes}, opts);
  at::Tensor sums = at::zeros({num_codes, z.size(1)}, opts);
  const bool i64 = ind.scalar_type() == at::kLong;
  dispatch_cpu_dtype("vq_ema_update", z.scalar_type(), [&]<class T, class A>() {
    if (i64) {
      ema<T, A, int64_t>(ind, z, num_codes, counts, sums);
    } else {
      ema<T, A, int32_t>(ind, z, num_codes, counts, sums);
    }
  });
  return {counts, sums};
}

}  // namespace
}  // namespace genext::vq

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("vq_nearest", &genext::vq::vq_nearest_cpu);
  m.impl("vq_ema_update", &genext::vq::vq_ema_update_cpu);
}
