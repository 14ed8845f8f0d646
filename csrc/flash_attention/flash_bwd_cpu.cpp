// The backward pass of the flash-attention CPU kernel (flash_attention_cpu.h): delta, then one pass
// over the (query tile, key tile) pairs where tasks own runs of key tiles (dK, dV in task scratch)
// and write dQ directly (one run per sequence) or into per-run partial sums added in run order
// afterwards; a two-pass fallback (dK/dV, then dQ) where the one pass's memory would be too large.
// Every output element is summed in an order fixed by the shapes alone (deterministic, no atomics,
// the same for any thread count).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "flash_attention/flash_attention_cpu.h"
#include "flash_attention/flash_tiles_cpu.h"

namespace genext::fa::cpu {
namespace {

// delta[b, h, row] = sum_d dO * O over every row of q (rows outside every sequence included: their
// values are never read).
template <class S, class T>
void compute_delta(const Problem& p, const at::Tensor& grad_out, const at::Tensor& out, T* delta) {
  const View<S> dO(grad_out), O(out);
  const int64_t B = p.q.size(0), rows = p.q.size(1), Hq = p.Hq, D = p.D;
  // eight partial sums per row (vectorised; one add chain cost about 1.3 ns per element, at D 160
  // a seventh of the backward's time): about 0.3 ns per element
  genext::cpu::parallel_for(0, B * rows, 0.3 * double(Hq * D), [&](int64_t begin, int64_t end) {
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / rows, row = br % rows;
      for (int64_t h = 0; h < Hq; ++h) {
        const S* g = dO.row(b, row, h);
        const S* o = O.row(b, row, h);
        T acc[8] = {};
        int64_t c = 0;
        for (; c + 8 <= D; c += 8)
          for (int t = 0; t < 8; ++t) acc[t] += static_cast<T>(g[c + t]) * static_cast<T>(o[c + t]);
        for (int t = 0; c < D; ++c, ++t) acc[t] += static_cast<T>(g[c]) * static_cast<T>(o[c]);
        T s = acc[0];
        for (int t = 1; t < 8; ++t) s += acc[t];
        delta[(b * Hq + h) * rows + row] = s;
      }
    }
  });
}

// Tiles per task at most (key tiles in the dK/dV pass, query tiles in the dQ pass): the tiles of
// the other side, loaded once (the scalar transposes and conversions cost about a quarter of the
// products' time when repeated per pair), serve this many. Fewer where that would leave under 4
// tasks per thread.
constexpr int64_t kMaxGroup = 4;

// Runs of up to G consecutive entries of `tiles` from one sequence: [first, last) pairs.
inline std::vector<std::pair<int32_t, int32_t>> make_runs(
    const std::vector<std::pair<int32_t, int32_t>>& tiles, int64_t heads) {
  const int64_t per_thread = int64_t(tiles.size()) * heads / (4 * int64_t(at::get_num_threads()));
  const int64_t G = std::clamp<int64_t>(per_thread, 1, kMaxGroup);
  std::vector<std::pair<int32_t, int32_t>> runs;
  for (size_t t = 0; t < tiles.size();) {
    size_t e = t + 1;
    while (e < tiles.size() && int64_t(e - t) < G && tiles[e].first == tiles[t].first) ++e;
    runs.emplace_back(int32_t(t), int32_t(e));
    t = e;
  }
  return runs;
}

// One (query tile, key tile) pair's share of dK and dV: S = (scale Q) K^T and dP = dO V^T for the
// tile's nr rows (local rows i0.. of sequence sq) against the ncv keys from jg (Kt, Vt: the keys
// transposed, [D][kBc]), then P and dS (softmax_bwd; row r sees keys below visible_end(i0 + r),
// none when its lse is infinite), dV_j += sum_i P_ij dO_i and dK_j += sum_i dS_ij (scale Q_i)
// (coefficients transposed). P and dS are left for the caller (the one pass's dQ product).
template <class T>
GENEXT_INLINE void pair_dkdv(const Seq& sq, int64_t i0, int64_t nr, int64_t jg, int64_t ncv,
                             int64_t D, int64_t Dp, const T* Q, const T* G, const T* Kt,
                             const T* Vt, const T* L, const T* Dl, int32_t* nvis, T* P, T* dS,
                             T* dK, T* dV) {
  for (int64_t r = 0; r < nr; ++r)
    nvis[r] =
        std::isinf(L[r]) ? 0 : int32_t(std::clamp<int64_t>(sq.visible_end(i0 + r) - jg, 0, ncv));
  qk_tile(Q, Dp, Kt, D, P, nr, ncv);   // scaled scores
  qk_tile(G, Dp, Vt, D, dS, nr, ncv);  // dP = dO V^T
  softmax_bwd(P, dS, nr, ncv, nvis, L, Dl);
  accum_tile(dV, Dp, P, 1, kBc, G, Dp, ncv, nr, Dp, static_cast<T*>(nullptr));
  accum_tile(dK, Dp, dS, 1, kBc, Q, Dp, ncv, nr, Dp, static_cast<T*>(nullptr));
}

template <class S, class T>
void backward_dkdv(const Problem& p, const std::vector<Seq>& seqs, T scale,
                   const at::Tensor& grad_out, const T* lse, const T* delta, S* dk, S* dv) {
  const int64_t D = p.D, Dp = tile_dp<T>(D), Hq = p.Hq, Hk = p.Hk, group = Hq / Hk;
  const int64_t rows_q = p.q.size(1), rows_k = p.k.size(1);
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  const auto tiles = make_tiles(seqs, /*keys=*/true, kBc);
  const auto runs = make_runs(tiles, Hk);
  const int64_t ntasks = int64_t(runs.size()) * Hk;
  // about 4 tile products of 160 ns x Dp and 4 us of softmax per pair of tiles, one core (AVX2)
  const double task_ns = (640.0 * double(Dp) + 4000.0) * double(count_pairs(seqs)) * double(Hq) /
                         double(std::max<int64_t>(1, ntasks));
  genext::cpu::parallel_for(0, ntasks, task_ns, [&](int64_t begin, int64_t end) {
    Scratch<T> Kt(kMaxGroup * D * kBc), Vt(kMaxGroup * D * kBc), Q(kBr * Dp), G(kBr * Dp);
    Scratch<T> P(kBr * kBc), dS(kBr * kBc), dK(kMaxGroup * kBc * Dp), dV(kMaxGroup * kBc * Dp);
    Scratch<T> L(kBr), Dl(kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const auto [t0, t1] = runs[task / Hk];
      const int64_t hk = task % Hk, ng = t1 - t0;
      const Seq& sq = seqs[tiles[t0].first];
      // key tile g: rows [j0(g), j0(g) + nc(g)), of which the first nc_vis(g) are keys in use
      auto j0 = [&](int64_t g) { return int64_t(tiles[t0 + g].second) * kBc; };
      auto nc = [&](int64_t g) { return std::min(kBc, sq.lk_rows - j0(g)); };
      auto nc_vis = [&](int64_t g) { return std::clamp<int64_t>(sq.lk - j0(g), 0, nc(g)); };
      // first query tile that sees key j0(g): row i + off >= j0 when causal
      auto i_tile0 = [&](int64_t g) {
        return (sq.causal ? std::max<int64_t>(0, j0(g) - sq.off) : 0) / kBr * kBr;
      };
      std::fill(dK.p, dK.p + ng * kBc * Dp, T(0));
      std::fill(dV.p, dV.p + ng * kBc * Dp, T(0));
      int64_t i_start = sq.lq;
      for (int64_t g = 0; g < ng; ++g) {
        if (nc_vis(g) == 0) continue;
        load_cols(k, sq.b, sq.k0 + j0(g), nc_vis(g), hk, D, Kt.p + g * D * kBc);
        load_cols(v, sq.b, sq.k0 + j0(g), nc_vis(g), hk, D, Vt.p + g * D * kBc);
        i_start = std::min(i_start, i_tile0(g));
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = i_start; i0 < sq.lq; i0 += kBr) {
          const int64_t nr = std::min(kBr, sq.lq - i0), row0 = sq.q0 + i0;
          load_rows(q, sq.b, row0, nr, h, D, Dp, scale, Q.p);
          load_rows(dO, sq.b, row0, nr, h, D, Dp, T(1), G.p);
          const T* lse_h = lse + (sq.b * Hq + h) * rows_q + row0;
          const T* delta_h = delta + (sq.b * Hq + h) * rows_q + row0;
          for (int64_t r = 0; r < nr; ++r) L.p[r] = lse_h[r], Dl.p[r] = delta_h[r];
          for (int64_t g = 0; g < ng; ++g) {
            const int64_t ncv = nc_vis(g), jg = j0(g);
            if (ncv == 0 || i0 < i_tile0(g)) continue;
            pair_dkdv(sq, i0, nr, jg, ncv, D, Dp, Q.p, G.p, Kt.p + g * D * kBc, Vt.p + g * D * kBc,
                      L.p, Dl.p, nvis.data(), P.p, dS.p, dK.p + g * kBc * Dp, dV.p + g * kBc * Dp);
          }
        }
      }
      for (int64_t g = 0; g < ng; ++g) {
        const T* dKg = dK.p + g * kBc * Dp;
        const T* dVg = dV.p + g * kBc * Dp;
        for (int64_t j = 0; j < nc(g); ++j) {
          const int64_t o = ((sq.b * rows_k + sq.k0 + j0(g) + j) * Hk + hk) * D;
          for (int64_t c = 0; c < D; ++c) {
            dk[o + c] = static_cast<S>(dKg[j * Dp + c]);
            dv[o + c] = static_cast<S>(dVg[j * Dp + c]);
          }
        }
      }
    }
  });
}

