// GroupNorm(+SiLU) on the CPU: forward and backward, float32/float64/float16/bfloat16.
//
// Layouts: x as (N, C, S) contiguous ("NCS") or channels-last ("NSC"). NCS works group by group
// (a group is one contiguous run of M = C/G*S values), so statistics and normalisation of a group
// run back to back while it is in cache: x is read from memory about once and y written once,
// against eager PyTorch's three reads and two writes (group_norm, then silu).
// NSC reduces columns (channels) over chunks of rows in parallel, then normalises row by row.
//
// Arithmetic: float32 for float32/float16/bfloat16, float64 for float64; sums are carried in float
// lanes over short runs and added into doubles. bfloat16 is converted inside the loops; float16
// (not a fast path) is converted to float32 as a whole tensor and back. Variance uses sums shifted
// by the group's first value, so a large mean does not cancel; when that value is far from the
// mean (an outlier), the sums are taken again around the estimated mean.
// The inner loops live in group_norm_silu_cpu_loops.h; this file splits the work over threads
// (genext::cpu::parallel_for: small problems stay on the calling thread) and registers the kernels.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "group_norm_silu/group_norm_silu_checks.h"
#include "group_norm_silu/group_norm_silu_cpu_loops.h"

namespace genext::gn {
namespace {

// One core's time per value, for sizing the thread team (genext::cpu::parallel_for): thread CPU
// time with torch.set_num_threads(1) over N * C * S values, float32 and bfloat16, at 2x1280x8x8,
// 2x1280x16x16, 2x320x64x64 and 1x512x64x64 on the project's 2-core AVX2 machine (busy with other
// jobs, so these are on the high side: a team is then woken a little early rather than late).
constexpr double kFwdNs = 0.9;     // NCS statistics + normalise + SiLU
constexpr double kBwdNs = 1.4;     // NCS backward, both passes
constexpr double kStatsNs = 0.3;   // NSC column sums alone
constexpr double kRowFwdNs = 0.7;  // NSC normalise + SiLU
constexpr double kRowBwdNs = 1.0;  // NSC backward: column sums, or dx of one value

struct Dims {
  int64_t N, C, S, G, Cg, M;
  explicit Dims(const Problem& p)
      : N(p.N), C(p.C), S(p.S), G(p.G), Cg(p.C / p.G), M(p.C / p.G * p.S) {}
};

// NSC column reductions run over chunks of rows: (n, chunk) pairs are the parallel tasks. The
// chunking depends on the shape only, so results do not depend on the number of threads.
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
// S: the storage type the loops take (float, bf16_t or double); T: the compute type.

template <class S, class T>
void forward_ncs(const Dims& d, const S* x, S* y, T* mean, T* rstd, const T* w, const T* b,
                 double eps, bool silu) {
  cpu::parallel_for(0, d.N * d.G, double(d.M) * kFwdNs, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / d.G, g = ng % d.G;
      const S* xg = x + (n * d.C + g * d.Cg) * d.S;
      S* yg = y + (n * d.C + g * d.Cg) * d.S;
      T shift = T(to_f(xg[0]));
      double s1 = 0, s2 = 0;
      sums_run_k(xg, d.M, shift, &s1, &s2);
      if (needs_recentring(s1, s2, d.M)) {
        shift = T(double(shift) + s1 / double(d.M));
        s1 = s2 = 0;
        sums_run_k(xg, d.M, shift, &s1, &s2);
      }
      finish_stats(s1, s2, shift, d.M, eps, &mean[ng], &rstd[ng]);
      // the group is still in cache
      fwd_group_k(xg, yg, d.Cg, d.S, mean[ng], rstd[ng], w ? w + g * d.Cg : nullptr,
                  b ? b + g * d.Cg : nullptr, silu);
    }
  });
}

