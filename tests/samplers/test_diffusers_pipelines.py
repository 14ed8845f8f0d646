"""genext's schedulers inside diffusers pipelines, as diffusers' own schedulers are.

A tiny DDPMPipeline (and a tiny StableDiffusionPipeline) built from configs with perturbed random
weights runs with a genext scheduler, is saved with `save_pretrained` and loaded back with
`DiffusionPipeline.from_pretrained` and the pipeline's own class: model_index.json must name
genext's class, the loaded scheduler must be genext's with the same config, and it must give the
images the pipeline gave before saving (same generator). Also: pipeline constructors keep the
scheduler they are given, `from_pretrained(..., scheduler=genext's)` of a pipeline saved with
diffusers' scheduler keeps genext's, scheduler-level `save_pretrained` / `from_pretrained` (with
`subfolder`) in diffusers' file layout both ways, `from_config` both ways, and genext's schedulers
working alone in a process where diffusers cannot be imported.

The schedulers' numbers against diffusers' are the other sampler tests' business; here the
images are compared with the pipeline run on diffusers' scheduler of the same config only to show
that the genext scheduler ran through the pipeline's own calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from peer_parity import perturb_

diffusers = pytest.importorskip(
    "diffusers", reason="the pipelines these schedulers must plug into (test extra)"
)

import genext.samplers as samplers  # noqa: E402

# diffusers' own tiny DDPMPipeline test U-Net (tests/pipelines/ddpm), with 2-group norms
UNET2D = dict(
    block_out_channels=(4, 8),
    layers_per_block=1,
    norm_num_groups=2,
    sample_size=8,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)
# a DDPM-style training schedule that is not diffusers' default, so a config that fell back to
# defaults on the way would show
TRAIN = dict(
    num_train_timesteps=200, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)
STEPS = 4
# genext class -> (its diffusers peer, module diffusers records it under, extra config fields)
KINDS = {
    "ddpm": (samplers.DDPMScheduler, "genext.samplers.ddpm", dict(clip_sample=False)),
    "ddim": (samplers.DDIMScheduler, "genext.samplers.ddim", dict(set_alpha_to_one=False)),
    "dpm": (
        samplers.DPMSolverMultistepScheduler,
        "genext.samplers.dpm_solver",
        dict(solver_order=2, timestep_spacing="trailing"),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: one thread is faster than two contending on a shared machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unet():
    torch.manual_seed(0)
    return perturb_(diffusers.UNet2DModel(**UNET2D), seed=1).eval()


def _peer_scheduler(kind: str):
    cls, _, extra = KINDS[kind]
    return getattr(diffusers, cls.__name__)(**TRAIN, **extra)


def _images(pipe, seed: int = 5) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return pipe(batch_size=2, generator=g, num_inference_steps=STEPS, output_type="np").images


def _timesteps(scheduler, steps: int):
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.clone()


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ---- whole pipelines ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_ddpm_pipeline_saves_and_reloads_genext_scheduler(kind, tmp_path):
    cls, module, _ = KINDS[kind]
    peer_sched = _peer_scheduler(kind)
    ours = cls.from_config(peer_sched.config)
    pipe = diffusers.DDPMPipeline(unet=_unet(), scheduler=ours)
    assert pipe.scheduler is ours  # the constructor keeps it
    before = _images(pipe)
    # the pipeline's own calls reach genext's step: the same images as with diffusers' scheduler
    peer_pipe = diffusers.DDPMPipeline(unet=pipe.unet, scheduler=peer_sched)
    np.testing.assert_allclose(before, _images(peer_pipe), rtol=0, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == [module, cls.__name__]
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__
    assert saved["_diffusers_version"] == diffusers.__version__
    assert _public(saved) == _public(ours.config)

    for loader in (diffusers.DiffusionPipeline, diffusers.DDPMPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is diffusers.DDPMPipeline
        assert type(loaded.scheduler) is cls, loader
        assert _public(loaded.scheduler.config) == _public(ours.config)
        np.testing.assert_array_equal(_images(loaded), before)
        # and saved again, it still names genext's class
        loaded.save_pretrained(tmp_path / "again")
        index = json.loads((tmp_path / "again" / "model_index.json").read_text())
        assert index["scheduler"] == [module, cls.__name__]


def test_scheduler_set_after_construction_is_saved(tmp_path):
    # DDIMPipeline's constructor turns any scheduler into diffusers' DDIMScheduler (diffusers'
    # choice, for its own schedulers too); a scheduler assigned afterwards stays
    unet = _unet()
    ours = samplers.DDIMScheduler.from_config(_peer_scheduler("ddim").config)
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=ours)
    assert type(pipe.scheduler) is diffusers.DDIMScheduler
    pipe.scheduler = ours
    assert pipe.config.scheduler == ("genext.samplers.ddim", "DDIMScheduler")
    g = torch.Generator().manual_seed(5)
    before = pipe(batch_size=2, generator=g, num_inference_steps=STEPS, output_type="np").images
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is diffusers.DDIMPipeline
    # (loading runs the constructor, which converts again, as it does diffusers' own)
    assert type(loaded.scheduler) is diffusers.DDIMScheduler
    assert _public(loaded.scheduler.config) == _public(ours.config)
    loaded.scheduler = samplers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    g = torch.Generator().manual_seed(5)
    after = loaded(batch_size=2, generator=g, num_inference_steps=STEPS, output_type="np").images
    np.testing.assert_array_equal(after, before)


def test_from_pretrained_keeps_a_passed_genext_scheduler(tmp_path):
    # a pipeline saved with diffusers' scheduler, loaded with genext's in its place
    peer = diffusers.DDPMPipeline(unet=_unet(), scheduler=_peer_scheduler("ddpm"))
    peer.save_pretrained(tmp_path)
    ours = samplers.DDPMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert _public(ours.config) == _public(peer.scheduler.config)
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path, scheduler=ours)
    assert pipe.scheduler is ours
    np.testing.assert_allclose(_images(pipe), _images(peer), rtol=0, atol=1e-5)


def _tiny_sd(scheduler):
    # diffusers' tiny Stable Diffusion components (as tests/models/test_ldm.py), no text encoder:
    # the prompts come as embeddings
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    )
    return diffusers.StableDiffusionPipeline(
        vae=perturb_(vae, seed=2).eval(),
        text_encoder=None,
        tokenizer=None,
        unet=perturb_(unet, seed=1).eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd_images(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 7, 32, generator=g)
    g = torch.Generator().manual_seed(4)
    return pipe(
        prompt_embeds=embeds[:1],
        negative_prompt_embeds=embeds[1:],
        guidance_scale=5.0,
        height=16,
        width=16,
        num_inference_steps=STEPS,
        generator=g,
        output_type="pt",
    ).images


def test_stable_diffusion_pipeline_with_genext_scheduler(tmp_path):
    # steps_offset 0 and clip_sample True (DDIM's defaults, so listed in the config's
    # _use_default_values): the constructor rewrites both in the scheduler's config (diffusers'
    # fix-up of old configs), which genext's scheduler must follow
    peer_sched = diffusers.DDIMScheduler(**TRAIN)
    assert {"steps_offset", "clip_sample"} <= set(peer_sched.config["_use_default_values"])
    ours = samplers.DDIMScheduler.from_config(peer_sched.config)
    with pytest.warns(FutureWarning):
        pipe = _tiny_sd(ours)
    assert pipe.scheduler is ours
    assert ours.config.steps_offset == 1 and ours.config.clip_sample is False
    with pytest.warns(FutureWarning):
        peer_pipe = _tiny_sd(peer_sched)
    assert _public(peer_sched.config) == _public(ours.config)
    # the rewritten fields stay listed in _use_default_values: from_config keeps their values
    # (diffusers' own from_config would go back to steps_offset 0 here)
    assert samplers.DDIMScheduler.from_config(peer_sched.config).config.steps_offset == 1
    assert (
        samplers.DPMSolverMultistepScheduler.from_config(peer_sched.config).config.steps_offset == 1
    )
    before = _sd_images(pipe)
    torch.testing.assert_close(before, _sd_images(peer_pipe), rtol=0, atol=1e-5)

    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["genext.samplers.ddim", "DDIMScheduler"]
    # (the pipeline has no text encoder or tokenizer to save: none is passed back)
    loaded = diffusers.DiffusionPipeline.from_pretrained(
        tmp_path, text_encoder=None, tokenizer=None
    )
    assert type(loaded) is diffusers.StableDiffusionPipeline
    assert type(loaded.scheduler) is samplers.DDIMScheduler
    assert _public(loaded.scheduler.config) == _public(ours.config)
    assert torch.equal(_sd_images(loaded), before)


# ---- the scheduler alone ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        samplers.DDIMScheduler,
        samplers.DDPMScheduler,
        samplers.DPMSolverMultistepScheduler,
        samplers.FlowMatchEulerDiscreteScheduler,
    ],
    ids=lambda c: c.__name__,
)
def test_scheduler_save_and_load_in_diffusers_layout(cls, tmp_path):
    peer_cls = getattr(diffusers, cls.__name__)
    if cls is samplers.FlowMatchEulerDiscreteScheduler:
        fields = dict(num_train_timesteps=200, shift=3.0, stochastic_sampling=True)
    else:
        fields = dict(TRAIN, prediction_type="v_prediction", timestep_spacing="trailing")
    ours = cls(**fields)
    assert isinstance(ours, diffusers.SchedulerMixin) and isinstance(ours, diffusers.ConfigMixin)
    ours.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__
    assert _public(saved) == _public(ours.config) and saved["num_train_timesteps"] == 200

    for where in (dict(pretrained_model_name_or_path=tmp_path / "scheduler"),
                  dict(pretrained_model_name_or_path=tmp_path, subfolder="scheduler")):  # fmt: skip
        back = cls.from_pretrained(**where)
        assert type(back) is cls and _public(back.config) == _public(ours.config)
        # diffusers' own class reads the file genext wrote, and the other way round
        peer = peer_cls.from_pretrained(**where)
        assert _public(peer.config) == {**_public(peer.config), **_public(ours.config)}
    peer.save_pretrained(tmp_path / "peer")
    back = cls.from_pretrained(tmp_path / "peer")
    assert _public(back.config) == _public(ours.config)

    # keyword arguments override fields, as in diffusers
    back, unused = cls.from_pretrained(
        tmp_path / "scheduler", num_train_timesteps=100, not_a_field=1, return_unused_kwargs=True
    )
    assert back.config.num_train_timesteps == 100 and unused == {"not_a_field": 1}


def test_from_config_both_ways():
    # a diffusers scheduler's config into genext's class of another kind (how pipelines swap
    # schedulers), and genext's config into diffusers' classes
    peer = diffusers.DDIMScheduler(**TRAIN, prediction_type="v_prediction", steps_offset=1)
    ours = samplers.DPMSolverMultistepScheduler.from_config(peer.config, solver_order=3)
    assert ours.config.prediction_type == "v_prediction" and ours.config.solver_order == 3
    assert ours.config.beta_schedule == "scaled_linear" and ours.config.steps_offset == 1
    assert not any(k.startswith("_") for k in ours.config)
    # fields DDIM left at its defaults give way to DPM-Solver's ("linspace", not DDIM's
    # "leading"), as in diffusers' own from_config
    peer_dpm = diffusers.DPMSolverMultistepScheduler.from_config(peer.config, solver_order=3)
    assert ours.config.timestep_spacing == "linspace"
    assert _public(ours.config) == _public(peer_dpm.config)
    torch.testing.assert_close(
        _timesteps(ours, 10), torch.as_tensor(_timesteps(peer_dpm, 10)), rtol=0, atol=0
    )
    back = diffusers.DPMSolverMultistepScheduler.from_config(ours.config)
    assert _public(back.config) == _public(ours.config)
    ddim = diffusers.DDIMScheduler.from_config(ours.config)
    assert ddim.config.prediction_type == "v_prediction" and ddim.config.beta_end == 0.012
    # genext's compatible classes are diffusers' (`pipe.scheduler.compatibles` lists them)
    assert diffusers.DPMSolverMultistepScheduler in ours.compatibles
    assert diffusers.EulerDiscreteScheduler in ours.compatibles


def test_config_follows_register_to_config():
    # DPM-Solver's `mu` changes flow_shift in the config, as diffusers' does
    ours = samplers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        flow_shift=3.0,
    )
    ours.set_timesteps(4, mu=0.5)
    assert ours.config.flow_shift == ours.config["flow_shift"] == pytest.approx(np.exp(0.5))
    # "deis" is recorded as the algorithm it maps to
    deis = samplers.DPMSolverMultistepScheduler(
        algorithm_type="deis", final_sigmas_type="sigma_min"
    )
    assert deis.config.algorithm_type == deis.config["algorithm_type"] == "dpmsolver++"


# ---- without diffusers ----------------------------------------------------------------------------

ALONE = textwrap.dedent(
    """
    import json, sys
    sys.modules["diffusers"] = None  # `import diffusers` now raises ImportError
    import torch
    import genext.samplers as s

    out, tmp = sys.argv[1], sys.argv[2]
    results = {}
    for cls in (s.DDIMScheduler, s.DDPMScheduler, s.DPMSolverMultistepScheduler,
                s.FlowMatchEulerDiscreteScheduler):
        assert not any(b.__module__.startswith("diffusers") for b in cls.__mro__), cls.__mro__
        sched = cls.from_config({"num_train_timesteps": 200, "_class_name": "X"})
        sched.save_pretrained(f"{tmp}/{cls.__name__}/scheduler")
        saved = json.load(open(f"{tmp}/{cls.__name__}/scheduler/scheduler_config.json"))
        assert saved["_class_name"] == cls.__name__, saved
        sched = cls.from_pretrained(f"{tmp}/{cls.__name__}", subfolder="scheduler")
        assert sched.config.num_train_timesteps == 200 and type(sched) is cls
        assert dict(sched.config) == {k: v for k, v in saved.items() if not k.startswith("_")}
        sched.set_timesteps(4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 5, 5, generator=g)
        for t in sched.timesteps:
            x = sched.step(0.1 * x + 0.01 * float(t), t, x, generator=g).prev_sample
        results[cls.__name__] = x
    assert sys.modules["diffusers"] is None
    torch.save(results, out)
    """
)


def _trajectories(tmp_path) -> dict:
    results = {}
    for cls in (
        samplers.DDIMScheduler,
        samplers.DDPMScheduler,
        samplers.DPMSolverMultistepScheduler,
        samplers.FlowMatchEulerDiscreteScheduler,
    ):
        sched = cls.from_pretrained(tmp_path / cls.__name__, subfolder="scheduler")
        sched.set_timesteps(4)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 5, 5, generator=g)
        for t in sched.timesteps:
            x = sched.step(0.1 * x + 0.01 * float(t), t, x, generator=g).prev_sample
        results[cls.__name__] = x
    return results


def test_schedulers_work_without_diffusers(tmp_path):
    out = tmp_path / "alone.pt"
    subprocess.run([sys.executable, "-c", ALONE, str(out), str(tmp_path)], check=True)
    alone = torch.load(out)
    # the files written without diffusers load with it, and the steps give the same samples
    with_diffusers = _trajectories(tmp_path)
    assert alone.keys() == with_diffusers.keys()
    for name, x in alone.items():
        assert torch.equal(x, with_diffusers[name]), name


BROKEN = """
import sys, warnings
sys.modules["diffusers.schedulers"] = None  # diffusers imports, its schedulers package fails
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from genext import samplers
assert any("failed to import" in str(w.message) for w in caught), [str(w.message) for w in caught]
s = samplers.DDIMScheduler(num_train_timesteps=100)
s.set_timesteps(5)
assert s.timesteps.tolist() == [80, 60, 40, 20, 0], s.timesteps
"""


def test_a_diffusers_that_fails_to_import_leaves_the_schedulers_working():
    subprocess.run([sys.executable, "-c", BROKEN], check=True)
