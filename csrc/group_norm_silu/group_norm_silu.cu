// GroupNorm (+ optional fused SiLU) forward and backward: CUDA kernels and their launchers.
// No torch header: pointers, sizes and a stream in, a CudaStatus out (group_norm_silu.h).
// All per-element arithmetic in fp32 (partials combined in double); x/y fp32, fp16 or bf16.
// Numerics: the fused path is an exact two-pass (mean, then centred sum of squares) in shared
// memory. The split and NSC statistics are fp32 Welford recurrences per thread (per vector slot or
// per channel) in runs of at most kWelfordRun = 128 elements, each run on x minus its own first
// element; runs are folded into double (mean, M2) "moments" and combined with Chan et al.'s
// formula; no step subtracts two large sums, so the result does not depend on where the data sits
// or on outliers (see "version 2" and "version 3" below). The mean is carried as a hi + lo float
// pair inside the forward so (x - hi) - lo loses nothing to the mean's fp32 rounding.
//
// Forward, contiguous (N, C, S) layout ("NCS"): a group is one contiguous run of M = (C/G)*S
// elements starting at (n*C + g*C/G)*S.
//   gn_fwd_fused      (M + 16 bytes' worth) * sizeof(T) <= 44 KB: one block per group copies the
//                     group into shared memory (cp.async), computes the mean, then the centred
//                     variance (exact two-pass), then writes y. Reads x once; one launch.
//   gn_fwd_ncs_stats  split path, kernel 1: 1-D grid of N*G*splits blocks (256 threads), block =
//                     one chunk of one group; writes the chunk's moments (mean, M2; two doubles) to
//                     the workspace.
//   gn_fwd_ncs_norm   split path, kernel 2: the same blocks walked in reverse order (the chunks
//                     kernel 1 read last are the likeliest still in L2); each block combines its
//                     group's <= 512 moments in double in a fixed order, two passes (no atomics),
//                     then normalises its chunk. The split-0 block writes mean/rstd.
// Forward, channels-last (N, S, C) layout ("NSC"): a block covers a range of rows (positions) of
// one sample and all C channels: TX threads along C (16-byte vectors of channels when C allows,
// else scalars) times TY threads along rows; C wider than 256 vectors is walked in chunks.
//   gn_fwd_nsc_stats  per-channel Welford runs over the block's rows, merged per thread and then
//                     over the TY threads in shared memory (M2 in double), then per group in
//                     channel order -> moments (n, g, split).
//   gn_fwd_finalize   one warp per (n, g) combines the group's moments in double, writes mean/rstd
//                     and the low-order part of the mean (workspace).
//   gn_fwd_nsc_norm   normalises the block's rows (reverse block order).
//   (Here every block needs all G groups' statistics, so a tiny finalize kernel replaces the
//   per-block reduction of the NCS split path: that would cost G*splits^2 partial reads.)
// Backward (z and the SiLU derivative are recomputed from x in both passes; nothing of x's size is
// stored):
//   B1 gn_bwd_ncs<DX=false>: partial A = sum g, D = sum g*xhat per (n, c, split). One block of 256
//      per (row n*C+c, chunk of S); or, when S <= 1024, one warp per row (8 rows per block).
//   B1 gn_bwd_nsc<DX=false>: per-channel column sums over the block's rows (NSC tiling above).
//   B2 gn_bwd_reduce: one block per (n, g) -> k1, k2 (workspace); one warp per channel ->
//      grad_weight, grad_bias. Double accumulation in a fixed order, no atomics.
//   B3 gn_bwd_ncs<DX=true> / gn_bwd_nsc<DX=true>: grad_x elementwise on B1's grid, reverse order.
// Split rule: aim at num_sms * 8 blocks of 256 threads (num_sms * 4 for the NSC backward, whose
// per-(n, c, split) partials are workspace traffic and whose vector kernel holds ~128 registers),
// with at least 2 vectors per thread per block (NCS) or 16K elements per block (NSC); NCS forward
// splits <= 512.
//
// Byte floors: forward must read x and write y (2 * numel * sizeof(T)); the split paths read x a
// second time, mostly from L2 when x fits (50 MB on H100, 60 MB on H200). Backward must read x and
// grad_y and write grad_x (3 * numel * sizeof(T)); it reads x and grad_y twice (5 * numel * sizeof(T)).
//
// Versions:
//   version 1: fused on-chip path for small groups, chunk-split NCS path, row-tiled NSC path,
//     three-kernel backward. Split and NSC partials were fp32 sums of d = x - x0 and d^2 with x0
//     the group's first element, var = s2/M - (s1/M)^2. That cancels by ((mean - x0)/sigma)^2: with
//     x0 = 0 and the rest N(100, 1), rstd was off by 1.6e-5 (NCS split) and 1.4e-4 (NSC), 1e-4 and
//     1.6e-3 at mean 1000 (fp32 tolerance 1e-5); an outlier x0 = 1e4 gave 1e-3.
//   version 2: per-thread Welford from an in-set shift (the first element of the thread's slot or
//     channel), moments merged in double. Above the thread all is in double: sums about a reference
//     that is itself an element or a sub-mean (so b - a^2/n loses at most log2(n) of 53 bits), and
//     the group combination is a two-pass over (count, mean, M2). The version 1 test case went to
//     2e-9 (NCS) and 7e-8 (NSC) in the emulator. Same launches and the same single read of x for
//     the statistics as version 1; per element 5 flops instead of 3 plus one rcp.approx per vector
//     (per row in NSC), well under the memory time; partials are 16 bytes instead of 8;
//     gn_fwd_ncs_stats<half/bf16> needs ~49 registers instead of 32-40 (4 resident blocks, still
//     64 KB of loads in flight per SM). Chosen over a conditional re-centring pass (an
//     always-launched "refine" kernel plus a second read of flagged groups): that costs a launch
//     on every call (two on the NSC path) and a data-dependent second read. rsqrt_refined returns
//     0 for an infinite variance (was NaN). Its stated bound (eps * sqrt(count) on var) was wrong
//     for long runs: when a thread's shift is an outlier D >> sigma, the fp32 running mean sits
//     near -D, and once the step count k passes ~2 sigma / (2^-24 D) its updates (~sigma / k) are
//     below half an ulp and round away; found in review. In the emulator, fp32: NCS (8, 1, 2^24, 1)
//     with x0 = 1e4, the rest N(0, 1), 16384 elements per thread: rstd off by 2.4e-4 (x0 = 0, the
//     rest N(1e4, 1): 2.3e-4); NCS (8, 1, 2^22, 1), x0 = 1e5: 1.3e-5; NSC (8, 1, 2^22, 1),
//     TY = 256, x0 = 1e4: 2.6e-4 (tolerance 1e-5).
//   version 3 (this file): fp32 Welford runs capped at kWelfordRun = R = 128 vectors (NCS slot)
//     or rows (NSC channel); each run's first element is its shift, and a finished run is folded
//     in double: NCS into the thread's sums about the chunk's first element (as version 2 did once
//     at the end; kept in shared memory, 4 KB, not in registers through the loop), NSC into the
//     thread's shared-memory entries by Chan's formula (mean as a hi + lo float pair, M2 now in
//     double: static shared memory 33 KB instead of 25 KB at V = 8). An outlier shift so spoils at
//     most one run of R steps, whose mean updates stay above half an ulp up to D ~ 2^25 sigma / R
//     = 2.6e5 sigma, and fp32 never sums more than R terms. Rough worst case (every rounding the
//     same way): inside a run the mean's rounding (<= 2^-25 D per step) costs M2 about
//     R * 2^-24 D^2, against a group M2 >= D^2 (the outlier's own share), and the fp32 M2 of a run
//     is good to about R * 2^-24 relative: together ~2 R * 2^-24 = 1.5e-5 on var, 7.6e-6 on rstd;
//     typically sqrt(R) * 2^-24. Emulator, the cases above: 6.6e-7, 3.4e-7, 5.4e-7 (NCS), 5.9e-7
//     (NSC); single outliers D = 1e3 ... 1e6 sigma, NCS (8, 1, 2^24, 1) and NSC (8, 1, 2^22, 1):
//     <= 6.6e-7 (R = 64: 4.7e-7, 256: 1.1e-6, 512: 1.3e-6); N(0, 1) at 2^24 per group went from
//     5.3e-7 to 5e-8. R = 128 (a multiple of the batch of 4, so runs start at batch starts and
//     lose no loads in flight) keeps the rough worst case under the 1e-5 tolerance at a fold per
//     128 vectors or rows (NCS ~7 double ops per slot; NSC ~15 double ops and 3 shared loads and
//     stores per channel). Registers (sm_80 / sm_90a): gn_fwd_ncs_stats float 40 / 42 (was
//     40 / 32), half/bf16 56 / 55-57 (49 / 48-50); gn_fwd_nsc_stats V = 1 48 / 53 (44 / 48),
//     float V = 4 51 / 52 (42 / 52), half/bf16 V = 8 64 / 64 (58-59 / 60); no spills.
#include "group_norm_silu/group_norm_silu.h"

