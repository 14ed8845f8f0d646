// CUDA kernel of tiled_lse: the fused row log-sum-exp (lse_rows.cu; rows, then columns as the
// rows of the swapped problem) for 16-bit features when GENEXT_CONTRASTIVE_FUSED=1, a prepared
// path until it has been verified on a GPU (tools/gpu_queue.toml); otherwise, and for what the
// fused kernel does not take, the composite (tiled_lse.cpp). The backward stays the composite's.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/torch_dtype.h"
#include "contrastive/contrastive.h"
#include "contrastive/contrastive_checks.h"
#include "contrastive/lse_rows.h"

namespace genext::contrastive {
namespace {

bool fused_requested() {
  const char* e = std::getenv("GENEXT_CONTRASTIVE_FUSED");
  return e != nullptr && e[0] == '1' && e[1] == '\0';
}

// out[i] = log sum_j exp(scale * x_i . y_j + bias) with the fused kernel.
at::Tensor fused_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                      const at::Tensor& bias) {
  LseRowsParams p;
  p.dtype = to_dtype("tiled_lse", x.scalar_type());
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.n = x.size(0);
  p.m = y.size(0);
  p.d = x.size(1);
  at::Tensor out = at::empty({p.n}, x.options().dtype(at::kFloat));
  p.out = out.data_ptr<float>();
  check_cuda("tiled_lse", lse_rows_cuda(p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> tiled_lse_cuda(const at::Tensor& a, const at::Tensor& b,
                                                  const at::Tensor& scale,
                                                  const std::optional<at::Tensor>& bias,
                                                  bool cols) {
  const bool fused = fused_requested() && a.is_cuda() && a.dim() == 2 && b.dim() == 2 &&
                     lse_rows_supported(a.scalar_type() == at::kHalf       ? DType::kFloat16
                                        : a.scalar_type() == at::kBFloat16 ? DType::kBFloat16
                                                                           : DType::kFloat32,
                                        a.size(1)) &&
                     b.scalar_type() == a.scalar_type() && b.size(1) == a.size(1) &&
                     b.size(0) > 0 && (!cols || a.size(0) > 0);
  if (!fused) return tiled_lse(a, b, scale, bias, cols);
  // the op's checks, and fp32 scale and bias; the features stay 16-bit
  const Args g = prepare("tiled_lse", a, b, scale, bias, /*widen=*/false);
  const c10::cuda::CUDAGuard guard(a.device());
  // rows 16-byte aligned for the kernel's copies: contiguous, from an aligned base
  const auto aligned = [](const at::Tensor& t) {
    const at::Tensor c = t.contiguous();
    return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
  };
  const at::Tensor a16 = aligned(a), b16 = aligned(b);
  const at::Tensor s = g.scale.contiguous();
  const at::Tensor bi = g.bias.defined() ? g.bias.contiguous() : at::Tensor();
  at::Tensor rows = fused_rows(a16, b16, s, bi);
  at::Tensor colv = cols ? fused_rows(b16, a16, s, bi) : at::empty({0}, rows.options());
  return {rows, colv};
}

}  // namespace
}  // namespace genext::contrastive

TORCH_LIBRARY_IMPL(genext, CUDA, m) { m.impl("tiled_lse", &genext::contrastive::tiled_lse_cuda); }
