// GroupNorm(+SiLU) CUDA launch planning (group_norm_silu_plan.h): block counts, splits, tiles and
// workspace sizes, from the shape, the dtype and the SM count.
#include "common/cuda_utils.cuh"
#include "group_norm_silu/group_norm_silu_plan.h"

namespace genext::gn {
namespace {

using genext::cuda::max64;

int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
int64_t target_blocks(int num_sms) {
  return static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * kBlocksPerSm;
}

// NSC: split each sample's S rows into `splits` ranges of `rows` rows.
struct RowSplit {
  int64_t rows = 1, splits = 1;
};
RowSplit nsc_rows(const Shape& s, int64_t target) {
  RowSplit r;
  const int64_t min_rows = ceil_div(kMinBlockElemsNsc, s.C);
  r.splits = clamp64(ceil_div(target, s.N), 1, max64(1, ceil_div(s.S, min_rows)));
  r.rows = ceil_div(s.S, r.splits);
  r.splits = ceil_div(s.S, r.rows);
  return r;
}

}  // namespace

bool valid_shape(const Shape& s) {
  return s.N > 0 && s.C > 0 && s.S > 0 && s.G > 0 && s.C % s.G == 0;
}

NscTile nsc_tile(int64_t C, int V) {
  NscTile t;
  const int64_t CV = C / V;
  if (CV <= kThreads) {
    t.TX = static_cast<int>(CV);
    t.TY = static_cast<int>(kThreads / CV);
  } else {
    t.TX = static_cast<int>(ceil_div(CV, ceil_div(CV, kThreads)));
    t.TY = 1;
  }
  t.threads = static_cast<int>(round_up(static_cast<int64_t>(t.TX) * t.TY, 32));
  return t;
}

FwdPlan plan_fwd(const FwdParams& p) {
  const Shape& s = p.shape;
  const int64_t es = elem_size(p.dtype), V = 16 / es, NG = s.N * s.G;
  FwdPlan pl;
  pl.M = (s.C / s.G) * s.S;
  if (!s.channels_last) {
    if ((pl.M + V) * es <= kFusedMaxBytes) {
      pl.mode = FwdPlan::kFused;
      pl.threads = static_cast<int>(
          clamp64(round_up(ceil_div(ceil_div(pl.M, V), 2), 32), 32, kFusedMaxThreads));
      pl.smem = static_cast<size_t>(round_up((pl.M + V) * es, 16));
    } else {
      pl.mode = FwdPlan::kSplit;
      const int64_t min_chunk = kThreads * V * 2;
      pl.splits = clamp64(ceil_div(target_blocks(p.num_sms), NG), 1, kMaxSplitsNcs);
      pl.splits = clamp64(pl.splits, 1, max64(1, ceil_div(pl.M, min_chunk)));
      pl.chunk = round_up(ceil_div(pl.M, pl.splits), V);
      pl.splits = ceil_div(pl.M, pl.chunk);
      pl.bytes = static_cast<size_t>(NG * pl.splits) * sizeof(Moments);
    }
  } else {
    pl.mode = FwdPlan::kNsc;
    const RowSplit r = nsc_rows(s, target_blocks(p.num_sms));
    pl.rows = r.rows;
    pl.splits = r.splits;
    pl.lo_off = align256(static_cast<size_t>(NG * pl.splits) * sizeof(Moments));
    pl.bytes = pl.lo_off + static_cast<size_t>(NG) * sizeof(float);
  }
  return pl;
}

BwdPlan plan_bwd(const BwdParams& p) {
  const Shape& s = p.shape;
  const int64_t es = elem_size(p.dtype), V = 16 / es, NC = s.N * s.C;
  BwdPlan pl;
  if (!s.channels_last) {
    if (s.S <= kWarpRowsMaxS) {
      pl.warp_rows = true;
      pl.blocks = ceil_div(NC, kWarps);
    } else {
      const int64_t min_chunk = kThreads * V * 2;
      pl.splits =
          clamp64(ceil_div(target_blocks(p.num_sms), NC), 1, max64(1, ceil_div(s.S, min_chunk)));
      pl.chunk = round_up(ceil_div(s.S, pl.splits), V);
      pl.splits = ceil_div(s.S, pl.chunk);
      pl.blocks = NC * pl.splits;
    }
  } else {
    // Fewer, longer blocks than the forward: the per-channel partials (C per block) are workspace
    // traffic, and the vector kernel holds ~128 registers (2 blocks per SM).
    const RowSplit r =
        nsc_rows(s, static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 132) * kBlocksPerSmNscBwd);
    pl.rows = r.rows;
    pl.splits = r.splits;
    pl.blocks = s.N * pl.splits;
  }
  pl.k_off = align256(static_cast<size_t>(NC * pl.splits) * sizeof(float2));
  pl.bytes = pl.k_off + static_cast<size_t>(s.N * s.G) * sizeof(float2);
  return pl;
}

size_t fwd_workspace_bytes(const FwdParams& p) {
  if (!valid_shape(p.shape)) return 0;
  return plan_fwd(p).bytes;
}

size_t bwd_workspace_bytes(const BwdParams& p) {
  if (!valid_shape(p.shape)) return 0;
  return plan_bwd(p).bytes;
}

}  // namespace genext::gn
