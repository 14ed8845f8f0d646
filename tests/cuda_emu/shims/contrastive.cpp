// The fused row log-sum-exp launcher (contrastive/lse_rows.cu) on CPU tensors, under the
// emulation: the caller passes guarded contiguous features and float32 scale and bias
// (tests/cuda_emu/guard.py); the output is a guarded buffer filled with NaN first.
#include <torch/extension.h>

#include <optional>

#include "common/torch_dtype.h"
#include "contrastive/lse_rows.h"
#include "emu/cuda_emu.h"

namespace {

using namespace genext::contrastive;

at::Tensor lse_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale,
                    const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.size(1) == y.size(1));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && (!bias || bias->scalar_type() == at::kFloat));
  LseRowsParams p;
  p.dtype = genext::to_dtype("lse_rows", x.scalar_type());
  TORCH_CHECK(lse_rows_supported(p.dtype, x.size(1)), "lse_rows: unsupported dtype or dim");
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.bias = bias ? bias->data_ptr<float>() : nullptr;
  p.n = x.size(0);
  p.m = y.size(0);
  p.d = x.size(1);
  at::Tensor out = at::empty({p.n}, x.options().dtype(at::kFloat));
  emu::Guarded g(size_t(p.n) * 4);
  g.poison();
  p.out = static_cast<float*>(g.get());
  const genext::CudaStatus st = lse_rows_cuda(p, nullptr);
  TORCH_CHECK(st.ok(), "lse_rows_cuda (emulated) returned error ", int(st.err), " at ", st.file,
              ":", st.line);
  g.copy_to(out.data_ptr());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lse_rows", &lse_rows, pybind11::arg("x"), pybind11::arg("y"), pybind11::arg("scale"),
        pybind11::arg("bias") = pybind11::none());
}