#include <climits>
#include <cstdint>

#include "common/cuda_dispatch.cuh"
#include "common/cuda_utils.cuh"

namespace genext::gn {
namespace {

using genext::cuda::batched_loop;
using genext::cuda::block_sum2;
using genext::cuda::cp_async16;
using genext::cuda::cp_async_wait_all;
using genext::cuda::FastDiv;
using genext::cuda::from_float;
using genext::cuda::kVec;
using genext::cuda::ld_raw;
using genext::cuda::max64;
using genext::cuda::min64;
using genext::cuda::pack16;
using genext::cuda::pack_raw;
using genext::cuda::RawT;
using genext::cuda::rcp_approx;
using genext::cuda::st_raw;
using genext::cuda::st_vec_cs;
using genext::cuda::to_float;
using genext::cuda::unpack16;
using genext::cuda::unpack_raw;
using genext::cuda::warp_sum;
using genext::cuda::welford_step;

constexpr int kThreads = 256;             // blocks of the split, NSC and backward kernels
constexpr int kWarps = kThreads / 32;
constexpr int kFusedMaxThreads = 512;
constexpr int64_t kFusedMaxBytes = 44 * 1024;  // shared memory for one group (under the 48 KB default)
constexpr int64_t kMaxSplitsNcs = 512;
constexpr int64_t kWarpRowsMaxS = 1024;   // backward NCS: one warp per (n, c) row up to this S
constexpr int64_t kBlocksPerSm = 8;
constexpr int64_t kBlocksPerSmNscBwd = 4;  // gn_bwd_nsc with 16-byte vectors: ~128 registers, 2 resident
constexpr int64_t kMinBlockElemsNsc = 16384;  // NSC: a block covers at least this many elements
// Longest fp32 Welford run (vectors per NCS slot, rows per NSC channel) before it is folded into
// the thread's double sums (NCS) or double-merged partial (NSC) and restarted from a new shift.
constexpr int kWelfordRun = 128;
static_assert(kWelfordRun % 4 == 0, "runs start at a batch of batched_loop<4>");

// ---- device helpers -----------------------------------------------------------------------------

struct Affine {
  const void* w;  // (C,) or null
  const void* b;  // (C,) or null
  bool f32;       // float32 parameters (else x's dtype)
};

template <typename T>
__device__ __forceinline__ float ld_param(const void* p, bool f32, int64_t c) {
  return f32 ? __ldg(static_cast<const float*>(p) + c) : to_float(static_cast<const T*>(p)[c]);
}

template <typename T>
__device__ __forceinline__ void load_affine(const Affine& a, int64_t c, float& w, float& b) {
  w = a.w != nullptr ? ld_param<T>(a.w, a.f32, c) : 1.f;
  b = a.b != nullptr ? ld_param<T>(a.b, a.f32, c) : 0.f;
}

// One element of any of the three dtypes (0 float32, 1 float16, 2 bfloat16; DType's values).
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }
__device__ __forceinline__ float act(float z, bool silu) { return silu ? z * sigmoid(z) : z; }
// dL/dz from dL/dy.
__device__ __forceinline__ float act_grad(float dy, float z, bool silu) {
  if (!silu) return dy;
  const float s = sigmoid(z);
  return dy * (s * (1.f + z * (1.f - s)));
}

// 1/sqrt(v) for v = var + eps in double: the fp32 approximation refined by one Newton step in double
// (no double division or sqrt subroutine). Special values without the Newton step (it would give
// inf * 0 = NaN): inf for v == 0 (as 1/sqrt(0)), 0 for v = +inf or v > 1e300 (the result
// underflows float anyway), NaN for NaN or negative v. v outside [1e-36, 1e36] is scaled by
// 2^-+128 for the fp32 estimate, so variances up to float's limit (~3.4e38) get their rstd. Larger
// ones do not reach here finite: the statistics square deviations and sum partial M2s in fp32 (a
// fused thread's sum; a Welford run of at most kWelfordRun elements on the split and NSC paths), so
// a deviation |x - shift| over ~1.8e19, or sigma over ~1.8e19 / sqrt(count) for a partial of count
// elements (~1.6e18 for a full run), makes M2 inf and rstd 0 (y = bias), not the rstd of the true
// variance.
__device__ __forceinline__ float rsqrt_refined(double v) {
  if (!(v > 0.0 && v <= 1.0e300)) {
    if (v == 0.0) return __uint_as_float(0x7f800000u);  // +inf
    return v > 0.0 ? 0.f : __uint_as_float(0x7fc00000u);  // +inf (or huge) -> 0; NaN, < 0 -> NaN
  }
  double vs = v;
  float k = 1.f;
  if (v > 1.0e36) {
    vs = v * 0x1p-128;
    k = 0x1p-64f;
  } else if (v < 1.0e-36) {
    vs = v * 0x1p128;
    k = 0x1p64f;
  }
  const float r = rsqrtf(static_cast<float>(vs));
  if (!(r <= 3.0e38f)) return r;  // inf: v below ~1e-77, 1/sqrt(v) overflows float
  const double rd = static_cast<double>(r) * k;
  return static_cast<float>(rd * (1.5 - 0.5 * v * rd * rd));
}

// A set's moments in double (its count is implied by the layout): mean and M2 = sum (x - mean)^2.
// One per (group, chunk) in the split path, one per (n, group, row split) in the NSC path: the
// forward workspace.
struct alignas(16) Moments {
  double mean, m2;
};

// The mean and variance of a group from its parts' moments (part i holds count(i) elements, M in
// all, inv_m = 1/M): Chan et al.'s parallel combination done in two passes over the parts, so
// nothing cancels: mean = sum count_i mean_i / M, M2 = sum (M2_i + count_i (mean_i - mean)^2).
// Called by a whole warp (lane = its lane); fixed order, every lane gets the same bits.
template <typename CountF>
__device__ __forceinline__ void group_moments(const Moments* __restrict__ pg, int parts,
                                              CountF count, double inv_m, int lane, double& mean,
                                              double& var) {
  double s = 0.0;
  for (int i = lane; i < parts; i += 32) s += count(i) * pg[i].mean;
  s = warp_sum(s);
  mean = s * inv_m;
  double q = 0.0;
  for (int i = lane; i < parts; i += 32) {
    const Moments p = pg[i];
    const double d = p.mean - mean;
    q += p.m2 + count(i) * d * d;
  }
  q = warp_sum(q);
  var = q * inv_m;
}

// mean/rstd of a group from its mean and (biased) variance. The mean is returned as hi + lo floats
// so that (x - hi) - lo keeps the precision of a double mean.
__device__ __forceinline__ void finalize_stats(double mean, double var, float eps, float& mhi,
                                               float& mlo, float& rstd) {
  if (var < 0.0) var = 0.0;  // NaN stays NaN
  mhi = static_cast<float>(mean);
  mlo = static_cast<float>(mean - static_cast<double>(mhi));
  rstd = rsqrt_refined(var + static_cast<double>(eps));
}

// 1/n in double without the division subroutine (a call, which costs spills): the fp32 estimate
// refined by two Newton steps (relative error 2^-23 -> 2^-46 -> double rounding).
__device__ __forceinline__ double recip(double n) {
  double r = rcp_approx(static_cast<float>(n));
  r = fma(r, fma(-n, r, 1.0), r);
  return fma(r, fma(-n, r, 1.0), r);
}

// Sums about ref (a = sum (x - ref), b = sum (x - ref)^2, n elements) -> moments. In double, with
// ref one of the elements or a sub-mean: (mean - ref)^2 <= n * var, so b - a^2/n loses at most
// log2(n) of double's 53 bits.
__device__ __forceinline__ Moments moments_from_sums(double ref, double a, double b, double n) {
  const double mu = a * recip(n);
  double m2 = b - a * mu;
  if (m2 < 0.0) m2 = 0.0;  // NaN stays NaN
  return Moments{ref + mu, m2};
}

// Tracks (q, r) = divmod(e, S) while e advances by a fixed step: the channel (q) and position (r) of
// an element of a contiguous (channel, S) run, without a division per element.
struct ChanIter {
  int64_t q, r, dq, dr, S;
  __device__ __forceinline__ ChanIter(int64_t e, int64_t step, const FastDiv& Sd) : S(Sd.value()) {
    q = Sd.div(e);
    r = e - q * S;
    dq = Sd.div(step);
    dr = step - dq * S;
  }
  __device__ __forceinline__ void advance() {
    q += dq;
    r += dr;
    if (r >= S) {
      r -= S;
      ++q;
    }
  }
};

// Splits the element range [A0, A1) of p into a scalar head [A0, a0), nvec 16-byte-aligned vectors
// from a0, and a scalar tail [a0 + nvec*V, A1). Without vec everything is head.
template <typename T>
__device__ __forceinline__ void vec_span(const T* p, int64_t A0, int64_t A1, bool vec, int64_t& a0,
                                         int64_t& nvec) {
  constexpr int V = kVec<T>;
  if (!vec) {
    a0 = A1;
    nvec = 0;
    return;
  }
  const int64_t mis = static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % V);
  const int64_t r = (mis + A0) % V;
  a0 = min64(A0 + (r ? V - r : 0), A1);
  nvec = (A1 - a0) / V;
}

