// A CPU functional model of the CUDA execution model, force-included (-include) when genext's .cu
// sources are compiled as host C++ for the emulation tests (tests/cuda_emu/README.md). It is an
// emulation: a kernel that passes under it has still not run on a GPU.
//
// - Blocks run one after another on the calling thread. The threads of a block are fibers
//   (ucontext), each with its own stack, switched only where CUDA threads must meet: __syncthreads,
//   __syncwarp, the warp shuffles and votes. Between those points a thread runs alone, so a
//   missing barrier shows up as a wrong result when threads read shared memory another thread has
//   not written yet: the runnable thread with the lowest index runs next (the highest in odd
//   blocks), so one warp runs ahead as far as it can, and a block barrier lets every thread of the
//   block run up to it before any goes on.
// - __shared__ variables are function statics (one block at a time, so one copy is the block's);
//   dynamic shared memory (extern __shared__) is a per-launch buffer (ending at a guard page,
//   filled with 0xFF first), rewritten to a pointer by build.py. Both keep the last block's
//   contents, so a kernel that reads shared memory it did not write in the same block reads stale
//   values rather than zeros.
// - A thread that returns counts as arrived at every later block barrier (as on Volta and later);
//   a warp operation waits for every lane its mask names, so a mask naming a lane that returned
//   or never arrives is a deadlock, reported with the kernel's block and the waiting threads.
// - Device intrinsics are their host equivalents; the 16-bit types and their conversions are the
//   CUDA toolkit's own host implementations (cuda_fp16.h, cuda_bf16.h).
#pragma once

// common/cuda_utils.cuh's cp.async wrappers call the model below
#define GENEXT_CUDA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace emu {

constexpr int kWarp = 32;

struct Thread {
  ucontext_t ctx;
  uint3 tid;
  int index = 0;  // linear index in the block
  int lane = 0, warp = 0;
  bool done = false;
  int wait = 0;           // 0: runnable, 1: block barrier, 2: warp barrier
  unsigned wait_gen = 0;  // the block barrier's generation it waits past
  uint64_t wait_id = 0;   // the warp barrier it waits on
  // asynchronous copies issued and not yet landed: destination, source, bytes read (the rest of
  // the 16 zero-filled), the group (committed groups so far when issued)
  struct Copy {
    void* dst;
    const void* src;
    int bytes;
    int group;
  };
  std::vector<Copy> copies;
  int committed = 0;
};

struct Block {
  uint3 idx;
  std::vector<Thread> threads;
  int live = 0;
  unsigned bar_gen = 0;
  int bar_count = 0;
  // per warp, the warp barriers some lanes have reached: the lanes they wait for and those come
  struct WarpBarrier {
    unsigned mask, arrived;
    uint64_t id;
  };
  std::vector<std::vector<WarpBarrier>> warp_barriers;
  uint64_t next_barrier = 0;
  std::vector<uint64_t> slots;                 // one shuffle value per thread
  std::vector<std::array<uint32_t, 6>> frags;  // one matrix-operation operand set per thread
  std::exception_ptr error;                    // the first exception a thread threw
};

struct Launch {
  dim3 grid, block;
  size_t smem = 0;
};

inline thread_local Launch* g_launch = nullptr;
inline thread_local Block* g_block = nullptr;
inline thread_local Thread* g_thread = nullptr;
inline thread_local ucontext_t g_sched;
inline thread_local const std::function<void()>* g_entry = nullptr;
inline thread_local void* g_dyn_smem = nullptr;
inline thread_local cudaError_t g_last_error = cudaSuccess;

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline void yield_to_scheduler() { swapcontext(&g_thread->ctx, &g_sched); }

// A kernel thread that touches an inaccessible page (past the end of a guarded tensor, see
// tests/cuda_emu/guard.py) raises SIGSEGV; while a block runs, the handler records the address
// and resumes the scheduler, which reports it as an error instead of the process dying.
inline thread_local bool g_in_block = false;
inline thread_local volatile bool g_faulted = false;
inline thread_local void* g_fault_addr = nullptr;

