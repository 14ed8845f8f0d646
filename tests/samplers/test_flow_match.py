"""genext's FlowMatchEulerDiscreteScheduler against diffusers' (method:
tests/samplers/trajectories.py): configs, dynamic shifting, fused guidance, schedules, config
round trips, API, noise, per-token timesteps, one fused op call per step."""

from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the reference (pip install diffusers)"
)
from genext.samplers import flow_match as flow_mod  # noqa: E402
from genext.samplers.flow_match import FlowMatchEulerDiscreteScheduler  # noqa: E402

RefFlow = diffusers.FlowMatchEulerDiscreteScheduler

from conftest import rel_err, thin  # noqa: E402
from trajectories import (  # noqa: E402
    SHAPE,
    STEPS,
    TOL_CPU,
    both,
    compare_trajectories,
    count_op_calls,
    fake_model,
    initial_noise,
    same,
)

# diffusers warns that the original "dpmsolver" algorithms are deprecated; that is its business
# and numpy 2 warns about how diffusers converts a tensor (np.array(tensor)); not ours either
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


def test_flow_one_fused_call_per_step(monkeypatch):
    calls = count_op_calls(monkeypatch, flow_mod)
    s = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
    s.set_timesteps(10)
    x = initial_noise()
    for k, t in enumerate(s.timesteps):
        x = s.step(fake_model(x, t, "v"), t, x).prev_sample
        assert len(calls) == k + 1
    assert set(calls) == {3}


# ---- flow matching -------------------------------------------------------------------------------

FLOW_CONFIGS = [
    pytest.param(dict(shift=1.0), id="shift1"),
    pytest.param(dict(shift=3.0), id="shift3"),
    pytest.param(dict(shift=7.5), id="shift7.5"),
    pytest.param(dict(shift=1.0, stochastic_sampling=True), id="shift1-stochastic"),
    pytest.param(dict(shift=3.0, stochastic_sampling=True), id="shift3-stochastic"),
    pytest.param(dict(shift=3.0, use_karras_sigmas=True), id="karras"),
    pytest.param(dict(shift=2.0, use_exponential_sigmas=True), id="exponential"),
    pytest.param(dict(shift=3.0, shift_terminal=0.05), id="shift-terminal"),
    pytest.param(dict(invert_sigmas=True), id="inverted"),
    pytest.param(dict(num_train_timesteps=500, shift=2.0, stochastic_sampling=True), id="T500"),
]


@pytest.mark.parametrize("config", thin(FLOW_CONFIGS, 3))
def test_flow_matches_diffusers(config):
    for n in STEPS:
        ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, **config)
        compare_trajectories(ours, ref, n, kind="v")


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_flow_dynamic_shift_matches_diffusers(time_shift_type):
    for n in STEPS:
        ours, ref = both(
            FlowMatchEulerDiscreteScheduler,
            RefFlow,
            use_dynamic_shifting=True,
            time_shift_type=time_shift_type,
            base_shift=0.5,
            max_shift=1.15,
        )
        compare_trajectories(ours, ref, n, kind="v", set_kwargs=dict(mu=0.8))


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_fused_guidance_matches_diffusers(stochastic):
    for n in STEPS:
        ours, ref = both(
            FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0, stochastic_sampling=stochastic
        )
        compare_trajectories(ours, ref, n, kind="v", guidance=4.5)


FLOW_TIMESTEP_CONFIGS = [dict(c.values[0]) for c in FLOW_CONFIGS] + [
    dict(use_dynamic_shifting=True),
    dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(use_dynamic_shifting=True, shift_terminal=0.1),
]


@pytest.mark.parametrize("config", FLOW_TIMESTEP_CONFIGS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN case
def test_flow_set_timesteps_identical(config):
    ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, **config)
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)
    assert ours.sigma_min == ref.sigma_min and ours.sigma_max == ref.sigma_max
    mu = 0.6 if config.get("use_dynamic_shifting") else None
    for n in (1, 4, 10, 25, 50, 1000):
        ours.set_timesteps(n, mu=mu)
        ref.set_timesteps(n, mu=mu)
        assert ours.timesteps.dtype == ref.timesteps.dtype == torch.float32
        assert same(ours.timesteps, ref.timesteps), (n, config)
        assert same(ours.sigmas, ref.sigmas), (n, config)
    custom = [0.95, 0.8, 0.55, 0.3, 0.1]
    ours.set_timesteps(sigmas=custom, mu=mu)
    ref.set_timesteps(sigmas=custom, mu=mu)
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        custom_t = [990.0, 700.0, 420.0, 150.0]
        ours.set_timesteps(timesteps=custom_t, mu=mu)
        ref.set_timesteps(timesteps=custom_t, mu=mu)
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)
    ours.set_timesteps(sigmas=custom, timesteps=[900.0, 700.0, 500.0, 300.0, 100.0], mu=mu)
    ref.set_timesteps(sigmas=custom, timesteps=[900.0, 700.0, 500.0, 300.0, 100.0], mu=mu)
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)