// ---- forward, NCS, fused (group in shared memory) -----------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kFusedMaxThreads)
    gn_fwd_fused(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ mean_out,
                 float* __restrict__ rstd_out, Affine aff, int S, int K, int G, int M,
                 double inv_m, float eps, bool silu, bool vec) {
  // Everything here is < 2^31 (M <= 22528, N*G <= INT_MAX), so 32-bit index arithmetic.
  constexpr int V = kVec<T>;
  extern __shared__ uint4 smem_raw[];
  __shared__ double scratch[64];
  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t grp = blockIdx.x;
  const T* xg = x + grp * M;
  T* yg = y + grp * M;

  // Element e of the group lives at buf[e]; buf is offset so that 16-byte-aligned global addresses
  // map to 16-byte-aligned shared addresses. Vectors cover [h, t0), scalars [0, h) and [t0, M).
  int mis = 0, h = M, nvec = 0;
  if (vec) {
    mis = static_cast<int>((reinterpret_cast<uintptr_t>(xg) / sizeof(T)) % V);
    h = min((V - mis) % V, M);
    nvec = (M - h) / V;
  }
  const int t0 = h + nvec * V;
  T* buf = reinterpret_cast<T*>(smem_raw) + mis;
  for (int i = tid; i < nvec; i += nt) cp_async16(buf + h + i * V, xg + h + i * V);
  for (int e = tid; e < h; e += nt) buf[e] = xg[e];
  for (int e = t0 + tid; e < M; e += nt) buf[e] = xg[e];
  cp_async_wait_all();
  __syncthreads();

  // Pass 1: mean.
  float acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  for (int i = tid; i < nvec; i += nt) {
    float f[V];
    unpack16<T>(*reinterpret_cast<const uint4*>(buf + h + i * V), f);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] += f[j];
  }
  for (int e = tid; e < h; e += nt) acc[0] += to_float(buf[e]);
  for (int e = t0 + tid; e < M; e += nt) acc[0] += to_float(buf[e]);
  double s = 0.0, unused = 0.0;
#pragma unroll
  for (int j = 0; j < V; ++j) s += acc[j];
  block_sum2(s, unused, scratch);
  const double mean = s * inv_m;
  const float mh = static_cast<float>(mean);
  const float ml = static_cast<float>(mean - static_cast<double>(mh));

  // Pass 2: centred variance.
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = 0.f;
  for (int i = tid; i < nvec; i += nt) {
    float f[V];
    unpack16<T>(*reinterpret_cast<const uint4*>(buf + h + i * V), f);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float d = (f[j] - mh) - ml;
      acc[j] = fmaf(d, d, acc[j]);
    }
  }
  for (int e = tid; e < h; e += nt) {
    const float d = (to_float(buf[e]) - mh) - ml;
    acc[0] = fmaf(d, d, acc[0]);
  }
  for (int e = t0 + tid; e < M; e += nt) {
    const float d = (to_float(buf[e]) - mh) - ml;
    acc[0] = fmaf(d, d, acc[0]);
  }
  s = 0.0;
  unused = 0.0;
#pragma unroll
  for (int j = 0; j < V; ++j) s += acc[j];
  block_sum2(s, unused, scratch);
  const float rs = rsqrt_refined(s * inv_m + static_cast<double>(eps));
  if (tid == 0) {
    mean_out[grp] = mh;
    rstd_out[grp] = rs;
  }

  // Pass 3: y.
  const int64_t c0 = static_cast<int64_t>(blockIdx.x % static_cast<unsigned>(G)) * K;
  for (int i = tid; i < nvec; i += nt) {
    float f[V], o[V];
    unpack16<T>(*reinterpret_cast<const uint4*>(buf + h + i * V), f);
    const unsigned e = static_cast<unsigned>(h + i * V);
    int q = static_cast<int>(e / static_cast<unsigned>(S));
    int r = static_cast<int>(e) - q * S;
    if (r + V <= S) {
      float w, b;
      load_affine<T>(aff, c0 + q, w, b);
      const float sc = rs * w;
#pragma unroll
      for (int j = 0; j < V; ++j) o[j] = act(fmaf((f[j] - mh) - ml, sc, b), silu);
    } else {  // the vector crosses a channel boundary
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (r == S) {
          ++q;
          r = 0;
        }
        float w, b;
        load_affine<T>(aff, c0 + q, w, b);
        o[j] = act(fmaf((f[j] - mh) - ml, rs * w, b), silu);
        ++r;
      }
    }
    st_vec_cs(yg + h + i * V, pack16<T>(o));
  }
  auto scalar = [&](int e0, int e1) {
    for (int e = e0 + tid; e < e1; e += nt) {
      float w, b;
      load_affine<T>(aff, c0 + static_cast<int>(static_cast<unsigned>(e) / static_cast<unsigned>(S)), w, b);
      yg[e] = from_float<T>(act(fmaf((to_float(buf[e]) - mh) - ml, rs * w, b), silu));
    }
  };
  scalar(0, h);
  scalar(t0, M);
}

// ---- forward, NCS, split path -------------------------------------------------------------------

