// Python bindings of kernels/selftest.cu's launchers: CPU tensors in, a CUDA error code out (0 on
// success).
#include <torch/extension.h>

#include "common/cuda_status.h"

namespace genext::emu_selftest {
CudaStatus launch_block_sums(const float* x, float* out, float* out2, int blocks, int threads);
CudaStatus launch_neighbours(int* out, int blocks, int threads, bool barrier);
CudaStatus launch_shuffles(const int* x, int* out, int threads);
CudaStatus launch_early_exit(int* out, int blocks, int threads, int live);
CudaStatus launch_lone_shuffle(int* out);
CudaStatus launch_histogram(const int* x, int n, int* hist, int bins);
CudaStatus launch_reverse(const float* x, float* out, int blocks, int threads);
CudaStatus launch_fill_to(float* out, int last);
CudaStatus launch_partial_masks(int* out);
}  // namespace genext::emu_selftest

namespace {
namespace st = genext::emu_selftest;
int code(const genext::CudaStatus& s) { return int(s.err); }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sums", [](const at::Tensor& x, at::Tensor& out, at::Tensor& out2, int threads) {
    return code(st::launch_block_sums(x.data_ptr<float>(), out.data_ptr<float>(),
                                      out2.data_ptr<float>(), int(out.numel()), threads));
  });
  m.def("neighbours", [](at::Tensor& out, int blocks, int threads, bool barrier) {
    return code(st::launch_neighbours(out.data_ptr<int>(), blocks, threads, barrier));
  });
  m.def("shuffles", [](const at::Tensor& x, at::Tensor& out) {
    return code(st::launch_shuffles(x.data_ptr<int>(), out.data_ptr<int>(), int(x.numel())));
  });
  m.def("early_exit", [](at::Tensor& out, int threads, int live) {
    return code(st::launch_early_exit(out.data_ptr<int>(), int(out.numel()), threads, live));
  });
  m.def("lone_shuffle",
        [](at::Tensor& out) { return code(st::launch_lone_shuffle(out.data_ptr<int>())); });
  m.def("histogram", [](const at::Tensor& x, at::Tensor& hist) {
    return code(st::launch_histogram(x.data_ptr<int>(), int(x.numel()), hist.data_ptr<int>(),
                                     int(hist.numel())));
  });
  m.def("partial_masks",
        [](at::Tensor& out) { return code(st::launch_partial_masks(out.data_ptr<int>())); });
  m.def("fill_to", [](at::Tensor& out, int last) {
    return code(st::launch_fill_to(out.data_ptr<float>(), last));
  });
  m.def("reverse", [](const at::Tensor& x, at::Tensor& out, int threads) {
    return code(st::launch_reverse(x.data_ptr<float>(), out.data_ptr<float>(),
                                   int(x.numel()) / threads, threads));
  });
}
