// Picks the kernel for a flash-attention call: fp32 -> the plain fp32 kernels; fp16/bf16 -> the
// tensor-core kernels of the smallest compiled head-dim tile >= D. Which tiles exist is decided at
// build time (GENEXT_FA_HEAD_DIMS; CMake defines GENEXT_FA_HDIM_<n> for each); the instantiations
// themselves live in instances/*.cu, so this file only declares them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "common/cuda_dispatch.cuh"
#include "flash_attention/flash_attention.h"

namespace genext::fa {

template <typename T, int kD>
CudaStatus launch_fwd(const FwdParams& p, cudaStream_t stream);
template <typename T, int kD>
CudaStatus launch_bwd(const BwdParams& p, cudaStream_t stream);
CudaStatus flash_fwd_fp32(const FwdParams& p, cudaStream_t stream);
CudaStatus flash_bwd_fp32(const BwdParams& p, cudaStream_t stream);

// X(n) for every head-dim tile compiled into this build, smallest first.
#define GENEXT_FA_TILE(n) X(n)
#if defined(GENEXT_FA_HDIM_32)
#define GENEXT_FA_T32 GENEXT_FA_TILE(32)
#else
#define GENEXT_FA_T32
#endif
#if defined(GENEXT_FA_HDIM_64)
#define GENEXT_FA_T64 GENEXT_FA_TILE(64)
#else
#define GENEXT_FA_T64
#endif
#if defined(GENEXT_FA_HDIM_96)
#define GENEXT_FA_T96 GENEXT_FA_TILE(96)
#else
#define GENEXT_FA_T96
#endif
#if defined(GENEXT_FA_HDIM_128)
#define GENEXT_FA_T128 GENEXT_FA_TILE(128)
#else
#define GENEXT_FA_T128
#endif
#if defined(GENEXT_FA_HDIM_160)
#define GENEXT_FA_T160 GENEXT_FA_TILE(160)
#else
#define GENEXT_FA_T160
#endif
#if defined(GENEXT_FA_HDIM_192)
#define GENEXT_FA_T192 GENEXT_FA_TILE(192)
#else
#define GENEXT_FA_T192
#endif
#if defined(GENEXT_FA_HDIM_224)
#define GENEXT_FA_T224 GENEXT_FA_TILE(224)
#else
#define GENEXT_FA_T224
#endif
#if defined(GENEXT_FA_HDIM_256)
#define GENEXT_FA_T256 GENEXT_FA_TILE(256)
#else
#define GENEXT_FA_T256
#endif
#define GENEXT_FA_FOR_EACH_TILE \
  GENEXT_FA_T32 GENEXT_FA_T64 GENEXT_FA_T96 GENEXT_FA_T128 GENEXT_FA_T160 GENEXT_FA_T192 \
  GENEXT_FA_T224 GENEXT_FA_T256

int compiled_head_dim_tile(int D) {
#define X(n) \
  if (D <= n) return n;
  GENEXT_FA_FOR_EACH_TILE
#undef X
  return 0;
}

const char* compiled_head_dim_tiles() {
  static const char* const names = ""
#define X(n) " " #n
      GENEXT_FA_FOR_EACH_TILE
#undef X
      ;
  return names[0] == ' ' ? names + 1 : names;
}

CudaStatus flash_fwd(const FwdParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&]<typename T>() -> CudaStatus {
    if constexpr (std::is_same_v<T, float>) {
      return flash_fwd_fp32(p, stream);
    } else {
      switch (compiled_head_dim_tile(p.D)) {
#define X(n) \
  case n: return launch_fwd<T, n>(p, stream);
        GENEXT_FA_FOR_EACH_TILE
#undef X
        default: return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
      }
    }
  });
}

CudaStatus flash_bwd(const BwdParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&]<typename T>() -> CudaStatus {
    if constexpr (std::is_same_v<T, float>) {
      return flash_bwd_fp32(p, stream);
    } else {
      switch (compiled_head_dim_tile(p.D)) {
#define X(n) \
  case n: return launch_bwd<T, n>(p, stream);
        GENEXT_FA_FOR_EACH_TILE
#undef X
        default: return GENEXT_CUDA_STATUS(cudaErrorInvalidValue);
      }
    }
  });
}

}  // namespace genext::fa
