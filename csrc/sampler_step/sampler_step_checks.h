// Argument checks and input preparation shared by the CPU and CUDA bindings of sampler_step.
#pragma once
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>
#include <vector>

#include "common/device_name.h"
#include "sampler_step/sampler_step_math.h"

namespace genext::sampler {

constexpr const char* kOp = "sampler_step";

// The op's inputs as the kernels read them: contiguous; history and noise in the sample's dtype.
struct Inputs {
  at::Tensor x, m, h1, h2, noise, s;
  Coef coef{};
  Flags flags{};
  int64_t n = 0;    // samples (batch)
  int64_t per = 0;  // elements per sample
  bool guidance = false;
  float w = 1.f;
};

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline Inputs prepare(int64_t mode, const at::Tensor& sample, const at::Tensor& model_output,
                      at::TensorList history, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& threshold_scale, c10::ArrayRef<double> coef,
                      int64_t prediction_type, bool clip, bool guidance, double guidance_scale) {
  TORCH_CHECK_VALUE(mode >= kDDIM && mode <= kFlow, kOp,
                    ": mode must be 0 (DDIM), 1 (DDPM), 2 (DPM-Solver++) or 3 (flow Euler), got ",
                    mode);
  TORCH_CHECK_VALUE(prediction_type >= kEpsilon && prediction_type <= kVPred, kOp,
                    ": prediction_type must be 0 (epsilon), 1 (sample) or 2 (v_prediction), got ",
                    prediction_type);
  TORCH_CHECK_VALUE(static_cast<int64_t>(coef.size()) == kNumCoef, kOp, ": coef must hold ",
                    kNumCoef, " values, got ", coef.size());
  TORCH_CHECK_TYPE(is_float_type(sample.scalar_type()) && is_float_type(model_output.scalar_type()),
                   kOp, ": sample and model_output must be float32, float16 or bfloat16, got ",
                   sample.scalar_type(), " and ", model_output.scalar_type());
  TORCH_CHECK_VALUE(sample.dim() >= 1, kOp, ": sample must have a batch dim");
  TORCH_CHECK(model_output.device() == sample.device(), kOp, ": model_output is on ",
              genext::device_name(model_output), " but sample is on ", genext::device_name(sample));
  Inputs in;
  in.n = sample.size(0);
  in.per = in.n > 0 ? sample.numel() / in.n : 0;
  in.guidance = guidance;
  in.w = static_cast<float>(guidance_scale);
  // model_output: sample's shape, or [uncond; cond] along dim 0 with guidance
  std::vector<int64_t> want(sample.sizes().begin(), sample.sizes().end());
  if (guidance) want[0] *= 2;
  TORCH_CHECK_VALUE(model_output.sizes() == c10::IntArrayRef(want), kOp,
                    ": model_output must have shape ", c10::IntArrayRef(want),
                    guidance ? " ([uncond; cond] along dim 0)" : "", ", got ",
                    model_output.sizes());
  TORCH_CHECK_VALUE(history.size() <= 2, kOp, ": at most 2 history tensors, got ", history.size());
  TORCH_CHECK_VALUE(history.empty() || mode == kDPM, kOp, ": history is used by mode 2 only");
  const auto like = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == sample.sizes(), kOp, ": ", name,
                      " must have the sample's shape ", sample.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.device() == sample.device(), kOp, ": ", name, " is on ", genext::device_name(t),
                " but sample is on ", genext::device_name(sample));
    TORCH_CHECK_TYPE(is_float_type(t.scalar_type()), kOp, ": ", name,
                     " must be float32, float16 or bfloat16, got ", t.scalar_type());
    return t.to(sample.scalar_type()).contiguous();
  };
  in.x = sample.contiguous();
  in.m = model_output.contiguous();
  if (history.size() >= 1) in.h1 = like(history[0], "history[0]");
  if (history.size() >= 2) in.h2 = like(history[1], "history[1]");
  if (noise.has_value()) in.noise = like(*noise, "noise");
  if (threshold_scale.has_value()) {
    const at::Tensor& s = *threshold_scale;
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == in.n, kOp, ": threshold_scale must have shape (",
                      in.n, ",), got ", s.sizes());
    TORCH_CHECK(s.device() == sample.device(), kOp, ": threshold_scale is on ",
                genext::device_name(s), " but sample is on ", genext::device_name(sample));
    in.s = s.to(at::kFloat).contiguous();
  }
  for (int i = 0; i < kNumCoef; ++i) in.coef.c[i] = static_cast<float>(coef[i]);
  in.flags.mode = static_cast<int>(mode);
  in.flags.pred = static_cast<int>(prediction_type);
  in.flags.n_hist = static_cast<int>(history.size());
  in.flags.clip = clip;
  in.flags.has_noise = noise.has_value();
  in.flags.has_threshold = threshold_scale.has_value();
  return in;
}

// Checks an output given to sampler_step_out: contiguous, the sample's shape, dtype and device.
inline void check_out(const char* name, const at::Tensor& out, const at::Tensor& sample) {
  TORCH_CHECK_VALUE(out.sizes() == sample.sizes(), kOp, "_out: ", name,
                    " must have the sample's shape ", sample.sizes(), ", got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == sample.scalar_type(), kOp, "_out: ", name,
                   " must have the sample's dtype ", sample.scalar_type(), ", got ",
                   out.scalar_type());
  TORCH_CHECK(out.device() == sample.device(), kOp, "_out: ", name, " is on ",
              genext::device_name(out), " but sample is on ", genext::device_name(sample));
  TORCH_CHECK_VALUE(out.is_contiguous(), kOp, "_out: ", name, " must be contiguous");
}

// Checks that the outputs of sampler_step_out share no memory with each other or with the inputs
// as the kernels read them (after prepare, so an input that prepare copied cannot clash). The one
// exception is prev being exactly the sample, an in-place step: each element of the sample is read
// before its prev is written. Any other sharing gives wrong values: x0 is written before the
// inputs are read again, prev before the history and noise are read, and a partial overlap shifts
// elements. Every tensor compared is contiguous (prepare, check_out), so get_overlap_status
// answers exactly (never TooHard).
inline void check_no_overlap(const Inputs& in, const at::Tensor& prev, const at::Tensor& x0) {
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"sample", &in.x},      {"model_output", &in.m}, {"history[0]", &in.h1},
      {"history[1]", &in.h2}, {"noise", &in.noise},    {"threshold_scale", &in.s}};
  const std::pair<const char*, const at::Tensor*> outputs[] = {{"out (prev)", &prev},
                                                               {"x0_out (x0)", &x0}};
  for (const auto& [out_name, out] : outputs) {
    for (const auto& [name, t] : inputs) {
      if (!t->defined()) continue;
      const at::MemOverlapStatus st = at::get_overlap_status(*out, *t);
      const bool in_place = out == &prev && t == &in.x && st == at::MemOverlapStatus::Full;
      TORCH_CHECK(st == at::MemOverlapStatus::No || in_place, kOp, ": ", out_name, " and ", name,
                  " share memory; an output may share memory with no input and no other output, "
                  "except out = sample exactly (an in-place step)");
    }
  }
  TORCH_CHECK(at::get_overlap_status(prev, x0) == at::MemOverlapStatus::No, kOp,
              ": out (prev) and x0_out (x0) share memory; they must be separate tensors");
}

}  // namespace genext::sampler
