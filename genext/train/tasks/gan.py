"""``genext train gan|cgan|stylegan``: GANs of :mod:`genext.models` on the digits.

- ``gan``: DCGAN (``DCGANGenerator`` / ``DCGANDiscriminator``, BatchNorm, 64x64 digits upsampled
  bilinearly) with the original non-saturating loss on the discriminator's logits.
- ``cgan``: the class-conditional ResNet generator and projection discriminator (spectral norm) at
  16x16, hinge loss.
- ``stylegan``: StyleGAN2's generator (mapping network, modulated convolutions, noise, style
  mixing) and ResNet discriminator at 16x16, class-conditional, non-saturating loss with lazy R1.

The model is a :class:`GANPair`: generator, discriminator and an exponential moving average of the
generator (``g_ema``, what is evaluated and drawn), so one ``state_dict`` holds all three. Each
training step is a discriminator step on real and generated images, then a generator step; the
latents come from the run's saved generator, so runs resume exactly. Evaluation draws as many
samples as there are held-out digits: the Frechet distance to them in the digit classifier's
feature space (beside the real-vs-real floor), the spread of the classifier's labels over the
samples and, for the conditional models, how often it reads the label that was asked for.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...losses import (
    EMA,
    LazyR1,
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
)
from ...models import (
    ConditionalGenerator,
    DCGANDiscriminator,
    DCGANGenerator,
    ProjectionDiscriminator,
    StyleGAN2Discriminator,
    StyleGAN2Generator,
    weights_init,
)
from ..data import Split
from ..evaluate import digit_classifier, digit_fid, digit_fid_floor
from .base import Task, TaskDefaults, register

__all__ = ["CGANTask", "DCGANTask", "GANObjective", "GANPair", "StyleGANTask"]

NUM_CLASSES = 10


class GANPair(nn.Module):
    """Generator, discriminator and the generator's moving average ``g_ema`` (frozen, eval mode).

    ``sample(z, y)`` runs ``g_ema``; ``conditional`` says whether the models take labels."""

    def __init__(self, kind: str, generator: nn.Module, discriminator: nn.Module, z_dim: int):
        super().__init__()
        self.kind, self.z_dim = kind, z_dim
        self.conditional = kind != "dcgan" and getattr(generator, "num_classes", 0) > 0
        self.generator, self.discriminator = generator, discriminator
        self.ema = EMA(generator, decay=0.999)
        self.g_ema = self.ema.module  # a submodule: saved with the pair's state_dict

    def generate(self, g: nn.Module, z: Tensor, y: Tensor) -> Tensor:
        """Images from latents ``z (B, z_dim)`` and labels ``y (B,)`` (ignored if unconditional)."""
        if self.kind == "dcgan":
            return g(z)
        if self.kind == "cgan":
            return g(z, y)
        return g(z, y if self.conditional else None)

    def discriminate(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits ``(B,)`` (DCGAN's discriminator is built with ``logits=True``)."""
        d = self.discriminator
        if self.kind == "dcgan":
            return d(x)
        if self.kind == "cgan":
            return d(x, y)
        return d(x, y if self.conditional else None)

    @torch.no_grad()
    def sample(self, z: Tensor, y: Tensor) -> Tensor:
        return self.generate(self.g_ema, z, y)


