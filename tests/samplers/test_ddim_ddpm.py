"""genext.samplers.DDIMScheduler and DDPMScheduler against diffusers' schedulers.

Every test runs whole trajectories (10, 25 and 50 steps) from the same initial noise with the same
deterministic fake model (a fixed function of sample and timestep) through genext and diffusers,
and compares every intermediate sample and pred_original_sample: relative error at most 1e-6 in
fp32 on the CPU, 1e-5 on CUDA. Each scheduler follows its own trajectory, so errors would
accumulate rather than reset. Stochastic variants use identically seeded generators.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import rel_err, thin

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is the reference these schedulers must match (test extra)"
)

import genext  # noqa: E402
from genext.ops._sampler_step import StepKind  # noqa: E402
from genext.samplers import _discrete as discrete_mod  # noqa: E402
from genext.samplers._base import SchedulerOutput  # noqa: E402
from genext.samplers.ddim import DDIMScheduler  # noqa: E402
from genext.samplers.ddpm import DDPMScheduler  # noqa: E402

SHAPE = (2, 4, 9, 7)  # odd spatial sizes on purpose: no vector-width multiple
STEPS = (10, 25, 50)
CPU_TOL, CUDA_TOL = 1e-6, 1e-5
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
X0_MODES = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True, clip_sample_range=1.5),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0),
}
FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def _inputs(device="cpu", channels=SHAPE[1]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g)
    base = torch.randn((SHAPE[0], channels) + SHAPE[2:], generator=g)
    base2 = torch.randn((SHAPE[0], channels) + SHAPE[2:], generator=g)
    return x.to(device), base.to(device), base2.to(device)


def fake_model(x, t, base):
    """A deterministic stand-in for a denoiser: depends on the sample and the timestep."""
    tf = float(t)
    if base.shape[1] != x.shape[1]:  # learned variance: prediction and variance channels
        x = torch.cat([x, x], dim=1)
    return 0.1 * x * math.cos(tf) + base * (tf / 1000)


def _generators(kind, device, batch):
    if kind is None:
        return None, None
    if kind == "list":
        return (
            [torch.Generator(device).manual_seed(10 + i) for i in range(batch)],
            [torch.Generator(device).manual_seed(10 + i) for i in range(batch)],
        )
    return torch.Generator(device).manual_seed(1234), torch.Generator(device).manual_seed(1234)


def run_pair(
    ours,
    ref,
    steps,
    *,
    step_kw=None,
    guidance=None,
    generator=None,
    device="cpu",
    learned=False,
    variance_noise=False,
    tol=CPU_TOL,
    ours_timesteps_on_device=False,
    model=fake_model,
):
    """Sample `steps` steps with both schedulers; assert each prev_sample and pred_original_sample
    is within `tol`; returns the largest relative error seen."""
    step_kw = dict(step_kw or {})
    ours.set_timesteps(steps, device=device if ours_timesteps_on_device else None)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps.cpu(), ref.timesteps.cpu())
    channels = 2 * SHAPE[1] if learned else SHAPE[1]
    x0, base, base2 = _inputs(device, channels)
    x_ours, x_ref = x0.clone(), x0.clone()
    gen_ours, gen_ref = _generators(generator, device, SHAPE[0])
    noise_gen = torch.Generator().manual_seed(99)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        t_ours = ours.timesteps[i]
        kw_ours, kw_ref = dict(step_kw), dict(step_kw)
        if gen_ours is not None:
            kw_ours["generator"], kw_ref["generator"] = gen_ours, gen_ref
        if variance_noise:
            vn = torch.randn(SHAPE, generator=noise_gen).to(device)
            kw_ours["variance_noise"], kw_ref["variance_noise"] = vn, vn.clone()
        if guidance is None:
            out = ours.step(model(x_ours, t, base), t_ours, x_ours, **kw_ours)
            exp = ref.step(model(x_ref, t, base), int(t), x_ref, **kw_ref)
        else:
            u, c = model(x_ours, t, base), model(x_ours, t, base2)
            out = ours.step(torch.cat([u, c]), t_ours, x_ours, guidance_scale=guidance, **kw_ours)
            u, c = model(x_ref, t, base), model(x_ref, t, base2)
            C = SHAPE[1]
            if learned:  # guidance on the prediction channels, the cond half's variance
                m = torch.cat([u[:, :C] + guidance * (c[:, :C] - u[:, :C]), c[:, C:]], dim=1)
            else:
                m = u + guidance * (c - u)
            exp = ref.step(m, int(t), x_ref, **kw_ref)
        assert isinstance(out, SchedulerOutput)
        for name, a, b in (
            ("prev_sample", out.prev_sample, exp.prev_sample),
            ("pred_original_sample", out.pred_original_sample, exp.pred_original_sample),
        ):
            assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            err = rel_err(a, b)
            assert err <= tol, f"{name} at step {i} (t={int(t)}, {steps} steps): rel err {err:.3g}"
            worst = max(worst, err)
        x_ours, x_ref = out.prev_sample, exp.prev_sample
    return worst


def run_trajectories(make_ours, make_ref, **kw):
    return max(run_pair(make_ours(), make_ref(), n, **kw) for n in STEPS)


# ---- DDIM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", BETAS)
def test_ddim_schedules(beta_schedule, prediction_type, spacing):
    cfg = dict(
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=1,
        clip_sample=False,
    )
    run_trajectories(lambda: DDIMScheduler(**cfg), lambda: diffusers.DDIMScheduler(**cfg))


def _ddim_option_params():
    for pred, x0_mode, zsnr, one, eta in itertools.product(
        PREDICTIONS, X0_MODES, (False, True), (True, False), (0.0, 1.0)
    ):
        yield pytest.param(
            pred,
            x0_mode,
            zsnr,
            one,
            eta,
            id=f"{pred}-{x0_mode}-zsnr{int(zsnr)}-one{int(one)}-eta{eta:g}",
        )


@pytest.mark.parametrize(
    "prediction_type,x0_mode,zero_snr,set_alpha_to_one,eta",
    thin(list(_ddim_option_params()), 5, argcount=5),
)
def test_ddim_options(prediction_type, x0_mode, zero_snr, set_alpha_to_one, eta):
    cfg = dict(
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
        set_alpha_to_one=set_alpha_to_one,
        **X0_MODES[x0_mode],
    )
    run_trajectories(
        lambda: DDIMScheduler(**cfg),
        lambda: diffusers.DDIMScheduler(**cfg),
        step_kw=dict(eta=eta),
        generator="one" if eta else None,
    )


DDIM_EXTRAS = {
    # Stable Diffusion 1.x's scheduler config
    "sd15": (
        dict(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        {},
    ),
    # zero terminal SNR as meant: v-prediction, trailing spacing (the last step sees acp = 0)
    "zero_snr_trailing_v": (
        dict(
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
            prediction_type="v_prediction",
            clip_sample=False,
        ),
        {},
    ),
    "clipped_model_output": (
        dict(clip_sample=True, clip_sample_range=0.8),
        dict(step_kw=dict(eta=0.5, use_clipped_model_output=True), generator="one"),
    ),
    "sample_clipped_model_output": (
        dict(prediction_type="sample", thresholding=True, sample_max_value=1.5),
        dict(step_kw=dict(use_clipped_model_output=True)),
    ),
    "variance_noise": (dict(), dict(step_kw=dict(eta=1.0), variance_noise=True)),
    "generator_list": (
        dict(prediction_type="v_prediction"),
        dict(step_kw=dict(eta=0.7), generator="list"),
    ),
    "guidance": (dict(clip_sample=False), dict(guidance=7.5)),
    "guidance_eta_threshold": (
        dict(thresholding=True, sample_max_value=1.5, prediction_type="v_prediction"),
        dict(guidance=3.0, step_kw=dict(eta=1.0), generator="one"),
    ),
    "trained_betas": (
        dict(
            trained_betas=np.linspace(1e-4, 0.03, 1000) ** 1.1,
            clip_sample=False,
            timestep_spacing="linspace",
        ),
        {},
    ),
    "short_train_T": (
        dict(num_train_timesteps=97, timestep_spacing="trailing", steps_offset=3),
        {},
    ),
}


@pytest.mark.parametrize("case", list(DDIM_EXTRAS))
def test_ddim_extras(case):
    cfg, kw = DDIM_EXTRAS[case]
    run_trajectories(lambda: DDIMScheduler(**cfg), lambda: diffusers.DDIMScheduler(**cfg), **kw)


# ---- DDPM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("variance_type", ("fixed_small", "fixed_small_log", "fixed_large"))
def test_ddpm_variances(variance_type, prediction_type, spacing):
    cfg = dict(
        variance_type=variance_type,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=1,
    )
    run_trajectories(
        lambda: DDPMScheduler(**cfg), lambda: diffusers.DDPMScheduler(**cfg), generator="one"
    )


@pytest.mark.parametrize("zero_snr", (False, True))
@pytest.mark.parametrize("x0_mode", list(X0_MODES))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("beta_schedule", thin(BETAS + ("sigmoid",), 3))
def test_ddpm_options(beta_schedule, prediction_type, x0_mode, zero_snr):
    cfg = dict(
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_snr,
        **X0_MODES[x0_mode],
    )
    run_trajectories(
        lambda: DDPMScheduler(**cfg), lambda: diffusers.DDPMScheduler(**cfg), generator="one"
    )


def test_ddpm_fixed_large_log():
    """diffusers' fixed_large_log takes the square root of log(beta_t) < 0 and returns NaN; genext
    scales the noise by exp(0.5 * log(beta_t)), which is fixed_large up to rounding."""
    ref = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    ref.set_timesteps(10)
    x = torch.randn(SHAPE)
    ref_out = ref.step(0.1 * x, ref.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    if torch.isfinite(ref_out.prev_sample).all():  # diffusers fixed it: compare directly
        run_trajectories(
            lambda: DDPMScheduler(variance_type="fixed_large_log"),
            lambda: diffusers.DDPMScheduler(variance_type="fixed_large_log"),
            generator="one",
        )
        return
    assert torch.isnan(ref_out.prev_sample).all()
    run_trajectories(
        lambda: DDPMScheduler(variance_type="fixed_large_log"),
        lambda: diffusers.DDPMScheduler(variance_type="fixed_large"),
        generator="one",
    )


def learned_variance_model(x, t, base):
    """The fake model with C prediction and C variance channels, the variance squashed into
    (0, 1) (positive for "learned", inside [-1, 1] for "learned_range")."""
    out = fake_model(x, t, base)
    C = x.shape[1]
    return torch.cat([out[:, :C], torch.sigmoid(out[:, C:])], dim=1)


@pytest.mark.parametrize("guidance", (None, 4.0))
@pytest.mark.parametrize("variance_type", thin(("learned", "learned_range"), 2))
def test_ddpm_learned_variance(variance_type, guidance):
    cfg = dict(variance_type=variance_type, clip_sample=False)
    run_trajectories(
        lambda: DDPMScheduler(**cfg),
        lambda: diffusers.DDPMScheduler(**cfg),
        generator="one",
        learned=True,
        guidance=guidance,
        model=learned_variance_model,
    )


def test_ddpm_guidance_threshold():
    cfg = dict(thresholding=True, sample_max_value=1.5, prediction_type="v_prediction")
    run_trajectories(
        lambda: DDPMScheduler(**cfg),
        lambda: diffusers.DDPMScheduler(**cfg),
        guidance=5.0,
        generator="list",
    )


def test_ddpm_custom_timesteps_and_full_chain():
    custom = [999, 800, 640, 333, 100, 41, 7, 0]
    ours, ref = DDPMScheduler(clip_sample=False), diffusers.DDPMScheduler(clip_sample=False)
    ours.set_timesteps(timesteps=custom)
    ref.set_timesteps(timesteps=custom)
    assert torch.equal(ours.timesteps, ref.timesteps)
    x, base, _ = _inputs()
    xo, xr = x.clone(), x.clone()
    go, gr = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in custom:
        assert ours.previous_timestep(t) == int(ref.previous_timestep(t))
        o = ours.step(fake_model(xo, t, base), t, xo, generator=go)
        r = ref.step(fake_model(xr, t, base), t, xr, generator=gr)
        assert rel_err(o.prev_sample, r.prev_sample) <= CPU_TOL
        xo, xr = o.prev_sample, r.prev_sample
    # without set_timesteps: the training chain, previous timestep t - 1
    ours, ref = DDPMScheduler(), diffusers.DDPMScheduler()
    xo, xr = x.clone(), x.clone()
    for t in range(999, 969, -1):
        o = ours.step(fake_model(xo, t, base), t, xo, generator=go)
        r = ref.step(fake_model(xr, t, base), t, xr, generator=gr)
        assert rel_err(o.prev_sample, r.prev_sample) <= CPU_TOL
        assert rel_err(o.pred_original_sample, r.pred_original_sample) <= CPU_TOL
        xo, xr = o.prev_sample, r.prev_sample


# ---- schedules, add_noise, config ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cls_pair",
    [(DDIMScheduler, "DDIMScheduler"), (DDPMScheduler, "DDPMScheduler")],
    ids=["ddim", "ddpm"],
)
def test_set_timesteps_matches(cls_pair):
    ours_cls, ref_cls = cls_pair[0], getattr(diffusers, cls_pair[1])
    for T, spacing, offset in itertools.product((1000, 999, 37), SPACINGS, (0, 1, 3)):
        ours = ours_cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        ref = ref_cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        assert torch.equal(ours.timesteps, ref.timesteps)
        for n in sorted({1, 2, 7, 10, 25, 36, 50, T // 3, T}):
            if n > T:
                continue
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            assert ours.timesteps.dtype == ref.timesteps.dtype == torch.int64
            assert torch.equal(ours.timesteps, ref.timesteps), (T, spacing, offset, n)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ours_cls().set_timesteps(1001)


@pytest.mark.parametrize("beta_schedule", BETAS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.float64))
def test_add_noise_and_velocity(beta_schedule, dtype):
    for ours_cls, ref_cls in (
        (DDIMScheduler, diffusers.DDIMScheduler),
        (DDPMScheduler, diffusers.DDPMScheduler),
    ):
        for zsnr in (False, True):
            ours = ours_cls(beta_schedule=beta_schedule, rescale_betas_zero_snr=zsnr)
            ref = ref_cls(beta_schedule=beta_schedule, rescale_betas_zero_snr=zsnr)
            assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
            assert torch.equal(ours.betas, ref.betas)
            x = torch.randn(SHAPE).to(dtype)
            noise = torch.randn(SHAPE).to(dtype)
            for ts in (torch.tensor([0, 999]), torch.tensor([500, 3]), torch.tensor(250)):
                assert torch.equal(ours.add_noise(x, noise, ts), ref.add_noise(x, noise, ts))
                assert torch.equal(ours.get_velocity(x, noise, ts), ref.get_velocity(x, noise, ts))


@pytest.mark.parametrize(
    "ours_cls,ref_name",
    [(DDIMScheduler, "DDIMScheduler"), (DDPMScheduler, "DDPMScheduler")],
    ids=["ddim", "ddpm"],
)
def test_from_config_round_trip(ours_cls, ref_name):
    ref_cls = getattr(diffusers, ref_name)
    ref = ref_cls(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
        rescale_betas_zero_snr=True,
        clip_sample=False,
    )
    ours = ours_cls.from_config(ref.config)
    assert set(ours.config) == set(k for k in ref.config if not k.startswith("_"))
    for k, v in ours.config.items():
        assert ref.config[k] == v, k
        assert getattr(ours.config, k) == v
    back = ref_cls.from_config(dict(ours.config))
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ref.config)
    assert dict(ours_cls.from_config(ours).config) == dict(ours.config)
    assert ours_cls.from_config(ref, prediction_type="epsilon").config.prediction_type == "epsilon"
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
    assert len(ours) == len(ref) == 1000
    x = torch.randn(SHAPE)
    assert ours.scale_model_input(x, 5) is x


# ---- API details --------------------------------------------------------------------------------


def test_step_is_one_fused_call(monkeypatch):
    calls = []
    real = discrete_mod.sampler_step

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(discrete_mod, "sampler_step", counting)
    monkeypatch.setattr(genext.reference, "sampler_step", None)  # the schedulers must not need it
    x, base, _ = _inputs()
    for sched, mode in (
        (DDIMScheduler(thresholding=True), StepKind.DDIM),
        (DDPMScheduler(thresholding=True), StepKind.DDPM),
    ):
        sched.set_timesteps(10)
        calls.clear()
        for t in sched.timesteps:
            x = sched.step(fake_model(x, t, base), t, x, generator=torch.Generator()).prev_sample
        assert calls == [mode] * 10


def test_return_tuple_and_step_index():
    x, base, _ = _inputs()
    for sched in (DDIMScheduler(), DDPMScheduler()):
        sched.set_timesteps(5)
        assert sched.step_index is None
        out = sched.step(
            fake_model(x, sched.timesteps[0], base), sched.timesteps[0], x, return_dict=False
        )
        assert isinstance(out, tuple) and len(out) == 2
        assert sched.step_index == 1
        sched.set_begin_index(2)
        assert sched.begin_index == 2
        sched.set_timesteps(5)
        assert sched.begin_index is None and sched.step_index is None


def test_bad_arguments():
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        DDIMScheduler().step(x, 10, x)
    s = DDIMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        s.step(x, 900, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="uncond, cond"):
        s.step(x, 900, x, guidance_scale=2.0)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMScheduler(prediction_type="eps")
    with pytest.raises(ValueError, match="timestep_spacing"):
        DDPMScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="variance_type"):
        DDPMScheduler(variance_type="fixed")
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        DDIMScheduler(beta_schedule="sigmoid")  # diffusers' DDIM does not know it either
    s = DDPMScheduler(variance_type="learned")
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="channels"):
        s.step(x, 900, x)
    s = DDPMScheduler()
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="not in the schedule"):
        s.step(x, 901, x)
    with pytest.raises(ValueError, match="exactly one"):
        s.set_timesteps()
    with pytest.raises(ValueError, match="descending"):
        s.set_timesteps(timesteps=[10, 20])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_16bit_samples(dtype):
    """16-bit samples: the step computes in fp32 and rounds once, so it is diffusers' fp32 step on
    the same (rounded) inputs to within the dtype's rounding. (DDPM at its last timestep, which
    draws no noise: a 16-bit draw is not the fp32 draw.)"""
    x, base, _ = _inputs()
    x = x.to(dtype)
    eps = torch.finfo(dtype).eps
    for ours, ref, t in (
        (DDIMScheduler(thresholding=True), diffusers.DDIMScheduler(thresholding=True), 700),
        (
            DDPMScheduler(prediction_type="v_prediction"),
            diffusers.DDPMScheduler(prediction_type="v_prediction"),
            0,
        ),
    ):
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        m = fake_model(x.float(), 800, base).to(dtype)
        out = ours.step(m, t, x)
        exp = ref.step(m.float(), t, x.float())
        assert out.prev_sample.dtype == out.pred_original_sample.dtype == dtype
        assert rel_err(out.prev_sample, exp.prev_sample) <= eps
        assert rel_err(out.pred_original_sample, exp.pred_original_sample) <= eps


# ---- CUDA ---------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("which", ("ddim", "ddpm"))
def test_cuda_matches_diffusers(which):
    """On the GPU, timesteps on the device (genext then reads no timestep back after the first
    step) and CUDA generators; the steps after the first must not synchronise."""
    if which == "ddim":
        cfg = dict(thresholding=True, sample_max_value=1.5, prediction_type="v_prediction")
        pair = (lambda: DDIMScheduler(**cfg), lambda: diffusers.DDIMScheduler(**cfg))
        kw = dict(step_kw=dict(eta=1.0), guidance=3.0, generator="one")
    else:
        cfg = dict(clip_sample=True, variance_type="fixed_small_log")
        pair = (lambda: DDPMScheduler(**cfg), lambda: diffusers.DDPMScheduler(**cfg))
        kw = dict(generator="one")
    worst = run_trajectories(
        *pair, device="cuda", tol=CUDA_TOL, ours_timesteps_on_device=True, **kw
    )
    assert worst <= CUDA_TOL

    ours = pair[0]()
    ours.set_timesteps(10, device="cuda")
    x, base, base2 = _inputs("cuda")
    gen = torch.Generator("cuda").manual_seed(0)
    outs = [fake_model(x, t, base) for t in ours.timesteps.tolist()]
    ours.step(
        outs[0] if which == "ddpm" else torch.cat([outs[0], outs[0]]),
        ours.timesteps[0],
        x,
        generator=gen,
        **({} if which == "ddpm" else dict(eta=1.0, guidance_scale=3.0)),
    )
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 10):
            m = outs[i] if which == "ddpm" else torch.cat([outs[i], outs[i]])
            ours.step(
                m,
                ours.timesteps[i],
                x,
                generator=gen,
                **({} if which == "ddpm" else dict(eta=1.0, guidance_scale=3.0)),
            )
    finally:
        torch.cuda.set_sync_debug_mode(0)
