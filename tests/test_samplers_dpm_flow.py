"""genext's DPMSolverMultistepScheduler and FlowMatchEulerDiscreteScheduler against diffusers.

Whole trajectories (10, 25 and 50 steps) start from the same noise; the "model" is a fixed
deterministic function of the sample and the timestep, evaluated on each library's own trajectory,
and every intermediate sample must stay within 1e-6 relative error (fp32, CPU) of diffusers'.
Stochastic variants draw their noise from identically seeded generators. Schedules
(`timesteps`, `sigmas`) must be identical, and configs must round-trip between the libraries.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers",
    reason="diffusers is the reference these schedulers must match (pip install diffusers)")

import genext  # noqa: E402,F401
from genext.samplers import dpm_solver as dpm_mod  # noqa: E402
from genext.samplers import flow_match as flow_mod  # noqa: E402
from genext.samplers.dpm_solver import DPMSolverMultistepScheduler  # noqa: E402
from genext.samplers.flow_match import FlowMatchEulerDiscreteScheduler  # noqa: E402

from conftest import rel_err  # noqa: E402

RefDPM = diffusers.DPMSolverMultistepScheduler
RefFlow = diffusers.FlowMatchEulerDiscreteScheduler

STEPS = (10, 25, 50)
# an odd spatial shape on purpose: 9 x 13 = 117 elements per channel, not a multiple of any
# vector width, so the kernels' scalar tails are part of every trajectory
SHAPE = (2, 4, 9, 13)
TOL_CPU = 1e-6
TOL_CUDA = 1e-5

# diffusers warns that the original "dpmsolver" algorithms are deprecated; that is its business
# and numpy 2 warns about how diffusers converts a tensor (np.array(tensor)); not ours either
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]


def fake_model(x: torch.Tensor, t, kind: str = "epsilon", channels_out: int | None = None):
    """A deterministic stand-in for a denoiser: a smooth function of the sample and the timestep.
    For "sample" prediction it looks like data (bounded, a little over 1 so that thresholding
    clamps); otherwise like noise or velocity. channels_out > C appends extra channels (a learned
    variance), as models with variance_type "learned_range" output."""
    tt = float(t) / 1000.0
    if kind == "sample":
        out = torch.tanh(1.5 * x) * (1.25 - 0.5 * tt)
    else:
        out = 0.8 * torch.sin(1.3 * x + 3.0 * tt) + 0.1 * x
    if channels_out is not None and channels_out > x.shape[1]:
        out = torch.cat([out, torch.cos(out[:, : channels_out - x.shape[1]])], dim=1)
    return out


def guided_pair(x: torch.Tensor, t, kind: str):
    """[uncond, cond] model outputs, stacked along dim 0."""
    u = fake_model(x, t, kind)
    c = 0.7 * u + 0.2 * torch.cos(x)
    return torch.cat([u, c])


def initial_noise(device="cpu", shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1234)).to(device)


def compare_trajectories(ours, ref, n, *, kind="epsilon", guidance=None, device="cpu", tol=TOL_CPU,
                         set_kwargs=None, begin_index=None, channels_out=None, shape=SHAPE,
                         gen_device="cpu") -> float:
    """Runs both schedulers for n steps and returns the largest relative error of any
    intermediate sample (asserting each is within tol)."""
    set_kwargs = set_kwargs or {}
    ours.set_timesteps(n, device=device, **set_kwargs)
    ref.set_timesteps(n, device=device, **set_kwargs)
    if begin_index is not None:
        ours.set_begin_index(begin_index)
        ref.set_begin_index(begin_index)
    assert torch.equal(ours.timesteps.cpu(), ref.timesteps.cpu())
    x_ours = initial_noise(device, shape) * ours.init_noise_sigma
    x_ref = x_ours.clone()
    g_ours = torch.Generator(gen_device).manual_seed(77)
    g_ref = torch.Generator(gen_device).manual_seed(77)
    worst = 0.0
    for k, t in enumerate(ref.timesteps):
        if guidance is None:
            m_ours = fake_model(x_ours, t, kind, channels_out)
            m_ref = fake_model(x_ref, t, kind, channels_out)
            x_ours = ours.step(m_ours, t, x_ours, generator=g_ours).prev_sample
        else:
            m_ours = guided_pair(x_ours, t, kind)
            u, c = guided_pair(x_ref, t, kind).chunk(2)
            m_ref = u + guidance * (c - u)  # diffusers users combine outside the scheduler
            x_ours = ours.step(m_ours, t, x_ours, generator=g_ours,
                               guidance_scale=guidance).prev_sample
        x_ref = ref.step(m_ref, t, x_ref, generator=g_ref).prev_sample
        broken = ~torch.isfinite(x_ref)
        if broken.any():
            # diffusers quirk: Karras sigmas end at the training sigma_min, so with
            # final_sigmas_type "sigma_min" the last step has h = 0, and a third-order update
            # (lower_order_final off or >= 15 steps) divides by it: NaN. Match it per element.
            assert torch.equal(broken, ~torch.isfinite(x_ours)), f"step {k}: NaN/inf differ"
            x_ours_f, x_ref_f = x_ours[~broken], x_ref[~broken]
        else:
            x_ours_f, x_ref_f = x_ours, x_ref
        err = rel_err(x_ours_f, x_ref_f) if x_ref_f.numel() else 0.0
        assert err <= tol, f"step {k} of {n} (t={t.item()}): relative error {err:.3g} > {tol}"
        worst = max(worst, err)
    assert x_ours.dtype == x_ref.dtype and x_ours.shape == x_ref.shape
    return worst


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical values and dtype, NaN equal to NaN (diffusers makes NaN schedules for some
    degenerate inputs, e.g. one step with shift_terminal; they must match too)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and bool(((a == b) | (a.isnan() & b.isnan())).all()))


def both(ours_cls, ref_cls, **config):
    return ours_cls(**config), ref_cls(**config)


# ---- DPM-Solver++: the solver grid ---------------------------------------------------------------

SOLVER_GRID = list(itertools.product(
    ["dpmsolver++", "sde-dpmsolver++"], [1, 2, 3], ["midpoint", "heun"],
    ["epsilon", "v_prediction", "sample"]))


@pytest.mark.parametrize("algorithm_type,solver_order,solver_type,prediction_type", SOLVER_GRID)
def test_dpm_solver_grid_matches_diffusers(algorithm_type, solver_order, solver_type,
                                           prediction_type):
    for n in STEPS:
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, algorithm_type=algorithm_type,
                         solver_order=solver_order, solver_type=solver_type,
                         prediction_type=prediction_type)
        compare_trajectories(ours, ref, n, kind=prediction_type)


# The step-size and final-step options, all 32 combinations, each on order 2 and 3 of both
# algorithms (the lower-order rules differ between orders; 10 steps is where lower_order_final
# acts, 25 and 50 where it does not)
OPTION_GRID = list(itertools.product([False, True], ["zero", "sigma_min"], [True, False],
                                     [False, True], [False, True]))


@pytest.mark.parametrize("use_karras_sigmas,final_sigmas_type,lower_order_final,euler_at_final,"
                         "thresholding", OPTION_GRID)
def test_dpm_solver_options_match_diffusers(use_karras_sigmas, final_sigmas_type,
                                            lower_order_final, euler_at_final, thresholding):
    cases = [("dpmsolver++", 3, "epsilon"), ("sde-dpmsolver++", 2, "v_prediction")]
    for (algorithm_type, solver_order, kind), n in itertools.product(cases, STEPS):
        config = dict(algorithm_type=algorithm_type, solver_order=solver_order,
                      prediction_type=kind, use_karras_sigmas=use_karras_sigmas,
                      final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final,
                      euler_at_final=euler_at_final, thresholding=thresholding,
                      sample_max_value=1.5)
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
    pytest.param(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
                 id="scaled_linear"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2"), id="cosine"),
    pytest.param(dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1,
                      use_karras_sigmas=True), id="cosine-clipped-karras"),
    pytest.param(dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()), id="trained"),
    pytest.param(dict(num_train_timesteps=500, beta_end=0.03), id="T500"),
    pytest.param(dict(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear",
                      beta_start=0.00085, beta_end=0.012), id="leading-offset"),
    pytest.param(dict(timestep_spacing="trailing", steps_offset=1), id="trailing"),
    pytest.param(dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                      prediction_type="v_prediction"), id="zero-snr-v"),
    pytest.param(dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                      prediction_type="v_prediction", thresholding=True, sample_max_value=2.0,
                      dynamic_thresholding_ratio=0.9), id="zero-snr-v-threshold"),
    pytest.param(dict(use_exponential_sigmas=True, solver_order=3), id="exponential"),
    pytest.param(dict(use_lu_lambdas=True), id="lu-lambdas"),
    pytest.param(dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"),
                 id="flow-sigmas"),
    pytest.param(dict(variance_type="learned_range"), id="learned-variance"),
    # diffusers maps "deis" to dpmsolver++ but checks final_sigmas_type against the given name
    pytest.param(dict(algorithm_type="deis", final_sigmas_type="sigma_min"),
                 id="deis-maps-to-dpmsolver++"),
    # the original (noise-prediction) DPM-Solver, optional in the issue but supported
    pytest.param(dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3,
                      prediction_type="v_prediction"), id="dpmsolver-3-v"),
    pytest.param(dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=2,
                      solver_type="heun", prediction_type="sample", thresholding=True,
                      sample_max_value=1.5), id="dpmsolver-2-heun-sample-threshold"),
    pytest.param(dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min",
                      solver_order=2), id="sde-dpmsolver-2"),
    pytest.param(dict(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min",
                      solver_order=2, solver_type="heun", thresholding=True,
                      sample_max_value=1.5), id="sde-dpmsolver-2-heun-threshold"),
]


@pytest.mark.parametrize("config", SCHEDULE_CONFIGS)
def test_dpm_solver_schedules_match_diffusers(config):
    kind = config.get("prediction_type", "epsilon")
    learned = config.get("variance_type") is not None
    for n in STEPS:
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
        # Karras spacing of the cosine schedule repeats its first timesteps, and diffusers would
        # then start at the second occurrence and run off the end; pipelines set the begin index
        compare_trajectories(ours, ref, n, kind=kind, begin_index=0,
                             shape=(2, 3, 9, 13) if learned else SHAPE,
                             channels_out=6 if learned else None)


@pytest.mark.parametrize("config", [
    dict(), dict(algorithm_type="sde-dpmsolver++", solver_order=3),
    dict(thresholding=True, sample_max_value=1.5, solver_order=3),
    dict(algorithm_type="sde-dpmsolver++", thresholding=True, sample_max_value=1.5,
         solver_type="heun", prediction_type="v_prediction"),
    dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min", thresholding=True,
         sample_max_value=1.5)], ids=["2M", "sde-3", "threshold-3", "sde-heun-v-threshold",
                                      "dpmsolver-threshold"])
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
    dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2",
         lambda_min_clipped=-5.1),
    dict(timestep_spacing="leading", beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-3.0),
]


@pytest.mark.parametrize("config", TIMESTEP_CONFIGS)
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
    config = dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                  use_dynamic_shifting=True)
    ours, ref = both(DPMSolverMultistepScheduler, RefDPM, **config)
    ours.set_timesteps(20, mu=0.9)
    ref.set_timesteps(20, mu=0.9)
    assert ours.config.flow_shift == ref.config.flow_shift
    assert same(ours.timesteps, ref.timesteps) and same(ours.sigmas, ref.sigmas)


def test_dpm_solver_config_round_trip():
    ref = RefDPM(solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True,
                 beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 timestep_spacing="trailing", steps_offset=1, prediction_type="v_prediction",
                 final_sigmas_type="sigma_min", thresholding=True)
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
        k: v for k, v in RefDPM().config.items() if not k.startswith("_")}
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
    assert torch.equal(s.add_noise(x, noise, ts[:1].repeat(2)),
                       ref.add_noise(x, noise, ts[:1].repeat(2)))
    x_o = x_r = ref.add_noise(x, noise, ref.timesteps[4:5].repeat(2))
    for t in ref.timesteps[4:]:
        x_o = s.step(fake_model(x_o, t), t, x_o).prev_sample
        x_r = ref.step(fake_model(x_r, t), t, x_r).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU


def test_dpm_solver_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="final_sigmas_type"):
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(NotImplementedError, match="sde-dpmsolver"):
        DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", solver_order=3,
                                    final_sigmas_type="sigma_min")
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


# ---- one fused call per step ---------------------------------------------------------------------

def _count_op_calls(monkeypatch, module):
    calls = []
    real = module.sampler_step

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sampler_step", counting)
    return calls


@pytest.mark.parametrize("config", [dict(solver_order=3, thresholding=True),
                                    dict(algorithm_type="sde-dpmsolver++")])
def test_dpm_solver_one_fused_call_per_step(monkeypatch, config):
    calls = _count_op_calls(monkeypatch, dpm_mod)
    s = DPMSolverMultistepScheduler(**config)
    s.set_timesteps(10)
    x = initial_noise()
    for k, t in enumerate(s.timesteps):
        x = s.step(guided_pair(x, t, "epsilon"), t, x, guidance_scale=3.0).prev_sample
        assert len(calls) == k + 1
    assert set(calls) == {2}


def test_flow_one_fused_call_per_step(monkeypatch):
    calls = _count_op_calls(monkeypatch, flow_mod)
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


@pytest.mark.parametrize("config", FLOW_CONFIGS)
def test_flow_matches_diffusers(config):
    for n in STEPS:
        ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, **config)
        compare_trajectories(ours, ref, n, kind="v")


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_flow_dynamic_shift_matches_diffusers(time_shift_type):
    for n in STEPS:
        ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, use_dynamic_shifting=True,
                         time_shift_type=time_shift_type, base_shift=0.5, max_shift=1.15)
        compare_trajectories(ours, ref, n, kind="v", set_kwargs=dict(mu=0.8))


@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_fused_guidance_matches_diffusers(stochastic):
    for n in STEPS:
        ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0,
                         stochastic_sampling=stochastic)
        compare_trajectories(ours, ref, n, kind="v", guidance=4.5)


FLOW_TIMESTEP_CONFIGS = [dict(c.values[0]) for c in FLOW_CONFIGS] + [
    dict(use_dynamic_shifting=True), dict(use_dynamic_shifting=True, time_shift_type="linear"),
    dict(use_dynamic_shifting=True, shift_terminal=0.1)]


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
    ref = RefFlow(shift=3.0, use_dynamic_shifting=True, base_shift=0.4, max_shift=1.2,
                  shift_terminal=0.02, stochastic_sampling=True)
    ours = FlowMatchEulerDiscreteScheduler.from_config(ref.config)
    public = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert dict(ours.config) == public
    assert {k: v for k, v in RefFlow.from_config(ours.config).config.items()
            if not k.startswith("_")} == public
    assert dict(FlowMatchEulerDiscreteScheduler().config) == {
        k: v for k, v in RefFlow().config.items() if not k.startswith("_")}

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
        x_r = ref.step(fake_model(x_r, t, "v"), t, x_r,
                       generator=torch.Generator().manual_seed(k)).prev_sample
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
    ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0,
                     stochastic_sampling=stochastic)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x_o = x_r = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    g_o, g_r = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for k, t in enumerate(ref.timesteps):
        per_token = (t - 60.0 * torch.linspace(0, 1, 16)).clamp(min=1.0).expand(2, 16)
        x_o = ours.step(fake_model(x_o, t, "v"), t, x_o, per_token_timesteps=per_token,
                        generator=g_o).prev_sample
        x_r = ref.step(fake_model(x_r, t, "v"), t, x_r, per_token_timesteps=per_token,
                       generator=g_r).prev_sample
        assert rel_err(x_o, x_r) <= TOL_CPU, k


# ---- CUDA ----------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_cuda_trajectories_match_diffusers(gen_device):
    """The same comparisons on the GPU, both libraries on CUDA, at 1e-5 (diffusers' CUDA division
    by a host scalar multiplies by the reciprocal; the kernels divide exactly)."""
    for n in (10, 25):
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, algorithm_type="sde-dpmsolver++",
                         solver_order=3, thresholding=True, sample_max_value=1.5)
        compare_trajectories(ours, ref, n, device="cuda", tol=TOL_CUDA, guidance=7.5,
                             gen_device=gen_device)
        ours, ref = both(DPMSolverMultistepScheduler, RefDPM, use_karras_sigmas=True,
                         prediction_type="v_prediction")
        compare_trajectories(ours, ref, n, kind="v_prediction", device="cuda", tol=TOL_CUDA,
                             gen_device=gen_device)
        ours, ref = both(FlowMatchEulerDiscreteScheduler, RefFlow, shift=3.0,
                         stochastic_sampling=True)
        compare_trajectories(ours, ref, n, kind="v", device="cuda", tol=TOL_CUDA, guidance=4.5,
                             gen_device=gen_device)


@pytest.mark.cuda
def test_cuda_steps_after_the_first_do_not_sync():
    """No host-device synchronisation in a step once the step index is known (what CUDA-graph
    capture of the loop needs): the coefficients come from host copies of the schedule."""
    for make, kind in [
            (lambda: DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
                                                 solver_order=3), "epsilon"),
            (lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True), "v")]:
        s = make()
        s.set_timesteps(10, device="cuda")
        host_t = s.timesteps.cpu()
        g = torch.Generator("cuda").manual_seed(0)
        x = initial_noise("cuda")
        x = s.step(guided_pair(x, host_t[0], kind), s.timesteps[0], x, generator=g,
                   guidance_scale=5.0).prev_sample
        torch.cuda.synchronize()
        outputs = [guided_pair(x, t, kind) for t in host_t]  # model stand-ins, made beforehand
        torch.cuda.set_sync_debug_mode("error")
        try:
            for k in range(1, len(host_t)):
                x = s.step(outputs[k], s.timesteps[k], x, generator=g,
                           guidance_scale=5.0).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(x).all()