template <class S, class T>
void forward_nsc(const Dims& d, const S* x, S* y, T* mean, T* rstd, const T* w, const T* b,
                 double eps, bool silu) {
  const int64_t rpt = rows_per_task(d), R = (d.S + rpt - 1) / rpt;
  std::vector<T> shift(d.N * d.C);  // per channel: its group's shift
  for (int64_t n = 0; n < d.N; ++n)
    for (int64_t c = 0; c < d.C; ++c)
      shift[n * d.C + c] = T(to_f(x[n * d.S * d.C + c / d.Cg * d.Cg]));
  std::vector<double> part(d.N * R * 2 * d.C);
  // Column sums per (sample, chunk of rows) task, for the samples marked in `todo`.
  auto column_sums = [&](const std::vector<char>& todo) {
    cpu::parallel_for(0, d.N * R, double(std::min(rpt, d.S) * d.C) * kStatsNs,
                      [&](int64_t begin, int64_t end) {
                        std::vector<T> acc(2 * d.C);
                        for (int64_t t = begin; t < end; ++t) {
                          const int64_t n = t / R, r0 = (t % R) * rpt, r1 = std::min(d.S, r0 + rpt);
                          if (!todo[n]) continue;
                          double* s1 = &part[t * 2 * d.C];
                          std::fill(s1, s1 + 2 * d.C, 0.0);
                          sums_cols_k(x + (n * d.S + r0) * d.C, r1 - r0, d.C, &shift[n * d.C],
                                      acc.data(), acc.data() + d.C, s1, s1 + d.C);
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
  cpu::parallel_for(
      0, d.N * d.S, double(d.C) * kRowFwdNs,
      [&](int64_t begin, int64_t end) {
        // one call per run of rows of one sample (they share the per-channel parameters)
        for (int64_t row = begin; row < end;) {
          const int64_t n = row / d.S, stop = std::min(end, (n + 1) * d.S), o = n * d.C;
          fwd_rows_k(x + row * d.C, y + row * d.C, stop - row, d.C, &mc[o], &ac[o], &bc[o], silu);
          row = stop;
        }
      },
      std::max<int64_t>(1, 4096 / d.C));
}

// ---- backward ----------------------------------------------------------------------------------
// A[n,c] = sum g, D[n,c] = sum g*xhat (doubles, N*C), g = dy * act'(z); dx from the per-group
// k1 = sum_c w A / M, k2 = sum_c w D / M.

// Group by group: pass 1 computes g once (the sigmoid's only evaluation), keeps it as float (in dx
// itself for float data, in a per-thread scratch group for bfloat16) and sums A, D; pass 2 reads
// x and g back from cache and writes dx.
template <class S, class T>
void backward_ncs(const Dims& d, const S* dy, const S* x, const T* mean, const T* rstd, const T* w,
                  const T* b, bool silu, S* dx, double* A, double* D) {
  cpu::parallel_for(0, d.N * d.G, double(d.M) * kBwdNs, [&](int64_t begin, int64_t end) {
    // uninitialised (a zeroed std::vector of a 1 MB group cost a memset per chunk)
    std::unique_ptr<T[]> scratch(std::is_same_v<S, T> ? nullptr : new T[d.M]);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / d.G, g = ng % d.G, base = (n * d.C + g * d.Cg) * d.S;
      T* gs;
      if constexpr (std::is_same_v<S, T>)
        gs = dx + base;
      else
        gs = scratch.get();
      const T m = mean[ng], rs = rstd[ng];
      const T* wg = w ? w + g * d.Cg : nullptr;
      double* Ag = A + n * d.C + g * d.Cg;
      double* Dg = D + n * d.C + g * d.Cg;
      bwd_g_group_k(x + base, dy + base, gs, d.Cg, d.S, m, rs, wg, b ? b + g * d.Cg : nullptr, silu,
                    Ag, Dg);
      double k1 = 0, k2 = 0;
      for (int64_t ci = 0; ci < d.Cg; ++ci) {
        const double wc = wg ? double(wg[ci]) : 1.0;
        k1 += wc * Ag[ci];
        k2 += wc * Dg[ci];
      }
      const T ck1 = rs * T(k1 / double(d.M)), ck2 = rs * T(k2 / double(d.M));
      bwd_dx_group_k(x + base, gs, dx + base, d.Cg, d.S, m, rs, wg, ck1, ck2);
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
  cpu::parallel_for(
      0, d.N * R, double(std::min(rpt, d.S) * d.C) * kRowBwdNs, [&](int64_t begin, int64_t end) {
        std::vector<T> acc(2 * d.C);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / R, r0 = (t % R) * rpt, r1 = std::min(d.S, r0 + rpt), o = n * d.C;
          double* pa = &part[t * 2 * d.C];
          const int64_t row = (n * d.S + r0) * d.C;
          bwd_sums_cols_k(x + row, dy + row, r1 - r0, d.C, &mc[o], &rc[o], wc.data(), bc.data(),
                          silu, acc.data(), acc.data() + d.C, pa, pa + d.C);
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
  cpu::parallel_for(
      0, d.N * d.S, double(d.C) * kRowBwdNs,
      [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end;) {  // runs of rows of one sample, as forward_nsc
          const int64_t n = row / d.S, stop = std::min(end, (n + 1) * d.S), o = n * d.C;
          bwd_dx_rows_k(x + row * d.C, dy + row * d.C, dx + row * d.C, stop - row, d.C, &mc[o],
                        &rc[o], wc.data(), bc.data(), &k1c[o], &k2c[o], silu);
          row = stop;
        }
      },
      std::max<int64_t>(1, 4096 / d.C));
}

// ---- bindings ----------------------------------------------------------------------------------

constexpr const char* kFwd = "group_norm_silu";
constexpr const char* kBwd = "group_norm_silu_backward";

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The affine parameter t (C values of float32 or x's dtype) as T values: t's own data when it
// holds contiguous T, else a copy converted into buf (no tensor is allocated: at small shapes two
// .to() calls and their outputs cost about a third of a bfloat16 backward's fixed time).
template <class T>
const T* params_as(const std::optional<at::Tensor>& t, std::vector<T>& buf) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& v = *t;
  if (v.scalar_type() == c10::CppTypeToScalarType<T>::value && v.is_contiguous())
    return v.const_data_ptr<T>();
  buf.resize(v.numel());
  const int64_t st = v.stride(0);
  auto copy = [&](const auto* p) {
    for (int64_t c = 0; c < v.numel(); ++c) buf[c] = T(float(p[c * st]));
  };
  switch (v.scalar_type()) {
    case at::kFloat: copy(v.const_data_ptr<float>()); break;
    case at::kDouble:
      for (int64_t c = 0; c < v.numel(); ++c) buf[c] = T(v.const_data_ptr<double>()[c * st]);
      break;
    case at::kBFloat16: copy(v.const_data_ptr<c10::BFloat16>()); break;
    case at::kHalf: copy(v.const_data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "group_norm_silu: unexpected parameter dtype ", v.scalar_type());
  }
  return buf.data();
}

// The pointer type the loops take for S: bfloat16 as its bits.
template <class S>
using Raw = std::conditional_t<std::is_same_v<S, c10::BFloat16>, bf16_t, S>;
template <class S>
const Raw<S>* raw(const at::Tensor& t) {
  return reinterpret_cast<const Raw<S>*>(t.const_data_ptr<S>());
}
template <class S>
Raw<S>* raw_mut(at::Tensor& t) {
  return reinterpret_cast<Raw<S>*>(t.mutable_data_ptr<S>());
}

inline std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_silu_cpu(
    const at::Tensor& x_in, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, bool silu) {
  const Problem p = check_input(kFwd, x_in, num_groups, weight, bias, /*allow_double=*/true);
  check_eps(kFwd, eps);
  if (x_in.scalar_type() == at::kHalf) {  // through float32, in the kernel's layout
    auto [y, mean, rstd] = group_norm_silu_cpu(p.x.to(at::kFloat), num_groups, to_float(weight),
                                               to_float(bias), eps, silu);
    return {y.to(at::kHalf), mean, rstd};
  }
  const auto acc = acc_type(x_in.scalar_type());
  at::Tensor y = at::empty_like(p.x);
  at::Tensor mean = at::empty({p.N, p.G}, x_in.options().dtype(acc));
  at::Tensor rstd = at::empty({p.N, p.G}, x_in.options().dtype(acc));
  if (p.N * p.C * p.S == 0) {  // variance of no values is taken as 0
    mean.fill_(0);
    rstd.fill_(1.0 / std::sqrt(eps));
    return {y, mean, rstd};
  }
  const Dims d(p);
  dispatch_cpu_dtype(kFwd, x_in.scalar_type(), [&]<class S, class T>() {
    if constexpr (!std::is_same_v<S, c10::Half>) {
      std::vector<T> wbuf, bbuf;
      const T* wp = params_as<T>(weight, wbuf);
      const T* bp = params_as<T>(bias, bbuf);
      auto* run = p.channels_last ? &forward_nsc<Raw<S>, T> : &forward_ncs<Raw<S>, T>;
      run(d, raw<S>(p.x), raw_mut<S>(y), mean.mutable_data_ptr<T>(), rstd.mutable_data_ptr<T>(), wp,
          bp, eps, silu);
    }
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
  if (x_in.scalar_type() == at::kHalf) {  // through float32, in the kernel's layout
    auto [dx, dw, db] =
        group_norm_silu_backward_cpu(dy.to(at::kFloat), p.x.to(at::kFloat), mean_in, rstd_in,
                                     to_float(weight), to_float(bias), num_groups, silu);
    if (!weight.has_value()) return {dx.to(at::kHalf), dw, db};
    return {dx.to(at::kHalf), dw.to(weight->scalar_type()), db.to(bias->scalar_type())};
  }
  const auto acc = acc_type(x_in.scalar_type());
  const at::Tensor mean = mean_in.to(acc).contiguous(), rstd = rstd_in.to(acc).contiguous();
  at::Tensor dx = at::empty_like(p.x);
  // A, D: (N, C) per-sample channel sums, plain buffers (0 when there are no values)
  std::vector<double> A(p.N * p.C, 0.0), D(p.N * p.C, 0.0);
  if (p.N * p.C * p.S > 0) {
    const Dims d(p);
    dispatch_cpu_dtype(kBwd, x_in.scalar_type(), [&]<class S, class T>() {
      if constexpr (!std::is_same_v<S, c10::Half>) {
        std::vector<T> wbuf, bbuf;
        const T* wp = params_as<T>(weight, wbuf);
        const T* bp = params_as<T>(bias, bbuf);
        auto* run = p.channels_last ? &backward_nsc<Raw<S>, T> : &backward_ncs<Raw<S>, T>;
        run(d, raw<S>(dy), raw<S>(p.x), mean.const_data_ptr<T>(), rstd.const_data_ptr<T>(), wp, bp,
            silu, raw_mut<S>(dx), A.data(), D.data());
      }
    });
  }
  if (!weight.has_value()) {
    // two distinct empty tensors: op outputs must not alias each other
    return {dx, at::empty({0}, x_in.options()), at::empty({0}, x_in.options())};
  }
  // grad_weight[c] = sum_n D[n, c], grad_bias[c] = sum_n A[n, c], summed here (at::sum over a
  // small (N, C) tensor cost more than the whole backward of a 2x64x2x2 input) and written in the
  // parameters' dtypes: rounded to the accumulation type, then to that dtype (as .to() would).
  at::Tensor dw = at::empty({p.C}, weight->options());
  at::Tensor db = at::empty({p.C}, bias->options());
  auto write = [&](at::Tensor& out, const std::vector<double>& sums) {
    dispatch_cpu_dtype(kBwd, out.scalar_type(), [&]<class S, class T>() {
      S* o = out.mutable_data_ptr<S>();
      for (int64_t c = 0; c < p.C; ++c) {
        double s = 0;
        for (int64_t n = 0; n < p.N; ++n) s += sums[n * p.C + c];
        o[c] = S(acc == at::kDouble ? s : double(float(s)));
      }
    });
  };
  write(dw, D);
  write(db, A);
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("group_norm_silu", &group_norm_silu_cpu);
  m.impl("group_norm_silu_backward", &group_norm_silu_backward_cpu);
}

}  // namespace genext::gn
