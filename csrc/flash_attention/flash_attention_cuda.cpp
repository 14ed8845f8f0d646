// CUDA binding of flash_attention_forward/_backward: argument checks, output and workspace
// allocation, launch on the current stream. Host C++ only; the kernels live in the .cu files.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/device_name.h"
#include "common/head_dim.h"
#include "common/torch_dtype.h"
#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_attention_checks.h"

namespace genext::fa {
namespace {

constexpr const char* kFwdOp = "flash_attention_forward";
constexpr const char* kBwdOp = "flash_attention_backward";

// The 16-bit kernels copy rows with 16-byte cp.async: base and strides must keep rows aligned.
at::Tensor aligned_view(const at::Tensor& t, bool need16) {
  if (!need16) return t;
  const int64_t es = t.element_size();
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  (t.stride(0) * es) % 16 == 0 && (t.stride(1) * es) % 16 == 0 &&
                  (t.stride(2) * es) % 16 == 0;
  return ok ? t : t.contiguous();
}

Strides strides_of(const at::Tensor& t) {
  Strides s;
  s.batch = t.stride(0);
  s.row = t.stride(1);
  s.head = t.stride(2);
  return s;
}

Problem check_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                   const std::optional<at::Tensor>& seqused_k, int64_t max_q, int64_t max_k) {
  Problem pr = check_problem(op, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k,
                             /*allow_double=*/false, kCudaMaxHeadDim);
  TORCH_CHECK(pr.q.is_cuda(), op, ": q must be a CUDA tensor, got ", genext::device_name(pr.q));
  if (pr.q.scalar_type() != at::kFloat) {
    TORCH_CHECK(compiled_head_dim_tile(static_cast<int>(pr.D)) > 0, op, ": head dim ", pr.D,
                " is above the largest flash-attention tile compiled into this build (",
                compiled_head_dim_tiles(), "); rebuild with GENEXT_FA_HEAD_DIMS including it");
  }
  TORCH_CHECK_VALUE(
      pr.Lq < (int64_t{1} << 31) && pr.Lk < (int64_t{1} << 31) && pr.batch < 65536 && pr.Hq < 65536,
      op, ": sizes out of range (lengths < 2^31, batch and heads < 65536)");
  const bool need16 = pr.q.scalar_type() != at::kFloat;
  pr.q = aligned_view(pr.q, need16);
  pr.k = aligned_view(pr.k, need16);
  pr.v = aligned_view(pr.v, need16);
  return pr;
}

void fill_common(const char* op, FwdParams& p, const Problem& pr, double scale, bool causal,
                 bool bottom_right) {
  p.dtype = to_dtype(op, pr.q.scalar_type());
  p.q = pr.q.data_ptr();
  p.k = pr.k.data_ptr();
  p.v = pr.v.data_ptr();
  p.sq = strides_of(pr.q);
  p.sk = strides_of(pr.k);
  p.sv = strides_of(pr.v);
  p.cu_q = pr.cu_q ? pr.cu_q->data_ptr<int>() : nullptr;
  p.cu_k = pr.cu_k ? pr.cu_k->data_ptr<int>() : nullptr;
  p.seqused_k = pr.seqused_k ? pr.seqused_k->data_ptr<int>() : nullptr;
  p.batch = static_cast<int>(pr.batch);
  p.Hq = static_cast<int>(pr.Hq);
  p.Hk = static_cast<int>(pr.Hk);
  p.D = static_cast<int>(pr.D);
  p.Lq = static_cast<int>(pr.Lq);
  p.Lk = static_cast<int>(pr.Lk);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.bottom_right = bottom_right;
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
  // Rows outside every sequence (varlen) are never visited by the kernels: start from zeros.
  const auto opts = pr.q.options();
  at::Tensor out = pr.varlen ? at::zeros(q.sizes(), opts) : at::empty(q.sizes(), opts);
  at::Tensor lse = at::empty({q.size(0), pr.Hq, q.size(1)}, opts.dtype(at::kFloat));
  if (pr.varlen) lse.fill_(-INFINITY);
  if (out.numel() == 0 || pr.batch == 0) {
    if (lse.numel() > 0) lse.fill_(-INFINITY);
    return {out, lse};
  }
  FwdParams p;
  fill_common(kFwdOp, p, pr, scale, causal, causal_bottom_right);
  p.out = out.data_ptr();
  p.so = strides_of(out);
  p.lse = lse.data_ptr<float>();
  p.lse_batch = lse.stride(0);
  p.lse_head = lse.stride(1);
  check_cuda(kFwdOp, flash_fwd(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
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
  const bool need16 = pr.q.scalar_type() != at::kFloat;
  const at::Tensor dout = aligned_view(last_dim_contiguous(grad_out), need16);
  const at::Tensor o = aligned_view(last_dim_contiguous(out), need16);
  const at::Tensor lse_c = lse.contiguous();

  // Rows no kernel visits (past seqused_k, outside every varlen sequence) must read as zero.
  const bool partial = pr.varlen || pr.seqused_k.has_value();
  const auto make = [&](const at::Tensor& like) {
    return partial ? at::zeros(like.sizes(), like.options())
                   : at::empty(like.sizes(), like.options());
  };
  at::Tensor dq = make(q), dk = make(k), dv = make(v);
  if (q.numel() == 0 || pr.batch == 0) {
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  if (k.numel() == 0) {
    dq.zero_();
    return {dq, dk, dv};
  }
  at::Tensor delta = at::empty(lse_c.sizes(), lse_c.options());

  BwdParams p;
  fill_common(kBwdOp, p, pr, scale, causal, causal_bottom_right);
  p.out = o.data_ptr();
  p.so = strides_of(o);
  p.lse = lse_c.data_ptr<float>();
  p.lse_batch = lse_c.stride(0);
  p.lse_head = lse_c.stride(1);
  p.dout = dout.data_ptr();
  p.sdo = strides_of(dout);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.sdq = strides_of(dq);
  p.sdk = strides_of(dk);
  p.sdv = strides_of(dv);
  p.delta = delta.data_ptr<float>();
  check_cuda(kBwdOp, flash_bwd(p, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

}  // namespace
}  // namespace genext::fa

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("flash_attention_forward", &genext::fa::fwd);
  m.impl("flash_attention_backward", &genext::fa::bwd);
}
