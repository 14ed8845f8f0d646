// Argument checks and layout choice shared by the CPU and CUDA bindings of group_norm_silu.
// Messages name the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <string>

#include "common/device_name.h"

namespace genext::gn {

struct Problem {
  at::Tensor x;  // x in the layout the kernel reads: contiguous or channels-last
  int64_t N = 0, C = 0, S = 1, G = 1;
  bool channels_last = false;
};

inline std::string dtype_list(bool allow_double) {
  return allow_double ? "float32, float64, float16 or bfloat16" : "float32, float16 or bfloat16";
}

inline bool is_channels_last(const at::Tensor& x) {
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  if (x.dim() == 3) return x.transpose(1, 2).is_contiguous();  // (N, L, C) storage
  return false;
}

// Checks x and the affine parameters; picks the layout. `op` prefixes every message.
inline Problem check_input(const char* op, const at::Tensor& x, int64_t num_groups,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, bool allow_double) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       (allow_double && dt == at::kDouble),
                   op, ": x must be ", dtype_list(allow_double), " on ",
                   genext::device_type_name(x), ", got ", dt);
  TORCH_CHECK_VALUE(
      x.dim() >= 3 && x.dim() <= 5, op,
      ": x must have shape (N, C, *) with 1 to 3 spatial dims (rank 3 to 5), got rank ", x.dim(),
      " ", x.sizes());
  Problem p;
  p.N = x.size(0);
  p.C = x.size(1);
  for (int64_t d = 2; d < x.dim(); ++d) p.S *= x.size(d);
  TORCH_CHECK_VALUE(num_groups > 0, op, ": num_groups must be positive, got ", num_groups);
  TORCH_CHECK_VALUE(p.C % num_groups == 0, op, ": channels (", p.C,
                    ") must be divisible by num_groups (", num_groups, ")");
  p.G = num_groups;
  for (const auto* t : {&weight, &bias}) {
    if (!t->has_value()) continue;
    const at::Tensor& w = t->value();
    const char* name = (t == &weight) ? "weight" : "bias";
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == p.C, op, ": ", name, " must have shape (C,) = (",
                      p.C, ",), got ", w.sizes());
    TORCH_CHECK(w.device() == x.device(), op, ": ", name, " is on ", genext::device_name(w),
                " but x is on ", genext::device_name(x));
    TORCH_CHECK_TYPE(w.scalar_type() == dt || w.scalar_type() == at::kFloat, op, ": ", name,
                     " must be float32 or x's dtype (", dt, "), got ", w.scalar_type());
  }
  TORCH_CHECK_VALUE(weight.has_value() == bias.has_value(), op,
                    ": weight and bias must be given together (affine) or both be None");
  if (x.is_contiguous()) {
    p.x = x;
  } else if (is_channels_last(x)) {
    p.x = x;
    p.channels_last = true;
  } else {
    p.x = x.contiguous();  // any other strides: one copy, then the contiguous kernel
  }
  return p;
}

// eps is added to the variance: a negative or NaN eps gives NaN or infinite outputs instead of an
// error, so both bindings reject it. `op` prefixes the message.
inline void check_eps(const char* op, double eps) {
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be non-negative, got ", eps);
}

// Returns t in the layout the kernels read (contiguous, or channels-last when channels_last).
inline at::Tensor to_layout(const at::Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous();
  if (is_channels_last(t)) return t;
  if (t.dim() == 4) return t.contiguous(at::MemoryFormat::ChannelsLast);
  if (t.dim() == 5) return t.contiguous(at::MemoryFormat::ChannelsLast3d);
  return t.transpose(1, 2).contiguous().transpose(1, 2);
}

// grad_y must match x in shape, dtype and device; it is brought to the kernel's layout.
inline at::Tensor check_like_x(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& x, bool channels_last) {
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", genext::device_name(t),
              " but x is on ", genext::device_name(x));
  return to_layout(t, channels_last);
}

inline void check_stats(const char* op, const at::Tensor& mean, const at::Tensor& rstd,
                        const Problem& p) {
  for (const auto* t : {&mean, &rstd}) {
    const char* name = (t == &mean) ? "mean" : "rstd";
    TORCH_CHECK_VALUE(t->numel() == p.N * p.G, op, ": ", name,
                      " must hold N*num_groups = ", p.N * p.G, " values, got shape ", t->sizes());
    TORCH_CHECK(t->device() == p.x.device(), op, ": ", name, " is on ", genext::device_name(*t),
                " but x is on ", genext::device_name(p.x));
  }
}

}  // namespace genext::gn