template <class S, class T>
void backward_dq(const Problem& p, const std::vector<Seq>& seqs, T scale,
                 const at::Tensor& grad_out, const T* lse, const T* delta, S* dq) {
  const int64_t D = p.D, Dp = tile_dp<T>(D), Hq = p.Hq, group = p.Hq / p.Hk;
  const int64_t rows_q = p.q.size(1);
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  const auto tiles = make_tiles(seqs, /*keys=*/false, kBr);
  const auto runs = make_runs(tiles, Hq);
  const int64_t ntasks = int64_t(runs.size()) * Hq;
  // about 3 tile products of 160 ns x Dp and 4 us of softmax per pair of tiles, one core (AVX2)
  const double task_ns = (480.0 * double(Dp) + 4000.0) * double(count_pairs(seqs)) * double(Hq) /
                         double(std::max<int64_t>(1, ntasks));
  genext::cpu::parallel_for(0, ntasks, task_ns, [&](int64_t begin, int64_t end) {
    Scratch<T> Q(kMaxGroup * kBr * Dp), G(kMaxGroup * kBr * Dp), dQ(kMaxGroup * kBr * Dp);
    Scratch<T> Kt(D * kBc), Vt(D * kBc), K(kBc * Dp), P(kBr * kBc), dS(kBr * kBc);
    Scratch<T> L(kMaxGroup * kBr), Dl(kMaxGroup * kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const auto [t0, t1] = runs[task / Hq];
      const int64_t h = task % Hq, hk = h / group, ng = t1 - t0;
      const Seq& sq = seqs[tiles[t0].first];
      // query tile g: rows [i0(g), i0(g) + nr(g)), keys [0, kend(g))
      auto i0 = [&](int64_t g) { return int64_t(tiles[t0 + g].second) * kBr; };
      auto nr = [&](int64_t g) { return std::min(kBr, sq.lq - i0(g)); };
      auto kend = [&](int64_t g) {
        return std::max<int64_t>(0, sq.visible_end(i0(g) + nr(g) - 1));
      };
      int64_t kend_all = 0;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t row0 = sq.q0 + i0(g);
        load_rows(q, sq.b, row0, nr(g), h, D, Dp, scale, Q.p + g * kBr * Dp);
        load_rows(dO, sq.b, row0, nr(g), h, D, Dp, T(1), G.p + g * kBr * Dp);
        const T* lse_h = lse + (sq.b * Hq + h) * rows_q + row0;
        const T* delta_h = delta + (sq.b * Hq + h) * rows_q + row0;
        for (int64_t r = 0; r < nr(g); ++r)
          L.p[g * kBr + r] = lse_h[r], Dl.p[g * kBr + r] = delta_h[r];
        kend_all = std::max(kend_all, kend(g));
      }
      std::fill(dQ.p, dQ.p + ng * kBr * Dp, T(0));
      for (int64_t j0 = 0; j0 < kend_all; j0 += kBc) {
        const int64_t nload = std::min(kBc, kend_all - j0);
        load_cols(k, sq.b, sq.k0 + j0, nload, hk, D, Kt.p);
        load_cols(v, sq.b, sq.k0 + j0, nload, hk, D, Vt.p);
        load_rows(k, sq.b, sq.k0 + j0, nload, hk, D, Dp, T(1), K.p);
        for (int64_t g = 0; g < ng; ++g) {
          if (j0 >= kend(g)) continue;
          // keys past this tile's own end are loaded for another tile of the group; nvis hides them
          const int64_t ig0 = i0(g), nrg = nr(g), nc = std::min(kBc, kend(g) - j0);
          const T* Lg = L.p + g * kBr;
          for (int64_t r = 0; r < nrg; ++r)
            nvis[r] = std::isinf(Lg[r])
                          ? 0
                          : int32_t(std::clamp<int64_t>(sq.visible_end(ig0 + r) - j0, 0, nc));
          qk_tile(Q.p + g * kBr * Dp, Dp, Kt.p, D, P.p, nrg, nc);
          qk_tile(G.p + g * kBr * Dp, Dp, Vt.p, D, dS.p, nrg, nc);
          softmax_bwd(P.p, dS.p, nrg, nc, nvis.data(), Lg, Dl.p + g * kBr);
          accum_tile(dQ.p + g * kBr * Dp, Dp, dS.p, kBc, 1, K.p, Dp, nrg, nc, Dp,
                     static_cast<T*>(nullptr));
        }
      }
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t r = 0; r < nr(g); ++r) {
          S* o = dq + ((sq.b * rows_q + sq.q0 + i0(g) + r) * Hq + h) * D;
          // a row that sees no key (lse -inf) has a zero gradient, whatever the scale (NaN too)
          const T f = L.p[g * kBr + r] == -std::numeric_limits<T>::infinity() ? T(0) : scale;
          const T* dQr = dQ.p + (g * kBr + r) * Dp;
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(dQr[c] * f);
        }
      }
    }
  });
}

