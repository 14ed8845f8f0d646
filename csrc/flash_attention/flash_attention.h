// Flash-attention CUDA launchers: plain C++, no torch. The binding (flash_attention_cuda.cpp)
// checks tensors, allocates outputs and workspace, and calls these on the current stream.
//
// Tensors are (B, L, H, D) views with the last dim contiguous; strides are in elements. With
// cu_seqlens (varlen) the batch dim is 1 and sequence s owns rows [cu[s], cu[s+1]).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cuda_status.h"
#include "common/dtype.h"

namespace genext::fa {

struct Strides {
  int64_t batch = 0, row = 0, head = 0;
};

struct FwdParams {
  DType dtype = DType::kFloat16;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;   // (B, Lq, Hq, D) contiguous
  float* lse = nullptr;  // (B, Hq, Lq) contiguous; for varlen (1, Hq, total_q)
  Strides sq, sk, sv, so;
  int64_t lse_batch = 0, lse_head = 0;  // strides of lse
  const int* cu_q = nullptr;            // (batch + 1,) or null
  const int* cu_k = nullptr;
  const int* seqused_k = nullptr;  // (batch,) or null
  int batch = 0;                   // number of sequences
  int Hq = 0, Hk = 0, D = 0;
  int Lq = 0, Lk = 0;  // per-sequence maxima (grid size); exact lengths when not varlen
  float scale = 1.f;
  bool causal = false;
  bool bottom_right = true;  // causal diagonal offset len_k - len_q (else 0)
};

struct BwdParams : FwdParams {
  const void* dout = nullptr;  // read like out, with its own strides
  Strides sdo;
  void* dq = nullptr;  // contiguous, like q / k / v
  void* dk = nullptr;
  void* dv = nullptr;
  Strides sdq, sdk, sdv;
  float* delta = nullptr;  // workspace laid out like lse: rowsum(dout * out)
  // fp32 workspace like q, zeroed (16-bit kernels only): when set, the dK/dV kernel adds each
  // block's dS K into it with atomics and a last pass writes dq from it (order varies run to
  // run); when null, dQ has its own deterministic kernel.
  float* dq_accum = nullptr;
  Strides sdq_accum;
};

// Smallest compiled head-dim tile >= D for the 16-bit kernels, or 0 when none is compiled.
int compiled_head_dim_tile(int D);
// The compiled head-dim tiles, e.g. "32 64 96 128 160 192 224 256".
const char* compiled_head_dim_tiles();

CudaStatus flash_fwd(const FwdParams& p, cudaStream_t stream);
CudaStatus flash_bwd(const BwdParams& p, cudaStream_t stream);

}  // namespace genext::fa
