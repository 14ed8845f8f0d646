// lse_rows_cuda (lse_rows.h): one block per 64 rows of x (4 warps of 16 rows). The block's x rows
// stay in shared memory; y streams through a two-stage cp.async ring of 64 rows x 64 features,
// and each warp accumulates its 16 x 64 score tile over the feature chunks with mma.sync (fp32),
// then folds the tile into a running maximum and sum per row (base 2) in registers. A thread
// keeps its own running pair over the columns it holds; the four threads of a row merge theirs
// at the end. Nothing of the n x m score matrix is written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "common/cuda_utils.cuh"
#include "common/warp_mma.cuh"
#include "contrastive/lse_rows.h"

namespace genext::contrastive {
namespace {

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // rows of x per block
constexpr int kCols = 64;           // rows of y per tile
constexpr int kChunk = 64;          // features per y chunk
constexpr int kChunkPitch = kChunk + 8;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ inline int padded_dim(int64_t d) {
  return static_cast<int>((d + kChunk - 1) / kChunk * kChunk);
}
int smem_bytes(int64_t d) { return (kRows * (padded_dim(d) + 8) + 2 * kCols * kChunkPitch) * 2; }

// 16-byte copies of rows [r0, r0 + rows) x features [c0, c0 + width) of a (total, d) matrix into
// smem (row pitch `pitch`), zeros past `total` rows or `d` features.
template <class T>
__device__ __forceinline__ void load_rows(T* smem, int pitch, const T* g, int64_t r0, int rows,
                                          int64_t total, int64_t c0, int width, int64_t d) {
  const int chunks = width / 8;
  for (int i = threadIdx.x; i < rows * chunks; i += kWarps * 32) {
    const int r = i / chunks, c = (i % chunks) * 8;
    const bool ok = r0 + r < total && c0 + c < d;
    const T* src = ok ? g + (r0 + r) * d + c0 + c : g;
    cuda::cp_async16_zfill(smem + r * pitch + c, src, ok);
  }
}

template <class T>
__global__ void __launch_bounds__(kWarps * 32) lse_rows_kernel(const LseRowsParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int dp = padded_dim(p.d), x_pitch = dp + 8;
  T* sX = reinterpret_cast<T*>(smem_raw);  // [kRows][x_pitch]
  T* sY = sX + kRows * x_pitch;            // [2][kCols][kChunkPitch]
  const T* x = static_cast<const T*>(p.x);
  const T* y = static_cast<const T*>(p.y);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int chunks = dp / kChunk;
  const int64_t tiles = (p.m + kCols - 1) / kCols;
  const int64_t steps = tiles * chunks;  // (tile, chunk) pairs, chunk fastest
  const float mul = *p.scale * kLog2e;
  const float add = p.bias != nullptr ? *p.bias * kLog2e : 0.f;

  load_rows(sX, x_pitch, x, row0, kRows, p.n, 0, dp, p.d);
  auto issue = [&](int64_t s) {
    const int64_t tile = s / chunks;
    const int chunk = static_cast<int>(s % chunks);
    load_rows(sY + (s & 1) * kCols * kChunkPitch, kChunkPitch, y, tile * kCols, kCols, p.m,
              static_cast<int64_t>(chunk) * kChunk, kChunk, p.d);
  };
  issue(0);
  cuda::cp_async_commit();  // group 0: x and the first chunk

  float mx[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};  // rows g, g + 8; base 2
  bool nan[2] = {false, false};  // a NaN score (fmaxf would skip it): the row's lse is NaN
  float s[kCols / 8][4];
  for (int64_t st = 0; st < steps; ++st) {
    const int chunk = static_cast<int>(st % chunks);
    if (st + 1 < steps) issue(st + 1);  // into the stage step st - 1 used
    cuda::cp_async_commit();
    cuda::cp_async_wait_group<1>();
    __syncthreads();  // step st's chunk (and x) visible to every warp
    if (chunk == 0) {
#pragma unroll
      for (int i = 0; i < kCols / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    }
    const T* y_s = sY + (st & 1) * kCols * kChunkPitch;
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      uint32_t a[4];
      cuda::load_a(sX, x_pitch, warp * 16, chunk * kChunk + kk * 16, lane, a);
#pragma unroll
      for (int nn = 0; nn < kCols / 16; ++nn) {
        uint32_t b[4];
        cuda::load_b_nk(y_s, kChunkPitch, nn * 16, kk * 16, lane, b);
        cuda::mma16816<T>(s[2 * nn], a, b[0], b[1]);
        cuda::mma16816<T>(s[2 * nn + 1], a, b[2], b[3]);
      }
    }
    if (chunk == chunks - 1) {  // the tile's scores are complete: fold them in
      const int64_t c0 = (st / chunks) * kCols;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < kCols / 8; ++i) {
#pragma unroll
          for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const int64_t col = c0 + i * 8 + 2 * t + (e & 1);
            const float v = col < p.m ? fmaf(s[i][e], mul, add) : -INFINITY;
            nan[r] |= v != v;
            s[i][e] = v;
            tmax = fmaxf(tmax, v);
          }
        }
        const float nm = fmaxf(mx[r], tmax);
        if (nm != -INFINITY) {  // else nothing visible yet: sum stays 0
          float acc = sum[r] * exp2f(mx[r] - nm);
#pragma unroll
          for (int i = 0; i < kCols / 8; ++i)
            acc += exp2f(s[i][2 * r] - nm) + exp2f(s[i][2 * r + 1] - nm);
          sum[r] = acc;
          mx[r] = nm;
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before step st + 2 refills it
  }
  cuda::cp_async_wait_all();

  // merge the quad's running pairs: lse = max + log2(sum), back to natural log
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float m_all = mx[r];
    m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, 1));
    m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, 2));
    float part = mx[r] == -INFINITY ? 0.f : sum[r] * exp2f(mx[r] - m_all);
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    part += __shfl_xor_sync(0xffffffffu, part, 2);
    bool any_nan = nan[r];
    any_nan |= __shfl_xor_sync(0xffffffffu, any_nan, 1);
    any_nan |= __shfl_xor_sync(0xffffffffu, any_nan, 2);
    const int64_t row = row0 + warp * 16 + g + 8 * r;
    if (t == 0 && row < p.n) p.out[row] = any_nan ? NAN : (m_all + __log2f(part)) * kLn2;
  }
}

template <class T>
CudaStatus run(const LseRowsParams& p, cudaStream_t stream) {
  auto* kernel = &lse_rows_kernel<T>;
  const int smem = smem_bytes(p.d);
  if (smem > 48 * 1024) {
    GENEXT_CUDA_TRY(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const int64_t blocks = (p.n + kRows - 1) / kRows;
  kernel<<<static_cast<unsigned>(blocks), kWarps * 32, smem, stream>>>(p);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace

bool lse_rows_supported(DType dtype, int64_t d) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && d > 0 && d % 8 == 0 &&
         d <= kLseRowsMaxDim;
}

CudaStatus lse_rows_cuda(const LseRowsParams& p, cudaStream_t stream) {
  if (p.n == 0) return {};
  return dispatch_dtype(p.dtype, [&]<typename T>() -> CudaStatus {
    if constexpr (std::is_same_v<T, float>) {
      return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
    } else {
      return run<T>(p, stream);
    }
  });
}

}  // namespace genext::contrastive
