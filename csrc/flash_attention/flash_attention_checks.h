// Argument checks shared by the CPU and CUDA bindings of flash_attention_forward/_backward.
// Messages name the op, the argument and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "common/device_name.h"

namespace genext::fa {

// The problem as the kernels see it. Tensors are (B, L, H, D) views whose last dim is contiguous.
struct Problem {
  at::Tensor q, k, v;      // possibly copied so that stride(-1) == 1
  int64_t batch = 0;       // number of sequences (cu_seqlens.numel() - 1 when varlen)
  int64_t Lq = 0, Lk = 0;  // per-sequence maxima (tensor dims, or max_seqlen_* when varlen)
  int64_t Hq = 0, Hk = 0, D = 0;
  bool varlen = false;
  std::optional<at::Tensor> cu_q, cu_k, seqused_k;  // contiguous int32 when present
};

// Returns t itself when its last dim is contiguous, else a contiguous copy.
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

inline void check_index_tensor(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& q, int64_t numel) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                   t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", genext::device_name(t),
              " but q is on ", genext::device_name(q));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == numel, op, ": ", name, " must have shape (", numel,
                    ",), got ", t.sizes());
}

// Checks q, k, v and the length tensors. allow_double: float64 is served (CPU only).
// max_head_dim: 0 for no limit, else D must be a multiple of 8 and at most this (CUDA kernels).
inline Problem check_problem(const char* op, const at::Tensor& q, const at::Tensor& k,
                             const at::Tensor& v, const std::optional<at::Tensor>& cu_seqlens_q,
                             const std::optional<at::Tensor>& cu_seqlens_k,
                             const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                             int64_t max_seqlen_k, bool allow_double, int64_t max_head_dim) {
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       (allow_double && dt == at::kDouble),
                   op, ": q must be float16, bfloat16, float32", allow_double ? " or float64" : "",
                   " on ", genext::device_type_name(q), ", got ", dt);
  TORCH_CHECK_TYPE(k.scalar_type() == dt && v.scalar_type() == dt, op,
                   ": q, k and v must share a dtype, got ", dt, ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on one device, got ", genext::device_name(q), ", ",
              genext::device_name(k), ", ", genext::device_name(v));
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be (B, L, H, D) views, got ranks ", q.dim(), ", ", k.dim(),
                    ", ", v.dim());
  Problem p;
  p.D = q.size(3);
  p.Hq = q.size(2);
  p.Hk = k.size(2);
  TORCH_CHECK_VALUE(k.size(3) == p.D && v.size(3) == p.D, op,
                    ": q, k and v must share the head dim, got ", p.D, ", ", k.size(3), ", ",
                    v.size(3));
  TORCH_CHECK_VALUE(v.size(2) == p.Hk && v.size(1) == k.size(1) && v.size(0) == k.size(0), op,
                    ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": q and k must have the same batch size, got ",
                    q.size(0), " and ", k.size(0));
  TORCH_CHECK_VALUE(p.Hk > 0 && p.Hq % p.Hk == 0, op, ": the number of query heads (", p.Hq,
                    ") must be a multiple of the number of key/value heads (", p.Hk, ")");
  TORCH_CHECK_VALUE(p.D > 0, op, ": head dim must be positive");
  if (max_head_dim > 0) {
    TORCH_CHECK_VALUE(p.D % 8 == 0 && p.D <= max_head_dim, op, ": on ", genext::device_type_name(q),
                      " the head dim must be a multiple of 8 and at most ", max_head_dim, ", got ",
                      p.D);
  }
  p.varlen = cu_seqlens_q.has_value() || cu_seqlens_k.has_value();
  if (p.varlen) {
    TORCH_CHECK_VALUE(cu_seqlens_q.has_value() && cu_seqlens_k.has_value(), op,
                      ": cu_seqlens_q and cu_seqlens_k come together");
    TORCH_CHECK_VALUE(q.size(0) == 1, op, ": with cu_seqlens, q, k, v are packed (1, total, H, D)");
    const int64_t n = cu_seqlens_q->numel();
    TORCH_CHECK_VALUE(cu_seqlens_q->dim() == 1 && n >= 1, op,
                      ": cu_seqlens_q must have shape (num_sequences + 1,), got ",
                      cu_seqlens_q->sizes());
    check_index_tensor(op, "cu_seqlens_q", *cu_seqlens_q, q, n);
    check_index_tensor(op, "cu_seqlens_k", *cu_seqlens_k, q, n);
    // the lengths are int32, and the CUDA launch grid is sized by these bounds
    constexpr int64_t kMaxLen = std::numeric_limits<int32_t>::max();
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= kMaxLen &&
                          max_seqlen_k <= kMaxLen,
                      op, ": max_seqlen_q and max_seqlen_k must be in [0, 2^31 - 1], got ",
                      max_seqlen_q, " and ", max_seqlen_k);
    p.batch = n - 1;
    p.Lq = max_seqlen_q;
    p.Lk = max_seqlen_k;
    p.cu_q = cu_seqlens_q->contiguous();
    p.cu_k = cu_seqlens_k->contiguous();
  } else {
    p.batch = q.size(0);
    p.Lq = q.size(1);
    p.Lk = k.size(1);
  }
  if (seqused_k.has_value()) {
    check_index_tensor(op, "seqused_k", *seqused_k, q, p.batch);
    p.seqused_k = seqused_k->contiguous();
  }
  p.q = last_dim_contiguous(q);
  p.k = last_dim_contiguous(k);
  p.v = last_dim_contiguous(v);
  return p;
}

}  // namespace genext::fa
