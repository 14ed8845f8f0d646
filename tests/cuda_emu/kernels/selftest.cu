// Kernels that check the emulation itself (test_emu_selftest.py): block barriers, shared memory,
// the warp shuffles and votes, atomics, dynamic shared memory, and the errors it reports. Written
// as CUDA and compiled only under the emulation.
#include <cuda_runtime.h>

#include "common/cuda_status.h"
#include "common/cuda_utils.cuh"

namespace genext::emu_selftest {

// out[b] = sum of x[b * blockDim.x + t] over the block (cuda_utils.cuh's block_sum2: warp
// shuffles, then shared memory between warps), and out2[b] the sum of squares.
__global__ void block_sums(const float* x, float* out, float* out2) {
  __shared__ float scratch[64];
  float a = x[blockIdx.x * blockDim.x + threadIdx.x], b = a * a;
  genext::cuda::block_sum2(a, b, scratch);
  if (threadIdx.x == 0) {
    out[blockIdx.x] = a;
    out2[blockIdx.x] = b;
  }
}

// Each thread writes its slot of shared memory and reads its neighbour's, with or without the
// barrier between: without it the neighbour has not written yet.
__global__ void neighbours(int* out, bool barrier) {
  __shared__ int slot[1024];
  const int t = threadIdx.x, n = blockDim.x;
  slot[t] = 1000 * int(blockIdx.x) + t + 1;
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = slot[(t + 1) % n];
  if (barrier) __syncthreads();  // no thread of this block overwrites a slot another still reads
}

// Per thread, five results: shfl_down by 3 and shfl_up by 5 within 16-lane segments, a broadcast
// of lane 7, an xor by 1, and the ballot of odd values.
__global__ void shuffles(const int* x, int* out) {
  const int t = threadIdx.x, v = x[t];
  out[5 * t + 0] = __shfl_down_sync(0xffffffffu, v, 3, 16);
  out[5 * t + 1] = __shfl_up_sync(0xffffffffu, v, 5, 16);
  out[5 * t + 2] = __shfl_sync(0xffffffffu, v, 7);
  out[5 * t + 3] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[5 * t + 4] = int(__ballot_sync(0xffffffffu, v & 1));
}

// Threads past `live` return at once; the others meet at a barrier (returned threads count as
// arrived) and sum through shared memory.
__global__ void early_exit(int* out, int live) {
  __shared__ int slot[1024];
  const int t = threadIdx.x;
  if (t >= live) return;
  slot[t] = t;
  __syncthreads();
  if (t == 0) {
    int s = 0;
    for (int i = 0; i < live; ++i) s += slot[i];
    out[blockIdx.x] = s;
  }
}

// Lane 0 alone calls a shuffle whose mask names the whole warp: a deadlock.
__global__ void lone_shuffle(int* out) {
  if (threadIdx.x == 0) out[0] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

// hist[x[i] % bins] += 1 with atomics, from every block.
__global__ void histogram(const int* x, int n, int* hist, int bins) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(hist + x[i] % bins, 1);
}

// Dynamic shared memory: the block's values reversed through it.
__global__ void reverse(const float* x, float* out) {
  extern __shared__ float buf[];
  const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  buf[t] = x[base + t];
  __syncthreads();
  out[base + t] = buf[n - 1 - t];
}

// Warp operations on partial masks: lanes 1 and 2 meet under 0x6 (others do not take part); lanes
// 0 and 1 swap 7 and 17 through shared memory under 0x3; lanes 4-7 sum 10 x lane by shuffles
// under 0xF0. Other lanes write 0.
__global__ void partial_masks(int* out) {
  __shared__ int slot[2];
  const int lane = threadIdx.x;
  int r = 0;
  if (lane == 1 || lane == 2) __syncwarp(0x6u);
  if (lane < 2) {
    slot[lane] = lane == 0 ? 7 : 17;
    __syncwarp(0x3u);
    r = slot[1 - lane];
  }
  if (lane >= 4 && lane < 8) {
    int v = 10 * lane;
    v += __shfl_xor_sync(0xF0u, v, 1);
    v += __shfl_xor_sync(0xF0u, v, 2);
    r = v;
  }
  out[lane] = r;
}

CudaStatus launch_partial_masks(int* out) {
  partial_masks<<<1, 32>>>(out);
  GENEXT_LAUNCH_CHECK();
  return {};
}

// out[i] = i for i <= last: one past the end of an n-element out when last = n.
__global__ void fill_to(float* out, int last) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= last) out[i] = float(i);
}

CudaStatus launch_fill_to(float* out, int last) {
  fill_to<<<(last + 64) / 64, 64>>>(out, last);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_block_sums(const float* x, float* out, float* out2, int blocks, int threads) {
  block_sums<<<blocks, threads, 0, nullptr>>>(x, out, out2);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_neighbours(int* out, int blocks, int threads, bool barrier) {
  neighbours<<<blocks, threads>>>(out, barrier);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_shuffles(const int* x, int* out, int threads) {
  shuffles<<<1, threads>>>(x, out);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_early_exit(int* out, int blocks, int threads, int live) {
  early_exit<<<blocks, threads>>>(out, live);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_lone_shuffle(int* out) {
  lone_shuffle<<<1, 32>>>(out);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_histogram(const int* x, int n, int* hist, int bins) {
  if (n > 0) histogram<<<(n + 127) / 128, 128>>>(x, n, hist, bins);
  GENEXT_LAUNCH_CHECK();
  return {};
}
CudaStatus launch_reverse(const float* x, float* out, int blocks, int threads) {
  reverse<<<blocks, threads, threads * sizeof(float), nullptr>>>(x, out);
  GENEXT_LAUNCH_CHECK();
  return {};
}

}  // namespace genext::emu_selftest
