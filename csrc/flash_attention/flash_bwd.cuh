// Flash-attention backward for fp16/bf16 on tensor cores (mma.sync m16n8k16, sm_80+), from the
// forward's lse, with no atomics (so every run gives the same bits):
//   delta  = rowsum(dO * O)                                   (flash_bwd_delta_kernel)
//   dK, dV : one block per (key tile, kv head, sequence)      (flash_bwd_dkdv_kernel)
//            each warp owns 16 keys and computes S^T = K Q^T, P^T, dP^T = V dO^T,
//            dS^T = P^T (dP^T - delta), dV += P^T dO, dK += dS^T Q over every query tile of every
//            query head of its GQA group, all warp-local.
//   dQ     : one block per (query tile, query head, sequence) (flash_bwd_dq_kernel)
//            each warp owns 16 queries: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
// Recomputing S and dP in the dQ kernel costs 7 matmuls instead of FlashAttention-2's 5; the price
// buys determinism without a semaphore. The other way (BwdParams::dq_accum set): the dK/dV kernel
// also stages each step's dS^T in shared memory, multiplies it by its K tile and adds the result
// to an fp32 dQ accumulator with atomics; flash_bwd_dq_convert_kernel then writes dq from it.
// Five matmuls, but the order of the additions, hence the low bits of dq, varies run to run.
// For head dims over 128 the dK/dV accumulators of one warp would not fit in registers together,
// so dV and dK run as two launches of the same kernel.
#pragma once
#include "flash_attention/flash_common.cuh"

namespace genext::fa {

// Step sizes measured on an H200 at D128 (benchmarks/RESULTS.md): 64 queries per dK/dV step and
// 64 keys per dQ step took the backward from 11.8 to 10.5 ms against 32 / 32 (12 bytes of spills
// in the dK/dV kernel at D128 included).
template <int kD, bool kAtomicDQ = false>
struct BwdKVConfig {
  static constexpr int kWarps = kD <= 128 ? 8 : 4;
  static constexpr int kBlockN = 16 * kWarps;          // keys per block
  static constexpr int kBlockM = kD <= 128 ? 64 : 32;  // queries per step
  static constexpr int kPitch = kD + 8;
  static constexpr bool kSplit = kD > 128;
  // dS^T of a step, [kBlockN keys][kBlockM queries], when dQ is accumulated with atomics
  static constexpr int kPitchS = kBlockM + 8;
  static constexpr int kSmemDS = kAtomicDQ ? kBlockN * kPitchS * 2 : 0;
  static constexpr int kSmemBytes = (2 * kBlockN + 4 * kBlockM) * kPitch * 2 +
                                    4 * kBlockM * static_cast<int>(sizeof(float)) + kSmemDS;
};

template <int kD>
struct BwdQConfig {
  static constexpr int kWarps = kD <= 128 ? 8 : 4;
  static constexpr int kBlockM = 16 * kWarps;          // queries per block
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;  // keys per step
  static constexpr int kPitch = kD + 8;
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * kPitch * 2;
};

// delta[row] = sum_d dout[row, d] * out[row, d], in fp32. One thread per (row, head).
template <typename T>
__global__ void flash_bwd_delta_kernel(const BwdParams p) {
  const int h = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= seq.len_q) return;
  const T* o = row_ptr<T>(p.out, p.so, seq, seq.q_row0 + i, h);
  const T* d = row_ptr<T>(p.dout, p.sdo, seq, seq.q_row0 + i, h);
  float acc = 0.f;
  for (int c = 0; c < p.D; c += 8) {
    const uint4 a = *reinterpret_cast<const uint4*>(o + c);
    const uint4 b = *reinterpret_cast<const uint4*>(d + c);
    const T* ta = reinterpret_cast<const T*>(&a);
    const T* tb = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int j = 0; j < 8; ++j) acc += static_cast<float>(ta[j]) * static_cast<float>(tb[j]);
  }
  p.delta[seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0 + i] = acc;
}

