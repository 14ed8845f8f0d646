// CUDA binding of group_norm_silu: argument checks, output and workspace allocation, launch on the
// current stream. Host C++ only (compiled by the C++ compiler, not nvcc); the kernels and their
// launchers live in group_norm_silu.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/cuda_device.h"
#include "common/device_name.h"
#include "common/torch_dtype.h"
#include "group_norm_silu/group_norm_silu.h"
#include "group_norm_silu/group_norm_silu_checks.h"

namespace genext::gn {
namespace {

constexpr const char* kFwdOp = "group_norm_silu";
constexpr const char* kBwdOp = "group_norm_silu_backward";

int num_sms(c10::DeviceIndex dev) { return genext::num_sms(dev, "group_norm_silu"); }

Shape shape_of(const Problem& pr) {
  Shape s;
  s.N = pr.N;
  s.C = pr.C;
  s.S = pr.S;
  s.G = pr.G;
  s.channels_last = pr.channels_last;
  return s;
}

// weight/bias as the kernels read them: contiguous, on one dtype (float32 or x's). When the two
// differ (one float32, one x's dtype) both are read as float32.
struct AffineArgs {
  at::Tensor w, b;
  DType wdtype = DType::kFloat32;
};
AffineArgs affine_args(const char* op, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, DType xdtype) {
  AffineArgs a;
  a.wdtype = xdtype;
  if (!weight.has_value()) return a;  // check_input: weight and bias come together
  a.w = weight->contiguous();
  a.b = bias->contiguous();
  if (a.w.scalar_type() != a.b.scalar_type()) {
    a.w = a.w.to(at::kFloat);
    a.b = a.b.to(at::kFloat);
  }
  a.wdtype = to_dtype(op, a.w.scalar_type());
  return a;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, int64_t num_groups,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   double eps, bool silu) {
  const Problem pr = check_input(kFwdOp, x, num_groups, weight, bias, /*allow_double=*/false);
  check_eps(kFwdOp, eps);
  TORCH_CHECK(pr.x.is_cuda(), kFwdOp, ": x must be a CUDA tensor, got ", genext::device_name(pr.x));
  const c10::cuda::CUDAGuard guard(pr.x.device());

  at::Tensor y = at::empty_like(pr.x);  // keeps the channels-last strides
  const auto fopts = pr.x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({pr.N, pr.G}, fopts);
  at::Tensor rstd = at::empty({pr.N, pr.G}, fopts);
  if (pr.N * pr.C * pr.S == 0) {
    // Groups of zero elements (S == 0, or C == 0 with N > 0): mean 0, rstd 1/sqrt(eps).
    if (pr.N * pr.G > 0) {
      mean.fill_(0.0);
      rstd.fill_(1.0 / std::sqrt(static_cast<double>(static_cast<float>(eps))));
    }
    return {y, mean, rstd};
  }

  const DType dt = to_dtype(kFwdOp, pr.x.scalar_type());
  const AffineArgs aff = affine_args(kFwdOp, weight, bias, dt);
  FwdParams p;
  p.shape = shape_of(pr);
  p.dtype = dt;
  p.x = pr.x.data_ptr();
  p.y = y.data_ptr();
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.weight = aff.w.defined() ? aff.w.data_ptr() : nullptr;
  p.bias = aff.b.defined() ? aff.b.data_ptr() : nullptr;
  p.wdtype = aff.wdtype;
  p.eps = static_cast<float>(eps);
  p.silu = silu;
  p.num_sms = num_sms(pr.x.device().index());
  const at::Tensor ws = workspace(fwd_workspace_bytes(p), pr.x);
  p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
  check_cuda(kFwdOp, group_norm_silu_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {y, mean, rstd};
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

  at::Tensor grad_x = at::empty_like(pr.x);
  const bool affine = weight.has_value();
  const auto fopts = pr.x.options().dtype(at::kFloat);
  at::Tensor grad_w = affine ? at::empty({pr.C}, fopts) : at::Tensor();
  at::Tensor grad_b = affine ? at::empty({pr.C}, fopts) : at::Tensor();

  if (pr.N * pr.C * pr.S == 0) {
    if (affine) {
      grad_w.zero_();
      grad_b.zero_();
    }
  } else {
    const at::Tensor mean_c = mean.contiguous();
    const at::Tensor rstd_c = rstd.contiguous();
    const DType dt = to_dtype(kBwdOp, pr.x.scalar_type());
    const AffineArgs aff = affine_args(kBwdOp, weight, bias, dt);
    BwdParams p;
    p.shape = shape_of(pr);
    p.dtype = dt;
    p.grad_y = dy.data_ptr();
    p.x = pr.x.data_ptr();
    p.mean = mean_c.data_ptr<float>();
    p.rstd = rstd_c.data_ptr<float>();
    p.weight = aff.w.defined() ? aff.w.data_ptr() : nullptr;
    p.bias = aff.b.defined() ? aff.b.data_ptr() : nullptr;
    p.wdtype = aff.wdtype;
    p.silu = silu;
    p.grad_x = grad_x.data_ptr();
    p.grad_weight = affine ? grad_w.data_ptr<float>() : nullptr;
    p.grad_bias = affine ? grad_b.data_ptr<float>() : nullptr;
    p.num_sms = num_sms(pr.x.device().index());
    const at::Tensor ws = workspace(bwd_workspace_bytes(p), pr.x);
    p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    check_cuda(kBwdOp, group_norm_silu_bwd(p, c10::cuda::getCurrentCUDAStream()));
  }

  if (!affine) {
    return {grad_x, at::empty({0}, x.options()), at::empty({0}, x.options())};
  }
  if (weight->scalar_type() != at::kFloat) grad_w = grad_w.to(weight->scalar_type());
  if (bias->scalar_type() != at::kFloat) grad_b = grad_b.to(bias->scalar_type());
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace genext::gn

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("group_norm_silu", &genext::gn::fwd);
  m.impl("group_norm_silu_backward", &genext::gn::bwd);
}
