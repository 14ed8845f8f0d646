// The CUDA launchers' parameters and outputs from the op's inputs, on the inputs' device: shared by
// the CUDA binding (vq_cuda.cpp) and the tests that run the kernels under the CPU emulation
// (tests/cuda_emu). The inputs are checked first (vq_checks.h).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/norm.h>
#include <ATen/ops/reciprocal.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/square.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <tuple>

#include "common/torch_dtype.h"
#include "vq/vq.h"

namespace genext::vq {

// 1 / ||row|| in fp32 with torch ops; a zero row gets a huge factor times a zero dot product,
// i.e. similarity 0, as the CPU's normalised zero vector.
inline at::Tensor inv_norms(const at::Tensor& x) {
  return at::reciprocal(at::clamp_min(at::norm(x.to(at::kFloat), 2, {1}), 1e-30));
}

// vq_nearest's launch: the parameters, and the tensors they point into (kept alive by this).
struct NearestLaunch {
  at::Tensor z, cb, zn, cn, cb_sq, cb_sq_max;
  at::Tensor indices, distances;  // the outputs
  NearestParams p;
};

// tensor_cores: ask for the tensor-core path (vq_tc.cu), which applies to 16-bit inputs.
inline NearestLaunch nearest_launch(const at::Tensor& z_in, const at::Tensor& cb_in, bool cosine,
                                    bool tensor_cores = false) {
  NearestLaunch l;
  l.z = z_in.contiguous();
  l.cb = cb_in.contiguous();
  l.indices = at::empty({l.z.size(0)}, l.z.options().dtype(at::kLong));
  l.distances = at::empty({l.z.size(0)}, l.z.options().dtype(at::kFloat));
  NearestParams& p = l.p;
  p.dtype = to_dtype("vq_nearest", l.z.scalar_type());
  p.z = l.z.data_ptr();
  p.codebook = l.cb.data_ptr();
  if (cosine && l.z.size(0) > 0) {
    l.zn = inv_norms(l.z);
    l.cn = inv_norms(l.cb);
    p.z_inv_norm = l.zn.data_ptr<float>();
    p.cb_inv_norm = l.cn.data_ptr<float>();
  }
  p.indices = l.indices.data_ptr<int64_t>();
  p.distances = l.distances.data_ptr<float>();
  p.N = l.z.size(0);
  p.K = l.cb.size(0);
  p.D = l.z.size(1);
  p.cosine = cosine;
  p.tensor_cores = tensor_cores && l.z.scalar_type() != at::kFloat;
  if (p.tensor_cores && !cosine && p.N > 0) {
    l.cb_sq = at::sum(at::square(l.cb.to(at::kFloat)), {1});
    l.cb_sq_max = at::amax(l.cb_sq);
    p.cb_sq_norm = l.cb_sq.data_ptr<float>();
    p.cb_sq_max = l.cb_sq_max.data_ptr<float>();
  }
  return l;
}

// vq_ema_update's launch: the parameters, the zeroed outputs and, deterministic, the rows sorted
// by code (stable) with where each code's run starts (indices outside [0, K) fall outside every
// run and are skipped).
struct EmaLaunch {
  at::Tensor z, indices, perm, offsets;
  at::Tensor counts, sums;  // the outputs
  EmaParams p;
};

inline EmaLaunch ema_launch(const at::Tensor& indices_in, const at::Tensor& z_in, int64_t num_codes,
                            bool deterministic) {
  EmaLaunch l;
  l.z = z_in.contiguous();
  l.indices = indices_in.to(at::kLong).contiguous();
  l.counts = at::zeros({num_codes}, l.z.options().dtype(at::kFloat));
  l.sums = at::zeros({num_codes, l.z.size(1)}, l.z.options().dtype(at::kFloat));
  EmaParams& p = l.p;
  p.dtype = to_dtype("vq_ema_update", l.z.scalar_type());
  p.z = l.z.data_ptr();
  p.indices = l.indices.data_ptr<int64_t>();
  p.counts = l.counts.data_ptr<float>();
  p.sums = l.sums.data_ptr<float>();
  p.N = l.z.size(0);
  p.K = num_codes;
  p.D = l.z.size(1);
  p.deterministic = deterministic;
  if (deterministic) {
    auto sorted = at::sort(l.indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    l.perm = std::get<1>(sorted).contiguous();
    l.offsets =
        at::searchsorted(std::get<0>(sorted), at::arange(num_codes + 1, l.indices.options()))
            .contiguous();
    p.perm = l.perm.data_ptr<int64_t>();
    p.offsets = l.offsets.data_ptr<int64_t>();
  }
  return l;
}

}  // namespace genext::vq