// Moments of one chunk of one group -> part[bid]. Each thread runs a Welford recurrence per vector
// slot j (elements a0 + (tid + k*nt)*V + j) in runs of kWelfordRun vectors, each run on x minus its
// own first element (so the shift is never further than sqrt(128) standard deviations of the run
// from its mean, and an outlier shift spoils at most one short run); the runs, the scalar head/tail
// elements and then the threads are merged as sums about ref = the chunk's first element, in
// double.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_ncs_stats(const T* __restrict__ x, Moments* __restrict__ part, int64_t M, int64_t chunk,
                     int splits, bool vec) {
  constexpr int V = kVec<T>;
  const int64_t bid = blockIdx.x;
  const int64_t grp = blockIdx.x / static_cast<unsigned>(splits);
  const int64_t split = bid - grp * splits;
  const int64_t gbase = grp * M;
  const int64_t A0 = gbase + split * chunk;
  const int64_t A1 = gbase + min64(M, (split + 1) * chunk);
  const int tid = threadIdx.x, nt = blockDim.x;
  const float ref = to_float(x[A0]);
  int64_t a0, nvec;
  vec_span(x, A0, A1, vec, a0, nvec);
  const int64_t a1 = a0 + nvec * V;
  const T* xv = x + a0;

  // Runs of kWelfordRun vectors (a multiple of the batch of 4, so runs start at batch starts and
  // cost no memory parallelism); per run and slot a Welford state; the run's first vector sets the
  // shifts (its step is then d = 0: count 1, m = q = 0). Each run ends folded into the thread's
  // sums about ref, kept in shared memory (not in registers through the loop).
  __shared__ double run_sums[2][kThreads];  // sum (x - ref), sum (x - ref)^2 of the folded runs
  run_sums[0][tid] = run_sums[1][tid] = 0.0;
  const int64_t run_stride = static_cast<int64_t>(kWelfordRun) * nt;
#pragma unroll 1
  for (int64_t i0 = tid, i1; i0 < nvec; i0 = i1) {
    i1 = min64(nvec, i0 + run_stride);
    float sh[V], m[V], q[V];
#pragma unroll
    for (int j = 0; j < V; ++j) sh[j] = m[j] = q[j] = 0.f;
    float kf = 0.f;  // vectors of this run so far
    batched_loop<4>(
        i0, i1, nt,
        [&](int64_t i) { return ld_raw<T, V, false>(xv + i * V); },
        [&](int64_t, const uint4& r) {
          float f[V];
          unpack16<T>(r, f);
          if (kf == 0.f) {
#pragma unroll
            for (int j = 0; j < V; ++j) sh[j] = f[j];
          }
          kf += 1.f;
          const float w = rcp_approx(kf);
#pragma unroll
          for (int j = 0; j < V; ++j) welford_step(f[j] - sh[j], w, m[j], q[j]);
        });
    const double kd = kf;
    double ra = 0.0, rb = 0.0;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const double u = (static_cast<double>(sh[j]) - ref) + m[j];  // slot mean - ref
      ra += kd * u;
      rb += q[j] + kd * u * u;
    }
    run_sums[0][tid] += ra;
    run_sums[1][tid] += rb;
  }
  double sa = run_sums[0][tid], sb = run_sums[1][tid];  // now over all of the thread's elements

  auto scalar = [&](int64_t e0, int64_t e1) {
#pragma unroll 1
    for (int64_t e = e0 + tid; e < e1; e += nt) {
      const double u = static_cast<double>(to_float(x[e])) - ref;
      sa += u;
      sb += u * u;
    }
  };
  scalar(A0, a0);
  scalar(a1, A1);
  __shared__ double scratch[64];
  block_sum2(sa, sb, scratch);
  if (tid == 0) part[bid] = moments_from_sums(ref, sa, sb, static_cast<double>(A1 - A0));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_ncs_norm(const T* __restrict__ x, T* __restrict__ y, const Moments* __restrict__ part,
                    float* __restrict__ mean_out, float* __restrict__ rstd_out, Affine aff,
                    FastDiv Sd, int64_t K, FastDiv Gd, int64_t M, int64_t chunk, int splits,
                    double inv_m, float eps, bool silu, bool vec) {
  constexpr int V = kVec<T>;
  const int64_t S = Sd.value();
  const unsigned ubid = gridDim.x - 1 - blockIdx.x;
  const int64_t bid = ubid;
  const int64_t grp = ubid / static_cast<unsigned>(splits);
  const int64_t split = bid - grp * splits;
  const int64_t gbase = grp * M;
  const int64_t A0 = gbase + split * chunk;
  const int64_t A1 = gbase + min64(M, (split + 1) * chunk);
  const int tid = threadIdx.x, nt = blockDim.x;

  __shared__ float st[3];
  if (tid < 32) {
    double mean, var;
    group_moments(
        part + grp * splits, splits,
        [&](int i) {
          return static_cast<double>(min64(chunk, M - static_cast<int64_t>(i) * chunk));
        },
        inv_m, tid, mean, var);
    if (tid == 0) {
      float mh, ml, rs;
      finalize_stats(mean, var, eps, mh, ml, rs);
      st[0] = mh;
      st[1] = ml;
      st[2] = rs;
      if (split == 0) {
        mean_out[grp] = mh;
        rstd_out[grp] = rs;
      }
    }
  }
  __syncthreads();
  const float mh = st[0], ml = st[1], rs = st[2];
  const int64_t c0 = (grp - Gd.div(grp) * Gd.value()) * K;

  int64_t a0, nvec;
  vec_span(x, A0, A1, vec, a0, nvec);
  const int64_t a1 = a0 + nvec * V;
  {
    ChanIter it(a0 - gbase + static_cast<int64_t>(tid) * V, static_cast<int64_t>(nt) * V, Sd);
    batched_loop<4>(
        tid, nvec, nt, [&](int64_t i) { return ld_raw<T, V, true>(x + a0 + i * V); },
        [&](int64_t i, const uint4& r) {
          float f[V], o[V];
          unpack16<T>(r, f);
          if (it.r + V <= S) {
            float w, b;
            load_affine<T>(aff, c0 + it.q, w, b);
            const float sc = rs * w;
#pragma unroll
            for (int j = 0; j < V; ++j) o[j] = act(fmaf((f[j] - mh) - ml, sc, b), silu);
          } else {  // the vector crosses a channel boundary
            int64_t q = it.q, rr = it.r;
#pragma unroll
            for (int j = 0; j < V; ++j) {
              if (rr == S) {
                ++q;
                rr = 0;
              }
              float w, b;
              load_affine<T>(aff, c0 + q, w, b);
              o[j] = act(fmaf((f[j] - mh) - ml, rs * w, b), silu);
              ++rr;
            }
          }
          st_raw<T, V, true>(y + a0 + i * V, pack16<T>(o));
          it.advance();
        });
  }
  auto scalar = [&](int64_t e0, int64_t e1) {
    if (e0 + tid >= e1) return;
    ChanIter it(e0 + tid - gbase, nt, Sd);
#pragma unroll 1
    for (int64_t e = e0 + tid; e < e1; e += nt) {
      float w, b;
      load_affine<T>(aff, c0 + it.q, w, b);
      y[e] = from_float<T>(act(fmaf((to_float(x[e]) - mh) - ml, rs * w, b), silu));
      it.advance();
    }
  };
  scalar(A0, a0);
  scalar(a1, A1);
}

// ---- forward, NSC -------------------------------------------------------------------------------