// The handlers on_fault replaced, for faults that are not a kernel thread's.
inline struct sigaction g_old_segv{}, g_old_bus{};

inline void on_fault(int sig, siginfo_t* info, void*) {
  if (!g_in_block || g_thread == nullptr) {
    // not a kernel thread's: the handler from before, when the faulting instruction runs again
    sigaction(sig, sig == SIGSEGV ? &g_old_segv : &g_old_bus, nullptr);
    return;
  }
  g_faulted = true;
  g_fault_addr = info->si_addr;
  setcontext(&g_sched);  // back into run()'s swapcontext, with the signal mask saved there
}

// Installs on_fault for SIGSEGV and SIGBUS for the life of one launch, on an alternate signal
// stack (a fault from a fiber's stack overflowing into its guard page must not need that stack).
class FaultHandler {
 public:
  FaultHandler() {
    thread_local std::vector<char> alt(size_t(1) << 16);
    stack_t ss{};
    ss.ss_sp = alt.data();
    ss.ss_size = alt.size();
    sigaltstack(&ss, &old_stack_);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
  }
  ~FaultHandler() {
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaltstack(&old_stack_, nullptr);
  }
  FaultHandler(const FaultHandler&) = delete;
  FaultHandler& operator=(const FaultHandler&) = delete;

 private:
  stack_t old_stack_{};
};

