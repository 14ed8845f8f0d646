// The worker pool behind genext::cpu::parallel_for.
//
// Protocol. One 64-bit word, `state`, holds {generation (bits 32-63), open flag (bit 31), helpers
// wanted (bits 16-30), helpers joined (bits 0-15)}. One thread at a time owns the pool (`busy`,
// taken with an exchange; a second caller runs its range itself rather than wait).
//   Owner: writes the job (fn, ctx, end, chunk, next = begin) into the pool, then stores state =
//     {gen + 1, open, wanted, 0}, bumps `wake` and wakes sleeping workers. It takes chunks from
//     `next` itself until they run out, closes the job (clears the open bit with one fetch_and)
//     and then waits until joined == 0. Only then does it return and release `busy`.
//   Worker: joins with a compare-exchange from a value s it loaded that succeeds only while s is
//     still the state: same generation, open, joined < wanted. Having joined, it reads the job,
//     takes chunks until they run out, and leaves by decrementing joined; the worker that leaves
//     a closed job last bumps `left` and wakes the owner. A worker never rejoins the generation
//     it has left, and touches the job only between joining and leaving.
// Why the owner's stack is safe: the owner returns only after it has seen joined == 0 on a closed
// job, and a closed job cannot be joined (the compare-exchange needs the open bit), so no worker
// is inside the job then or later. A worker that wakes late finds the job closed, or a newer
// generation, and its compare-exchange fails. ABA: the generation grows by one per job, so a
// stale value would need 2^32 jobs between a worker's load and its compare-exchange.
// Visibility: the job's fields are written before the store that opens it; a successful join
// reads that store (or a join or leave after it: one release sequence), so it sees them. A
// chunk's writes and any exception it stored happen before its worker's leave, which the owner
// reads before it returns.
// Lost wake-ups: a worker loads `wake` before it looks at the state, and sleeps only while `wake`
// still holds that value (a futex compare); the owner opens the job before it bumps `wake`, so a
// worker either saw the job or is woken. The owner likewise loads `left` before it re-checks
// joined, and sleeps on `left`. Every access to these words is sequentially consistent, except
// the relaxed loads of a poll, which only decide whether to look again.
// Polling: a worker polls briefly after a job it ran (a kernel often starts several jobs in a
// row) and sleeps at once when it finds no job it can join otherwise (a worker beyond the count a
// job wants would spin per job for nothing); the owner polls briefly before sleeping. Then both
// block in the kernel, so neither keeps a core busy on a shared machine or keeps a descheduled
// helper off the owner's core.
// Threads: the pool grows to the most helpers any job wanted (at::get_num_threads() - 1, read per
// call) and a job names how many may join, so a smaller thread count uses fewer of them; workers
// that are not wanted sleep. Once a thread cannot be started the pool stays at the size it has.
// Workers are detached and the pool is never freed, so process exit does not wait for them and a
// late worker never touches freed memory.
// fork(): the child has only the forking thread, so a child handler (registered when the library
// loads, so that no fork can race its registration) drops the pool (leaked) and the child's first
// job starts a fresh one.
#include "common/cpu_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <dlfcn.h>
#include <omp.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <thread>

