// tiled_lse and tiled_lse_backward on the CPU (contrastive.h, contrastive_cpu.h): per task a row
// tile of A against every column tile of B, each score tile one BLAS product followed by fused
// passes (online row and column max and sum of exps forward; the weights
// W = g_r softmax_row(L) + g_c softmax_col(L) backward). Overrides the composite (tiled_lse.cpp)
// for CPU tensors.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "contrastive/contrastive.h"
#include "contrastive/contrastive_checks.h"
#include "contrastive/contrastive_cpu.h"

namespace genext::contrastive::cpu {
namespace {

// One score tile s (ni x nj raw scores, overwritten with L = scale * s + bias) into the running
// row statistics rmax/rsum (ni: max and sum of e^(L - max), as the composite's online update) and,
// with kCols, the running column statistics cmax/csum of this tile's columns (nj) for the rows
// seen so far by this group. cnm and tcs: nj scratch values (the columns' new max and this tile's
// sums). Pass 1 finds the maxima, pass 2 sums the exps against them.
template <class T, bool kCols>
GENEXT_INLINE void lse_tile(T* s, int64_t ni, int64_t nj, T scale, T bias, T* rmax, T* rsum,
                            T* cmax, T* csum, T* cnm, T* tcs) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // a max subtracted from scores is at least the lowest finite value: where every score so far is
  // -inf, e^(-inf - max) is then 0 instead of e^NaN (later finite scores still count)
  constexpr T kLow = std::numeric_limits<T>::lowest();
  const V vs = simd::splat<V>(scale), vb = simd::splat<V>(bias), vlow = simd::splat<V>(kLow);
  if constexpr (kCols) {
    for (int64_t j = 0; j < nj; ++j) {
      cnm[j] = cmax[j];
      tcs[j] = 0;
    }
  }
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * nj;
    V vm = simd::splat<V>(kNegInf);
    T tm = kNegInf;
    int64_t j = 0;
    for (; j + W <= nj; j += W) {
      const V l = simd::load<V>(row + j) * vs + vb;
      simd::store(row + j, l);
      vm = vmax(vm, l);
      if constexpr (kCols) simd::store(cnm + j, vmax(simd::load<V>(cnm + j), l));
    }
    for (; j < nj; ++j) {
      const T l = row[j] * scale + bias;
      row[j] = l;
      tm = vmax(tm, l);
      if constexpr (kCols) cnm[j] = vmax(cnm[j], l);
    }
    const T nm = vmax(rmax[r], vmax(tm, lane_max<T>(vm)));
    rsum[r] *= vexp(rmax[r] - vmax(nm, kLow));
    rmax[r] = nm;
  }
  for (int64_t r = 0; r < ni; ++r) {
    const T* row = s + r * nj;
    const V vm = simd::splat<V>(vmax(rmax[r], kLow));
    V acc = simd::splat<V>(0);
    T acc_tail = 0;
    int64_t j = 0;
    for (; j + W <= nj; j += W) {
      const V l = simd::load<V>(row + j);
      acc += vexp(l - vm);
      if constexpr (kCols) {
        simd::store(tcs + j, simd::load<V>(tcs + j) + vexp(l - vmax(simd::load<V>(cnm + j), vlow)));
      }
    }
    for (; j < nj; ++j) {
      acc_tail += vexp(row[j] - vmax(rmax[r], kLow));
      if constexpr (kCols) tcs[j] += vexp(row[j] - vmax(cnm[j], kLow));
    }
    rsum[r] += lane_sum<T>(acc) + acc_tail;
  }
  if constexpr (kCols) {
    for (int64_t j = 0; j < nj; ++j) {
      csum[j] = csum[j] * vexp(cmax[j] - vmax(cnm[j], kLow)) + tcs[j];
      cmax[j] = cnm[j];
    }
  }
}

// The backward's weights of one score tile: s (ni x nj raw scores) is overwritten with
// W_ij = g_r[i] e^(L_ij - rl[i]) (+ g_c[j] e^(L_ij - cl[j]) with kCols); returns sum W * raw and
// sum W.
template <class T, bool kCols>
GENEXT_INLINE ScalarSums lse_weights(T* s, int64_t ni, int64_t nj, T scale, T bias, const T* gr,
                                     const T* rl, const T* gc, const T* cl) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  const V vs = simd::splat<V>(scale), vb = simd::splat<V>(bias);
  ScalarSums out;
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * nj;
    const V vg = simd::splat<V>(gr[r]), vl = simd::splat<V>(rl[r]);
    V aw = simd::splat<V>(0), awr = simd::splat<V>(0);
    T tw = 0, twr = 0;
    int64_t j = 0;
    for (; j + W <= nj; j += W) {
      const V raw = simd::load<V>(row + j);
      const V l = raw * vs + vb;
      V w = vexp(l - vl) * vg;
      if constexpr (kCols) {
        w += vexp(l - simd::load<V>(cl + j)) * simd::load<V>(gc + j);
      }
      simd::store(row + j, w);
      aw += w;
      awr += w * raw;
    }
    for (; j < nj; ++j) {
      const T raw = row[j];
      const T l = raw * scale + bias;
      T w = vexp(l - rl[r]) * gr[r];
      if constexpr (kCols) w += vexp(l - cl[j]) * gc[j];
      row[j] = w;
      tw += w;
      twr += w * raw;
    }
    out.w += double(lane_sum<T>(aw) + tw);
    out.w_raw += double(lane_sum<T>(awr) + twr);
  }
  return out;
}

