"""genext.losses' diffusion training objectives against formulas written out here, diffusers'
schedulers (add_noise, get_velocity) and training utilities (compute_snr, the SD3 timestep
densities and loss weightings), plus one SGD step that lowers the loss, seeded reproducibility
and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from genext.losses import (
    DiffusionLoss,
    FlowMatchingLoss,
    compute_snr,
    diffusion_target,
    drop_conditions,
    min_snr_weights,
    noisy_sample,
)
from genext.samplers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

diffusers = pytest.importorskip("diffusers")
training_utils = pytest.importorskip("diffusers.training_utils")

PREDICTIONS = ["epsilon", "v_prediction", "sample"]
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _batch(dtype=torch.float32, B=5, seed=0):
    # 5 rows, 3 channels, 7 x 6 pixels: nothing a multiple of anything
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 3, 7, 6, generator=g, dtype=dtype)
    noise = torch.randn(B, 3, 7, 6, generator=g, dtype=dtype)
    # the first and last timesteps on purpose: SNR far above and below gamma
    t = torch.tensor([0, 999, 17, 500, 263])[:B]
    return x0, noise, t


def _acp(dtype=torch.float64):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).to(dtype)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_noisy_sample_and_target_match_formulas_and_diffusers(prediction_type):
    x0, noise, t = _batch(torch.float64)
    acp = _acp()
    a, s = acp[t].sqrt().view(-1, 1, 1, 1), (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
    want_xt = a * x0 + s * noise
    want = {"epsilon": noise, "sample": x0, "v_prediction": a * noise - s * x0}[prediction_type]
    torch.testing.assert_close(noisy_sample(x0, noise, t, acp), want_xt, rtol=1e-12, atol=0)
    got = diffusion_target(x0, noise, t, acp, prediction_type)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # float32 with diffusers' own scheduler: the same numbers bit for bit
    peer = diffusers.DDPMScheduler(**SCHEDULE)
    x0f, noisef = x0.float(), noise.float()
    loss = DiffusionLoss(peer, prediction_type=prediction_type)
    assert torch.equal(loss.noisy_sample(x0f, noisef, t), peer.add_noise(x0f, noisef, t))
    if prediction_type == "v_prediction":
        assert torch.equal(loss.target(x0f, noisef, t), peer.get_velocity(x0f, noisef, t))


def test_snr_matches_diffusers_and_formula():
    peer = diffusers.DDPMScheduler(**SCHEDULE)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    got = compute_snr(peer, t)
    assert torch.equal(got, training_utils.compute_snr(peer, t))
    acp = peer.alphas_cumprod.double()[t]
    torch.testing.assert_close(got.double(), acp / (1 - acp), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [None, 5.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_loss_matches_the_training_script(prediction_type, gamma, dtype):
    peer = diffusers.DDPMScheduler(**SCHEDULE, prediction_type=prediction_type)
    x0, noise, t = _batch(dtype)
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    loss_fn = DiffusionLoss(peer, snr_gamma=gamma)
    assert loss_fn.prediction_type == prediction_type  # from the scheduler's config
    got = loss_fn(pred, x0, noise, t)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    # train_text_to_image.py, written out: target, per-sample MSE, min-SNR weights
    acp = peer.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    a, s = acp.sqrt(), (1 - acp).sqrt()
    x0d, nd = x0.double(), noise.double()
    target = {"epsilon": nd, "sample": x0d, "v_prediction": a * nd - s * x0d}[prediction_type]
    per_sample = ((pred.double() - target) ** 2).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (acp / (1 - acp)).flatten()
        w = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        if prediction_type == "epsilon":
            w = w / snr
        elif prediction_type == "v_prediction":
            w = w / (snr + 1)
        per_sample = per_sample * w
        # the weighting is not trivial on this batch: some weights are 1, some are not
        assert (w - 1).abs().max() > 0.1
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), per_sample.mean(), rtol=tol, atol=0)


def test_min_snr_weights_values():
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.05])
    )
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "v_prediction"),
        torch.tensor([0.01 / 1.01, 0.5, 5 / 6, 5 / 101]),
    )
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "sample"), torch.tensor([0.01, 1.0, 5.0, 5.0])
    )


class TinyDenoiser(nn.Module):
    """A two-layer conv net that sees the timestep as an extra input channel."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t):
        tt = (t.float() / 1000).view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
        return self.net(torch.cat([x, tt], 1))


@pytest.mark.parametrize("prediction_type", PREDICTIONS + ["flow"])
def test_one_sgd_step_lowers_the_loss(prediction_type):
    torch.manual_seed(0)
    model = TinyDenoiser()
    x0, noise, t = _batch()
    if prediction_type == "flow":
        loss_fn = FlowMatchingLoss(shift=3.0)
        ts, sigmas = loss_fn.sample_timesteps(x0.shape[0], torch.Generator().manual_seed(1))
        xt = loss_fn.noisy_sample(x0, noise, sigmas)

        def loss():
            return loss_fn(model(xt, ts), x0, noise, sigmas)
    else:
        loss_fn = DiffusionLoss(_acp(torch.float32), prediction_type, snr_gamma=5.0)
        xt = loss_fn.noisy_sample(x0, noise, t)

        def loss():
            return loss_fn(model(xt, t), x0, noise, t)

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert after < 0.99 * before.detach()


