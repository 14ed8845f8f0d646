// tiled_softplus_sum and its backward on the CPU (contrastive.h, contrastive_cpu.h): per task a
// row tile of A against every column tile of B, each score tile one BLAS product followed by one
// fused pass (the softplus sum forward; the weights W = grad * z sigmoid(z L) backward, z = -1 on
// the diagonal with `positives`). Overrides the composite (tiled_softplus_sum.cpp) for CPU
// tensors. softplus_sum_with_weights (CPU only) is the forward that keeps the weights of every
// score (per unit grad) for a backward of two matrix products.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "contrastive/contrastive.h"
#include "contrastive/contrastive_checks.h"
#include "contrastive/contrastive_cpu.h"

namespace genext::contrastive::cpu {
namespace {

// sum over j in [j0, j1) of softplus(scale * row[j] + bias)
template <class T>
GENEXT_INLINE T softplus_run(const T* row, int64_t j0, int64_t j1, T scale, T bias) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  const V vs = simd::splat<V>(scale), vb = simd::splat<V>(bias);
  V acc = simd::splat<V>(0);
  T tail = 0;
  int64_t j = j0;
  for (; j + W <= j1; j += W) acc += vsoftplus(simd::load<V>(row + j) * vs + vb);
  for (; j < j1; ++j) tail += vsoftplus(row[j] * scale + bias);
  return lane_sum<T>(acc) + tail;
}

// The sum of softplus(z_ij L_ij) over one tile s (ni x nj raw scores); row r's diagonal entry
// (z = -1) is column r + diag when `positives`, else there is none. Its own term softplus(-L) is
// summed, not derived from softplus(L), so that an infinite positive score gives 0, not inf - inf.
template <class T>
GENEXT_INLINE double softplus_tile(const T* s, int64_t ni, int64_t nj, T scale, T bias,
                                   bool positives, int64_t diag) {
  double total = 0;
  for (int64_t r = 0; r < ni; ++r) {
    const T* row = s + r * nj;
    const int64_t d = r + diag;
    if (positives && d >= 0 && d < nj) {
      total += double(softplus_run<T>(row, 0, d, scale, bias) +
                      softplus_run<T>(row, d + 1, nj, scale, bias) +
                      vsoftplus(-(row[d] * scale + bias)));
    } else {
      total += double(softplus_run<T>(row, 0, nj, scale, bias));
    }
  }
  return total;
}

// row[j] <- grad sigmoid(L_j) for j in [j0, j1), adding sum W * raw and sum W to sums
template <class T>
GENEXT_INLINE void sigmoid_run(T* row, int64_t j0, int64_t j1, T scale, T bias, T grad,
                               ScalarSums& sums) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  const V vs = simd::splat<V>(scale), vb = simd::splat<V>(bias), vg = simd::splat<V>(grad);
  V aw = simd::splat<V>(0), awr = simd::splat<V>(0);
  T tw = 0, twr = 0;
  int64_t j = j0;
  for (; j + W <= j1; j += W) {
    const V raw = simd::load<V>(row + j);
    const V w = vsigmoid(raw * vs + vb) * vg;
    simd::store(row + j, w);
    aw += w;
    awr += w * raw;
  }
  for (; j < j1; ++j) {
    const T raw = row[j];
    const T w = vsigmoid(raw * scale + bias) * grad;
    row[j] = w;
    tw += w;
    twr += w * raw;
  }
  sums.w += double(lane_sum<T>(aw) + tw);
  sums.w_raw += double(lane_sum<T>(awr) + twr);
}

// The backward's weights of one tile: s (ni x nj raw scores) is overwritten with
// W_ij = grad z_ij sigmoid(z_ij L_ij) = d(grad * softplus(z_ij L_ij)) / dL_ij.
template <class T>
GENEXT_INLINE ScalarSums softplus_weights(T* s, int64_t ni, int64_t nj, T scale, T bias, T grad,
                                          bool positives, int64_t diag) {
  ScalarSums sums;
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * nj;
    const int64_t d = r + diag;
    if (positives && d >= 0 && d < nj) {
      sigmoid_run<T>(row, 0, d, scale, bias, grad, sums);
      sigmoid_run<T>(row, d + 1, nj, scale, bias, grad, sums);
      const T raw = row[d];
      const T w = -(vsigmoid(-(raw * scale + bias)) * grad);
      row[d] = w;
      sums.w += double(w);
      sums.w_raw += double(w * raw);
    } else {
      sigmoid_run<T>(row, 0, nj, scale, bias, grad, sums);
    }
  }
  return sums;
}