// Entry points: float compiled per ISA level (GENEXT_CPU_CLONES), double once.
#define LSE_ENTRY_POINTS(T, ATTR)                                                                  \
  ATTR void lse_tile_k(T* s, int64_t ni, int64_t nj, T scale, T bias, T* rmax, T* rsum, T* cmax,   \
                       T* csum, T* cnm, T* tcs) {                                                  \
    if (cmax != nullptr)                                                                           \
      lse_tile<T, true>(s, ni, nj, scale, bias, rmax, rsum, cmax, csum, cnm, tcs);                 \
    else                                                                                           \
      lse_tile<T, false>(s, ni, nj, scale, bias, rmax, rsum, cmax, csum, cnm, tcs);                \
  }                                                                                                \
  ATTR ScalarSums lse_weights_k(T* s, int64_t ni, int64_t nj, T scale, T bias, const T* gr,        \
                                const T* rl, const T* gc, const T* cl) {                           \
    if (gc != nullptr) return lse_weights<T, true>(s, ni, nj, scale, bias, gr, rl, gc, cl);        \
    return lse_weights<T, false>(s, ni, nj, scale, bias, gr, rl, gc, cl);                          \
  }
LSE_ENTRY_POINTS(float, GENEXT_CPU_CLONES)
LSE_ENTRY_POINTS(double, )
#undef LSE_ENTRY_POINTS

template <class T>
T scalar_of(const at::Tensor& t) {
  return t.defined() ? t.item<T>() : T(0);
}

// One row tile's log-sum-exps over all columns (buf: kRowTile x kColTile scratch). With cm/cs
// given, the tile's scores also update those running column statistics (cnm, tcs: kColTile
// scratch each).
template <class T>
void lse_row_tile(const Args& g, int64_t t, T scale, T bias, T* buf, T* rows, T* cm, T* cs, T* cnm,
                  T* tcs) {
  const int64_t n = g.a.size(0), m = g.b.size(0);
  const int64_t i0 = t * kRowTile, ni = std::min(kRowTile, n - i0);
  T rmax[kRowTile], rsum[kRowTile];
  std::fill_n(rmax, ni, -std::numeric_limits<T>::infinity());
  std::fill_n(rsum, ni, T(0));
  for (int64_t j0 = 0; j0 < m; j0 += kColTile) {
    const int64_t nj = std::min(kColTile, m - j0);
    tile_product<T>(g, i0, ni, j0, nj, buf, nj);
    lse_tile_k(buf, ni, nj, scale, bias, rmax, rsum, cm != nullptr ? cm + j0 : nullptr,
               cs != nullptr ? cs + j0 : nullptr, cnm, tcs);
  }
  for (int64_t r = 0; r < ni; ++r) rows[i0 + r] = rmax[r] + std::log(rsum[r]);
}

// Row log-sum-exps only: each row tile is independent, one task per row tile.
template <class T>
void lse_rows(const Args& g, T* out) {
  const int64_t n = g.a.size(0), m = g.b.size(0), D = g.a.size(1);
  const T scale = scalar_of<T>(g.scale), bias = scalar_of<T>(g.bias);
  const double tile_ns = double(kRowTile) * double(m) * (double(D) * kNsPerMac + kNsPerScore);
  genext::cpu::parallel_for(0, ceil_div(n, kRowTile), tile_ns, [&](int64_t t0, int64_t t1) {
    const OneBlasThread one_thread;
    std::vector<T> buf(static_cast<size_t>(kRowTile * kColTile));
    for (int64_t t = t0; t < t1; ++t)
      lse_row_tile<T>(g, t, scale, bias, buf.data(), out, nullptr, nullptr, nullptr, nullptr);
  });
}

