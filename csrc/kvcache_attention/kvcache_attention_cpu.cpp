// attention_with_kvcache on the CPU: float32/float64/float16/bfloat16 (16-bit computed in float32).
//
// The op has two phases.
//   1. Append (when k_new/v_new are given): row (b, i, hk) of k_new/v_new is copied into the cache
//      at position cache_seqlens[b] + i of sequence b (contiguous: row L of batch b; paged: block
//      block_table[b][L / block_size], slot L % block_size). One pass, finished before any
//      attention task reads the caches.
//   2. Attention, one task per (sequence b, kv head hk, key split s). The task owns the whole group
//      of query heads that share hk and all Lq queries: rows r = g * Lq + i (query head
//      hk * group + g, query i), so each key and value row is read and widened once per task.
//      Keys go by in tiles of kTile rows. In float (kvcache_tiles_cpu.h; on AVX-512 CPUs the
//      16-lane routines of kvcache_avx512_cpu.h) the scores S[r][j] = q_r . k_j take eight keys
//      at a time in eight accumulators whose lane sums are folded into one vector; the online
//      softmax (running maximum m and sum l per row, O rescaled by alpha = exp(m_old - m_new) when
//      m grows) runs on 8-lane vectors (16-lane, four rows at a time, on AVX-512); the update
//      O[r] = alpha[r] O[r] + sum_j P[r][j] v_j keeps up to 64 elements of O[r] in registers over
//      the tile's keys. float64 uses the generic routines below. float32/float64 rows are read in
//      place in the cache; float16/bfloat16 rows are first widened into a [kTile][Dp] float tile,
//      except bfloat16 rows on CPUs with AVX512-BF16, read in place by kvcache_avx512_cpu.h's
//      routines (scores on vdpbf16ps, value rows widened in registers).
//      The next tile's row pointers are computed (paged: stepping block and slot, no division
//      per row) and its rows prefetched while a tile is computed (rows of one head are far
//      apart in memory, a stride the hardware prefetchers do not follow).
//
// Threads (common/cpu_parallel.h): the tasks run on the calling thread unless their estimated
// work (task_ns) is worth a team. Splits ("flash-decoding" on the CPU): when batch x kv heads
// gives fewer than about four tasks per thread worth waking (one long sequence, MQA), the keys are
// cut into ranges of at least kMinSplit keys; each task leaves its unnormalised O, m and l in a
// scratch buffer and a merge pass combines the splits of each row with the usual rescaling. With
// one split the task normalises and writes the output itself. Per-task scratch is thread-local
// and kept between calls.
//
// Masking: query i of sequence b sees key j iff j < len_k(b) and, when causal,
// j <= len_k(b) - Lq + i; a row that sees no key gets out = 0, lse = -inf.
//
// The values of cache_seqlens and block_table are checked here (the kernel reads them anyway)
// before anything is written: every length within the capacity, every block a sequence uses in the
// pool.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "common/cpu_simd.h"
#include "kvcache_attention/kvcache_avx512_cpu.h"
#include "kvcache_attention/kvcache_checks.h"
#include "kvcache_attention/kvcache_tiles_cpu.h"