// For j in [j0, j1): row[j] (a raw score) <- W_j = d softplus(x_j) / dL_j = sigmoid(x_j) with
// x_j = L_j = raw scale + bias; adds sum W raw and sum W to sums and returns sum softplus(x_j).
// softplus and sigmoid share t = e^-|x|: softplus(x) = max(x, 0) + log1p(t), sigmoid(x) =
// 1 / (1 + t) for x >= 0 and t / (1 + t) below (exact in both tails: +-inf give 1 and 0).
template <class T>
GENEXT_INLINE T softplus_weights_run(T* row, int64_t j0, int64_t j1, T scale, T bias,
                                     ScalarSums& sums) {
  using V = typename Lanes<T>::V;
  constexpr int64_t W = Lanes<T>::kWidth;
  const V vs = simd::splat<V>(scale), vb = simd::splat<V>(bias), zero = simd::splat<V>(0),
          one = simd::splat<V>(1);
  V asp = zero, aw = zero, awr = zero;
  T tsp = 0, tw = 0, twr = 0;
  int64_t j = j0;
  for (; j + W <= j1; j += W) {
    const V raw = simd::load<V>(row + j);
    const V x = raw * vs + vb;
    const V t = vexp(-(x < zero ? -x : x));
    const V inv = one / (one + t);
    const V w = x >= zero ? inv : t * inv;
    simd::store(row + j, w);
    asp += vmax(x, zero) + vlog1p_unit(t);
    aw += w;
    awr += w * raw;
  }
  for (; j < j1; ++j) {
    const T raw = row[j];
    const T x = raw * scale + bias;
    const T t = vexp(-(x < T(0) ? -x : x));
    const T inv = T(1) / (T(1) + t);
    const T w = x >= T(0) ? inv : t * inv;
    row[j] = w;
    tsp += vmax(x, T(0)) + vlog1p_unit(t);
    tw += w;
    twr += w * raw;
  }
  sums.w += double(lane_sum<T>(aw) + tw);
  sums.w_raw += double(lane_sum<T>(awr) + twr);
  return lane_sum<T>(asp) + tsp;
}

// The softplus sum of one tile and its weights in place: s (ni x nj raw scores, rows ld apart)
// is overwritten with W_ij = z_ij sigmoid(z_ij L_ij), z = -1 on the diagonal (column r + diag of
// row r) when `positives`, else 1. Adds the tile's sum W raw and sum W to sums.
template <class T>
GENEXT_INLINE double softplus_and_weights(T* s, int64_t ld, int64_t ni, int64_t nj, T scale, T bias,
                                          bool positives, int64_t diag, ScalarSums& sums) {
  double total = 0;
  for (int64_t r = 0; r < ni; ++r) {
    T* row = s + r * ld;
    const int64_t d = r + diag;
    if (positives && d >= 0 && d < nj) {
      const T raw = row[d];
      T part = softplus_weights_run<T>(row, 0, d, scale, bias, sums) +
               softplus_weights_run<T>(row, d + 1, nj, scale, bias, sums);
      const T x = -(raw * scale + bias);
      const T t = vexp(-(x < T(0) ? -x : x));
      const T inv = T(1) / (T(1) + t);
      const T w = -(x >= T(0) ? inv : t * inv);
      row[d] = w;
      part += vmax(x, T(0)) + vlog1p_unit(t);
      sums.w += double(w);
      sums.w_raw += double(w * raw);
      total += double(part);
    } else {
      total += double(softplus_weights_run<T>(row, 0, nj, scale, bias, sums));
    }
  }
  return total;
}

// Entry points: float compiled per ISA level (GENEXT_CPU_CLONES), double once.
#define SOFTPLUS_ENTRY_POINTS(T, ATTR)                                                             \
  ATTR double softplus_tile_k(const T* s, int64_t ni, int64_t nj, T scale, T bias, bool positives, \
                              int64_t diag) {                                                      \
    return softplus_tile<T>(s, ni, nj, scale, bias, positives, diag);                              \
  }                                                                                                \
  ATTR ScalarSums softplus_weights_k(T* s, int64_t ni, int64_t nj, T scale, T bias, T grad,        \
                                     bool positives, int64_t diag) {                               \
    return softplus_weights<T>(s, ni, nj, scale, bias, grad, positives, diag);                     \
  }                                                                                                \
  ATTR double softplus_and_weights_k(T* s, int64_t ld, int64_t ni, int64_t nj, T scale, T bias,    \
                                     bool positives, int64_t diag, ScalarSums& sums) {             \
    return softplus_and_weights<T>(s, ld, ni, nj, scale, bias, positives, diag, sums);             \
  }
