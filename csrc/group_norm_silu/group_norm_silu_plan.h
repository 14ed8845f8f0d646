// GroupNorm(+SiLU) CUDA launch planning: the launch constants, how a problem is cut into blocks
// and how much workspace it needs (host code; the kernels are in group_norm_silu_fwd.cu and
// group_norm_silu_bwd.cu).
//
// Split rule: aim at num_sms * 8 blocks of 256 threads (num_sms * 4 for the NSC backward, whose
// per-(n, c, split) partials are workspace traffic and whose vector kernel holds ~128 registers),
// with at least 2 vectors per thread per block (NCS) or 16K elements per block (NSC); NCS forward
// splits <= 512.
#pragma once
#include <cstddef>
#include <cstdint>

#include "group_norm_silu/group_norm_silu.h"

namespace genext::gn {

constexpr int kThreads = 256;  // blocks of the split, NSC and backward kernels
constexpr int kWarps = kThreads / 32;
constexpr int kFusedMaxThreads = 512;
constexpr int64_t kFusedMaxBytes =
    44 * 1024;  // shared memory for one group (under the 48 KB default)
constexpr int64_t kMaxSplitsNcs = 512;
constexpr int64_t kWarpRowsMaxS = 1024;  // backward NCS: one warp per (n, c) row up to this S
constexpr int64_t kBlocksPerSm = 8;
constexpr int64_t kBlocksPerSmNscBwd =
    4;  // gn_bwd_nsc with 16-byte vectors: ~128 registers, 2 resident
constexpr int64_t kMinBlockElemsNsc = 16384;  // NSC: a block covers at least this many elements
// Longest fp32 Welford run (vectors per NCS slot, rows per NSC channel) before it is folded into
// the thread's double sums (NCS) or double-merged partial (NSC) and restarted from a new shift.
constexpr int kWelfordRun = 128;
static_assert(kWelfordRun % 4 == 0, "runs start at a batch of batched_loop<4>");

// A set's moments in double (its count is implied by the layout): mean and M2 = sum (x - mean)^2.
// One per (group, chunk) in the split path, one per (n, group, row split) in the NSC path: the
// forward workspace.
struct alignas(16) Moments {
  double mean, m2;
};

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}
constexpr size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool same_misalignment(const void* a, const void* b) {
  return reinterpret_cast<uintptr_t>(a) % 16 == reinterpret_cast<uintptr_t>(b) % 16;
}

// Whether the kernels take this shape (N, C, S, G positive, G divides C).
bool valid_shape(const Shape& s);

// NSC tiling: TX threads along C (vectors of V channels), TY along rows, TX*TY <= kThreads.
struct NscTile {
  int TX = 1, TY = 1, threads = 32;
};
NscTile nsc_tile(int64_t C, int V);

struct FwdPlan {
  enum Mode { kFused, kSplit, kNsc } mode = kFused;
  int64_t M = 0, splits = 1, chunk = 0, rows = 0;
  int threads = kThreads;
  size_t smem = 0, lo_off = 0, bytes = 0;
};
FwdPlan plan_fwd(const FwdParams& p);

struct BwdPlan {
  bool warp_rows = false;
  int64_t splits = 1, chunk = 0, rows = 0, blocks = 0;
  size_t k_off = 0, bytes = 0;
};
BwdPlan plan_bwd(const BwdParams& p);

}  // namespace genext::gn
