// The decode kernel's AVX-512 tile routines (x86-64-v4), reading rows in place:
// - bfloat16 caches on CPUs with AVX512-BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and later): the
//   scores q . k on vdpbf16ps (pairs of bfloat16 products added into float lanes; a product of two
//   bfloat16 values is exact in float, so the scores carry float rounding only, as when both are
//   widened to float), and the value sums with each value row widened in registers. Two
//   differences from the widening path, both at the edges of the float range: vdpbf16ps reads
//   bfloat16 denormals (below 1.2e-38) as zero and flushes denormal results, and the scale
//   multiplies the dot product instead of q, so a dot product past 3.4e38 is inf here where the
//   scaled one may be finite. Elsewhere, and for float16, the kernel widens each tile of 16-bit
//   rows into a float buffer first (kvcache_tiles_cpu.h).
// - float rows (float32 caches, and the float tiles widened from 16-bit ones) on 16-lane vectors,
//   the same sums as kvcache_tiles_cpu.h's 8-lane routines in another order.
// No torch header (c10::BFloat16 declared only).
#pragma once
#include <cstdint>

namespace c10 {
struct BFloat16;
}

namespace genext::kv {

// Whether this CPU runs the bfloat16 routines below (x86-64-v4 and AVX512-BF16).
bool bf16_dot_supported();
// Whether the kernel uses them now: bf16_dot_supported() unless switched off (tests compare the
// two bfloat16 paths on one machine). Switching on where unsupported leaves them off.
bool bf16_dot_enabled();
void set_bf16_dot_enabled(bool on);

// Query rows, as the kernel holds them for these routines: bfloat16 bit patterns, unscaled, with
// zeros from D up to the row stride, which is a multiple of kBf16QAlign.
constexpr int64_t kBf16QAlign = 32;

// S[r * kTile + j] = scale * (Q[r] . K[j]) for r < nr and j < round_up(nc, 8), Q rows of stride
// ldq, krows[j] the key rows of D bfloat16 (the caller repeats a valid row past nc).
void scores_bf16(const uint16_t* Q, int64_t ldq, int64_t nr, const c10::BFloat16* const* krows,
                 int64_t nc, int64_t D, float scale, float* S);
// O[r][0:D] = alpha[r] * O[r][0:D] + sum_{j < nc} P[r * kTile + j] * V[j][0:D] for r < nr, O rows
// of stride ldo (a multiple of 16, its padding written too), vrows[j] of D bfloat16.
void accum_bf16(float* O, int64_t ldo, int64_t nr, const float* P,
                const c10::BFloat16* const* vrows, int64_t nc, int64_t D, const float* alpha);

// Whether the float routines below run: on x86-64-v4 CPUs (simd::cpu_level(), which tests cap to
// compare them with the 8-lane ones).
bool f32x16_enabled();

// As scores_bf16 and accum_bf16 for float rows: S[r * kTile + j] = Q[r] . K[j] (unscaled: Q holds
// the scaled query) for j < round_up(nc, 8), krows repeating a valid row past nc; and the value
// sums. Q, K and V rows are read up to D only.
void scores_f32x16(const float* Q, int64_t ldq, int64_t nr, const float* const* krows, int64_t nc,
                   int64_t D, float* S);
void accum_f32x16(float* O, int64_t ldo, int64_t nr, const float* P, const float* const* vrows,
                  int64_t nc, int64_t D, const float* alpha);
// tiles::softmax_f32 on 16-lane vectors, four rows at a time (the same results but for the order
// in which each row's l adds its tile's terms, and the sign of m when the maximum is a zero).
void softmax_f32x16(float* S, int64_t nr, const int32_t* nvis, float* m, float* l, float* alpha);

// Scores on AMX tiles (AMX-BF16, with the OS's permission for tile data): 16 key rows read in
// place as a tile (equally spaced rows: a contiguous head, or 16 slots of one block), the query
// rows in the tiles' pair layout as the other, TDPBF16PS adding pairs of exact bfloat16 products
// into float like vdpbf16ps. For tasks of at most kAmxMaxRows query rows and a head dim that is a
// multiple of 32 (amx_fits). amx_begin configures the calling thread's tiles for nr rows and
// amx_end releases them; amx_pack_q and amx_scores_bf16 run between the two, on that thread.
// Fewer than 4 rows stay on vdpbf16ps: against it (whole decode calls, one thread, the Xeon of
// benchmarks/RESULTS.md) the tiles ran at 0.74-0.85x its speed with one query row and 0.99x with
// two (each block's scores go through a store and a gather), 1.13x with four, 1.41x with eight
// and 1.72x with sixteen.
bool amx_supported();
bool amx_enabled();
void set_amx_enabled(bool on);
constexpr int64_t kAmxMaxRows = 16;
inline bool amx_fits(int64_t nr, int64_t D) { return nr >= 4 && nr <= kAmxMaxRows && D % 32 == 0; }
void amx_begin(int64_t nr);
void amx_end();
// Qv[(16 c + i) * 2 nr + 2 n + e] = Q[n][32 c + 2 i + e]: the nr rows of Q (bfloat16 bit patterns,
// rows ldq apart) as the tiles take them, D / 32 chunks of 16 pairs.
void amx_pack_q(const uint16_t* Q, int64_t ldq, int64_t nr, int64_t D, uint16_t* Qv);
// S[r * kTile + j] = scale * (Q[r] . K[j]) for r < nr and j below the returned count: the keys of
// the leading 16-key blocks whose rows are equally spaced (a multiple of 16, at most nc); the
// caller computes the others. buf: kAmxMaxRows * 16 floats of scratch.
int64_t amx_scores_bf16(const uint16_t* Qv, int64_t nr, const c10::BFloat16* const* krows,
                        int64_t nc, int64_t D, float scale, float* S, float* buf);

// out[0:D] = the bfloat16 values of O[0:D] * inv (to nearest, ties to even; NaN to 0x7fc0, as
// c10::BFloat16 rounds).
void store_bf16(const float* O, float inv, int64_t D, uint16_t* out);

}  // namespace genext::kv