// ---- one pass -----------------------------------------------------------------------------------

// Tasks of the one-pass backward at least (when the key tiles allow): a constant, not the thread
// count, so that how the keys are cut into runs, and with it the order dQ's partial sums are
// added in, is the same on any number of threads.
constexpr int64_t kMinTasks = 16;
// Caps on the one pass's memory: a task's dK/dV/K/K^T/V^T scratch (5 tiles per key tile it owns)
// and all partial dQ sums together; past either the two-pass backward runs instead.
constexpr int64_t kMaxTaskScratchBytes = int64_t(8) << 20;
constexpr int64_t kMaxPartialBytes = int64_t(64) << 20;
// Key tiles per run at most (when the partial sums allow): a query tile's pass over the run's
// tiles then reads 5 tiles of scratch per key tile, which stay in L2 for short runs.
constexpr int64_t kMaxRunTiles = 4;

// How the one pass cuts the work: per sequence, its key tiles in runs (each sorted ascending, so a
// run adds its keys' contributions to dQ in key order), and where run r of sequence s writes its
// partial dQ (only when the sequence has more than one run).
struct OnePassPlan {
  std::vector<std::vector<int32_t>> runs;  // key tile indices of each run
  std::vector<int32_t> run_seq;            // the sequence of each run
  std::vector<int32_t> run_index;          // r: the run's place among its sequence's runs
  std::vector<int32_t> seq_runs;           // runs per sequence
  std::vector<int64_t> part_off;           // per sequence: offset of its partial dQ (in T)
  int64_t part_size = 0, max_run = 0;
};

