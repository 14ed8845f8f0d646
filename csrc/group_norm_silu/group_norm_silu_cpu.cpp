// GroupNorm(+SiLU) on the CPU: forward and backward, float32/float64/float16/bfloat16.
//
// Layouts: x as (N, C, S) contiguous ("NCS") or channels-last ("NSC"). NCS works group by group
// (a group is one contiguous run of M = C/G*S values), so statistics and normalisation of a group
// run back to back while it is in cache: x is read from memory about once and y written once,
// against eager PyTorch's three reads and two writes (group_norm, then silu).
// NSC reduces columns (channels) over chunks of rows in parallel, then normalises row by row.
//
// Arithmetic: float32 for float32/float16/bfloat16 (16-bit data is widened chunk by chunk),
// float64 for float64; sums are carried in float lanes over short runs and added into doubles.
// Variance uses sums shifted by the group's first value, so a large mean does not cancel; when that
// value is far from the mean (an outlier), the sums are taken again around the estimated mean.
// The inner loops live in group_norm_silu_cpu_loops.h; this file splits the work over threads,
// widens 16-bit data, and registers the kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "group_norm_silu/group_norm_silu_checks.h"
#include "group_norm_silu/group_norm_silu_cpu_loops.h"

namespace genext::gn {
namespace {

constexpr int64_t kChunk = 4096;  // 16-bit data is widened to float this many values at a time

template <class S, class T>
inline void widen(const S* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <class S, class T>
inline void narrow(const T* src, S* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

// Calls f(const T* xs, const T* gs, T* out, int64_t offset, int64_t len) over [0, n): directly on
// the data when S == T, else on widened chunks whose `out` is narrowed back into dst afterwards.
template <class S, class T, class F>
inline void over_chunks(const S* x, const S* g, S* dst, int64_t n, std::vector<T>& buf, F&& f) {
  if constexpr (std::is_same_v<S, T>) {
    f(x, g, dst, int64_t(0), n);
  } else {
    buf.resize(3 * kChunk);
    T *xb = buf.data(), *gb = xb + kChunk, *ob = gb + kChunk;
    for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
      const int64_t len = std::min(kChunk, n - i0);
      widen(x + i0, xb, len);
      if (g) widen(g + i0, gb, len);
      f(xb, g ? gb : nullptr, ob, i0, len);
      if (dst) narrow(ob, dst + i0, len);
    }
  }
}

// Calls f(const T* xs, const T* gs, int64_t nrows) over `rows` rows of C values: once on the data
// when S == T, else on blocks of rows widened to T.
template <class S, class T, class F>
inline void over_rows(const S* x, const S* g, int64_t rows, int64_t C, std::vector<T>& buf, F&& f) {
  if constexpr (std::is_same_v<S, T>) {
    f(x, g, rows);
  } else {
    const int64_t rb = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
    buf.resize(2 * rb * C);
    for (int64_t r = 0; r < rows; r += rb) {
      const int64_t nr = std::min(rb, rows - r);
      widen(x + r * C, buf.data(), nr * C);
      if (g) widen(g + r * C, buf.data() + rb * C, nr * C);
      f(buf.data(), g ? buf.data() + rb * C : nullptr, nr);
    }
  }
}

struct Dims {
  int64_t N, C, S, G, Cg, M;
  explicit Dims(const Problem& p)
      : N(p.N), C(p.C), S(p.S), G(p.G), Cg(p.C / p.G), M(p.C / p.G * p.S) {}
};

// NSC column reductions run over chunks of rows: (n, chunk) pairs are the parallel tasks.
inline int64_t rows_per_task(const Dims& d) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(d.C, 1));
}

template <class T>
inline void finish_stats(double s1, double s2, T shift, int64_t count, double eps, T* mean,
                         T* rstd) {
  const double mu = s1 / double(count);
  const double var = std::max(s2 / double(count) - mu * mu, 0.0);
  *mean = T(double(shift) + mu);
  *rstd = T(1.0 / std::sqrt(var + eps));
}

// Sums shifted by a value far from the mean (an outlier first element) lose the variance to
// cancellation: var = s2/M - mu^2 with mu^2 >> var. Then the sums are taken again around the
// estimated mean (one more pass over the group, only in that case).
inline bool needs_recentring(double s1, double s2, int64_t count) {
  const double mu = s1 / double(count), var = s2 / double(count) - mu * mu;
  return mu * mu > 4.0 * var && mu != 0.0;
}

// ---- forward -----------------------------------------------------------------------------------

template <class S, class T>
void forward_ncs(const Dims& d, const S* x, S* y, T* mean, T* rstd, const T* w, const T* b,
                 double eps, bool silu) {
  at::parallel_for(0, d.N * d.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / d.G, g = ng % d.G;
      const S* xg = x + (n * d.C + g * d.Cg) * d.S;
      S* yg = y + (n * d.C + g * d.Cg) * d.S;
      T shift = T(xg[0]);
      double s1 = 0, s2 = 0;
      auto sums = [&] {
        s1 = s2 = 0;
        over_chunks<S, T>(xg, nullptr, nullptr, d.M, buf,
                          [&](const T* xs, const T*, T*, int64_t, int64_t len) {
                            sums_run_k(xs, len, shift, &s1, &s2);
                          });
      };
      sums();
      if (needs_recentring(s1, s2, d.M)) {
        shift = T(double(shift) + s1 / double(d.M));
        sums();
      }
      finish_stats(s1, s2, shift, d.M, eps, &mean[ng], &rstd[ng]);
      const T m = mean[ng], rs = rstd[ng];
      for (int64_t ci = 0; ci < d.Cg; ++ci) {  // the group is still in cache
        const int64_t c = g * d.Cg + ci;
        const T a = w ? rs * w[c] : rs, bb = b ? b[c] : T(0);
        over_chunks<S, T>(xg + ci * d.S, nullptr, yg + ci * d.S, d.S, buf,
                          [&](const T* xs, const T*, T* out, int64_t, int64_t len) {
                            fwd_run_k(xs, out, len, m, a, bb, silu);
                          });
      }
    }
  });
}