// Moments of each group over the block's rows -> part[(n*G + g)*splits + split]. Thread (tx, ty)
// runs a Welford recurrence per channel over its rows (r0 + ty, r0 + ty + TY, ...) in runs of
// kWelfordRun rows, each on x minus its first row's value, and merges each run into its own
// shared-memory entries (Chan's formula in double); the TY row-threads of a channel are merged in
// double about row-thread 0's mean (high part), and the channels of a group about the group's first
// channel mean, in channel order.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_nsc_stats(const T* __restrict__ x, Moments* __restrict__ part, int64_t S, int64_t C,
                     FastDiv Kd, int64_t G, int64_t rows, int splits, int TX, int TY) {
  // Per (row-thread, channel): the moments of the thread's rows merged so far, mean as the hi + lo
  // pair red_s + red_m and M2 in red_q (zero before the first run). After the row merge, entry ch
  // of the three holds channel ch's mean as hi + lo and its M2.
  __shared__ float red_s[kThreads * V];
  __shared__ float red_m[kThreads * V];
  __shared__ double red_q[kThreads * V];
  __shared__ float red_n[kThreads];  // rows of row-thread ty
  __shared__ double carry[2][3];  // a group continuing into the next chunk: its ref and sums
  const int64_t K = Kd.value();
  const int64_t bid = blockIdx.x;
  const int64_t n = blockIdx.x / static_cast<unsigned>(splits);
  const int64_t split = bid - n * splits;
  const int64_t r0 = split * rows, r1 = min64(S, r0 + rows);
  const double nrows_d = static_cast<double>(r1 - r0);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int tx = tid % TX, ty = tid / TX;
  const bool active = ty < TY;
  const int64_t CV = C / V;
  const int TXV = TX * V;
  const T* xn = x + n * S * C;

  int parity = 0;
  for (int64_t cv0 = 0; cv0 < CV; cv0 += TX, parity ^= 1) {
    const int64_t cv = cv0 + tx;
    if (active && cv < CV) {
      const T* col = xn + cv * V;
      // This thread's entries, accessed through volatile in the run merge below so that the
      // compiler merges the V channels one after another instead of loading all 3V entries first
      // (that raised the register count and spilled; the merge runs once per kWelfordRun rows).
      volatile float* const es = red_s + ty * TXV + tx * V;
      volatile float* const em = red_m + ty * TXV + tx * V;
      volatile double* const eq = red_q + ty * TXV + tx * V;
      float na = 0.f;  // rows merged into the entries, which start as zero moments
#pragma unroll
      for (int j = 0; j < V; ++j) {
        es[j] = 0.f;
        em[j] = 0.f;
        eq[j] = 0.0;
      }
      // Runs of kWelfordRun rows, as in gn_fwd_ncs_stats; each run is then merged into the
      // entries (mean as a hi + lo pair, M2 in double) by Chan's formula in double.
#pragma unroll 1
      for (int64_t rs = r0 + ty, re; rs < r1; rs = re) {
        re = min64(r1, rs + static_cast<int64_t>(kWelfordRun) * TY);
        float sh[V], m[V], q[V];
#pragma unroll
        for (int j = 0; j < V; ++j) sh[j] = m[j] = q[j] = 0.f;
        float kf = 0.f;  // rows of this run so far
        batched_loop<4>(
            rs, re, TY,
            [&](int64_t r) { return ld_raw<T, V, false>(col + r * C); },
            [&](int64_t, const RawT<T, V>& raw) {
              float f[V];
              unpack_raw<T, V>(raw, f);
              if (kf == 0.f) {
#pragma unroll
                for (int j = 0; j < V; ++j) sh[j] = f[j];
              }
              kf += 1.f;
              const float w = rcp_approx(kf);
#pragma unroll
              for (int j = 0; j < V; ++j) welford_step(f[j] - sh[j], w, m[j], q[j]);
            });
        const double nb = kf, wb = nb * recip(static_cast<double>(na) + nb), wa = na * wb;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const double ma = static_cast<double>(es[j]) + em[j];
          const double d = (static_cast<double>(sh[j]) + m[j]) - ma;
          const double mean = fma(d, wb, ma);
          const float hi = static_cast<float>(mean);
          es[j] = hi;
          em[j] = static_cast<float>(mean - hi);
          eq[j] = eq[j] + (q[j] + d * d * wa);
        }
        na += kf;
      }
      if (tx == 0) red_n[ty] = na;
    }
    __syncthreads();
    // Per channel of this chunk: merge the TY row-threads (in place into row 0). ref = row-thread
    // 0's red_s, the high part of its mean (row-thread 0 always has rows).
    const int width = static_cast<int>(min64(TX, CV - cv0)) * V;
    for (int ch = tid; ch < width; ch += nt) {
      const double ref = red_s[ch];
      double sa = 0.0, sb = 0.0;
      for (int t = 0; t < TY; ++t) {
        const double cnt = red_n[t];
        const int k = t * TXV + ch;
        const double u = (static_cast<double>(red_s[k]) - ref) + red_m[k];
        sa += cnt * u;
        sb += red_q[k] + cnt * u * u;
      }
      const Moments mo = moments_from_sums(ref, sa, sb, nrows_d);
      const float hi = static_cast<float>(mo.mean);
      red_s[ch] = hi;
      red_m[ch] = static_cast<float>(mo.mean - hi);
      red_q[ch] = mo.m2;
    }
    __syncthreads();
    // Per group meeting channels [cb, ce): merge its channels in order about the mean of its first
    // channel. A group that continues into the next chunk hands ref and its sums over in
    // carry[parity ^ 1].
    const int64_t cb = cv0 * V, ce = cb + width;
    const int64_t g_lo = Kd.div(cb), g_hi = Kd.div(ce - 1);
    for (int64_t gi = g_lo + tid; gi <= g_hi; gi += nt) {
      const int64_t gs = gi * K, ge = gs + K;
      // sa = sum over channels of (mean_c - ref), sb = sum of M2_c + rows * (mean_c - ref)^2.
      double ref, sa = 0.0, sb = 0.0;
      if (gs < cb) {
        ref = carry[parity][0];
        sa = carry[parity][1];
        sb = carry[parity][2];
      } else {
        ref = static_cast<double>(red_s[gs - cb]) + red_m[gs - cb];
      }
      const int64_t c_end = min64(ge, ce);
      for (int64_t c = max64(gs, cb); c < c_end; ++c) {
        const double u = (static_cast<double>(red_s[c - cb]) - ref) + red_m[c - cb];
        sa += u;
        sb += red_q[c - cb] + nrows_d * u * u;
      }
      if (ge > ce) {
        carry[parity ^ 1][0] = ref;
        carry[parity ^ 1][1] = sa;
        carry[parity ^ 1][2] = sb;
      } else {
        part[(n * G + gi) * splits + split] =
            moments_from_sums(ref, nrows_d * sa, sb, nrows_d * static_cast<double>(K));
      }
    }
    __syncthreads();
  }
}

