// Every genext op schema, in one place. Kernels register their implementations beside their code
// (csrc/<op>/<op>_cpu.cpp, csrc/<op>/<op>_cuda.cpp) with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(genext, m) {
  // GroupNorm over (N, C, *) with optional affine and fused SiLU. Returns (y, mean, rstd), the
  // statistics (N, num_groups) in float32 (float64 for float64 x).
  m.def("group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu)"
        " -> (Tensor, Tensor, Tensor)");
  // Backward of group_norm_silu: (grad_x, grad_weight, grad_bias); the last two are empty (0,)
  // tensors when weight is None.
  m.def("group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight,"
        " Tensor? bias, int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");
}