template <class S, class T>
void forward_nsc(const Dims& d, const S* x, S* y, T* mean, T* rstd, const T* w, const T* b,
                 double eps, bool silu) {
  const int64_t rpt = rows_per_task(d), R = (d.S + rpt - 1) / rpt;
  std::vector<T> shift(d.N * d.C);  // per channel: its group's shift
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t c = 0; c < d.C; ++c) shift[n * d.C + c] = T(x[n * d.S * d.C + c / d.Cg * d.Cg]);
  std::vector<double> part(d.N * R * 2 * d.C);
  // Column sums per (sample, chunk of rows) task, for the samples marked in `todo`.
  auto column_sums = [&](const std::vector<char>& todo) {
    at::parallel_for(0, d.N * R, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> acc(2 * d.C), buf;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / R, r0 = (t % R) * rpt, r1 = std::min(d.S, r0 + rpt);
        if (!todo[n]) continue;
        double* s1 = &part[t * 2 * d.C];
        std::fill(s1, s1 + 2 * d.C, 0.0);
        over_rows<S, T>(x + (n * d.S + r0) * d.C, nullptr, r1 - r0, d.C, buf,
                        [&](const T* xs, const T*, int64_t nr) {
                          sums_cols_k(xs, nr, d.C, &shift[n * d.C], acc.data(), acc.data() + d.C,
                                      s1, s1 + d.C);
                        });
      }
    });
  };
  auto group_sums = [&](int64_t n, int64_t g, double* s1, double* s2) {
    *s1 = *s2 = 0;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = g * d.Cg; c < (g + 1) * d.Cg; ++c) {
        *s1 += part[(n * R + r) * 2 * d.C + c];
        *s2 += part[(n * R + r) * 2 * d.C + d.C + c];
      }
  };
  std::vector<char> todo(d.N, 1);
  column_sums(todo);
  bool again = false;  // re-centre the groups whose shift was far from their mean
  for (int64_t n = 0; n < d.N; ++n) {
    todo[n] = 0;
    for (int64_t g = 0; g < d.G; ++g) {
      double s1, s2;
      group_sums(n, g, &s1, &s2);
      if (!needs_recentring(s1, s2, d.M)) continue;
      const T centre = T(double(shift[n * d.C + g * d.Cg]) + s1 / double(d.M));
      std::fill(&shift[n * d.C + g * d.Cg], &shift[n * d.C + (g + 1) * d.Cg], centre);
      todo[n] = 1, again = true;
    }
  }
  if (again) column_sums(todo);
  // per-(n, c) coefficients for the row loop: z = (x - m) * a + b
  std::vector<T> mc(d.N * d.C), ac(d.N * d.C), bc(d.N * d.C);
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t g = 0; g < d.G; ++g) {
      double s1, s2;
      group_sums(n, g, &s1, &s2);
      const int64_t ng = n * d.G + g;
      finish_stats(s1, s2, shift[n * d.C + g * d.Cg], d.M, eps, &mean[ng], &rstd[ng]);
      for (int64_t c = g * d.Cg; c < (g + 1) * d.Cg; ++c) {
        mc[n * d.C + c] = mean[ng];
        ac[n * d.C + c] = w ? rstd[ng] * w[c] : rstd[ng];
        bc[n * d.C + c] = b ? b[c] : T(0);
      }
    }
  at::parallel_for(
      0, d.N * d.S, std::max<int64_t>(1, 16384 / d.C), [&](int64_t begin, int64_t end) {
        std::vector<T> buf;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t o = (row / d.S) * d.C;
          over_chunks<S, T>(x + row * d.C, nullptr, y + row * d.C, d.C, buf,
                            [&](const T* xs, const T*, T* out, int64_t off, int64_t len) {
                              fwd_row_k(xs, out, len, &mc[o + off], &ac[o + off], &bc[o + off],
                                        silu);
                            });
        }
      });
}

