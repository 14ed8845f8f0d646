// Host-side CUDA device facts shared by the bindings (host C++, light headers only).
#pragma once
#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>

#include "common/cuda_check.h"

namespace genext {

// Multiprocessor count of a device, looked up once per device. `op` names the caller in errors.
inline int num_sms(c10::DeviceIndex dev, const char* op) {
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = dev >= 0 && dev < static_cast<c10::DeviceIndex>(cache.size());
  if (cached) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  GENEXT_CHECK_CUDA(op, cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  if (cached) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

}  // namespace genext
