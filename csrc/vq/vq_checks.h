// Argument checks shared by the CPU and CUDA bindings of vq_nearest and vq_ema_update.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/device_name.h"

namespace genext::vq {

inline constexpr int64_t kMaxCodes = (int64_t{1} << 31) - 1;

inline void check_nearest(const char* op, const at::Tensor& z, const at::Tensor& codebook,
                          bool allow_double) {
  const auto dt = z.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       (allow_double && dt == at::kDouble),
                   op, ": z must be float16, bfloat16, float32", allow_double ? " or float64" : "",
                   " on ", genext::device_type_name(z), ", got ", dt);
  TORCH_CHECK_TYPE(codebook.scalar_type() == dt, op, ": codebook must have z's dtype ", dt,
                   ", got ", codebook.scalar_type());
  TORCH_CHECK(codebook.device() == z.device(), op, ": codebook is on ",
              genext::device_name(codebook), " but z is on ", genext::device_name(z));
  TORCH_CHECK_VALUE(z.dim() == 2 && codebook.dim() == 2, op,
                    ": z must be (N, D) and codebook (K, D), got ", z.sizes(), " and ",
                    codebook.sizes());
  TORCH_CHECK_VALUE(z.size(1) == codebook.size(1), op, ": z and codebook must share D, got ",
                    z.size(1), " and ", codebook.size(1));
  TORCH_CHECK_VALUE(z.size(1) > 0, op, ": D must be positive, got D = 0");
  TORCH_CHECK_VALUE(codebook.size(0) > 0, op, ": the codebook is empty (K = 0)");
}

inline void check_ema(const char* op, const at::Tensor& indices, const at::Tensor& z,
                      int64_t num_codes, bool allow_double) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, op,
                   ": indices must be int64 or int32, got ", indices.scalar_type());
  const auto dt = z.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       (allow_double && dt == at::kDouble),
                   op, ": z must be a float tensor, got ", dt);
  TORCH_CHECK(indices.device() == z.device(), op, ": indices are on ", genext::device_name(indices),
              " but z is on ", genext::device_name(z));
  TORCH_CHECK_VALUE(z.dim() == 2 && indices.dim() == 1 && indices.size(0) == z.size(0), op,
                    ": indices must be (N,) and z (N, D), got ", indices.sizes(), " and ",
                    z.sizes());
  TORCH_CHECK_VALUE(z.size(1) > 0, op, ": D must be positive, got D = 0");
  TORCH_CHECK_VALUE(num_codes > 0, op, ": num_codes must be positive, got ", num_codes);
  // a (num_codes, D) table beyond this is no codebook: a clear error, not an allocator message
  TORCH_CHECK_VALUE(num_codes <= kMaxCodes, op, ": num_codes must be at most 2**31 - 1, got ",
                    num_codes);
}

}  // namespace genext::vq
