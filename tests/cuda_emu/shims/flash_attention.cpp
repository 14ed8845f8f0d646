// The flash-attention launchers on CPU tensors, under the emulation: the CUDA binding's checks and
// set-up (flash_attention_checks.h, flash_params.h), then flash_fwd / flash_bwd from
// flash_dispatch.cu and the instances compiled for the host. Every buffer the kernels write
// (outputs, lse, delta, the dQ accumulator) is a guarded buffer (emu::Guarded), filled with NaN
// first where the binding leaves it uninitialised, so that an element no kernel writes shows; the
// caller passes guarded inputs (tests/cuda_emu/guard.py).
#include "flash_attention/flash_attention.h"

#include <torch/extension.h>

#include <cmath>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "emu/cuda_emu.h"
#include "flash_attention/flash_attention_checks.h"
#include "flash_attention/flash_params.h"

namespace {

using namespace genext::fa;

// Guarded stand-ins for tensors a launch writes: each starts as the tensor's contents (NaN first
// when `poison`), and goes back into it after the launch.
class GuardedOutputs {
 public:
  template <class P>
  void add(at::Tensor& t, P*& ptr, bool poison) {
    if (!t.defined() || t.numel() == 0) return;
    if (poison) t.fill_(NAN);
    auto g = std::make_unique<emu::Guarded>(t.data_ptr(), size_t(t.numel()) * t.element_size());
    ptr = static_cast<P*>(g->get());
    pairs_.push_back({t, std::move(g)});
  }
  void copy_back() {
    for (auto& [t, g] : pairs_) g->copy_to(t.data_ptr());
  }

 private:
  std::vector<std::pair<at::Tensor, std::unique_ptr<emu::Guarded>>> pairs_;
};

void check(const genext::CudaStatus& st, const char* what) {
  TORCH_CHECK(st.ok(), what, " (emulated) returned error ", int(st.err), " at ", st.file, ":",
              st.line);
}

Problem problem(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                const std::optional<at::Tensor>& seqused_k, int64_t max_q, int64_t max_k) {
  Problem pr = check_problem(op, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k,
                             /*allow_double=*/false, genext::kCudaMaxHeadDim);
  finish_problem(op, pr);
  return pr;
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const std::optional<at::Tensor>& cu_q,
                                       const std::optional<at::Tensor>& cu_k,
                                       const std::optional<at::Tensor>& seqused_k, int64_t max_q,
                                       int64_t max_k, double scale, bool causal,
                                       bool bottom_right) {
  const char* op = "flash_attention_forward";
  const Problem pr = problem(op, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k);
  FwdLaunch l = fwd_launch(op, pr, q, scale, causal, bottom_right);
  if (!l.run) return {l.out, l.lse};
  GuardedOutputs g;
  void* out = nullptr;
  g.add(l.out, out, /*poison=*/!pr.varlen);
  g.add(l.lse, l.p.lse, /*poison=*/!pr.varlen);
  l.p.out = out;
  check(flash_fwd(l.p, nullptr), "flash_fwd");
  g.copy_back();
  return {l.out, l.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_q,
    const std::optional<at::Tensor>& cu_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_q, int64_t max_k, double scale, bool causal, bool bottom_right, bool atomic_dq) {
  const char* op = "flash_attention_backward";
  const Problem pr = problem(op, q, k, v, cu_q, cu_k, seqused_k, max_q, max_k);
  BwdLaunch l =
      bwd_launch(op, pr, grad_out, q, k, v, out, lse, scale, causal, bottom_right, atomic_dq);
  if (!l.run) return {l.dq, l.dk, l.dv};
  const bool fresh = !(pr.varlen || pr.seqused_k.has_value());  // at::empty: poison
  GuardedOutputs g;
  g.add(l.dq, l.p.dq, fresh);
  g.add(l.dk, l.p.dk, fresh);
  g.add(l.dv, l.p.dv, fresh);
  g.add(l.delta, l.p.delta, /*poison=*/true);
  g.add(l.dq_accum, l.p.dq_accum, /*poison=*/false);  // zeroed: the atomics add into it
  check(flash_bwd(l.p, nullptr), "flash_bwd");
  g.copy_back();
  return {l.dq, l.dk, l.dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("flash_attention_forward", &fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("scale"), py::arg("causal"),
        py::arg("causal_bottom_right"));
  m.def("flash_attention_backward", &bwd, py::arg("grad_out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("seqused_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("scale"), py::arg("causal"),
        py::arg("causal_bottom_right"), py::arg("atomic_dq"));
}
