// What the CUDA binding does between its checks and the launch, on the checked input's device:
// output and workspace allocation, the empty-shape results, the launch parameters, and the
// gradients' dtypes. Shared by group_norm_silu_cuda.cpp and the tests that run the kernels under
// the CPU emulation (tests/cuda_emu), which pass their own launch and multiprocessor count.
// num_sms() (the device's multiprocessors, which size the grids) is asked only when a launch
// follows.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstddef>
#include <optional>
#include <tuple>

#include "common/torch_dtype.h"
#include "group_norm_silu/group_norm_silu.h"
#include "group_norm_silu/group_norm_silu_checks.h"

namespace genext::gn {

inline Shape shape_of(const Problem& pr) {
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
inline AffineArgs affine_args(const char* op, const std::optional<at::Tensor>& weight,
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

inline at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The forward after its checks: (y, mean, rstd). launch(const FwdParams&) runs the kernels and
// raises on an error.
template <class NumSms, class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_run(const char* op, const Problem& pr,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       double eps, bool silu, const NumSms& num_sms,
                                                       const Launch& launch) {
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
  const DType dt = to_dtype(op, pr.x.scalar_type());
  const AffineArgs aff = affine_args(op, weight, bias, dt);
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
  p.num_sms = num_sms();
  const at::Tensor ws = workspace(fwd_workspace_bytes(p), pr.x);
  p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
  launch(p);
  return {y, mean, rstd};
}

// The backward after its checks (dy: grad_y in x's layout): (grad_x, grad_weight, grad_bias),
// the last two empty without an affine.
template <class NumSms, class Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_run(
    const char* op, const Problem& pr, const at::Tensor& dy, const at::Tensor& mean,
    const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool silu, const NumSms& num_sms, const Launch& launch) {
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
    const DType dt = to_dtype(op, pr.x.scalar_type());
    const AffineArgs aff = affine_args(op, weight, bias, dt);
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
    p.num_sms = num_sms();
    const at::Tensor ws = workspace(bwd_workspace_bytes(p), pr.x);
    p.workspace = ws.defined() ? ws.data_ptr() : nullptr;
    launch(p);
  }
  if (!affine) {
    return {grad_x, at::empty({0}, pr.x.options()), at::empty({0}, pr.x.options())};
  }
  if (weight->scalar_type() != at::kFloat) grad_w = grad_w.to(weight->scalar_type());
  if (bias->scalar_type() != at::kFloat) grad_b = grad_b.to(bias->scalar_type());
  return {grad_x, grad_w, grad_b};
}

}  // namespace genext::gn
