// GroupNorm(+SiLU) forward on CUDA: the kernels and their launcher (group_norm_silu_fwd). Shared
// helpers and numerics: group_norm_silu_common.cuh; planning: group_norm_silu_plan.h.
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
//
// Byte floors: the forward must read x and write y (2 * numel * sizeof(T)); the split paths read x
// a second time, mostly from L2 when x fits (50 MB on H100, 60 MB on H200).
#include <climits>
#include <cstdint>

#include "common/cuda_dispatch.cuh"
#include "group_norm_silu/group_norm_silu_common.cuh"

namespace genext::gn {
namespace {

// ---- forward, NCS, fused (group in shared memory) -----------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kFusedMaxThreads)
    gn_fwd_fused(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ mean_out,
                 float* __restrict__ rstd_out, Affine aff, int S, int K, int G, int M, double inv_m,
                 float eps, bool silu, bool vec) {
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
      load_affine<T>(
          aff, c0 + static_cast<int>(static_cast<unsigned>(e) / static_cast<unsigned>(S)), w, b);
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
        i0, i1, nt, [&](int64_t i) { return ld_raw<T, V, false>(xv + i * V); },
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
  __shared__ double carry[2][3];     // a group continuing into the next chunk: its ref and sums
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
            rs, re, TY, [&](int64_t r) { return ld_raw<T, V, false>(col + r * C); },
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

// ---- launchers ----------------------------------------------------------------------------------

template <typename T, int V>
CudaStatus fwd_nsc(const FwdParams& p, const FwdPlan& pl, cudaStream_t stream) {
  const Shape& s = p.shape;
  const int64_t K = s.C / s.G, NG = s.N * s.G;
  const NscTile t = nsc_tile(s.C, V);
  const int64_t blocks = s.N * pl.splits;
  const int64_t fin_blocks = ceil_div(NG, kWarps);
  if (blocks > INT_MAX || fin_blocks > INT_MAX)
    return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
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

}  // namespace

CudaStatus group_norm_silu_fwd(const FwdParams& p, cudaStream_t stream) {
  if (!valid_shape(p.shape) || p.x == nullptr || p.y == nullptr || p.mean == nullptr ||
      p.rstd == nullptr) {
    return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  }
  return dispatch_dtype(p.dtype, [&]<typename T>() { return fwd_impl<T>(p, stream); });
}
}  // namespace genext::gn