inline OnePassPlan plan_one_pass(const std::vector<Seq>& seqs, int64_t Hq, int64_t Hk, int64_t D,
                                 int64_t max_run) {
  OnePassPlan pl;
  const int64_t nseq = int64_t(seqs.size());
  const int64_t want = (kMinTasks + nseq * Hk - 1) / std::max<int64_t>(1, nseq * Hk);
  pl.seq_runs.resize(nseq);
  pl.part_off.resize(nseq);
  for (int64_t s = 0; s < nseq; ++s) {
    const Seq& sq = seqs[s];
    const int64_t nk = (sq.lk_rows + kBc - 1) / kBc;

    const int64_t nr = std::clamp<int64_t>(std::max(want, (nk + max_run - 1) / max_run), 1,
                                           std::max<int64_t>(nk, 1));
    // the key tiles alternating from both ends (cheap and dear causal tiles mixed), cut into nr
    // runs of consecutive entries
    std::vector<int32_t> order;
    for (int64_t t = 0; t < nk; ++t) order.push_back(int32_t(t % 2 == 0 ? t / 2 : nk - 1 - t / 2));
    for (int64_t r = 0; r < nr; ++r) {
      std::vector<int32_t> run(order.begin() + r * nk / nr, order.begin() + (r + 1) * nk / nr);
      std::sort(run.begin(), run.end());
      pl.max_run = std::max<int64_t>(pl.max_run, int64_t(run.size()));
      pl.runs.push_back(std::move(run));
      pl.run_seq.push_back(int32_t(s));
      pl.run_index.push_back(int32_t(r));
    }
    pl.seq_runs[s] = int32_t(nr);
    pl.part_off[s] = pl.part_size;
    if (nr > 1) pl.part_size += nr * Hq * sq.lq * D;
  }
  return pl;
}

