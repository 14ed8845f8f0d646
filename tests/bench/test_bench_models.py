"""The U-Net and text-to-image benches: their checks compare genext with diffusers and can fail,
and every timing's call runs."""

from __future__ import annotations

import pytest
import torch

from genext.bench import Config
from genext.bench import ldm as ldm_bench
from genext.bench import unet as unet_bench

pytest.importorskip("diffusers")

TINY_UNET = dict(unet_bench.DIFFUSERS_TINY, sample_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models: a second thread only waits on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unet_check_passes_on_equal_weights_and_fails_on_different_ones():
    case = unet_bench.UNetCase("tiny", TINY_UNET, 2, 8, 3)
    inputs = unet_bench.unet_inputs(case, torch.float32, "cpu")
    ok, note = unet_bench.unet_check(case, torch.float32, inputs)
    assert ok is True, note
    with torch.no_grad():  # the patched copy is diffusers' model: a change there must be caught
        inputs["patched"].conv_out.bias.add_(1e-3)
    ok, note = unet_bench.unet_check(case, torch.float32, inputs)
    assert ok is False, note
    with torch.no_grad():
        inputs["patched"].conv_out.bias.sub_(1e-3)
        inputs["genext"].conv_out.bias.add_(1e-3)
    ok, note = unet_bench.unet_check(case, torch.float32, inputs)
    assert ok is False, note


def test_unet_every_timing_runs():
    case = unet_bench.UNetCase("tiny", TINY_UNET, 2, 8, 3)
    built = unet_bench.make_case(case, Config("cpu", quick=True, compile=False))
    inputs = built.inputs()
    assert {(t.impl, t.direction) for t in built.timings} == {
        (impl, d) for impl in ("genext", "diffusers+patch", "diffusers") for d in ("step", "f+b")
    }
    for t in built.timings:
        out = t.setup(inputs)(0)
        if t.direction == "f+b":
            assert all(torch.isfinite(g).all() for g in out)
        else:
            assert out.shape == inputs["x"].shape and torch.isfinite(out).all()


TINY_LDM = ldm_bench.LDMCase(
    "tiny",
    dict(ldm_bench.TINY_UNET, block_out_channels=[8, 16], norm_num_groups=4, cross_attention_dim=8),
    dict(ldm_bench.TINY_VAE, block_out_channels=[8, 16], norm_num_groups=4),
    16,
    5,
    2,
)


def test_ldm_check_and_timings():
    pytest.importorskip("transformers")  # diffusers' StableDiffusionPipeline needs it
    inputs = ldm_bench.ldm_inputs(TINY_LDM, torch.float32, "cpu")
    ok, note = ldm_bench.ldm_check(TINY_LDM, torch.float32, inputs)
    assert ok is True, note
    built = ldm_bench.make_case(TINY_LDM, Config("cpu", quick=True, compile=False))
    assert {t.impl for t in built.timings} == {"genext", "diffusers+patch", "diffusers"}
    for t in built.timings:
        images = t.setup(inputs)(0)
        assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    with torch.no_grad():  # genext's U-Net computing something else must be caught
        inputs["genext"].unet.conv_out.bias.add_(0.05)
    ok, note = ldm_bench.ldm_check(TINY_LDM, torch.float32, inputs)
    assert ok is False, note
