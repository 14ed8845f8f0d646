// at::ScalarType -> C++ types for the CPU kernels: the one switch over the dtypes the CPU ops take.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

namespace genext {

// Calls f.template operator()<S, T>() with S the tensor's element type and T the type the kernel
// computes in: float for float32, float16 and bfloat16 (16-bit data is widened), double for
// float64, e.g.
//   dispatch_cpu_dtype(op, x.scalar_type(), [&]<class S, class T>() { run<S, T>(...); });
// kDouble = false for an op without a float64 kernel. Any other dtype raises a TypeError naming op
// (the ops check dtypes with a fuller message first).
template <bool kDouble = true, class F>
void dispatch_cpu_dtype(const char* op, c10::ScalarType t, F&& f) {
  switch (t) {
    case c10::ScalarType::Float: f.template operator()<float, float>(); return;
    case c10::ScalarType::Half: f.template operator()<c10::Half, float>(); return;
    case c10::ScalarType::BFloat16: f.template operator()<c10::BFloat16, float>(); return;
    case c10::ScalarType::Double:
      if constexpr (kDouble) {
        f.template operator()<double, double>();
        return;
      }
      break;
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": no CPU kernel for dtype ", t);
}

}  // namespace genext
