// The largest head dim the CUDA attention kernels take (plain C++, no CUDA or torch header, so the
// module can report it to Python as genext._C.cuda_max_head_dim): the largest flash-attention
// head-dim tile, the 8 values per lane of the fp32 flash kernels (8 x 32 lanes) and the largest
// KV-cache instance. The kernels static_assert against it.
#pragma once

namespace genext {

inline constexpr int kCudaMaxHeadDim = 256;

}  // namespace genext
