"""genext's DPMSolverMultistepScheduler against diffusers' (method: tests/samplers/trajectories.py):
the solver grid, options, schedules, fused guidance, noise, config round trips, API, and one
fused op call per step."""

from __future__ import annotations

import itertools

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the reference (pip install diffusers)"
)
from genext.samplers import dpm_solver as dpm_mod  # noqa: E402
from genext.samplers.dpm_solver import DPMSolverMultistepScheduler  # noqa: E402

RefDPM = diffusers.DPMSolverMultistepScheduler

from conftest import rel_err, thin  # noqa: E402
from trajectories import (  # noqa: E402
    SHAPE,
    STEPS,
    TOL_CPU,
    both,
    compare_trajectories,
    count_op_calls,
    fake_model,
    guided_pair,
    initial_noise,
    same,
)

# diffusers warns that the original "dpmsolver" algorithms are deprecated; that is its business
# and numpy 2 warns about how diffusers converts a tensor (np.array(tensor)); not ours either
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


# ---- DPM-Solver++: the solver grid ---------------------------------------------------------------

SOLVER_GRID = list(
    itertools.product(
        ["dpmsolver++", "sde-dpmsolver++"],
        [1, 2, 3],
        ["midpoint", "heun"],
        ["epsilon", "v_prediction", "sample"],
    )
)


@pytest.mark.parametrize(
    "algorithm_type,solver_order,solver_type,prediction_type", thin(SOLVER_GRID, 7, argcount=4)
)
def test_dpm_solver_grid_matches_diffusers(
    algorithm_type, solver_order, solver_type, prediction_type
):
    for n in STEPS:
        ours, ref = both(
            DPMSolverMultistepScheduler,
            RefDPM,
            algorithm_type=algorithm_type,
            solver_order=solver_order,
            solver_type=solver_type,
            prediction_type=prediction_type,
        )
        compare_trajectories(ours, ref, n, kind=prediction_type)


# The step-size and final-step options, all 32 combinations, each on order 2 and 3 of both
# algorithms (the lower-order rules differ between orders; 10 steps is where lower_order_final
# acts, 25 and 50 where it does not)
OPTION_GRID = list(
    itertools.product(
        [False, True], ["zero", "sigma_min"], [True, False], [False, True], [False, True]
    )
)


@pytest.mark.parametrize(
    "use_karras_sigmas,final_sigmas_type,lower_order_final,euler_at_final,thresholding",
    thin(OPTION_GRID, 7, argcount=5),
)
def test_dpm_solver_options_match_diffusers(
    use_karras_sigmas, final_sigmas_type, lower_order_final, euler_at_final, thresholding
):
    cases = [("dpmsolver++", 3, "epsilon"), ("sde-dpmsolver++", 2, "v_prediction")]
    for (algorithm_type, solver_order, kind), n in itertools.product(cases, STEPS):
        config = dict(
            algorithm_type=algorithm_type,
            solver_order=solver_order,
            prediction_type=kind,
            use_karras_sigmas=use_karras_sigmas,
            final_sigmas_type=final_sigmas_type,
            lower_order_final=lower_order_final,
            euler_at_final=euler_at_final,
            thresholding=thresholding,
            sample_max_value=1.5,
        )
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
        compare_trajectories(ours, ref, n, kind=kind)


def test_dpm_thresholding_is_active():
    """The thresholding cases above must be able to fail: on this model, diffusers' thresholded
    trajectory differs from the plain one (the clamp acts)."""
    finals = []
    for thresholding in (False, True):
        ref = RefDPM(thresholding=thresholding, sample_max_value=1.5)
        ref.set_timesteps(10)
        x = initial_noise()
        for t in ref.timesteps:
            x = ref.step(fake_model(x, t), t, x).prev_sample
        finals.append(x)
    assert rel_err(finals[1], finals[0]) > 1e-3


# ---- DPM-Solver: schedules and the other config fields -------------------------------------------