namespace genext::kv {
namespace {

constexpr const char* kOp = "attention_with_kvcache";
constexpr int64_t kMinSplit = 256;  // fewest keys worth a split of their own

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

// ---- tile routines ------------------------------------------------------------------------------

// exp of kTile doubles in place. The arguments are scores minus a running maximum (<= 0);
// masked lanes are zeroed by the caller.
GENEXT_INLINE void exp_tile_impl(double* x) {
  for (int64_t j = 0; j < kTile; ++j) x[j] = std::exp(x[j]);
}

// ---- vectors: 16 lanes (common/cpu_simd.h; the compiler splits them to the ISA's width) ---------

constexpr int kLanes = simd::kLanes;
using simd::load;
using simd::store;

// S[r][j] = Q[r] . K[j] for R rows of Q (stride ldq) and the nc key rows krows[j] (D elements
// each). Each key row is loaded once for the R rows; the products go into one 16-lane accumulator
// per row, summed across lanes at the end.
template <class T, int R>
GENEXT_INLINE void dots_block(const T* __restrict__ Q, int64_t ldq,
                              const T* const* __restrict__ krows, int64_t nc, int64_t D,
                              T* __restrict__ S) {
  using V = typename simd::Vec<T>::V;
  const int64_t Dv = D / kLanes * kLanes;
  for (int64_t j = 0; j < nc; ++j) {
    const T* __restrict__ k = krows[j];
    V acc[R];
    for (int r = 0; r < R; ++r) acc[r] = V{};
    for (int64_t d = 0; d < Dv; d += kLanes) {
      const V kv = load<V>(k + d);
      for (int r = 0; r < R; ++r) acc[r] += load<V>(Q + r * ldq + d) * kv;
    }
    for (int r = 0; r < R; ++r) {
      T sum = simd::hsum_tree(acc[r]);
      for (int64_t d = Dv; d < D; ++d) sum += Q[r * ldq + d] * k[d];
      S[r * kTile + j] = sum;
    }
  }
}

template <class T>
GENEXT_INLINE void scores_impl(const T* Q, int64_t ldq, int64_t nr, const T* const* krows,
                               int64_t nc, int64_t D, T* S) {
  int64_t r = 0;
  for (; r + 4 <= nr; r += 4) dots_block<T, 4>(Q + r * ldq, ldq, krows, nc, D, S + r * kTile);
  for (; r < nr; ++r) dots_block<T, 1>(Q + r * ldq, ldq, krows, nc, D, S + r * kTile);
}

// Online-softmax step for rows r < nr of S, row r seeing its first nvis[r] columns: S becomes
// P = exp(S - m_new) (0 where masked), m and l are updated and alpha[r] = exp(m_old - m_new).
// The maximum skips NaN scores, which then make P and l NaN (out and lse end NaN); when every
// visible score is -inf the exponent is taken from 0, so P = 0 and l stays 0 (out 0, lse -inf).
template <class T>
GENEXT_INLINE void softmax_impl(T* __restrict__ S, int64_t nr, const int32_t* __restrict__ nvis,
                                T* __restrict__ m, T* __restrict__ l, T* __restrict__ alpha) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * kTile;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      std::fill(s, s + kTile, T(0));
      alpha[r] = T(1);
      continue;
    }
    T mx = m[r];
    for (int32_t j = 0; j < nv; ++j) mx = s[j] > mx ? s[j] : mx;
    alpha[r] = m[r] == kNegInf ? T(0) : std::exp(m[r] - mx);
    const T m_use = mx == kNegInf ? T(0) : mx;
    for (int64_t j = 0; j < kTile; ++j) s[j] -= m_use;
    exp_tile_impl(s);
    T sum = 0;
    for (int64_t j = 0; j < kTile; ++j) {
      s[j] = j < nv ? s[j] : T(0);
      sum += s[j];
    }
    l[r] = l[r] * alpha[r] + sum;
    m[r] = mx;
  }
}

// o[d0 : d0 + W * 16] = alpha * o[...] + sum_{j < nc} p[j] * vrows[j][d0 : ...], accumulated in
// W vectors that stay in registers over the keys.
template <class T, int W>
GENEXT_INLINE void accum_chunk(T* __restrict__ o, const T* __restrict__ p,
                               const T* const* __restrict__ vrows, int64_t nc, int64_t d0,
                               T alpha) {
  using V = typename simd::Vec<T>::V;
  V acc[W];
  for (int w = 0; w < W; ++w) acc[w] = load<V>(o + d0 + w * kLanes) * alpha;
  for (int64_t j = 0; j < nc; ++j) {
    const V pj = V{} + p[j];
    const T* __restrict__ v = vrows[j] + d0;
    for (int w = 0; w < W; ++w) acc[w] += pj * load<V>(v + w * kLanes);
  }
  for (int w = 0; w < W; ++w) store(o + d0 + w * kLanes, acc[w]);
}

// O[r][0:D] = alpha[r] * O[r][0:D] + sum_{j < nc} P[r][j] * V[j][0:D] for r < nr (O rows of
// stride ldo, the value rows vrows[j] of D elements).
template <class T>
GENEXT_INLINE void accum_impl(T* O, int64_t ldo, int64_t nr, const T* P, const T* const* vrows,
                              int64_t nc, int64_t D, const T* alpha) {
  const int64_t Dv = D / kLanes * kLanes;
  for (int64_t r = 0; r < nr; ++r) {
    T* o = O + r * ldo;
    const T* p = P + r * kTile;
    int64_t d0 = 0;
    for (; d0 + 4 * kLanes <= Dv; d0 += 4 * kLanes)
      accum_chunk<T, 4>(o, p, vrows, nc, d0, alpha[r]);
    switch ((Dv - d0) / kLanes) {
      case 3: accum_chunk<T, 3>(o, p, vrows, nc, d0, alpha[r]); break;
      case 2: accum_chunk<T, 2>(o, p, vrows, nc, d0, alpha[r]); break;
      case 1: accum_chunk<T, 1>(o, p, vrows, nc, d0, alpha[r]); break;
      default: break;
    }
    if (Dv == D) continue;
    for (int64_t d = Dv; d < D; ++d) o[d] *= alpha[r];
    for (int64_t j = 0; j < nc; ++j)
      for (int64_t d = Dv; d < D; ++d) o[d] += p[j] * vrows[j][d];
  }
}

