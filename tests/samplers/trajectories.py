"""Shared by the DPM-Solver and flow-matching tests: a deterministic stand-in model, whole
trajectories of genext's scheduler and diffusers' from the same noise compared step by step, and
counting the fused op's calls.

Whole trajectories (10, 25 and 50 steps) start from the same noise; the "model" is a fixed
deterministic function of the sample and the timestep, evaluated on each library's own trajectory,
and every intermediate sample must stay within 1e-6 relative error (fp32, CPU) of diffusers'.
Stochastic variants draw their noise from identically seeded generators. Schedules
(`timesteps`, `sigmas`) must be identical, and configs must round-trip between the libraries.
"""

from __future__ import annotations

import torch

from conftest import rel_err

STEPS = (10, 25, 50)
# an odd spatial shape on purpose: 9 x 13 = 117 elements per channel, not a multiple of any
# vector width, so the kernels' scalar tails are part of every trajectory
SHAPE = (2, 4, 9, 13)
TOL_CPU = 1e-6
TOL_CUDA = 1e-5


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


def compare_trajectories(
    ours,
    ref,
    n,
    *,
    kind="epsilon",
    guidance=None,
    device="cpu",
    tol=TOL_CPU,
    set_kwargs=None,
    begin_index=None,
    channels_out=None,
    shape=SHAPE,
    gen_device="cpu",
) -> float:
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
            x_ours = ours.step(
                m_ours, t, x_ours, generator=g_ours, guidance_scale=guidance
            ).prev_sample
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
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bool(((a == b) | (a.isnan() & b.isnan())).all())
    )


def both(ours_cls, ref_cls, **config):
    return ours_cls(**config), ref_cls(**config)


def count_op_calls(monkeypatch, module):
    calls = []
    real = module.sampler_step

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sampler_step", counting)
    return calls
