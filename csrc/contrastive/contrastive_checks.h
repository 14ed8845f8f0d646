// Argument checks of the contrastive primitives (tiled_lse, tiled_softplus_sum and their
// backwards), and the widened copies of the inputs they compute on. Messages name the op.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/device_name.h"

namespace genext::contrastive {

// Whether this build has the CUDA kernels (the contrastive ops serve CUDA tensors only then).
#ifdef GENEXT_WITH_CUDA
inline constexpr bool kWithCuda = true;
#else
inline constexpr bool kWithCuda = false;
#endif

struct Args {
  at::Tensor a, b;         // widened features, contiguous
  at::Tensor a16, b16;     // CPU bfloat16 features as given (contiguous), else undefined
  bool bf16_gemm = false;  // the CPU kernels multiply a16, b16 (contrastive_cpu.h's detached)
  at::Tensor scale;        // 0-dim, widened
  at::Tensor bias;         // 0-dim or undefined
  at::ScalarType acc;      // float or double
};

// prepare(widen = false) checks and converts the scalars but leaves a and b undefined: for the
// fused CUDA kernel, which reads the 16-bit features as they are.
inline Args prepare(const char* op, const at::Tensor& a, const at::Tensor& b,
                    const at::Tensor& scale, const std::optional<at::Tensor>& bias,
                    bool widen = true) {
  const auto dt = a.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   op, ": features must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK_TYPE(b.scalar_type() == dt, op, ": the two feature tensors must share a dtype, got ",
                   dt, " and ", b.scalar_type());
  TORCH_CHECK(b.device() == a.device() && scale.device() == a.device(), op,
              ": features and logit_scale must be on one device, got ", genext::device_name(a),
              ", ", genext::device_name(b), ", ", genext::device_name(scale));
  // The ops are ATen code that would run on any device, but genext serves the CPU and, when built
  // with them, CUDA: elsewhere (a CUDA tensor in a CPU-only build) the same NotImplementedError as
  // an op without a kernel for that device, in words.
  TORCH_CHECK_NOT_IMPLEMENTED(a.is_cpu() || (kWithCuda && a.is_cuda()), op, ": no kernel for ",
                              genext::device_type_name(a), " tensors in this genext build (",
                              kWithCuda ? "CPU and CUDA" : "CPU only: built without CUDA", ")");
  TORCH_CHECK_VALUE(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), op,
                    ": features must be (Na, D) and (Nb, D) with one D, got ", a.sizes(), " and ",
                    b.sizes());
  TORCH_CHECK_VALUE(b.size(0) > 0, op, ": the second feature set is empty");
  TORCH_CHECK_VALUE(scale.numel() == 1, op,
                    ": logit_scale must be a scalar (one element), got shape ", scale.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(scale.scalar_type()), op,
                   ": logit_scale must be a float tensor");
  Args r;
  r.acc = dt == at::kDouble ? at::kDouble : at::kFloat;
  if (widen) {
    r.a = a.to(r.acc).contiguous();
    r.b = b.to(r.acc).contiguous();
  }
  if (dt == at::kBFloat16 && a.is_cpu()) {  // for the CPU kernels' bfloat16 products
    r.a16 = a.contiguous();
    r.b16 = b.contiguous();
  }
  r.scale = scale.to(r.acc).reshape({});
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->numel() == 1, op,
                      ": logit_bias must be a scalar (one element), got shape ", bias->sizes());
    TORCH_CHECK(bias->device() == a.device(), op, ": logit_bias is on ", genext::device_name(*bias),
                " but the features are on ", genext::device_name(a));
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), op,
                     ": logit_bias must be a float tensor");
    r.bias = bias->to(r.acc).reshape({});
  }
  return r;
}

// A per-row tensor of a backward (a gradient or a saved log-sum-exp): (n,) on a's device.
inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                         const at::Tensor& a) {
  TORCH_CHECK(t.device() == a.device(), op, ": ", name, " is on ", genext::device_name(t),
              " but a is on ", genext::device_name(a));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n,
                    ",), got ", t.sizes());
}

// The per-row inputs of tiled_lse_backward, checked and widened to the accumulation type
// (contiguous): the row gradient and log-sum-exps, and the column pair when given (both or none).
struct LseBackwardVectors {
  at::Tensor grad_row, row_lse;  // (n,)
  at::Tensor grad_col, col_lse;  // (m,) or undefined
};

inline LseBackwardVectors prepare_lse_backward(const char* op, const Args& g,
                                               const at::Tensor& grad_row,
                                               const std::optional<at::Tensor>& grad_col,
                                               const at::Tensor& row_lse,
                                               const std::optional<at::Tensor>& col_lse,
                                               const at::Tensor& a) {
  const int64_t n = g.a.size(0), m = g.b.size(0);
  check_vector(op, "grad_row", grad_row, n, a);
  check_vector(op, "row_lse", row_lse, n, a);
  TORCH_CHECK_VALUE(grad_col.has_value() == col_lse.has_value(), op,
                    ": grad_col and col_lse must be given together");
  LseBackwardVectors v;
  v.grad_row = grad_row.to(g.acc).contiguous();
  v.row_lse = row_lse.to(g.acc).contiguous();
  if (grad_col.has_value()) {
    check_vector(op, "grad_col", *grad_col, m, a);
    check_vector(op, "col_lse", *col_lse, m, a);
    v.grad_col = grad_col->to(g.acc).contiguous();
    v.col_lse = col_lse->to(g.acc).contiguous();
  }
  return v;
}

}  // namespace genext::contrastive