// Entry points: the float ones compiled per ISA level (GENEXT_CPU_CLONES), double once.
#define KV_ENTRY_POINTS(T, ATTR)                                                                   \
  ATTR void scores(const T* Q, int64_t ldq, int64_t nr, const T* const* krows, int64_t nc,         \
                   int64_t D, T* S) {                                                              \
    scores_impl<T>(Q, ldq, nr, krows, nc, D, S);                                                   \
  }                                                                                                \
  ATTR void softmax_step(T* S, int64_t nr, const int32_t* nvis, T* m, T* l, T* alpha) {            \
    softmax_impl<T>(S, nr, nvis, m, l, alpha);                                                     \
  }                                                                                                \
  ATTR void accum(T* O, int64_t ldo, int64_t nr, const T* P, const T* const* vrows, int64_t nc,    \
                  int64_t D, const T* alpha) {                                                     \
    accum_impl<T>(O, ldo, nr, P, vrows, nc, D, alpha);                                             \
  }

KV_ENTRY_POINTS(double, )

// float: the 8-lane routines of kvcache_tiles_cpu.h, or at level 4 the 16-lane ones of
// kvcache_avx512_cpu.h.

// ---- problem layout -----------------------------------------------------------------------------

// Where the rows of a (B, L, H, D) tensor or a cache live. For a paged cache `table` is the block
// table: row j of sequence b is slot j % block_size of block table[b * max_blocks + j /
// block_size].
template <class S>
struct Rows {
  S* p = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const int32_t* table = nullptr;
  int64_t block_size = 0, max_blocks = 0;

  Rows(const at::Tensor& t, const int32_t* tab, int64_t bs, int64_t mb)
      : p(static_cast<S*>(t.data_ptr())),
        s0(t.stride(0)),
        s1(t.stride(1)),
        s2(t.stride(2)),
        table(tab),
        block_size(bs),
        max_blocks(mb) {}

  S* row(int64_t b, int64_t j, int64_t h) const {
    if (table) {
      const int64_t blk = table[b * max_blocks + j / block_size];
      return p + blk * s0 + (j % block_size) * s1 + h * s2;
    }
    return p + b * s0 + j * s1 + h * s2;
  }
};

// Lengths and block indices are read on the CPU before anything is written; an error names the
// sequence and the offending value, in the words of the Python wrapper's check (which leaves CPU
// tensors to this one: it is the same check without the wrapper's tensor ops).
void check_values(const Problem& p, const int32_t* lens, const int32_t* table) {
  const int64_t added = p.append ? p.Lq : 0;
  for (int64_t b = 0; b < p.B; ++b) {
    const int64_t L = lens[b];
    TORCH_CHECK_VALUE(L >= 0, kOp, ": cache_seqlens[", b, "] = ", L, " is negative");
    TORCH_CHECK_VALUE(L + added <= p.capacity, kOp, ": sequence ", b, " would hold ", L + added,
                      " tokens (cache_seqlens[", b, "] = ", L, added ? " plus Lq = " : "",
                      added ? std::to_string(added) : std::string(), added ? " new" : "",
                      "), past the cache capacity of ", p.capacity,
                      p.paged ? " (max_blocks * block_size)" : " (k_cache.shape[1])");
    if (!p.paged) continue;
    const int64_t used = ceil_div(L + added, p.block_size);
    for (int64_t c = 0; c < used; ++c) {
      const int64_t blk = table[b * p.max_blocks + c];
      TORCH_CHECK_VALUE(blk >= 0 && blk < p.num_blocks, kOp, ": block_table[", b, ", ", c,
                        "] = ", blk, " is outside the pool of ", p.num_blocks, " blocks (sequence ",
                        b, " uses its first ", used, " entries)");
    }
  }
}

