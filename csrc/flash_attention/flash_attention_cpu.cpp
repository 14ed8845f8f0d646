// Flash attention on the CPU: forward and backward, float32/float64/float16/bfloat16.
//
// Work is cut into tiles of kBr query rows and kBc keys; no Lq x Lk tensor exists anywhere. Each
// thread holds a few tiles in float scratch (double for float64 input): O(kBr * D) memory.
//
// Forward, one task per (sequence, query head, query tile): the tile's queries (pre-multiplied by
// the softmax scale) meet the key tiles one after another; a running row maximum m and row sum l
// rescale the output accumulator whenever m grows (online softmax), and the row ends as O / l with
// lse = m + log(l). Causal tiles stop at the last key their last row can see.
//
// Backward, from the saved lse (so P = exp(S - lse) is recomputed exactly, tile by tile):
//   delta_i = sum_d dO_id * O_id
//   dV_j = sum_i P_ij dO_i,  dS_ij = P_ij (dO_i . V_j - delta_i),  dK_j = scale sum_i dS_ij Q_i,
//   dQ_i = scale sum_j dS_ij K_j.
// dK/dV: one task per (sequence, KV head, key tile), looping over the group's query heads and the
// query tiles that can see the keys; dQ: one task per (sequence, query head, query tile). S and dP
// are computed twice (once per pass) in exchange for no atomics and no shared accumulators: every
// output element has one writer and a fixed summation order, so results are deterministic.
//
// Tiles in scratch: row-major [rows][Dp] (Dp = D rounded up to 16, zero padded) for Q, dO, V, K,
// and transposed [D][kBc] (zero padded beyond the valid keys) for the right-hand side of S = Q K^T
// and dP = dO V^T. Both products are then sums of scaled contiguous rows: S_i += q_id * Kt_d and
// O_i += p_ij * V_j, written with 16-lane vectors (GCC vector extensions) over 4 rows at a time.
// The float versions of these tile routines are compiled per ISA level and chosen when the library
// loads (GENEXT_CPU_CLONES); exp is a polynomial in those vectors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_simd.h"
#include "common/device_name.h"
#include "flash_attention/flash_attention_checks.h"

namespace genext::fa {
namespace {

constexpr int64_t kBr = 64;  // query rows per tile
constexpr int64_t kBc = 64;  // keys per tile
constexpr int kLanes = simd::kLanes;  // lanes of the tile vectors; kBc is a multiple of it
constexpr int kRows = 4;     // rows per register block in the tile products

// ---- vectors (common/cpu_simd.h) ----------------------------------------------------------------

using simd::f32x16;
using simd::f64x16;
using simd::hsum;
using simd::i32x16;
using simd::lane_index;
using simd::load;
using simd::splat;
using simd::store;
using simd::Vec;

// exp(x) for float lanes (common/cpu_simd.h), x <= 0 in use (scores minus their maximum or their
// lse); callers zero the masked lanes themselves.
GENEXT_INLINE f32x16 exp_v(f32x16 x) { return simd::exp_v(x); }
// float64 (the gradcheck path): libm, lane by lane
GENEXT_INLINE f64x16 exp_v(f64x16 x) {
  for (int t = 0; t < kLanes; ++t) x[t] = std::exp(x[t]);
  return x;
}

// ---- tile routines ------------------------------------------------------------------------------

// S[i][0:kBc] = sum_{d < D} A[i][d] * Bt[d][0:kBc] for i < nr. A: rows of stride lda; Bt: [D][kBc].
template <class T, int R>
GENEXT_INLINE void qk_block(const T* __restrict__ A, int64_t lda, const T* __restrict__ Bt, int64_t D,
                        T* __restrict__ S) {
  using V = typename Vec<T>::V;
  constexpr int W = kBc / kLanes;
  V acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V b[W];
    for (int w = 0; w < W; ++w) b[w] = load<V>(Bt + d * kBc + w * kLanes);
    for (int r = 0; r < R; ++r) {
      const V a = splat<V>(A[r * lda + d]);
      for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store(S + r * kBc + w * kLanes, acc[r][w]);
}

template <class T>
GENEXT_INLINE void qk_tile_impl(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, int64_t nr) {
  int64_t i = 0;
  for (; i + kRows <= nr; i += kRows) qk_block<T, kRows>(A + i * lda, lda, Bt, D, S + i * kBc);
  for (; i < nr; ++i) qk_block<T, 1>(A + i * lda, lda, Bt, D, S + i * kBc);
}

// Out[i][d0 : d0 + W*16] = Out[i][...] * row_scale[i] + sum_{j < nc} C(i, j) * In[j][...], with
// C(i, j) = C[i * cr + j * cc] (so a transposed coefficient matrix costs nothing).
template <class T, int R, int W>
GENEXT_INLINE void accum_block(T* __restrict__ Out, int64_t ldo, const T* __restrict__ C, int64_t cr,
                           int64_t cc, const T* __restrict__ In, int64_t ldi, int64_t nc,
                           const T* __restrict__ row_scale) {
  using V = typename Vec<T>::V;
  V acc[R][W];
  for (int r = 0; r < R; ++r) {
    const V s = splat<V>(row_scale ? row_scale[r] : T(1));
    for (int w = 0; w < W; ++w) acc[r][w] = load<V>(Out + r * ldo + w * kLanes) * s;
  }
  for (int64_t j = 0; j < nc; ++j) {
    V b[W];
    for (int w = 0; w < W; ++w) b[w] = load<V>(In + j * ldi + w * kLanes);
    for (int r = 0; r < R; ++r) {
      const V a = splat<V>(C[r * cr + j * cc]);
      for (int w = 0; w < W; ++w) acc[r][w] += a * b[w];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) store(Out + r * ldo + w * kLanes, acc[r][w]);
}

template <class T, int R>
GENEXT_INLINE void accum_rows(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc, const T* In,
                          int64_t ldi, int64_t nc, int64_t Dp, const T* row_scale) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= Dp; d0 += 4 * kLanes)
    accum_block<T, R, 4>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale);
  switch ((Dp - d0) / kLanes) {
    case 3: accum_block<T, R, 3>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale); break;
    case 2: accum_block<T, R, 2>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale); break;
    case 1: accum_block<T, R, 1>(Out + d0, ldo, C, cr, cc, In + d0, ldi, nc, row_scale); break;
    default: break;
  }
}

