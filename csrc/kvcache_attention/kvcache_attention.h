// attention_with_kvcache CUDA launchers: plain C++, no torch. The binding
// (kvcache_attention_cuda.cpp) checks tensors, allocates outputs and the split workspace, and
// calls kvcache_attention() on the current stream.
//
// Work split ("flash-decoding"): the keys of each sequence are cut into num_splits ranges of
// keys_per_split; one block per (split, kv head x row chunk, sequence) reads its range of K and V
// once for every query row of the kv head's group (up to kMaxRows rows per block), and a second
// kernel merges the splits by their log-sum-exp. num_splits and keys_per_split depend on the
// cache capacity and the GPU, never on cache_seqlens, so a launch can be captured in a CUDA graph
// and replayed with other lengths.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/cuda_status.h"
#include "common/dtype.h"

namespace genext::kv {

constexpr int kMaxRows = 16;      // query rows (group heads x Lq) per block
constexpr int kKeysPerTile = 64;  // keys per shared-memory tile

struct Strides {
  int64_t batch = 0, row = 0, head = 0;  // in elements; for a paged cache batch = block, row = slot
};

struct Params {
  DType dtype = DType::kFloat16;
  const void* q = nullptr;  // (B, Lq, Hq, D)
  void* k_cache = nullptr;  // (B, Lmax, Hk, D) or paged (num_blocks, block_size, Hk, D)
  void* v_cache = nullptr;
  const void* k_new = nullptr;  // (B, Lq, Hk, D) or null
  const void* v_new = nullptr;
  Strides sq, skc, svc, skn, svn;
  const int* seqlens = nullptr;      // (B,) tokens cached before this call
  const int* block_table = nullptr;  // (B, max_blocks) or null
  int64_t bt_stride = 0;             // elements between block_table rows
  int block_size = 0, num_blocks = 0;
  void* out = nullptr;        // (B, Lq, Hq, D) contiguous
  float* lse = nullptr;       // (B, Hq, Lq) contiguous, natural log
  float* part_o = nullptr;    // workspace: (num_splits, B, Hq, Lq, D) float
  float* part_lse = nullptr;  // workspace: (num_splits, B, Hq, Lq) float, base 2
  int B = 0, Lq = 0, Hq = 0, Hk = 0, D = 0;
  int capacity = 0;  // keys a sequence can hold
  int num_splits = 1, keys_per_split = 0, row_chunks = 1;
  float scale = 1.f;
  bool causal = true;
};

// Fills num_splits, keys_per_split and row_chunks from the shape, the capacity and the SM count.
void plan_splits(Params& p, int num_sms);

CudaStatus kvcache_attention(const Params& p, cudaStream_t stream);

}  // namespace genext::kv
