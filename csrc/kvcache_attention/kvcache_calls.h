// What the CUDA binding does between its checks and the launch, on q's device: the outputs, the
// empty-shape result, the launch parameters, the split plan and its workspace (sized from the
// capacity, never from cache_seqlens, so the call can be captured in a CUDA graph). Shared by
// kvcache_attention_cuda.cpp and the tests that run the kernels under the CPU emulation
// (tests/cuda_emu), which pass their own launch and multiprocessor count (num_sms(), asked only
// when a launch follows).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/torch_dtype.h"
#include "kvcache_attention/kvcache_attention.h"
#include "kvcache_attention/kvcache_checks.h"

namespace genext::kv {

// The CUDA kernels' index limits: int positions and a 16-bit grid dimension for the batch.
inline void check_cuda_sizes(const char* op, const Problem& pr) {
  TORCH_CHECK_VALUE(pr.capacity < (int64_t{1} << 31) && pr.B < 65536, op,
                    ": cache capacity must be below 2^31 keys and the batch below 65536");
}

inline Strides strides_of(const at::Tensor& t) {
  Strides s;
  s.batch = t.stride(0);
  s.row = t.stride(1);
  s.head = t.stride(2);
  return s;
}

// (out, lse) after the checks; launch(const Params&) runs the kernels and raises on an error.
template <class NumSms, class Launch>
std::tuple<at::Tensor, at::Tensor> fwd_run(
    const char* op, const Problem& pr, const at::Tensor& q, at::Tensor& k_cache,
    at::Tensor& v_cache, const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& block_table,
    double scale, bool causal, const NumSms& num_sms, const Launch& launch) {
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
  p.dtype = to_dtype(op, q.scalar_type());
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
  plan_splits(p, num_sms());
  at::Tensor ws_o = at::empty({p.num_splits, pr.B, pr.Hq, pr.Lq, pr.D}, opts.dtype(at::kFloat));
  at::Tensor ws_lse = at::empty({p.num_splits, pr.B, pr.Hq, pr.Lq}, opts.dtype(at::kFloat));
  p.part_o = ws_o.data_ptr<float>();
  p.part_lse = ws_lse.data_ptr<float>();
  launch(p);
  return {out, lse};
}

}  // namespace genext::kv