template <class T>
GENEXT_INLINE void accum_tile_impl(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc,
                               const T* In, int64_t ldi, int64_t nr, int64_t nc, int64_t Dp,
                               const T* row_scale) {
  int64_t i = 0;
  for (; i + kRows <= nr; i += kRows)
    accum_rows<T, kRows>(Out + i * ldo, ldo, C + i * cr, cr, cc, In, ldi, nc, Dp,
                         row_scale ? row_scale + i : nullptr);
  for (; i < nr; ++i)
    accum_rows<T, 1>(Out + i * ldo, ldo, C + i * cr, cr, cc, In, ldi, nc, Dp,
                     row_scale ? row_scale + i : nullptr);
}

// Online-softmax step on a score tile S [nr][kBc] whose row r sees its first nvis[r] columns:
// S becomes P = exp(S - m_new) (0 where masked); m, l are updated and alpha[r] = exp(m_old - m_new)
// is the factor the row's output accumulator must be rescaled by.
template <class T>
GENEXT_INLINE void softmax_fwd_impl(T* S, int64_t nr, const int32_t* nvis, T* m, T* l, T* alpha) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const I lanes = lane_index<I>();
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * kBc;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      std::memset(s, 0, kBc * sizeof(T));
      alpha[r] = T(1);
      continue;
    }
    T mx = kNegInf;
    for (int32_t j = 0; j < nv; ++j) mx = s[j] > mx ? s[j] : mx;
    const T m_new = std::max(m[r], mx);
    alpha[r] = m[r] == kNegInf ? T(0) : std::exp(m[r] - m_new);
    V sum{};
    for (int w = 0; w < kBc / kLanes; ++w) {
      V e = exp_v(load<V>(s + w * kLanes) - m_new);
      e = (lanes + w * kLanes) < splat<I>(nv) ? e : V{};
      store(s + w * kLanes, e);
      sum += e;
    }
    l[r] = l[r] * alpha[r] + hsum<T>(sum);
    m[r] = m_new;
  }
}

