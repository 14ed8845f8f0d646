// Tiled contrastive-loss primitives over the score matrix L = scale * A B^T (+ bias), written
// with ATen tensor ops so that one source serves the CPU and CUDA keys: matrix products go to the
// device's BLAS (cuBLAS tensor cores on CUDA), and at most one tile of L (one row_tile x col_tile
// floats, see row_tile/col_tile) exists at a time, never the Na x Nb matrix.
//   tiled_lse:            row_lse[i] = log sum_j exp(L_ij), and col_lse[j] (optional)
//   tiled_lse_backward:   gradients of sum_i g_r[i] row_lse[i] + sum_j g_c[j] col_lse[j]
//   tiled_softplus_sum:   sum_ij softplus(L_ij)
//   tiled_softplus_sum_backward
// Arithmetic in fp32 (fp64 for fp64 inputs): 16-bit features are widened once (O(N D)).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

#include "common/device_name.h"

namespace genext::contrastive {

// Tile sizes: on the CPU a tile of scores (256 x 1024 floats, 1 MiB) stays in cache across the
// elementwise passes over it; on CUDA larger tiles mean fewer launches.
inline int64_t row_tile(const at::Tensor& t) { return t.is_cuda() ? 1024 : 256; }
inline int64_t col_tile(const at::Tensor& t) { return t.is_cuda() ? 4096 : 1024; }

struct Args {
  at::Tensor a, b;      // widened features, contiguous
  at::Tensor scale;     // 0-dim, widened
  at::Tensor bias;      // 0-dim or undefined
  at::ScalarType acc;   // float or double
};

inline Args prepare(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                    const std::optional<at::Tensor>& bias) {
  const auto dt = a.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   op, ": features must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_TYPE(b.scalar_type() == dt, op, ": the two feature tensors must share a dtype, got ",
                   dt, " and ", b.scalar_type());
  TORCH_CHECK(b.device() == a.device() && scale.device() == a.device(), op,
              ": features and logit_scale must be on one device, got ", genext::device_name(a), ", ",
              genext::device_name(b), ", ", genext::device_name(scale));
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), op,
                    ": features must be (Na, D) and (Nb, D) with one D, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(b.size(0) > 0, op, ": the second feature set is empty");
  TORCH_CHECK_VALUE(scale.numel() == 1, op, ": logit_scale must be a scalar (one element), got shape ",
                    scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), op, ": logit_scale must be a float tensor");
  Args r;
  r.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  r.a = a.to(r.acc).contiguous();
  r.b = b.to(r.acc).contiguous();
  r.scale = scale.to(r.acc).reshape({});
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->numel() == 1, op, ": logit_bias must be a scalar (one element), got shape ",
                      bias->sizes());
    TORCH_CHECK(bias->device() == a.device(), op, ": logit_bias is on ", genext::device_name(*bias),
                " but the features are on ", genext::device_name(a));
    r.bias = bias->to(r.acc).reshape({});
  }
  return r;
}

// raw = A_i B_j^T; returns L = scale * raw (+ bias)
inline at::Tensor scores(const Args& g, const at::Tensor& ai, const at::Tensor& bj, at::Tensor* raw) {
  at::Tensor r = at::mm(ai, bj.t());
  if (raw != nullptr) *raw = r;
  at::Tensor l = r * g.scale;
  if (g.bias.defined()) l = l + g.bias;
  return l;
}

// Online log-sum-exp over the rows of L = scale * X Y^T (+ bias), X in row tiles, Y in column tiles.
inline at::Tensor lse_rows(const Args& g, const at::Tensor& x, const at::Tensor& y) {
  const int64_t row_step = row_tile(x), col_step = col_tile(x);
  const int64_t n = x.size(0), m = y.size(0);
  at::Tensor out = at::empty({n}, x.options());
  for (int64_t i0 = 0; i0 < n; i0 += row_step) {
    const at::Tensor xi = x.narrow(0, i0, std::min(row_step, n - i0));
    at::Tensor mx, s;
    for (int64_t j0 = 0; j0 < m; j0 += col_step) {
      const at::Tensor yj = y.narrow(0, j0, std::min(col_step, m - j0));
      const at::Tensor l = scores(g, xi, yj, nullptr);
      const at::Tensor tmax = std::get<0>(l.max(1));
      if (!mx.defined()) {
        mx = tmax;
        s = (l - mx.unsqueeze(1)).exp().sum(1);
      } else {
        const at::Tensor nm = at::maximum(mx, tmax);
        s = s * (mx - nm).exp() + (l - nm.unsqueeze(1)).exp().sum(1);
        mx = nm;
      }
    }
    out.narrow(0, i0, xi.size(0)).copy_(mx + s.log());
  }
  return out;
}