// Asks for the line holding p to be brought into L1 (and L2). Consecutive rows of a head are
// Hk * D elements apart (or in different blocks), often a page or more, which the hardware
// prefetchers do not follow: without this every row starts with a full memory latency (measured:
// 2.4x slower on a 67 MB fp32 cache with Hk = 8, D = 128). Into L1 rather than L2 only: on caches
// far larger than L2 (a model's layers in turn) prefetcht0 took 8-18% less time than prefetcht1
// at bf16 D = 64 and 4-15% at D = 128, float32 and bf16 (a 2-core Xeon, AVX-512, one thread);
// on one cache that stays in L2 it was 0-5% slower in most cases and up to 12-20% in single runs
// (the decode step of a model reads each layer's cache once, so the first case is the one that
// counts). The prefetch is an asm statement because GCC treats __builtin_prefetch as free of side
// effects and deleted whole prefetch loops here.
GENEXT_INLINE void prefetch_line(const void* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
#endif
}

template <class S>
void append(const Problem& p, const int32_t* lens, const at::Tensor& k_new, const at::Tensor& v_new,
            const Rows<S>& kc, const Rows<S>& vc) {
  const Rows<const S> kn(k_new, nullptr, 0, 0), vn(v_new, nullptr, 0, 0);
  const int64_t D = p.D, Lq = p.Lq, Hk = p.Hk;
  // one row pair: about 0.1 ns a byte read and written (two rows of D elements, in L2 or memory)
  const double ns_row = 0.1 * double(4 * D * int64_t(sizeof(S))) + 5.0;
  cpu::parallel_for(0, p.B * Lq * Hk, ns_row, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = t % Hk, i = (t / Hk) % Lq, b = t / (Hk * Lq);
      const int64_t j = int64_t(lens[b]) + i;
      std::memcpy(kc.row(b, j, h), kn.row(b, i, h), D * sizeof(S));
      std::memcpy(vc.row(b, j, h), vn.row(b, i, h), D * sizeof(S));
    }
  });
}

// Thread-local scratch of at least n elements of T, 64-byte aligned, reused across calls (a decode
// step must not pay for allocations); its contents are not kept between uses. A buffer grown by a
// large call (a long chunk of queries) is given back when a call needs under a quarter of it and
// it holds more than kKeepBytes, so one large call does not pin its memory in every thread.
constexpr size_t kKeepBytes = size_t(1) << 20;
template <class T>
T* scratch(int64_t n) {
  thread_local std::vector<T> mem;
  const size_t need = size_t(n) + 64 / sizeof(T);
  if (mem.size() > 4 * need && mem.size() * sizeof(T) > kKeepBytes) std::vector<T>().swap(mem);
  if (mem.size() < need) mem.resize(need);
  const uintptr_t p = reinterpret_cast<uintptr_t>(mem.data());
  return reinterpret_cast<T*>((p + 63) / 64 * 64);
}

// Prefetches every 64-byte line of n rows of `bytes` bytes, `stride` bytes apart from p on. When
// the stride is a multiple of 64 every row starts at the same offset in its line, so the lines of
// a row are counted once and each row costs its prefetches and an add: with the rows in cache
// already (a cache read again and again) the bookkeeping of a per-row count cost about as much as
// the prefetches themselves.
// Addresses are stepped as integers: the line of a row's first byte may lie before the tensor,
// and the step after the last row past its end, where a pointer may not point.
inline void prefetch_run(const char* p, int64_t stride, int64_t n, int64_t bytes) {
  if (n <= 0 || bytes <= 0) return;
  const auto at = [](uintptr_t a) { return reinterpret_cast<const char*>(a); };
  const uintptr_t start = reinterpret_cast<uintptr_t>(p), step = uintptr_t(stride);
  const uintptr_t offset = start & 63;
  if (stride % 64 != 0) {  // each row from the line of its first byte to that of its last
    uintptr_t row = start;
    for (int64_t j = 0; j < n; ++j, row += step) {
      const uintptr_t last = row + uintptr_t(bytes - 1);
      for (uintptr_t a = row & ~uintptr_t(63); a <= last; a += 64) prefetch_line(at(a));
    }
    return;
  }
  const int64_t lines = (int64_t(offset) + bytes + 63) / 64;
  uintptr_t a = start - offset;
  switch (lines) {
    case 1:
      for (int64_t j = 0; j < n; ++j, a += step) prefetch_line(at(a));
      return;
    case 2:
      for (int64_t j = 0; j < n; ++j, a += step) {
        prefetch_line(at(a));
        prefetch_line(at(a + 64));
      }
      return;
    default:
      for (int64_t j = 0; j < n; ++j, a += step)
        for (int64_t l = 0; l < lines; ++l) prefetch_line(at(a + 64 * uintptr_t(l)));
      return;
  }
}