// Backward step on S [nr][kBc] (scores) and dP [nr][kBc] (dO . V): S becomes P = exp(S - lse)
// and dP becomes dS = P * (dP - delta), both 0 where masked (columns >= nvis[r]).
template <class T>
GENEXT_INLINE void softmax_bwd_impl(T* S, T* dP, int64_t nr, const int32_t* nvis, const T* lse,
                                const T* delta) {
  using V = typename Vec<T>::V;
  using I = typename Vec<T>::I;
  const I lanes = lane_index<I>();
  for (int64_t r = 0; r < nr; ++r) {
    T* s = S + r * kBc;
    T* dp = dP + r * kBc;
    const int32_t nv = nvis[r];
    if (nv <= 0) {
      std::memset(s, 0, kBc * sizeof(T));
      std::memset(dp, 0, kBc * sizeof(T));
      continue;
    }
    for (int w = 0; w < kBc / kLanes; ++w) {
      V p = exp_v(load<V>(s + w * kLanes) - lse[r]);
      p = (lanes + w * kLanes) < splat<I>(nv) ? p : V{};
      store(s + w * kLanes, p);
      store(dp + w * kLanes, p * (load<V>(dp + w * kLanes) - delta[r]));
    }
  }
}

// Entry points: float compiled per ISA level (GENEXT_CPU_CLONES), double once.
#define FA_ENTRY_POINTS(T, ATTR)                                                                   \
  ATTR void qk_tile(const T* A, int64_t lda, const T* Bt, int64_t D, T* S, int64_t nr) {           \
    qk_tile_impl<T>(A, lda, Bt, D, S, nr);                                                         \
  }                                                                                                \
  ATTR void accum_tile(T* Out, int64_t ldo, const T* C, int64_t cr, int64_t cc, const T* In,      \
                       int64_t ldi, int64_t nr, int64_t nc, int64_t Dp, const T* row_scale) {      \
    accum_tile_impl<T>(Out, ldo, C, cr, cc, In, ldi, nr, nc, Dp, row_scale);                       \
  }                                                                                                \
  ATTR void softmax_fwd(T* S, int64_t nr, const int32_t* nvis, T* m, T* l, T* alpha) {             \
    softmax_fwd_impl<T>(S, nr, nvis, m, l, alpha);                                                 \
  }                                                                                                \
  ATTR void softmax_bwd(T* S, T* dP, int64_t nr, const int32_t* nvis, const T* lse,               \
                        const T* delta) {                                                          \
    softmax_bwd_impl<T>(S, dP, nr, nvis, lse, delta);                                              \
  }

FA_ENTRY_POINTS(float, GENEXT_CPU_CLONES)
FA_ENTRY_POINTS(double, )

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

// Validates cu_seqlens on the CPU: starts at 0, non-decreasing, ends within the rows, and no
// sequence longer than max_seqlen (the launch grid of the CUDA kernels is sized by max_seqlen).
void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t rows,
                      const char* rows_of, const char* max_name, int64_t max_seqlen) {
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t n = cu.numel();
  TORCH_CHECK_VALUE(c[0] == 0, op, ": ", name, " must start at 0, got ", c[0]);
  for (int64_t s = 0; s + 1 < n; ++s) {
    TORCH_CHECK_VALUE(c[s + 1] >= c[s], op, ": ", name, " must be non-decreasing, got ", name, "[",
                      s + 1, "] = ", c[s + 1], " < ", name, "[", s, "] = ", c[s]);
    TORCH_CHECK_VALUE(c[s + 1] - c[s] <= max_seqlen, op, ": sequence ", s, " has ",
                      c[s + 1] - c[s], " rows in ", name, ", more than ", max_name, " = ",
                      max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] <= rows, op, ": the last entry of ", name, " (", c[n - 1],
                    ") exceeds the number of rows of ", rows_of, " (", rows, ")");
}

