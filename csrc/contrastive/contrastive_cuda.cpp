// CUDA registration of the tiled contrastive primitives: the same ATen tile loops as the CPU
// (contrastive_impl.h), so the matrix products run on cuBLAS (tensor cores) and no N x N matrix
// exists. Host C++ only; every op is queued on the current stream, no host synchronisation.
#include <torch/library.h>

#include "contrastive/contrastive_impl.h"

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("tiled_lse", &genext::contrastive::tiled_lse);
  m.impl("tiled_lse_backward", &genext::contrastive::tiled_lse_backward);
  m.impl("tiled_softplus_sum", &genext::contrastive::tiled_softplus_sum);
  m.impl("tiled_softplus_sum_backward", &genext::contrastive::tiled_softplus_sum_backward);
}