// One warp per (n, g): mean, mean's low part and rstd from the partial moments (split i has
// K * (rows of split i) elements).
__global__ void __launch_bounds__(kThreads)
    gn_fwd_finalize(const Moments* __restrict__ part, float* __restrict__ mean,
                    float* __restrict__ mlo, float* __restrict__ rstd, int64_t NG, int64_t K,
                    int64_t S, int64_t rows, int splits, double inv_m, float eps) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (w >= NG) return;  // whole warps only
  double mu, var;
  group_moments(
      part + w * splits, splits,
      [&](int i) {
        const int64_t r = static_cast<int64_t>(i) * rows;
        return static_cast<double>(K * (min64(S, r + rows) - r));
      },
      inv_m, lane, mu, var);
  if (lane == 0) {
    float mh, ml, rs;
    finalize_stats(mu, var, eps, mh, ml, rs);
    mean[w] = mh;
    mlo[w] = ml;
    rstd[w] = rs;
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gn_fwd_nsc_norm(const T* __restrict__ x, T* __restrict__ y, const float* __restrict__ mean,
                    const float* __restrict__ mlo, const float* __restrict__ rstd, Affine aff,
                    int64_t S, int64_t C, FastDiv Kd, int64_t G, int64_t rows, int splits, int TX,
                    int TY, bool silu) {
  const unsigned ubid = gridDim.x - 1 - blockIdx.x;
  const int64_t bid = ubid;
  const int64_t n = ubid / static_cast<unsigned>(splits);
  const int64_t split = bid - n * splits;
  const int64_t r0 = split * rows, r1 = min64(S, r0 + rows);
  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  if (ty >= TY) return;  // no block-level synchronisation below
  const int64_t CV = C / V;
  const int64_t base = n * S * C;
  for (int64_t cv = tx; cv < CV; cv += TX) {
    float mh[V], ml[V], sc[V], bb[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const int64_t c = cv * V + j;
      const int64_t ng = n * G + Kd.div(c);
      float w;
      load_affine<T>(aff, c, w, bb[j]);
      mh[j] = mean[ng];
      ml[j] = mlo[ng];
      sc[j] = rstd[ng] * w;
    }
    const T* xc = x + base + cv * V;
    T* yc = y + base + cv * V;
    batched_loop<4>(
        r0 + ty, r1, TY, [&](int64_t r) { return ld_raw<T, V, true>(xc + r * C); },
        [&](int64_t r, const RawT<T, V>& raw) {
          float f[V];
          unpack_raw<T, V>(raw, f);
#pragma unroll
          for (int j = 0; j < V; ++j) f[j] = act(fmaf((f[j] - mh[j]) - ml[j], sc[j], bb[j]), silu);
          st_raw<T, V, true>(yc + r * C, pack_raw<T, V>(f));
        });
  }
}

// ---- backward -----------------------------------------------------------------------------------

template <typename T>
struct Pair {
  RawT<T, kVec<T>> x, dy;
};

// B1 (DX = false): partial (A, D) per (n, c, split) at part[(n*splits + split)*C + c].
// B3 (DX = true): grad_x.
template <typename T, bool DX>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_ncs(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
               const float* __restrict__ mean, const float* __restrict__ rstd, Affine aff,
               const float2* __restrict__ k12, float2* __restrict__ part, int64_t N, FastDiv Cd,
               int64_t S, FastDiv Kd, int64_t G, int64_t chunk, int splits, bool warp_rows,
               bool silu, bool vec) {
  constexpr int V = kVec<T>;
  const int64_t C = Cd.value();
  const unsigned ubid = DX ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t bid = ubid;
  int64_t row, split, s0, s1;
  int lt, tn;
  if (warp_rows) {  // one warp per row, the whole row
    row = bid * (blockDim.x >> 5) + (threadIdx.x >> 5);
    split = 0;
    s0 = 0;
    s1 = S;
    lt = threadIdx.x & 31;
    tn = 32;
    if (row >= N * C) return;  // whole warps; no block-level synchronisation in this mode
  } else {  // one block per (row, chunk)
    row = ubid / static_cast<unsigned>(splits);
    split = bid - row * splits;
    s0 = split * chunk;
    s1 = min64(S, s0 + chunk);
    lt = threadIdx.x;
    tn = blockDim.x;
  }
  const int64_t n = Cd.div(row), c = row - n * C;
  const int64_t ng = n * G + Kd.div(c);
  const float mu = mean[ng], rs = rstd[ng];
  float w, b;
  load_affine<T>(aff, c, w, b);
  float k1 = 0.f, k2 = 0.f;
  if constexpr (DX) {
    const float2 k = k12[ng];
    k1 = k.x;
    k2 = k.y;
  }
  float A[V], D[V];
#pragma unroll
  for (int j = 0; j < V; ++j) A[j] = D[j] = 0.f;
  // One element: returns grad_x (DX) or accumulates into (a, d).
  auto elem = [&](float xv, float gy, float& a, float& d) -> float {
    const float xh = (xv - mu) * rs;
    const float g = act_grad(gy, fmaf(xh, w, b), silu);
    if constexpr (DX) {
      return rs * (w * g - k1 - xh * k2);
    } else {
      a += g;
      d = fmaf(g, xh, d);
      return 0.f;
    }
  };

  const int64_t A0 = row * S + s0, A1 = row * S + s1;
  int64_t a0, nvec;
  vec_span(x, A0, A1, vec, a0, nvec);
  const int64_t a1 = a0 + nvec * V;
  batched_loop<4>(
      lt, nvec, tn,
      [&](int64_t i) {
        Pair<T> p;
        p.x = ld_raw<T, V, DX>(x + a0 + i * V);
        p.dy = ld_raw<T, V, DX>(dy + a0 + i * V);
        return p;
      },
      [&](int64_t i, const Pair<T>& p) {
        float fx[V], fg[V];
        unpack16<T>(p.x, fx);
        unpack16<T>(p.dy, fg);
#pragma unroll
        for (int j = 0; j < V; ++j) fx[j] = elem(fx[j], fg[j], A[j], D[j]);
        if constexpr (DX) st_raw<T, V, true>(dx + a0 + i * V, pack16<T>(fx));
      });
#pragma unroll 1
  for (int64_t e = A0 + lt; e < a0; e += tn) {
    const float r = elem(to_float(x[e]), to_float(dy[e]), A[0], D[0]);
    if constexpr (DX) dx[e] = from_float<T>(r);
  }
#pragma unroll 1
  for (int64_t e = a1 + lt; e < A1; e += tn) {
    const float r = elem(to_float(x[e]), to_float(dy[e]), A[0], D[0]);
    if constexpr (DX) dx[e] = from_float<T>(r);
  }

  if constexpr (!DX) {
    float ta = 0.f, td = 0.f;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      ta += A[j];
      td += D[j];
    }
    if (warp_rows) {
      ta = warp_sum(ta);
      td = warp_sum(td);
    } else {
      __shared__ float scratch[64];
      block_sum2(ta, td, scratch);
    }
    if (lt == 0) part[(n * splits + split) * C + c] = make_float2(ta, td);
  }
}

template <typename T, int V, bool DX>
__global__ void __launch_bounds__(kThreads)
    gn_bwd_nsc(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
               const float* __restrict__ mean, const float* __restrict__ rstd, Affine aff,
               const float2* __restrict__ k12, float2* __restrict__ part, int64_t S, int64_t C,
               FastDiv Kd, int64_t G, int64_t rows, int splits, int TX, int TY, bool silu) {
  constexpr int kRed = DX ? 1 : kThreads * V;
  __shared__ float red_a[kRed];
  __shared__ float red_b[kRed];
  const unsigned ubid = DX ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int64_t bid = ubid;
  const int64_t n = ubid / static_cast<unsigned>(splits);
  const int64_t split = bid - n * splits;
  const int64_t r0 = split * rows, r1 = min64(S, r0 + rows);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int tx = tid % TX, ty = tid / TX;
  const bool active = ty < TY;
  const int64_t CV = C / V;
  const int TXV = TX * V;
  const int64_t base = n * S * C;

  for (int64_t cv0 = 0; cv0 < CV; cv0 += TX) {
    const int64_t cv = cv0 + tx;
    if (active && cv < CV) {
      float mu[V], rs[V], w[V], b[V], k1[V], k2[V], A[V], D[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t c = cv * V + j;
        const int64_t ng = n * G + Kd.div(c);
        mu[j] = mean[ng];
        rs[j] = rstd[ng];
        load_affine<T>(aff, c, w[j], b[j]);
        if constexpr (DX) {
          const float2 k = k12[ng];
          k1[j] = k.x;
          k2[j] = k.y;
        } else {
          k1[j] = k2[j] = 0.f;
        }
        A[j] = D[j] = 0.f;
      }
      const int64_t off = base + cv * V;
      batched_loop<2>(
          r0 + ty, r1, TY,
          [&](int64_t r) {
            struct {
              RawT<T, V> x, dy;
            } p;
            p.x = ld_raw<T, V, DX>(x + off + r * C);
            p.dy = ld_raw<T, V, DX>(dy + off + r * C);
            return p;
          },
          [&](int64_t r, const auto& p) {
            float fx[V], fg[V];
            unpack_raw<T, V>(p.x, fx);
            unpack_raw<T, V>(p.dy, fg);
#pragma unroll
            for (int j = 0; j < V; ++j) {
              const float xh = (fx[j] - mu[j]) * rs[j];
              const float g = act_grad(fg[j], fmaf(xh, w[j], b[j]), silu);
              if constexpr (DX) {
                fx[j] = rs[j] * (w[j] * g - k1[j] - xh * k2[j]);
              } else {
                A[j] += g;
                D[j] = fmaf(g, xh, D[j]);
              }
            }
            if constexpr (DX) st_raw<T, V, true>(dx + off + r * C, pack_raw<T, V>(fx));
          });
      if constexpr (!DX) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          red_a[ty * TXV + tx * V + j] = A[j];
          red_b[ty * TXV + tx * V + j] = D[j];
        }
      }
    }
    if constexpr (!DX) {
      __syncthreads();
      const int width = static_cast<int>(min64(TX, CV - cv0)) * V;
      for (int ch = tid; ch < width; ch += nt) {
        float a = 0.f, d = 0.f;
        for (int t = 0; t < TY; ++t) {
          a += red_a[t * TXV + ch];
          d += red_b[t * TXV + ch];
        }
        part[(n * splits + split) * C + cv0 * V + ch] = make_float2(a, d);
      }
      __syncthreads();
    }
  }
}