std::vector<Seq> make_seqs(const char* op, const Problem& p, int64_t max_seqlen_q,
                           int64_t max_seqlen_k, bool causal, bool bottom_right) {
  std::vector<Seq> seqs(p.batch);
  const int64_t rows_q = p.q.size(1), rows_k = p.k.size(1);
  if (p.varlen) {
    check_cu_seqlens(op, "cu_seqlens_q", *p.cu_q, rows_q, "q", "max_seqlen_q", max_seqlen_q);
    check_cu_seqlens(op, "cu_seqlens_k", *p.cu_k, rows_k, "k", "max_seqlen_k", max_seqlen_k);
  }
  const int32_t* cq = p.varlen ? p.cu_q->const_data_ptr<int32_t>() : nullptr;
  const int32_t* ck = p.varlen ? p.cu_k->const_data_ptr<int32_t>() : nullptr;
  const int32_t* used = p.seqused_k ? p.seqused_k->const_data_ptr<int32_t>() : nullptr;
  for (int64_t s = 0; s < p.batch; ++s) {
    Seq& q = seqs[s];
    q.causal = causal;
    if (p.varlen) {
      q.q0 = cq[s], q.lq = cq[s + 1] - cq[s];
      q.k0 = ck[s], q.lk_rows = ck[s + 1] - ck[s];
    } else {
      q.b = s, q.lq = rows_q, q.lk_rows = rows_k;
    }
    q.lk = q.lk_rows;
    if (used) {
      TORCH_CHECK_VALUE(used[s] >= 0 && used[s] <= q.lk_rows, op, ": seqused_k[", s, "] = ",
                        used[s], " is outside [0, ", q.lk_rows, "], the key rows of sequence ", s);
      q.lk = used[s];
    }
    q.off = bottom_right ? q.lk - q.lq : 0;
  }
  return seqs;
}