// Row and (optionally) column log-sum-exps in one pass over the tiles: each score tile feeds the
// running row statistics of its row tile and the running column statistics (vectors of length
// Nb, O(N) memory), so the products are computed once.
inline std::tuple<at::Tensor, at::Tensor> tiled_lse(const at::Tensor& a, const at::Tensor& b,
                                                    const at::Tensor& scale,
                                                    const std::optional<at::Tensor>& bias, bool cols) {
  const Args g = prepare("tiled_lse", a, b, scale, bias);
  const int64_t row_step = row_tile(a), col_step = col_tile(a);
  if (!cols) return {lse_rows(g, g.a, g.b), at::empty({0}, g.a.options())};
  const int64_t n = g.a.size(0), m = g.b.size(0);
  TORCH_CHECK_VALUE(n > 0, "tiled_lse: column log-sum-exp needs rows");
  at::Tensor rows = at::empty({n}, g.a.options());
  at::Tensor cmax = at::full({m}, -INFINITY, g.a.options());
  at::Tensor csum = at::zeros({m}, g.a.options());
  for (int64_t i0 = 0; i0 < n; i0 += row_step) {
    const int64_t ni = std::min(row_step, n - i0);
    const at::Tensor ai = g.a.narrow(0, i0, ni);
    at::Tensor mx, s;
    for (int64_t j0 = 0; j0 < m; j0 += col_step) {
      const int64_t nj = std::min(col_step, m - j0);
      const at::Tensor l = scores(g, ai, g.b.narrow(0, j0, nj), nullptr);
      const at::Tensor tmax = std::get<0>(l.max(1));
      if (!mx.defined()) {
        mx = tmax;
        s = (l - mx.unsqueeze(1)).exp().sum(1);
      } else {
        const at::Tensor nm = at::maximum(mx, tmax);
        s = s * (mx - nm).exp() + (l - nm.unsqueeze(1)).exp().sum(1);
        mx = nm;
      }
      at::Tensor cm = cmax.narrow(0, j0, nj), cs = csum.narrow(0, j0, nj);
      const at::Tensor nc = at::maximum(cm, std::get<0>(l.max(0)));
      cs.copy_(cs * (cm - nc).exp() + (l - nc.unsqueeze(0)).exp().sum(0));
      cm.copy_(nc);
    }
    rows.narrow(0, i0, ni).copy_(mx + s.log());
  }
  return {rows, cmax + csum.log()};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> finish_grads(
    const Args& g, at::Tensor da, at::Tensor db, const at::Tensor& dscale, const at::Tensor& dbias,
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias) {
  at::Tensor ds = dscale.to(scale.scalar_type()).reshape(scale.sizes());
  at::Tensor dbi = bias.has_value() ? dbias.to(bias->scalar_type()).reshape(bias->sizes())
                                    : at::empty({0}, scale.options());
  return {da.to(a.scalar_type()), db.to(b.scalar_type()), ds, dbi};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_lse_backward(
    const at::Tensor& grad_row, const std::optional<at::Tensor>& grad_col, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse) {
  const Args g = prepare("tiled_lse_backward", a, b, scale, bias);
  const int64_t row_step = row_tile(a), col_step = col_tile(a);
  const int64_t n = g.a.size(0), m = g.b.size(0);
  const at::Tensor gr = grad_row.to(g.acc), rl = row_lse.to(g.acc);
  const bool use_cols = grad_col.has_value() && col_lse.has_value() && col_lse->numel() == m;
  const at::Tensor gc = use_cols ? grad_col->to(g.acc) : at::Tensor();
  const at::Tensor cl = use_cols ? col_lse->to(g.acc) : at::Tensor();
  at::Tensor da = at::zeros_like(g.a), db = at::zeros_like(g.b);
  at::Tensor dscale = at::zeros({}, g.a.options()), dbias = at::zeros({}, g.a.options());
  for (int64_t i0 = 0; i0 < n; i0 += row_step) {
    const int64_t ni = std::min(row_step, n - i0);
    const at::Tensor ai = g.a.narrow(0, i0, ni);
    for (int64_t j0 = 0; j0 < m; j0 += col_step) {
      const int64_t nj = std::min(col_step, m - j0);
      const at::Tensor bj = g.b.narrow(0, j0, nj);
      at::Tensor raw;
      const at::Tensor l = scores(g, ai, bj, &raw);
      // w_ij = g_r[i] softmax_row(L)_ij + g_c[j] softmax_col(L)_ij = d(objective)/dL_ij
      at::Tensor w = (l - rl.narrow(0, i0, ni).unsqueeze(1)).exp() * gr.narrow(0, i0, ni).unsqueeze(1);
      if (use_cols) {
        w = w + (l - cl.narrow(0, j0, nj).unsqueeze(0)).exp() * gc.narrow(0, j0, nj).unsqueeze(0);
      }
      da.narrow(0, i0, ni).add_(at::mm(w, bj));
      db.narrow(0, j0, nj).add_(at::mm(w.t(), ai));
      dscale = dscale + (w * raw).sum();
      dbias = dbias + w.sum();
    }
  }
  da.mul_(g.scale);
  db.mul_(g.scale);
  return finish_grads(g, da, db, dscale, dbias, a, b, scale, bias);
}

inline at::Tensor tiled_softplus_sum(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                                     const std::optional<at::Tensor>& bias) {
  const Args g = prepare("tiled_softplus_sum", a, b, scale, bias);
  const int64_t row_step = row_tile(a), col_step = col_tile(a);
  const int64_t n = g.a.size(0), m = g.b.size(0);
  at::Tensor total = at::zeros({}, g.a.options().dtype(at::kDouble));
  for (int64_t i0 = 0; i0 < n; i0 += row_step) {
    const at::Tensor ai = g.a.narrow(0, i0, std::min(row_step, n - i0));
    for (int64_t j0 = 0; j0 < m; j0 += col_step) {
      const at::Tensor bj = g.b.narrow(0, j0, std::min(col_step, m - j0));
      // softplus(x) = max(x, 0) + log1p(exp(-|x|)), exact for large x (at::softplus returns x
      // itself above 20 and drops the exp(-x) term)
      const at::Tensor l = scores(g, ai, bj, nullptr);
      total = total + (at::clamp_min(l, 0) + at::log1p(at::exp(-at::abs(l)))).sum().to(at::kDouble);
    }
  }
  return total.to(g.acc);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_softplus_sum_backward(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias) {
  const Args g = prepare("tiled_softplus_sum_backward", a, b, scale, bias);
  const int64_t row_step = row_tile(a), col_step = col_tile(a);
  const int64_t n = g.a.size(0), m = g.b.size(0);
  const at::Tensor gs = grad.to(g.acc).reshape({});
  at::Tensor da = at::zeros_like(g.a), db = at::zeros_like(g.b);
  at::Tensor dscale = at::zeros({}, g.a.options()), dbias = at::zeros({}, g.a.options());
  for (int64_t i0 = 0; i0 < n; i0 += row_step) {
    const int64_t ni = std::min(row_step, n - i0);
    const at::Tensor ai = g.a.narrow(0, i0, ni);
    for (int64_t j0 = 0; j0 < m; j0 += col_step) {
      const int64_t nj = std::min(col_step, m - j0);
      const at::Tensor bj = g.b.narrow(0, j0, nj);
      at::Tensor raw;
      const at::Tensor w = at::sigmoid(scores(g, ai, bj, &raw)) * gs;  // d softplus(L) / dL
      da.narrow(0, i0, ni).add_(at::mm(w, bj));
      db.narrow(0, j0, nj).add_(at::mm(w.t(), ai));
      dscale = dscale + (w * raw).sum();
      dbias = dbias + w.sum();
    }
  }
  da.mul_(g.scale);
  db.mul_(g.scale);
  return finish_grads(g, da, db, dscale, dbias, a, b, scale, bias);
}

}  // namespace genext::contrastive
