// A persistent pool of worker threads for genext::cpu::parallel_for (cpu_parallel.h).
//
// The calling thread publishes a job and takes chunks of it itself; workers that wake in time
// help. When the chunks run out the caller waits only for the workers that joined the job, never
// for one the OS has not scheduled yet (an OpenMP team's closing barrier waits for every thread,
// which costs a scheduler slice per call while another process holds a core). The protocol is
// described in cpu_pool.cpp.
#pragma once
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

// Whether parallel_for uses the pool (default) or an OpenMP team (at::parallel_for), whose closing
// barrier waits for every thread: a switch for tests and benchmarks that compare the two.
bool pool_enabled() noexcept;
void set_pool_enabled(bool on) noexcept;

}  // namespace genext::cpu
