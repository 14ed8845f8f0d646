// CUDA binding of flash_attention_forward/_backward: argument checks, output and workspace
// allocation, launch on the current stream. Host C++ only; the kernels live in the .cu files.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/device_name.h"
#include "common/head_dim.h"
#include "common/torch_dtype.h"
#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_attention_checks.h"
#include "flash_attention/flash_params.h"

namespace genext::fa {
namespace {

constexpr const char* kFwdOp = "flash_attention_forward";
constexpr const char* kBwdOp = "flash_attention_backward";

Problem check_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                   const std::optional<at::Tensor>& seqused_k, int64_t max_q, int64_t max_k) {
  Problem pr = check_problem(op, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k,
                             /*allow_double=*/false, kCudaMaxHeadDim);
  TORCH_CHECK(pr.q.is_cuda(), op, ": q must be a CUDA tensor, got ", genext::device_name(pr.q));
  finish_problem(op, pr);
  return pr;
}

// The prepared backward that sums dQ with atomics in the dK/dV kernel, chosen with
// GENEXT_FA_ATOMIC_DQ=1 until it has been verified on a GPU (tools/gpu_queue.toml).
bool atomic_dq_requested() {
  const char* e = std::getenv("GENEXT_FA_ATOMIC_DQ");
  return e != nullptr && e[0] == '1' && e[1] == '\0';
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v,
                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                       const std::optional<at::Tensor>& cu_seqlens_k,
                                       const std::optional<at::Tensor>& seqused_k,
                                       int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                       bool causal, bool causal_bottom_right) {
  const Problem pr = check_cuda(kFwdOp, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(pr.q.device());
  FwdLaunch l = fwd_launch(kFwdOp, pr, q, scale, causal, causal_bottom_right);
  if (l.run) check_cuda(kFwdOp, flash_fwd(l.p, c10::cuda::getCurrentCUDAStream()));
  return {l.out, l.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    bool causal_bottom_right) {
  const Problem pr = check_cuda(kBwdOp, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                max_seqlen_q, max_seqlen_k);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), kBwdOp,
                    ": grad_out and out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), kBwdOp,
      ": grad_out and out must have q's dtype");
  TORCH_CHECK(
      grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
      kBwdOp, ": grad_out, out and lse must be on q's device");
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == pr.Hq &&
                        lse.size(2) == q.size(1) && lse.scalar_type() == at::kFloat,
                    kBwdOp, ": lse must be float32 (B, Hq, Lq) as the forward returns it, got ",
                    lse.scalar_type(), " ", lse.sizes());
  const c10::cuda::CUDAGuard guard(pr.q.device());
  BwdLaunch l = bwd_launch(kBwdOp, pr, grad_out, q, k, v, out, lse, scale, causal,
                           causal_bottom_right, atomic_dq_requested());
  if (l.run) check_cuda(kBwdOp, flash_bwd(l.p, c10::cuda::getCurrentCUDAStream()));
  return {l.dq, l.dk, l.dv};
}

}  // namespace
}  // namespace genext::fa

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("flash_attention_forward", &genext::fa::fwd);
  m.impl("flash_attention_backward", &genext::fa::bwd);
}
