"""The VAE model bench: its check compares genext's model with diffusers' and can fail, and every
timing's call runs."""

from __future__ import annotations

import pytest
import torch

from genext.bench import Config
from genext.bench.vae import DEMO_VAE, VAECase, make_case, vae_check, vae_inputs

pytest.importorskip("diffusers")

TINY = dict(
    DEMO_VAE,
    block_out_channels=[8, 16],
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    norm_num_groups=4,
)


@pytest.mark.parametrize(
    "dtype, which, delta",
    # float32 compares with diffusers; 16-bit with diffusers' float64 model, so a genext model that
    # computes something else must fail there too
    [(torch.float32, "diffusers", 1e-3), (torch.bfloat16, "genext", 0.5)],
)
def test_check_passes_on_equal_weights_and_fails_on_different_ones(dtype, which, delta):
    case = VAECase("tiny", TINY, 2, 8, ("fwd", "f+b"))
    inputs = vae_inputs(case, dtype, "cpu")
    ok, note = vae_check(case, dtype, inputs)
    assert ok is True, note
    with torch.no_grad():
        inputs[which].decoder.conv_out.bias.add_(delta)
    ok, note = vae_check(case, dtype, inputs)
    assert ok is False, note


def test_every_timing_runs():
    case = VAECase("tiny", TINY, 2, 8, ("fwd", "f+b"))
    built = make_case(case, Config("cpu", quick=True, compile=False))
    inputs = built.inputs()
    assert {(t.impl, t.direction) for t in built.timings} == {
        (impl, d) for impl in ("genext", "diffusers") for d in ("fwd", "f+b")
    }
    for t in built.timings:
        call = t.setup(inputs)
        out = call(0)
        if t.direction == "f+b":
            assert len(out) == len(list(inputs[t.impl].parameters()))
            assert all(torch.isfinite(g).all() for g in out)
        else:
            assert out.shape == inputs["x"].shape