// Pointers to rows [j0, j0 + n) of head h of sequence b, and the rows (`bytes` bytes each)
// prefetched; for a paged cache the block and slot are stepped instead of divided per row, and
// each block's rows prefetched as one run.
template <class S>
inline void tile_rows(const Rows<S>& c, int64_t b, int64_t j0, int64_t n, int64_t h, int64_t bytes,
                      const S** out) {
  const int64_t stride = c.s1 * int64_t(sizeof(S));
  if (!c.table) {
    const S* p = c.p + b * c.s0 + j0 * c.s1 + h * c.s2;
    prefetch_run(reinterpret_cast<const char*>(p), stride, n, bytes);
    for (int64_t j = 0; j < n; ++j) out[j] = p + j * c.s1;
    return;
  }
  const int32_t* tab = c.table + b * c.max_blocks;
  int64_t blk = j0 / c.block_size, slot = j0 % c.block_size;
  for (int64_t j = 0; j < n; ++blk, slot = 0) {  // the rows of one block at a time
    const S* p = c.p + tab[blk] * c.s0 + slot * c.s1 + h * c.s2;
    const int64_t m = std::min(n - j, c.block_size - slot);
    prefetch_run(reinterpret_cast<const char*>(p), stride, m, bytes);
    for (int64_t k = 0; k < m; ++k) out[j + k] = p + k * c.s1;
    j += m;
  }
}

// Estimated nanoseconds of one core for one task of `keys` keys: the larger of reading its K/V
// rows (0.045 ns a byte) and the scores and value sums (0.1 ns per query row and head-dim element
// of a key), plus widening 16-bit rows into a float tile (0.025 ns a byte) and 1 us for the
// queries and the output.
// Measured with one thread on the 2-core AMD EPYC (AVX2) dev machine (load average 3.6), best of
// 200 calls at B8 Hk2 L512 D64: 22 ns a key with one query row (MHA), 33 with four (GQA 4), 39 in
// bfloat16, 375 with 64 (GQA 4 x Lq 16).
inline double task_ns(int64_t keys, int64_t nrows, int64_t D, int64_t itemsize, bool widen) {
  const double bytes = double(2 * D * itemsize);
  const double per_key =
      std::max(0.045 * bytes, 0.1 * double(nrows * D)) + (widen ? 0.025 * bytes : 0.0);
  return double(keys) * per_key + 1000.0;
}

