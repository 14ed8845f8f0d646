// The forward pass of the flash-attention CPU kernel (flash_attention_cpu.h): one task per
// (sequence, query head, query tile) over the key tiles, with the online softmax.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "flash_attention/flash_attention_cpu.h"
#include "flash_attention/flash_tiles_cpu.h"

namespace genext::fa::cpu {
namespace {

template <class S, class T>
void forward_tiles(const Problem& p, const std::vector<Seq>& seqs, T scale, S* out, T* lse) {
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
        qk_tile(Q.p, Dp, Kt.p, D, P.p, nr, nc);
        for (int64_t r = 0; r < nr; ++r)
          nvis[r] = int32_t(std::clamp<int64_t>(sq.visible_end(r0 + r) - j0, 0, nc));
        softmax_fwd(P.p, nr, nc, nvis.data(), m.p, l.p, alpha.p);
        accum_tile(O.p, Dp, P.p, kBc, 1, V.p, Dp, nr, nc, Dp, alpha.p);
      }
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t row = sq.q0 + r0 + r;
        S* o = out + ((sq.b * rows_q + row) * Hq + h) * D;
        T* ls = lse + (sq.b * Hq + h) * rows_q + row;
        // l is NaN when a visible score was NaN (NaN or inf in q or k, or in the scale): then
        // inv and lse are NaN too, as the reference gives
        if (l.p[r] != T(0)) {
          const T inv = T(1) / l.p[r];
          for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(O.p[r * Dp + c] * inv);
          *ls = m.p[r] + std::log(l.p[r]);
        } else {  // no visible key, or every visible score -inf
          std::fill(o, o + D, static_cast<S>(0));
          *ls = -std::numeric_limits<T>::infinity();
        }
      }
    }
  });
}

}  // namespace

void forward(const char* op, const Problem& p, const std::vector<Seq>& seqs, double scale,
             at::Tensor& out, at::Tensor& lse) {
  dispatch_cpu_dtype(op, p.q.scalar_type(), [&]<class S, class T>() {
    forward_tiles<S, T>(p, seqs, T(scale), out.mutable_data_ptr<S>(), lse.mutable_data_ptr<T>());
  });
}

}  // namespace genext::fa::cpu
