// CUDA binding of attention_with_kvcache: argument checks, output and split-workspace allocation
// (sized from the capacity, never from cache_seqlens, so the call can be captured in a CUDA
// graph), launch on the current stream. Host C++ only; the kernels live in kvcache_attention.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>

#include "common/cuda_check.h"
#include "common/cuda_device.h"
#include "common/device_name.h"
#include "common/head_dim.h"
#include "common/torch_dtype.h"
#include "kvcache_attention/kvcache_attention.h"
#include "kvcache_attention/kvcache_checks.h"

namespace genext::kv {
namespace {

constexpr const char* kOp = "attention_with_kvcache";

int num_sms(c10::DeviceIndex dev) { return genext::num_sms(dev, kOp); }

Strides strides_of(const at::Tensor& t) {
  Strides s;
  s.batch = t.stride(0);
  s.row = t.stride(1);
  s.head = t.stride(2);
  return s;
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, at::Tensor& k_cache,
                                       at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                       const std::optional<at::Tensor>& k_new,
                                       const std::optional<at::Tensor>& v_new,
                                       const std::optional<at::Tensor>& block_table, double scale,
                                       bool causal) {
  const Problem pr = check_problem(kOp, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                   block_table, /*allow_double=*/false, kCudaMaxHeadDim);
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got ", genext::device_name(q));
  TORCH_CHECK_VALUE(pr.capacity < (int64_t{1} << 31) && pr.B < 65536, kOp,
                    ": cache capacity must be below 2^31 keys and the batch below 65536");
  const c10::cuda::CUDAGuard guard(q.device());
  const auto opts = q.options();
  at::Tensor out = at::empty({pr.B, pr.Lq, pr.Hq, pr.D}, opts);
  at::Tensor lse = at::empty({pr.B, pr.Hq, pr.Lq}, opts.dtype(at::kFloat));
  if (out.numel() == 0) {
    if (lse.numel() > 0) lse.fill_(-INFINITY);
    return {out, lse};
  }
  const at::Tensor seqlens = cache_seqlens.contiguous();
  const at::Tensor bt = block_table.has_value() ? block_table->contiguous() : at::Tensor();

  Params p;
  p.dtype = to_dtype(kOp, q.scalar_type());
  p.q = q.data_ptr();
  p.sq = strides_of(q);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.skc = strides_of(k_cache);
  p.svc = strides_of(v_cache);
  if (pr.append) {
    p.k_new = k_new->data_ptr();
    p.v_new = v_new->data_ptr();
    p.skn = strides_of(*k_new);
    p.svn = strides_of(*v_new);
  }
  p.seqlens = seqlens.data_ptr<int>();
  if (pr.paged) {
    p.block_table = bt.data_ptr<int>();
    p.bt_stride = bt.stride(0);
    p.block_size = static_cast<int>(pr.block_size);
    p.num_blocks = static_cast<int>(pr.num_blocks);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.B = static_cast<int>(pr.B);
  p.Lq = static_cast<int>(pr.Lq);
  p.Hq = static_cast<int>(pr.Hq);
  p.Hk = static_cast<int>(pr.Hk);
  p.D = static_cast<int>(pr.D);
  p.capacity = static_cast<int>(pr.capacity);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  plan_splits(p, num_sms(q.device().index()));
  at::Tensor ws_o = at::empty({p.num_splits, pr.B, pr.Hq, pr.Lq, pr.D}, opts.dtype(at::kFloat));
  at::Tensor ws_lse = at::empty({p.num_splits, pr.B, pr.Hq, pr.Lq}, opts.dtype(at::kFloat));
  p.part_o = ws_o.data_ptr<float>();
  p.part_lse = ws_lse.data_ptr<float>();
  check_cuda(kOp, kvcache_attention(p, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

}  // namespace
}  // namespace genext::kv

TORCH_LIBRARY_IMPL(genext, CUDA, m) { m.impl("attention_with_kvcache", &genext::kv::fwd); }
