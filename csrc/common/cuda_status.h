// What a CUDA launcher returns: the first CUDA error it met and where in the source (file and
// line), or success. Plain C++ with no torch header, so the .cu files and their launcher headers
// use it; the bindings raise on a failure with check_cuda (common/cuda_check.h), which adds the
// op's name.
#pragma once
#include <cuda_runtime_api.h>

namespace genext {

struct [[nodiscard]] CudaStatus {
  cudaError_t err = cudaSuccess;
  const char* file = "";
  int line = 0;
  constexpr bool ok() const { return err == cudaSuccess; }
};

}  // namespace genext

// The status of a CUDA runtime call (or of an error code), located at this file and line.
#define GENEXT_CUDA_STATUS(expr) (::genext::CudaStatus{(expr), __FILE__, __LINE__})

// Returns from the enclosing launcher, with its location, when a CUDA runtime call fails.
#define GENEXT_CUDA_TRY(expr)                                                                      \
  do {                                                                                             \
    const ::genext::CudaStatus genext_status_ = GENEXT_CUDA_STATUS(expr);                          \
    if (!genext_status_.ok()) return genext_status_;                                               \
  } while (0)

// Follows every kernel launch: returns the launch's error, if any, with this line.
#define GENEXT_LAUNCH_CHECK() GENEXT_CUDA_TRY(cudaGetLastError())
