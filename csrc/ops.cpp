// Every genext op schema, in one place. Kernels register their implementations beside their code
// (csrc/<op>/<op>_cpu.cpp, csrc/<op>/<op>_cuda.cpp) with TORCH_LIBRARY_IMPL.
#include <torch/library.h>

TORCH_LIBRARY(genext, m) {
  // GroupNorm over (N, C, *) with optional affine and fused SiLU. Returns (y, mean, rstd), the
  // statistics (N, num_groups) in float32 (float64 for float64 x).
  m.def(
      "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool "
      "silu)"
      " -> (Tensor, Tensor, Tensor)");
  // Backward of group_norm_silu: (grad_x, grad_weight, grad_bias); the last two are empty (0,)
  // tensors when weight is None.
  m.def(
      "group_norm_silu_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight,"
      " Tensor? bias, int num_groups, bool silu) -> (Tensor, Tensor, Tensor)");

  // Flash attention on (B, L, H, D) views (last dim contiguous; other strides free): q (B, Lq, Hq,
  // D), k and v (B, Lk, Hk, D) with Hk dividing Hq (GQA/MQA: query head h reads K/V head h /
  // (Hq/Hk)). Variable length when cu_seqlens_q/cu_seqlens_k (int32, (nseq+1,), starting at 0) are
  // given: then B == 1 and sequence s owns rows [cu[s], cu[s+1]) of dim 1; max_seqlen_q/k bound the
  // lengths (ignored otherwise). seqused_k (int32, (nseq,)): only the first seqused_k[s] keys of
  // sequence s are attended (key padding). Query i of sequence s sees key j iff j < len_k(s) and,
  // when causal, j <= i + offset(s), offset(s) = len_k(s) - len_q(s) if causal_bottom_right else 0.
  // A query that sees no key gets out = 0 and lse = -inf. Returns out (B, Lq, Hq, D) contiguous in
  // q's dtype and lse (B, Hq, Lq), the natural-log sum of exp(scale * q.k) over the visible keys,
  // float32 (float64 for float64 inputs).
  m.def(
      "flash_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? "
      "cu_seqlens_k,"
      " Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float scale, bool causal,"
      " bool causal_bottom_right) -> (Tensor, Tensor)");
  // Backward of flash_attention_forward from its out and lse: (dq, dk, dv), contiguous, shaped and
  // typed like q, k, v. Deterministic on both devices: bit-identical results run to run (every
  // output element has one writer, no atomics).
  m.def(
      "flash_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor "
      "lse,"
      " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q,"
      " int max_seqlen_k, float scale, bool causal, bool causal_bottom_right)"
      " -> (Tensor, Tensor, Tensor)");

  // Attention of a few new queries over a KV cache (generation). q (B, Lq, Hq, D); the caches are
  // contiguous (B, Lmax, Hk, D) or, with block_table (B, max_blocks) int32, paged (num_blocks,
  // block_size, Hk, D) with key j of sequence b in block block_table[b][j / block_size], slot
  // j % block_size. Last dims contiguous; Hk divides Hq. cache_seqlens (B,) int32 on q's device:
  // the tokens already cached per sequence. With k_new/v_new (B, Lq, Hk, D) the op first writes
  // them at positions [cache_seqlens[b], cache_seqlens[b] + Lq) (k_cache, v_cache are mutated; the
  // op does not change cache_seqlens), then attends over len_k(b) = cache_seqlens[b] + Lq keys;
  // otherwise over cache_seqlens[b] keys. Query i sees key j iff j < len_k(b) and, when causal,
  // j <= len_k(b) - Lq + i (bottom-right). Positions past the capacity are never written or read.
  // Returns out (B, Lq, Hq, D) contiguous in q's dtype and lse (B, Hq, Lq) float32 (float64 for
  // float64 on the CPU); a query that sees no key gets out = 0, lse = -inf.
  m.def(
      "attention_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor "
      "cache_seqlens,"
      " Tensor? k_new, Tensor? v_new, Tensor? block_table, float scale, bool causal)"
      " -> (Tensor, Tensor)");

  // One diffusion sampler step, elementwise over the sample, in fp32 arithmetic, reproducing the
  // operation order of the diffusers scheduler named by `kind` (0 DDIM, 1 DDPM, 2 DPM-Solver++ /
  // SDE-DPM-Solver++, 3 flow-matching Euler). sample (N, *); model_output (N, *), or (2N, *) when
  // guidance: rows [0, N) unconditional, [N, 2N) conditional, combined as u + guidance_scale *
  // (c - u) first. history: DPM-Solver's previous data predictions (newest first, 0 to 2 tensors
  // like sample). noise: like sample, or None. threshold_scale: (N,) float32 per-sample dynamic
  // thresholds s (x0 -> clamp(x0, -s, s) / s), or None. prediction_type: 0 epsilon, 1 sample,
  // 2 v_prediction. clip: clamp x0 to [-coef[2], coef[2]]. coef: the step's scalars, laid out per
  // kind (see genext/ops/_sampler_step.py; "mode" there). The argument is not called "mode":
  // torch's functionalization wrappers take a keyword of that name. Returns (prev_sample, x0), both
  // like sample; x0 is the predicted original sample (for flow matching, the model output).
  m.def(
      "sampler_step(int kind, Tensor sample, Tensor model_output, Tensor[] history, Tensor? noise,"
      " Tensor? threshold_scale, float[] coef, int prediction_type, bool clip, bool guidance,"
      " float guidance_scale) -> (Tensor, Tensor)");
  // sampler_step writing into given outputs (contiguous, the sample's shape and dtype; prev may be
  // the sample itself, for an in-place step; any other memory shared between an output and an
  // input or the other output is rejected), for loops that keep static buffers (CUDA graphs).
  m.def(
      "sampler_step_out(int kind, Tensor sample, Tensor model_output, Tensor[] history, Tensor? "
      "noise,"
      " Tensor? threshold_scale, float[] coef, int prediction_type, bool clip, bool guidance,"
      " float guidance_scale, Tensor(a!) prev, Tensor(b!) x0) -> ()");

  // Nearest codebook entry of each row of z (N, D) among codebook (K, D), without an N x K matrix.
  // cosine = false: the smallest Euclidean distance, computed from the squared differences in fp32
  // (fp64 for fp64); cosine = true: the largest cosine similarity (rows normalised first, zero rows
  // count as zero vectors), distance 1 - similarity. Ties go to the smallest index. Returns
  // (indices int64 (N,), distances (N,) float32, float64 for fp64).
  m.def("vq_nearest(Tensor z, Tensor codebook, bool cosine) -> (Tensor, Tensor)");
  // Per-code sums for EMA codebook updates: counts[k] = #{i : indices[i] == k}, sums[k] = the sum
  // of z[i] over those rows; float32 (float64 for fp64 z). deterministic: the same bits every run
  // (on CUDA a sort-based reduction instead of atomics). Indices outside [0, K) are an error on
  // the CPU and skipped on CUDA.
  m.def(
      "vq_ema_update(Tensor indices, Tensor z, int num_codes, bool deterministic) -> (Tensor, "
      "Tensor)");

  // Tiled primitives of the contrastive losses over L = scale * A B^T (+ bias), A (Na, D),
  // B (Nb, D), scale and bias one-element tensors; no Na x Nb matrix is stored. tiled_lse returns
  // (row_lse (Na,), col_lse (Nb,) when cols else (0,)), float32 (float64 for fp64).
  m.def("tiled_lse(Tensor a, Tensor b, Tensor scale, Tensor? bias, bool cols) -> (Tensor, Tensor)");
  // Gradients of sum_i grad_row[i] * row_lse[i] (+ sum_j grad_col[j] * col_lse[j]):
  // (da, db, dscale, dbias); dbias is (0,) when bias is None.
  m.def(
      "tiled_lse_backward(Tensor grad_row, Tensor? grad_col, Tensor a, Tensor b, Tensor scale,"
      " Tensor? bias, Tensor row_lse, Tensor? col_lse) -> (Tensor, Tensor, Tensor, Tensor)");
  // sum_ij softplus(L_ij) (a 0-dim tensor) and its gradients.
  // positives: the diagonal (i == j) enters as softplus(-L_ii), SigLIP's positive pairs
  m.def(
      "tiled_softplus_sum(Tensor a, Tensor b, Tensor scale, Tensor? bias, bool positives=False) "
      "-> Tensor");
  m.def(
      "tiled_softplus_sum_backward(Tensor grad, Tensor a, Tensor b, Tensor scale, Tensor? bias,"
      " bool positives=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // tiled_softplus_sum that also keeps what its backward needs, for a score matrix small enough
  // to store (CPU only): (the sum, W (Na, Nb) with W_ij = d softplus(z_ij L_ij) / dL_ij, and
  // (sum_ij W_ij raw_ij, sum_ij W_ij) with raw = A B^T), in the accumulation dtype. The backward is
  // then two matrix products with W, without recomputing the scores.
  m.def(
      "softplus_sum_with_weights(Tensor a, Tensor b, Tensor scale, Tensor? bias, "
      "bool positives=False) -> (Tensor, Tensor, Tensor)");
  // Its backward: the gradients (da, db, dscale, dbias) of grad * sum from the kept weights and
  // sums, dbias (0,) without a bias.
  m.def(
      "softplus_sum_with_weights_backward(Tensor grad, Tensor weights, Tensor sums, Tensor a, "
      "Tensor b, Tensor scale, Tensor? bias) -> (Tensor, Tensor, Tensor, Tensor)");
}