// Row and column log-sum-exps in one pass over the tiles: groups of row tiles (kFwdGroups at
// most) each keep running statistics of every column, combined in group order at the end.
template <class T>
void lse_rows_cols(const Args& g, T* rows, T* cols) {
  const int64_t n = g.a.size(0), m = g.b.size(0), D = g.a.size(1);
  const T scale = scalar_of<T>(g.scale), bias = scalar_of<T>(g.bias);
  const int64_t tiles = ceil_div(n, kRowTile);
  const int64_t groups = std::clamp<int64_t>(tiles, 1, kFwdGroups);
  std::vector<T> cmax(static_cast<size_t>(groups * m), -std::numeric_limits<T>::infinity());
  std::vector<T> csum(static_cast<size_t>(groups * m), T(0));
  const double group_ns =
      double(ceil_div(n, groups)) * double(m) * (double(D) * kNsPerMac + 2 * kNsPerScore);
  genext::cpu::parallel_for(0, groups, group_ns, [&](int64_t g0, int64_t g1) {
    const OneBlasThread one_thread;
    std::vector<T> buf(static_cast<size_t>(kRowTile * kColTile));
    std::vector<T> cnm(static_cast<size_t>(kColTile)), tcs(static_cast<size_t>(kColTile));
    for (int64_t grp = g0; grp < g1; ++grp) {
      T* cm = cmax.data() + grp * m;
      T* cs = csum.data() + grp * m;
      for (int64_t t = group_begin(grp, tiles, groups); t < group_begin(grp + 1, tiles, groups);
           ++t)
        lse_row_tile<T>(g, t, scale, bias, buf.data(), rows, cm, cs, cnm.data(), tcs.data());
    }
  });
  // combine the groups' column statistics in group order
  genext::cpu::parallel_for(0, m, 20.0 * double(groups), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T mx = cmax[j];
      for (int64_t k = 1; k < groups; ++k) mx = std::max(mx, cmax[k * m + j]);
      T s = 0;
      const T shift = std::max(mx, std::numeric_limits<T>::lowest());  // as in lse_tile
      for (int64_t k = 0; k < groups; ++k) s += csum[k * m + j] * std::exp(cmax[k * m + j] - shift);
      cols[j] = mx + std::log(s);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> tiled_lse_cpu(const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& scale,
                                                 const std::optional<at::Tensor>& bias, bool cols) {
  const Args g = detached(prepare("tiled_lse", a, b, scale, bias));
  const int64_t n = g.a.size(0), m = g.b.size(0);
  if (cols) TORCH_CHECK_VALUE(n > 0, "tiled_lse: column log-sum-exp needs rows");
  at::Tensor rows = at::empty({n}, g.a.options());
  at::Tensor colt = at::empty({cols ? m : 0}, g.a.options());
  if (g.acc == at::kDouble) {
    if (cols)
      lse_rows_cols<double>(g, rows.data_ptr<double>(), colt.data_ptr<double>());
    else
      lse_rows<double>(g, rows.data_ptr<double>());
  } else {
    if (cols)
      lse_rows_cols<float>(g, rows.data_ptr<float>(), colt.data_ptr<float>());
    else
      lse_rows<float>(g, rows.data_ptr<float>());
  }
  return {rows, colt};
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_backward(const Args& g,
                                                                        const at::Tensor& gr,
                                                                        const at::Tensor& rl,
                                                                        const at::Tensor& gc,
                                                                        const at::Tensor& cl) {
  const T scale = scalar_of<T>(g.scale), bias = scalar_of<T>(g.bias);
  const T* grp = gr.data_ptr<T>();
  const T* rlp = rl.data_ptr<T>();
  const T* gcp = gc.defined() ? gc.data_ptr<T>() : nullptr;
  const T* clp = cl.defined() ? cl.data_ptr<T>() : nullptr;
  return backward_tiles<T>(g, [&](T* s, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
    return lse_weights_k(s, ni, nj, scale, bias, grp + i0, rlp + i0,
                         gcp != nullptr ? gcp + j0 : nullptr, clp != nullptr ? clp + j0 : nullptr);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_lse_backward_cpu(
    const at::Tensor& grad_row, const std::optional<at::Tensor>& grad_col, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse) {
  const char* op = "tiled_lse_backward";
  const Args g = detached(prepare(op, a, b, scale, bias));
  const auto [gr, rl, gc, cl] =
      prepare_lse_backward(op, g, grad_row, grad_col, row_lse, col_lse, a);
  auto [da, db, dscale, dbias] = g.acc == at::kDouble ? lse_backward<double>(g, gr, rl, gc, cl)
                                                      : lse_backward<float>(g, gr, rl, gc, cl);
  return finish_grads(g, da, db, dscale, dbias, a, b, scale, bias);
}

}  // namespace
}  // namespace genext::contrastive::cpu

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("tiled_lse", &genext::contrastive::cpu::tiled_lse_cpu);
  m.impl("tiled_lse_backward", &genext::contrastive::cpu::tiled_lse_backward_cpu);
}
