// Device names for error messages, built here rather than by streaming c10::Device/DeviceType:
// on the GPU machine (torch 2.11) a TORCH_CHECK message that streamed q.device().type() crashed
// the process (segfault) instead of raising, while messages without it raised normally.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

namespace genext {

inline std::string device_name(const at::Tensor& t) {
  const c10::Device d = t.device();
  std::string s;
  switch (d.type()) {
    case c10::DeviceType::CPU: s = "cpu"; break;
    case c10::DeviceType::CUDA: s = "cuda"; break;
    case c10::DeviceType::Meta: s = "meta"; break;
    default: s = "device type " + std::to_string(static_cast<int>(d.type())); break;
  }
  if (d.has_index()) s += ":" + std::to_string(static_cast<int>(d.index()));
  return s;
}

// "cpu" or "cuda": the device type alone.
inline std::string device_type_name(const at::Tensor& t) {
  std::string s = device_name(t);
  const auto colon = s.find(':');
  return colon == std::string::npos ? s : s.substr(0, colon);
}

}  // namespace genext