SCHEDULE_CONFIGS = [
    pytest.param(dict(beta_schedule="linear"), id="linear"),
    pytest.param(
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), id="scaled_linear"
    ),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2"), id="cosine"),
    pytest.param(
        dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, use_karras_sigmas=True),
        id="cosine-clipped-karras",
    ),
    pytest.param(dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()), id="trained"),
    pytest.param(dict(num_train_timesteps=500, beta_end=0.03), id="T500"),
    pytest.param(
        dict(
            timestep_spacing="leading",
            steps_offset=1,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
        ),
        id="leading-offset",
    ),
    pytest.param(dict(timestep_spacing="trailing", steps_offset=1), id="trailing"),
    pytest.param(
        dict(
            rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"
        ),
        id="zero-snr-v",
    ),
    pytest.param(
        dict(
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            prediction_type="v_prediction",
            thresholding=True,
            sample_max_value=2.0,
            dynamic_thresholding_ratio=0.9,
        ),
        id="zero-snr-v-threshold",
    ),
    pytest.param(dict(use_exponential_sigmas=True, solver_order=3), id="exponential"),
    pytest.param(dict(use_lu_lambdas=True), id="lu-lambdas"),
    pytest.param(
        dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
        id="flow-sigmas",
    ),
    pytest.param(dict(variance_type="learned_range"), id="learned-variance"),
    # diffusers maps "deis" to dpmsolver++ but checks final_sigmas_type against the given name
    pytest.param(
        dict(algorithm_type="deis", final_sigmas_type="sigma_min"), id="deis-maps-to-dpmsolver++"
    ),
    # the original (noise-prediction) DPM-Solver, optional in the issue but supported
    pytest.param(
        dict(
            algorithm_type="dpmsolver",
            final_sigmas_type="sigma_min",
            solver_order=3,
            prediction_type="v_prediction",
        ),
        id="dpmsolver-3-v",
    ),
    pytest.param(
        dict(
            algorithm_type="dpmsolver",
            final_sigmas_type="sigma_min",
            solver_order=2,
            solver_type="heun",
            prediction_type="sample",
            thresholding=True,
            sample_max_value=1.5,
        ),
        id="dpmsolver-2-heun-sample-threshold",
    ),
    pytest.param(
        dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min", solver_order=2),
        id="sde-dpmsolver-2",
    ),
    pytest.param(
        dict(
            algorithm_type="sde-dpmsolver",
            final_sigmas_type="sigma_min",
            solver_order=2,
            solver_type="heun",
            thresholding=True,
            sample_max_value=1.5,
        ),
        id="sde-dpmsolver-2-heun-threshold",
    ),
]


@pytest.mark.parametrize("config", thin(SCHEDULE_CONFIGS, 5))
def test_dpm_solver_schedules_match_diffusers(config):
    kind = config.get("prediction_type", "epsilon")
    learned = config.get("variance_type") is not None
    for n in STEPS:
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
        # Karras spacing of the cosine schedule repeats its first timesteps, and diffusers would
        # then start at the second occurrence and run off the end; pipelines set the begin index
        compare_trajectories(
            ours,
            ref,
            n,
            kind=kind,
            begin_index=0,
            shape=(2, 3, 9, 13) if learned else SHAPE,
            channels_out=6 if learned else None,
        )


@pytest.mark.parametrize(
    "config",
    thin(
        [
            dict(),
            dict(algorithm_type="sde-dpmsolver++", solver_order=3),
            dict(thresholding=True, sample_max_value=1.5, solver_order=3),
            dict(
                algorithm_type="sde-dpmsolver++",
                thresholding=True,
                sample_max_value=1.5,
                solver_type="heun",
                prediction_type="v_prediction",
            ),
            dict(
                algorithm_type="dpmsolver",
                final_sigmas_type="sigma_min",
                thresholding=True,
                sample_max_value=1.5,
            ),
        ],
        2,
    ),
    ids=["2M", "sde-3", "threshold-3", "sde-heun-v-threshold", "dpmsolver-threshold"],
)
def test_dpm_solver_fused_guidance_matches_diffusers(config):
    kind = config.get("prediction_type", "epsilon")
    for n in STEPS:
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
        compare_trajectories(ours, ref, n, kind=kind, guidance=7.5)


def test_dpm_solver_variance_noise_and_generator_list():
    """Given variance_noise is used as is; a list of generators draws one row per generator."""
    ours, ref = both(DPMSolverMultistepScheduler, RefDPM, algorithm_type="sde-dpmsolver++")
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x_o = x_r = initial_noise()
    for k, t in enumerate(ref.timesteps):
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k))
        x_o = ours.step(fake_model(x_o, t), t, x_o, variance_noise=noise).prev_sample
        x_r = ref.step(fake_model(x_r, t), t, x_r, variance_noise=noise).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU
    ours, ref = both(DPMSolverMultistepScheduler, RefDPM, algorithm_type="sde-dpmsolver++")
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    gens_o = [torch.Generator().manual_seed(s) for s in (5, 6)]
    gens_r = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x_o = x_r = initial_noise()
    for t in ref.timesteps:
        x_o = ours.step(fake_model(x_o, t), t, x_o, generator=gens_o).prev_sample
        x_r = ref.step(fake_model(x_r, t), t, x_r, generator=gens_r).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU


def test_dpm_solver_noise_seed_matters():
    """The SDE comparisons can fail: another seed gives another trajectory."""
    finals = []
    for seed in (1, 2):
        s = DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
        s.set_timesteps(10)
        g = torch.Generator().manual_seed(seed)
        x = initial_noise()
        for t in s.timesteps:
            x = s.step(fake_model(x, t), t, x, generator=g).prev_sample
        finals.append(x)
    assert rel_err(finals[0], finals[1]) > 1e-3


# ---- DPM-Solver: schedule, config, API -----------------------------------------------------------

TIMESTEP_CONFIGS = [dict(c.values[0]) for c in SCHEDULE_CONFIGS] + [
    dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"),
    dict(timestep_spacing="leading", steps_offset=0),
    dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1),
    dict(timestep_spacing="leading", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-3.0),
]