// (sequence, tile) pairs; within a sequence the tiles alternate from both ends (0, n-1, 1, n-2,
// ...), so the contiguous ranges at::parallel_for hands each thread mix cheap and dear causal
// tiles.
std::vector<std::pair<int32_t, int32_t>> make_tiles(const std::vector<Seq>& seqs, bool keys,
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

// Float (or double) scratch, 64-byte aligned.
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = ((std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p, "flash_attention (CPU): out of memory for ", bytes, " bytes of scratch");
    std::memset(p, 0, bytes);
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Rows [r0, r0 + nr) of one head into a [nr][Dp] tile, times `mul`; the padding stays zero.
template <class S, class T>
inline void load_rows(const View<S>& v, int64_t b, int64_t r0, int64_t nr, int64_t h, int64_t D,
                      int64_t Dp, T mul, T* dst) {
  for (int64_t r = 0; r < nr; ++r) {
    const S* src = v.row(b, r0 + r, h);
    T* d = dst + r * Dp;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<T>(src[c]) * mul;
  }
}

// Rows [r0, r0 + n) of one head into a transposed [D][kBc] tile; columns n..kBc-1 are zeroed.
template <class S, class T>
inline void load_cols(const View<S>& v, int64_t b, int64_t r0, int64_t n, int64_t h, int64_t D,
                      T* dst) {
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * kBc + n, dst + (d + 1) * kBc, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const S* src = v.row(b, r0 + j, h);
    for (int64_t d = 0; d < D; ++d) dst[d * kBc + j] = static_cast<T>(src[d]);
  }
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---- forward ------------------------------------------------------------------------------------

template <class S, class T>
void forward(const Problem& p, const std::vector<Seq>& seqs, T scale, S* out, T* lse) {
  const int64_t D = p.D, Dp = round_up(D, kLanes), Hq = p.Hq, group = p.Hq / p.Hk;
  const int64_t rows_q = p.q.size(1);
  const View<S> q(p.q), k(p.k), v(p.v);
  const auto tiles = make_tiles(seqs, /*keys=*/false, kBr);
  const int64_t ntasks = int64_t(tiles.size()) * Hq;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> Q(kBr * Dp), O(kBr * Dp), Kt(D * kBc), V(kBc * Dp), P(kBr * kBc);
    Scratch<T> m(kBr), l(kBr), alpha(kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const auto [si, tile] = tiles[task / Hq];
      const int64_t h = task % Hq, hk = h / group;
      const Seq& sq = seqs[si];
      const int64_t r0 = int64_t(tile) * kBr, nr = std::min(kBr, sq.lq - r0);
      load_rows(q, sq.b, sq.q0 + r0, nr, h, D, Dp, scale, Q.p);
      std::fill(O.p, O.p + kBr * Dp, T(0));
      std::fill(m.p, m.p + kBr, -std::numeric_limits<T>::infinity());
      std::fill(l.p, l.p + kBr, T(0));
      const int64_t kend = std::max<int64_t>(0, sq.visible_end(r0 + nr - 1));
      for (int64_t j0 = 0; j0 < kend; j0 += kBc) {
        const int64_t nc = std::min(kBc, kend - j0);
        load_cols(k, sq.b, sq.k0 + j0, nc, hk, D, Kt.p);
        load_rows(v, sq.b, sq.k0 + j0, nc, hk, D, Dp, T(1), V.p);
        qk_tile(Q.p, Dp, Kt.p, D, P.p, nr);
        for (int64_t r = 0; r < nr; ++r)
          nvis[r] = int32_t(std::clamp<int64_t>(sq.visible_end(r0 + r) - j0, 0, nc));
        softmax_fwd(P.p, nr, nvis.data(), m.p, l.p, alpha.p);
        accum_tile(O.p, Dp, P.p, kBc, 1, V.p, Dp, nr, nc, Dp, alpha.p);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = sq.q0 + r0 + r;
        S* o = out + ((sq.b * rows_q + row) * Hq + h) * D;
        T* ls = lse + (sq.b * Hq + h) * rows_q + row;
        if (l.p[r] > T(0)) {
          const T inv = T(1) / l.p[r];
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(O.p[r * Dp + c] * inv);
          *ls = m.p[r] + std::log(l.p[r]);
        } else {  // no visible key
          std::fill(o, o + D, static_cast<S>(0));
          *ls = -std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

// ---- backward -----------------------------------------------------------------------------------

// delta[b, h, row] = sum_d dO * O over every row of q (rows outside every sequence included: their
// values are never read).
template <class S, class T>
void compute_delta(const Problem& p, const at::Tensor& grad_out, const at::Tensor& out, T* delta) {
  const View<S> dO(grad_out), O(out);
  const int64_t B = p.q.size(0), rows = p.q.size(1), Hq = p.Hq, D = p.D;
  at::parallel_for(0, B * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / rows, row = br % rows;
      for (int64_t h = 0; h < Hq; ++h) {
        const S* g = dO.row(b, row, h);
        const S* o = O.row(b, row, h);
        T s = 0;
        for (int64_t c = 0; c < D; ++c) s += static_cast<T>(g[c]) * static_cast<T>(o[c]);
        delta[(b * Hq + h) * rows + row] = s;
      }
    }
  });
}

template <class S, class T>
void backward_dkdv(const Problem& p, const std::vector<Seq>& seqs, T scale,
                   const at::Tensor& grad_out, const T* lse, const T* delta, S* dk, S* dv) {
  const int64_t D = p.D, Dp = round_up(D, kLanes), Hq = p.Hq, Hk = p.Hk, group = Hq / Hk;
  const int64_t rows_q = p.q.size(1), rows_k = p.k.size(1);
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  const auto tiles = make_tiles(seqs, /*keys=*/true, kBc);
  const int64_t ntasks = int64_t(tiles.size()) * Hk;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> Kt(D * kBc), Vt(D * kBc), Q(kBr * Dp), G(kBr * Dp), P(kBr * kBc), dS(kBr * kBc);
    Scratch<T> dK(kBc * Dp), dV(kBc * Dp), L(kBr), Dl(kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const auto [si, tile] = tiles[task / Hk];
      const int64_t hk = task % Hk;
      const Seq& sq = seqs[si];
      const int64_t j0 = int64_t(tile) * kBc, nc = std::min(kBc, sq.lk_rows - j0);
      const int64_t nc_vis = std::clamp<int64_t>(sq.lk - j0, 0, nc);  // keys in use
      std::fill(dK.p, dK.p + kBc * Dp, T(0));
      std::fill(dV.p, dV.p + kBc * Dp, T(0));
      if (nc_vis > 0) {
        load_cols(k, sq.b, sq.k0 + j0, nc_vis, hk, D, Kt.p);
        load_cols(v, sq.b, sq.k0 + j0, nc_vis, hk, D, Vt.p);
        // first query row that sees key j0: i + off >= j0 when causal
        const int64_t i_first = sq.causal ? std::max<int64_t>(0, j0 - sq.off) : 0;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (int64_t i0 = i_first / kBr * kBr; i0 < sq.lq; i0 += kBr) {
            const int64_t nr = std::min(kBr, sq.lq - i0), row0 = sq.q0 + i0;
            load_rows(q, sq.b, row0, nr, h, D, Dp, scale, Q.p);
            load_rows(dO, sq.b, row0, nr, h, D, Dp, T(1), G.p);
            const T* lse_h = lse + (sq.b * Hq + h) * rows_q + row0;
            const T* delta_h = delta + (sq.b * Hq + h) * rows_q + row0;
            for (int64_t r = 0; r < nr; ++r) {
              L.p[r] = lse_h[r], Dl.p[r] = delta_h[r];
              nvis[r] = std::isinf(L.p[r]) ? 0
                        : int32_t(std::clamp<int64_t>(sq.visible_end(i0 + r) - j0, 0, nc_vis));
            }
            qk_tile(Q.p, Dp, Kt.p, D, P.p, nr);   // scaled scores
            qk_tile(G.p, Dp, Vt.p, D, dS.p, nr);  // dP = dO V^T
            softmax_bwd(P.p, dS.p, nr, nvis.data(), L.p, Dl.p);
            // dV_j += sum_i P_ij dO_i ; dK_j += sum_i dS_ij (scale Q_i): coefficients transposed
            accum_tile(dV.p, Dp, P.p, 1, kBc, G.p, Dp, nc_vis, nr, Dp, static_cast<T*>(nullptr));
            accum_tile(dK.p, Dp, dS.p, 1, kBc, Q.p, Dp, nc_vis, nr, Dp, static_cast<T*>(nullptr));
          }
        }
      }
      for (int64_t j = 0; j < nc; ++j) {
        const int64_t o = ((sq.b * rows_k + sq.k0 + j0 + j) * Hk + hk) * D;
        for (int64_t c = 0; c < D; ++c) {
          dk[o + c] = static_cast<S>(dK.p[j * Dp + c]);
          dv[o + c] = static_cast<S>(dV.p[j * Dp + c]);
        }
      }
    }
  });
}

template <class S, class T>
void backward_dq(const Problem& p, const std::vector<Seq>& seqs, T scale,
                 const at::Tensor& grad_out, const T* lse, const T* delta, S* dq) {
  const int64_t D = p.D, Dp = round_up(D, kLanes), Hq = p.Hq, group = p.Hq / p.Hk;
  const int64_t rows_q = p.q.size(1);
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  const auto tiles = make_tiles(seqs, /*keys=*/false, kBr);
  const int64_t ntasks = int64_t(tiles.size()) * Hq;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> Q(kBr * Dp), G(kBr * Dp), dQ(kBr * Dp), Kt(D * kBc), Vt(D * kBc), K(kBc * Dp);
    Scratch<T> P(kBr * kBc), dS(kBr * kBc), L(kBr), Dl(kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const auto [si, tile] = tiles[task / Hq];
      const int64_t h = task % Hq, hk = h / group;
      const Seq& sq = seqs[si];
      const int64_t i0 = int64_t(tile) * kBr, nr = std::min(kBr, sq.lq - i0), row0 = sq.q0 + i0;
      load_rows(q, sq.b, row0, nr, h, D, Dp, scale, Q.p);
      load_rows(dO, sq.b, row0, nr, h, D, Dp, T(1), G.p);
      std::fill(dQ.p, dQ.p + kBr * Dp, T(0));
      const T* lse_h = lse + (sq.b * Hq + h) * rows_q + row0;
      const T* delta_h = delta + (sq.b * Hq + h) * rows_q + row0;
      for (int64_t r = 0; r < nr; ++r) L.p[r] = lse_h[r], Dl.p[r] = delta_h[r];
      const int64_t kend = std::max<int64_t>(0, sq.visible_end(i0 + nr - 1));
      for (int64_t j0 = 0; j0 < kend; j0 += kBc) {
        const int64_t nc = std::min(kBc, kend - j0);
        load_cols(k, sq.b, sq.k0 + j0, nc, hk, D, Kt.p);
        load_cols(v, sq.b, sq.k0 + j0, nc, hk, D, Vt.p);
        load_rows(k, sq.b, sq.k0 + j0, nc, hk, D, Dp, T(1), K.p);
        for (int64_t r = 0; r < nr; ++r)
          nvis[r] = std::isinf(L.p[r]) ? 0
                    : int32_t(std::clamp<int64_t>(sq.visible_end(i0 + r) - j0, 0, nc));
        qk_tile(Q.p, Dp, Kt.p, D, P.p, nr);
        qk_tile(G.p, Dp, Vt.p, D, dS.p, nr);
        softmax_bwd(P.p, dS.p, nr, nvis.data(), L.p, Dl.p);
        accum_tile(dQ.p, Dp, dS.p, kBc, 1, K.p, Dp, nr, nc, Dp, static_cast<T*>(nullptr));
      }
      for (int64_t r = 0; r < nr; ++r) {
        S* o = dq + ((sq.b * rows_q + row0 + r) * Hq + h) * D;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(dQ.p[r * Dp + c] * scale);
      }
    }
  });
}

