// Tiled contrastive-loss primitives over the score matrix L = scale * A B^T (+ bias), written
// with ATen tensor ops so that one source serves every device (registered once, for
// CompositeExplicitAutograd): matrix products go to the
// device's BLAS (cuBLAS tensor cores on CUDA), and at most one tile of L (one row_tile x col_tile
// floats, see row_tile/col_tile) exists at a time, never the Na x Nb matrix.
//   tiled_lse:            row_lse[i] = log sum_j exp(L_ij), and col_lse[j] (optional)
//   tiled_lse_backward:   gradients of sum_i g_r[i] row_lse[i] + sum_j g_c[j] col_lse[j]
//                         (both in tiled_lse.cpp)
//   tiled_softplus_sum:   sum_ij softplus(L_ij)
//   tiled_softplus_sum_backward (both in tiled_softplus_sum.cpp)
// Arithmetic in fp32 (fp64 for fp64 inputs): 16-bit features are widened once (O(N D)); the CPU
// kernels multiply bfloat16 features on MKL's bfloat16 products instead where the CPU has AMX
// (contrastive/bf16_gemm_cpu.h).
// This header: the tile sizes and the helpers both files use.
#pragma once
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <optional>
#include <tuple>

#include "contrastive/contrastive_checks.h"

namespace genext::contrastive {

// Tile sizes: on the CPU a tile of scores (256 x 1024 floats, 1 MiB) stays in cache across the
// elementwise passes over it; on CUDA larger tiles mean fewer launches.
inline int64_t row_tile(const at::Tensor& t) { return t.is_cuda() ? 1024 : 256; }
inline int64_t col_tile(const at::Tensor& t) { return t.is_cuda() ? 4096 : 1024; }

// raw = A_i B_j^T; returns L = scale * raw (+ bias)
inline at::Tensor scores(const Args& g, const at::Tensor& ai, const at::Tensor& bj,
                         at::Tensor* raw) {
  at::Tensor r = at::mm(ai, bj.t());
  if (raw != nullptr) *raw = r;
  at::Tensor l = r * g.scale;
  if (g.bias.defined()) l = l + g.bias;
  return l;
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

// The composite tiled_lse (tiled_lse.cpp), which the CUDA binding falls back to.
std::tuple<at::Tensor, at::Tensor> tiled_lse(const at::Tensor& a, const at::Tensor& b,
                                             const at::Tensor& scale,
                                             const std::optional<at::Tensor>& bias, bool cols);

}  // namespace genext::contrastive
