// The backward pass of the flash-attention CPU kernel (flash_attention_cpu.h): delta, then dK/dV
// per (sequence, KV head, key tile) and dQ per (sequence, query head, query tile), each output
// element written by one task in a fixed order (deterministic, no atomics).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
              nvis[r] = std::isinf(L.p[r])
                            ? 0
                            : int32_t(std::clamp<int64_t>(sq.visible_end(i0 + r) - j0, 0, nc_vis));
            }
            qk_tile(Q.p, Dp, Kt.p, D, P.p, nr, nc_vis);   // scaled scores
            qk_tile(G.p, Dp, Vt.p, D, dS.p, nr, nc_vis);  // dP = dO V^T
            softmax_bwd(P.p, dS.p, nr, nc_vis, nvis.data(), L.p, Dl.p);
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
          nvis[r] = std::isinf(L.p[r])
                        ? 0
                        : int32_t(std::clamp<int64_t>(sq.visible_end(i0 + r) - j0, 0, nc));
        qk_tile(Q.p, Dp, Kt.p, D, P.p, nr, nc);
        qk_tile(G.p, Dp, Vt.p, D, dS.p, nr, nc);
        softmax_bwd(P.p, dS.p, nr, nc, nvis.data(), L.p, Dl.p);
        accum_tile(dQ.p, Dp, dS.p, kBc, 1, K.p, Dp, nr, nc, Dp, static_cast<T*>(nullptr));
      }
      for (int64_t r = 0; r < nr; ++r) {
        S* o = dq + ((sq.b * rows_q + row0 + r) * Hq + h) * D;
        // a row that sees no key (lse -inf) has a zero gradient, whatever the scale (NaN too)
        const T f = L.p[r] == -std::numeric_limits<T>::infinity() ? T(0) : scale;
        for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(dQ.p[r * Dp + c] * f);
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
