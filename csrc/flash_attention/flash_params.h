// The CUDA launchers' parameters, outputs and workspace for a checked flash-attention problem, on
// its device: shared by the CUDA binding (flash_attention_cuda.cpp) and the tests that run the
// kernels under the CPU emulation (tests/cuda_emu). torch only, no CUDA runtime call.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "common/head_dim.h"
#include "common/torch_dtype.h"
#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_attention_checks.h"

namespace genext::fa {

// The 16-bit kernels copy rows with 16-byte cp.async: base and strides must keep rows aligned.
inline at::Tensor aligned_view(const at::Tensor& t, bool need16) {
  if (!need16) return t;
  const int64_t es = t.element_size();
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  (t.stride(0) * es) % 16 == 0 && (t.stride(1) * es) % 16 == 0 &&
                  (t.stride(2) * es) % 16 == 0;
  return ok ? t : t.contiguous();
}

inline Strides strides_of(const at::Tensor& t) {
  Strides s;
  s.batch = t.stride(0);
  s.row = t.stride(1);
  s.head = t.stride(2);
  return s;
}

// The CUDA kernels' own limits on a problem check_problem accepted (a compiled head-dim tile,
// sizes that fit their grids), and q, k, v as views they can copy with 16-byte loads.
inline void finish_problem(const char* op, Problem& pr) {
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
}

inline void fill_common(const char* op, FwdParams& p, const Problem& pr, double scale, bool causal,
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

// The forward's launch: its outputs and parameters; `run` is false when there is nothing to
// launch (the outputs are then final).
struct FwdLaunch {
  at::Tensor out, lse;
  FwdParams p;
  bool run = false;
};

inline FwdLaunch fwd_launch(const char* op, const Problem& pr, const at::Tensor& q, double scale,
                            bool causal, bool bottom_right) {
  FwdLaunch l;
  // Rows outside every sequence (varlen) are never visited by the kernels: start from zeros.
  const auto opts = pr.q.options();
  l.out = pr.varlen ? at::zeros(q.sizes(), opts) : at::empty(q.sizes(), opts);
  l.lse = at::empty({q.size(0), pr.Hq, q.size(1)}, opts.dtype(at::kFloat));
  if (pr.varlen) l.lse.fill_(-INFINITY);
  if (l.out.numel() == 0 || pr.batch == 0) {
    if (l.lse.numel() > 0) l.lse.fill_(-INFINITY);
    return l;
  }
  fill_common(op, l.p, pr, scale, causal, bottom_right);
  l.p.out = l.out.data_ptr();
  l.p.so = strides_of(l.out);
  l.p.lse = l.lse.data_ptr<float>();
  l.p.lse_batch = l.lse.stride(0);
  l.p.lse_head = l.lse.stride(1);
  l.run = true;
  return l;
}

// The backward's launch: gradients, workspace and parameters; `run` as in FwdLaunch.
// atomic_dq: dQ is summed in an fp32 workspace with atomics by the dK/dV kernel (16-bit inputs
// only), instead of its own deterministic kernel.
struct BwdLaunch {
  at::Tensor dq, dk, dv;           // the outputs
  at::Tensor dout, o, lse, delta;  // inputs as the kernels read them, and rowsum(dout * out)
  at::Tensor dq_accum;             // (B, Lq, Hq, D) fp32 when atomic_dq
  BwdParams p;
  bool run = false;
};

inline BwdLaunch bwd_launch(const char* op, const Problem& pr, const at::Tensor& grad_out,
                            const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
                            bool bottom_right, bool atomic_dq) {
  BwdLaunch l;
  const bool need16 = pr.q.scalar_type() != at::kFloat;
  l.dout = aligned_view(last_dim_contiguous(grad_out), need16);
  l.o = aligned_view(last_dim_contiguous(out), need16);
  l.lse = lse.contiguous();
  // Rows no kernel visits (past seqused_k, outside every varlen sequence) must read as zero.
  const bool partial = pr.varlen || pr.seqused_k.has_value();
  const auto make = [&](const at::Tensor& like) {
    return partial ? at::zeros(like.sizes(), like.options())
                   : at::empty(like.sizes(), like.options());
  };
  l.dq = make(q);
  l.dk = make(k);
  l.dv = make(v);
  if (q.numel() == 0 || pr.batch == 0) {
    l.dk.zero_();
    l.dv.zero_();
    return l;
  }
  if (k.numel() == 0) {
    l.dq.zero_();
    return l;
  }
  l.delta = at::empty(l.lse.sizes(), l.lse.options());
  BwdParams& p = l.p;
  fill_common(op, p, pr, scale, causal, bottom_right);
  p.out = l.o.data_ptr();
  p.so = strides_of(l.o);
  p.lse = l.lse.data_ptr<float>();
  p.lse_batch = l.lse.stride(0);
  p.lse_head = l.lse.stride(1);
  p.dout = l.dout.data_ptr();
  p.sdo = strides_of(l.dout);
  p.dq = l.dq.data_ptr();
  p.dk = l.dk.data_ptr();
  p.dv = l.dv.data_ptr();
  p.sdq = strides_of(l.dq);
  p.sdk = strides_of(l.dk);
  p.sdv = strides_of(l.dv);
  p.delta = l.delta.data_ptr<float>();
  if (atomic_dq && need16) {
    l.dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
    p.dq_accum = l.dq_accum.data_ptr<float>();
    p.sdq_accum = strides_of(l.dq_accum);
  }
  l.run = true;
  return l;
}

}  // namespace genext::fa
