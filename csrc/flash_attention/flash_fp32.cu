// Flash attention in plain fp32 on CUDA cores: the exact (no TF32) path for float32 inputs.
// Correct, not fast: one warp per query row (forward, dQ) or key row (dK/dV), the head dim spread
// over the lanes (lane l holds elements l, l + 32, ...), dot products reduced with shuffles, and
// the online softmax run one key at a time. No atomics; the same bits every run.
#include <cmath>

#include "common/head_dim.h"
#include "flash_attention/flash_common.cuh"

namespace genext::fa {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block, one row each
static_assert(kCudaMaxHeadDim <= 8 * 32, "the fp32 kernels hold up to 8 values per lane");

template <int kC>
__device__ __forceinline__ void load_row(const float* src, int D, int lane, float (&r)[kC]) {
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int d = lane + 32 * c;
    r[c] = d < D ? src[d] : 0.f;
  }
}

template <int kC>
__device__ __forceinline__ float dot(const float (&a)[kC], const float* b, int D, int lane) {
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int d = lane + 32 * c;
    if (d < D) s = fmaf(a[c], b[d], s);
  }
  return genext::cuda::warp_sum(s);
}

template <int kC>
__device__ __forceinline__ void store_row(float* dst, int D, int lane, const float (&r)[kC],
                                          float mul) {
#pragma unroll
  for (int c = 0; c < kC; ++c) {
    const int d = lane + 32 * c;
    if (d < D) dst[d] = r[c] * mul;
  }
}

__device__ __forceinline__ int causal_offset(const FwdParams& p, const Seq& s) {
  return p.causal ? (p.bottom_right ? s.len_k - s.len_q : 0) : 0;
}

template <int kC>
__global__ void fp32_fwd_kernel(const FwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int i = blockIdx.x * kRowsPerBlock + warp;
  if (i >= seq.len_q) return;
  const int hk = h / (p.Hq / p.Hk);
  const int offset = causal_offset(p, seq);
  const int n_end = p.causal ? max(0, min(seq.len_k, i + offset + 1)) : seq.len_k;
  float q[kC], acc[kC];
  load_row(row_ptr<float>(p.q, p.sq, seq, seq.q_row0 + i, h), p.D, lane, q);
#pragma unroll
  for (int c = 0; c < kC; ++c) acc[c] = 0.f;
  const float* kb = row_ptr<float>(p.k, p.sk, seq, seq.k_row0, hk);
  const float* vb = row_ptr<float>(p.v, p.sv, seq, seq.k_row0, hk);
  float m = -INFINITY, l = 0.f;
  for (int j = 0; j < n_end; ++j) {
    const float x = dot(q, kb + j * p.sk.row, p.D, lane) * p.scale;
    const float m_new = fmaxf(m, x);  // skips a NaN x, whose pj then makes l NaN
    // exponents from 0 while every score so far is -inf: alpha and pj are 0, not NaN
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = expf(m - m_use);  // m = -inf -> 0
    const float pj = expf(x - m_use);
    l = l * alpha + pj;
    const float* vr = vb + j * p.sv.row;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int d = lane + 32 * c;
      acc[c] = acc[c] * alpha + (d < p.D ? pj * vr[d] : 0.f);
    }
    m = m_new;
  }
  float* o = const_cast<float*>(row_ptr<float>(p.out, p.so, seq, seq.q_row0 + i, h));
  // l == 0: no key, or every score -inf (out 0, lse -inf); a NaN l makes out and lse NaN
  store_row(o, p.D, lane, acc, l == 0.f ? 0.f : 1.f / l);
  if (lane == 0) {
    p.lse[seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0 + i] =
        l == 0.f ? -INFINITY : m + logf(l);
  }
}

// dQ and delta for one query row per warp.
template <int kC>
__global__ void fp32_bwd_dq_kernel(const BwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int i = blockIdx.x * kRowsPerBlock + warp;
  if (i >= seq.len_q) return;
  const int hk = h / (p.Hq / p.Hk);
  const int offset = causal_offset(p, seq);
  const int n_end = p.causal ? max(0, min(seq.len_k, i + offset + 1)) : seq.len_k;
  float q[kC], dout[kC], acc[kC];
  load_row(row_ptr<float>(p.q, p.sq, seq, seq.q_row0 + i, h), p.D, lane, q);
  load_row(row_ptr<float>(p.dout, p.sdo, seq, seq.q_row0 + i, h), p.D, lane, dout);
  const float delta = dot(dout, row_ptr<float>(p.out, p.so, seq, seq.q_row0 + i, h), p.D, lane);
  const int64_t lrow = seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0 + i;
  if (lane == 0) p.delta[lrow] = delta;
  const float lse = p.lse[lrow];
#pragma unroll
  for (int c = 0; c < kC; ++c) acc[c] = 0.f;
  const float* kb = row_ptr<float>(p.k, p.sk, seq, seq.k_row0, hk);
  const float* vb = row_ptr<float>(p.v, p.sv, seq, seq.k_row0, hk);
  if (lse != -INFINITY) {
    for (int j = 0; j < n_end; ++j) {
      const float* kr = kb + j * p.sk.row;
      const float pj = expf(dot(q, kr, p.D, lane) * p.scale - lse);
      const float ds = pj * (dot(dout, vb + j * p.sv.row, p.D, lane) - delta);
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const int d = lane + 32 * c;
        if (d < p.D) acc[c] = fmaf(ds, kr[d], acc[c]);
      }
    }
  }
  store_row(const_cast<float*>(row_ptr<float>(p.dq, p.sdq, seq, seq.q_row0 + i, h)), p.D, lane, acc,
            p.scale);
}