// One task per (run of key tiles, KV head): for each query head of the group and each query tile
// (ascending), S = (scale Q) K^T and dP = dO V^T per key tile of the run, then dV += P^T dO,
// dK += dS^T (scale Q) into the run's scratch and dS K into the query tile's dQ, which is written
// out after the run's last key tile. 5 tile products per pair where the two passes take 7.
template <class S, class T>
void backward_one_pass(const Problem& p, const std::vector<Seq>& seqs, const OnePassPlan& pl,
                       T scale, const at::Tensor& grad_out, const T* lse, const T* delta, S* dq,
                       S* dk, S* dv) {
  const int64_t D = p.D, Dp = tile_dp<T>(D), Hq = p.Hq, Hk = p.Hk, group = Hq / Hk;
  const int64_t rows_q = p.q.size(1), rows_k = p.k.size(1), M = pl.max_run;
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  std::unique_ptr<T[]> part(pl.part_size > 0 ? new T[pl.part_size] : nullptr);
  const int64_t ntasks = int64_t(pl.runs.size()) * Hk;
  // About 560 ns x Dp per (query tile, key tile) pair and 4 us of softmax and loads: the one-pass
  // backward's time per pair on one core of the AVX2 machine at D 16-160 (fp32).
  const double pair_ns = 560.0 * double(Dp) + 4000.0;
  const double task_ns =
      pair_ns * double(count_pairs(seqs)) * double(Hq) / double(std::max<int64_t>(1, ntasks));
  genext::cpu::parallel_for(0, ntasks, task_ns, [&](int64_t begin, int64_t end) {
    Scratch<T> Kt(M * D * kBc), Vt(M * D * kBc), K(M * kBc * Dp), dK(M * kBc * Dp),
        dV(M * kBc * Dp);
    Scratch<T> Q(kBr * Dp), G(kBr * Dp), dQ(kBr * Dp), P(kBr * kBc), dS(kBr * kBc);
    Scratch<T> L(kBr), Dl(kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t run = task / Hk, hk = task % Hk;
      const std::vector<int32_t>& tl = pl.runs[run];
      const int64_t ng = int64_t(tl.size()), s = pl.run_seq[run], nruns = pl.seq_runs[s];
      const Seq& sq = seqs[s];
      // key tile g: rows [j0(g), j0(g) + nc(g)), of which the first nc_vis(g) are keys in use
      auto j0 = [&](int64_t g) { return int64_t(tl[g]) * kBc; };
      auto nc = [&](int64_t g) { return std::min(kBc, sq.lk_rows - j0(g)); };
      auto nc_vis = [&](int64_t g) { return std::clamp<int64_t>(sq.lk - j0(g), 0, nc(g)); };
      std::fill(dK.p, dK.p + ng * kBc * Dp, T(0));
      std::fill(dV.p, dV.p + ng * kBc * Dp, T(0));
      for (int64_t g = 0; g < ng; ++g) {
        if (nc_vis(g) == 0) continue;
        load_cols(k, sq.b, sq.k0 + j0(g), nc_vis(g), hk, D, Kt.p + g * D * kBc);
        load_cols(v, sq.b, sq.k0 + j0(g), nc_vis(g), hk, D, Vt.p + g * D * kBc);
        load_rows(k, sq.b, sq.k0 + j0(g), nc_vis(g), hk, D, Dp, T(1), K.p + g * kBc * Dp);
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t i0 = 0; i0 < sq.lq; i0 += kBr) {
          const int64_t nr = std::min(kBr, sq.lq - i0), row0 = sq.q0 + i0;
          // keys [0, kend) are visible to some row of the tile
          const int64_t kend = std::max<int64_t>(0, sq.visible_end(i0 + nr - 1));
          const T* lse_h = lse + (sq.b * Hq + h) * rows_q + row0;
          const T* delta_h = delta + (sq.b * Hq + h) * rows_q + row0;
          std::fill(dQ.p, dQ.p + nr * Dp, T(0));
          bool loaded = false;
          for (int64_t g = 0; g < ng; ++g) {
            const int64_t ncv = nc_vis(g), jg = j0(g);
            if (ncv == 0 || jg >= kend) continue;
            if (!loaded) {
              load_rows(q, sq.b, row0, nr, h, D, Dp, scale, Q.p);
              load_rows(dO, sq.b, row0, nr, h, D, Dp, T(1), G.p);
              for (int64_t r = 0; r < nr; ++r) L.p[r] = lse_h[r], Dl.p[r] = delta_h[r];
              loaded = true;
            }
            pair_dkdv(sq, i0, nr, jg, ncv, D, Dp, Q.p, G.p, Kt.p + g * D * kBc, Vt.p + g * D * kBc,
                      L.p, Dl.p, nvis.data(), P.p, dS.p, dK.p + g * kBc * Dp, dV.p + g * kBc * Dp);
            // dQ_i += sum_j dS_ij K_j over the keys some row of the tile sees
            accum_tile(dQ.p, Dp, dS.p, kBc, 1, K.p + g * kBc * Dp, Dp, nr, std::min(ncv, kend - jg),
                       Dp, static_cast<T*>(nullptr));
          }
          if (nruns == 1) {
            for (int64_t r = 0; r < nr; ++r) {
              S* o = dq + ((sq.b * rows_q + row0 + r) * Hq + h) * D;
              // a row that sees no key (lse -inf) has a zero gradient, whatever the scale (NaN
              // too)
              const T f = lse_h[r] == -std::numeric_limits<T>::infinity() ? T(0) : scale;
              const T* dQr = dQ.p + r * Dp;
              for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(dQr[c] * f);
            }
          } else {  // partial sum of run r: part[s][r][h][i][0:D]
            T* o = part.get() + pl.part_off[s] + ((pl.run_index[run] * Hq + h) * sq.lq + i0) * D;
            for (int64_t r = 0; r < nr; ++r) std::memcpy(o + r * D, dQ.p + r * Dp, D * sizeof(T));
          }
        }
      }
      for (int64_t g = 0; g < ng; ++g) {
        const T* dKg = dK.p + g * kBc * Dp;
        const T* dVg = dV.p + g * kBc * Dp;
        for (int64_t j = 0; j < nc(g); ++j) {
          const int64_t o = ((sq.b * rows_k + sq.k0 + j0(g) + j) * Hk + hk) * D;
          for (int64_t c = 0; c < D; ++c) {
            dk[o + c] = static_cast<S>(dKg[j * Dp + c]);
            dv[o + c] = static_cast<S>(dVg[j * Dp + c]);
          }
        }
      }
    }
  });
  if (pl.part_size == 0) return;
  // dQ of the sequences with several runs: their partial sums added in run order, one (sequence,
  // query head, row) per item; about 1 ns per run and column (measured order of magnitude).
  std::vector<int64_t> first_row(seqs.size() + 1, 0);  // items of sequence s: [first_row[s], ...)
  for (size_t s = 0; s < seqs.size(); ++s)
    first_row[s + 1] = first_row[s] + (pl.seq_runs[s] > 1 ? Hq * seqs[s].lq : 0);
  const int64_t items = first_row.back();
  genext::cpu::parallel_for(0, items, 1.0 * double(D) * 4, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(D);
    int64_t s = std::upper_bound(first_row.begin(), first_row.end(), begin) - first_row.begin() - 1;
    for (int64_t it = begin; it < end; ++it) {
      while (it >= first_row[s + 1]) ++s;
      const Seq& sq = seqs[s];
      const int64_t hi = it - first_row[s], h = hi / sq.lq, i = hi % sq.lq, nr = pl.seq_runs[s];
      const T* src = part.get() + pl.part_off[s] + (h * sq.lq + i) * D;
      const int64_t stride = Hq * sq.lq * D;  // from run r to r + 1
      std::copy(src, src + D, acc.begin());
      for (int64_t r = 1; r < nr; ++r)
        for (int64_t c = 0; c < D; ++c) acc[c] += src[r * stride + c];
      const T l = lse[(sq.b * Hq + h) * rows_q + sq.q0 + i];
      const T f = l == -std::numeric_limits<T>::infinity() ? T(0) : scale;
      S* o = dq + ((sq.b * rows_q + sq.q0 + i) * Hq + h) * D;
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(acc[c] * f);
    }
  });
}

}  // namespace

