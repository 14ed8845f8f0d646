// VQ on the CPU. vq_nearest: blocks of 8 rows of z against tiles of 32 codes of a transposed copy
// of the codebook (register accumulators, the code loop vectorised), a running minimum per row:
// no N x K buffer; parallel over row blocks. Distances
// are sums of squared differences (no |z|^2 - 2 z.e + |e|^2 cancellation), in fp32 (fp64 for
// fp64); 16-bit inputs are widened once (the codebook) or per block (z). vq_ema_update: counts
// and sums per code, parallel over columns, rows in order: deterministic.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "common/cpu_simd.h"
#include "vq/vq_checks.h"

namespace genext::vq {
namespace {

constexpr int64_t kRows = 8;    // z rows per register block
constexpr int64_t kCodes = 32;  // codes per register block (the codebook is stored transposed)
constexpr int64_t kRowsPerTask = 64;
// One core's time per (row, code, dimension) of the search (fp32, AVX2: N16384 D64 K1024 in about
// 100 ms of core time) and per (row, column) of the EMA sums, for the thread count.
constexpr double kNsPerSearchTerm = 0.1;
constexpr double kNsPerSumTerm = 0.5;

// acc[r][c] over d of (z[r][d] - et[d][c])^2 (or z[r][d] * et[d][c] when dot), for kRows rows of
// z (row stride D) against one transposed codebook tile et (D x kCodes): the code loop is the
// vector loop, the accumulators stay in registers.
template <class A>
GENEXT_INLINE void block_body(const A* z, const A* et, int64_t D, bool dot, A* out) {
  A acc[kRows][kCodes];
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kCodes; ++c) acc[r][c] = 0;
  if (dot) {
    for (int64_t d = 0; d < D; ++d) {
      const A* ev = et + d * kCodes;
      for (int64_t r = 0; r < kRows; ++r) {
        const A zr = z[r * D + d];
#pragma omp simd
        for (int64_t c = 0; c < kCodes; ++c) acc[r][c] += zr * ev[c];
      }
    }
  } else {
    for (int64_t d = 0; d < D; ++d) {
      const A* ev = et + d * kCodes;
      for (int64_t r = 0; r < kRows; ++r) {
        const A zr = z[r * D + d];
#pragma omp simd
        for (int64_t c = 0; c < kCodes; ++c) {
          const A t = zr - ev[c];
          acc[r][c] += t * t;
        }
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t c = 0; c < kCodes; ++c) out[r * kCodes + c] = acc[r][c];
}

// The block loop compiled per ISA level (target_clones needs plain functions, not templates).
GENEXT_CPU_CLONES void block_f32(const float* z, const float* et, int64_t D, bool dot, float* out) {
  block_body<float>(z, et, D, dot, out);
}
GENEXT_CPU_CLONES void block_f64(const double* z, const double* et, int64_t D, bool dot,
                                 double* out) {
  block_body<double>(z, et, D, dot, out);
}
inline void block(const float* z, const float* et, int64_t D, bool dot, float* out) {
  block_f32(z, et, D, dot, out);
}
inline void block(const double* z, const double* et, int64_t D, bool dot, double* out) {
  block_f64(z, et, D, dot, out);
}

template <class A>
void normalise_rows(A* x, int64_t rows, int64_t D) {
  for (int64_t r = 0; r < rows; ++r) {
    A* xr = x + r * D;
    A s = 0;
    for (int64_t d = 0; d < D; ++d) s += xr[d] * xr[d];
    const A n = std::sqrt(s);
    // a zero row stays zero; a NaN norm stays NaN (the row's scores are NaN, it matches nothing)
    const A inv = n > 0 ? A(1) / n : (n == 0 ? A(0) : n);
    for (int64_t d = 0; d < D; ++d) xr[d] *= inv;
  }
}

template <class T, class A>
void nearest(const at::Tensor& z, const at::Tensor& cb, bool cosine, at::Tensor& idx,
             at::Tensor& dist) {
  const int64_t N = z.size(0), D = z.size(1), K = cb.size(0);
  const int64_t tiles = (K + kCodes - 1) / kCodes;
  // The codebook in A, normalised for cosine, then transposed per tile of kCodes codes
  // (padding codes are never chosen: they are skipped when scanning).
  std::vector<A> cbf(static_cast<size_t>(K * D));
  const T* cp = cb.data_ptr<T>();
  for (int64_t i = 0; i < K * D; ++i) cbf[i] = static_cast<A>(cp[i]);
  if (cosine) normalise_rows(cbf.data(), K, D);
  std::vector<A> et(static_cast<size_t>(tiles * D * kCodes), A(0));
  for (int64_t k = 0; k < K; ++k) {
    A* tile = et.data() + (k / kCodes) * D * kCodes;
    for (int64_t d = 0; d < D; ++d) tile[d * kCodes + k % kCodes] = cbf[k * D + d];
  }
  const T* zp = z.data_ptr<T>();
  int64_t* ip = idx.data_ptr<int64_t>();
  A* dp = dist.data_ptr<A>();
  const A worst = cosine ? -std::numeric_limits<A>::infinity() : std::numeric_limits<A>::infinity();
  const double task_ns = kNsPerSearchTerm * double(kRowsPerTask) * double(K) * double(D);
  genext::cpu::parallel_for(
      0, (N + kRowsPerTask - 1) / kRowsPerTask, task_ns, [&](int64_t b0, int64_t b1) {
        std::vector<A> zb(static_cast<size_t>(kRows * D));
        A scores[kRows * kCodes];
        for (int64_t task = b0; task < b1; ++task) {
          const int64_t t_end = std::min(N, (task + 1) * kRowsPerTask);
          for (int64_t r0 = task * kRowsPerTask; r0 < t_end; r0 += kRows) {
            const int64_t rows = std::min(kRows, t_end - r0);
            for (int64_t r = 0; r < kRows; ++r) {  // rows past the end repeat the last one
              const T* src = zp + std::min(r0 + r, N - 1) * D;
              for (int64_t d = 0; d < D; ++d) zb[r * D + d] = static_cast<A>(src[d]);
            }
            if (cosine) normalise_rows(zb.data(), kRows, D);
            A best[kRows];
            int64_t arg[kRows];
            for (int64_t r = 0; r < kRows; ++r) {
              best[r] = worst;
              arg[r] = -1;  // no code accepted yet
            }
            for (int64_t t = 0; t < tiles; ++t) {
              block(zb.data(), et.data() + t * D * kCodes, D, cosine, scores);
              const int64_t codes = std::min(kCodes, K - t * kCodes);
              for (int64_t r = 0; r < rows; ++r) {
                // strict: ties keep the smallest index; a NaN score never wins; an infinite one
                // only while no code has been accepted
                for (int64_t c = 0; c < codes; ++c) {
                  const A v = scores[r * kCodes + c];
                  if ((cosine ? v > best[r] : v < best[r]) || (arg[r] < 0 && v == best[r])) {
                    best[r] = v;
                    arg[r] = t * kCodes + c;
                  }
                }
              }
            }
            for (int64_t r = 0; r < rows; ++r) {  // every score NaN: index 0, distance NaN
              ip[r0 + r] = arg[r] < 0 ? 0 : arg[r];
              dp[r0 + r] = arg[r] < 0 ? std::numeric_limits<A>::quiet_NaN()
                           : cosine   ? A(1) - best[r]
                                      : std::sqrt(best[r]);
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
