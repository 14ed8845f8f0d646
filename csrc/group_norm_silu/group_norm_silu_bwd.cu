// GroupNorm(+SiLU) backward on CUDA: the kernels and their launcher (group_norm_silu_bwd). Shared
// helpers: group_norm_silu_common.cuh; planning: group_norm_silu_plan.h.
//
// Backward (z and the SiLU derivative are recomputed from x in both passes; nothing of x's size is
// stored):
//   B1 gn_bwd_ncs<DX=false>: partial A = sum g, D = sum g*xhat per (n, c, split). One block of 256
//      per (row n*C+c, chunk of S); or, when S <= 1024, one warp per row (8 rows per block).
//   B1 gn_bwd_nsc<DX=false>: per-channel column sums over the block's rows (the NSC tiling of
//      group_norm_silu_fwd.cu).
//   B2 gn_bwd_reduce: one block per (n, g) -> k1, k2 (workspace); one warp per channel ->
//      grad_weight, grad_bias. Double accumulation in a fixed order, no atomics.
//   B3 gn_bwd_ncs<DX=true> / gn_bwd_nsc<DX=true>: grad_x elementwise on B1's grid, reverse order.
//
// Byte floors: the backward must read x and grad_y and write grad_x (3 * numel * sizeof(T)); it
// reads x and grad_y twice (5 * numel * sizeof(T)).
#include <climits>
#include <cstdint>

#include "common/cuda_dispatch.cuh"
#include "group_norm_silu/group_norm_silu_common.cuh"

namespace genext::gn {
namespace {

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
  } else {                     // one block per (row, chunk)
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
  if (c >= C) return;                // whole warps
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

// ---- launchers ----------------------------------------------------------------------------------

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
  const bool affine_grads =
      p.weight != nullptr && p.grad_weight != nullptr && p.grad_bias != nullptr;
  const int64_t red_blocks = s.N * s.G + (affine_grads ? ceil_div(s.C, kWarps) : 0);
  if (pl.blocks > INT_MAX || red_blocks > INT_MAX)
    return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
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
  const bool affine_grads =
      p.weight != nullptr && p.grad_weight != nullptr && p.grad_bias != nullptr;
  const int64_t red_blocks = s.N * s.G + (affine_grads ? ceil_div(s.C, kWarps) : 0);
  if (pl.blocks > INT_MAX || red_blocks > INT_MAX)
    return GENEXT_CUDA_STATUS(cudaErrorInvalidConfiguration);
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

CudaStatus group_norm_silu_bwd(const BwdParams& p, cudaStream_t stream) {
  if (!valid_shape(p.shape) || p.x == nullptr || p.grad_y == nullptr || p.grad_x == nullptr ||
      p.mean == nullptr || p.rstd == nullptr) {
    return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  }
  return dispatch_dtype(p.dtype, [&]<typename T>() { return bwd_impl<T>(p, stream); });
}
}  // namespace genext::gn
