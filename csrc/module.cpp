// genext._C: importing it registers the ops (static initialisers in this library); the Python
// module itself only reports plain build facts to genext.build_info().
#include <pybind11/pybind11.h>

#include "common/cpu_parallel.h"
#include "common/head_dim.h"

#ifndef GENEXT_CUDA_ARCHS
#define GENEXT_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "genext compiled ops (registered as torch.ops.genext.*)";
  m.attr("version") = GENEXT_VERSION;
  m.attr("torch_version") = GENEXT_TORCH_VERSION;  // the torch genext was compiled against
#ifdef GENEXT_WITH_CUDA
  m.attr("cuda") = true;
#else
  m.attr("cuda") = false;
#endif
  m.attr("cuda_archs") = GENEXT_CUDA_ARCHS;
  // the largest head dim of the CUDA attention kernels, for Python's choice of kernel
  m.attr("cuda_max_head_dim") = genext::kCudaMaxHeadDim;
  // how many times a CPU kernel has woken an intra-op thread team (tests: small inputs never do)
  m.def("_cpu_team_launches", [] { return genext::cpu::team_launches().load(); });
#ifdef __VERSION__
  m.attr("compiler") = __VERSION__;
#endif
}
