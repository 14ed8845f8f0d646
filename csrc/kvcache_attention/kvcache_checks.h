// Argument checks shared by the CPU and CUDA bindings of attention_with_kvcache. Shapes, dtypes and
// devices only: the values of cache_seqlens and block_table live on the device and are checked by
// the CPU kernel and the Python wrapper (the CUDA kernels never read or write past the capacity).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "common/device_name.h"

namespace genext::kv {

struct Problem {
  int64_t B = 0, Lq = 0, Hq = 0, Hk = 0, D = 0;
  bool paged = false;
  int64_t capacity = 0;    // keys a sequence can hold: Lmax, or max_blocks * block_size
  int64_t block_size = 0;  // paged only
  int64_t num_blocks = 0;  // paged only
  int64_t max_blocks = 0;  // paged only
  bool append = false;     // k_new / v_new given
};

inline void check_last_dim(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
                    " must have a contiguous last dim, got strides ", t.strides());
}

// allow_double: float64 is served (CPU). max_head_dim: 0 for no limit, else D must be a multiple
// of 8 and at most this.
inline Problem check_problem(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                             const std::optional<at::Tensor>& k_new,
                             const std::optional<at::Tensor>& v_new,
                             const std::optional<at::Tensor>& block_table, bool allow_double,
                             int64_t max_head_dim) {
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                       (allow_double && dt == at::kDouble),
                   op, ": q must be float16, bfloat16, float32", allow_double ? " or float64" : "",
                   " on ", genext::device_type_name(q), ", got ", dt);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == dt && v_cache.scalar_type() == dt, op,
                   ": q, k_cache and v_cache must share a dtype, got ", dt, ", ",
                   k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.device() == q.device() && v_cache.device() == q.device() &&
                  cache_seqlens.device() == q.device(),
              op, ": q, k_cache, v_cache and cache_seqlens must be on one device, got ",
              genext::device_name(q), ", ", genext::device_name(k_cache), ", ",
              genext::device_name(v_cache), ", ", genext::device_name(cache_seqlens));
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, Lq, Hq, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), op,
                    ": k_cache and v_cache must have one 4-D shape, got ", k_cache.sizes(), " and ",
                    v_cache.sizes());
  Problem p;
  p.B = q.size(0);
  p.Lq = q.size(1);
  p.Hq = q.size(2);
  p.D = q.size(3);
  p.Hk = k_cache.size(2);
  TORCH_CHECK_VALUE(k_cache.size(3) == p.D, op, ": q and the caches must share the head dim, got ",
                    p.D, " and ", k_cache.size(3));
  TORCH_CHECK_VALUE(p.Hk > 0 && p.Hq % p.Hk == 0, op, ": the number of query heads (", p.Hq,
                    ") must be a multiple of the number of key/value heads (", p.Hk, ")");
  TORCH_CHECK_VALUE(p.D > 0, op, ": head dim must be positive");
  if (max_head_dim > 0) {
    TORCH_CHECK_VALUE(p.D % 8 == 0 && p.D <= max_head_dim, op, ": on ", genext::device_type_name(q),
                      " the head dim must be a multiple of 8 and at most ", max_head_dim, ", got ",
                      p.D);
  }
  check_last_dim(op, "q", q);
  check_last_dim(op, "k_cache", k_cache);
  check_last_dim(op, "v_cache", v_cache);
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt, op,
                   ": cache_seqlens must be int32, got ", cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == p.B, op,
                    ": cache_seqlens must have shape (B,) = (", p.B, ",), got ",
                    cache_seqlens.sizes());
  p.paged = block_table.has_value();
  if (p.paged) {
    const at::Tensor& bt = *block_table;
    TORCH_CHECK_TYPE(bt.scalar_type() == at::kInt, op, ": block_table must be int32, got ",
                     bt.scalar_type());
    TORCH_CHECK(bt.device() == q.device(), op, ": block_table is on ", genext::device_name(bt),
                " but q is on ", genext::device_name(q));
    TORCH_CHECK_VALUE(bt.dim() == 2 && bt.size(0) == p.B, op,
                      ": block_table must have shape (B, max_blocks) with B = ", p.B, ", got ",
                      bt.sizes());
    p.num_blocks = k_cache.size(0);
    p.block_size = k_cache.size(1);
    // key j lives in block j / block_size: the kernels divide by it
    TORCH_CHECK_VALUE(p.block_size > 0, op,
                      ": a paged cache needs a positive block size (k_cache.size(1)), got shape ",
                      k_cache.sizes());
    p.max_blocks = bt.size(1);
    p.capacity = p.max_blocks * p.block_size;
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == p.B, op,
                      ": a contiguous cache must have shape (B, Lmax, Hk, D) with B = ", p.B,
                      ", got ", k_cache.sizes(), " (pass block_table for a paged cache)");
    p.capacity = k_cache.size(1);
  }
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), op, ": k_new and v_new come together");
  p.append = k_new.has_value();
  if (p.append) {
    for (const auto* t : {&*k_new, &*v_new}) {
      const char* name = t == &*k_new ? "k_new" : "v_new";
      TORCH_CHECK_TYPE(t->scalar_type() == dt, op, ": ", name, " must have q's dtype ", dt,
                       ", got ", t->scalar_type());
      TORCH_CHECK(t->device() == q.device(), op, ": ", name, " is on ", genext::device_name(*t),
                  " but q is on ", genext::device_name(q));
      TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == p.B && t->size(1) == p.Lq &&
                            t->size(2) == p.Hk && t->size(3) == p.D,
                        op, ": ", name, " must have shape (B, Lq, Hk, D) = (", p.B, ", ", p.Lq,
                        ", ", p.Hk, ", ", p.D, "), got ", t->sizes());
      check_last_dim(op, name, *t);
    }
  }
  return p;
}

}  // namespace genext::kv
