// The GroupNorm(+SiLU) CUDA launchers on CPU tensors, under the emulation: the CUDA binding's
// checks and set-up (group_norm_silu_checks.h, group_norm_silu_calls.h) with a given
// multiprocessor count (it sizes the grids), then group_norm_silu_fwd / _bwd from the .cu files
// compiled for the host. Every buffer a launch reads or writes (inputs, outputs, workspace) is a
// guarded buffer (emu::Guarded; inputs copied in, outputs and workspace filled with NaN first), so
// an access past an end is an error of the launch.
#include "group_norm_silu/group_norm_silu.h"

#include <torch/extension.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "emu/cuda_emu.h"
#include "group_norm_silu/group_norm_silu_calls.h"
#include "group_norm_silu/group_norm_silu_checks.h"

namespace {

using namespace genext::gn;
using genext::DType;

size_t esize(DType t) { return t == DType::kFloat32 ? 4 : 2; }

void check(const genext::CudaStatus& st, const char* what) {
  TORCH_CHECK(st.ok(), what, " (emulated) returned error ", int(st.err), " at ", st.file, ":",
              st.line);
}

// Guarded stand-ins for a launch's buffers: inputs copied in, outputs copied back at the end.
class Buffers {
 public:
  template <class P>
  void in(P*& p, size_t bytes) {
    if (p == nullptr) return;
    bufs_.push_back(std::make_unique<emu::Guarded>(p, bytes));
    p = static_cast<P*>(bufs_.back()->get());
  }
  template <class P>
  void out(P*& p, size_t bytes) {  // filled with NaN: an element no kernel writes shows
    if (p == nullptr) return;
    bufs_.push_back(std::make_unique<emu::Guarded>(bytes));
    bufs_.back()->poison();
    outs_.push_back({bufs_.back().get(), static_cast<void*>(p)});
    p = static_cast<P*>(bufs_.back()->get());
  }
  void copy_back() {
    for (const auto& [g, dst] : outs_) g->copy_to(dst);
  }

 private:
  std::vector<std::unique_ptr<emu::Guarded>> bufs_;
  std::vector<std::pair<emu::Guarded*, void*>> outs_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd(const at::Tensor& x, int64_t groups,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   double eps, bool silu, int num_sms) {
  const char* op = "group_norm_silu";
  const Problem pr = check_input(op, x, groups, weight, bias, /*allow_double=*/false);
  check_eps(op, eps);
  return fwd_run(
      op, pr, weight, bias, eps, silu, [=] { return num_sms; },
      [](const FwdParams& given) {
        FwdParams p = given;
        const Shape& s = p.shape;
        const size_t n = size_t(s.N * s.C * s.S), es = esize(p.dtype), ng = size_t(s.N * s.G);
        Buffers b;
        b.in(p.x, n * es);
        b.in(p.weight, size_t(s.C) * esize(p.wdtype));
        b.in(p.bias, size_t(s.C) * esize(p.wdtype));
        b.out(p.y, n * es);
        b.out(p.mean, ng * 4);
        b.out(p.rstd, ng * 4);
        b.out(p.workspace, fwd_workspace_bytes(p));
        check(group_norm_silu_fwd(p, nullptr), "group_norm_silu_fwd");
        b.copy_back();
      });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   int64_t groups, bool silu, int num_sms) {
  const char* op = "group_norm_silu_backward";
  const Problem pr = check_input(op, x, groups, weight, bias, /*allow_double=*/false);
  const at::Tensor dy = check_like_x(op, "grad_y", grad_y, x, pr.channels_last);
  check_stats(op, mean, rstd, pr);
  return bwd_run(
      op, pr, dy, mean, rstd, weight, bias, silu, [=] { return num_sms; },
      [](const BwdParams& given) {
        BwdParams p = given;
        const Shape& s = p.shape;
        const size_t n = size_t(s.N * s.C * s.S), es = esize(p.dtype), ng = size_t(s.N * s.G);
        Buffers b;
        b.in(p.grad_y, n * es);
        b.in(p.x, n * es);
        b.in(p.mean, ng * 4);
        b.in(p.rstd, ng * 4);
        b.in(p.weight, size_t(s.C) * esize(p.wdtype));
        b.in(p.bias, size_t(s.C) * esize(p.wdtype));
        b.out(p.grad_x, n * es);
        b.out(p.grad_weight, size_t(s.C) * 4);
        b.out(p.grad_bias, size_t(s.C) * 4);
        b.out(p.workspace, bwd_workspace_bytes(p));
        check(group_norm_silu_bwd(p, nullptr), "group_norm_silu_bwd");
        b.copy_back();
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_norm_silu", &fwd);
  m.def("group_norm_silu_backward", &bwd);
}
