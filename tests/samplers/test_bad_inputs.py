"""The schedulers' public entry points given hostile inputs: each raises early, naming the
scheduler's method and the argument, instead of failing deep inside torch (noise drawing), in the
fused op under its internal name, or silently truncating integer tensors."""

from __future__ import annotations

import pytest
import torch

from genext.samplers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

# (scheduler, config): every configuration draws noise inside step
NOISY = [
    (DDIMScheduler, {}),
    (DDPMScheduler, {}),
    (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    (FlowMatchEulerDiscreteScheduler, {"stochastic_sampling": True}),
]
IDS = [cls.__name__ for cls, _ in NOISY]


def _ready(cls, config):
    s = cls(**config)
    s.set_timesteps(10)
    return s, s.timesteps[0]


def _step(s, m, t, x, **kw):
    if isinstance(s, DDIMScheduler):
        kw.setdefault("eta", 1.0)  # draws noise
    return s.step(m, t, x, **kw)


@pytest.mark.parametrize("cls,config", NOISY, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
@pytest.mark.parametrize("arg", ["model_output", "sample"])
def test_step_rejects_dtypes_the_step_cannot_serve(cls, config, dtype, arg):
    # int64 model_output failed inside normal_ (DDIM, DDPM: noise is drawn in its dtype); other
    # cases raised under the op's internal name sampler_step
    s, t = _ready(cls, config)
    x, m = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    if arg == "model_output":
        m = m.to(dtype)
    else:
        x = x.to(dtype)
    with pytest.raises(TypeError, match=f"{cls.__name__}.step: {arg} must be float32"):
        _step(s, m, t, x)


@pytest.mark.parametrize("cls,config", NOISY, ids=IDS)
def test_step_rejects_a_0_dim_sample(cls, config):
    s, t = _ready(cls, config)
    with pytest.raises(ValueError, match=f"{cls.__name__}.step: model_output must have a batch"):
        _step(s, torch.tensor(1.0), t, torch.tensor(1.0))


@pytest.mark.parametrize("cls,config", NOISY, ids=IDS)
def test_step_rejects_integer_variance_noise(cls, config):
    if cls is DDPMScheduler:
        pytest.skip("DDPMScheduler.step takes no variance_noise")
    s, t = _ready(cls, config)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(TypeError, match=f"{cls.__name__}.step: variance_noise must be"):
        _step(s, x, t, x, variance_noise=x.long())


@pytest.mark.parametrize("cls,config", NOISY, ids=IDS)
def test_forward_process_rejects_integer_tensors(cls, config):
    # integer samples were combined with truncated coefficients: a silently wrong result
    s, _ = _ready(cls, config)
    x = torch.randn(2, 4, 8, 8) * 3
    t = s.timesteps[:2]
    if cls is FlowMatchEulerDiscreteScheduler:
        calls = [("scale_noise", "sample", lambda: s.scale_noise(x.long(), t, x))]
        calls.append(("scale_noise", "noise", lambda: s.scale_noise(x, t, x.long())))
    else:
        calls = [("add_noise", "original_samples", lambda: s.add_noise(x.long(), x, t))]
        calls.append(("add_noise", "noise", lambda: s.add_noise(x, x.long(), t)))
        if hasattr(s, "get_velocity"):
            calls.append(("get_velocity", "sample", lambda: s.get_velocity(x.long(), x, t)))
    for method, arg, call in calls:
        with pytest.raises(TypeError, match=f"{cls.__name__}.{method}: {arg} must be a floating"):
            call()


def test_scale_noise_without_noise_names_the_argument():
    s, _ = _ready(FlowMatchEulerDiscreteScheduler, {})
    with pytest.raises(TypeError, match="scale_noise: noise must be a torch.Tensor, got NoneType"):
        s.scale_noise(torch.randn(2, 4), s.timesteps[:2])


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler])
@pytest.mark.parametrize("steps", [0, -1])
def test_set_timesteps_rejects_no_steps(cls, steps):
    # DPM-Solver and flow matching accepted 0 (an empty schedule), flow failed in numpy for -1
    with pytest.raises(ValueError, match=f"{cls.__name__}.set_timesteps: num_inference_steps"):
        cls().set_timesteps(steps)


def test_flow_set_timesteps_rejects_empty_sigmas():
    with pytest.raises(ValueError, match="set_timesteps: num_inference_steps must be at least 1"):
        FlowMatchEulerDiscreteScheduler().set_timesteps(sigmas=[])


@pytest.mark.parametrize("cls,config", NOISY, ids=IDS)
def test_channels_last_and_expanded_samples_step(cls, config):
    # the fused step copies such inputs once; results equal those of contiguous copies
    x = torch.randn(1, 4, 8, 8).expand(2, 4, 8, 8)
    m = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    noise = torch.randn(2, 4, 8, 8)
    a, t = _ready(cls, config)
    b, _ = _ready(cls, config)
    kw = {} if cls is DDPMScheduler else {"variance_noise": noise}
    got = _step(a, m, t, x, generator=None if kw else torch.Generator().manual_seed(1), **kw)
    want = _step(
        b,
        m.contiguous(),
        t,
        x.contiguous(),
        generator=None if kw else torch.Generator().manual_seed(1),
        **kw,
    )
    assert torch.equal(got.prev_sample, want.prev_sample)