class GANObjective(nn.Module):
    """``forward(x, y, generator, phase)``: the discriminator's (``phase="d"``) or the
    generator's (``"g"``) loss on real batch ``(x, y)``; fake labels are drawn uniformly."""

    def __init__(self, pair: GANPair, loss: str, r1_gamma: float = 0.0, r1_interval: int = 4):
        super().__init__()
        self.model = pair
        self.d_loss_fn, self.g_loss_fn = {
            "hinge": (hinge_d_loss, hinge_g_loss),
            "nonsaturating": (nonsaturating_d_loss, nonsaturating_g_loss),
        }[loss]
        self.r1 = LazyR1(r1_gamma, r1_interval) if r1_gamma > 0 else None
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def _latents(self, n: int, generator: torch.Generator, device: torch.device):
        z = torch.randn(n, self.model.z_dim, generator=generator).to(device)
        y = torch.randint(NUM_CLASSES, (n,), generator=generator).to(device)
        return z, y

    def forward(
        self, x: Tensor, y: Tensor, generator: torch.Generator, phase: str = "d"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        pair = self.model
        z, y_fake = self._latents(len(x), generator, x.device)
        if phase == "d":
            with torch.no_grad():
                fake = pair.generate(pair.generator, z, y_fake)
            # real and fake in separate passes: DCGAN's BatchNorm must see a fake-only batch here
            # as in the generator's step, or the discriminator learns from mixed-batch statistics
            # what the generator's step never shows it
            loss = self.d_loss_fn(pair.discriminate(x, y), pair.discriminate(fake, y_fake))
            logs = {"d_loss": loss.detach()}
            if self.r1 is not None:
                penalty = self.r1(int(self.steps), pair.discriminate, x, y)
                if penalty is not None:
                    loss = loss + penalty
            return loss, logs
        fake = pair.generate(pair.generator, z, y_fake)
        loss = self.g_loss_fn(pair.discriminate(fake, y_fake))
        return loss, {"g_loss": loss.detach()}


class _GANTask(Task):
    """What the three GAN tasks share: two Adam optimizers, the alternating step, evaluation."""

    datasets = ("digits",)
    kind = ""
    loss = "nonsaturating"
    r1_gamma = 0.0
    betas = (0.5, 0.999)

    def build(self, config: dict[str, Any]) -> nn.Module:
        return self.make_pair(config)

    def make_pair(self, config: dict[str, Any]) -> GANPair:
        """The generator and discriminator of ``config`` (:meth:`model_config`'s keys)."""
        raise NotImplementedError

    def objective(self, model: nn.Module) -> nn.Module:
        return GANObjective(model, self.loss, self.r1_gamma)

    def optimizers(self, model: nn.Module, lr: float) -> dict[str, torch.optim.Optimizer]:
        adam = torch.optim.Adam
        return {
            "generator": adam(model.generator.parameters(), lr=lr, betas=self.betas),
            "discriminator": adam(model.discriminator.parameters(), lr=lr, betas=self.betas),
        }

    def wrap(self, objective: nn.Module) -> nn.Module:
        # the discriminator phase leaves the generator's parameters without gradients
        return nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)

    def train_step(self, objective, wrapped, x, y, generator, optimizers) -> dict[str, Tensor]:
        opt_g, opt_d = optimizers["generator"], optimizers["discriminator"]
        d_loss, logs = wrapped(x, y, generator, "d")
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        g_loss, g_logs = wrapped(x, y, generator, "g")
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()  # also fills the discriminator's grads: cleared before its next step
        opt_g.step()
        pair: GANPair = objective.model
        # average over the steps so far while they are few, then over about 1,000
        steps = int(objective.steps)
        pair.ema.decay = min(0.999, (1 + steps) / (10 + steps))
        pair.ema.update()
        objective.steps += 1
        return logs | g_logs

    def _draw(self, pair: GANPair, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` samples of ``g_ema`` with labels cycling 0..9, on the CPU."""
        gen = torch.Generator().manual_seed(seed)
        device = next(pair.parameters()).device
        y = torch.arange(n) % NUM_CLASSES
        out = []
        for i in range(0, n, 256):
            z = torch.randn(min(256, n - i), pair.z_dim, generator=gen)
            out.append(pair.sample(z.to(device), y[i : i + len(z)].to(device)).cpu())
        return torch.cat(out), y

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Split) -> dict[str, float]:
        samples, y = self._draw(model, len(data.x_test), seed=1)
        clf = digit_classifier()
        predicted = clf.predict(samples)
        counts = np.bincount(predicted, minlength=NUM_CLASSES) / len(predicted)
        nz = counts[counts > 0]
        out = {
            "fid_samples": digit_fid(samples, data.x_test, clf),
            "fid_floor_train_vs_test": digit_fid_floor(clf),
            # 1.0 when the classifier finds every digit equally often, 0 for a single digit
            "label_entropy_norm": float(-(nz * np.log(nz)).sum() / math.log(NUM_CLASSES)) + 0.0,
        }
        if model.conditional:
            out["classifier_acc_on_requested_label"] = float(np.mean(predicted == y.numpy()))
        return out

    @torch.no_grad()
    def pictures(self, model: nn.Module, data: Split, generator: torch.Generator) -> list[Tensor]:
        samples, _ = self._draw(model, 40, seed=2)
        real = data.x_test[:20]
        return [real, samples[:20], samples[20:]]

    def row_titles(self) -> list[str]:
        labels = ", labels 0-9 twice" if self.kind != "dcgan" else ""
        return ["held-out", f"samples (EMA generator){labels}", "more samples"]


def _sized(data: Split, size: int) -> None:
    if data.image_shape[1] != size:
        raise ValueError(f"this GAN is built for {size}x{size} images, got {data.image_shape}")


@register
class DCGANTask(_GANTask):
    name = "gan"
    kind = "dcgan"
    defaults = {"digits": TaskDefaults(steps=600, batch_size=64, lr=2e-4, size=64)}

    def model_config(self, data: Split) -> dict[str, Any]:
        _sized(data, 64)  # DCGAN's layers are fixed to 64x64
        # a generator wider than the discriminator: at 16/16 the discriminator won within 100
        # steps on these smooth (upsampled) digits and the generator never left grey noise
        return {"nz": 32, "ngf": 32, "ndf": 8, "nc": data.image_shape[0]}

    def make_pair(self, config: dict[str, Any]) -> GANPair:
        g = DCGANGenerator(config["nz"], config["ngf"], config["nc"])
        d = DCGANDiscriminator(config["nc"], config["ndf"], logits=True)
        g.apply(weights_init)
        d.apply(weights_init)
        return GANPair("dcgan", g, d, config["nz"])


@register
class CGANTask(_GANTask):
    name = "cgan"
    kind = "cgan"
    loss = "hinge"
    betas = (0.0, 0.999)
    defaults = {"digits": TaskDefaults(steps=800, batch_size=64, lr=2e-4, size=16)}

    def model_config(self, data: Split) -> dict[str, Any]:
        c, s, _ = data.image_shape
        return {"z_dim": 32, "base_channels": 16, "image_size": s, "channels": c}

    def make_pair(self, config: dict[str, Any]) -> GANPair:
        s, c, ch = config["image_size"], config["channels"], config["base_channels"]
        g = ConditionalGenerator(NUM_CLASSES, config["z_dim"], ch, s, c)
        d = ProjectionDiscriminator(NUM_CLASSES, ch, s, c)
        return GANPair("cgan", g, d, config["z_dim"])


@register
class StyleGANTask(_GANTask):
    name = "stylegan"
    kind = "stylegan"
    r1_gamma = 0.1  # small images: a light R1
    betas = (0.0, 0.99)
    defaults = {"digits": TaskDefaults(steps=800, batch_size=32, lr=2e-3, size=16)}

    def model_config(self, data: Split) -> dict[str, Any]:
        c, s, _ = data.image_shape
        return {
            "z_dim": 32,
            "w_dim": 32,
            "image_size": s,
            "img_channels": c,
            "num_classes": NUM_CLASSES,
            "mapping_layers": 2,
            "channel_base": 256,
            "channel_max": 64,
        }

    def make_pair(self, config: dict[str, Any]) -> GANPair:
        g = StyleGAN2Generator(**config)
        keys = ("image_size", "img_channels", "num_classes", "channel_base", "channel_max")
        d = StyleGAN2Discriminator(**{k: config[k] for k in keys})
        return GANPair("stylegan", g, d, config["z_dim"])
