// tiled_softplus_sum and its backward (contrastive.h): sum_ij softplus(z_ij L_ij) over
// L = scale * A B^T (+ bias) one score tile at a time, and its gradients; z_ij = -1 on the
// diagonal with `positives` (SigLIP's -log sigmoid(L_ii) = softplus(-L_ii)), else 1. Summing the
// positives' own terms (not subtracting L_ii from softplus(L_ii)) keeps the loss exact when a
// score is infinite.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/log1p.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "contrastive/contrastive.h"
#include "contrastive/contrastive_checks.h"

namespace genext::contrastive {
namespace {

// Negates the entries of tile (rows from i0, columns from j0) that lie on the diagonal i == j.
void negate_diagonal(at::Tensor& tile, int64_t i0, int64_t j0) {
  const int64_t off = i0 - j0;  // local column - local row on the diagonal
  if (off < tile.size(1) && -off < tile.size(0)) tile.diagonal(off).neg_();
}

at::Tensor tiled_softplus_sum(const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
                              const std::optional<at::Tensor>& bias, bool positives) {
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
      at::Tensor l = scores(g, ai, bj, nullptr);
      if (positives) negate_diagonal(l, i0, j0);
      total = total + (at::clamp_min(l, 0) + at::log1p(at::exp(-at::abs(l)))).sum().to(at::kDouble);
    }
  }
  return total.to(g.acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tiled_softplus_sum_backward(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& scale,
    const std::optional<at::Tensor>& bias, bool positives) {
  const char* op = "tiled_softplus_sum_backward";
  const Args g = prepare(op, a, b, scale, bias);
  TORCH_CHECK(grad.device() == a.device(), op, ": grad is on ", genext::device_name(grad),
              " but a is on ", genext::device_name(a));
  TORCH_CHECK_VALUE(grad.numel() == 1, op, ": grad must have one element, got ", grad.sizes());
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
      at::Tensor l = scores(g, ai, bj, &raw);
      if (positives) negate_diagonal(l, i0, j0);
      at::Tensor w = at::sigmoid(l);  // d softplus(z L) / dL = z sigmoid(z L)
      if (positives) negate_diagonal(w, i0, j0);
      w = w * gs;
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
  m.impl("tiled_softplus_sum", &genext::contrastive::tiled_softplus_sum);
  m.impl("tiled_softplus_sum_backward", &genext::contrastive::tiled_softplus_sum_backward);
}
