"""The diffusion demos' pieces: captions, guided sampling, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from genext.samplers import DDIMScheduler, DPMSolverMultistepScheduler
from genext.train import loop
from genext.train.tasks import diffusion

from test_loop import _TINY


def test_captions_and_their_token_ids():
    labels = torch.tensor([7, 0, 3])
    assert diffusion.captions(labels) == [
        "a handwritten seven",
        "a handwritten zero",
        "a handwritten three",
    ]
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(5)
    drawn = diffusion.captions(labels, gen)
    for d, c in zip(labels.tolist(), drawn):
        assert diffusion.DIGIT_WORDS[d] in c.split()
    # every template drawn
    assert any(c.startswith("a handwritten") for c in drawn)
    assert any(c.startswith("the digit") for c in drawn)
    assert any(c.endswith("written by hand") for c in drawn)
    ids = diffusion.caption_ids(["a handwritten seven", ""])
    vocab = diffusion.VOCAB
    assert ids.shape == (2, diffusion.MAX_TOKENS) and ids.dtype == torch.int64
    words = [vocab[i] for i in ids[0].tolist()]
    assert words == ["<bos>", "a", "handwritten", "seven", "<pad>", "<pad>"]
    assert ids[1].tolist() == [vocab.index("<bos>")] + [vocab.index("<pad>")] * 5
    with pytest.raises(ValueError, match="not in the vocabulary"):
        diffusion.caption_ids(["a handwritten eleven"])
    enc = diffusion.CaptionEncoder(dim=8, heads=2)
    h = enc(ids)
    assert h.shape == (2, diffusion.MAX_TOKENS, 8)
    # a different digit word changes the hidden states of its own and of later positions
    other = enc(diffusion.caption_ids(["a handwritten three"]))
    assert not torch.allclose(h[0, 3:], other[0, 3:])


def test_dropped_labels_get_the_empty_caption():
    # the objective drops labels to the null class: latent diffusion captions it as ""
    labels = torch.tensor([3, diffusion.NULL_CLASS, 9])
    texts = diffusion.captions(labels, torch.Generator().manual_seed(1))
    assert texts[1] == "" and "three" in texts[0] and "nine" in texts[2]
    ids = diffusion.caption_ids(texts)
    torch.testing.assert_close(ids[1:2], diffusion.caption_ids([""]))


class _Toy(torch.nn.Module):
    """A denoiser whose output depends on the sample, the timestep and the condition."""

    def forward(self, x, t, cond):
        c = cond.float().view(-1, *([1] * (x.dim() - 1)))
        return 0.3 * x + 0.01 * c - 1e-4 * t.float().view_as(c)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_guided_sample_is_the_cfg_combination(kind):
    # sample() with guidance w: the scheduler steps on u + w (c - u) of the stacked batch
    cfg = diffusion.SCHEDULE | {"prediction_type": "v_prediction"}
    make = (
        (lambda: DDIMScheduler(**cfg, clip_sample=False))
        if kind == "ddim"
        else (lambda: DPMSolverMultistepScheduler(**cfg))
    )
    cond, null = torch.tensor([1, 4, 7]), torch.tensor([10])
    w = 2.5
    got = diffusion.sample(
        _Toy(), make(), cond, null, (1, 2, 2), 6, w, torch.Generator().manual_seed(0)
    )
    sched = make()
    sched.set_timesteps(6)
    x = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    toy = _Toy()
    for t in sched.timesteps:
        tt = t.expand(3)
        u, c = toy(x, tt, null.expand(3)), toy(x, tt, cond)
        x = sched.step(u + w * (c - u), t, x).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    # guidance 1 runs the conditional branch alone: not the guided result
    plain = diffusion.sample(
        _Toy(), make(), cond, null, (1, 2, 2), 6, 1.0, torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(plain, got)


@pytest.mark.parametrize("task", ["ddpm", "ldm"])
def test_evaluation_metrics_and_plots(task, tmp_path, monkeypatch):
    # a tiny model, few samples and short samplers: every figure is there and in range, the plots
    # and the picture grid are written
    monkeypatch.setattr(diffusion.DiffusionTask, "eval_samples", 50)
    monkeypatch.setattr(diffusion, "SAMPLER_RUNS", (("ddim", 3), ("dpm", 2)))
    monkeypatch.setattr(diffusion, "SWEEP_SAMPLER", ("dpm", 2))
    cfg = loop.TrainConfig(
        task=task,
        out=str(tmp_path),
        steps=4,
        batch_size=16,
        model_config=_TINY[task],
        progress=False,
        threads=1,
    )
    metrics = loop.train(cfg)
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    for w in diffusion.GUIDANCE_SCALES:
        assert 0 <= metrics[f"acc_w{w:g}"] <= 1 and metrics[f"fid_w{w:g}"] > 0
    for key in ("acc_ddim3", "acc_dpm2"):
        assert 0 <= metrics[key] <= 1
    assert metrics["acc_dpm2"] == metrics["acc_w3"]  # the sweep's run at guidance 3, reused
    assert metrics["classifier_acc_on_requested_label"] == metrics["acc_w3"]
    assert metrics["fid_samples"] > metrics["fid_floor_train_vs_test"]  # untrained: far off
    for name in ("guidance.png", "samplers.png", "samples.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    if task == "ldm":
        assert metrics["vae_mse"] > 0 and metrics["latent_scale"] > 0