SOFTPLUS_ENTRY_POINTS(float, GENEXT_CPU_CLONES)
SOFTPLUS_ENTRY_POINTS(double, )
#undef SOFTPLUS_ENTRY_POINTS

template <class T>
T scalar_of(const at::Tensor& t) {
  return t.defined() ? t.item<T>() : T(0);
}

// One task per row tile; the tiles' sums (double) are added in tile order.
template <class T>
double softplus_sum(const Args& g, bool positives) {
  const int64_t n = g.a.size(0), m = g.b.size(0), D = g.a.size(1);
  const T scale = scalar_of<T>(g.scale), bias = scalar_of<T>(g.bias);
  const int64_t tiles = ceil_div(n, kRowTile);
  std::vector<double> partial(static_cast<size_t>(tiles), 0.0);
  const double tile_ns = double(kRowTile) * double(m) * (double(D) * kNsPerMac + kNsPerScore);
  genext::cpu::parallel_for(0, tiles, tile_ns, [&](int64_t t0, int64_t t1) {
    const OneBlasThread one_thread;
    std::vector<T> buf(static_cast<size_t>(kRowTile * kColTile));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kRowTile, ni = std::min(kRowTile, n - i0);
      double s = 0;
      for (int64_t j0 = 0; j0 < m; j0 += kColTile) {
        const int64_t nj = std::min(kColTile, m - j0);
        tile_product<T>(g, i0, ni, j0, nj, buf.data(), nj);
        s += softplus_tile_k(buf.data(), ni, nj, scale, bias, positives, i0 - j0);
      }
      partial[t] = s;
    }
  });
  double total = 0;
  for (const double p : partial) total += p;
  return total;
}

// The sum and the weights W (n x m, the scores' buffer): one task per row tile, each score tile
// computed into its place in W by one BLAS product and turned into weights while in cache. The
// tiles' sums (double) are added in tile order.
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> softplus_sum_with_weights(const Args& g,
                                                                         bool positives) {
  const int64_t n = g.a.size(0), m = g.b.size(0), D = g.a.size(1);
  const T scale = scalar_of<T>(g.scale), bias = scalar_of<T>(g.bias);
  at::Tensor w = at::empty({n, m}, g.a.options());
  const int64_t tiles = ceil_div(n, kRowTile);
  std::vector<double> partial(static_cast<size_t>(tiles), 0.0);
  std::vector<ScalarSums> sums(static_cast<size_t>(tiles));
  T* wp = w.data_ptr<T>();
  const double tile_ns = double(kRowTile) * double(m) * (double(D) * kNsPerMac + kNsPerScore);
  genext::cpu::parallel_for(0, tiles, tile_ns, [&](int64_t t0, int64_t t1) {
    const OneBlasThread one_thread;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = t * kRowTile, ni = std::min(kRowTile, n - i0);
      double total = 0;
      ScalarSums ts;
      for (int64_t j0 = 0; j0 < m; j0 += kColTile) {
        const int64_t nj = std::min(kColTile, m - j0);
        tile_product<T>(g, i0, ni, j0, nj, wp + i0 * m + j0, m);  // in place in W, rows m apart
        total += softplus_and_weights_k(wp + i0 * m + j0, m, ni, nj, scale, bias, positives,
                                        i0 - j0, ts);
      }
      partial[t] = total;
      sums[t] = ts;
    }
  });
  double total = 0, w_raw = 0, w_sum = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    total += partial[t];
    w_raw += sums[t].w_raw;
    w_sum += sums[t].w;
  }
  at::Tensor s = at::empty({2}, g.a.options());
  s.data_ptr<T>()[0] = T(w_raw);
  s.data_ptr<T>()[1] = T(w_sum);
  return {at::full({}, total, g.a.options()), w, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softplus_sum_with_weights_cpu(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, bool positives) {
  const Args g = detached(prepare("softplus_sum_with_weights", a, b, scale, bias));
  return g.acc == at::kDouble ? softplus_sum_with_weights<double>(g, positives)
                              : softplus_sum_with_weights<float>(g, positives);
}

// d(grad * sum)/dL = grad W, so da = grad scale W B, db = grad scale W^T A, dscale = grad sum W raw
// and dbias = grad sum W: two BLAS products (on torch's thread count) and scalars.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> softplus_sum_with_weights_backward_cpu(
    const at::Tensor& grad, const at::Tensor& weights, const at::Tensor& sums, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const std::optional<at::Tensor>& bias) {
  const char* op = "softplus_sum_with_weights_backward";
  const Args g = detached(prepare(op, a, b, scale, bias));
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must have one element, got ", grad.sizes());
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(0) == g.a.size(0) &&
                        weights.size(1) == g.b.size(0) && weights.scalar_type() == g.acc,
                    op, ": weights must be (", g.a.size(0), ", ", g.b.size(0), ") in ", g.acc,
                    ", got ", weights.sizes(), " in ", weights.scalar_type());
  TORCH_CHECK_VALUE(sums.numel() == 2 && sums.scalar_type() == g.acc, op,
                    ": sums must be two values in ", g.acc, ", got ", sums.sizes(), " in ",
                    sums.scalar_type());
  TORCH_CHECK(
      grad.device() == a.device() && weights.device() == a.device() && sums.device() == a.device(),
      op, ": grad, weights and sums must be on a's device, got ", genext::device_name(grad), ", ",
      genext::device_name(weights), ", ", genext::device_name(sums));
  const at::Tensor gr = grad.to(g.acc).reshape({});
  const at::Tensor gs = gr * g.scale;
  const at::Tensor w = weights.detach();
  const int64_t n = g.a.size(0), m = g.b.size(0), D = g.a.size(1);
  at::Tensor da, db;
  if (g.bf16_gemm) {
    // MKL's bfloat16 products, the weights rounded to bfloat16 for them (contrastive_cpu.h's
    // backward_tiles does the same)
    const at::Tensor wc = w.contiguous();
    at::Tensor w16 = at::empty({n, m}, g.a16.options());
    const float* src = wc.const_data_ptr<float>();
    auto* dst = reinterpret_cast<uint16_t*>(w16.mutable_data_ptr<at::BFloat16>());
    genext::cpu::parallel_for(0, n, 0.3 * double(m), [&](int64_t r0, int64_t r1) {
      round_to_bf16(src + r0 * m, dst + r0 * m, (r1 - r0) * m);
    });
    const auto* a16 = reinterpret_cast<const uint16_t*>(g.a16.const_data_ptr<at::BFloat16>());
    const auto* b16 = reinterpret_cast<const uint16_t*>(g.b16.const_data_ptr<at::BFloat16>());
    da = at::empty({n, D}, g.a.options());
    db = at::empty({m, D}, g.a.options());
    gemm_bf16(false, false, n, D, m, 1.0f, dst, m, b16, D, 0.0f, da.mutable_data_ptr<float>(), D);
    gemm_bf16(true, false, m, D, n, 1.0f, dst, m, a16, D, 0.0f, db.mutable_data_ptr<float>(), D);
    da.mul_(gs);
    db.mul_(gs);
  } else {
    da = at::mm(w, g.b).mul_(gs);
    db = at::mm(w.t(), g.a).mul_(gs);
  }
  const at::Tensor s = sums.detach().reshape({2});
  return finish_grads(g, da, db, gr * s[0], gr * s[1], a, b, scale, bias);
}

