// A persistent pool of worker threads for genext::cpu::parallel_for (cpu_parallel.h).
//
// The calling thread publishes a job and takes chunks of it itself; workers that wake in time
// help. When the chunks run out the caller waits only for the workers that joined the job, never
// for one the OS has not scheduled yet (an OpenMP team's closing barrier waits for every thread,
// which costs a scheduler slice per call while another process holds a core). The protocol is
// described in cpu_pool.cpp.
#pragma once
#include <atomic>
#include <cstdint>

namespace genext::cpu {

// Runs one chunk [b, e) of a job: ctx is the caller's function object.
using ChunkFn = void (*)(const void* ctx, int64_t b, int64_t e);

// True on a pool worker, and on a calling thread while it runs chunks of its job: kernels called
// there run on that thread alone (no nested team).
bool in_pool_task() noexcept;

// Calls fn(ctx, b, e) on the chunks [b, min(b + chunk, end)) of [begin, end), on the calling
// thread and on up to `helpers` pool workers, and returns after every chunk ran; counts a team
// launch. The first exception a chunk throws (on any thread) is rethrown here once the job has
// finished; later chunks may not run. Returns false, running nothing, when the pool is already
// running another thread's job: the caller then runs the range itself.
bool run_in_pool(int64_t begin, int64_t end, int64_t chunk, int helpers, ChunkFn fn,
                 const void* ctx);

// How parallel_for runs a team. kAuto (the default): an OpenMP team (at::parallel_for, whose
// threads PyTorch's own ops keep warm: on a quiet machine the pool's workers would compete with
// them for the cores) until teams are seen keeping their caller waiting a scheduler slice for a
// descheduled thread (at the team's start or at its closing barrier) twice within a short time;
// then the pool for a spell (longer each time the load is still there when a spell ends) before
// trying a team again. A forked child always uses the pool (an OpenMP team is not fork-safe).
// kPool and kOpenMP force one (tests and benchmarks that compare the two).
enum class TeamMode : int { kOpenMP = 0, kPool = 1, kAuto = 2 };
TeamMode team_mode() noexcept;
void set_team_mode(TeamMode mode) noexcept;

// kAuto's state: whether the next team is the pool, and the report of an OpenMP team (how long
// the calling thread waited for the team, at its start and at its closing barrier, and how long
// it ran chunks in between).
bool auto_uses_pool() noexcept;
void note_team_wait(int64_t wait_ns, int64_t work_ns) noexcept;

// For tests: how long the current spell on the pool has left (0 when none), and the length of
// the latest spell (the next one's, if the load is still there when this one ends, is twice it).
struct AutoPoolState {
  int64_t left_ns;
  int64_t hold_ns;
};
AutoPoolState auto_pool_state() noexcept;

// How many times kAuto has moved to the pool (tests and benchmarks).
inline std::atomic<int64_t>& pool_spells() {
  static std::atomic<int64_t> n{0};
  return n;
}

// The pool when forced or when kAuto chose it.
inline bool use_pool() noexcept {
  const TeamMode m = team_mode();
  return m == TeamMode::kPool || (m == TeamMode::kAuto && auto_uses_pool());
}

}  // namespace genext::cpu
