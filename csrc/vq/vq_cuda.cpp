// CUDA binding of vq_nearest and vq_ema_update: checks, allocation, launch on the current stream.
// No host synchronisation (the deterministic EMA path sorts and segments with device ops).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/norm.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <tuple>

#include "common/cuda_check.h"
#include "common/device_name.h"
#include "common/torch_dtype.h"
#include "vq/vq.h"
#include "vq/vq_checks.h"

namespace genext::vq {
namespace {

// 1 / ||row|| in fp32 with torch ops; a zero row gets a huge factor times a zero dot product,
// i.e. similarity 0, as the CPU's normalised zero vector.
at::Tensor inv_norms(const at::Tensor& x) {
  return at::reciprocal(at::clamp_min(at::norm(x.to(at::kFloat), 2, {1}), 1e-30));
}

std::tuple<at::Tensor, at::Tensor> vq_nearest_cuda_op(const at::Tensor& z_in,
                                                      const at::Tensor& cb_in, bool cosine) {
  check_nearest("vq_nearest", z_in, cb_in, /*allow_double=*/false);
  TORCH_CHECK(z_in.is_cuda(), "vq_nearest: z must be a CUDA tensor, got ",
              genext::device_name(z_in));
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous(), cb = cb_in.contiguous();
  at::Tensor idx = at::empty({z.size(0)}, z.options().dtype(at::kLong));
  at::Tensor dist = at::empty({z.size(0)}, z.options().dtype(at::kFloat));
  if (z.size(0) == 0) return {idx, dist};
  at::Tensor zn, cn;
  NearestParams p;
  p.dtype = to_dtype("vq_nearest", z.scalar_type());
  p.z = z.data_ptr();
  p.codebook = cb.data_ptr();
  if (cosine) {
    zn = inv_norms(z);
    cn = inv_norms(cb);
    p.z_inv_norm = zn.data_ptr<float>();
    p.cb_inv_norm = cn.data_ptr<float>();
  }
  p.indices = idx.data_ptr<int64_t>();
  p.distances = dist.data_ptr<float>();
  p.N = z.size(0);
  p.K = cb.size(0);
  p.D = z.size(1);
  p.cosine = cosine;
  check_cuda("vq_nearest", vq_nearest_cuda(p, c10::cuda::getCurrentCUDAStream()));
  return {idx, dist};
}

std::tuple<at::Tensor, at::Tensor> vq_ema_update_cuda_op(const at::Tensor& indices_in,
                                                         const at::Tensor& z_in, int64_t num_codes,
                                                         bool deterministic) {
  check_ema("vq_ema_update", indices_in, z_in, num_codes, /*allow_double=*/false);
  TORCH_CHECK(z_in.is_cuda(), "vq_ema_update: z must be a CUDA tensor, got ",
              genext::device_name(z_in));
  const c10::cuda::CUDAGuard guard(z_in.device());
  const at::Tensor z = z_in.contiguous();
  const at::Tensor ind = indices_in.to(at::kLong).contiguous();
  at::Tensor counts = at::zeros({num_codes}, z.options().dtype(at::kFloat));
  at::Tensor sums = at::zeros({num_codes, z.size(1)}, z.options().dtype(at::kFloat));
  EmaParams p;
  p.dtype = to_dtype("vq_ema_update", z.scalar_type());
  p.z = z.data_ptr();
  p.indices = ind.data_ptr<int64_t>();
  p.counts = counts.data_ptr<float>();
  p.sums = sums.data_ptr<float>();
  p.N = z.size(0);
  p.K = num_codes;
  p.D = z.size(1);
  p.deterministic = deterministic;
  at::Tensor perm, offsets;
  if (deterministic) {
    // rows sorted by code (stable), and where each code's run starts: indices outside [0, K)
    // fall outside every run and are skipped
    auto sorted = at::sort(ind, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    perm = std::get<1>(sorted).contiguous();
    offsets = at::searchsorted(std::get<0>(sorted), at::arange(num_codes + 1, ind.options()))
                  .contiguous();
    p.perm = perm.data_ptr<int64_t>();
    p.offsets = offsets.data_ptr<int64_t>();
  }
  check_cuda("vq_ema_update", vq_ema_update_cuda(p, c10::cuda::getCurrentCUDAStream()));
  return {counts, sums};
}

}  // namespace
}  // namespace genext::vq

TORCH_LIBRARY_IMPL(genext, CUDA, m) {
  m.impl("vq_nearest", &genext::vq::vq_nearest_cuda_op);
  m.impl("vq_ema_update", &genext::vq::vq_ema_update_cuda_op);
}
