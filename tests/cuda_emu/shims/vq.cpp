// The VQ CUDA launchers on CPU tensors, under the emulation: the checks and launch set-up of the
// CUDA binding (vq_checks.h, vq_params.h), then vq_nearest_cuda / vq_ema_update_cuda from vq.cu
// compiled for the host. Outputs may be given (guarded memory, tests/cuda_emu/guard.py); else they
// are the binding's own.
#include "vq/vq.h"

#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "vq/vq_checks.h"
#include "vq/vq_params.h"

namespace {

using namespace genext::vq;

void check(const genext::CudaStatus& st, const char* what) {
  TORCH_CHECK(st.ok(), what, " (emulated) returned error ", int(st.err), " at ", st.file, ":",
              st.line);
}

std::tuple<at::Tensor, at::Tensor> nearest(const at::Tensor& z, const at::Tensor& cb, bool cosine,
                                           std::optional<at::Tensor> indices,
                                           std::optional<at::Tensor> distances, bool tensor_cores) {
  check_nearest("vq_nearest", z, cb, /*allow_double=*/false);
  NearestLaunch l = nearest_launch(z, cb, cosine, tensor_cores);
  if (indices) {
    l.indices = *indices;
    l.p.indices = indices->data_ptr<int64_t>();
  }
  if (distances) {
    l.distances = *distances;
    l.p.distances = distances->data_ptr<float>();
  }
  if (l.p.N > 0) check(vq_nearest_cuda(l.p, nullptr), "vq_nearest_cuda");
  return {l.indices, l.distances};
}

std::tuple<at::Tensor, at::Tensor> ema(const at::Tensor& indices, const at::Tensor& z,
                                       int64_t num_codes, bool deterministic,
                                       std::optional<at::Tensor> counts,
                                       std::optional<at::Tensor> sums) {
  check_ema("vq_ema_update", indices, z, num_codes, /*allow_double=*/false);
  EmaLaunch l = ema_launch(indices, z, num_codes, deterministic);
  if (counts) {  // zeroed by the caller, as ema_launch zeroes its own
    l.counts = *counts;
    l.p.counts = counts->data_ptr<float>();
  }
  if (sums) {
    l.sums = *sums;
    l.p.sums = sums->data_ptr<float>();
  }
  check(vq_ema_update_cuda(l.p, nullptr), "vq_ema_update_cuda");
  return {l.counts, l.sums};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vq_nearest", &nearest, pybind11::arg("z"), pybind11::arg("codebook"),
        pybind11::arg("cosine"), pybind11::arg("indices") = pybind11::none(),
        pybind11::arg("distances") = pybind11::none(), pybind11::arg("tensor_cores") = false);
  m.def("vq_ema_update", &ema, pybind11::arg("indices"), pybind11::arg("z"),
        pybind11::arg("num_codes"), pybind11::arg("deterministic"),
        pybind11::arg("counts") = pybind11::none(), pybind11::arg("sums") = pybind11::none());
}