template <class S, class T>
void attend(const Problem& p, const int32_t* lens, bool causal, T scale, const at::Tensor& q_t,
            const Rows<S>& kc, const Rows<S>& vc, S* out, T* lse) {
  const int64_t B = p.B, Lq = p.Lq, Hq = p.Hq, Hk = p.Hk, D = p.D, Dp = round_up(D, 16);
  const int64_t group = Hq / Hk, nrows = group * Lq, added = p.append ? Lq : 0;
  const Rows<const S> q(q_t, nullptr, 0, 0);
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  // bfloat16 rows read in place (kvcache_avx512_cpu.h) where the CPU has AVX512-BF16, else widened
  bool direct = false;
  if constexpr (std::is_same_v<S, c10::BFloat16>) direct = bf16_dot_enabled();
  const bool widens = !std::is_same_v<S, T> && !direct;
  [[maybe_unused]] const bool f16c = std::is_same_v<S, c10::Half> && f16c_enabled();
  // their scores on AMX tiles where the CPU has them and the task fits (kvcache_avx512_cpu.h)
  const bool amx = direct && amx_enabled() && amx_fits(nrows, D);
  // float rows on 16-lane vectors where the CPU has AVX-512 (kvcache_avx512_cpu.h)
  [[maybe_unused]] const bool wide = std::is_same_v<T, float> && f32x16_enabled();
  // Splits of the key range when batch x kv heads gives fewer tasks than about four per thread
  // worth waking (several per thread, so that a thread on a busy core takes fewer of them).
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, lens[b] + added);
  const int64_t units = B * Hk;
  const int64_t itemsize = int64_t(sizeof(S));
  const int64_t threads = cpu::threads_for(units * std::max<int64_t>(1, max_len / kMinSplit),
                                           task_ns(kMinSplit, nrows, D, itemsize, widens));
  int64_t nsplit = 1;
  if (threads > 1 && units < 4 * threads)
    nsplit =
        std::min<int64_t>(ceil_div(4 * threads, units), std::max<int64_t>(1, max_len / kMinSplit));
  const int64_t split_len = nsplit > 1 ? round_up(ceil_div(max_len, nsplit), kTile) : max_len;
  nsplit = nsplit > 1 ? ceil_div(max_len, split_len) : 1;
  // Partial results of the splits: O (unnormalised) [task][nrows][Dp], m and l [task][nrows].
  T* part_o = nullptr;
  T* part_ml = nullptr;
  std::vector<T> part;
  if (nsplit > 1) {
    part.resize(size_t(units * nsplit * nrows * (Dp + 2)));
    part_o = part.data();
    part_ml = part_o + units * nsplit * nrows * Dp;
  }

  auto visible_end = [&](int64_t len_k, int64_t i) -> int64_t {
    return causal ? std::clamp<int64_t>(len_k - Lq + i + 1, 0, len_k) : len_k;
  };

  const int64_t Dq = round_up(D, kBf16QAlign);
  const double ns_task = task_ns(std::min(split_len, max_len), nrows, D, itemsize, widens);
  cpu::parallel_for(0, units * nsplit, ns_task, [&](int64_t begin, int64_t end) {
    const bool widen = widens;
    // scratch: Q, O [nrows][Dp]; P [nrows][kTile]; K, V tiles [kTile][Dp] (16-bit caches widened
    // here); m, l, alpha [nrows]; the AMX scores' block [16][kAmxMaxRows]; and for the direct
    // path the bfloat16 Q [nrows][Dq] (and in the tiles' layout, [D][nrows])
    T* Q = scratch<T>(2 * nrows * Dp + nrows * kTile + (widen ? 2 * kTile * Dp : 0) + 3 * nrows +
                      (amx ? 16 * kAmxMaxRows : 0));
    T* O = Q + nrows * Dp;
    T* P = O + nrows * Dp;
    T* Kbuf = P + nrows * kTile;
    T* Vbuf = Kbuf + (widen ? kTile * Dp : 0);
    T* m = Vbuf + (widen ? kTile * Dp : 0);
    T* l = m + nrows;
    T* alpha = l + nrows;
    int32_t* nvis = scratch<int32_t>(nrows);
    T* amx_buf = alpha + nrows;
    uint16_t* Qb = direct ? scratch<uint16_t>(nrows * Dq + (amx ? nrows * D : 0)) : nullptr;
    uint16_t* Qv = amx ? Qb + nrows * Dq : nullptr;
    if (amx) amx_begin(nrows);  // the tiles of this thread, for this chunk of tasks
    const S* ks[2][kTile];
    const S* vs[2][kTile];
    const T* krows[kTile];
    const T* vrows[kTile];
    const int64_t row_bytes = D * itemsize;
    // Rows [j0, j0 + n) of head h of sequence b: their pointers into buffer `buf`, and the rows
    // prefetched.
    auto load_tile = [&](int64_t b, int64_t j0, int64_t n, int64_t h, int buf) {
      tile_rows(kc, b, j0, n, h, row_bytes, ks[buf]);
      tile_rows(vc, b, j0, n, h, row_bytes, vs[buf]);
    };
    // The first tile of task t into buffer `buf`. Called for the next task during a task's last
    // tile, so that a task's first keys are on their way before it starts (tasks of a few short
    // tiles are otherwise mostly waiting).
    auto first_tile = [&](int64_t t, int buf) {
      const int64_t sp = t % nsplit, h = (t / nsplit) % Hk, bb = t / (nsplit * Hk);
      const int64_t kb = sp * split_len;
      const int64_t n0 = std::min(kTile, std::min(int64_t(lens[bb]) + added, kb + split_len) - kb);
      if (n0 > 0) load_tile(bb, kb, n0, h, buf);
    };
    int cur = 0;  // the buffer of the tile computed next
    first_tile(begin, cur);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % nsplit, hk = (task / nsplit) % Hk, b = task / (nsplit * Hk);
      const int64_t len_k = int64_t(lens[b]) + added;
      const int64_t k_begin = split * split_len, k_end = std::min(len_k, k_begin + split_len);
      if (k_begin >= k_end && task + 1 < end) first_tile(task + 1, cur);  // no tile of its own
      for (int64_t r = 0; r < nrows; ++r) {
        const S* src = q.row(b, r % Lq, hk * group + r / Lq);
        if (direct) {  // the bit patterns, unscaled (the scores are scaled), zero-padded to Dq
          uint16_t* dst = Qb + r * Dq;
          std::memcpy(dst, src, D * sizeof(uint16_t));
          std::fill(dst + D, dst + Dq, uint16_t(0));
          if (amx && r + 1 == nrows) amx_pack_q(Qb, Dq, nrows, D, Qv);
          continue;
        }
        T* dst = Q + r * Dp;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]) * scale;
      }
      std::fill(O, O + nrows * Dp, T(0));
      std::fill(m, m + nrows, kNegInf);
      std::fill(l, l + nrows, T(0));
      for (int64_t j0 = k_begin; j0 < k_end; j0 += kTile, cur ^= 1) {
        const int64_t nc = std::min(kTile, k_end - j0);
        if (j0 + kTile < k_end) {  // the next tile, while this one is loaded and computed
          load_tile(b, j0 + kTile, std::min(kTile, k_end - j0 - kTile), hk, cur ^ 1);
        } else if (task + 1 < end) {
          first_tile(task + 1, cur ^ 1);
        }
        for (int64_t r = 0; r < nrows; ++r)
          nvis[r] = int32_t(std::clamp<int64_t>(visible_end(len_k, r % Lq) - j0, 0, nc));
        // the scores take keys eight at a time: the last row repeated up to a multiple of 8
        if constexpr (std::is_same_v<S, c10::BFloat16>) {
          if (direct) {
            for (int64_t j = nc; j < round_up(nc, 8); ++j) ks[cur][j] = ks[cur][nc - 1];
            const int64_t on_tiles =
                amx ? amx_scores_bf16(Qv, nrows, ks[cur], nc, D, float(scale), P, amx_buf) : 0;
            if (on_tiles < nc)
              scores_bf16(Qb, Dq, nrows, ks[cur] + on_tiles, nc - on_tiles, D, float(scale),
                          P + on_tiles);
            if (wide)
              softmax_f32x16(P, nrows, nvis, m, l, alpha);
            else
              softmax_f32(P, nrows, nvis, m, l, alpha);
            accum_bf16(O, Dp, nrows, P, vs[cur], nc, D, alpha);
            continue;
          }
        }
        // Row pointers of the tile: into the cache itself when it holds T, else into the tile
        // buffers after widening.
        const T** kp = krows;
        const T** vp = vrows;
        if constexpr (std::is_same_v<S, T>) {
          kp = ks[cur];
          vp = vs[cur];
        } else {
          for (int64_t j = 0; j < nc; ++j) {
            T* kd = Kbuf + j * Dp;
            T* vd = Vbuf + j * Dp;
            if constexpr (std::is_same_v<S, c10::BFloat16>) {
              widen_bf16(reinterpret_cast<const uint16_t*>(ks[cur][j]), kd, D);
              widen_bf16(reinterpret_cast<const uint16_t*>(vs[cur][j]), vd, D);
            } else if constexpr (std::is_same_v<S, c10::Half>) {
              widen_f16(reinterpret_cast<const uint16_t*>(ks[cur][j]), kd, D, f16c);
              widen_f16(reinterpret_cast<const uint16_t*>(vs[cur][j]), vd, D, f16c);
            } else {
              for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<T>(ks[cur][j][d]);
              for (int64_t d = 0; d < D; ++d) vd[d] = static_cast<T>(vs[cur][j][d]);
            }
            krows[j] = kd;
            vrows[j] = vd;
          }
        }
        if constexpr (std::is_same_v<T, float>) {
          for (int64_t j = nc; j < round_up(nc, 8); ++j) kp[j] = kp[nc - 1];
          if (wide)
            scores_f32x16(Q, Dp, nrows, kp, nc, D, P);
          else
            scores_f32(Q, Dp, nrows, kp, nc, D, P);
        } else {
          scores(Q, Dp, nrows, kp, nc, D, P);
        }
        if constexpr (std::is_same_v<T, float>) {
          if (wide)
            softmax_f32x16(P, nrows, nvis, m, l, alpha);
          else
            softmax_f32(P, nrows, nvis, m, l, alpha);
        } else
          softmax_step(P, nrows, nvis, m, l, alpha);
        if constexpr (std::is_same_v<T, float>) {
          if (wide)
            accum_f32x16(O, Dp, nrows, P, vp, nc, D, alpha);
          else
            accum_f32(O, Dp, nrows, P, vp, nc, D, alpha);
        } else {
          accum(O, Dp, nrows, P, vp, nc, D, alpha);
        }
      }
      if (nsplit > 1) {
        std::memcpy(part_o + task * nrows * Dp, O, nrows * Dp * sizeof(T));
        T* ml = part_ml + task * nrows * 2;
        std::memcpy(ml, m, nrows * sizeof(T));
        std::memcpy(ml + nrows, l, nrows * sizeof(T));
        continue;
      }
      for (int64_t r = 0; r < nrows; ++r) {
        const int64_t i = r % Lq, h = hk * group + r / Lq;
        S* o = out + ((b * Lq + i) * Hq + h) * D;
        T* ls = lse + (b * Hq + h) * Lq + i;
        if (l[r] != T(0)) {  // a NaN l (a NaN score) makes out and lse NaN
          const T inv = T(1) / l[r];
          if constexpr (std::is_same_v<S, c10::BFloat16>) {
            if (direct) {
              store_bf16(O + r * Dp, inv, D, reinterpret_cast<uint16_t*>(o));
              *ls = m[r] + std::log(l[r]);
              continue;
            }
          }
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<S>(O[r * Dp + d] * inv);
          *ls = m[r] + std::log(l[r]);
        } else {  // no visible key, or every visible score -inf
          std::fill(o, o + D, static_cast<S>(0));
          *ls = kNegInf;
        }
      }
    }
    if (amx) amx_end();
  });
  if (nsplit == 1) return;

  // Merge the splits of every (sequence, kv head, row): about 1 ns per split and element of a
  // row (a scaled add of a row held in L2).
  cpu::parallel_for(0, units * nrows, double(nsplit * Dp) * 1.0, [&](int64_t begin, int64_t end) {
    T* acc = scratch<T>(Dp);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t % nrows, unit = t / nrows, hk = unit % Hk, b = unit / Hk;
      const int64_t i = r % Lq, h = hk * group + r / Lq;
      T mx = kNegInf;
      bool nan = false;  // a split saw a NaN score: the row is NaN
      for (int64_t s = 0; s < nsplit; ++s) {
        const T* ml = part_ml + (unit * nsplit + s) * nrows * 2;
        if (ml[nrows + r] > T(0)) mx = std::max(mx, ml[r]);
        nan |= std::isnan(ml[nrows + r]);
      }
      S* o = out + ((b * Lq + i) * Hq + h) * D;
      T* ls = lse + (b * Hq + h) * Lq + i;
      if (nan) {
        std::fill(o, o + D, static_cast<S>(std::numeric_limits<T>::quiet_NaN()));
        *ls = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      if (mx == kNegInf) {  // no split saw a key
        std::fill(o, o + D, static_cast<S>(0));
        *ls = kNegInf;
        continue;
      }
      std::fill(acc, acc + Dp, T(0));
      T sum = 0;
      for (int64_t s = 0; s < nsplit; ++s) {
        const int64_t task = unit * nsplit + s;
        const T* ml = part_ml + task * nrows * 2;
        if (!(ml[nrows + r] > T(0))) continue;
        const T w = std::exp(ml[r] - mx);
        sum += w * ml[nrows + r];
        const T* po = part_o + (task * nrows + r) * Dp;
        for (int64_t d = 0; d < Dp; ++d) acc[d] += w * po[d];
      }
      const T inv = T(1) / sum;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<S>(acc[d] * inv);
      *ls = mx + std::log(sum);
    }
  });
}

