// The binding side of CudaStatus (host C++, light headers only): one check that turns a failed
// launcher or CUDA runtime call into a RuntimeError naming the op, the error and the source line.
#pragma once
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstring>

#include "common/cuda_status.h"

namespace genext {

// The path from "csrc/" on (build systems pass absolute paths in __FILE__).
inline const char* source_path(const char* file) {
  const char* s = std::strstr(file, "csrc/");
  return s != nullptr ? s : file;
}

// Raises "<op>: CUDA error <name> (<description>) at csrc/<file>:<line>" unless st is a success.
inline void check_cuda(const char* op, const CudaStatus& st) {
  TORCH_CHECK(st.ok(), op, ": CUDA error ", cudaGetErrorName(st.err), " (",
              cudaGetErrorString(st.err), ") at ", source_path(st.file), ":", st.line);
}

}  // namespace genext

// Checks a CUDA runtime call made by a binding, e.g. GENEXT_CHECK_CUDA(op, cudaGetDevice(&d)).
#define GENEXT_CHECK_CUDA(op, expr) ::genext::check_cuda((op), GENEXT_CUDA_STATUS(expr))