// B2: blocks [0, N*G): one block per (n, g) -> k1, k2; then one warp per channel c -> grad_weight,
// grad_bias (only when affine_grads).
__global__ void __launch_bounds__(kThreads)
    gn_bwd_reduce(const float2* __restrict__ part, const void* __restrict__ weight, int wdtype,
                  float2* __restrict__ k12, float* __restrict__ grad_weight,
                  float* __restrict__ grad_bias, int64_t N, int64_t C, FastDiv Gd, FastDiv Kd,
                  int splits, double inv_m, bool affine_grads) {
  __shared__ double scratch[64];
  const int64_t G = Gd.value(), K = Kd.value();
  const int64_t NG = N * G;
  const int64_t bid = blockIdx.x;
  if (bid < NG) {  // whole blocks: the block reduction below synchronises
    const int64_t n = Gd.div(bid), g = bid - n * G;
    const int64_t items = K * splits;  // (split, channel of the group), channel fastest
    double a = 0.0, d = 0.0;
    for (int64_t i = threadIdx.x; i < items; i += blockDim.x) {
      const int64_t sp = Kd.div(i), c = g * K + (i - sp * K);
      const float2 p = part[(n * splits + sp) * C + c];
      const double wc = weight != nullptr ? static_cast<double>(load_any(weight, wdtype, c)) : 1.0;
      a += wc * p.x;
      d += wc * p.y;
    }
    block_sum2(a, d, scratch);
    if (threadIdx.x == 0) {
      k12[bid] = make_float2(static_cast<float>(a * inv_m), static_cast<float>(d * inv_m));
    }
    return;
  }
  if (!affine_grads) return;
  const int64_t c = (bid - NG) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (c >= C) return;  // whole warps
  const int64_t items = N * splits;  // part[i*C + c], i = n*splits + split
  double a = 0.0, d = 0.0;
  for (int64_t i = lane; i < items; i += 32) {
    const float2 p = part[i * C + c];
    a += p.x;
    d += p.y;
  }
  a = warp_sum(a);
  d = warp_sum(d);
  if (lane == 0) {
    grad_bias[c] = static_cast<float>(a);
    grad_weight[c] = static_cast<float>(d);
  }
}

// ---- host side ----------------------------------------------------------------------------------

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
constexpr int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }
constexpr size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

int elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }
int64_t target_blocks(int num_sms) {
  return static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * kBlocksPerSm;
}
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
bool same_misalignment(const void* a, const void* b) {
  return reinterpret_cast<uintptr_t>(a) % 16 == reinterpret_cast<uintptr_t>(b) % 16;
}

bool valid_shape(const Shape& s) {
  return s.N > 0 && s.C > 0 && s.S > 0 && s.G > 0 && s.C % s.G == 0;
}

// NSC tiling: TX threads along C (vectors of V channels), TY along rows, TX*TY <= kThreads.
struct NscTile {
  int TX = 1, TY = 1, threads = 32;
};
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

struct FwdPlan {
  enum Mode { kFused, kSplit, kNsc } mode = kFused;
  int64_t M = 0, splits = 1, chunk = 0, rows = 0;
  int threads = kThreads;
  size_t smem = 0, lo_off = 0, bytes = 0;
};

FwdPlan plan_fwd(const FwdParams& p) {
  const Shape& s = p.shape;
  const int64_t es = elem_size(p.dtype), V = 16 / es, NG = s.N * s.G;
  FwdPlan pl;
  pl.M = (s.C / s.G) * s.S;
  if (!s.channels_last) {
    if ((pl.M + V) * es <= kFusedMaxBytes) {
      pl.mode = FwdPlan::kFused;
      pl.threads = static_cast<int>(clamp64(round_up(ceil_div(ceil_div(pl.M, V), 2), 32), 32, kFusedMaxThreads));
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

struct BwdPlan {
  bool warp_rows = false;
  int64_t splits = 1, chunk = 0, rows = 0, blocks = 0;
  size_t k_off = 0, bytes = 0;
};

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
      pl.splits = clamp64(ceil_div(target_blocks(p.num_sms), NC), 1, max64(1, ceil_div(s.S, min_chunk)));
      pl.chunk = round_up(ceil_div(s.S, pl.splits), V);
      pl.splits = ceil_div(s.S, pl.chunk);
      pl.blocks = NC * pl.splits;
    }
  } else {
    // Fewer, longer blocks than the forward: the per-channel partials (C per block) are workspace
    // traffic, and the vector kernel holds ~128 registers (2 blocks per SM).
    const RowSplit r = nsc_rows(s, static_cast<int64_t>(p.num_sms > 0 ? p.num_sms : 132) * kBlocksPerSmNscBwd);
    pl.rows = r.rows;
    pl.splits = r.splits;
    pl.blocks = s.N * pl.splits;
  }
  pl.k_off = align256(static_cast<size_t>(NC * pl.splits) * sizeof(float2));
  pl.bytes = pl.k_off + static_cast<size_t>(s.N * s.G) * sizeof(float2);
  return pl;
}

template <typename T, int V>
CudaStatus fwd_nsc(const FwdParams& p, const FwdPlan& pl, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t K = s.C / s.G, NG = s.N * s.G;
  const NscTile t = nsc_tile(s.C, V);
  const int64_t blocks = s.N * pl.splits;
  const int64_t fin_blocks = ceil_div(NG, kWarps);
  if (blocks > INT_MAX || fin_blocks > INT_MAX) return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
  const T* x = static_cast<const T*>(p.x);
  Moments* part = static_cast<Moments*>(p.workspace);
  float* mlo = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + pl.lo_off);
  const Affine aff{p.weight, p.bias, p.wdtype == DType::kFloat32};
  gn_fwd_nsc_stats<T, V><<<static_cast<unsigned>(blocks), t.threads, 0, stream>>>(
      x, part, s.S, s.C, FastDiv(K), s.G, pl.rows, static_cast<int>(pl.splits), t.TX, t.TY);
  GENEXT_LAUNCH_CHECK();
  gn_fwd_finalize<<<static_cast<unsigned>(fin_blocks), kThreads, 0, stream>>>(
      part, p.mean, mlo, p.rstd, NG, K, s.S, pl.rows, static_cast<int>(pl.splits),
      1.0 / static_cast<double>(pl.M), p.eps);
  GENEXT_LAUNCH_CHECK();
  gn_fwd_nsc_norm<T, V><<<static_cast<unsigned>(blocks), t.threads, 0, stream>>>(
      x, static_cast<T*>(p.y), p.mean, mlo, p.rstd, aff, s.S, s.C, FastDiv(K), s.G, pl.rows,
      static_cast<int>(pl.splits), t.TX, t.TY, p.silu);
  GENEXT_LAUNCH_CHECK();
  return {};
}

