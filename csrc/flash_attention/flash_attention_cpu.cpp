// CPU binding of flash_attention_forward/_backward: argument checks, the sequences (validating
// cu_seqlens and seqused_k), output allocation, and the passes of flash_fwd_cpu.cpp and
// flash_bwd_cpu.cpp. The algorithm is described in flash_attention_cpu.h.
#include "flash_attention/flash_attention_cpu.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "common/device_name.h"
#include "flash_attention/flash_attention_checks.h"

namespace genext::fa {
namespace {

// ---- sequences ----------------------------------------------------------------------------------

// Validates cu_seqlens on the CPU: starts at 0, non-decreasing, ends within the rows, and no
// sequence longer than max_seqlen (the launch grid of the CUDA kernels is sized by max_seqlen).
void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t rows,
                      const char* rows_of, const char* max_name, int64_t max_seqlen) {
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, " must start at 0, got ", c[0]);
  for (int64_t s = 0; s + 1 < n; ++s) {
    TORCH_CHECK_VALUE(c[s + 1] >= c[s], op, ": ", name, " must be non-decreasing, got ", name, "[",
                      s + 1, "] = ", c[s + 1], " < ", name, "[", s, "] = ", c[s]);
    TORCH_CHECK_VALUE(c[s + 1] - c[s] <= max_seqlen, op, ": sequence ", s, " has ", c[s + 1] - c[s],
                      " rows in ", name, ", more than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] <= rows, op, ": the last entry of ", name, " (", c[n - 1],
                    ") exceeds the number of rows of ", rows_of, " (", rows, ")");
}

std::vector<cpu::Seq> make_seqs(const char* op, const Problem& p, int64_t max_seqlen_q,
                                int64_t max_seqlen_k, bool causal, bool bottom_right) {
  std::vector<cpu::Seq> seqs(p.batch);
  const int64_t rows_q = p.q.size(1), rows_k = p.k.size(1);
  if (p.varlen) {
    check_cu_seqlens(op, "cu_seqlens_q", *p.cu_q, rows_q, "q", "max_seqlen_q", max_seqlen_q);
    check_cu_seqlens(op, "cu_seqlens_k", *p.cu_k, rows_k, "k", "max_seqlen_k", max_seqlen_k);
  }
  const int32_t* cq = p.varlen ? p.cu_q->const_data_ptr<int32_t>() : nullptr;
  const int32_t* ck = p.varlen ? p.cu_k->const_data_ptr<int32_t>() : nullptr;
  const int32_t* used = p.seqused_k ? p.seqused_k->const_data_ptr<int32_t>() : nullptr;
  for (int64_t s = 0; s < p.batch; ++s) {
    cpu::Seq& q = seqs[s];
    q.causal = causal;
    if (p.varlen) {
      q.q0 = cq[s], q.lq = cq[s + 1] - cq[s];
      q.k0 = ck[s], q.lk_rows = ck[s + 1] - ck[s];
    } else {
      q.b = s, q.lq = rows_q, q.lk_rows = rows_k;
    }
    q.lk = q.lk_rows;
    if (used) {
      TORCH_CHECK_VALUE(used[s] >= 0 && used[s] <= q.lk_rows, op, ": seqused_k[", s,
                        "] = ", used[s], " is outside [0, ", q.lk_rows,
                        "], the key rows of sequence ", s);
      q.lk = used[s];
    }
    q.off = bottom_right ? q.lk - q.lq : 0;
  }
  return seqs;
}

// ---- bindings -----------------------------------------------------------------------------------

constexpr const char* kFwd = "flash_attention_forward";
constexpr const char* kBwd = "flash_attention_backward";

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, bool causal_bottom_right) {
  const Problem p = check_problem(kFwd, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  max_seqlen_q, max_seqlen_k, /*allow_double=*/true,
                                  /*max_head_dim=*/0);
  const auto seqs = make_seqs(kFwd, p, max_seqlen_q, max_seqlen_k, causal, causal_bottom_right);
  const int64_t B = q.size(0), rows_q = q.size(1);
  const auto acc = acc_type(q.scalar_type());
  // varlen: rows outside every sequence are written by no task, so they start as out 0, lse -inf
  at::Tensor out = p.varlen ? at::zeros({B, rows_q, p.Hq, p.D}, q.options())
                            : at::empty({B, rows_q, p.Hq, p.D}, q.options());
  at::Tensor lse = p.varlen ? at::full({B, p.Hq, rows_q}, -std::numeric_limits<double>::infinity(),
                                       q.options().dtype(acc))
                            : at::empty({B, p.Hq, rows_q}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  cpu::forward(kFwd, p, seqs, scale, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    bool causal_bottom_right) {
  const Problem p = check_problem(kBwd, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  max_seqlen_q, max_seqlen_k, /*allow_double=*/true,
                                  /*max_head_dim=*/0);
  const int64_t B = q.size(0), rows_q = q.size(1);
  for (const auto* t : {&grad_out, &out}) {
    const char* name = (t == &grad_out) ? "grad_out" : "out";
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), kBwd, ": ", name, " must have q's shape ", q.sizes(),
                      ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), kBwd, ": ", name, " must have q's dtype ",
                     q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), kBwd, ": ", name, " is on ", genext::device_name(*t),
                " but q is on ", genext::device_name(q));
  }
  TORCH_CHECK_VALUE(
      lse.dim() == 3 && lse.size(0) == B && lse.size(1) == p.Hq && lse.size(2) == rows_q, kBwd,
      ": lse must have shape (B, Hq, Lq) = (", B, ", ", p.Hq, ", ", rows_q, "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble, kBwd,
                   ": lse must be float32 or float64, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), kBwd, ": lse is on ", genext::device_name(lse),
              " but q is on ", genext::device_name(q));
  const auto seqs = make_seqs(kBwd, p, max_seqlen_q, max_seqlen_k, causal, causal_bottom_right);
  const auto acc = acc_type(q.scalar_type());
  // varlen: rows outside every sequence get zero gradients from no task
  auto alloc = [&](const at::Tensor& t) {
    return p.varlen ? at::zeros(t.sizes(), t.options()) : at::empty(t.sizes(), t.options());
  };
  at::Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  const at::Tensor go = last_dim_contiguous(grad_out), o = last_dim_contiguous(out);
  const at::Tensor lse_c = lse.to(acc).contiguous();
  at::Tensor delta = at::empty({B, p.Hq, rows_q}, q.options().dtype(acc));
  cpu::backward(kBwd, p, seqs, scale, go, o, lse_c, delta, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace genext::fa
