// tiled_lse and tiled_lse_backward (contrastive.h): row and column log-sum-exps of
// L = scale * A B^T (+ bias) one score tile at a time, and their gradients.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "contrastive/contrastive.h"
#include "contrastive/contrastive_checks.h"

namespace genext::contrastive {
namespace {

// Online log-sum-exp over the rows of L = scale * X Y^T (+ bias), X in row tiles, Y in column
// tiles.
at::Tensor lse_rows(const Args& g, const at::Tensor& x, const at::Tensor& y) {
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

}  // namespace

// Row and (optionally) column log-sum-exps in one pass over the tiles: each score tile feeds the
// running row statistics of its row tile and the running column statistics (vectors of length
// Nb, O(N) memory), so the products are computed once.
std::tuple<at::Tensor, at::Tensor> tiled_lse(const at::Tensor& a, const at::Tensor& b,
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

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_lse_backward(
    const at::Tensor& grad_row, const std::optional<at::Tensor>& grad_col, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& scale, const std::optional<at::Tensor>& bias,
    const at::Tensor& row_lse, const std::optional<at::Tensor>& col_lse) {
  const char* op = "tiled_lse_backward";
  const Args g = prepare(op, a, b, scale, bias);
  const int64_t row_step = row_tile(a), col_step = col_tile(a);
  const int64_t n = g.a.size(0), m = g.b.size(0);
  const auto [gr, rl, gc, cl] =
      prepare_lse_backward(op, g, grad_row, grad_col, row_lse, col_lse, a);
  const bool use_cols = gc.defined();
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
      at::Tensor w =
          (l - rl.narrow(0, i0, ni).unsqueeze(1)).exp() * gr.narrow(0, i0, ni).unsqueeze(1);
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

}  // namespace
}  // namespace genext::contrastive

TORCH_LIBRARY_IMPL(genext, CompositeExplicitAutograd, m) {
  m.impl("tiled_lse", &genext::contrastive::tiled_lse);
  m.impl("tiled_lse_backward", &genext::contrastive::tiled_lse_backward);
}