template <typename T>
CudaStatus fwd_impl(const FwdParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const FwdPlan pl = plan_fwd(p);
  if (pl.bytes > 0 && p.workspace == nullptr) return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  const int64_t K = s.C / s.G, NG = s.N * s.G;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const Affine aff{p.weight, p.bias, p.wdtype == DType::kFloat32};
  switch (pl.mode) {
    case FwdPlan::kFused: {
      if (NG > INT_MAX) return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
      gn_fwd_fused<T><<<static_cast<unsigned>(NG), pl.threads, pl.smem, stream>>>(
          x, y, p.mean, p.rstd, aff, static_cast<int>(s.S), static_cast<int>(K),
          static_cast<int>(s.G), static_cast<int>(pl.M), 1.0 / static_cast<double>(pl.M), p.eps,
          p.silu, same_misalignment(x, y));
      GENEXT_LAUNCH_CHECK();
      return {};
    }
    case FwdPlan::kSplit: {
      const int64_t blocks = NG * pl.splits;
      if (blocks > INT_MAX) return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
      const bool vec = same_misalignment(x, y);
      Moments* part = static_cast<Moments*>(p.workspace);
      gn_fwd_ncs_stats<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x, part, pl.M, pl.chunk, static_cast<int>(pl.splits), vec);
      GENEXT_LAUNCH_CHECK();
      gn_fwd_ncs_norm<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x, y, part, p.mean, p.rstd, aff, FastDiv(s.S), K, FastDiv(s.G), pl.M, pl.chunk,
          static_cast<int>(pl.splits), 1.0 / static_cast<double>(pl.M), p.eps, p.silu, vec);
      GENEXT_LAUNCH_CHECK();
      return {};
    }
    case FwdPlan::kNsc: {
      const bool vec = s.C % kVec<T> == 0 && aligned16(x) && aligned16(y);
      return vec ? fwd_nsc<T, kVec<T>>(p, pl, stream) : fwd_nsc<T, 1>(p, pl, stream);
    }
  }
  return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
}

template <typename T, int V>
CudaStatus bwd_nsc(const BwdParams& p, const BwdPlan& pl, float2* part, float2* k12,
                    cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t K = s.C / s.G;
  const NscTile t = nsc_tile(s.C, V);
  const Affine aff{p.weight, p.bias, p.wdtype == DType::kFloat32};
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_y);
  T* dx = static_cast<T*>(p.grad_x);
  const bool affine_grads = p.weight != nullptr && p.grad_weight != nullptr && p.grad_bias != nullptr;
  const int64_t red_blocks = s.N * s.G + (affine_grads ? ceil_div(s.C, kWarps) : 0);
  if (pl.blocks > INT_MAX || red_blocks > INT_MAX) return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
  const int splits = static_cast<int>(pl.splits);
  gn_bwd_nsc<T, V, false><<<static_cast<unsigned>(pl.blocks), t.threads, 0, stream>>>(
      dy, x, dx, p.mean, p.rstd, aff, k12, part, s.S, s.C, FastDiv(K), s.G, pl.rows, splits, t.TX,
      t.TY, p.silu);
  GENEXT_LAUNCH_CHECK();
  gn_bwd_reduce<<<static_cast<unsigned>(red_blocks), kThreads, 0, stream>>>(
      part, p.weight, static_cast<int>(p.wdtype), k12, p.grad_weight, p.grad_bias, s.N, s.C,
      FastDiv(s.G), FastDiv(K), splits, 1.0 / static_cast<double>(K * s.S), affine_grads);
  GENEXT_LAUNCH_CHECK();
  gn_bwd_nsc<T, V, true><<<static_cast<unsigned>(pl.blocks), t.threads, 0, stream>>>(
      dy, x, dx, p.mean, p.rstd, aff, k12, part, s.S, s.C, FastDiv(K), s.G, pl.rows, splits, t.TX,
      t.TY, p.silu);
  GENEXT_LAUNCH_CHECK();
  return {};
}

template <typename T>
CudaStatus bwd_impl(const BwdParams& p, cudaStream_t stream) {
  const Shape& s = p.shape;
  const BwdPlan pl = plan_bwd(p);
  if (p.workspace == nullptr) return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  float2* part = static_cast<float2*>(p.workspace);
  float2* k12 = reinterpret_cast<float2*>(static_cast<char*>(p.workspace) + pl.k_off);
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.grad_y);
  T* dx = static_cast<T*>(p.grad_x);
  if (s.channels_last) {
    const bool vec = s.C % kVec<T> == 0 && aligned16(x) && aligned16(dy) && aligned16(dx);
    return vec ? bwd_nsc<T, kVec<T>>(p, pl, part, k12, stream)
               : bwd_nsc<T, 1>(p, pl, part, k12, stream);
  }
  const int64_t K = s.C / s.G;
  const Affine aff{p.weight, p.bias, p.wdtype == DType::kFloat32};
  const bool vec = same_misalignment(x, dy) && same_misalignment(x, dx);
  const bool affine_grads = p.weight != nullptr && p.grad_weight != nullptr && p.grad_bias != nullptr;
  const int64_t red_blocks = s.N * s.G + (affine_grads ? ceil_div(s.C, kWarps) : 0);
  if (pl.blocks > INT_MAX || red_blocks > INT_MAX) return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
  const int splits = static_cast<int>(pl.splits);
  gn_bwd_ncs<T, false><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
      dy, x, dx, p.mean, p.rstd, aff, k12, part, s.N, FastDiv(s.C), s.S, FastDiv(K), s.G, pl.chunk,
      splits, pl.warp_rows, p.silu, vec);
  GENEXT_LAUNCH_CHECK();
  gn_bwd_reduce<<<static_cast<unsigned>(red_blocks), kThreads, 0, stream>>>(
      part, p.weight, static_cast<int>(p.wdtype), k12, p.grad_weight, p.grad_bias, s.N, s.C,
      FastDiv(s.G), FastDiv(K), splits, 1.0 / static_cast<double>(K * s.S), affine_grads);
  GENEXT_LAUNCH_CHECK();
  gn_bwd_ncs<T, true><<<static_cast<unsigned>(pl.blocks), kThreads, 0, stream>>>(
      dy, x, dx, p.mean, p.rstd, aff, k12, part, s.N, FastDiv(s.C), s.S, FastDiv(K), s.G, pl.chunk,
      splits, pl.warp_rows, p.silu, vec);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace

size_t fwd_workspace_bytes(const FwdParams& p) {
  if (!valid_shape(p.shape)) return 0;
  return plan_fwd(p).bytes;
}

size_t bwd_workspace_bytes(const BwdParams& p) {
  if (!valid_shape(p.shape)) return 0;
  return plan_bwd(p).bytes;
}

CudaStatus group_norm_silu_fwd(const FwdParams& p, cudaStream_t stream) {
  if (!valid_shape(p.shape) || p.x == nullptr || p.y == nullptr || p.mean == nullptr ||
      p.rstd == nullptr) {
    return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  }
  return dispatch_dtype(p.dtype, [&]<typename T>() { return fwd_impl<T>(p, stream); });
}

CudaStatus group_norm_silu_bwd(const BwdParams& p, cudaStream_t stream) {
  if (!valid_shape(p.shape) || p.x == nullptr || p.grad_y == nullptr || p.grad_x == nullptr ||
      p.mean == nullptr || p.rstd == nullptr) {
    return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  }
  return dispatch_dtype(p.dtype, [&]<typename T>() { return bwd_impl<T>(p, stream); });
}

}  // namespace genext::gn
