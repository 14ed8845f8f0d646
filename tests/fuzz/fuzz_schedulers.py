"""Fuzz cases of the schedulers against diffusers': configurations drawn from the options both
libraries take (beta schedules, prediction types, spacing, clipping, thresholding, solver orders,
sigma schedules, shifts), step counts from 1 to 40, sample shapes with 1s, guidance. Where
diffusers rejects a configuration, genext must too (a clean error naming the scheduler); where
genext alone rejects one, the case is counted (hypothesis' statistics list them); otherwise whole
trajectories must match diffusers' as the sampler tests require."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from fuzz_harness import ACCEPTED, DEVICE, record

if DEVICE != "cpu":  # tests/samplers/test_cuda_trajectories.py covers CUDA
    pytest.skip("the scheduler fuzz runs on the CPU", allow_module_level=True)
diffusers = pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).parents[1] / "samplers"))
import genext.samplers as ours  # noqa: E402

from trajectories import compare_trajectories  # noqa: E402

TOL = 1e-5
BETAS = st.sampled_from(("linear", "scaled_linear", "squaredcos_cap_v2"))
PRED = st.sampled_from(("epsilon", "sample", "v_prediction"))
SPACING = st.sampled_from(("leading", "trailing", "linspace"))


@st.composite
def ddim(draw):
    return "DDIMScheduler", dict(
        beta_schedule=draw(BETAS),
        prediction_type=draw(PRED),
        timestep_spacing=draw(SPACING),
        clip_sample=draw(st.booleans()),
        set_alpha_to_one=draw(st.booleans()),
        steps_offset=draw(st.sampled_from((0, 1))),
        thresholding=draw(st.booleans()),
        rescale_betas_zero_snr=draw(st.booleans()),
        num_train_timesteps=draw(st.sampled_from((1000, 100, 7))),
    )


@st.composite
def ddpm(draw):
    return "DDPMScheduler", dict(
        beta_schedule=draw(BETAS),
        prediction_type=draw(PRED),
        timestep_spacing=draw(SPACING),
        clip_sample=draw(st.booleans()),
        thresholding=draw(st.booleans()),
        variance_type=draw(st.sampled_from(("fixed_small", "fixed_large", "fixed_small_log"))),
        rescale_betas_zero_snr=draw(st.booleans()),
        num_train_timesteps=draw(st.sampled_from((1000, 100, 7))),
    )


@st.composite
def dpm(draw):
    sigmas = draw(st.sampled_from(("plain", "karras", "exponential", "lu")))
    return "DPMSolverMultistepScheduler", dict(
        beta_schedule=draw(BETAS),
        prediction_type=draw(PRED),
        timestep_spacing=draw(SPACING),
        solver_order=draw(st.integers(1, 3)),
        algorithm_type=draw(st.sampled_from(("dpmsolver++", "sde-dpmsolver++"))),
        solver_type=draw(st.sampled_from(("midpoint", "heun"))),
        lower_order_final=draw(st.booleans()),
        euler_at_final=draw(st.booleans()),
        thresholding=draw(st.booleans()),
        use_karras_sigmas=sigmas == "karras",
        use_exponential_sigmas=sigmas == "exponential",
        use_lu_lambdas=sigmas == "lu",
        final_sigmas_type=draw(st.sampled_from(("zero", "sigma_min"))),
        rescale_betas_zero_snr=draw(st.booleans()),
    )


@st.composite
def flow(draw):
    return "FlowMatchEulerDiscreteScheduler", dict(
        shift=draw(st.sampled_from((1.0, 3.0, 0.5))),
        invert_sigmas=draw(st.booleans()),
        shift_terminal=draw(st.sampled_from((None, 0.1))),
        use_karras_sigmas=draw(st.booleans()),
        stochastic_sampling=draw(st.booleans()),
    )


def _fails_while_stepping(sched, n, shape, reraise=False) -> bool:
    sched.set_timesteps(n)
    x = torch.ones(shape)
    try:
        for t in sched.timesteps:
            x = sched.step(torch.sin(x), t, x).prev_sample
    except Exception:
        if reraise:
            raise
        return True
    return False


@given(
    st.one_of(ddim(), ddpm(), dpm(), flow()),
    st.integers(1, 40),
    st.sampled_from(((1, 1, 1, 1), (2, 3, 5, 1), (1, 4, 3, 7))),
    st.sampled_from((None, 1.0, 7.5)),
)
def test_trajectory_matches_diffusers(sched, n, shape, guidance):
    name, config = sched
    desc = f"{name}({config}) {n} steps {shape} guidance={guidance}"
    record(desc)
    ref_cls = getattr(diffusers, name)
    our_cls = getattr(ours, name)
    try:
        ref = ref_cls(**config)
        ref.set_timesteps(n)
        ref_error = None
    except Exception as e:  # diffusers' own validation: ValueError, NotImplementedError, ...
        ref_error = e
    try:
        mine = our_cls(**config)
        mine.set_timesteps(n)
    except ACCEPTED as e:
        assert name in str(e), f"{desc}: error does not name {name}: {e!r}"
        event(f"{name} rejects: {str(e)[:80]}" if ref_error is None else "both reject")
        return
    assert ref_error is None, f"{desc}: diffusers rejects ({ref_error!r}) but genext accepts"
    ref = ref_cls(**config)
    if _fails_while_stepping(ref_cls(**config), n, shape):
        # diffusers' own schedule breaks (e.g. repeated timesteps that run its step index past
        # the end); genext, which follows its schedule, must fail loudly too
        with pytest.raises(ACCEPTED):
            _fails_while_stepping(mine, n, shape, reraise=True)
        event("diffusers and genext both fail while stepping")
        return
    kind = (
        config.get("prediction_type", "epsilon")
        if name != "FlowMatchEulerDiscreteScheduler"
        else "flow"
    )
    compare_trajectories(mine, ref, n, kind=kind, guidance=guidance, tol=TOL, shape=shape)
