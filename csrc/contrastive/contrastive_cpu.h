// The CPU kernels of the contrastive primitives (tiled_lse_cpu.cpp, tiled_softplus_sum_cpu.cpp):
// the work is split over tiles of kRowTile rows of A, each task single-threaded: the score tile
// A_i B_j^T (kRowTile x kColTile) is one BLAS product into a per-task buffer, and everything after
// it is one or two fused passes over that buffer (vectorised loops, this header) instead of a
// dozen ATen elementwise ops that each wake the thread team. This header: tile sizes, the cost
// model for genext::cpu::parallel_for, the lane helpers of the fused loops, and the backward
// driver both ops share.
//
// Determinism: results do not depend on the thread count. Row statistics and dA belong to one row
// tile; statistics and gradients that span row tiles (column log-sum-exps, dB, dscale, dbias) are
// kept per group of row tiles (the groups depend on N only) and combined in group order.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/cpu_simd.h"
#include "contrastive/bf16_gemm_cpu.h"
#include "contrastive/contrastive_checks.h"

namespace genext::contrastive::cpu {

// A score tile of kRowTile x kColTile fp32 is 512 KiB, about one core's L2 on the machines
// measured. The row tile sets how often BLAS packs each column tile of B (once per row tile and
// product): with 128 rows the packing cost the N4096 D512 loss about 20% against the composite's
// 256-row tiles on one thread, and more with another process on the core; 256 rows match it.
inline constexpr int64_t kRowTile = 256;
inline constexpr int64_t kColTile = 512;
// Groups of row tiles that keep their own partial column statistics (forward: 2 x Nb values
// each) and their own partial dB (backward: Nb x D values each, the first group writes dB itself).
// Fixed numbers, so that results do not depend on the thread count; the backward's few groups
// bound its extra memory to (kBwdGroups - 1) x Nb x D while leaving a thread several tasks to take.
inline constexpr int64_t kFwdGroups = 32;
inline constexpr int64_t kBwdGroups = 4;

// One core's time per multiply-add of the products and per score of the fused passes, for the
// thread count of parallel_for: thread CPU time of the forward on one thread (AVX2 + FMA EPYC,
// MKL sgemm, shared machine) was about 95 ms at N2048 D512 and 50 ms at N2048 D128.
inline constexpr double kNsPerMac = 0.04;
inline constexpr double kNsPerScore = 2.0;

// The inputs without autograd history (the kernels run below the autograd key, where a float32
// input is the caller's tensor itself, and the out= products reject tensors that require grad),
// and whether bfloat16 ones go to MKL's bfloat16 products.
inline Args detached(Args g) {
  g.a = g.a.detach();
  g.b = g.b.detach();
  if (g.a16.defined()) {
    g.a16 = g.a16.detach();
    g.b16 = g.b16.detach();
    // MKL's bfloat16 products (bf16_gemm_cpu.h), decided once per op; their sizes are ints
    constexpr int64_t kIntMax = 2147483647;
    g.bf16_gemm = bf16_gemm_enabled() && g.a.size(1) > 0 && g.a.size(1) <= kIntMax &&
                  g.a.size(0) <= kIntMax && g.b.size(0) <= kIntMax;
  }
  return g;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The row tiles [first, last) of group g when `tiles` row tiles are split into `groups` groups.
inline int64_t group_begin(int64_t g, int64_t tiles, int64_t groups) { return g * tiles / groups; }

// ---- BLAS on one thread -----------------------------------------------------------------------
// Inside a parallel_for team MKL (OpenMP threading) sees the enclosing parallel region and runs
// on the calling thread, but a task that parallel_for runs on the calling thread (small inputs, a
// single group) is outside any region, where MKL would wake its own team for each tile's product:
// the per-launch wait this kernel exists to avoid. MKL's thread-local thread count is set to 1
// around the tasks when torch's MKL exports it (found at run time: builds without MKL skip it).
// MKL_Set_Num_Threads_Local is the C entry point (mkl_service.h maps mkl_set_num_threads_local
// to it); the lower-case symbol is the Fortran one, which takes a pointer.
class OneBlasThread {
 public:
  OneBlasThread() : prev_(set() != nullptr ? set()(1) : 0) {}
  ~OneBlasThread() {
    if (set() != nullptr) set()(prev_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  using SetFn = int (*)(int);
  static SetFn set() {
    static const SetFn fn = [] {
      void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
      void* sym = dlsym(lib != nullptr ? lib : RTLD_DEFAULT, "MKL_Set_Num_Threads_Local");
      return reinterpret_cast<SetFn>(sym);
    }();
    return fn;
  }
  int prev_;
};

// out (ni x nj, rows ldo apart, in a caller's buffer) = A[i0 : i0 + ni] B[j0 : j0 + nj]^T: MKL's
// bfloat16 products for bfloat16 features where enabled (bf16_gemm_cpu.h), else BLAS on the
// widened features.
template <class T>
void tile_product(const Args& g, int64_t i0, int64_t ni, int64_t j0, int64_t nj, T* out,
                  int64_t ldo) {
  const int64_t D = g.a.size(1);
  if constexpr (std::is_same_v<T, float>) {
    if (g.bf16_gemm) {
      const auto* a = reinterpret_cast<const uint16_t*>(g.a16.const_data_ptr<at::BFloat16>());
      const auto* b = reinterpret_cast<const uint16_t*>(g.b16.const_data_ptr<at::BFloat16>());
      gemm_bf16(false, true, ni, nj, D, 1.0f, a + i0 * D, D, b + j0 * D, D, 0.0f, out, ldo);
      return;
    }
  }
  at::Tensor o = at::from_blob(out, {ni, nj}, {ldo, 1}, g.a.options());
  at::mm_out(o, g.a.narrow(0, i0, ni), g.b.narrow(0, j0, nj).t());
}

// ---- lanes ----------------------------------------------------------------------------------
// The fused loops are written once for float (8-lane vectors, then a scalar tail) and double
// (scalar: the fp64 path is for accuracy, not speed). Eight lanes are one ymm register: GCC lowers
// the selects of a wider vector (c ? a : b, the max and abs of softplus, exp's clamps) lane by
// lane through general registers where the machine has no such register (x86-64-v3), which made
// the softplus pass about 35x slower than this (7.9 against ~0.2 ns per score on one core).

template <class T>
struct Lanes {
  using V = T;
  static constexpr int64_t kWidth = 1;
};
template <>
struct Lanes<float> {
  using V = simd::f32x8;
  static constexpr int64_t kWidth = 8;
};

template <class V>
GENEXT_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// e^x: the vectorised exp for float lanes (about 1 ulp; e^x for x > 88 is e^88, never reached
// here: the arguments are differences to a maximum or a log-sum-exp, <= 0), std::exp for double.
template <class V>
GENEXT_INLINE V vexp(V x) {
  if constexpr (std::is_same_v<V, double>) {
    return std::exp(x);
  } else {
    return simd::exp_v(x);
  }
}

// log(1 + y) for y in [0, 1] (float lanes): 2 atanh(s) with s = y / (2 + y) in [0, 1/3], the
// odd series to s^15 (truncation below 1e-9 relative), so small y keep full relative precision
// (log(1 + y) rounds 1 + y first); std::log1p for double.
template <class V>
GENEXT_INLINE V vlog1p_unit(V y) {
  if constexpr (std::is_same_v<V, double>) {
    return std::log1p(y);
  } else {
    const V s = y / (y + 2.0f);
    const V s2 = s * s;
    V p = s2 * (1.0f / 15) + 1.0f / 13;
    p = p * s2 + 1.0f / 11;
    p = p * s2 + 1.0f / 9;
    p = p * s2 + 1.0f / 7;
    p = p * s2 + 1.0f / 5;
    p = p * s2 + 1.0f / 3;
    return (s + s) * (p * s2 + 1.0f);
  }
}

// softplus(x) = max(x, 0) + log1p(e^-|x|): exact in both tails (+inf -> +inf, -inf -> 0).
template <class V>
GENEXT_INLINE V vsoftplus(V x) {
  const V zero = simd::splat<V>(0);
  const V ax = x < zero ? -x : x;
  return vmax(x, zero) + vlog1p_unit(vexp(-ax));
}

// 1 / (1 + e^-x); e^-x saturates at e^88 (result ~6e-39 instead of 0 for x < -88).
template <class V>
GENEXT_INLINE V vsigmoid(V x) {
  return simd::splat<V>(1) / (vexp(-x) + 1);
}

template <class T, class V>
GENEXT_INLINE T lane_sum(V v) {
  if constexpr (std::is_same_v<V, T>) {
    return v;
  } else {
    return simd::hsum_tree(v);
  }
}

template <class T, class V>
GENEXT_INLINE T lane_max(V v) {
  if constexpr (std::is_same_v<V, T>) {
    return v;
  } else {
    T m = v[0];
    for (int t = 1; t < int(sizeof(V) / sizeof(T)); ++t) m = v[t] > m ? v[t] : m;
    return m;
  }
}

// ---- the backward driver ----------------------------------------------------------------------

// Scalar gradient sums of one group: sum_ij w_ij raw_ij (for dscale) and sum_ij w_ij (for dbias).
struct ScalarSums {
  double w_raw = 0, w = 0;
};

// da = scale * sum_j W_ij B_j and db = scale * sum_i W_ij^T A_i over the tiles, with
// weights(buf, i0, ni, j0, nj) overwriting the raw score tile buf (ni x nj, raw = A_i B_j^T) with
// W_ij = d(objective)/dL_ij and returning that tile's ScalarSums. Returns (da, db, dscale, dbias)
// in the widened dtype: da, db (N x D) and two 0-dim tensors.
template <class T, class Weights>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tiles(const Args& g,
                                                                          const Weights& weights) {
  const at::Tensor &a = g.a, &b = g.b;
  const int64_t n = a.size(0), m = b.size(0), D = a.size(1);
  at::Tensor da = at::zeros_like(a), db = at::zeros_like(b);
  const int64_t tiles = ceil_div(n, kRowTile);
  const int64_t groups = std::clamp<int64_t>(tiles, 1, kBwdGroups);
  // dB partials of groups 1.. (group 0 accumulates into db)
  at::Tensor extra = groups > 1 ? at::zeros({groups - 1, m, D}, b.options()) : at::Tensor();
  std::vector<ScalarSums> sums(static_cast<size_t>(groups));
  const double group_ns =
      double(ceil_div(n, groups)) * double(m) * (3.0 * double(D) * kNsPerMac + kNsPerScore);
  // bfloat16 features on MKL's bfloat16 products: the weights are rounded to bfloat16 for them
  // (as eager bfloat16's gradient of the logits is), accumulated in float
  const bool use16 = std::is_same_v<T, float> && g.bf16_gemm;
  genext::cpu::parallel_for(0, groups, group_ns, [&](int64_t g0, int64_t g1) {
    const OneBlasThread one_thread;
    std::vector<T> buf(static_cast<size_t>(kRowTile * kColTile));
    std::vector<uint16_t> w16(use16 ? static_cast<size_t>(kRowTile * kColTile) : 0);
    for (int64_t grp = g0; grp < g1; ++grp) {
      at::Tensor dbg = grp == 0 ? db : extra[grp - 1];
      ScalarSums s;
      for (int64_t t = group_begin(grp, tiles, groups); t < group_begin(grp + 1, tiles, groups);
           ++t) {
        const int64_t i0 = t * kRowTile, ni = std::min(kRowTile, n - i0);
        const at::Tensor ai = a.narrow(0, i0, ni);
        at::Tensor dai = da.narrow(0, i0, ni);
        for (int64_t j0 = 0; j0 < m; j0 += kColTile) {
          const int64_t nj = std::min(kColTile, m - j0);
          const at::Tensor bj = b.narrow(0, j0, nj);
          tile_product<T>(g, i0, ni, j0, nj, buf.data(), nj);
          const ScalarSums ts = weights(buf.data(), i0, ni, j0, nj);
          s.w_raw += ts.w_raw;
          s.w += ts.w;
          if constexpr (std::is_same_v<T, float>) {
            if (use16) {
              const auto* a16 =
                  reinterpret_cast<const uint16_t*>(g.a16.const_data_ptr<at::BFloat16>());
              const auto* b16 =
                  reinterpret_cast<const uint16_t*>(g.b16.const_data_ptr<at::BFloat16>());
              round_to_bf16(buf.data(), w16.data(), ni * nj);
              gemm_bf16(false, false, ni, D, nj, 1.0f, w16.data(), nj, b16 + j0 * D, D, 1.0f,
                        dai.data_ptr<float>(), D);
              gemm_bf16(true, false, nj, D, ni, 1.0f, w16.data(), nj, a16 + i0 * D, D, 1.0f,
                        dbg.data_ptr<float>() + j0 * D, D);
              continue;
            }
          }
          const at::Tensor w = at::from_blob(buf.data(), {ni, nj}, a.options());
          dai.addmm_(w, bj);
          dbg.narrow(0, j0, nj).addmm_(w.t(), ai);
        }
      }
      sums[grp] = s;
    }
  });
  // db = scale * (partial 0 + partial 1 + ...), added in group order, and da = scale * da, in
  // parallel over rows
  T* dbp = db.data_ptr<T>();
  T* dap = da.data_ptr<T>();
  const T* ex = groups > 1 ? extra.data_ptr<T>() : nullptr;
  const T sc = g.scale.item<T>();
  const int64_t rows = std::max(n, m);
  genext::cpu::parallel_for(0, rows, 0.5 * double(D) * double(groups + 1),
                            [&](int64_t r0, int64_t r1) {
                              for (int64_t r = r0; r < r1; ++r) {
                                if (r < m) {
                                  T* row = dbp + r * D;
                                  for (int64_t k = 1; k < groups; ++k) {
                                    const T* p = ex + ((k - 1) * m + r) * D;
                                    for (int64_t d = 0; d < D; ++d) row[d] += p[d];
                                  }
                                  for (int64_t d = 0; d < D; ++d) row[d] *= sc;
                                }
                                if (r < n) {
                                  T* row = dap + r * D;
                                  for (int64_t d = 0; d < D; ++d) row[d] *= sc;
                                }
                              }
                            });
  double w_raw = 0, w = 0;
  for (const ScalarSums& s : sums) {
    w_raw += s.w_raw;
    w += s.w;
  }
  const auto opts = a.options();
  return {da, db, at::full({}, w_raw, opts), at::full({}, w, opts)};
}

}  // namespace genext::contrastive::cpu
