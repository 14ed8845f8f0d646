"""The training loop: exact resume, checkpoints, output files, the command line, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from genext.__main__ import main as genext_main
from genext.train import checkpoint, loop
from genext.train.cli import main
from genext.train.tasks import vqvae

from conftest import thin

_SIZE = {"cgan": 8, "stylegan": 8}  # the tiny GANs' image side

# Tiny model configs (here, not in a tests/train/conftest.py: a second module named conftest on
# sys.path shadows tests/conftest.py in processes that other tests spawn)
_TINY = {
    "vae": {"block_out_channels": [8, 8], "norm_num_groups": 4, "latent_channels": 2},
    "vqvae": {
        "block_out_channels": [8, 8],
        "norm_num_groups": 4,
        "latent_channels": 2,
        "vq_embed_dim": 2,
        "num_vq_embeddings": 16,
    },
    "gan": {"nz": 8, "ngf": 4, "ndf": 4},  # DCGAN: 64x64 (its layers are fixed)
    "cgan": {"z_dim": 8, "base_channels": 8, "image_size": 8},
    "stylegan": {
        "z_dim": 8,
        "w_dim": 8,
        "image_size": 8,
        "mapping_layers": 1,
        "channel_base": 32,
        "channel_max": 8,
    },
    "ddpm": {
        "unet": {
            "sample_size": 8,
            "in_channels": 1,
            "out_channels": 1,
            "block_out_channels": [8, 8],
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "attention_head_dim": 4,
            "num_class_embeds": 11,
        }
    },
    "ldm": {
        "vae": {
            "in_channels": 1,
            "out_channels": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "block_out_channels": [8, 8],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "sample_size": 8,
            "mid_block_add_attention": False,
            "latent_channels": 4,
        },
        "vae_steps": 3,  # the autoencoder phase ends before the resume at step 4
        "unet": {
            "sample_size": 4,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [8, 8],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "attention_head_dim": 4,
            "cross_attention_dim": 8,
        },
        "text_encoder": {"dim": 8, "layers": 1, "heads": 2},
    },
}


@pytest.fixture
def tiny() -> dict[str, dict]:
    """Per task, the model arguments (over the task's own) that make the model tiny."""
    return {k: dict(v) for k, v in _TINY.items()}


def _config(task: str, out: Path, tiny: dict, **kw) -> loop.TrainConfig:
    base = dict(
        task=task,
        out=str(out),
        steps=6,
        batch_size=16,
        model_config=tiny[task],
        size=_SIZE.get(task),
        progress=False,
        evaluate=False,
        threads=1,
    )
    return loop.TrainConfig(**(base | kw))


def _params(out: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(out / loop.CHECKPOINT).model


@pytest.mark.parametrize(
    "task", thin(["vae", "vqvae", "gan", "cgan", "stylegan", "ddpm", "ldm"], 3)
)
def test_resume_is_bit_identical(task, tmp_path, monkeypatch, tiny):
    # restart dead codes every 3 steps: the resume at step 4 falls between two restarts, so the
    # codebook usage counted since the last one must come back from the checkpoint too; the GANs
    # add a second optimizer, the EMA generator, StyleGAN's style mixing and noise (torch's global
    # generator) and its lazy R1 (steps 0 and 4)
    monkeypatch.setattr(vqvae, "RESTART_EVERY", 3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    loop.train(_config(task, straight, tiny))
    first = loop.train(_config(task, split, tiny, stop_after=4))
    assert first["steps"] == 4 and not (split / "loss.png").exists()  # stopped: no outputs yet
    loop.train(_config(task, split, tiny, resume=True))
    a, b = _params(straight), _params(split)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the run did train: the parameters moved from their initial values
    torch.manual_seed(0)
    t = loop.get_task(task)
    size = _config(task, straight, tiny).resolved().size
    fresh = t.build(t.configure(loop.load_data("digits", size), tiny[task]))
    if task.endswith("gan"):
        trained = (fresh.generator, fresh.discriminator)
    elif task == "ddpm":
        trained = (fresh.denoiser.unet,)
    elif task == "ldm":
        trained = (fresh.vae, fresh.denoiser.unet)
    else:
        trained = (fresh,)
    for m in trained:
        assert type(m).__module__.startswith("genext.models."), m  # genext's models are trained
    assert any(not torch.equal(v, a[k]) for k, v in fresh.state_dict().items())
    # the optimizer state and the loss history came back as well
    ca = checkpoint.load_checkpoint(straight / loop.CHECKPOINT)
    cb = checkpoint.load_checkpoint(split / loop.CHECKPOINT)
    history = [k for k in ca.extra if k.startswith("history.")]
    assert history and history == [k for k in cb.extra if k.startswith("history.")]
    for k in history:
        # latent diffusion logs the autoencoder's losses for 3 steps, then the diffusion loss
        steps = 3 if task == "ldm" else 6
        assert torch.equal(ca.extra[k], cb.extra[k]) and len(ca.extra[k]) == steps, k
    for name, opt in ca.optimizers.items():
        for pid, state in opt["state"].items():
            for key, value in state.items():
                assert torch.equal(value, cb.optimizers[name]["state"][pid][key]), (pid, key)


def test_resume_without_interrupt_differs_with_another_seed(tmp_path, tiny):
    # the comparison above can fail: a different seed gives different parameters
    loop.train(_config("vae", tmp_path / "a", tiny, steps=2))
    loop.train(_config("vae", tmp_path / "b", tiny, steps=2, seed=1))
    a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_configuration(tmp_path, tiny):
    loop.train(_config("vae", tmp_path, tiny, steps=2))
    with pytest.raises(ValueError, match="batch_size"):
        loop.train(_config("vae", tmp_path, tiny, steps=3, batch_size=8, resume=True))


def test_checkpoint_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(5)
    rng = checkpoint.capture_rng({"noise": gen})
    expected = (torch.rand(3), torch.rand(3, generator=gen))
    extra = {"history.loss": torch.tensor([1.0, 0.5], dtype=torch.float64)}
    ckpt = checkpoint.Checkpoint(
        model.state_dict(), {"g": opt.state_dict()}, rng, extra, {"step": 7}
    )
    checkpoint.save_checkpoint(tmp_path / "c.safetensors", ckpt)
    back = checkpoint.load_checkpoint(tmp_path / "c.safetensors")
    assert back.meta == {"step": 7}
    for k, v in model.state_dict().items():
        assert torch.equal(back.model[k], v)
    assert torch.equal(back.extra["history.loss"], extra["history.loss"])
    # the optimizer takes its state back, betas a tuple again, step and moments exact
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.5)
    opt2.load_state_dict(back.optimizers["g"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-3
    for p in model.parameters():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt2.state[p][key], opt.state[p][key])
    # the random states replay the same draws
    gen2 = torch.Generator()
    checkpoint.restore_rng(back.rng, {"noise": gen2})
    assert torch.equal(torch.rand(3), expected[0])
    assert torch.equal(torch.rand(3, generator=gen2), expected[1])


def test_cli_end_to_end_writes_pngs_and_metrics(tmp_path, capsys, tiny):
    out = tmp_path / "run"
    tiny = json.dumps(tiny["vqvae"])
    argv = ["vqvae", "--steps", "3", "--batch-size", "16", "--out", str(out), "--threads", "1"]
    assert main([*argv, "--model-config", tiny, "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for name in ("checkpoint.safetensors", "loss.png", "samples.png", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == printed and metrics["steps"] == 3
    assert 0 < metrics["mse"] and 1 <= metrics["perplexity"] <= 16
    assert 0 < metrics["usage"] <= 1 and metrics["classifier_acc_real"] > 0.98
    assert metrics["fid_floor_train_vs_test"] < metrics["fid_recon"]


def test_genext_train_subcommand(tmp_path, tiny, capsys):
    # the `genext` entry point hands `train ...` over to genext.train's own parser
    out = tmp_path / "run"
    argv = ["train", "vae", "--steps", "2", "--batch-size", "8", "--out", str(out)]
    argv += ["--threads", "1", "--no-eval", "--no-progress"]
    assert genext_main([*argv, "--model-config", json.dumps(tiny["vae"])]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert (out / "samples.png").exists() and (out / "loss.png").exists()
    with pytest.raises(SystemExit) as e:
        genext_main(["train", "nosuchtask"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        genext_main(["train", "cgan", "--data", "photos"])
    assert e.value.code == 2 and "trains on ('digits',)" in capsys.readouterr().err


def test_single_rank_process_group_wraps_ddp(tmp_path, tiny):
    # a process group of one rank (gloo): the loop wraps the objective in DDP and gathers states
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        loop.train(_config("vqvae", tmp_path / "ddp", tiny, steps=3))
    finally:
        dist.destroy_process_group()
    ckpt = checkpoint.load_checkpoint(tmp_path / "ddp" / loop.CHECKPOINT)
    assert ckpt.meta["world_size"] == 1 and ckpt.meta["step"] == 3
    # the same three steps without a process group give the same parameters
    loop.train(_config("vqvae", tmp_path / "plain", tiny, steps=3))
    plain = _params(tmp_path / "plain")
    for k, v in ckpt.model.items():
        assert torch.equal(v, plain[k]), k


@pytest.mark.slow
def test_torchrun_two_ranks_gloo(tmp_path, tiny):
    # two CPU processes under torchrun (gloo): each rank draws its own shard, DDP averages the
    # gradients, rank 0 writes the checkpoint with both ranks' random states and data positions
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_port", str(29600 + os.getpid() % 300), "-m", "genext.train", "vqvae"]
    cmd += ["--steps", "3", "--batch-size", "8", "--out", str(out), "--threads", "1"]
    cmd += ["--no-eval", "--no-progress", "--model-config", json.dumps(tiny["vqvae"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoint.load_checkpoint(out / loop.CHECKPOINT)
    assert ckpt.meta["world_size"] == 2 and ckpt.meta["step"] == 3
    assert [s["position"] for s in ckpt.meta["streams"]] == [3, 3]
    # the two ranks drew their latents and restarts from different generators
    assert not torch.equal(ckpt.rng["rank0.gen.noise"], ckpt.rng["rank1.gen.noise"])
    assert len(ckpt.extra["history.loss"]) == 3
    assert (out / "samples.png").exists() and (out / "loss.png").exists()