def test_flow_config_round_trip_and_api():
    ref = RefFlow(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.4,
        max_shift=1.2,
        shift_terminal=0.02,
        stochastic_sampling=True,
    )
    ours = FlowMatchEulerDiscreteScheduler.from_config(ref.config)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert dict(ours.config) == public
    assert {
        k: v for k, v in RefFlow.from_config(ours.config).config.items() if not k.startswith("_")
    } == public
    assert dict(FlowMatchEulerDiscreteScheduler().config) == {
        k: v for k, v in RefFlow().config.items() if not k.startswith("_")
    }

    s, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0)
    assert s.shift == ref.shift == 3.0 and s.order == ref.order and len(s) == len(ref)
    s.set_shift(2.0)
    ref.set_shift(2.0)
    s.set_timesteps(10)
    ref.set_timesteps(10)
    assert torch.equal(s.sigmas, ref.sigmas)
    x = initial_noise()
    assert s.scale_model_input(x, 3) is x and s.init_noise_sigma == 1.0
    with pytest.raises(ValueError, match="integer index"):
        s.step(x, 0, x)
    with pytest.raises(ValueError, match="integer index"):
        s.step(x, torch.tensor(3), x)
    # scale_noise: by value, by begin index, by step index (diffusers' three cases)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ts = ref.timesteps[[1, 6]]
    assert torch.equal(s.scale_noise(x, ts, noise), ref.scale_noise(x, ts, noise))
    s.set_begin_index(3)
    ref.set_begin_index(3)
    assert torch.equal(s.scale_noise(x, ts, noise), ref.scale_noise(x, ts, noise))
    x_o = x_r = ref.scale_noise(x, ref.timesteps[3:4], noise)
    for t in ref.timesteps[3:]:
        x_o = s.step(fake_model(x_o, t, "v"), t, x_o).prev_sample
        x_r = ref.step(fake_model(x_r, t, "v"), t, x_r).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU
        assert torch.equal(s.scale_noise(x, ts, noise), ref.scale_noise(x, ts, noise))
    with pytest.raises(NotImplementedError, match="use_beta_sigmas"):
        FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="mu"):
        FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).set_timesteps(10)


def test_flow_variance_noise_and_seed_matters():
    ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, stochastic_sampling=True)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x_o = x_r = initial_noise()
    for k, t in enumerate(ref.timesteps):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        x_o = ours.step(fake_model(x_o, t, "v"), t, x_o, variance_noise=noise).prev_sample
        # diffusers' flow step has no variance_noise: the same noise through a generator
        x_r = ref.step(
            fake_model(x_r, t, "v"), t, x_r, generator=torch.Generator().manual_seed(k)
        ).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU
    finals = []
    for seed in (1, 2):
        s = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        s.set_timesteps(10)
        g = torch.Generator().manual_seed(seed)
        x = initial_noise()
        for t in s.timesteps:
            x = s.step(fake_model(x, t, "v"), t, x, generator=g).prev_sample
        finals.append(x)
    assert rel_err(finals[0], finals[1]) > 1e-3


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_per_token_timesteps_fallback_matches_diffusers(stochastic):
    """Per-token timesteps (a sigma per token) run as a plain-PyTorch fallback; still diffusers'."""
    ours, ref = both(
        FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0, stochastic_sampling=stochastic
    )
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x_o = x_r = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    g_o, g_r = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for k, t in enumerate(ref.timesteps):
        per_token = (t - 60.0 * torch.linspace(0, 1, 16)).clamp(min=1.0).expand(2, 16)
        x_o = ours.step(
            fake_model(x_o, t, "v"), t, x_o, per_token_timesteps=per_token, generator=g_o
        ).prev_sample
        x_r = ref.step(
            fake_model(x_r, t, "v"), t, x_r, per_token_timesteps=per_token, generator=g_r
        ).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU, k