// dK and dV for one key row per warp, over every query of every head of its GQA group.
template <int kC>
__global__ void fp32_bwd_dkdv_kernel(const BwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int hk = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int j = blockIdx.x * kRowsPerBlock + warp;
  if (j >= seq.len_k) return;
  const int group = p.Hq / p.Hk;
  const int offset = causal_offset(p, seq);
  const int i_begin = p.causal ? max(0, j - offset) : 0;
  float k[kC], v[kC], dk[kC], dv[kC];
  load_row(row_ptr<float>(p.k, p.sk, seq, seq.k_row0 + j, hk), p.D, lane, k);
  load_row(row_ptr<float>(p.v, p.sv, seq, seq.k_row0 + j, hk), p.D, lane, v);
#pragma unroll
  for (int c = 0; c < kC; ++c) dk[c] = dv[c] = 0.f;
  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    const float* qb = row_ptr<float>(p.q, p.sq, seq, seq.q_row0, h);
    const float* db = row_ptr<float>(p.dout, p.sdo, seq, seq.q_row0, h);
    const int64_t lrow = seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0;
    for (int i = i_begin; i < seq.len_q; ++i) {
      const float lse = p.lse[lrow + i];
      if (lse == -INFINITY) continue;
      const float* qr = qb + i * p.sq.row;
      const float* dr = db + i * p.sdo.row;
      const float pij = expf(dot(k, qr, p.D, lane) * p.scale - lse);
      const float ds = pij * (dot(v, dr, p.D, lane) - p.delta[lrow + i]);
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const int d = lane + 32 * c;
        if (d < p.D) {
          dv[c] = fmaf(pij, dr[d], dv[c]);
          dk[c] = fmaf(ds, qr[d], dk[c]);
        }
      }
    }
  }
  store_row(const_cast<float*>(row_ptr<float>(p.dk, p.sdk, seq, seq.k_row0 + j, hk)), p.D, lane, dk,
            p.scale);
  store_row(const_cast<float*>(row_ptr<float>(p.dv, p.sdv, seq, seq.k_row0 + j, hk)), p.D, lane, dv,
            1.f);
}

template <int kC>
CudaStatus run_fwd(const FwdParams& p, cudaStream_t stream) {
  const dim3 grid((p.Lq + kRowsPerBlock - 1) / kRowsPerBlock, p.Hq, p.batch);
  fp32_fwd_kernel<kC><<<grid, 32 * kRowsPerBlock, 0, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

template <int kC>
CudaStatus run_bwd(const BwdParams& p, cudaStream_t stream) {
  const dim3 gq((p.Lq + kRowsPerBlock - 1) / kRowsPerBlock, p.Hq, p.batch);
  fp32_bwd_dq_kernel<kC><<<gq, 32 * kRowsPerBlock, 0, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  if (p.Lk == 0) return {};
  const dim3 gk((p.Lk + kRowsPerBlock - 1) / kRowsPerBlock, p.Hk, p.batch);
  fp32_bwd_dkdv_kernel<kC><<<gk, 32 * kRowsPerBlock, 0, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace

CudaStatus flash_fwd_fp32(const FwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.Lq == 0) return {};
  switch ((p.D + 31) / 32) {
    case 1: return run_fwd<1>(p, stream);
    case 2: return run_fwd<2>(p, stream);
    case 3: return run_fwd<3>(p, stream);
    case 4: return run_fwd<4>(p, stream);
    case 5: return run_fwd<5>(p, stream);
    case 6: return run_fwd<6>(p, stream);
    case 7: return run_fwd<7>(p, stream);
    case 8: return run_fwd<8>(p, stream);
    default: return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  }
}

CudaStatus flash_bwd_fp32(const BwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.Lq == 0) return {};
  switch ((p.D + 31) / 32) {
    case 1: return run_bwd<1>(p, stream);
    case 2: return run_bwd<2>(p, stream);
    case 3: return run_bwd<3>(p, stream);
    case 4: return run_bwd<4>(p, stream);
    case 5: return run_bwd<5>(p, stream);
    case 6: return run_bwd<6>(p, stream);
    case 7: return run_bwd<7>(p, stream);
    case 8: return run_bwd<8>(p, stream);
    default: return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
  }
}

}  // namespace genext::fa
