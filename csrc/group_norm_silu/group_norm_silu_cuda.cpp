// CUDA binding of group_norm_silu: argument checks, output and workspace allocation, launch on the
// current stream. Host C++ only (compiled by the C++ compiler, not nvcc); the kernels and their
// launchers live in group_norm_silu.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/cuda_device.h"
#include "common/device_name.h"
#include "group_norm_silu/group_norm_silu.h"
#include "group_norm_silu/group_norm_silu_calls.h"
#include "group_norm_silu/group_norm_silu_checks.h"

namespace genext::gn {
namespace {

constexpr const char* kFwdOp = "group_norm_silu";
constexpr const char* kBwdOp = "group_norm_silu_backward";

int num_sms(c10::DeviceIndex dev) { return genext::num_sms(dev, "group_norm_silu"); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, int64_t num_groups,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   double eps, bool silu) {
  const Problem pr = check_input(kFwdOp, x, num_groups, weight, bias, /*allow_double=*/false);
  check_eps(kFwdOp, eps);
  TORCH_CHECK(pr.x.is_cuda(), kFwdOp, ": x must be a CUDA tensor, got ", genext::device_name(pr.x));
  const c10::cuda::CUDAGuard guard(pr.x.device());
  const auto sms = [&] { return num_sms(pr.x.device().index()); };
  return fwd_run(kFwdOp, pr, weight, bias, eps, silu, sms, [](const FwdParams& p) {
    check_cuda(kFwdOp, group_norm_silu_fwd(p, c10::cuda::getCurrentCUDAStream()));
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   int64_t num_groups, bool silu) {
  const Problem pr = check_input(kBwdOp, x, num_groups, weight, bias, /*allow_double=*/false);
  TORCH_CHECK(pr.x.is_cuda(), kBwdOp, ": x must be a CUDA tensor, got ", genext::device_name(pr.x));
  const at::Tensor dy = check_like_x(kBwdOp, "grad_y", grad_y, x, pr.channels_last);
  check_stats(kBwdOp, mean, rstd, pr);
  TORCH_CHECK_TYPE(
      mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat, kBwdOp,
      ": mean and rstd must be float32 (as group_norm_silu returns them for this x), got ",
      mean.scalar_type(), " and ", rstd.scalar_type());
  const c10::cuda::CUDAGuard guard(pr.x.device());
  const auto sms = [&] { return num_sms(pr.x.device().index()); };
  return bwd_run(kBwdOp, pr, dy, mean, rstd, weight, bias, silu, sms, [](const BwdParams& p) {
    check_cuda(kBwdOp, group_norm_silu_bwd(p, c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace
}  // namespace genext::gn

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("group_norm_silu", &genext::gn::fwd);
  m.impl("group_norm_silu_backward", &genext::gn::bwd);
}
