// Flash attention on the CPU: forward and backward, float32/float64/float16/bfloat16. This header
// holds what the files of the CPU kernel share: flash_attention_cpu.cpp (the op bindings: checks,
// outputs, sequences), flash_fwd_cpu.cpp and flash_bwd_cpu.cpp (the passes over the tiles), and
// flash_tiles_cpu.h (the vectorised tile routines the passes call).
//
// Work is cut into tiles of kBr query rows and kBc keys; no Lq x Lk tensor exists anywhere. Each
// thread holds a few tiles in float scratch (double for float64 input): O(kBr * D) memory.
//
// Forward, one task per (sequence, query head, run of up to 4 query tiles, which share each key
// and value tile loaded): a tile's queries (pre-multiplied by the softmax scale) meet the key
// tiles one after another; a running row maximum m and row sum l rescale the output accumulator
// whenever m grows (online softmax), and the row ends as O / l with lse = m + log(l). Causal
// tiles stop at the last key their last row can see.
//
// Backward, from the saved lse (so P = exp(S - lse) is recomputed exactly, tile by tile):
//   delta_i = sum_d dO_id * O_id
//   dV_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i . V_j - delta_i),  dK_j = scale sum_i dS_ij Q_i,
//   dQ_i = scale sum_j dS_ij K_j.
// One pass (flash_bwd_cpu.cpp): one task per (sequence, KV head, run of key tiles); for each query
// head of the group and each query tile it computes S and dP against the run's key tiles, adds
// P^T dO and dS^T Q into the run's dK/dV scratch and dS K into the query tile's dQ: 5 tile
// products per pair. A sequence's key tiles are cut into runs (at least 16 tasks in all, at most
// 4 tiles a run where memory allows) by the shapes alone, never by the thread count; with one run
// dQ is written directly, with several each run writes a partial dQ and the partials are added in
// run order afterwards. Where that memory would pass a cap, two passes run instead: dK/dV per
// (sequence, KV head, run of key tiles), then dQ per (sequence, query head, run of query tiles),
// S and dP computed in both (7 products per pair). Either way every output element is summed in
// an order fixed by the shapes: results are deterministic, the same on any number of threads.
//
// Tiles in scratch: row-major [rows][Dp] (Dp = D rounded up to whole vectors, zero padded) for Q,
// dO, V, K, and transposed [D][kBc] (zero padded beyond the valid keys) for the right-hand side of
// S = Q K^T and dP = dO V^T. Both products are then sums of scaled contiguous rows: S_i += q_id *
// Kt_d and O_i += p_ij * V_j, written with GCC vector extensions over register blocks of a few rows
// by a few vectors. The float versions of these tile routines are compiled per ISA level, each
// product with the register block that fits the level's registers, and chosen at run time; exp is a
// polynomial in those vectors.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <utility>
#include <vector>

#include "flash_attention/flash_attention_checks.h"

namespace genext::fa::cpu {

constexpr int64_t kBr = 64;  // query rows per tile
constexpr int64_t kBc = 64;  // keys per tile
constexpr int kLanes = 16;   // the widest vectors the tiles use (Dp granularity: tile_dp)

// ---- problem layout -----------------------------------------------------------------------------

// A (B, L, H, D) tensor with unit stride in D, read as storage type S.
template <class S>
struct View {
  const S* p;
  int64_t sb, sl, sh;
  explicit View(const at::Tensor& t)
      : p(t.const_data_ptr<S>()), sb(t.stride(0)), sl(t.stride(1)), sh(t.stride(2)) {}
  const S* row(int64_t b, int64_t l, int64_t h) const { return p + b * sb + l * sl + h * sh; }
};

// One sequence as the kernels see it: its batch index, first query/key row, lengths, and the
// causal diagonal offset. Query row i (local) sees keys [0, visible_end(i)).
struct Seq {
  int64_t b = 0, q0 = 0, k0 = 0;
  int64_t lq = 0, lk_rows = 0, lk = 0;  // lk_rows: key rows it owns; lk: keys used (<= lk_rows)
  int64_t off = 0;
  bool causal = false;
  int64_t visible_end(int64_t i) const { return causal ? std::min(lk, i + off + 1) : lk; }
};

// (sequence, tile) pairs; within a sequence the tiles alternate from both ends (0, n-1, 1, n-2,
// ...), so the consecutive tasks a thread takes mix cheap and dear causal tiles.
inline std::vector<std::pair<int32_t, int32_t>> make_tiles(const std::vector<Seq>& seqs, bool keys,
                                                           int64_t tile) {
  std::vector<std::pair<int32_t, int32_t>> out;
  for (size_t s = 0; s < seqs.size(); ++s) {
    const int64_t len = keys ? seqs[s].lk_rows : seqs[s].lq;
    const int64_t n = (len + tile - 1) / tile;
    for (int64_t t = 0; t < n; ++t)
      out.emplace_back(int32_t(s), int32_t(t % 2 == 0 ? t / 2 : n - 1 - t / 2));
  }
  return out;
}

// (query tile, key tile) pairs over all sequences, causal masking ignored: the work estimate the
// passes give genext::cpu::parallel_for.
inline int64_t count_pairs(const std::vector<Seq>& seqs) {
  int64_t n = 0;
  for (const Seq& s : seqs) n += ((s.lq + kBr - 1) / kBr) * ((s.lk_rows + kBc - 1) / kBc);
  return n;
}

// Float (or double) scratch, 64-byte aligned, uninitialised: every routine writes what it later
// reads (load_rows zeroes the rows' padding itself). Zeroing it all was about 350 KiB of memset per
// chunk of tasks at D 160 (about 2% of a forward+backward's perf samples at L 64, one tile pair per
// task).
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = ((std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p, "flash_attention (CPU): out of memory for ", bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- the passes (flash_fwd_cpu.cpp, flash_bwd_cpu.cpp) ------------------------------------------

// out (B, Lq, Hq, D) in q's dtype and lse (B, Hq, Lq) in float (double for float64) from p's q, k,
// v; rows outside every sequence are left as they are.
void forward(const char* op, const Problem& p, const std::vector<Seq>& seqs, double scale,
             at::Tensor& out, at::Tensor& lse);
// dq, dk, dv (shaped and typed like q, k, v) from grad_out, out and lse (float, or double for
// float64; contiguous); delta is (B, Hq, Lq) scratch of lse's dtype.
void backward(const char* op, const Problem& p, const std::vector<Seq>& seqs, double scale,
              const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
              at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

}  // namespace genext::fa::cpu
