"""GANs: the DCGAN of PyTorch's examples (same ``state_dict`` keys, so its checkpoints load with
``strict=True``) and a small class-conditional ResNet GAN (generator on genext's fused
GroupNorm+SiLU, projection discriminator with spectral norm, optional self-attention through
genext's flash attention).

Images are ``(B, C, H, W)`` in ``[-1, 1]``; discriminators return logits ``(B,)`` (DCGAN's
discriminator, as in the examples, returns probabilities after a sigmoid).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from ..nn import GroupNormSiLU
from ..nn.functional import scaled_dot_product_attention

__all__ = [
    "ConditionalGenerator",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "ProjectionDiscriminator",
    "weights_init",
]


# ---- DCGAN (pytorch/examples, dcgan/main.py) ----------------------------------------------------


def weights_init(m: nn.Module) -> None:
    """DCGAN's initialisation, for ``dcgan_model.apply(weights_init)``: conv and transposed-conv
    weights from N(0, 0.02), BatchNorm weights from N(1, 0.02) and BatchNorm biases 0.

    Meant for the DCGAN models. It touches PyTorch's conv and BatchNorm layers only (so not the
    StyleGAN models' equalised-lr layers, which keep unit-variance weights), and a spectrally
    normalised conv gets its stored (original) weight initialised."""
    if isinstance(m, nn.modules.conv._ConvNd):
        if parametrize.is_parametrized(m, "weight"):
            nn.init.normal_(m.parametrizations.weight.original, 0.0, 0.02)
        else:
            nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator: ``z (B, nz) or (B, nz, 1, 1) -> image (B, nc, 64, 64)`` in ``[-1, 1]``.

    Four stride-2 transposed convolutions after a 4x4 projection (nz -> ngf*8 -> ngf*4 -> ngf*2 ->
    ngf -> nc), BatchNorm and ReLU between them, tanh at the end. The layers sit in ``self.main``
    with the examples' indices, so a ``netG.pth`` saved by pytorch/examples' ``dcgan/main.py``
    loads with ``strict=True``. Initialise with ``model.apply(weights_init)`` as the examples do.
    """

    def __init__(self, nz: int = 100, ngf: int = 64, nc: int = 3) -> None:
        super().__init__()
        self.nz = nz

        def up(cin: int, cout: int, stride: int, pad: int) -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False)

        self.main = nn.Sequential(
            up(nz, ngf * 8, 1, 0),  # 1x1 -> 4x4
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            up(ngf * 8, ngf * 4, 2, 1),  # -> 8x8
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            up(ngf * 4, ngf * 2, 2, 1),  # -> 16x16
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            up(ngf * 2, ngf, 2, 1),  # -> 32x32
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            up(ngf, nc, 2, 1),  # -> 64x64
            nn.Tanh(),
        )

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.main(z)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator: ``image (B, nc, 64, 64) -> probability (B,)`` that it is real.

    Four stride-2 convolutions (nc -> ndf -> ndf*2 -> ndf*4 -> ndf*8) with LeakyReLU(0.2) and
    BatchNorm (none after the first), then a 4x4 convolution to one channel and a sigmoid, in
    ``self.main`` with the examples' indices (their ``netD.pth`` loads with ``strict=True``).
    Train it with ``BCELoss`` as the examples do; ``logits=True`` returns the score before the
    sigmoid instead, which genext's GAN losses (on logits) expect. Same weights either way.
    """

    def __init__(self, nc: int = 3, ndf: int = 64, logits: bool = False) -> None:
        super().__init__()
        self.logits = logits

        def down(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 4, 2, 1, bias=False)

        self.main = nn.Sequential(
            down(nc, ndf),  # 64 -> 32
            nn.LeakyReLU(0.2, inplace=True),
            down(ndf, ndf * 2),  # -> 16
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            down(ndf * 2, ndf * 4),  # -> 8
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            down(ndf * 4, ndf * 8),  # -> 4
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),  # -> 1x1
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.main[:-1](x) if self.logits else self.main(x)
        return out.view(-1, 1).squeeze(1)


# ---- class-conditional ResNet GAN ---------------------------------------------------------------


def _num_groups(channels: int) -> int:
    """GroupNorm groups: the largest divisor of C that is at most 32 and leaves at least 4 channels
    per group (1 for C < 8), so tiny models still normalise over several channels."""
    cap = max(1, min(32, channels // 4))
    return max(g for g in range(1, cap + 1) if channels % g == 0)


def _num_stages(image_size: int, who: str) -> int:
    """log2(image_size / 4): the number of 2x resamplings between 4x4 and the image."""
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 8
        or image_size & (image_size - 1)
    ):
        raise ValueError(f"{who}: image_size must be a power of two >= 8, got {image_size!r}")
    return int(math.log2(image_size)) - 2


def _check_attention_resolution(res: int | None, allowed: list[int], who: str) -> None:
    if res is not None and res not in allowed:
        raise ValueError(f"{who}: attention_resolution must be None or one of {allowed}, got {res}")


class SelfAttention2d(nn.Module):
    """Single-head self-attention over the H*W positions of ``(B, C, H, W)``, residual:
    ``x + proj(attention(q, k, v))`` with q, k, v 1x1 convolutions of ``norm(x)`` (plain GroupNorm
    on genext's kernel when ``norm``; none in a discriminator). The attention itself is
    :func:`genext.nn.functional.scaled_dot_product_attention` (genext's flash-attention kernel)."""

    def __init__(self, channels: int, norm: bool = True, wrap=lambda m: m) -> None:
        super().__init__()
        self.norm = (
            GroupNormSiLU(_num_groups(channels), channels, activation=None) if norm else None
        )
        self.qkv = wrap(nn.Conv2d(channels, 3 * channels, 1))
        self.proj = wrap(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x) if self.norm is not None else x
        # (B, 3, 1 head, C, HW) -> three (B, 1, HW, C) views
        q, k, v = self.qkv(hn).reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
        out = scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UpBlock(nn.Module):
    """Pre-activation ResNet up-block (BigGAN's generator block without class-conditional norms):
    ``(B, Cin, H, W) -> (B, Cout, 2H, 2W)``; main path GroupNorm+SiLU (one genext kernel), nearest
    2x upsampling, 3x3 conv, GroupNorm+SiLU, 3x3 conv; skip path upsampling and a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = GroupNormSiLU(_num_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormSiLU(_num_groups(out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(self.norm1(x), scale_factor=2.0, mode="nearest")
        h = self.conv2(self.norm2(self.conv1(h)))
        return h + self.skip(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConditionalGenerator(nn.Module):
    """Class-conditional ResNet generator: ``(z (B, z_dim), y (B,) int64) -> (B, out_channels,
    image_size, image_size)`` in ``[-1, 1]``.

    Conditioning: the class embedding ``(B, embed_dim)`` is concatenated to z before the first
    linear layer (which maps to a 4x4 grid). Class-conditional norms were left out on purpose: they
    would split GroupNorm's affine from the SiLU and lose the fused kernel; the concatenation is
    enough for small data such as digits. Then ``log2(image_size / 4)`` up-blocks
    (:class:`UpBlock`; channels ``base_channels * min(2^(stages - i), 4)`` down to
    ``base_channels``), optional
    :class:`SelfAttention2d` after the stage whose output has ``attention_resolution`` (4 to
    ``image_size``), GroupNorm+SiLU, a 3x3 conv and tanh.

    Args:
        num_classes: number of labels y in ``[0, num_classes)``.
        z_dim: latent size.
        base_channels: channels at full resolution (the defaults, 16 channels and z_dim 32 at
            16x16, take about 0.3 s per batch of 64, forward and backward, on 2 CPU cores).
        image_size: 8, 16, 32, ... (a power of two, at least 8).
        out_channels: image channels (1 for digits, 3 for RGB).
        attention_resolution: None (no attention) or the resolution to attend at.
        embed_dim: class embedding size (default z_dim).
    """

    def __init__(
        self,
        num_classes: int,
        z_dim: int = 32,
        base_channels: int = 16,
        image_size: int = 16,
        out_channels: int = 1,
        attention_resolution: int | None = None,
        embed_dim: int | None = None,
    ) -> None:
        super().__init__()
        stages = _num_stages(image_size, "ConditionalGenerator")
        _check_attention_resolution(
            attention_resolution, [4 * 2**i for i in range(stages + 1)], "ConditionalGenerator"
        )
        self.num_classes, self.z_dim, self.image_size = num_classes, z_dim, image_size
        embed_dim = z_dim if embed_dim is None else embed_dim
        chans = [base_channels * min(2 ** (stages - i), 4) for i in range(stages + 1)]
        self.embed = nn.Embedding(num_classes, embed_dim)
        self.fc = nn.Linear(z_dim + embed_dim, chans[0] * 16)
        body: list[nn.Module] = []
        if attention_resolution == 4:
            body.append(SelfAttention2d(chans[0]))
        for i in range(stages):
            body.append(UpBlock(chans[i], chans[i + 1]))
            if attention_resolution == 8 * 2**i:
                body.append(SelfAttention2d(chans[i + 1]))
        self.body = nn.Sequential(*body)
        self.out_norm = GroupNormSiLU(_num_groups(chans[-1]), chans[-1])
        self.out_conv = nn.Conv2d(chans[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        h = self.fc(torch.cat([z, self.embed(y).to(z.dtype)], dim=1))
        h = self.body(h.view(z.shape[0], -1, 4, 4))
        return torch.tanh(self.out_conv(self.out_norm(h)))


class DownBlock(nn.Module):
    """ResNet down-block of the projection discriminator: ``(B, Cin, H, W) -> (B, Cout, H/2, W/2)``
    (or same size when ``down=False``); main path ReLU, 3x3 conv, ReLU, 3x3 conv, 2x2 average
    pooling (the first block skips the leading ReLU: its input is the image); skip path a 1x1 conv
    when the channels change, then the pooling."""

    def __init__(
        self, in_channels: int, out_channels: int, first: bool, down: bool, wrap=lambda m: m
    ) -> None:
        super().__init__()
        self.first, self.down = first, down
        self.conv1 = wrap(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.conv2 = wrap(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            wrap(nn.Conv2d(in_channels, out_channels, 1)) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(x if self.first else F.relu(x))
        h = self.conv2(F.relu(h))
        s = self.skip(x) if self.skip is not None else x
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class ProjectionDiscriminator(nn.Module):
    """Projection discriminator (Miyato & Koyama 2018): ``(x (B, in_channels, S, S), y (B,)) ->
    logits (B,)`` with ``D(x, y) = linear(phi(x)) + <embed(y), phi(x)>``, where ``phi(x)`` is the
    spatial sum of ReLU'd features ``(B, C)`` of ResNet down-blocks (:class:`DownBlock`, down to
    4x4, then one block at 4x4; channels ``base_channels * min(2^i, 4)``).

    With ``spectral_norm`` (default) every conv, the linear layer and the embedding are wrapped in
    ``torch.nn.utils.parametrizations.spectral_norm``. Optional :class:`SelfAttention2d` (no norm)
    after the block whose output has ``attention_resolution`` (4 to ``image_size / 2``); it runs on
    genext's flash-attention kernel, which has no double backward, so R1 penalties need a
    discriminator without attention.

    Args:
        num_classes: number of labels.
        base_channels: channels after the first block.
        image_size: 8, 16, 32, ... (a power of two, at least 8).
        in_channels: image channels.
        attention_resolution: None or the resolution to attend at.
        spectral_norm: wrap the weights in spectral normalisation.
    """

    def __init__(
        self,
        num_classes: int,
        base_channels: int = 16,
        image_size: int = 16,
        in_channels: int = 1,
        attention_resolution: int | None = None,
        spectral_norm: bool = True,
    ) -> None:
        super().__init__()
        stages = _num_stages(image_size, "ProjectionDiscriminator")
        _check_attention_resolution(
            attention_resolution,
            [image_size // 2 ** (i + 1) for i in range(stages)],
            "ProjectionDiscriminator",
        )
        self.num_classes, self.image_size = num_classes, image_size
        wrap = _spectral_norm if spectral_norm else (lambda m: m)
        chans = [base_channels * min(2**i, 4) for i in range(stages)]
        blocks: list[nn.Module] = []
        cin = in_channels
        for i, c in enumerate(chans):
            blocks.append(DownBlock(cin, c, first=i == 0, down=True, wrap=wrap))
            if attention_resolution == image_size // 2 ** (i + 1):
                blocks.append(SelfAttention2d(c, norm=False, wrap=wrap))
            cin = c
        blocks.append(DownBlock(cin, cin, first=False, down=False, wrap=wrap))
        self.blocks = nn.Sequential(*blocks)
        self.linear = wrap(nn.Linear(cin, 1))
        self.embed = wrap(nn.Embedding(num_classes, cin))

    def features(self, x: Tensor) -> Tensor:
        """phi(x): ``(B, C)``, the spatial sum of the last block's ReLU'd features."""
        return F.relu(self.blocks(x)).sum(dim=(2, 3))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        phi = self.features(x)
        return self.linear(phi).squeeze(1) + (self.embed(y) * phi).sum(dim=1)
