// The per-element expression of genext::sampler_step, shared by the CPU and CUDA kernels
// (genext/ops/_sampler_step.py documents the kinds and coefficients). It repeats diffusers'
// operation order in IEEE fp32: every multiply, add, subtract and divide is rounded on its own,
// never contracted into an FMA and never replaced by an approximate division (the CUDA build uses
// --use_fast_math, so the device path spells each operation with a round-to-nearest intrinsic;
// the CPU file is compiled with -ffp-contract=off).
#pragma once

#if defined(__CUDACC__)
#define GENEXT_HD __host__ __device__ __forceinline__
#else
#define GENEXT_HD inline
#endif

namespace genext::sampler {

// The same numbers as StepKind, PredictionType and NUM_COEF in genext/ops/_sampler_step.py: change
// both together.
enum Mode : int { kDDIM = 0, kDDPM = 1, kDPM = 2, kFlow = 3 };
enum Pred : int { kEpsilon = 0, kSample = 1, kVPred = 2 };
constexpr int kNumCoef = 12;

struct Coef {
  float c[kNumCoef];
};

#if defined(__CUDA_ARCH__)
GENEXT_HD float mul(float a, float b) { return __fmul_rn(a, b); }
GENEXT_HD float add(float a, float b) { return __fadd_rn(a, b); }
GENEXT_HD float sub(float a, float b) { return __fsub_rn(a, b); }
GENEXT_HD float divide(float a, float b) { return __fdiv_rn(a, b); }
#else
GENEXT_HD float mul(float a, float b) { return a * b; }
GENEXT_HD float add(float a, float b) { return a + b; }
GENEXT_HD float sub(float a, float b) { return a - b; }
GENEXT_HD float divide(float a, float b) { return a / b; }
#endif
// torch.clamp(v, lo, hi) = min(max(v, lo), hi), NaN when v or a bound is NaN (as torch.clamp)
GENEXT_HD float clampf(float v, float lo, float hi) {
  if (lo != lo || hi != hi) return lo + hi;
  const float a = v < lo ? lo : v;
  return a > hi ? hi : a;
}

// Inputs of one element: sample x, model output m (guidance already applied), DPM history h1, h2,
// noise, the per-sample threshold s (<= 0: none). Flags as in the op schema.
struct Flags {
  int mode = kDDIM, pred = kEpsilon, n_hist = 0;
  bool clip = false, has_noise = false, has_threshold = false;
};

GENEXT_HD void step_element(const Coef& k, const Flags& f, float x, float m, float h1, float h2,
                            float noise, float s, float& prev, float& x0) {
  const float* c = k.c;
  if (f.mode == kFlow) {
    if (!f.has_noise) {
      x0 = m;
      prev = add(x, mul(c[3], m));
    } else {
      x0 = sub(x, mul(c[4], m));
      prev = add(mul(c[5], x0), mul(c[6], noise));
    }
    return;
  }
  if (f.pred == kEpsilon) {
    x0 = divide(sub(x, mul(c[1], m)), c[0]);
  } else if (f.pred == kSample) {
    x0 = m;
  } else {
    x0 = sub(mul(c[0], x), mul(c[1], m));
  }
  if (f.has_threshold) {
    x0 = divide(clampf(x0, -s, s), s);
  } else if (f.clip) {
    x0 = clampf(x0, -c[2], c[2]);
  }
  if (f.mode == kDDIM) {
    float eps;
    if (f.pred == kEpsilon) {
      eps = m;
    } else if (f.pred == kSample) {
      eps = divide(sub(x, mul(c[0], m)), c[1]);  // the unclipped x0 (= m), as diffusers does
    } else {
      eps = add(mul(c[0], m), mul(c[1], x));
    }
    if (c[6] != 0.f) eps = divide(sub(x, mul(c[0], x0)), c[1]);
    prev = add(mul(c[3], x0), mul(c[4], eps));
    if (f.has_noise) prev = add(prev, mul(c[5], noise));
  } else if (f.mode == kDDPM) {
    prev = add(mul(c[3], x0), mul(c[4], x));
    if (f.has_noise) prev = add(prev, mul(c[5], noise));
  } else {  // kDPM
    prev = add(mul(c[3], x), mul(c[4], x0));
    if (f.n_hist == 1) {
      const float d1 = mul(c[8], sub(x0, h1));
      prev = add(prev, mul(c[5], d1));
    } else if (f.n_hist == 2) {
      const float d1_0 = mul(c[8], sub(x0, h1));
      const float d1_1 = mul(c[9], sub(h1, h2));
      const float d1 = add(d1_0, mul(c[10], sub(d1_0, d1_1)));
      const float d2 = mul(c[11], sub(d1_0, d1_1));
      prev = add(prev, mul(c[5], d1));
      prev = add(prev, mul(c[6], d2));
    }
    if (f.has_noise) prev = add(prev, mul(c[7], noise));
  }
}

// Classifier-free guidance as pipelines write it: u + w * (c - u).
GENEXT_HD float guide(float u, float cond, float w) { return add(u, mul(w, sub(cond, u))); }

}  // namespace genext::sampler