// ---- backward ----------------------------------------------------------------------------------
// A[n,c] = sum g, D[n,c] = sum g*xhat (doubles, N*C); dx from the per-group k1, k2.

template <class S, class T>
void backward_ncs(const Dims& d, const S* dy, const S* x, const T* mean, const T* rstd, const T* w,
                  const T* b, bool silu, S* dx, double* A, double* D) {
  at::parallel_for(0, d.N * d.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf;
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / d.G, g = ng % d.G, base = (n * d.C + g * d.Cg) * d.S;
      const T m = mean[ng], rs = rstd[ng];
      double k1 = 0, k2 = 0;
      for (int64_t ci = 0; ci < d.Cg; ++ci) {
        const int64_t c = g * d.Cg + ci, nc = n * d.C + c;
        const T wc = w ? w[c] : T(1), bc = b ? b[c] : T(0);
        A[nc] = D[nc] = 0;
        over_chunks<S, T>(x + base + ci * d.S, dy + base + ci * d.S, nullptr, d.S, buf,
                          [&](const T* xs, const T* gs, T*, int64_t, int64_t len) {
                            bwd_sums_run_k(xs, gs, len, m, rs, wc, bc, silu, &A[nc], &D[nc]);
                          });
        k1 += double(wc) * A[nc];
        k2 += double(wc) * D[nc];
      }
      const T tk1 = T(k1 / double(d.M)), tk2 = T(k2 / double(d.M));
      for (int64_t ci = 0; ci < d.Cg; ++ci) {
        const int64_t c = g * d.Cg + ci, o = base + ci * d.S;
        const T wc = w ? w[c] : T(1), bc = b ? b[c] : T(0);
        over_chunks<S, T>(x + o, dy + o, dx + o, d.S, buf,
                          [&](const T* xs, const T* gs, T* out, int64_t, int64_t len) {
                            bwd_dx_run_k(xs, gs, out, len, m, rs, wc, bc, tk1, tk2, silu);
                          });
      }
    }
  });
}

template <class S, class T>
void backward_nsc(const Dims& d, const S* dy, const S* x, const T* mean, const T* rstd, const T* w,
                  const T* b, bool silu, S* dx, double* A, double* D) {
  const int64_t rpt = rows_per_task(d), R = (d.S + rpt - 1) / rpt, NC = d.N * d.C;
  std::vector<T> mc(NC), rc(NC), wc(d.C), bc(d.C), k1c(NC), k2c(NC);
  for (int64_t c = 0; c < d.C; ++c) wc[c] = w ? w[c] : T(1), bc[c] = b ? b[c] : T(0);
  for (int64_t nc = 0; nc < NC; ++nc) {
    const int64_t ng = (nc / d.C) * d.G + (nc % d.C) / d.Cg;
    mc[nc] = mean[ng], rc[nc] = rstd[ng];
  }
  std::vector<double> part(d.N * R * 2 * d.C, 0.0);
  at::parallel_for(0, d.N * R, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(2 * d.C), buf;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / R, r0 = (t % R) * rpt, r1 = std::min(d.S, r0 + rpt), o = n * d.C;
      double* pa = &part[t * 2 * d.C];
      const int64_t row = (n * d.S + r0) * d.C;
      over_rows<S, T>(x + row, dy + row, r1 - r0, d.C, buf,
                      [&](const T* xs, const T* gs, int64_t nr) {
                        bwd_sums_cols_k(xs, gs, nr, d.C, &mc[o], &rc[o], wc.data(), bc.data(), silu,
                                        acc.data(), acc.data() + d.C, pa, pa + d.C);
                      });
    }
  });
  for (int64_t n = 0; n < d.N; ++n) {
    for (int64_t c = 0; c < d.C; ++c) {
      double a = 0, dd = 0;
      for (int64_t r = 0; r < R; ++r) {
        a += part[(n * R + r) * 2 * d.C + c];
        dd += part[(n * R + r) * 2 * d.C + d.C + c];
      }
      A[n * d.C + c] = a, D[n * d.C + c] = dd;
    }
    for (int64_t g = 0; g < d.G; ++g) {
      double k1 = 0, k2 = 0;
      for (int64_t c = g * d.Cg; c < (g + 1) * d.Cg; ++c)
        k1 += double(wc[c]) * A[n * d.C + c], k2 += double(wc[c]) * D[n * d.C + c];
      for (int64_t c = g * d.Cg; c < (g + 1) * d.Cg; ++c)
        k1c[n * d.C + c] = T(k1 / double(d.M)), k2c[n * d.C + c] = T(k2 / double(d.M));
    }
  }
  at::parallel_for(
      0, d.N * d.S, std::max<int64_t>(1, 16384 / d.C), [&](int64_t begin, int64_t end) {
        std::vector<T> buf;
        for (int64_t row = begin; row < end; ++row) {
          const int64_t o = (row / d.S) * d.C;
          over_chunks<S, T>(x + row * d.C, dy + row * d.C, dx + row * d.C, d.C, buf,
                            [&](const T* xs, const T* gs, T* out, int64_t off, int64_t len) {
                              bwd_dx_row_k(xs, gs, out, len, &mc[o + off], &rc[o + off], &wc[off],
                                           &bc[off], &k1c[o + off], &k2c[o + off], silu);
                            });
        }
      });
}

