// genext._C: importing it registers the ops (static initialisers in this library); the Python
// module itself only reports plain build facts to genext.build_info().
#include <c10/util/Exception.h>
#include <c10/util/ParallelGuard.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "common/cpu_parallel.h"
#include "common/cpu_simd.h"
#include "common/head_dim.h"
#include "contrastive/bf16_gemm_cpu.h"
#include "flash_attention/cpu_routing.h"
#include "kvcache_attention/kvcache_avx512_cpu.h"

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
  // which of the CPU kernels' per-ISA versions this machine runs (chosen at load)
  const int level = genext::simd::cpu_level_detected();
  m.attr("cpu_isa") = level == 4          ? "x86-64-v4 (AVX-512)"
                      : level == 3        ? "x86-64-v3 (AVX2, FMA)"
                      : GENEXT_CPU_LEVELS ? "x86-64 baseline (SSE2)"
                                          : "generic (no per-ISA versions)";
  // the level of the explicit per-level CPU routines (cpu_simd.h), and a cap on it for tests
  m.def("_cpu_level", [] { return genext::simd::cpu_level(); });
  m.def("_cpu_set_level_cap", [](int cap) {
    TORCH_CHECK_VALUE(cap == 0 || cap == 3 || cap == 4, "_cpu_set_level_cap: 0, 3 or 4, got ", cap);
    genext::simd::cpu_level_cap().store(cap);
  });
  // the CPU attention routing rule (genext.ops.flash_attention.cpu_forward_prefers_torch)
  genext::attention::add_cpu_routing(m.ptr());
  // the largest head dim of the CUDA attention kernels, for Python's choice of kernel
  m.attr("cuda_max_head_dim") = genext::kCudaMaxHeadDim;
  // how many times a CPU kernel has woken an intra-op thread team (tests: small inputs never do)
  m.def("_cpu_team_launches", [] { return genext::cpu::team_launches().load(); });
  // how parallel_for runs its teams: "auto" (default), "pool" or "openmp" (cpu_pool.h TeamMode)
  m.def("_cpu_team_mode", [] {
    const auto mode = genext::cpu::team_mode();
    return mode == genext::cpu::TeamMode::kAuto   ? "auto"
           : mode == genext::cpu::TeamMode::kPool ? "pool"
                                                  : "openmp";
  });
  m.def("_cpu_set_team_mode", [](const std::string& mode) {
    using genext::cpu::TeamMode;
    TORCH_CHECK_VALUE(mode == "auto" || mode == "pool" || mode == "openmp",
                      "_cpu_set_team_mode: 'auto', 'pool' or 'openmp', got '", mode, "'");
    genext::cpu::set_team_mode(mode == "auto"   ? TeamMode::kAuto
                               : mode == "pool" ? TeamMode::kPool
                                                : TeamMode::kOpenMP);
  });
  // whether the next team is genext's pool (kAuto after a team waited for a descheduled thread)
  m.def("_cpu_next_team_is_pool", [] { return genext::cpu::use_pool(); });
  // the CPU decode kernel's bfloat16 path: (this CPU has AVX512-BF16 for the in-place routines,
  // they are in use); tests switch them off to check the widening path on the same machine
  m.def("_cpu_kv_bf16_dot", [] {
    return std::make_tuple(genext::kv::bf16_dot_supported(), genext::kv::bf16_dot_enabled());
  });
  // the CPU contrastive kernels' bfloat16 products (bf16_gemm_cpu.h): (MKL's bfloat16 GEMM and
  // AMX-BF16 are there, they are in use)
  m.def("_cpu_contrastive_bf16_gemm", [] {
    using namespace genext::contrastive::cpu;
    return std::make_tuple(bf16_gemm_supported(), bf16_gemm_enabled());
  });
  m.def("_cpu_set_contrastive_bf16_gemm", [](bool on) {
    using namespace genext::contrastive::cpu;
    TORCH_CHECK_VALUE(!on || bf16_gemm_supported(),
                      "_cpu_set_contrastive_bf16_gemm: no AMX-BF16 or no MKL bfloat16 GEMM here");
    set_bf16_gemm_enabled(on);
  });
  m.def("_cpu_set_kv_bf16_dot", [](bool on) {
    TORCH_CHECK_VALUE(!on || genext::kv::bf16_dot_supported(),
                      "_cpu_set_kv_bf16_dot: this CPU has no AVX512-BF16");
    genext::kv::set_bf16_dot_enabled(on);
  });
  // the CPU decode kernel's AMX scores: (this CPU and OS run AMX-BF16 tiles, they are in use);
  // tests switch them off to check the vdpbf16ps scores on the same machine
  m.def("_cpu_kv_amx",
        [] { return std::make_tuple(genext::kv::amx_supported(), genext::kv::amx_enabled()); });
  m.def("_cpu_set_kv_amx", [](bool on) {
    TORCH_CHECK_VALUE(!on || genext::kv::amx_supported(),
                      "_cpu_set_kv_amx: no AMX-BF16 here (CPU or OS)");
    genext::kv::set_amx_enabled(on);
  });
  // how many times the automatic choice has moved to the pool
  m.def("_cpu_pool_spells", [] { return genext::cpu::pool_spells().load(); });
  // the automatic choice's state: (ms left of the current spell on the pool, the spell's length
  // in ms), and a report of an OpenMP team's waits as parallel_for makes it (tests drive the
  // choice with these)
  m.def("_cpu_auto_pool_state", [] {
    const auto s = genext::cpu::auto_pool_state();
    return std::make_tuple(double(s.left_ns) * 1e-6, double(s.hold_ns) * 1e-6);
  });
  m.def("_cpu_note_team_wait", [](double wait_ms, double work_ms) {
    genext::cpu::note_team_wait(int64_t(wait_ms * 1e6), int64_t(work_ms * 1e6));
  });
  // Test of the thread pool itself (tests/ops/test_cpu_threads.py): parallel_for over [0, n) whose
  // items each spin for ns_per_item nanoseconds and then try a nested parallel_for (which must
  // run inline); item throw_at (if in range) raises. mode is a sum of flags: 1, item 0 waits (up
  // to 2 s, then goes on) until a thread other than its own has started a chunk; 2, a chunk that
  // runs on a thread other than the caller raises ValueError. Returns (every item ran exactly
  // once, team launches during the call, the most threads at::get_num_threads() gave inside a
  // chunk: ATen ops called there must not start teams of their own, how many distinct threads
  // ran chunks, whether every chunk ran inside a parallel region as ATen marks it).
  m.def(
      "_cpu_parallel_for_check",
      [](int64_t n, double ns_per_item, int64_t throw_at, int mode) {
        constexpr int kWaitForHelper = 1, kThrowOffCaller = 2;
        pybind11::gil_scoped_release no_gil;
        std::vector<std::atomic<int>> hits(size_t(std::max<int64_t>(n, 0)));
        std::atomic<int> aten_threads{0};
        std::atomic<bool> in_region{true};
        std::mutex threads_mutex;
        std::set<std::thread::id> threads;
        const auto caller = std::this_thread::get_id();
        const auto thread_count = [&] {
          const std::lock_guard<std::mutex> lock(threads_mutex);
          return threads.size();
        };
        const int64_t launches = genext::cpu::team_launches().load();
        genext::cpu::parallel_for(0, n, ns_per_item, [&](int64_t b, int64_t e) {
          {
            const std::lock_guard<std::mutex> lock(threads_mutex);
            threads.insert(std::this_thread::get_id());
          }
          if (!c10::ParallelGuard::is_enabled()) in_region.store(false);
          TORCH_CHECK_VALUE(!(mode & kThrowOffCaller) || std::this_thread::get_id() == caller,
                            "_cpu_parallel_for_check: a chunk raised on a pool worker");
          const int t = at::get_num_threads();
          int seen = aten_threads.load();
          while (t > seen && !aten_threads.compare_exchange_weak(seen, t)) {
          }
          for (int64_t i = b; i < e; ++i) {
            TORCH_CHECK(i != throw_at, "_cpu_parallel_for_check: item ", i, " raised");
            if (i == 0 && (mode & kWaitForHelper)) {
              const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(2);
              while (thread_count() < 2 && std::chrono::steady_clock::now() < give_up) {
                std::this_thread::yield();
              }
            }
            const auto until =
                std::chrono::steady_clock::now() + std::chrono::nanoseconds(int64_t(ns_per_item));
            while (std::chrono::steady_clock::now() < until) {
            }
            hits[size_t(i)].fetch_add(1);
          }
          genext::cpu::parallel_for(0, 1 << 20, 1e3, [](int64_t, int64_t) {});
        });
        bool once = true;
        for (const auto& h : hits) once = once && h.load() == 1;
        return std::make_tuple(once, genext::cpu::team_launches().load() - launches,
                               aten_threads.load(), int64_t(thread_count()), in_region.load());
      },
      pybind11::arg("n"), pybind11::arg("ns_per_item"), pybind11::arg("throw_at"),
      pybind11::arg("mode") = 0);
#ifdef __VERSION__
  m.attr("compiler") = __VERSION__;
#endif
}
