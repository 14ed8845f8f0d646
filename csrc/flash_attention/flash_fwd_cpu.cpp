// The forward pass of the flash-attention CPU kernel (flash_attention_cpu.h): one task per
// (sequence, query head, run of a few query tiles) over the key tiles, with the online softmax.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_parallel.h"
#include "flash_attention/flash_attention_cpu.h"
#include "flash_attention/flash_tiles_cpu.h"

namespace genext::fa::cpu {
namespace {

// Query tiles per task at most: each key/value tile, once transposed and converted into scratch,
// serves up to this many query tiles of the same sequence and head, so the loads (scalar
// transposes and conversions, about a quarter of the products' time when done once per query
// tile) are shared.
constexpr int64_t kMaxGroup = 4;

template <class S, class T>
void forward_tiles(const Problem& p, const std::vector<Seq>& seqs, T scale, S* out, T* lse) {
  const int64_t D = p.D, Dp = tile_dp<T>(D), Hq = p.Hq, group = p.Hq / p.Hk;
  const int64_t rows_q = p.q.size(1);
  const View<S> q(p.q), k(p.k), v(p.v);
  const auto tiles = make_tiles(seqs, /*keys=*/false, kBr);
  // tasks: runs of up to G consecutive entries of `tiles` from one sequence, times the heads; G
  // shrinks where grouping would leave fewer than 4 tasks per thread
  const int64_t per_thread = int64_t(tiles.size()) * Hq / (4 * int64_t(at::get_num_threads()));
  const int64_t G = std::clamp<int64_t>(per_thread, 1, kMaxGroup);
  std::vector<std::pair<int32_t, int32_t>> runs;  // [first, last) entries of tiles
  for (size_t t = 0; t < tiles.size();) {
    size_t e = t + 1;
    while (e < tiles.size() && int64_t(e - t) < G && tiles[e].first == tiles[t].first) ++e;
    runs.emplace_back(int32_t(t), int32_t(e));
    t = e;
  }
  const int64_t ntasks = int64_t(runs.size()) * Hq;
  // about 2 tile products of 160 ns x Dp and 3 us of softmax and loads per pair of tiles, one
  // core (AVX2)
  const double task_ns = (320.0 * double(Dp) + 3000.0) * double(count_pairs(seqs)) * double(Hq) /
                         double(std::max<int64_t>(1, ntasks));
  genext::cpu::parallel_for(0, ntasks, task_ns, [&](int64_t begin, int64_t end) {
    Scratch<T> Q(G * kBr * Dp), O(G * kBr * Dp), Kt(D * kBc), V(kBc * Dp), P(kBr * kBc);
    Scratch<T> m(G * kBr), l(G * kBr), alpha(kBr);
    std::vector<int32_t> nvis(kBr);
    for (int64_t task = begin; task < end; ++task) {
      const auto [t0, t1] = runs[task / Hq];
      const int64_t h = task % Hq, hk = h / group, ng = t1 - t0;
      const Seq& sq = seqs[tiles[t0].first];
      // query tile g: rows [r0(g), r0(g) + nr(g)), keys [0, kend(g))
      auto r0 = [&](int64_t g) { return int64_t(tiles[t0 + g].second) * kBr; };
      auto nr = [&](int64_t g) { return std::min(kBr, sq.lq - r0(g)); };
      auto kend = [&](int64_t g) {
        return std::max<int64_t>(0, sq.visible_end(r0(g) + nr(g) - 1));
      };
      int64_t kend_all = 0;
      for (int64_t g = 0; g < ng; ++g) {
        load_rows(q, sq.b, sq.q0 + r0(g), nr(g), h, D, Dp, scale, Q.p + g * kBr * Dp);
        kend_all = std::max(kend_all, kend(g));
      }
      std::fill(O.p, O.p + ng * kBr * Dp, T(0));
      std::fill(m.p, m.p + ng * kBr, -std::numeric_limits<T>::infinity());
      std::fill(l.p, l.p + ng * kBr, T(0));
      for (int64_t j0 = 0; j0 < kend_all; j0 += kBc) {
        const int64_t nload = std::min(kBc, kend_all - j0);
        load_cols(k, sq.b, sq.k0 + j0, nload, hk, D, Kt.p);
        load_rows(v, sq.b, sq.k0 + j0, nload, hk, D, Dp, T(1), V.p);
        for (int64_t g = 0; g < ng; ++g) {
          if (j0 >= kend(g)) continue;
          // keys past this tile's own end are loaded for another tile of the group; nvis hides them
          const int64_t rg0 = r0(g), nrg = nr(g), nc = std::min(kBc, kend(g) - j0);
          T* Qg = Q.p + g * kBr * Dp;
          T* Og = O.p + g * kBr * Dp;
          qk_tile(Qg, Dp, Kt.p, D, P.p, nrg, nc);
          for (int64_t r = 0; r < nrg; ++r)
            nvis[r] = int32_t(std::clamp<int64_t>(sq.visible_end(rg0 + r) - j0, 0, nc));
          softmax_fwd(P.p, nrg, nc, nvis.data(), m.p + g * kBr, l.p + g * kBr, alpha.p);
          accum_tile(Og, Dp, P.p, kBc, 1, V.p, Dp, nrg, nc, Dp, alpha.p);
        }
      }
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t r = 0; r < nr(g); ++r) {
          const int64_t row = sq.q0 + r0(g) + r;
          const T* Or = O.p + (g * kBr + r) * Dp;
          const T lr = l.p[g * kBr + r];
          S* o = out + ((sq.b * rows_q + row) * Hq + h) * D;
          T* ls = lse + (sq.b * Hq + h) * rows_q + row;
          // l is NaN when a visible score was NaN (NaN or inf in q or k, or in the scale): then
          // inv and lse are NaN too, as the reference gives
          if (lr != T(0)) {
            const T inv = T(1) / lr;
            for (int64_t c = 0; c < D; ++c) o[c] = static_cast<S>(Or[c] * inv);
            *ls = m.p[g * kBr + r] + std::log(lr);
          } else {  // no visible key, or every visible score -inf
            std::fill(o, o + D, static_cast<S>(0));
            *ls = -std::numeric_limits<T>::infinity();
          }
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
