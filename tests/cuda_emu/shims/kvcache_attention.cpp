// The KV-cache decode launcher on CPU tensors, under the emulation: the CUDA binding's checks and
// set-up (kvcache_checks.h, kvcache_calls.h) with a given multiprocessor count (it plans the key
// splits), then kvcache_attention from kvcache_attention.cu compiled for the host. The outputs and
// the split workspace the kernels write are guarded buffers (emu::Guarded) filled with NaN first,
// so that an element no kernel writes shows; the caller passes guarded inputs
// (tests/cuda_emu/guard.py).
#include "kvcache_attention/kvcache_attention.h"

#include <torch/extension.h>

#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "common/head_dim.h"
#include "emu/cuda_emu.h"
#include "kvcache_attention/kvcache_calls.h"
#include "kvcache_attention/kvcache_checks.h"

namespace {

using namespace genext::kv;

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, at::Tensor k_cache, at::Tensor v_cache,
                                       const at::Tensor& cache_seqlens,
                                       const std::optional<at::Tensor>& k_new,
                                       const std::optional<at::Tensor>& v_new,
                                       const std::optional<at::Tensor>& block_table, double scale,
                                       bool causal, int num_sms) {
  const char* op = "attention_with_kvcache";
  const Problem pr = check_problem(op, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                   block_table, /*allow_double=*/false, genext::kCudaMaxHeadDim);
  check_cuda_sizes(op, pr);
  return fwd_run(
      op, pr, q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, scale, causal,
      [=] { return num_sms; },
      [](const Params& given) {
        Params p = given;
        const size_t es = p.dtype == genext::DType::kFloat32 ? 4 : 2;
        const size_t rows = size_t(p.B) * p.Hq * p.Lq;
        emu::Guarded out(rows * p.D * es), lse(rows * 4);
        emu::Guarded part_o(size_t(p.num_splits) * rows * p.D * 4);
        emu::Guarded part_lse(size_t(p.num_splits) * rows * 4);
        for (emu::Guarded* g : {&out, &lse, &part_o, &part_lse}) g->poison();
        void* const out_dst = p.out;
        float* const lse_dst = p.lse;
        p.out = out.get();
        p.lse = static_cast<float*>(lse.get());
        p.part_o = static_cast<float*>(part_o.get());
        p.part_lse = static_cast<float*>(part_lse.get());
        const genext::CudaStatus st = kvcache_attention(p, nullptr);
        TORCH_CHECK(st.ok(), "kvcache_attention (emulated) returned error ", int(st.err), " at ",
                    st.file, ":", st.line);
        out.copy_to(out_dst);
        lse.copy_to(lse_dst);
      });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("attention_with_kvcache", &fwd); }