#include "common/cpu_parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace genext::cpu {
namespace {

constexpr uint64_t kJoinedMask = 0xffff;
constexpr int kWantedShift = 16;
constexpr uint64_t kWantedMask = 0x7fff;
constexpr uint64_t kOpen = uint64_t(1) << 31;
constexpr int kGenShift = 32;
constexpr int kMaxHelpers = int(kWantedMask);

// How long a worker polls for the next job before it sleeps (a kernel often starts several jobs
// in a row, microseconds apart), and how long the owner polls for its last helpers before it
// sleeps (then the OS may run a descheduled helper on the owner's core).
constexpr int64_t kWorkerPollNs = 50'000;
constexpr int64_t kOwnerPollNs = 10'000;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls done() for up to ns nanoseconds; whether it became true.
template <class P>
bool poll_for(int64_t ns, const P& done) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(ns);
  for (;;) {
    for (int i = 0; i < 16; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return false;
  }
}

thread_local bool tl_in_task = false;

struct Pool {
  alignas(64) std::atomic<uint64_t> state{0};
  alignas(64) std::atomic<uint32_t> wake{0};  // bumped per job; sleeping workers wait on it
  alignas(64) std::atomic<uint32_t> left{
      0};                                    // bumped by the last helper out; the owner waits on it
  alignas(64) std::atomic<int64_t> next{0};  // the next chunk's first index
  // The job, written by the owner before it opens the job.
  int64_t end = 0;
  int64_t chunk = 1;
  ChunkFn fn = nullptr;
  const void* ctx = nullptr;
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // the first exception a chunk threw
  // Owner-only.
  alignas(64) std::atomic<bool> busy{false};
  int workers = 0;
  int max_workers = kMaxHelpers;  // lowered to `workers` once a thread cannot be started
};

std::atomic<Pool*> g_pool{nullptr};

std::atomic<bool> g_forked_child{false};

void drop_pool_in_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  g_forked_child.store(true, std::memory_order_relaxed);
}

[[maybe_unused]] const int g_atfork_registered =
    pthread_atfork(nullptr, nullptr, drop_pool_in_child);

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  auto* fresh = new Pool();
  if (g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) return *fresh;
  delete fresh;
  return *p;
}