// dq = scale * dq_accum, as T, for the rows of every sequence. One thread per (row, head).
template <typename T>
__global__ void flash_bwd_dq_convert_kernel(const BwdParams p) {
  const int h = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= seq.len_q) return;
  const float* a = p.dq_accum + seq.b * p.sdq_accum.batch + (seq.q_row0 + i) * p.sdq_accum.row +
                   static_cast<int64_t>(h) * p.sdq_accum.head;
  T* d = const_cast<T*>(row_ptr<T>(p.dq, p.sdq, seq, seq.q_row0 + i, h));
  for (int c = 0; c < p.D; c += 8) {
    uint4 packed;
    uint32_t* w = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = pack2<T>(a[c + 2 * j] * p.scale, a[c + 2 * j + 1] * p.scale);
    *reinterpret_cast<uint4*>(d + c) = packed;
  }
}

// Writes a warp's 16 x D fp32 accumulator (C-fragment layout), times `mul`, as T through the
// warp's own 16 smem rows, then to global rows [row0, row0 + 16) that are < valid_rows.
template <typename T, int kDT, int kPitch>
__device__ __forceinline__ void store_rows(const float (&acc)[kDT][4], float mul, T* srows,
                                           T* gbase, int64_t grow_stride, int valid_rows,
                                           int d_tiles, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int i = 0; i < kDT; ++i) {
    if (i < d_tiles) {
      *reinterpret_cast<uint32_t*>(srows + g * kPitch + i * 8 + 2 * t) =
          pack2<T>(acc[i][0] * mul, acc[i][1] * mul);
      *reinterpret_cast<uint32_t*>(srows + (g + 8) * kPitch + i * 8 + 2 * t) =
          pack2<T>(acc[i][2] * mul, acc[i][3] * mul);
    }
  }
  __syncwarp();
  for (int i = lane; i < 16 * d_tiles; i += 32) {
    const int r = i / d_tiles, c = i % d_tiles;
    if (r < valid_rows) {
      *reinterpret_cast<uint4*>(gbase + r * grow_stride + c * 8) =
          *reinterpret_cast<const uint4*>(srows + r * kPitch + c * 8);
    }
  }
}

// dQ[m0 + q] += dS[q] K over one step of the dK/dV kernel, added to the fp32 accumulator `dqa`
// (row q at dqa + q * row_stride) with atomics. dS^T is in smem as [kBlockN][kPitchS]; the work
// is split into (16-query, 32-column) units over the block's warps. The sum is unscaled.
template <typename T, int kD, int kBlockN, int kBlockM, int kPitch, int kPitchS, int kWarps>
__device__ __forceinline__ void add_dq_tile(const T* sdS, const T* sK, float* dqa,
                                            int64_t row_stride, int valid_rows, int d_tiles,
                                            int warp, int lane) {
  constexpr int kUnitsM = kBlockM / 16, kUnitsD = (kD + 31) / 32;
  const int g = lane / 4, t = lane % 4;
  for (int u = warp; u < kUnitsM * kUnitsD; u += kWarps) {
    const int mt = u % kUnitsM, dc = u / kUnitsM;
    const int dt0 = dc * 4;  // first 8-column n-tile of this unit
    if (dt0 >= d_tiles) continue;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      load_a_trans(sdS, kPitchS, mt * 16, kk * 16, lane, a);
#pragma unroll
      for (int dn = 0; dn < 2; ++dn) {
        if (dt0 + 2 * dn < d_tiles && dc * 32 + dn * 16 < kD) {
          uint32_t b[4];
          load_b_kn(sK, kPitch, kk * 16, dc * 32 + dn * 16, lane, b);
          mma16816<T>(acc[2 * dn], a, b[0], b[1]);
          mma16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (dt0 + i < d_tiles) {
        const int col = (dt0 + i) * 8 + 2 * t;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int row = mt * 16 + g + 8 * r;
          if (row < valid_rows) {
            float* dst = dqa + row * row_stride + col;  // col even: 8-byte aligned
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            // one vector atomic for the pair (sm_90+), half the atomic instructions
            atomicAdd(reinterpret_cast<float2*>(dst),
                      make_float2(acc[i][2 * r], acc[i][2 * r + 1]));
#else
            atomicAdd(dst, acc[i][2 * r]);
            atomicAdd(dst + 1, acc[i][2 * r + 1]);
#endif
          }
        }
      }
    }
  }
}

