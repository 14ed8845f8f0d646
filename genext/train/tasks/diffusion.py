"""``genext train ddpm|ldm``: conditional diffusion models on the digits, sampled with
classifier-free guidance by genext's schedulers.

- ``ddpm``: pixel diffusion on the 8x8 digits with a class-conditional ``UNet2DModel`` (one class
  embedding per digit plus a null class for the unconditional branch).
- ``ldm``: latent diffusion: an ``AutoencoderKL`` (8x8 -> 4x4x4 latents) trained first, for a
  short phase of the same run, then frozen; a ``UNet2DConditionModel`` denoises its latents,
  cross-attending to a caption per digit ("a handwritten seven") read by a small trainable text
  encoder (word-level tokenizer, token and position embeddings, one transformer layer).

Training (both): :class:`genext.losses.DiffusionLoss` with v-prediction (the UNet predicts
``sqrt(acp) noise - sqrt(1 - acp) x0``) under the cosine schedule; the condition is replaced by the
null one (null class, empty caption; :func:`genext.losses.drop_conditions`) for 10% of the batch so one network gives both branches of classifier-free guidance; an exponential moving
average of the denoiser's weights (``denoiser_ema``) is what is evaluated and drawn. Every random
draw (timesteps, noise, dropout, caption templates) comes from the run's saved generator, so runs
resume exactly.

Sampling: genext's ``DDIMScheduler`` or ``DPMSolverMultistepScheduler`` (DPM-Solver++, second
order) over "trailing" timesteps; with guidance ``w`` != 1 the model runs once on the stacked
[unconditional; conditional] batch and the scheduler's fused step combines them as
``u + w (c - u)``. Evaluation draws as many samples as there are held-out digits (labels cycling
0..9): how often the digit classifier reads the requested label and the Frechet distance to the
held-out digits in its feature space, for guidance 1 to 5 (DPM-Solver++, 20 steps) and for DDIM
at 10/25/50 steps against DPM-Solver++ at 10/20 (guidance 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...losses import EMA, DiffusionLoss, drop_conditions
from ...models import AutoencoderKL
from ...samplers import DDIMScheduler, DPMSolverMultistepScheduler
from ..data import Split
from ..evaluate import DigitClassifier, digit_classifier, digit_fid, digit_fid_floor, mse
from ..factory import autoencoder_kl, unet
from ..plots import save_metric_plot
from ._autoencoder import autoencoder_config, batched, picture_indices
from .base import Task, TaskDefaults, register
from .vae import VAEObjective

__all__ = [
    "CaptionEncoder",
    "DDPMTask",
    "DiffusionModel",
    "DiffusionObjective",
    "LDMTask",
    "caption_ids",
    "captions",
    "sample",
]

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # the class embedding of the unconditional branch
COND_DROP = 0.1
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0, 5.0)
EVAL_GUIDANCE = 3.0
SWEEP_SAMPLER = ("dpm", 20)  # the sampler of the guidance sweep and of the pictures
SAMPLER_RUNS = (("ddim", 10), ("ddim", 25), ("ddim", 50), ("dpm", 10), ("dpm", 20))
SAMPLER_NAMES = {"ddim": "DDIM", "dpm": "DPM-Solver++"}
SHORT_NAMES = {"ddim": "DDIM", "dpm": "DPM++"}  # the samplers plot's tick labels

# the noise schedule shared by training and both samplers
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "timestep_spacing": "trailing",  # the first step starts from pure noise (t = 999)
}

# ---- captions and their tokenizer ------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# training draws one template per image; evaluation and pictures use the first
TEMPLATES = ("a handwritten {}", "the digit {}", "a {} written by hand")
PAD, BOS = "<pad>", "<bos>"
VOCAB = (PAD, BOS, *sorted({w for t in TEMPLATES for w in t.format("").split()} | set(DIGIT_WORDS)))
MAX_TOKENS = 6  # <bos> and at most five words


def captions(labels: Tensor, generator: torch.Generator | None = None) -> list[str]:
    """One caption per label ``(B,)``: a template drawn from ``generator`` (the first template
    when None) with the digit's word, e.g. ``"a handwritten seven"``; the null class
    (``NULL_CLASS``, a dropped condition) gets the empty caption."""
    if generator is None:
        which = [0] * len(labels)
    else:
        which = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).tolist()
    return [
        "" if d == NULL_CLASS else TEMPLATES[k].format(DIGIT_WORDS[d])
        for k, d in zip(which, labels.tolist())
    ]


def caption_ids(texts: list[str], max_length: int = MAX_TOKENS) -> Tensor:
    """Word-level token ids ``(B, max_length)`` int64: ``<bos>``, the words, ``<pad>`` to the end.
    The empty caption (the unconditional branch) is ``<bos>`` alone."""
    index = {w: i for i, w in enumerate(VOCAB)}
    out = torch.full((len(texts), max_length), index[PAD], dtype=torch.int64)
    for row, text in enumerate(texts):
        words = text.split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(f"caption_ids: words {unknown} are not in the vocabulary {VOCAB}")
        if len(words) + 1 > max_length:
            raise ValueError(f"caption_ids: {text!r} has more than {max_length - 1} words")
        out[row, : len(words) + 1] = torch.tensor([index[BOS]] + [index[w] for w in words])
    return out


class CaptionEncoder(nn.Module):
    """Token ids ``(B, L)`` -> hidden states ``(B, L, dim)``: token plus position embeddings, a few
    pre-norm transformer layers, a final LayerNorm (a miniature CLIP text tower)."""

    def __init__(
        self,
        vocab_size: int = len(VOCAB),
        max_length: int = MAX_TOKENS,
        dim: int = 32,
        layers: int = 1,
        heads: int = 2,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.token_embedding(ids) + self.position_embedding(pos)
        return self.final_norm(self.layers(h))


# ---- the model -------------------------------------------------------------------------------


class Denoiser(nn.Module):
    """The trained network: ``forward(x_t, t, cond)`` -> the prediction, like ``x_t``.

    Class-conditional (``text_encoder`` None): ``cond`` are labels ``(B,)`` for the UNet's class
    embedding. Text-conditional: ``cond`` are token ids ``(B, L)``, encoded and cross-attended."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if self.text_encoder is None:
            return self.unet(x, t, class_labels=cond).sample
        return self.unet(x, t, encoder_hidden_states=self.text_encoder(cond)).sample