// ---- binding ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> attention_with_kvcache_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
    const std::optional<at::Tensor>& block_table, double scale, bool causal) {
  const Problem p = check_problem(kOp, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                  block_table, /*allow_double=*/true, /*max_head_dim=*/0);
  const at::Tensor lens_t = cache_seqlens.contiguous();
  const at::Tensor table_t = p.paged ? block_table->contiguous() : at::Tensor();
  const int32_t* lens = lens_t.const_data_ptr<int32_t>();
  const int32_t* table = p.paged ? table_t.const_data_ptr<int32_t>() : nullptr;
  check_values(p, lens, table);

  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty({p.B, p.Lq, p.Hq, p.D}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(acc));
  dispatch_cpu_dtype(kOp, q.scalar_type(), [&]<class S, class T>() {
    const Rows<S> kc(k_cache, table, p.block_size, p.max_blocks);
    const Rows<S> vc(v_cache, table, p.block_size, p.max_blocks);
    if (p.append && p.B * p.Lq * p.Hk * p.D > 0) append<S>(p, lens, *k_new, *v_new, kc, vc);
    if (p.B * p.Lq * p.Hq == 0) return;
    attend<S, T>(p, lens, causal, T(scale), q, kc, vc, out.mutable_data_ptr<S>(),
                 lse.mutable_data_ptr<T>());
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("attention_with_kvcache", &attention_with_kvcache_cpu);
}

}  // namespace genext::kv