void backward(const char* op, const Problem& p, const std::vector<Seq>& seqs, double scale,
              const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
              at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  dispatch_cpu_dtype(op, p.q.scalar_type(), [&]<class S, class T>() {
    T* dl = delta.mutable_data_ptr<T>();
    const T* ls = lse.const_data_ptr<T>();
    if (p.q.numel() > 0) compute_delta<S, T>(p, grad_out, out, dl);
    // runs of at most kMaxRunTiles key tiles where the partial sums fit the cap, else longer
    OnePassPlan pl = plan_one_pass(seqs, p.Hq, p.Hk, p.D, kMaxRunTiles);
    if (pl.part_size * int64_t(sizeof(T)) > kMaxPartialBytes)
      pl = plan_one_pass(seqs, p.Hq, p.Hk, p.D, std::numeric_limits<int32_t>::max());
    const int64_t Dp = tile_dp<T>(p.D);
    // GENEXT_FLASH_CPU_TWO_PASS=1 forces the two-pass backward (tests compare the two)
    const char* two = std::getenv("GENEXT_FLASH_CPU_TWO_PASS");
    const bool one_pass = !(two && two[0] == '1') &&
                          pl.max_run * 5 * kBc * Dp * int64_t(sizeof(T)) <= kMaxTaskScratchBytes &&
                          pl.part_size * int64_t(sizeof(T)) <= kMaxPartialBytes;
    if (one_pass) {
      backward_one_pass<S, T>(p, seqs, pl, T(scale), grad_out, ls, dl, dq.mutable_data_ptr<S>(),
                              dk.mutable_data_ptr<S>(), dv.mutable_data_ptr<S>());
      return;
    }
    backward_dkdv<S, T>(p, seqs, T(scale), grad_out, ls, dl, dk.mutable_data_ptr<S>(),
                        dv.mutable_data_ptr<S>());
    backward_dq<S, T>(p, seqs, T(scale), grad_out, ls, dl, dq.mutable_data_ptr<S>());
  });
}

}  // namespace genext::fa::cpu
