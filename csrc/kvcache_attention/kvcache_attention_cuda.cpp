// CUDA binding of attention_with_kvcache: argument checks, output and split-workspace allocation
// (sized from the capacity, never from cache_seqlens, so the call can be captured in a CUDA
// graph), launch on the current stream. Host C++ only; the kernels live in kvcache_attention.cu.
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
#include "common/head_dim.h"
#include "kvcache_attention/kvcache_attention.h"
#include "kvcache_attention/kvcache_calls.h"
#include "kvcache_attention/kvcache_checks.h"

namespace genext::kv {
namespace {

constexpr const char* kOp = "attention_with_kvcache";

int num_sms(c10::DeviceIndex dev) { return genext::num_sms(dev, kOp); }

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, at::Tensor& k_cache,
                                       at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                       const std::optional<at::Tensor>& k_new,
                                       const std::optional<at::Tensor>& v_new,
                                       const std::optional<at::Tensor>& block_table, double scale,
                                       bool causal) {
  const Problem pr = check_problem(kOp, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                   block_table, /*allow_double=*/false, kCudaMaxHeadDim);
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got ", genext::device_name(q));
  check_cuda_sizes(kOp, pr);
  const c10::cuda::CUDAGuard guard(q.device());
  return fwd_run(
      kOp, pr, q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, causal,
      [&] { return num_sms(q.device().index()); },
      [](const Params& p) {
        check_cuda(kOp, kvcache_attention(p, c10::cuda::getCurrentCUDAStream()));
      });
}

}  // namespace
}  // namespace genext::kv

TORCH_LIBRARY_IMPL(genext, CUDA, m) { m.impl("attention_with_kvcache", &genext::kv::fwd); }
