// Flash-attention forward for fp16/bf16 on tensor cores (mma.sync m16n8k16, sm_80+).
//
// One block per (query tile of kBlockM rows, query head, sequence); each warp owns 16 query rows
// and runs the whole online softmax for them, so warps never exchange data. Per key tile of
// kBlockN keys: S = Q K^T (fp32), masking, running max / sum in base 2, P (rounded to T) times V
// accumulated in fp32 registers. K and V tiles stream through a kStages-deep cp.async ring with
// one barrier per tile.
// Head dims below the tile kD run only the 16-wide k-steps and 8-wide output columns they need;
// smem columns at or past D are zero-filled.
#pragma once
#include "flash_attention/flash_common.cuh"

namespace genext::fa {

template <int kD>
struct FwdConfig {
  // kMT 16-row m-tiles per warp: each K/V fragment read from smem feeds kMT mmas (smem bandwidth,
  // not the tensor cores, bounds a one-tile warp), at the price of kMT x the accumulators.
  // Measured on an H200 (benchmarks/RESULTS.md): 64-key tiles at D 96/128 spill and ran at 120
  // TFLOP/s against 184; 8 warps (256 rows per block) gained nothing at D128 and lost at D40.
  static constexpr int kWarps = 4;
  static constexpr int kMT = kD <= 128 ? 2 : 1;
  static constexpr int kBlockM = 16 * kMT * kWarps;
  static constexpr int kBlockN = kD <= 64 ? 64 : 32;
  // K/V pipeline depth: tile n + kStages - 1 is requested while tile n is computed, so a load has
  // (kStages - 1) iterations to arrive (one iteration is shorter than a DRAM round trip).
  static constexpr int kStages = kD <= 128 ? 3 : 2;
  static constexpr int kPitch = kD + 8;
  static constexpr int kSmemBytes = (kBlockM + 2 * kStages * kBlockN) * kPitch * 2;
};

template <typename T, int kD>
__global__ void __launch_bounds__(FwdConfig<kD>::kWarps * 32) flash_fwd_kernel(const FwdParams p) {
  using Cfg = FwdConfig<kD>;
  constexpr int kWarps = Cfg::kWarps, kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN;
  constexpr int kMT = Cfg::kMT, kStages = Cfg::kStages;
  constexpr int kPitch = Cfg::kPitch, kThreads = kWarps * 32;
  constexpr int kNT = kBlockN / 8;  // 8-key n-tiles of S
  constexpr int kDT = kD / 8;       // 8-wide d-tiles of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKs = sQ + kBlockM * kPitch;             // [kStages][kBlockN][kPitch]
  T* sVs = sKs + kStages * kBlockN * kPitch;  // [kStages][kBlockN][kPitch]

  const int m_block = blockIdx.x, h = blockIdx.y, s_idx = blockIdx.z;
  const Seq seq = seq_info(p, s_idx);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.len_q) return;
  const int hk = h / (p.Hq / p.Hk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int D = p.D;

  const T* qg = row_ptr<T>(p.q, p.sq, seq, seq.q_row0 + m0, h);
  const T* kg = row_ptr<T>(p.k, p.sk, seq, seq.k_row0, hk);
  const T* vg = row_ptr<T>(p.v, p.sv, seq, seq.k_row0, hk);
  T* og = const_cast<T*>(row_ptr<T>(p.out, p.so, seq, seq.q_row0 + m0, h));
  float* lse = p.lse + seq.b * p.lse_batch + static_cast<int64_t>(h) * p.lse_head + seq.q_row0 + m0;

  const int offset = p.causal ? (p.bottom_right ? seq.len_k - seq.len_q : 0) : 0;
  int n_end = seq.len_k;
  if (p.causal) n_end = min(n_end, max(0, m0 + kBlockM + offset));
  const int n_blocks = (n_end + kBlockN - 1) / kBlockN;
  const int rows_q = min(kBlockM, seq.len_q - m0);

  // This warp's rows: kMT m-tiles of 16 from wrow; thread rows wrow + 16 * mt + g (+ 8).
  const int wrow = warp * 16 * kMT;

  if (n_blocks == 0) {  // no key visible to any row of the tile: zeros and lse = -inf
    for (int i = threadIdx.x; i < rows_q * (D / 8); i += kThreads) {
      const int r = i / (D / 8), c = i % (D / 8);
      *reinterpret_cast<uint4*>(og + r * p.so.row + c * 8) = make_uint4(0, 0, 0, 0);
    }
    for (int r = threadIdx.x; r < rows_q; r += kThreads) lse[r] = -INFINITY;
    return;
  }

  // Loads K and V tile nb into stage nb % kStages.
  auto issue = [&](int nb) {
    const int st = nb % kStages, n0 = nb * kBlockN;
    load_tile<T, kBlockN, kD, kThreads>(sKs + st * kBlockN * kPitch,
                                        kg + static_cast<int64_t>(n0) * p.sk.row, p.sk.row,
                                        seq.len_k - n0, D);
    load_tile<T, kBlockN, kD, kThreads>(sVs + st * kBlockN * kPitch,
                                        vg + static_cast<int64_t>(n0) * p.sv.row, p.sv.row,
                                        seq.len_k - n0, D);
  };
  load_tile<T, kBlockM, kD, kThreads>(sQ, qg, p.sq.row, rows_q, D);
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {
    if (st < n_blocks) issue(st);
    cp_async_commit();  // always, so that group i holds tile i
  }

  const int k_steps = (D + 15) / 16;  // 16-wide k-steps of Q K^T that touch real columns
  const int d_tiles = D / 8;          // 8-wide output columns
  const float scale_log2 = p.scale * kLog2e;

  float acc_o[kMT][kDT][4];
  float m_run[kMT][2], l_run[kMT][2];  // running max (scaled, base 2) and this thread's sum part
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int i = 0; i < kDT; ++i)
      acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int n0 = nb * kBlockN;
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile nb has landed; every warp is done with tile nb - 1
    if (nb + kStages - 1 < n_blocks) issue(nb + kStages - 1);  // into tile nb - 1's stage
    cp_async_commit();
    const T* sK = sKs + (nb % kStages) * kBlockN * kPitch;
    const T* sV = sVs + (nb % kStages) * kBlockN * kPitch;

    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int i = 0; i < kNT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (kk < k_steps) {
        uint32_t a[kMT][4];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) load_a(sQ, kPitch, wrow + 16 * mt, kk * 16, lane, a[mt]);
#pragma unroll
        for (int nn = 0; nn < kNT / 2; ++nn) {
          uint32_t b[4];
          load_b_nk(sK, kPitch, nn * 16, kk * 16, lane, b);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma16816<T>(s[mt][2 * nn], a[mt], b[0], b[1]);
            mma16816<T>(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }

    // Scale to base 2, mask (keys past the sequence, above the causal diagonal), online softmax.
    const bool need_mask =
        n0 + kBlockN > seq.len_k || (p.causal && n0 + kBlockN - 1 > m0 + wrow + offset);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][i][e] * scale_log2;
          if (need_mask) {
            const int col = n0 + i * 8 + 2 * t + (e & 1);
            const int row = m0 + wrow + 16 * mt + g + (e >= 2 ? 8 : 0);
            if (col >= seq.len_k || (p.causal && col > row + offset)) x = -INFINITY;
          }
          s[mt][i][e] = x;
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {  // rows g (e = 0, 1) and g + 8 (e = 2, 3)
        float mx = m_run[mt][r];
#pragma unroll
        for (int i = 0; i < kNT; ++i) mx = fmaxf(mx, fmaxf(s[mt][i][2 * r], s[mt][i][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m_run[mt][r] - m_use);  // m_run = -inf -> 0
        m_run[mt][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kNT; ++i) {
          s[mt][i][2 * r] = exp2f(s[mt][i][2 * r] - m_use);
          s[mt][i][2 * r + 1] = exp2f(s[mt][i][2 * r + 1] - m_use);
          sum += s[mt][i][2 * r] + s[mt][i][2 * r + 1];
        }
        l_run[mt][r] = l_run[mt][r] * alpha + sum;
#pragma unroll
        for (int i = 0; i < kDT; ++i) {
          acc_o[mt][i][2 * r] *= alpha;
          acc_o[mt][i][2 * r + 1] *= alpha;
        }
      }
    }

    // O += P V: P's accumulator layout is the A-fragment layout of the next mma.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < kD / 16; ++dn) {
        if (dn * 2 < d_tiles) {
          uint32_t b[4];
          load_b_kn(sV, kPitch, kk * 16, dn * 16, lane, b);
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) {
            mma16816<T>(acc_o[mt][2 * dn], a[mt], b[0], b[1]);
            mma16816<T>(acc_o[mt][2 * dn + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
  }

  // Finish: full row sums over the quad, normalise, write O through this warp's rows of sQ
  // (only this warp ever read them; the warp barrier orders its lanes' last ldmatrix reads of
  // those rows before the writes).
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_run[mt][r];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      // l == 0: no visible key, or every visible score -inf. A NaN score (fmaxf skipped it in
      // the maximum) left l NaN, which makes the row's output and lse NaN here.
      inv[r] = l == 0.f ? 0.f : 1.f / l;
      const int lrow = wrow + 16 * mt + g + 8 * r;  // row within the tile
      if (t == 0 && m0 + lrow < seq.len_q) {
        lse[lrow] = l == 0.f ? -INFINITY : (m_run[mt][r] + __log2f(l)) * kLn2;
      }
    }
    T* sO = sQ + (wrow + 16 * mt) * kPitch;
#pragma unroll
    for (int i = 0; i < kDT; ++i) {
      if (i < d_tiles) {
        *reinterpret_cast<uint32_t*>(sO + g * kPitch + i * 8 + 2 * t) =
            pack2<T>(acc_o[mt][i][0] * inv[0], acc_o[mt][i][1] * inv[0]);
        *reinterpret_cast<uint32_t*>(sO + (g + 8) * kPitch + i * 8 + 2 * t) =
            pack2<T>(acc_o[mt][i][2] * inv[1], acc_o[mt][i][3] * inv[1]);
      }
    }
  }
  __syncwarp();
  for (int i = lane; i < 16 * kMT * d_tiles; i += 32) {
    const int r = i / d_tiles, c = i % d_tiles;
    if (m0 + wrow + r < seq.len_q) {
      *reinterpret_cast<uint4*>(og + (wrow + r) * p.so.row + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + (wrow + r) * kPitch + c * 8);
    }
  }
}

template <typename T, int kD>
CudaStatus launch_fwd(const FwdParams& p, cudaStream_t stream) {
  using Cfg = FwdConfig<kD>;
  const dim3 grid((p.Lq + Cfg::kBlockM - 1) / Cfg::kBlockM, p.Hq, p.batch);
  if (grid.x == 0 || p.batch == 0) return {};
  auto* kernel = &flash_fwd_kernel<T, kD>;
  if (Cfg::kSmemBytes > 48 * 1024) {
    GENEXT_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes));
  }
  kernel<<<grid, Cfg::kWarps * 32, Cfg::kSmemBytes, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace genext::fa