// ---- bindings -----------------------------------------------------------------------------------

constexpr const char* kFwd = "flash_attention_forward";
constexpr const char* kBwd = "flash_attention_backward";

inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double scale, bool causal, bool causal_bottom_right, bool deterministic) {
  const Problem p = check_problem(kFwd, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  max_seqlen_q, max_seqlen_k, /*allow_double=*/true,
                                  /*max_head_dim=*/0);
  const auto seqs = make_seqs(kFwd, p, max_seqlen_q, max_seqlen_k, causal, causal_bottom_right);
  const int64_t B = q.size(0), rows_q = q.size(1);
  const auto acc = acc_type(q.scalar_type());
  // varlen: rows outside every sequence are written by no task, so they start as out 0, lse -inf
  at::Tensor out = p.varlen ? at::zeros({B, rows_q, p.Hq, p.D}, q.options())
                            : at::empty({B, rows_q, p.Hq, p.D}, q.options());
  at::Tensor lse = p.varlen ? at::full({B, p.Hq, rows_q}, -std::numeric_limits<double>::infinity(),
                                       q.options().dtype(acc))
                            : at::empty({B, p.Hq, rows_q}, q.options().dtype(acc));
  if (out.numel() == 0) return {out, lse};
  dispatch_cpu_dtype(kFwd, q.scalar_type(), [&]<class S, class T>() {
    forward<S, T>(p, seqs, T(scale), out.mutable_data_ptr<S>(), lse.mutable_data_ptr<T>());
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, bool causal,
    bool causal_bottom_right, bool deterministic) {
  const Problem p = check_problem(kBwd, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                  max_seqlen_q, max_seqlen_k, /*allow_double=*/true,
                                  /*max_head_dim=*/0);
  const int64_t B = q.size(0), rows_q = q.size(1);
  for (const auto* t : {&grad_out, &out}) {
    const char* name = (t == &grad_out) ? "grad_out" : "out";
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), kBwd, ": ", name, " must have q's shape ",
                      q.sizes(), ", got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), kBwd, ": ", name,
                     " must have q's dtype ", q.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), kBwd, ": ", name, " is on ", genext::device_name(*t),
                " but q is on ", genext::device_name(q));
  }
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == p.Hq &&
                        lse.size(2) == rows_q,
                    kBwd, ": lse must have shape (B, Hq, Lq) = (", B, ", ", p.Hq, ", ", rows_q,
                    "), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat || lse.scalar_type() == at::kDouble, kBwd,
                   ": lse must be float32 or float64, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), kBwd, ": lse is on ", genext::device_name(lse), " but q is on ",
              genext::device_name(q));
  const auto seqs = make_seqs(kBwd, p, max_seqlen_q, max_seqlen_k, causal, causal_bottom_right);
  const auto acc = acc_type(q.scalar_type());
  // varlen: rows outside every sequence get zero gradients from no task
  auto alloc = [&](const at::Tensor& t) {
    return p.varlen ? at::zeros(t.sizes(), t.options()) : at::empty(t.sizes(), t.options());
  };
  at::Tensor dq = alloc(q), dk = alloc(k), dv = alloc(v);
  if (q.numel() == 0 && k.numel() == 0) return {dq, dk, dv};
  const at::Tensor go = last_dim_contiguous(grad_out), o = last_dim_contiguous(out);
  const at::Tensor lse_c = lse.to(acc).contiguous();
  at::Tensor delta = at::empty({B, p.Hq, rows_q}, q.options().dtype(acc));
  dispatch_cpu_dtype(kBwd, q.scalar_type(), [&]<class S, class T>() {
    T* dl = delta.mutable_data_ptr<T>();
    const T* ls = lse_c.const_data_ptr<T>();
    if (q.numel() > 0) compute_delta<S, T>(p, go, o, dl);
    backward_dkdv<S, T>(p, seqs, T(scale), go, ls, dl, dk.mutable_data_ptr<S>(),
                        dv.mutable_data_ptr<S>());
    backward_dq<S, T>(p, seqs, T(scale), go, ls, dl, dq.mutable_data_ptr<S>());
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(genext, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace genext::fa