// MKL's thread-local thread count (MKL_Set_Num_Threads_Local), when torch's MKL exports it.
using MklSetLocal = int (*)(int);
MklSetLocal mkl_set_local() {
  static const MklSetLocal fn = [] {
    void* lib = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
    return reinterpret_cast<MklSetLocal>(
        dlsym(lib != nullptr ? lib : RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
  }();
  return fn;
}

// While a thread runs chunks, ATen ops and BLAS called from them run on that thread alone, as
// they did inside an OpenMP team: at::get_num_threads() (OpenMP's per-thread limit) is 1, so
// at::parallel_for runs inline, and MKL's thread-local count is 1.
class OneAtenThread {
 public:
  OneAtenThread() : omp_prev_(omp_get_max_threads()) {
    omp_set_num_threads(1);
    if (mkl_set_local() != nullptr) mkl_prev_ = mkl_set_local()(1);
  }
  ~OneAtenThread() {
    omp_set_num_threads(omp_prev_);
    if (mkl_set_local() != nullptr) mkl_set_local()(mkl_prev_);
  }
  OneAtenThread(const OneAtenThread&) = delete;
  OneAtenThread& operator=(const OneAtenThread&) = delete;

 private:
  int omp_prev_;
  int mkl_prev_ = 0;
};

// Takes chunks until they run out; records the first exception and stops handing out chunks.
// Chunks run inside a parallel region as ATen's parallel_for marks it (c10::ParallelGuard).
void run_chunks(Pool& p) {
  const c10::ParallelGuard region(true);
  const int64_t end = p.end, chunk = p.chunk;
  try {
    for (;;) {
      const int64_t b = p.next.fetch_add(chunk, std::memory_order_relaxed);
      if (b >= end) break;
      p.fn(p.ctx, b, std::min(end, b + chunk));
    }
  } catch (...) {
    if (!p.failed.exchange(true)) p.error = std::current_exception();
    p.next.store(end, std::memory_order_relaxed);
  }
}

bool joinable(uint64_t s, uint64_t last_gen) {
  return (s & kOpen) != 0 && (s >> kGenShift) != last_gen &&
         (s & kJoinedMask) < ((s >> kWantedShift) & kWantedMask);
}

void worker_main(Pool* p) {
  // Initialise ATen's per-thread thread count now (libtorch's copy of the lazy flag and this
  // library's), so that it does not later overwrite the limit of 1 set below.
  (void)at::get_num_threads();
  at::internal::lazy_init_num_threads();
  const OneAtenThread one_thread;
  tl_in_task = true;
  uint64_t last_gen = 0;
  bool ran = false;  // whether this worker ran the last job: then the next one may follow soon
  for (;;) {
    const uint32_t w = p->wake.load();
    uint64_t s = p->state.load();
    if (joinable(s, last_gen)) {
      if (!p->state.compare_exchange_strong(s, s + 1)) continue;
      last_gen = s >> kGenShift;
      run_chunks(*p);
      const uint64_t old = p->state.fetch_sub(1);
      if ((old & kOpen) == 0 && (old & kJoinedMask) == 1) {
        p->left.fetch_add(1);
        p->left.notify_one();
      }
      ran = true;
      continue;
    }
    // Polls once, after a job it ran; a job it saw but could not join (it had all the helpers it
    // wanted, or had closed) sends it to sleep at once.
    const bool seen = ran && poll_for(kWorkerPollNs, [&] {
                        return p->wake.load(std::memory_order_relaxed) != w ||
                               joinable(p->state.load(std::memory_order_relaxed), last_gen);
                      });
    ran = false;
    if (!seen) p->wake.wait(w);  // sleeps only while wake == w: no job opened since the load
  }
}

// Starts workers until there are `helpers` (owner only); fewer if threads cannot be started
// (std::system_error, std::bad_alloc, ...), and then never tries again.
void grow(Pool& p, int helpers) {
  while (p.workers < std::min(helpers, p.max_workers)) {
    try {
      std::thread(worker_main, &p).detach();
    } catch (...) {
      p.max_workers = p.workers;
      return;
    }
    ++p.workers;
  }
}

// Releases the pool's ownership on every way out of run_in_pool.
class ReleaseBusy {
 public:
  explicit ReleaseBusy(Pool& p) : p_(p) {}
  ~ReleaseBusy() { p_.busy.store(false, std::memory_order_release); }
  ReleaseBusy(const ReleaseBusy&) = delete;
  ReleaseBusy& operator=(const ReleaseBusy&) = delete;

 private:
  Pool& p_;
};

std::atomic<int> g_team_mode{int(TeamMode::kAuto)};
// A wait this long is a scheduler slice, not a wake-up or a last chunk finishing.
constexpr int64_t kSliceWaitNs = 1'000'000;
// Two slice waits this close together (or one this soon after a spell on the pool ended) are
// load that persists, not a single hiccup of the machine.
constexpr int64_t kConfirmNs = 100'000'000;
// How long kAuto stays on the pool: kMinHoldNs after fresh evidence of load, doubled (up to
// kMaxHoldNs) each time load is still there when a spell ends, so that a machine that stays busy
// pays one slice per kMaxHoldNs while a passing hiccup costs at most kMinHoldNs of the pool.
constexpr int64_t kMinHoldNs = 32'000'000;
constexpr int64_t kMaxHoldNs = 1'024'000'000;
// kAuto's state (steady-clock ns): until when teams are the pool, when the last slice wait was
// seen on an OpenMP team, and the current spell's length. Relaxed atomics: concurrent callers
// may race on them, which at worst shifts a spell's start or length.
std::atomic<int64_t> g_pool_until_ns{0};
std::atomic<int64_t> g_last_wait_ns{0};
std::atomic<int64_t> g_hold_ns{kMinHoldNs};

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

bool in_pool_task() noexcept { return tl_in_task; }

TeamMode team_mode() noexcept { return TeamMode(g_team_mode.load(std::memory_order_relaxed)); }
void set_team_mode(TeamMode mode) noexcept {
  g_team_mode.store(int(mode), std::memory_order_relaxed);
  g_pool_until_ns.store(0, std::memory_order_relaxed);
  g_last_wait_ns.store(0, std::memory_order_relaxed);
  g_hold_ns.store(kMinHoldNs, std::memory_order_relaxed);
}

bool auto_uses_pool() noexcept {
  return g_forked_child.load(std::memory_order_relaxed) ||
         now_ns() < g_pool_until_ns.load(std::memory_order_relaxed);
}

AutoPoolState auto_pool_state() noexcept {
  return {std::max<int64_t>(0, g_pool_until_ns.load(std::memory_order_relaxed) - now_ns()),
          g_hold_ns.load(std::memory_order_relaxed)};
}

void note_team_wait(int64_t wait_ns, int64_t work_ns) noexcept {
  // Only a wait that is both a scheduler slice long and a large share of the call counts: a team
  // thread sat descheduled (another process on its core).
  if (wait_ns <= kSliceWaitNs || 4 * wait_ns <= work_ns) return;
  const int64_t now = now_ns();
  const int64_t last_wait = g_last_wait_ns.exchange(now, std::memory_order_relaxed);
  const int64_t spell_end = g_pool_until_ns.load(std::memory_order_relaxed);
  // a team that began before the spell (another thread's) reports during it: the spell stands
  if (now < spell_end) return;
  if (spell_end != 0 && now - spell_end < kConfirmNs) {
    // the first team after a spell waited again: the load outlasted the spell
    const int64_t hold = std::min(2 * g_hold_ns.load(std::memory_order_relaxed), kMaxHoldNs);
    g_hold_ns.store(hold, std::memory_order_relaxed);
    g_pool_until_ns.store(now + hold, std::memory_order_relaxed);
  } else if (last_wait != 0 && now - last_wait < kConfirmNs) {
    g_hold_ns.store(kMinHoldNs, std::memory_order_relaxed);
    g_pool_until_ns.store(now + kMinHoldNs, std::memory_order_relaxed);
  } else {
    return;  // a single wait: the machine may have hiccuped once
  }
  pool_spells().fetch_add(1, std::memory_order_relaxed);
}

bool run_in_pool(int64_t begin, int64_t end, int64_t chunk, int helpers, ChunkFn fn,
                 const void* ctx) {
  Pool& p = pool();
  if (p.busy.exchange(true, std::memory_order_acquire)) return false;
  const ReleaseBusy release(p);
  team_launches().fetch_add(1, std::memory_order_relaxed);
  grow(p, std::min(helpers, kMaxHelpers));
  const uint64_t wanted = uint64_t(std::min({helpers, p.workers, kMaxHelpers}));

  p.end = end;
  p.chunk = chunk;
  p.fn = fn;
  p.ctx = ctx;
  p.next.store(begin, std::memory_order_relaxed);
  const uint64_t gen = (p.state.load(std::memory_order_relaxed) >> kGenShift) + 1;
  p.state.store((gen << kGenShift) | kOpen | (wanted << kWantedShift));
  p.wake.fetch_add(1);
  if (wanted >= uint64_t(p.workers)) {
    p.wake.notify_all();
  } else {
    for (uint64_t i = 0; i < wanted; ++i) p.wake.notify_one();
  }

  {
    const OneAtenThread one_thread;
    tl_in_task = true;
    run_chunks(p);
    tl_in_task = false;
  }

  // Close the job, then wait for the helpers inside it.
  const uint64_t closed = p.state.fetch_and(~kOpen);
  const auto none_joined = [&p] { return (p.state.load() & kJoinedMask) == 0; };
  if ((closed & kJoinedMask) != 0 && !poll_for(kOwnerPollNs, none_joined)) {
    for (;;) {
      const uint32_t l = p.left.load();
      if (none_joined()) break;
      p.left.wait(l);  // sleeps only while left == l: the last helper has not left since the load
    }
  }

  std::exception_ptr error;
  if (p.failed.load(std::memory_order_relaxed)) {
    error = std::move(p.error);
    p.error = nullptr;
    p.failed.store(false, std::memory_order_relaxed);
  }
  if (error) std::rethrow_exception(error);
  return true;
}

}  // namespace genext::cpu