at::Tensor tiled_softplus_sum_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                  const std::optional<at::Tensor>& bias, bool positives) {
  const Args g = detached(prepare("tiled_softplus_sum", a, b, scale, bias));
  const double total =
      g.acc == at::kDouble ? softplus_sum<double>(g, positives) : softplus_sum<float>(g, positives);
  return at::full({}, total, g.a.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_softplus_sum_backward_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, bool positives) {
  const char* op = "tiled_softplus_sum_backward";
  const Args g = detached(prepare(op, a, b, scale, bias));
  TORCH_CHECK(grad.device() == a.device(), op, ": grad is on ", genext::device_name(grad),
              " but a is on ", genext::device_name(a));
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must have one element, got ", grad.sizes());
  const auto run = [&]<class T>() {
    const T sc = scalar_of<T>(g.scale), bi = scalar_of<T>(g.bias);
    const T gs = grad.to(g.acc).reshape({}).item<T>();
    return backward_tiles<T>(g, [&](T* s, int64_t i0, int64_t ni, int64_t j0, int64_t nj) {
      return softplus_weights_k(s, ni, nj, sc, bi, gs, positives, i0 - j0);
    });
  };
  auto [da, db, dscale, dbias] =
      g.acc == at::kDouble ? run.template operator()<double>() : run.template operator()<float>();
  return finish_grads(g, da, db, dscale, dbias, a, b, scale, bias);
}

}  // namespace
}  // namespace genext::contrastive::cpu

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("tiled_softplus_sum", &genext::contrastive::cpu::tiled_softplus_sum_cpu);
  m.impl("tiled_softplus_sum_backward", &genext::contrastive::cpu::tiled_softplus_sum_backward_cpu);
  m.impl("softplus_sum_with_weights", &genext::contrastive::cpu::softplus_sum_with_weights_cpu);
  m.impl("softplus_sum_with_weights_backward",
         &genext::contrastive::cpu::softplus_sum_with_weights_backward_cpu);
}
