// Thread teams for the CPU kernels, sized from the amount of work.
//
// Waking an intra-op thread team costs microseconds on an idle machine, but when another process
// holds one of the cores the team's barrier waits for its descheduled thread for a whole scheduler
// slice (milliseconds). So work one core finishes in tens of microseconds runs on the calling
// thread: a team is woken only when each of its threads gets at least min_thread_ns() of work
// (25 us, or 50 us whenever the team would be genext's pool: in a spell the automatic choice
// starts after seeing such waits, in a forked child, and when the pool is forced).
// The team is an OpenMP team or genext's own pool (cpu_pool.h, TeamMode). In the pool the calling
// thread and the workers that wake in time take chunks of the range from a shared counter, and
// the caller waits only for workers that joined, so a worker the OS has not scheduled yet costs
// nothing and a thread that runs on a busy core does less of the work instead of making all
// others wait for it.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>

#include "common/cpu_pool.h"

namespace genext::cpu {

// The least work, in nanoseconds of one core, worth a thread of its own: kMinThreadNsQuiet while
// the automatic team choice runs OpenMP teams (TeamMode::kAuto outside a spell on the pool,
// cpu_pool.h), kMinThreadNs during such a spell, in a forked child and in the forced modes. An
// OpenMP team on a quiet machine, whose threads PyTorch's own ops keep spinning, joins within
// microseconds, so jobs of a few tens of microseconds already gain from it.
inline constexpr double kMinThreadNs = 50'000.0;
inline constexpr double kMinThreadNsQuiet = 25'000.0;
static_assert(kMinThreadNsQuiet <= kMinThreadNs, "threads_for's early return assumes this");

inline double min_thread_ns() noexcept {
  return team_mode() == TeamMode::kAuto && !auto_uses_pool() ? kMinThreadNsQuiet : kMinThreadNs;
}

// How many times a kernel has started a job on the thread pool (for tests: small inputs must not).
inline std::atomic<int64_t>& team_launches() {
  static std::atomic<int64_t> n{0};
  return n;
}

// The number of threads worth using for n items of ns_per_item nanoseconds each (at least 1); 1
// inside a pool task or an OpenMP/ATen parallel region (no nested teams).
inline int64_t threads_for(int64_t n, double ns_per_item) {
  if (n <= 1 || in_pool_task() || at::in_parallel_region()) return 1;
  const double work = double(n) * std::max(ns_per_item, 0.0);
  if (work < 2 * kMinThreadNsQuiet) return 1;  // one thread whatever the mode (no clock read)
  const int64_t worth = int64_t(std::min<double>(double(n), std::floor(work / min_thread_ns())));
  return std::clamp<int64_t>(worth, 1, at::get_num_threads());
}

// Calls f(b, e) on disjoint sub-ranges covering [begin, end), each at least min_chunk items long
// (the last may be shorter). One call on the calling thread when the work (n items of ns_per_item
// each) is too small for a second thread, or when the pool is running another thread's job;
// otherwise the calling thread and the team's other threads take chunks of about an eighth of a
// thread's share in turn. f may run several times on one thread and must not rely on which thread
// runs which sub-range. An exception from f is rethrown here after every other chunk finished.
template <class F>
void parallel_for(int64_t begin, int64_t end, double ns_per_item, const F& f,
                  int64_t min_chunk = 1) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int64_t threads = threads_for(n, ns_per_item);
  if (threads < 2) {
    f(begin, end);
    return;
  }
  const int64_t chunk = std::max<int64_t>({1, min_chunk, n / (threads * 8)});
  if (!use_pool()) {  // an OpenMP team (see TeamMode in cpu_pool.h)
    team_launches().fetch_add(1, std::memory_order_relaxed);
    using clock = std::chrono::steady_clock;
    const clock::time_point start = clock::now();
    clock::time_point caller_in = start, caller_done = start;
    std::atomic<int64_t> next{begin};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      const bool caller = at::get_thread_num() == 0;  // the calling thread
      if (caller) caller_in = clock::now();
      for (;;) {
        const int64_t b = next.fetch_add(chunk, std::memory_order_relaxed);
        if (b >= end) break;
        f(b, std::min(end, b + chunk));
      }
      if (caller) caller_done = clock::now();
    });
    const auto ns = [](clock::duration d) {
      return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
    };
    // The team can keep the caller waiting at both ends: libgomp's team start waits until every
    // thread of the previous region (often a PyTorch op's) has docked, and the closing barrier
    // waits for the last thread; either is a scheduler slice when that thread sits descheduled.
    if (team_mode() == TeamMode::kAuto)
      note_team_wait(ns(caller_in - start) + ns(clock::now() - caller_done),
                     ns(caller_done - caller_in));
    return;
  }
  const ChunkFn call = [](const void* ctx, int64_t b, int64_t e) {
    (*static_cast<const F*>(ctx))(b, e);
  };
  if (!run_in_pool(begin, end, chunk, int(threads - 1), call, &f)) f(begin, end);
}

}  // namespace genext::cpu
