// The backward pass of the flash-attention CPU kernel (flash_attention_cpu.h): delta, then dK/dV
// per (sequence, KV head, key tile) and dQ per (sequence, query head, query tile), each output
// element written by one task in a fixed order (deterministic, no atomics).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "common/cpu_dispatch.h"
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

template <class S, class T>
void backward_dkdv(const Problem& p, const std::vector<Seq>& seqs, T scale,
                   const at::Tensor& grad_out, const T* lse, const T* delta, S* dk, S* dv) {
  const int64_t D = p.D, Dp = round_up(D, kLanes), Hq = p.Hq, Hk = p.Hk, group = Hq / Hk;
  const int64_t rows_q = p.q.size(1), rows_k = p.k.size(1);
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  const auto tiles = make_tiles(seqs, /*keys=*/true, kBc);
  const auto runs = make_runs(tiles, Hk);
  const int64_t ntasks = int64_t(runs.size()) * Hk;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
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
            for (int64_t r = 0; r < nr; ++r)
              nvis[r] = std::isinf(L.p[r])
                            ? 0
                            : int32_t(std::clamp<int64_t>(sq.visible_end(i0 + r) - jg, 0, ncv));
            qk_tile(Q.p, Dp, Kt.p + g * D * kBc, D, P.p, nr, ncv);   // scaled scores
            qk_tile(G.p, Dp, Vt.p + g * D * kBc, D, dS.p, nr, ncv);  // dP = dO V^T
            softmax_bwd(P.p, dS.p, nr, ncv, nvis.data(), L.p, Dl.p);
            // dV_j += sum_i P_ij dO_i ; dK_j += sum_i dS_ij (scale Q_i): coefficients transposed
            accum_tile(dV.p + g * kBc * Dp, Dp, P.p, 1, kBc, G.p, Dp, ncv, nr, Dp,
                       static_cast<T*>(nullptr));
            accum_tile(dK.p + g * kBc * Dp, Dp, dS.p, 1, kBc, Q.p, Dp, ncv, nr, Dp,
                       static_cast<T*>(nullptr));
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
  const int64_t D = p.D, Dp = round_up(D, kLanes), Hq = p.Hq, group = p.Hq / p.Hk;
  const int64_t rows_q = p.q.size(1);
  const View<S> q(p.q), k(p.k), v(p.v), dO(grad_out);
  const auto tiles = make_tiles(seqs, /*keys=*/false, kBr);
  const auto runs = make_runs(tiles, Hq);
  const int64_t ntasks = int64_t(runs.size()) * Hq;
  at::parallel_for(0, ntasks, 1, [&](int64_t begin, int64_t end) {
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

}  // namespace

void backward(const char* op, const Problem& p, const std::vector<Seq>& seqs, double scale,
              const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
              at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  dispatch_cpu_dtype(op, p.q.scalar_type(), [&]<class S, class T>() {
    T* dl = delta.mutable_data_ptr<T>();
    const T* ls = lse.const_data_ptr<T>();
    if (p.q.numel() > 0) compute_delta<S, T>(p, grad_out, out, dl);
    backward_dkdv<S, T>(p, seqs, T(scale), grad_out, ls, dl, dk.mutable_data_ptr<S>(),
                        dv.mutable_data_ptr<S>());
    backward_dq<S, T>(p, seqs, T(scale), grad_out, ls, dl, dq.mutable_data_ptr<S>());
  });
}

}  // namespace genext::fa::cpu