def test_generators_make_draws_reproducible():
    loss_fn = DiffusionLoss(_acp(torch.float32), "epsilon")
    a = loss_fn.sample_timesteps(64, torch.Generator().manual_seed(3))
    b = loss_fn.sample_timesteps(64, torch.Generator().manual_seed(3))
    c = loss_fn.sample_timesteps(64, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and 0 <= a.min() and a.max() < 1000

    ids = torch.arange(1, 2001)
    d1, m1 = drop_conditions(ids, 0.1, 0, torch.Generator().manual_seed(5), return_mask=True)
    d2 = drop_conditions(ids, 0.1, 0, torch.Generator().manual_seed(5))
    d3 = drop_conditions(ids, 0.1, 0, torch.Generator().manual_seed(6))
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
    # the mask is exactly rand < p from the same generator
    want = torch.rand(2000, generator=torch.Generator().manual_seed(5)) < 0.1
    assert torch.equal(m1, want)
    assert torch.equal(d1, torch.where(want, torch.zeros_like(ids), ids))
    assert 0.07 < m1.float().mean() < 0.13
    assert torch.equal(ids, torch.arange(1, 2001))  # the input is not modified


@pytest.mark.parametrize("null_shape", [(4, 6), (1, 4, 6)])
def test_drop_conditions_on_embeddings(null_shape):
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(9, 4, 6, generator=g)
    null = torch.randn(null_shape, generator=g)
    out, mask = drop_conditions(cond, 0.5, null, torch.Generator().manual_seed(2), return_mask=True)
    assert 0 < mask.sum() < 9  # both kinds of rows on this seed
    for i in range(9):
        assert torch.equal(out[i], null.reshape(4, 6) if mask[i] else cond[i])
    assert torch.equal(drop_conditions(cond, 0.0, null), cond)
    assert torch.equal(drop_conditions(cond, 1.0, null), null.reshape(4, 6).expand(9, 4, 6))


def test_flow_schedule_matches_genext_scheduler():
    for shift in (1.0, 3.0):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        loss_fn = FlowMatchingLoss.from_scheduler(sched)
        assert torch.equal(loss_fn.sigmas, sched.sigmas)
        assert torch.equal(loss_fn.timesteps, sched.timesteps)


@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_flow_timesteps_match_the_sd3_script(density):
    loss_fn = FlowMatchingLoss(shift=3.0, density=density, logit_mean=0.2, logit_std=1.1)
    u = training_utils.compute_density_for_timestep_sampling(
        density,
        16,
        logit_mean=0.2,
        logit_std=1.1,
        mode_scale=1.29,
        generator=torch.Generator().manual_seed(7),
    )
    assert torch.equal(loss_fn.sample_u(16, torch.Generator().manual_seed(7)), u)
    # the SD3 script: index = int(u * T) into the scheduler's training timesteps and sigmas
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    index = (u * 1000).long()
    ts, sigmas = loss_fn.sample_timesteps(16, torch.Generator().manual_seed(7))
    assert torch.equal(ts, sched.timesteps[index])
    assert torch.equal(sigmas, sched.sigmas[index])


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
def test_flow_loss_matches_formula(weighting):
    x0, noise, _ = _batch(torch.float64)
    sigmas = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.999], dtype=torch.float64)
    loss_fn = FlowMatchingLoss(weighting=weighting)
    s = sigmas.view(-1, 1, 1, 1)
    xt = loss_fn.noisy_sample(x0, noise, sigmas)
    torch.testing.assert_close(xt, (1 - s) * x0 + s * noise, rtol=1e-12, atol=0)
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = {
        "none": torch.ones_like(s),
        "sigma_sqrt": 1 / s**2,
        "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s**2)),
    }[weighting]
    # the weights of diffusers' SD3 scripts (which round sigma_sqrt's to float32)
    peer_w = training_utils.compute_loss_weighting_for_sd3(weighting, sigmas=s).double()
    torch.testing.assert_close(w, peer_w, rtol=1e-7, atol=0)
    want = torch.mean((w * (pred - (noise - x0)) ** 2).reshape(5, -1), 1).mean()
    torch.testing.assert_close(loss_fn(pred, x0, noise, sigmas), want, rtol=1e-12, atol=0)


def test_scheduler_config_and_bad_arguments():
    assert DiffusionLoss(DDPMScheduler(prediction_type="v_prediction")).prediction_type == (
        "v_prediction"
    )
    acp = _acp(torch.float32)
    x0, noise, t = _batch()
    for call in (
        lambda: DiffusionLoss(acp, "x0"),
        lambda: diffusion_target(x0, noise, t, acp, "eps"),
        lambda: min_snr_weights(torch.ones(2), 5.0, "v"),
    ):
        with pytest.raises(ValueError, match="prediction_type"):
            call()
    with pytest.raises(ValueError, match="prediction_type is required"):
        DiffusionLoss(acp)
    with pytest.raises(ValueError, match="snr_gamma"):
        DiffusionLoss(acp, "epsilon", snr_gamma=0.0)
    with pytest.raises(TypeError, match="alphas_cumprod"):
        DiffusionLoss([0.9, 0.8], "epsilon")
    with pytest.raises(ValueError, match="model_pred"):
        DiffusionLoss(acp, "epsilon")(x0[:, :2], x0, noise, t)
    with pytest.raises(ValueError, match="p must be"):
        drop_conditions(t, 1.5, 0)
    with pytest.raises(ValueError, match="density"):
        FlowMatchingLoss(density="beta")
    with pytest.raises(ValueError, match="weighting"):
        FlowMatchingLoss(weighting="snr")
    assert math.isfinite(float(DiffusionLoss(acp, "epsilon", 5.0)(x0, x0, noise, t)))
