// CUDA binding of vq_nearest and vq_ema_update: checks, allocation, launch on the current stream.
// No host synchronisation (the deterministic EMA path sorts and segments with device ops).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdlib>
#include <tuple>

#include "common/cuda_check.h"
#include "common/device_name.h"
#include "vq/vq.h"
#include "vq/vq_checks.h"
#include "vq/vq_params.h"

namespace genext::vq {
namespace {

// The prepared tensor-core path (vq_tc.cu), chosen with GENEXT_VQ_TENSOR_CORES=1 until it has been
// verified on a GPU (tools/gpu_queue.toml).
bool tensor_cores_requested() {
  const char* e = std::getenv("GENEXT_VQ_TENSOR_CORES");
  return e != nullptr && e[0] == '1' && e[1] == '\0';
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda_op(const at::Tensor& z_in,
                                                      const at::Tensor& cb_in, bool cosine) {
  check_nearest("vq_nearest", z_in, cb_in, /*allow_double=*/false);
  TORCH_CHECK(z_in.is_cuda(), "vq_nearest: z must be a CUDA tensor, got ",
              genext::device_name(z_in));
  const c10::cuda::CUDAGuard guard(z_in.device());
  const NearestLaunch l = nearest_launch(z_in, cb_in, cosine, tensor_cores_requested());
  if (l.p.N > 0) check_cuda("vq_nearest", vq_nearest_cuda(l.p, c10::cuda::getCurrentCUDAStream()));
  return {l.indices, l.distances};
}

std::tuple<at::Tensor, at::Tensor> vq_ema_update_cuda_op(const at::Tensor& indices_in,
                                                         const at::Tensor& z_in, int64_t num_codes,
                                                         bool deterministic) {
  check_ema("vq_ema_update", indices_in, z_in, num_codes, /*allow_double=*/false);
  TORCH_CHECK(z_in.is_cuda(), "vq_ema_update: z must be a CUDA tensor, got ",
              genext::device_name(z_in));
  const c10::cuda::CUDAGuard guard(z_in.device());
  const EmaLaunch l = ema_launch(indices_in, z_in, num_codes, deterministic);
  check_cuda("vq_ema_update", vq_ema_update_cuda(l.p, c10::cuda::getCurrentCUDAStream()));
  return {l.counts, l.sums};
}

}  // namespace
}  // namespace genext::vq

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("vq_nearest", &genext::vq::vq_nearest_cuda_op);
  m.impl("vq_ema_update", &genext::vq::vq_ema_update_cuda_op);
}