// cp.async (common/cuda_utils.cuh's wrappers): in even blocks a copy lands only at a wait that
// covers it, so a kernel that reads shared memory before waiting reads what was there before; in
// odd blocks it lands at once (below), so one that refills a stage too early shows.
inline void land(Thread& t, size_t keep_from_group) {
  std::vector<Thread::Copy> left;
  for (const Thread::Copy& c : t.copies) {
    if (size_t(c.group) >= keep_from_group) {
      left.push_back(c);
      continue;
    }
    std::memset(c.dst, 0, 16);
    if (c.bytes > 0) std::memcpy(c.dst, c.src, size_t(c.bytes));
  }
  t.copies.swap(left);
}
// In the blocks where copies land at once (odd blocks, where the last warp runs ahead), a copy
// into a stage another warp still reads overwrites it before that warp gets there.
inline thread_local bool g_copies_land_at_once = false;
inline void cp_async(void* dst, const void* src, int bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      (bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    throw Error("cp.async of 16 bytes from or to an address that is not 16-byte aligned");
  if (g_copies_land_at_once) {
    std::memset(dst, 0, 16);
    if (bytes > 0) std::memcpy(dst, src, size_t(bytes));
    return;
  }
  g_thread->copies.push_back({dst, src, bytes, g_thread->committed});
}
inline void cp_async_commit() { ++g_thread->committed; }
// All but the n most recent committed groups land (n < 0: every copy, committed or not).
inline void cp_async_wait(int n) {
  Thread& t = *g_thread;
  land(t, n < 0 ? size_t(-1) : size_t(std::max(0, t.committed - n)));
}

// The entry of every fiber: the launch's kernel call, then back to the scheduler for good.
inline void fiber_main() {
  try {
    (*g_entry)();
  } catch (...) {  // a swapcontext boundary: handed to run(), which rethrows it
    g_block->error = std::current_exception();
  }
  Block& b = *g_block;
  land(*g_thread, size_t(-1));  // a thread's copies land even if it never waited
  g_thread->done = true;
  --b.live;
  if (b.bar_count > 0 && b.bar_count == b.live) {  // the others wait only for this one
    ++b.bar_gen;
    b.bar_count = 0;
  }
  swapcontext(&g_thread->ctx, &g_sched);
}

inline void syncthreads() {
  Block& b = *g_block;
  const unsigned gen = b.bar_gen;
  if (++b.bar_count == b.live) {
    ++b.bar_gen;
    b.bar_count = 0;
    return;
  }
  g_thread->wait = 1;
  g_thread->wait_gen = gen;
  yield_to_scheduler();
}

// A barrier of the lanes in `mask` (each names the same mask): the last of them to arrive releases
// the others. Lanes under different masks meet at different barriers.
inline void warp_sync(unsigned mask) {
  Block& b = *g_block;
  Thread& t = *g_thread;
  const unsigned me = 1u << t.lane;
  if ((mask & me) == 0) throw Error("warp operation with a mask that leaves out the calling lane");
  std::vector<Block::WarpBarrier>& open = b.warp_barriers[size_t(t.warp)];
  auto bar = std::find_if(open.begin(), open.end(), [&](const Block::WarpBarrier& w) {
    return w.mask == mask && (w.arrived & me) == 0;
  });
  if (bar == open.end()) bar = open.insert(open.end(), {mask, 0u, ++b.next_barrier});
  bar->arrived |= me;
  if (bar->arrived == mask) {
    const uint64_t id = bar->id;
    open.erase(bar);
    for (Thread& o : b.threads)
      if (o.wait == 2 && o.wait_id == id) o.wait = 0;
    return;
  }
  t.wait = 2;
  t.wait_id = bar->id;
  yield_to_scheduler();
}

inline bool released(const Block& b, const Thread& t) {
  if (t.wait == 1) return b.bar_gen != t.wait_gen;
  if (t.wait == 2) return false;  // its barrier's last lane sets wait to 0
  return true;
}

// A buffer that ends at an inaccessible page (as tests/cuda_emu/guard.py's tensors): a shim points
// a launch's outputs and workspace at these, then copies the results out.
class Guarded {
 public:
  explicit Guarded(size_t bytes) : bytes_(bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t data = (bytes + page - 1) / page * page;
    map_bytes_ = data + page;
    void* m = mmap(nullptr, map_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) throw Error("mmap failed");
    map_ = static_cast<char*>(m);
    if (mprotect(map_ + data, page, PROT_NONE) != 0) throw Error("mprotect failed");
    // the start 16-byte aligned (as a CUDA allocation, for vector accesses): up to 15 bytes past
    // the end stay accessible when bytes is not a multiple of 16
    ptr_ = map_ + (data - bytes) / 16 * 16;
  }
  // A guarded copy of `bytes` bytes at src.
  Guarded(const void* src, size_t bytes) : Guarded(bytes) {
    if (bytes > 0) std::memcpy(ptr_, src, bytes);
  }
  ~Guarded() { munmap(map_, map_bytes_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  void* get() const { return ptr_; }
  // Fills it with 0xFF bytes (NaN as float, -1 as int): output a kernel leaves unwritten shows.
  void poison() {
    if (bytes_ > 0) std::memset(ptr_, 0xFF, bytes_);
  }
  void copy_to(void* dst) const {
    if (bytes_ > 0) std::memcpy(dst, ptr_, bytes_);
  }

 private:
  size_t bytes_, map_bytes_ = 0;
  char* map_ = nullptr;
  char* ptr_ = nullptr;
};

constexpr size_t kStackBytes = 128 * 1024;
// The dynamic shared memory a launch may ask for without opting in to more (48 KB), and the opt-in
// limit (cudaFuncAttributeMaxDynamicSharedMemorySize; an H100's 227 KB).
constexpr size_t kMaxDynamicSmem = 48 * 1024;
constexpr size_t kMaxOptInSmem = 227 * 1024;
// The kernels given a larger limit with cudaFuncSetAttribute.
inline std::vector<std::pair<const void*, size_t>>& smem_limits() {
  static std::vector<std::pair<const void*, size_t>> limits;
  return limits;
}
inline size_t smem_limit(const void* kernel) {
  for (const auto& [k, bytes] : smem_limits())
    if (k == kernel) return bytes;
  return kMaxDynamicSmem;
}

// Fiber stacks, kept for the next launch, each above an inaccessible page: a thread that
// overflows its stack faults there (reported as a fault of the launch) instead of writing over
// other memory.
inline char* stack(size_t i) {
  thread_local std::vector<char*> pool;
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  while (pool.size() <= i) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (m == MAP_FAILED) throw Error("mmap failed for a fiber stack");
    mprotect(m, page, PROT_NONE);
    pool.push_back(static_cast<char*>(m) + page);
  }
  return pool[i];
}

// Restores the launch's thread-local state on every way out of run().
class Restore {
 public:
  Restore() : launch_(g_launch), dyn_(g_dyn_smem) {}
  ~Restore() {
    g_launch = launch_;
    g_dyn_smem = dyn_;
    g_block = nullptr;
    g_thread = nullptr;
    g_in_block = false;
    g_copies_land_at_once = false;
  }
  Restore(const Restore&) = delete;
  Restore& operator=(const Restore&) = delete;

 private:
  Launch* launch_;
  void* dyn_;
};

// Runs every block of the launch; the kernel body is `entry`.
inline void run(const Launch& cfg, const std::function<void()>& entry, const void* kernel) {
  const int nthreads = int(cfg.block.x * cfg.block.y * cfg.block.z);
  if (nthreads <= 0 || nthreads > 1024 || cfg.grid.x == 0 || cfg.grid.y == 0 || cfg.grid.z == 0 ||
      cfg.grid.y > 65535 || cfg.grid.z > 65535) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (cfg.smem > smem_limit(kernel)) {
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  Launch launch = cfg;
  // Dynamic shared memory ends at an inaccessible page (a carve-up past the launch's size faults)
  // and starts filled with 0xFF bytes (NaN as fp32, fp16 or bf16), so reading a part no thread
  // wrote shows; blocks then see the previous block's contents, as on a GPU.
  Guarded dyn(cfg.smem);
  dyn.poison();
  const Restore restore;
  g_launch = &launch;
  g_dyn_smem = dyn.get();
  g_entry = &entry;
  const FaultHandler fault_handler;
  const int warps = (nthreads + kWarp - 1) / kWarp;
  for (unsigned bz = 0; bz < cfg.grid.z; ++bz)
    for (unsigned by = 0; by < cfg.grid.y; ++by)
      for (unsigned bx = 0; bx < cfg.grid.x; ++bx) {
        Block b;
        b.idx = make_uint3(bx, by, bz);
        b.threads.resize(size_t(nthreads));
        b.live = nthreads;
        b.warp_barriers.assign(size_t(warps), {});
        b.slots.assign(size_t(nthreads), 0);
        b.frags.assign(size_t(nthreads), {});
        g_block = &b;
        for (int i = 0; i < nthreads; ++i) {
          Thread& t = b.threads[size_t(i)];
          t.index = i;
          t.lane = i % kWarp;
          t.warp = i / kWarp;
          t.tid = make_uint3(unsigned(i) % cfg.block.x, (unsigned(i) / cfg.block.x) % cfg.block.y,
                             unsigned(i) / (cfg.block.x * cfg.block.y));
          getcontext(&t.ctx);
          t.ctx.uc_stack.ss_sp = stack(size_t(i));
          t.ctx.uc_stack.ss_size = kStackBytes;
          t.ctx.uc_link = nullptr;
          makecontext(&t.ctx, fiber_main, 0);
        }
        // The next thread to run is the runnable one with the lowest index in even blocks and the
        // highest in odd ones: between block barriers one warp runs as far ahead of the others as
        // it can (the first warp in one block, the last in the next), so a missing block barrier
        // shows whichever way the data flows between warps.
        // Scan order k visits thread at(k). Threads before the running thread's warp in that order
        // were all blocked when it was picked, and only a block barrier's release (a new
        // generation) frees them, so the next scan starts at its warp unless one happened.
        const bool high_first = ((bz * cfg.grid.y + by) * cfg.grid.x + bx) % 2 == 1;
        g_copies_land_at_once = high_first;
        const size_t n = b.threads.size();
        const auto at = [&](size_t k) -> Thread& { return b.threads[high_first ? n - 1 - k : k]; };
        size_t from = 0;
        unsigned seen_gen = b.bar_gen;
        while (b.live > 0) {
          if (b.bar_gen != seen_gen) {
            from = 0;
            seen_gen = b.bar_gen;
          }
          Thread* next = nullptr;
          for (size_t k = from; k < n && next == nullptr; ++k)
            if (!at(k).done && released(b, at(k))) next = &at(k);
          if (next != nullptr) {
            Thread& t = *next;
            const size_t warp_first = size_t(t.warp) * kWarp;  // its warp's first thread
            const size_t warp_last = std::min(n, warp_first + kWarp) - 1;
            from = high_first ? n - 1 - warp_last : warp_first;
            t.wait = 0;
            g_thread = &t;
            g_in_block = true;
            g_faulted = false;
            swapcontext(&g_sched, &t.ctx);
            g_in_block = false;
            if (g_faulted) {
              char where[32];
              std::snprintf(where, sizeof where, "%p", g_fault_addr);
              b.error = std::make_exception_ptr(
                  Error("thread " + std::to_string(t.index) + " of block (" + std::to_string(bx) +
                        ", " + std::to_string(by) + ", " + std::to_string(bz) +
                        ") touched inaccessible memory at " + where +
                        " (past the end of a guarded buffer, or a stack overflow?)"));
            }
            if (b.error) std::rethrow_exception(b.error);  // the others abandoned where they wait
          } else {
            std::string who;
            for (const Thread& t : b.threads)
              if (!t.done && who.size() < 200)
                who += " " + std::to_string(t.index) + (t.wait == 1 ? "(block)" : "(warp)");
            throw Error("deadlock in block (" + std::to_string(bx) + ", " + std::to_string(by) +
                        ", " + std::to_string(bz) + "): threads waiting:" + who);
          }
        }
      }
}

// A launch's argument converted to the kernel's parameter type as a call would (implicitly: no
// const dropped, no pointer reinterpreted).
template <class P, class A>
P implicit(A&& a) {
  return std::forward<A>(a);
}

// kernel<<<grid, block, smem, stream>>>(args...) as build.py rewrites it.
template <class... P, class... A>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...), A&&... args) {
  std::tuple<P...> params{implicit<P>(std::forward<A>(args))...};
  const std::function<void()> entry = [&] { std::apply(kernel, params); };
  run(Launch{grid, block, smem}, entry, reinterpret_cast<const void*>(kernel));
}
template <class... P, class... A>
void launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(P...), A&&... args) {
  launch(grid, block, smem, cudaStream_t{}, kernel, std::forward<A>(args)...);
}
template <class... P, class... A>
void launch(dim3 grid, dim3 block, void (*kernel)(P...), A&&... args) {
  launch(grid, block, 0, cudaStream_t{}, kernel, std::forward<A>(args)...);
}