// ---- bindings ----------------------------------------------------------------------------------

constexpr const char* kFwd = "group_norm_silu";
constexpr const char* kBwd = "group_norm_silu_backward";

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  return t.has_value() ? t->to(acc).contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu) {
  const Problem p = check_input(kFwd, x_in, num_groups, weight, bias, /*allow_double=*/true);
  check_eps(kFwd, eps);
  const auto acc = acc_type(x_in.scalar_type());
  at::Tensor y = at::empty_like(p.x);
  at::Tensor mean = at::empty({p.N, p.G}, x_in.options().dtype(acc));
  at::Tensor rstd = at::empty({p.N, p.G}, x_in.options().dtype(acc));
  if (p.N * p.C * p.S == 0) {  // variance of no values is taken as 0
    mean.fill_(0);
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  const at::Tensor w = as_acc(weight, acc), b = as_acc(bias, acc);
  const Dims d(p);
  dispatch_cpu_dtype(kFwd, x_in.scalar_type(), [&]<class S, class T>() {
    const S* xp = p.x.const_data_ptr<S>();
    S* yp = y.mutable_data_ptr<S>();
    const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
    const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
    if (p.channels_last)
      forward_nsc<S, T>(d, xp, yp, mean.mutable_data_ptr<T>(), rstd.mutable_data_ptr<T>(), wp, bp,
                        eps, silu);
    else
      forward_ncs<S, T>(d, xp, yp, mean.mutable_data_ptr<T>(), rstd.mutable_data_ptr<T>(), wp, bp,
                        eps, silu);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t num_groups, bool silu) {
  const Problem p = check_input(kBwd, x_in, num_groups, weight, bias, /*allow_double=*/true);
  const at::Tensor dy = check_like_x(kBwd, "grad_y", grad_y, x_in, p.channels_last);
  check_stats(kBwd, mean_in, rstd_in, p);
  const auto acc = acc_type(x_in.scalar_type());
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  at::Tensor dx = at::empty_like(p.x);
  at::Tensor A = at::zeros({p.N, p.C}, x_in.options().dtype(at::kDouble));
  at::Tensor D = at::zeros({p.N, p.C}, x_in.options().dtype(at::kDouble));
  if (p.N * p.C * p.S > 0) {
    const at::Tensor w = as_acc(weight, acc), b = as_acc(bias, acc);
    const Dims d(p);
    dispatch_cpu_dtype(kBwd, x_in.scalar_type(), [&]<class S, class T>() {
      const T* wp = w.defined() ? w.const_data_ptr<T>() : nullptr;
      const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
      auto* run = p.channels_last ? &backward_nsc<S, T> : &backward_ncs<S, T>;
      run(d, dy.const_data_ptr<S>(), p.x.const_data_ptr<S>(), mean.const_data_ptr<T>(),
          rstd.const_data_ptr<T>(), wp, bp, silu, dx.mutable_data_ptr<S>(),
          A.mutable_data_ptr<double>(), D.mutable_data_ptr<double>());
    });
  }
  if (!weight.has_value()) {
    // two distinct empty tensors: op outputs must not alias each other
    return {dx, at::empty({0}, x_in.options()), at::empty({0}, x_in.options())};
  }
  // grad_weight[c] = sum_n D[n, c], grad_bias[c] = sum_n A[n, c]
  return {dx, D.sum(0).to(weight->scalar_type()), A.sum(0).to(bias->scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace genext::gn