class DiffusionModel(nn.Module):
    """The denoiser, its moving average ``denoiser_ema`` (frozen, eval mode) and, for latent
    diffusion, the autoencoder ``vae`` with ``latent_scale`` (a buffer: 1 / the latents' standard
    deviation, set when the diffusion phase starts). One ``state_dict`` holds them all."""

    def __init__(
        self,
        denoiser: Denoiser,
        prediction_type: str,
        null_cond: Tensor,
        vae: AutoencoderKL | None = None,
        ema_decay: float = 0.999,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.ema = EMA(denoiser, decay=ema_decay)
        self.max_decay = ema_decay
        self.denoiser_ema = self.ema.module  # a submodule: saved with the state_dict
        self.vae = vae
        self.register_buffer("null_cond", null_cond)
        self.register_buffer("latent_scale", torch.ones(()))
        # no clipping of DDIM's x0 estimate: with guidance 3 the clipped x0 and the unclipped
        # noise estimate disagree step after step; with clipping the classifier read 99.5% of
        # DDIM's digits at 10 steps but 39.5% at 25 and 9.5% at 50. Images are clamped at the end
        self.scheduler_config = SCHEDULE | {
            "prediction_type": prediction_type,
            "clip_sample": False,
        }

    def train_scheduler(self) -> DDIMScheduler:
        """The scheduler whose noise schedule and prediction type the training loss uses."""
        return DDIMScheduler(**self.scheduler_config)

    def scheduler(self, kind: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
        """A fresh sampler: ``"ddim"`` or ``"dpm"`` (DPM-Solver++, second order)."""
        if kind == "ddim":
            return DDIMScheduler(**self.scheduler_config)
        if kind == "dpm":
            cfg = {k: v for k, v in self.scheduler_config.items() if k != "clip_sample"}  # DDIM's
            return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
        raise ValueError(f"sampler kind must be 'ddim' or 'dpm', got {kind!r}")


@torch.no_grad()
def sample(
    denoiser: nn.Module,
    scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
    cond: Tensor,
    null: Tensor,
    shape: tuple[int, ...],
    steps: int,
    guidance_scale: float,
    generator: torch.Generator,
) -> Tensor:
    """``len(cond)`` samples of ``shape`` (per sample, e.g. ``(1, 8, 8)``) from Gaussian noise
    drawn with ``generator`` (on the CPU), ``steps`` scheduler steps; with ``guidance_scale`` != 1
    classifier-free guidance, the model's [``null``; ``cond``] outputs fused by the scheduler's
    step. Returns ``(B, *shape)`` on ``cond``'s device."""
    device = cond.device
    n = len(cond)
    scheduler.set_timesteps(steps)
    x = torch.randn((n, *shape), generator=generator).to(device)
    guided = guidance_scale != 1.0
    both = torch.cat([null.to(device).expand(n, *null.shape[1:]), cond]) if guided else cond
    for t in scheduler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        out = denoiser(model_in, t.to(device).expand(len(model_in)), both)
        x = scheduler.step(out, t, x, guidance_scale=guidance_scale if guided else None)
        x = x.prev_sample
    return x


class DiffusionObjective(nn.Module):
    """``forward(x, y, generator)``: the denoising loss (mean squared error against the target)
    of images ``x`` with labels ``y``, conditions dropped to the null one with ``COND_DROP``;
    for latent diffusion the frozen autoencoder's latents (scaled) are noised instead of pixels.
    ``after_step`` updates the moving average."""

    def __init__(self, model: DiffusionModel, task: DiffusionTask) -> None:
        super().__init__()
        self.model = model
        self.task = task
        # the MSE against the scheduler's prediction_type target (its config's), unweighted
        self.loss = DiffusionLoss(model.train_scheduler())
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator, phase: str = "diffusion"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        m = self.model
        if phase == "vae":  # latent diffusion's first phase: the autoencoder's own loss
            loss, logs = VAEObjective(m.vae, m.vae_kl_weight)(x, y, generator)
            return loss, {"vae_loss": loss.detach()} | {f"vae_{k}": v for k, v in logs.items()}
        x0 = self.task.to_latent(m, x)
        # the dropped rows get the null class, which latent diffusion captions as ""
        labels = drop_conditions(y, COND_DROP, NULL_CLASS, generator)
        cond = self.task.condition(labels, generator)
        t = self.loss.sample_timesteps(len(x0), generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        pred = m.denoiser(self.loss.noisy_sample(x0, noise, t), t, cond)
        return self.loss(pred, x0, noise, t), {}

    @torch.no_grad()
    def after_step(self, generator: torch.Generator) -> None:
        m = self.model
        # average over the diffusion steps so far while they are few, then over about
        # 1 / (1 - decay) (latent diffusion's autoencoder phase does not count)
        s = int(self.steps) - getattr(m, "vae_steps", 0)
        m.ema.decay = min(m.max_decay, (1 + s) / (10 + s))
        m.ema.update()
        self.steps += 1


# ---- the tasks -------------------------------------------------------------------------------


class DiffusionTask(Task):
    """What ``ddpm`` and ``ldm`` share: the objective, sampling, evaluation and plots."""

    datasets = ("digits",)
    eval_samples: int | None = 200  # samples per evaluated setting; None: as many as held out

    def objective(self, model: nn.Module) -> nn.Module:
        return DiffusionObjective(model, self)

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        opt = torch.optim.AdamW(model.denoiser.parameters(), lr=lr, weight_decay=0.0)
        return {"model": opt}

    def condition(self, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        """The denoiser's condition for ``labels``: the labels themselves, or caption ids."""
        return labels

    def to_latent(self, model: DiffusionModel, x: Tensor) -> Tensor:
        """What is diffused: the images themselves, or scaled latents."""
        return x

    def from_latent(self, model: DiffusionModel, z: Tensor) -> Tensor:
        """Images in [-1, 1] from what :meth:`to_latent` gives."""
        return z.clamp(-1, 1)

    def latent_shape(self, model: DiffusionModel) -> tuple[int, ...]:
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        model: DiffusionModel,
        labels: Tensor,
        kind: str,
        steps: int,
        guidance_scale: float,
        seed: int,
        batch: int = 500,
    ) -> Tensor:
        """Images ``(B, 1, 8, 8)`` of digits ``labels`` from the EMA denoiser, on the CPU."""
        device = model.latent_scale.device
        gen = torch.Generator().manual_seed(seed)
        out = []
        for i in range(0, len(labels), batch):
            cond = self.condition(labels[i : i + batch], None).to(device)
            z = sample(
                model.denoiser_ema,
                model.scheduler(kind),
                cond,
                model.null_cond,
                self.latent_shape(model),
                steps,
                guidance_scale,
                gen,
            )
            out.append(self.from_latent(model, z).cpu())
        return torch.cat(out)

    def _figures_of(self, samples: Tensor, labels: Tensor, data: Split, clf: DigitClassifier):
        acc = float(np.mean(clf.predict(samples) == labels.numpy()))
        return acc, digit_fid(samples, data.x_test, clf)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        clf = digit_classifier()
        labels = torch.arange(self.eval_samples or len(data.x_test)) % NUM_CLASSES
        out: dict[str, float] = {"fid_floor_train_vs_test": digit_fid_floor(clf)}
        kind, steps = SWEEP_SAMPLER
        for w in GUIDANCE_SCALES:
            acc, fid = self._figures_of(
                self.generate(model, labels, kind, steps, w, seed=1), labels, data, clf
            )
            out[f"acc_w{w:g}"], out[f"fid_w{w:g}"] = acc, fid
        for kind, steps in SAMPLER_RUNS:
            if (kind, steps) == SWEEP_SAMPLER:  # the sweep's run at EVAL_GUIDANCE: the same draw
                acc, fid = out[f"acc_w{EVAL_GUIDANCE:g}"], out[f"fid_w{EVAL_GUIDANCE:g}"]
            else:
                samples = self.generate(model, labels, kind, steps, EVAL_GUIDANCE, seed=1)
                acc, fid = self._figures_of(samples, labels, data, clf)
            out[f"acc_{kind}{steps}"], out[f"fid_{kind}{steps}"] = acc, fid
        out["classifier_acc_on_requested_label"] = out[f"acc_w{EVAL_GUIDANCE:g}"]
        out["fid_samples"] = out[f"fid_w{EVAL_GUIDANCE:g}"]
        return out

    def figures(self, out: Path, metrics: dict[str, Any]) -> None:
        ws = list(GUIDANCE_SCALES)
        kind, steps = SWEEP_SAMPLER
        save_metric_plot(
            out / "guidance.png",
            ws,
            {"requested digit recognised": [metrics[f"acc_w{w:g}"] for w in ws]},
            {"FID (classifier space)": [metrics[f"fid_w{w:g}"] for w in ws]},
            xlabel="guidance scale",
            left_label="classifier accuracy",
            right_label="FID",
            title=f"{self.name}: {SAMPLER_NAMES[kind]}, {steps} steps",
        )
        save_metric_plot(
            out / "samplers.png",
            [f"{SHORT_NAMES[k]} {s}" for k, s in SAMPLER_RUNS],
            {"requested digit recognised": [metrics[f"acc_{k}{s}"] for k, s in SAMPLER_RUNS]},
            {"FID (classifier space)": [metrics[f"fid_{k}{s}"] for k, s in SAMPLER_RUNS]},
            xlabel="sampler, steps",
            left_label="classifier accuracy",
            right_label="FID",
            title=f"{self.name}: guidance {EVAL_GUIDANCE:g}",
        )

    @torch.no_grad()
    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        labels = torch.arange(20) % NUM_CLASSES
        kind, steps = SWEEP_SAMPLER
        rows = [data.x_test[picture_indices(data, 20)]]
        for w, seed in ((1.0, 2), (EVAL_GUIDANCE, 2), (EVAL_GUIDANCE, 3)):
            rows.append(self.generate(model, labels, kind, steps, w, seed))
        return rows

    def row_titles(self) -> list[str]:
        kind, steps = SWEEP_SAMPLER
        how = f"{SAMPLER_NAMES[kind]} {steps} steps, labels 0-9 twice"
        return [
            "held-out",
            f"guidance 1 ({how})",
            f"guidance {EVAL_GUIDANCE:g}, same noise",
            f"guidance {EVAL_GUIDANCE:g}, other noise",
        ]


@register
class DDPMTask(DiffusionTask):
    """``genext train ddpm``: class-conditional pixel diffusion (``UNet2DModel``) at 8x8."""

    name = "ddpm"
    # 8x8 digits are easy: after 200 steps guidance 3 already drew recognisable digits
    defaults = {"digits": TaskDefaults(steps=500, batch_size=64, lr=2e-3)}

    def model_config(self, data: Split) -> dict[str, Any]:
        c, s, _ = data.image_shape
        return {
            "unet": {
                "sample_size": s,
                "in_channels": c,
                "out_channels": c,
                "block_out_channels": [32, 64],
                "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
                "layers_per_block": 1,
                "norm_num_groups": 8,
                "attention_head_dim": 8,
                "num_class_embeds": NUM_CLASSES + 1,  # the last: the null class
            },
            "prediction_type": "v_prediction",
            "ema_decay": 0.999,
        }

    def build(self, config: dict[str, Any]) -> nn.Module:
        denoiser = Denoiser(unet("UNet2DModel", **config["unet"]))
        return DiffusionModel(
            denoiser,
            config["prediction_type"],
            torch.tensor([NULL_CLASS]),
            ema_decay=config["ema_decay"],
        )

    def latent_shape(self, model: DiffusionModel) -> tuple[int, ...]:
        cfg = model.denoiser.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


@register
class LDMTask(DiffusionTask):
    """``genext train ldm``: caption-conditional latent diffusion (``AutoencoderKL`` 8x8 ->
    4x4x4, ``UNet2DConditionModel`` with cross-attention to a small text encoder). The first
    ``vae_steps`` steps train the autoencoder alone (its own optimizer), the rest the denoiser and
    text encoder on its frozen latents."""

    name = "ldm"
    # 300 autoencoder steps, then 500 diffusion steps (after 300 of them, guidance 3 already
    # drew recognisable digits)
    defaults = {"digits": TaskDefaults(steps=800, batch_size=64, lr=2e-3)}

    def model_config(self, data: Split) -> dict[str, Any]:
        vae = autoencoder_config(data, (32, 64)) | {"latent_channels": 4}
        latent = data.image_shape[1] // 2
        return {
            "vae": vae,
            "vae_steps": 300,
            "vae_kl_weight": 0.05,
            "unet": {
                "sample_size": latent,
                "in_channels": 4,
                "out_channels": 4,
                "block_out_channels": [64, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
                "layers_per_block": 1,
                "norm_num_groups": 16,
                "attention_head_dim": 8,
                "cross_attention_dim": 32,
            },
            "text_encoder": {"dim": 32, "layers": 1, "heads": 2},
            "prediction_type": "v_prediction",
            "ema_decay": 0.999,
        }

    def build(self, config: dict[str, Any]) -> nn.Module:
        text = CaptionEncoder(**config["text_encoder"])
        denoiser = Denoiser(unet("UNet2DConditionModel", **config["unet"]), text)
        model = DiffusionModel(
            denoiser,
            config["prediction_type"],
            caption_ids([""]),
            vae=autoencoder_kl(**config["vae"]),
            ema_decay=config["ema_decay"],
        )
        model.vae_steps = int(config["vae_steps"])
        model.vae_kl_weight = float(config["vae_kl_weight"])
        return model

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        vae = torch.optim.AdamW(model.vae.parameters(), lr=2e-3, weight_decay=0.0)
        return super().optimizers(model, lr) | {"vae": vae}

    def wrap(self, objective: nn.Module) -> nn.Module:
        # each phase leaves the other phase's parameters without gradients
        return nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)

    def train_step(self, objective, wrapped, x, y, generator, optimizers) -> dict[str, Tensor]:
        model: DiffusionModel = objective.model
        step = int(objective.steps)
        if step < model.vae_steps:
            loss, logs = wrapped(x, y, generator, "vae")
            opt = optimizers["vae"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            objective.steps += 1
            return logs
        if step == model.vae_steps:
            self.set_latent_scale(model, x)
        loss, _ = wrapped(x, y, generator)
        opt = optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objective.after_step(generator)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def set_latent_scale(self, model: DiffusionModel, x: Tensor) -> None:
        """Freeze the autoencoder and scale its latents to unit standard deviation, measured on
        the first diffusion batch ``x`` (Stable Diffusion's ``scaling_factor``, fitted here)."""
        model.vae.requires_grad_(False).eval()
        z = model.vae.encode(x).latent_dist.mode().float()
        var = z.var()
        if dist.is_available() and dist.is_initialized():  # every rank: the same scale
            dist.all_reduce(var)
            var /= dist.get_world_size()
        model.latent_scale.fill_(float(var.clamp_min(1e-12).rsqrt()))

    def condition(self, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        return caption_ids(captions(labels.cpu(), generator)).to(labels.device)

    @torch.no_grad()
    def to_latent(self, model: DiffusionModel, x: Tensor) -> Tensor:
        return model.vae.encode(x).latent_dist.mode() * model.latent_scale

    @torch.no_grad()
    def from_latent(self, model: DiffusionModel, z: Tensor) -> Tensor:
        return model.vae.decode(z / model.latent_scale).sample.clamp(-1, 1)

    def latent_shape(self, model: DiffusionModel) -> tuple[int, ...]:
        cfg = model.denoiser.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        device = model.latent_scale.device
        recon = batched(
            lambda x: model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample,
            data.x_test,
            device,
        )
        out = {
            "vae_mse": mse(recon, data.x_test),
            "vae_classifier_acc_recon": digit_classifier().accuracy(recon, data.y_test),
            "latent_scale": float(model.latent_scale),
        }
        return out | super().evaluate(model, data)

    @torch.no_grad()
    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        rows = super().pictures(model, data, generator)
        x = rows[0].to(model.latent_scale.device)
        recon = model.vae.decode(model.vae.encode(x).latent_dist.mode()).sample.cpu()
        return [rows[0], recon, *rows[1:]]

    def row_titles(self) -> list[str]:
        titles = super().row_titles()
        return [titles[0], "autoencoder reconstruction", *titles[1:]]