inline void* dyn_smem() { return g_dyn_smem; }

template <class T>
T shuffle(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  Block& b = *g_block;
  const Thread& t = *g_thread;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.slots[size_t(t.index)] = bits;
  warp_sync(mask);
  const int from = t.warp * kWarp + src;
  if ((mask >> src & 1u) == 0 || from >= int(b.threads.size()))
    throw Error("shuffle reads a lane outside the mask");
  T r;
  std::memcpy(&r, &b.slots[size_t(from)], sizeof(T));
  warp_sync(mask);
  return r;
}

inline unsigned ballot(unsigned mask, bool pred) {
  Block& b = *g_block;
  const Thread& t = *g_thread;
  b.slots[size_t(t.index)] = pred ? 1 : 0;
  warp_sync(mask);
  unsigned r = 0;
  for (int l = 0; l < kWarp; ++l)
    if ((mask >> l & 1u) && b.slots[size_t(t.warp * kWarp + l)]) r |= 1u << l;
  warp_sync(mask);
  return r;
}

// ---- warp-wide matrix operations (flash_attention/flash_common.cuh's ldmatrix and mma.sync) ----
// Both need all 32 lanes of the warp: each lane hands in its operands, the lanes meet, and each
// computes its own part of the result from everyone's operands.

inline std::array<uint32_t, 6>& my_frags() { return g_block->frags[size_t(g_thread->index)]; }
inline const std::array<uint32_t, 6>& lane_frags(int lane) {
  return g_block->frags[size_t(g_thread->warp * kWarp + lane)];
}
inline void check_full_warp(const char* what) {
  if ((g_thread->warp + 1) * kWarp > int(g_block->threads.size()))
    throw Error(std::string(what) + " in a warp with fewer than 32 threads");
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the address of row l % 8 of
// 8x8 matrix l / 8. Plain, register m of lane l holds elements (l / 4, 2 (l % 4)) and
// (l / 4, 2 (l % 4) + 1) of matrix m (the first in the low half); .trans, elements
// (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
inline void ldmatrix_x4(const void* row, bool trans, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                        uint32_t& r3) {
  check_full_warp("ldmatrix");
  const uintptr_t a = reinterpret_cast<uintptr_t>(row);
  if (a % 16 != 0) throw Error("ldmatrix: a row address that is not 16-byte aligned");
  my_frags()[0] = uint32_t(a);
  my_frags()[1] = uint32_t(uint64_t(a) >> 32);
  warp_sync(0xffffffffu);
  const auto row_of = [](int lane) {
    const std::array<uint32_t, 6>& f = lane_frags(lane);
    return reinterpret_cast<const unsigned char*>(uintptr_t(f[0]) |
                                                  uintptr_t(uint64_t(f[1]) << 32));
  };
  const int l = g_thread->lane;
  uint32_t r[4];
  for (int m = 0; m < 4; ++m) {
    if (!trans) {
      std::memcpy(&r[m], row_of(m * 8 + l / 4) + 4 * (l % 4), 4);
    } else {
      uint16_t lo, hi;
      std::memcpy(&lo, row_of(m * 8 + 2 * (l % 4)) + 2 * (l / 4), 2);
      std::memcpy(&hi, row_of(m * 8 + 2 * (l % 4) + 1) + 2 * (l / 4), 2);
      r[m] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
  warp_sync(0xffffffffu);  // every lane has read the addresses before they are reused
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

template <bool kBf16>
float b16_to_float(uint32_t bits) {
  if constexpr (kBf16) {
    __nv_bfloat16_raw r;
    r.x = uint16_t(bits);
    return __bfloat162float(__nv_bfloat16(r));
  } else {
    __half_raw r;
    r.x = uint16_t(bits);
    return __half2float(__half(r));
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C with fp32 accumulation, in the
// fragment layouts of flash_common.cuh (g = lane / 4, t = lane % 4): A's register j of lane
// (g, t) holds row g + 8 (j & 1), columns 2t + 8 (j >> 1) and the next; B's register j holds
// rows 2t + 8 j and the next of column g; C's c0, c1 row g, columns 2t, 2t + 1, and c2, c3 the
// same of row g + 8. Each product is exact in fp32; the sum over k runs in order.
template <bool kBf16>
void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  check_full_warp("mma");
  std::array<uint32_t, 6>& mine = my_frags();
  for (int j = 0; j < 4; ++j) mine[size_t(j)] = a[j];
  mine[4] = b0;
  mine[5] = b1;
  warp_sync(0xffffffffu);
  const auto half_of = [](uint32_t w, int k) { return k & 1 ? w >> 16 : w & 0xffffu; };
  const auto A = [&](int r, int k) {
    const uint32_t w = lane_frags((r % 8) * 4 + (k % 8) / 2)[size_t((r >= 8) + 2 * (k >= 8))];
    return b16_to_float<kBf16>(half_of(w, k));
  };
  const auto B = [&](int k, int n) {
    const uint32_t w = lane_frags(n * 4 + (k % 8) / 2)[size_t(4 + (k >= 8))];
    return b16_to_float<kBf16>(half_of(w, k));
  };
  const int g = g_thread->lane / 4, t = g_thread->lane % 4;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
    float s = 0.f;
    for (int k = 0; k < 16; ++k) s += A(r, k) * B(k, n);
    d[e] = c[e] + s;
  }
  warp_sync(0xffffffffu);  // every lane has read the operands before they are reused
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

}  // namespace emu

// ---- the CUDA built-ins ----------------------------------------------------------------------

#define threadIdx (::emu::g_thread->tid)
#define blockIdx (::emu::g_block->idx)
#define blockDim (::emu::g_launch->block)
#define gridDim (::emu::g_launch->grid)
#define warpSize 32

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::warp_sync(mask); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ::emu::g_thread->lane, seg = lane & ~(width - 1);
  return ::emu::shuffle(mask, v, seg + (src & (width - 1)));
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::emu::g_thread->lane, seg = lane & ~(width - 1), src = lane ^ lane_mask;
  return ::emu::shuffle(mask, v, src >= seg + width ? lane : src);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::g_thread->lane, seg = lane & ~(width - 1), src = lane + int(delta);
  return ::emu::shuffle(mask, v, src >= seg + width ? lane : src);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::emu::g_thread->lane, seg = lane & ~(width - 1), src = lane - int(delta);
  return ::emu::shuffle(mask, v, src < seg ? lane : src);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return ::emu::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return ::emu::ballot(mask, pred != 0) == mask; }

// Blocks run one at a time on one host thread: an atomic is a plain read-modify-write.
template <class T>
T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  const T old = *p;
  *p = std::max(old, v);
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  const T old = *p;
  *p = std::min(old, v);
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  const T old = *p;
  if (old == compare) *p = v;
  return old;
}

template <class T>
T __ldg(const T* p) {
  return *p;
}
template <class T>
T __ldcs(const T* p) {
  return *p;
}
template <class T>
T __ldcg(const T* p) {
  return *p;
}
template <class T>
void __stcs(T* p, const T& v) {
  *p = v;
}
template <class T>
void __stcg(T* p, const T& v) {
  *p = v;
}

inline uint64_t __umul64hi(uint64_t a, uint64_t b) {
  return uint64_t((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }

// Round-to-nearest arithmetic: host float operations (the build turns FMA contraction off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float a) { return std::exp(a); }
inline float __logf(float a) { return std::log(a); }
inline float __log2f(float a) { return std::log2(a); }
inline float __exp2f(float a) { return std::exp2(a); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __saturatef(float a) { return std::fmin(std::fmax(a, 0.0f), 1.0f); }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline double rsqrt(double a) { return 1.0 / std::sqrt(a); }

// CUDA's integer min/max overloads (device code calls them unqualified).
template <class A, class B>
auto min(A a, B b)
    -> std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>, std::common_type_t<A, B>> {
  return a < b ? a : b;
}
template <class A, class B>
auto max(A a, B b)
    -> std::enable_if_t<std::is_integral_v<A> && std::is_integral_v<B>, std::common_type_t<A, B>> {
  return a > b ? a : b;
}

// The runtime calls the launchers make.
inline cudaError_t emu_cudaGetLastError() {
  const cudaError_t e = ::emu::g_last_error;
  ::emu::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t emu_cudaPeekAtLastError() { return ::emu::g_last_error; }
template <class... P>
cudaError_t emu_cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || size_t(value) > ::emu::kMaxOptInSmem) return cudaErrorInvalidValue;
  const void* k = reinterpret_cast<const void*>(kernel);
  for (auto& [kk, bytes] : ::emu::smem_limits())
    if (kk == k) {
      bytes = size_t(value);
      return cudaSuccess;
    }
  ::emu::smem_limits().push_back({k, size_t(value)});
  return cudaSuccess;
}
#define cudaFuncSetAttribute emu_cudaFuncSetAttribute
#define cudaGetLastError emu_cudaGetLastError
#define cudaPeekAtLastError emu_cudaPeekAtLastError