@pytest.mark.parametrize("config", thin(TIMESTEP_CONFIGS, 3))
def test_dpm_solver_set_timesteps_identical(config):
    for n in (1, 7, 10, 25, 50, 999):
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
        assert same(ours.timesteps, ref.timesteps), (n, config)
        assert ours.sigmas.dtype == ref.sigmas.dtype
        assert same(ours.sigmas, ref.sigmas), (n, config)
        assert ours.num_inference_steps == ref.num_inference_steps
    # the training-time tensors too
    for name in ("betas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        assert torch.equal(getattr(ours, name), getattr(ref, name)), name


def test_dpm_solver_custom_timesteps_and_mu():
    ours, ref = both(DPMSolverMultistepScheduler, RefDPM)
    custom = [999, 800, 601, 400, 250, 100, 20]
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)
    x_o = x_r = initial_noise()
    for t in ref.timesteps:
        x_o = ours.step(fake_model(x_o, t), t, x_o).prev_sample
        x_r = ref.step(fake_model(x_r, t), t, x_r).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU
    config = dict(
        use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True
    )
    ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
    ours.set_timesteps(20, mu=0.9)
    ref.set_timesteps(20, mu=0.9)
    assert ours.config.flow_shift == ref.config.flow_shift
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)


def test_dpm_solver_config_round_trip():
    ref = RefDPM(
        solver_order=3,
        algorithm_type="sde-dpmsolver++",
        use_karras_sigmas=True,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="trailing",
        steps_offset=1,
        prediction_type="v_prediction",
        final_sigmas_type="sigma_min",
        thresholding=True,
    )
    ours = DPMSolverMultistepScheduler.from_config(ref.config)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert dict(ours.config) == public
    back = RefDPM.from_config(ours.config)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == public
    # a genext scheduler (or its config) and keyword overrides
    again = DPMSolverMultistepScheduler.from_config(ours, solver_order=2)
    assert again.config.solver_order == 2 and again.config.use_karras_sigmas
    # defaults are diffusers' defaults
    assert dict(DPMSolverMultistepScheduler().config) == {
        k: v for k, v in RefDPM().config.items() if not k.startswith("_")
    }
    # and the schedule built from the round-tripped config is diffusers'
    ours.set_timesteps(25)
    ref.set_timesteps(25)
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)


def test_dpm_solver_api():
    s = DPMSolverMultistepScheduler()
    ref = RefDPM()
    assert s.init_noise_sigma == ref.init_noise_sigma == 1.0
    assert s.order == ref.order and len(s) == len(ref)
    x = initial_noise()
    assert s.scale_model_input(x, 5) is x
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(10)
    ref.set_timesteps(10)
    out = s.step(fake_model(x, s.timesteps[0]), s.timesteps[0], x)
    assert out.pred_original_sample is None and out[0] is out.prev_sample
    tup = s.step(fake_model(x, s.timesteps[1]), s.timesteps[1], out.prev_sample, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    assert s.step_index == 2
    # a timestep not in the schedule: diffusers takes the last step
    s.set_timesteps(10)
    s.step(fake_model(x, 3), 3, x)
    assert s.step_index == 10
    # set_begin_index: start in the middle (img2img); add_noise as diffusers
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ts = ref.timesteps[[2, 5]]
    assert torch.equal(s.add_noise(x, noise, ts), ref.add_noise(x, noise, ts))
    s.set_timesteps(10)
    ref.set_timesteps(10)
    s.set_begin_index(4)
    ref.set_begin_index(4)
    assert torch.equal(
        s.add_noise(x, noise, ts[:1].repeat(2)), ref.add_noise(x, noise, ts[:1].repeat(2))
    )
    x_o = x_r = ref.add_noise(x, noise, ref.timesteps[4:5].repeat(2))
    for t in ref.timesteps[4:]:
        x_o = s.step(fake_model(x_o, t), t, x_o).prev_sample
        x_r = ref.step(fake_model(x_r, t), t, x_r).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU


def test_dpm_solver_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(NotImplementedError, match="sde-dpmsolver"):
        DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
        )
    with pytest.raises(NotImplementedError, match="use_beta_sigmas"):
        DPMSolverMultistepScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="algorithm_type"):
        DPMSolverMultistepScheduler(algorithm_type="unipc")
    with pytest.raises(ValueError, match="at most one"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        DPMSolverMultistepScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="exactly one"):
        DPMSolverMultistepScheduler().set_timesteps()
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        DPMSolverMultistepScheduler(use_karras_sigmas=True).set_timesteps(timesteps=[500, 10])


@pytest.mark.parametrize(
    "config", [dict(solver_order=3, thresholding=True), dict(algorithm_type="sde-dpmsolver++")]
)
def test_dpm_solver_one_fused_call_per_step(monkeypatch, config):
    calls = count_op_calls(monkeypatch, dpm_mod)
    s = DPMSolverMultistepScheduler(**config)
    s.set_timesteps(10)
    x = initial_noise()
    for k, t in enumerate(s.timesteps):
        x = s.step(guided_pair(x, t, "epsilon"), t, x, guidance_scale=3.0).prev_sample
        assert len(calls) == k + 1
    assert set(calls) == {2}