template <typename T, int kD, bool kDoDV, bool kDoDK, bool kAtomicDQ = false>
__global__ void __launch_bounds__(BwdKVConfig<kD>::kWarps * 32)
    flash_bwd_dkdv_kernel(const BwdParams p) {
  static_assert(!kAtomicDQ || kDoDK, "dQ is accumulated beside dK, where dS is at hand");
  using Cfg = BwdKVConfig<kD, kAtomicDQ>;
  constexpr int kWarps = Cfg::kWarps, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  constexpr int kPitch = Cfg::kPitch, kThreads = kWarps * 32;
  constexpr int kMT = kBlockM / 8;  // 8-query n-tiles of S^T
  constexpr int kDT = kD / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kBlockN * kPitch;
  T* sQ = sV + kBlockN * kPitch;                                       // [2][kBlockM][kPitch]
  T* sdO = sQ + 2 * kBlockM * kPitch;                                  // [2][kBlockM][kPitch]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kBlockM * kPitch);  // [2][kBlockM], base-2
  float* sDelta = sLse + 2 * kBlockM;                                  // [2][kBlockM]
  T* sdS = reinterpret_cast<T*>(sDelta + 2 * kBlockM);                 // [kBlockN][kPitchS]

  const int n_block = blockIdx.x, hk = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.len_k) return;  // rows past len_k were zeroed by the binding
  const int group = p.Hq / p.Hk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int D = p.D;
  const int wrow = warp * 16;
  const int key_a = n0 + wrow + g, key_b = key_a + 8;
  const int rows_k = min(kBlockN, seq.len_k - n0);

  const int offset = p.causal ? (p.bottom_right ? seq.len_k - seq.len_q : 0) : 0;
  int m_first = 0;
  if (p.causal) m_first = max(0, n0 - offset);
  const int m_begin = m_first / kBlockM;
  const int m_count = max(0, (seq.len_q + kBlockM - 1) / kBlockM - m_begin);
  const int iters = group * m_count;

  const float scale_log2 = p.scale * kLog2e;
  const int k_steps = (D + 15) / 16;
  const int d_tiles = D / 8;

  load_tile<T, kBlockN, kD, kThreads>(sK, row_ptr<T>(p.k, p.sk, seq, seq.k_row0 + n0, hk), p.sk.row,
                                      rows_k, D);
  load_tile<T, kBlockN, kD, kThreads>(sV, row_ptr<T>(p.v, p.sv, seq, seq.k_row0 + n0, hk), p.sv.row,
                                      rows_k, D);

  // Issues the loads of iteration `it` into stage it & 1.
  auto issue = [&](int it) {
    const int st = it & 1;
    const int h = hk * group + it / m_count;
    const int m0 = (m_begin + it % m_count) * kBlockM;
    const int rows = min(kBlockM, seq.len_q - m0);
    load_tile<T, kBlockM, kD, kThreads>(sQ + st * kBlockM * kPitch,
                                        row_ptr<T>(p.q, p.sq, seq, seq.q_row0 + m0, h), p.sq.row,
                                        rows, D);
    load_tile<T, kBlockM, kD, kThreads>(sdO + st * kBlockM * kPitch,
                                        row_ptr<T>(p.dout, p.sdo, seq, seq.q_row0 + m0, h),
                                        p.sdo.row, rows, D);
    const int64_t lrow =
        seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0 + m0;
    for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
      float l = INFINITY, dl = 0.f;
      if (r < rows) {
        l = p.lse[lrow + r];
        l = l == -INFINITY ? INFINITY : l * kLog2e;  // rows that saw no key contribute nothing
        dl = p.delta[lrow + r];
      }
      sLse[st * kBlockM + r] = l;
      sDelta[st * kBlockM + r] = dl;
    }
  };

  float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

  if (iters > 0) issue(0);
  cp_async_commit();

  for (int it = 0; it < iters; ++it) {
    const int st = it & 1;
    if (it + 1 < iters) {
      issue(it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // stage st (and K, V) visible to all warps

    const T* q_s = sQ + st * kBlockM * kPitch;
    const T* do_s = sdO + st * kBlockM * kPitch;
    const float* lse_s = sLse + st * kBlockM;
    const float* delta_s = sDelta + st * kBlockM;
    const int m0 = (m_begin + it % m_count) * kBlockM;

    // S^T = K Q^T and (for dK) dP^T = V dO^T, 16 keys x kBlockM queries per warp.
    float sT[kMT][4], dpT[kMT][4];
#pragma unroll
    for (int i = 0; i < kMT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sT[i][e] = dpT[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk < k_steps) {
        uint32_t a[4], av[4];
        load_a(sK, kPitch, wrow, kk * 16, lane, a);
        if constexpr (kDoDK) load_a(sV, kPitch, wrow, kk * 16, lane, av);
#pragma unroll
        for (int mm = 0; mm < kMT / 2; ++mm) {
          uint32_t b[4];
          load_b_nk(q_s, kPitch, mm * 16, kk * 16, lane, b);
          mma16816<T>(sT[2 * mm], a, b[0], b[1]);
          mma16816<T>(sT[2 * mm + 1], a, b[2], b[3]);
          if constexpr (kDoDK) {
            load_b_nk(do_s, kPitch, mm * 16, kk * 16, lane, b);
            mma16816<T>(dpT[2 * mm], av, b[0], b[1]);
            mma16816<T>(dpT[2 * mm + 1], av, b[2], b[3]);
          }
        }
      }
    }

    // P^T and dS^T, in place. Keys past len_k only need masking when dS feeds dQ (their dK, dV
    // rows are never stored; their K rows are zeros, but P there can overflow).
    const bool need_mask =
        (p.causal && n0 + wrow + 15 > m0 + offset) || (kAtomicDQ && n0 + wrow + 15 >= seq.len_k);
#pragma unroll
    for (int i = 0; i < kMT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = i * 8 + 2 * t + (e & 1);
        float pv = exp2f(sT[i][e] * scale_log2 - lse_s[qc]);
        if (need_mask) {
          const int key = e < 2 ? key_a : key_b;
          if ((p.causal && key > m0 + qc + offset) || (kAtomicDQ && key >= seq.len_k)) pv = 0.f;
        }
        sT[i][e] = pv;
        if constexpr (kDoDK) dpT[i][e] = pv * (dpT[i][e] - delta_s[qc]);
      }
    }

    if constexpr (kAtomicDQ) {  // this warp's 16 rows of dS^T, for the block's dQ step below
      constexpr int kPitchS = Cfg::kPitchS;
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
        *reinterpret_cast<uint32_t*>(sdS + (wrow + g) * kPitchS + i * 8 + 2 * t) =
            pack2<T>(dpT[i][0], dpT[i][1]);
        *reinterpret_cast<uint32_t*>(sdS + (wrow + g + 8) * kPitchS + i * 8 + 2 * t) =
            pack2<T>(dpT[i][2], dpT[i][3]);
      }
    }

    // dV += P^T dO and dK += dS^T Q (A from registers, B = dO / Q as stored: k = query, n = d).
#pragma unroll
    for (int kk = 0; kk < kBlockM / 16; ++kk) {
      uint32_t ap[4], ad[4];
      if constexpr (kDoDV) {
        ap[0] = pack2<T>(sT[2 * kk][0], sT[2 * kk][1]);
        ap[1] = pack2<T>(sT[2 * kk][2], sT[2 * kk][3]);
        ap[2] = pack2<T>(sT[2 * kk + 1][0], sT[2 * kk + 1][1]);
        ap[3] = pack2<T>(sT[2 * kk + 1][2], sT[2 * kk + 1][3]);
      }
      if constexpr (kDoDK) {
        ad[0] = pack2<T>(dpT[2 * kk][0], dpT[2 * kk][1]);
        ad[1] = pack2<T>(dpT[2 * kk][2], dpT[2 * kk][3]);
        ad[2] = pack2<T>(dpT[2 * kk + 1][0], dpT[2 * kk + 1][1]);
        ad[3] = pack2<T>(dpT[2 * kk + 1][2], dpT[2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < kD / 16; ++dn) {
        if (dn * 2 < d_tiles) {
          uint32_t b[4];
          if constexpr (kDoDV) {
            load_b_kn(do_s, kPitch, kk * 16, dn * 16, lane, b);
            mma16816<T>(acc_dv[2 * dn], ap, b[0], b[1]);
            mma16816<T>(acc_dv[2 * dn + 1], ap, b[2], b[3]);
          }
          if constexpr (kDoDK) {
            load_b_kn(q_s, kPitch, kk * 16, dn * 16, lane, b);
            mma16816<T>(acc_dk[2 * dn], ad, b[0], b[1]);
            mma16816<T>(acc_dk[2 * dn + 1], ad, b[2], b[3]);
          }
        }
      }
    }
    if constexpr (kAtomicDQ) {
      __syncthreads();  // every warp's rows of dS^T are in smem
      const int h = hk * group + it / m_count;
      float* dqa = p.dq_accum + seq.b * p.sdq_accum.batch + (seq.q_row0 + m0) * p.sdq_accum.row +
                   static_cast<int64_t>(h) * p.sdq_accum.head;
      add_dq_tile<T, kD, kBlockN, kBlockM, kPitch, Cfg::kPitchS, kWarps>(
          sdS, sK, dqa, p.sdq_accum.row, min(kBlockM, seq.len_q - m0), d_tiles, warp, lane);
    }
    __syncthreads();  // every warp is done with stage st (and dS^T) before it is refilled
  }

  cp_async_wait<0>();
  __syncthreads();  // K and V copies have landed even when no query tile was visited
  // Each warp only ever read its own 16 rows of sK and sV, so it can stage its results there.
  const int valid = min(16, seq.len_k - (n0 + wrow));
  if constexpr (kDoDK) {
    T* gk = const_cast<T*>(row_ptr<T>(p.dk, p.sdk, seq, seq.k_row0 + n0 + wrow, hk));
    store_rows<T, kDT, kPitch>(acc_dk, p.scale, sK + wrow * kPitch, gk, p.sdk.row, valid, d_tiles,
                               lane);
  }
  if constexpr (kDoDV) {
    T* gv = const_cast<T*>(row_ptr<T>(p.dv, p.sdv, seq, seq.k_row0 + n0 + wrow, hk));
    store_rows<T, kDT, kPitch>(acc_dv, 1.f, sV + wrow * kPitch, gv, p.sdv.row, valid, d_tiles,
                               lane);
  }
}

template <typename T, int kD>
__global__ void __launch_bounds__(BwdQConfig<kD>::kWarps * 32)
    flash_bwd_dq_kernel(const BwdParams p) {
  using Cfg = BwdQConfig<kD>;
  constexpr int kWarps = Cfg::kWarps, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  constexpr int kPitch = Cfg::kPitch, kThreads = kWarps * 32;
  constexpr int kNT = kBlockN / 8;
  constexpr int kDT = kD / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kBlockM * kPitch;
  T* sK = sdO + kBlockM * kPitch;  // [2][kBlockN][kPitch]
  T* sV = sK + 2 * kBlockN * kPitch;

  const int m_block = blockIdx.x, h = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int hk = h / (p.Hq / p.Hk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int D = p.D;
  const int wrow = warp * 16;
  const int row_a = m0 + wrow + g, row_b = row_a + 8;
  const int rows_q = min(kBlockM, seq.len_q - m0);

  const int offset = p.causal ? (p.bottom_right ? seq.len_k - seq.len_q : 0) : 0;
  int n_end = seq.len_k;
  if (p.causal) n_end = min(n_end, max(0, m0 + kBlockM + offset));
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;

  const T* kg = row_ptr<T>(p.k, p.sk, seq, seq.k_row0, hk);
  const T* vg = row_ptr<T>(p.v, p.sv, seq, seq.k_row0, hk);
  load_tile<T, kBlockM, kD, kThreads>(sQ, row_ptr<T>(p.q, p.sq, seq, seq.q_row0 + m0, h), p.sq.row,
                                      rows_q, D);
  load_tile<T, kBlockM, kD, kThreads>(sdO, row_ptr<T>(p.dout, p.sdo, seq, seq.q_row0 + m0, h),
                                      p.sdo.row, rows_q, D);
  auto issue = [&](int nb) {
    const int st = nb & 1;
    const int n0 = nb * kBlockN;
    load_tile<T, kBlockN, kD, kThreads>(sK + st * kBlockN * kPitch,
                                        kg + static_cast<int64_t>(n0) * p.sk.row, p.sk.row,
                                        seq.len_k - n0, D);
    load_tile<T, kBlockN, kD, kThreads>(sV + st * kBlockN * kPitch,
                                        vg + static_cast<int64_t>(n0) * p.sv.row, p.sv.row,
                                        seq.len_k - n0, D);
  };
  if (n_blocks > 0) issue(0);
  cp_async_commit();

  // This thread's two rows: lse in base 2 (+inf for rows that saw no key or lie past len_q).
  float lse2[2], dlt[2];
  const int64_t lrow = seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = r == 0 ? row_a : row_b;
    lse2[r] = INFINITY;
    dlt[r] = 0.f;
    if (row < seq.len_q) {
      const float l = p.lse[lrow + row];
      lse2[r] = l == -INFINITY ? INFINITY : l * kLog2e;
      dlt[r] = p.delta[lrow + row];
    }
  }

  const float scale_log2 = p.scale * kLog2e;
  const int k_steps = (D + 15) / 16;
  const int d_tiles = D / 8;
  float acc[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int st = nb & 1;
    const int n0 = nb * kBlockN;
    if (nb + 1 < n_blocks) {
      issue(nb + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_s = sK + st * kBlockN * kPitch;
    const T* v_s = sV + st * kBlockN * kPitch;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk < k_steps) {
        uint32_t a[4], ado[4];
        load_a(sQ, kPitch, wrow, kk * 16, lane, a);
        load_a(sdO, kPitch, wrow, kk * 16, lane, ado);
#pragma unroll
        for (int nn = 0; nn < kNT / 2; ++nn) {
          uint32_t b[4];
          load_b_nk(k_s, kPitch, nn * 16, kk * 16, lane, b);
          mma16816<T>(s[2 * nn], a, b[0], b[1]);
          mma16816<T>(s[2 * nn + 1], a, b[2], b[3]);
          load_b_nk(v_s, kPitch, nn * 16, kk * 16, lane, b);
          mma16816<T>(dp[2 * nn], ado, b[0], b[1]);
          mma16816<T>(dp[2 * nn + 1], ado, b[2], b[3]);
        }
      }
    }
    const bool need_mask =
        n0 + kBlockN > seq.len_k || (p.causal && n0 + kBlockN - 1 > m0 + wrow + offset);
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pv = exp2f(s[i][e] * scale_log2 - lse2[r]);
        if (need_mask) {
          const int col = n0 + i * 8 + 2 * t + (e & 1);
          const int row = r == 0 ? row_a : row_b;
          if (col >= seq.len_k || (p.causal && col > row + offset)) pv = 0.f;
        }
        s[i][e] = pv * (dp[i][e] - dlt[r]);  // dS
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dn = 0; dn < kD / 16; ++dn) {
        if (dn * 2 < d_tiles) {
          uint32_t b[4];
          load_b_kn(k_s, kPitch, kk * 16, dn * 16, lane, b);
          mma16816<T>(acc[2 * dn], a, b[0], b[1]);
          mma16816<T>(acc[2 * dn + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // stage st is refilled at iteration nb + 1
  }
  cp_async_wait<0>();
  __syncthreads();  // the Q and dO copies have landed even when no key tile was visited
  // Rows of sQ belong to one warp each: stage dQ there.
  T* gq = const_cast<T*>(row_ptr<T>(p.dq, p.sdq, seq, seq.q_row0 + m0 + wrow, h));
  store_rows<T, kDT, kPitch>(acc, p.scale, sQ + wrow * kPitch, gq, p.sdq.row,
                             min(16, seq.len_q - (m0 + wrow)), d_tiles, lane);
}

template <typename K>
inline cudaError_t set_smem(K* kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int kD>
CudaStatus launch_bwd(const BwdParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.Lq == 0) return {};
  const dim3 row_grid((p.Lq + 127) / 128, p.Hq, p.batch);  // one thread per (row, head)
  flash_bwd_delta_kernel<T><<<row_grid, 128, 0, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  const bool atomic_dq = p.dq_accum != nullptr;
  if (p.Lk > 0) {
    using Cfg = BwdKVConfig<kD>;
    const dim3 grid((p.Lk + Cfg::kBlockN - 1) / Cfg::kBlockN, p.Hk, p.batch);
    // Runs flash_bwd_dkdv_kernel<T, kD, dV, dK, atomic dQ> over the key tiles.
    auto run = [&]<bool kDV, bool kDK, bool kAtomic>() -> CudaStatus {
      auto* kern = &flash_bwd_dkdv_kernel<T, kD, kDV, kDK, kAtomic>;
      constexpr int kSmem = BwdKVConfig<kD, kAtomic>::kSmemBytes;
      GENEXT_CUDA_TRY(set_smem(kern, kSmem));
      kern<<<grid, Cfg::kWarps * 32, kSmem, stream>>>(p);
      GENEXT_LAUNCH_CHECK();
      return {};
    };
    CudaStatus st;
    if constexpr (Cfg::kSplit) {
      st = run.template operator()<true, false, false>();
      if (st.ok()) {
        st = atomic_dq ? run.template operator()<false, true, true>()
                       : run.template operator()<false, true, false>();
      }
    } else {
      st = atomic_dq ? run.template operator()<true, true, true>()
                     : run.template operator()<true, true, false>();
    }
    if (!st.ok()) return st;
  }
  if (atomic_dq) {
    flash_bwd_dq_convert_kernel<T><<<row_grid, 128, 0, stream>>>(p);
    GENEXT_LAUNCH_CHECK();
    return {};
  }
  using Cfg = BwdQConfig<kD>;
  const dim3 grid((p.Lq + Cfg::kBlockM - 1) / Cfg::kBlockM, p.Hq, p.batch);
  auto* kern = &flash_bwd_dq_kernel<T, kD>;
  GENEXT_CUDA_TRY(set_smem(kern, Cfg::kSmemBytes));
  kern<<<grid, Cfg::kWarps * 32, Cfg::kSmemBytes, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace genext::fa
