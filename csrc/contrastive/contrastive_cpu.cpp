// CPU registration of the tiled contrastive primitives (contrastive_impl.h: ATen tile loops, the
// matrix products on the CPU BLAS, one tile of scores at a time).
#include <torch/library.h>

#include "contrastive/contrastive_impl.h"

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("tiled_lse", &genext::contrastive::tiled_lse);
  m.impl("tiled_lse_backward", &genext::contrastive::tiled_lse_backward);
  m.impl("tiled_softplus_sum", &genext::contrastive::tiled_softplus_sum);
  m.impl("tiled_softplus_sum_backward", &genext::contrastive::tiled_softplus_sum_backward);
}
