"""A small StyleGAN2 (Karras et al. 2020): mapping network, synthesis network of modulated and
demodulated convolutions with noise inputs and toRGB skips, style mixing, truncation around a
tracked ``w_avg``; a ResNet discriminator with a minibatch standard-deviation layer; optional class
conditioning in both (a label embedding into the mapping network, projection in D).

Simplifications against the paper's code, for clarity at small scale: resampling is bilinear 2x
upsampling (the [1, 3, 3, 1] filter with edge replication) before the modulated conv instead of a
transposed conv followed by an FIR blur, and 2x2 average pooling after the conv in D; no path
length regularisation (train with :mod:`genext.losses`: non-saturating loss and lazy R1).

Images are ``(B, C, H, W)`` in about ``[-1, 1]`` (no tanh, as in StyleGAN2); the discriminator
returns logits ``(B,)``. Every conv and linear weight uses the equalised learning rate: stored as
N(0, 1) (N(0, 1/lr_multiplier) for the mapping network) and scaled by He's constant at run time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EqualConv2d",
    "EqualLinear",
    "MappingNetwork",
    "ModulatedConv2d",
    "StyleGAN2Discriminator",
    "StyleGAN2Generator",
    "SynthesisNetwork",
    "minibatch_stddev",
    "mix_styles",
    "modulated_conv2d",
]

_SQRT2 = math.sqrt(2.0)
NOISE_MODES = ("random", "const", "none")


def _lrelu(x: Tensor) -> Tensor:
    # leaky ReLU with StyleGAN's gain sqrt(2): keeps the activations' second moment at init
    return F.leaky_relu(x, 0.2) * _SQRT2


def _pixel_norm(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Each row of ``(B, D)`` scaled to unit mean square."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: ``y = x W^T * (lr_multiplier / sqrt(in)) +
    b * lr_multiplier``, W stored as N(0, 1 / lr_multiplier^2) so the effective initial weight
    has He's scale and the optimiser's steps are scaled by ``lr_multiplier``. The bias is stored
    as ``bias_init / lr_multiplier`` (the effective initial bias is ``bias_init``).
    ``activation="lrelu"`` adds a leaky ReLU(0.2) times sqrt(2). ``(B, in) -> (B, out)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bias_init: float = 0.0,
        lr_multiplier: float = 1.0,
        activation: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in (None, "lrelu"):
            raise ValueError(f"EqualLinear: activation must be None or 'lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = (
            nn.Parameter(torch.full((out_features,), bias_init / lr_multiplier)) if bias else None
        )
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias * self.bias_gain if self.bias is not None else None
        x = F.linear(x, self.weight * self.weight_gain, b)
        return _lrelu(x) if self.activation == "lrelu" else x


class EqualConv2d(nn.Module):
    """Conv2d ("same" padding) with equalised learning rate: weight N(0, 1) times
    ``1 / sqrt(in * k * k)`` at run time; ``down=True`` average-pools 2x2 after the conv, then the
    bias and the optional ``"lrelu"`` activation. ``(B, Cin, H, W) -> (B, Cout, H', W')``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str | None = None,
        down: bool = False,
    ) -> None:
        super().__init__()
        if activation not in (None, "lrelu"):
            raise ValueError(f"EqualConv2d: activation must be None or 'lrelu', got {activation!r}")
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.activation, self.down, self.padding = activation, down, kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight * self.weight_gain, padding=self.padding)
        if self.down:
            x = F.avg_pool2d(x, 2)
        if self.bias is not None:
            x = x + self.bias.view(1, -1, 1, 1)
        return _lrelu(x) if self.activation == "lrelu" else x


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    demodulate: bool = True,
    padding: int = 0,
    eps: float = 1e-8,
) -> Tensor:
    """StyleGAN2's modulated convolution as one grouped conv (one group per sample).

    Sample b's kernel is ``weight * styles[b]`` along the input channels and, with
    ``demodulate``, rescaled so each output channel's kernel has unit L2 norm (``rsqrt(sum of
    squares + eps)``): for unit-variance iid input the output then has unit variance.

    Args:
        x: ``(B, Cin, H, W)``.
        weight: ``(Cout, Cin, k, k)``, shared by the batch.
        styles: ``(B, Cin)``, the per-sample input-channel scales.
    Returns:
        ``(B, Cout, H', W')``.
    """
    b, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    wt = weight.unsqueeze(0) * styles.reshape(b, 1, cin, 1, 1)  # (B, Cout, Cin, k, k)
    if demodulate:
        wt = wt * torch.rsqrt(wt.square().sum(dim=(2, 3, 4), keepdim=True) + eps)
    out = F.conv2d(
        x.reshape(1, b * cin, h, w), wt.reshape(b * cout, cin, kh, kw), padding=padding, groups=b
    )
    return out.reshape(b, cout, out.shape[2], out.shape[3])


class ModulatedConv2d(nn.Module):
    """A modulated conv whose styles come from w: ``styles = affine(w)`` (an :class:`EqualLinear`
    with bias initialised to 1, so styles start near 1), weight N(0, 1) times
    ``1 / sqrt(Cin * k * k)``. ``(x (B, Cin, H, W), w (B, w_dim)) -> (B, Cout, H, W)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
    ) -> None:
        super().__init__()
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
        self.demodulate, self.padding = demodulate, kernel_size // 2

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return modulated_conv2d(
            x, self.weight * self.weight_gain, self.affine(w), self.demodulate, self.padding
        )


class SynthesisLayer(nn.Module):
    """Optional bilinear 2x upsampling, a 3x3 modulated conv, per-pixel noise times a learned
    strength (initially 0), bias and leaky ReLU. ``noise_mode``: ``"random"`` (fresh N(0, 1)
    per sample), ``"const"`` (the fixed buffer ``noise_const``, for reproducible images) or
    ``"none"``. ``(x (B, Cin, R/2 or R, ..), w (B, w_dim)) -> (B, Cout, R, R)``."""

    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool
    ) -> None:
        super().__init__()
        self.up, self.resolution = up, resolution
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim)
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random") -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.conv(x, w)
        if noise_mode == "random":
            noise = torch.randn(
                x.shape[0], 1, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device
            )
            x = x + noise * self.noise_strength
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength
        return _lrelu(x + self.bias.view(1, -1, 1, 1))


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation plus bias: features ``(B, C, R, R)`` -> image
    ``(B, img_channels, R, R)``."""

    def __init__(self, in_channels: int, img_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, img_channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(img_channels))

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias.view(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: the learned constant 4x4 input (first block) or an
    upsampling layer, a second layer, and a toRGB whose output is added to the upsampled image so
    far (skip architecture). Uses ``num_conv + 1`` consecutive ws; the toRGB's w is the next
    block's first."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        w_dim: int,
        resolution: int,
        img_channels: int,
    ) -> None:
        super().__init__()
        self.first = resolution == 4
        if self.first:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
            self.convs = nn.ModuleList(
                [SynthesisLayer(out_channels, out_channels, w_dim, 4, False)]
            )
        else:
            self.convs = nn.ModuleList(
                [
                    SynthesisLayer(in_channels, out_channels, w_dim, resolution, True),
                    SynthesisLayer(out_channels, out_channels, w_dim, resolution, False),
                ]
            )
        self.torgb = ToRGB(out_channels, img_channels, w_dim)
        self.num_conv = len(self.convs)

    def forward(
        self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str
    ) -> tuple[Tensor, Tensor]:
        if self.first:
            x = self.const.to(ws.dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        for i, layer in enumerate(self.convs):
            x = layer(x, ws[:, i], noise_mode)
        y = self.torgb(x, ws[:, self.num_conv])
        if img is not None:
            y = y + F.interpolate(img, scale_factor=2.0, mode="bilinear", align_corners=False)
        return x, y


def _channels(resolution: int, channel_base: int, channel_max: int) -> int:
    return max(1, min(channel_base // resolution, channel_max))


def _log2_size(image_size: int, who: str) -> int:
    if (
        isinstance(image_size, bool)
        or not isinstance(image_size, int)
        or image_size < 4
        or image_size & (image_size - 1)
    ):
        raise ValueError(f"{who}: image_size must be a power of two >= 4, got {image_size!r}")
    return int(math.log2(image_size))


class SynthesisNetwork(nn.Module):
    """ws ``(B, num_ws, w_dim)`` -> image ``(B, img_channels, S, S)``: blocks at 4, 8, ..., S with
    ``min(channel_base // R, channel_max)`` channels; ``num_ws = 2 * log2(S) - 2`` (one w per
    synthesis layer plus the last toRGB)."""

    def __init__(
        self,
        w_dim: int,
        image_size: int,
        img_channels: int,
        channel_base: int = 1024,
        channel_max: int = 128,
    ) -> None:
        super().__init__()
        log2 = _log2_size(image_size, "SynthesisNetwork")
        self.resolutions = [2**i for i in range(2, log2 + 1)]
        blocks = []
        cin = 0
        for res in self.resolutions:
            cout = _channels(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(cin, cout, w_dim, res, img_channels))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1

    def layers(self) -> list[SynthesisLayer]:
        """The synthesis layers in order: layer i uses ``ws[:, i]``."""
        return [layer for block in self.blocks for layer in block.convs]

    def forward(self, ws: Tensor, noise_mode: str = "random") -> Tensor:
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.dim() != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(
                f"SynthesisNetwork: ws must be (B, {self.num_ws}, w_dim), got {list(ws.shape)}"
            )
        x = img = None
        i = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, i : i + block.num_conv + 1], noise_mode)
            i += block.num_conv
        return img


class MappingNetwork(nn.Module):
    """z ``(B, z_dim)`` (and labels ``(B,)`` when ``num_classes``) -> ws ``(B, num_ws, w_dim)``.

    z is pixel-normalised; a class label is embedded (an :class:`EqualLinear` on its one-hot
    vector), pixel-normalised and concatenated; then ``num_layers`` equalised-lr linear layers with
    leaky ReLU and ``lr_multiplier`` (0.01: the mapping learns 100x slower). In training mode the
    buffer ``w_avg`` tracks the batch mean of w: ``w_avg <- beta * w_avg + (1 - beta) * mean(w)``
    (one average for all classes). Truncation: ``w <- w_avg + psi * (w - w_avg)`` on the first
    ``truncation_cutoff`` ws (all when None); ``psi = 1`` leaves w untouched."""

    def __init__(
        self,
        z_dim: int,
        w_dim: int,
        num_ws: int,
        num_classes: int = 0,
        num_layers: int = 4,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.num_classes = z_dim, w_dim, num_ws, num_classes
        self.w_avg_beta = w_avg_beta
        self.embed = EqualLinear(num_classes, w_dim) if num_classes else None
        dims = [z_dim + (w_dim if num_classes else 0)] + [w_dim] * num_layers
        self.layers = nn.Sequential(
            *[
                EqualLinear(dims[i], dims[i + 1], lr_multiplier=lr_multiplier, activation="lrelu")
                for i in range(num_layers)
            ]
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        # w_avg keeps at least float32 when the model is cast to 16 bits: there its EMA steps
        # (0.005 x the distance to the batch mean) would round away and the average stall
        kept = self.w_avg
        super()._apply(fn, recurse)
        new = self._buffers["w_avg"]
        if new.dtype in (torch.float16, torch.bfloat16):
            self._buffers["w_avg"] = kept.to(device=new.device, dtype=torch.float32)
        return self

    def forward(
        self,
        z: Tensor,
        c: Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        update_w_avg: bool | None = None,
    ) -> Tensor:
        x = _pixel_norm(z)
        if self.embed is not None:
            if c is None:
                raise ValueError("MappingNetwork: a class-conditional model needs labels c")
            onehot = F.one_hot(c, self.num_classes).to(z.dtype)
            x = torch.cat([x, _pixel_norm(self.embed(onehot))], dim=1)
        w = self.layers(x)
        track = self.training if update_w_avg is None else update_w_avg
        if track:
            with torch.no_grad():
                # in w_avg's dtype: under autocast or in a 16-bit model w is 16-bit, w_avg is not
                mean = w.detach().to(self.w_avg.dtype).mean(dim=0)
                self.w_avg.lerp_(mean, 1.0 - self.w_avg_beta)
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1)
        if truncation_psi != 1:
            cut = self.num_ws if truncation_cutoff is None else truncation_cutoff
            head = self.w_avg.to(ws.dtype).lerp(ws[:, :cut], truncation_psi)
            ws = torch.cat([head, ws[:, cut:]], dim=1)
        return ws


def mix_styles(ws: Tensor, ws2: Tensor, crossover: int) -> Tensor:
    """Style mixing: ``ws[:, :crossover]`` from the first latent, the rest from the second.
    ``(B, num_ws, w_dim)`` each."""
    return torch.cat([ws[:, :crossover], ws2[:, crossover:]], dim=1)


class StyleGAN2Generator(nn.Module):
    """StyleGAN2 generator: ``(z (B, z_dim), c (B,) labels or None) -> (B, img_channels, S, S)``.

    In training mode, with probability ``style_mixing_prob``, a second latent (same labels) takes
    over from a random crossover layer in ``[1, num_ws)``: regularises the styles to act per layer.
    ``truncation_psi`` / ``truncation_cutoff`` pull w towards ``mapping.w_avg`` (sampling only);
    ``noise_mode`` as :class:`SynthesisLayer`.

    Args:
        z_dim, w_dim: latent sizes.
        image_size: S, a power of two >= 4 (16 or 32 here).
        img_channels: 1 or 3.
        num_classes: 0 for unconditional, else labels in ``[0, num_classes)``.
        mapping_layers: depth of the mapping network (StyleGAN2: 8; smaller here).
        channel_base, channel_max: channels ``min(channel_base // R, channel_max)`` at R x R.
        style_mixing_prob: probability of mixing per training batch.
    """

    def __init__(
        self,
        z_dim: int = 64,
        w_dim: int = 64,
        image_size: int = 16,
        img_channels: int = 1,
        num_classes: int = 0,
        mapping_layers: int = 4,
        channel_base: int = 1024,
        channel_max: int = 128,
        style_mixing_prob: float = 0.9,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        self.z_dim, self.num_classes, self.image_size = z_dim, num_classes, image_size
        self.style_mixing_prob = style_mixing_prob
        self.synthesis = SynthesisNetwork(
            w_dim, image_size, img_channels, channel_base, channel_max
        )
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            z_dim, w_dim, self.num_ws, num_classes, mapping_layers, lr_multiplier, w_avg_beta
        )

    def forward(
        self,
        z: Tensor,
        c: Tensor | None = None,
        truncation_psi: float = 1.0,
        truncation_cutoff: int | None = None,
        noise_mode: str = "random",
    ) -> Tensor:
        ws = self.mapping(z, c, truncation_psi, truncation_cutoff)
        if self.training and self.style_mixing_prob > 0 and self.num_ws > 1:
            crossover = int(torch.randint(1, self.num_ws, ()).item())
            if torch.rand(()).item() < self.style_mixing_prob:
                ws2 = self.mapping(torch.randn_like(z), c, update_w_avg=False)
                ws = mix_styles(ws, ws2, crossover)
        return self.synthesis(ws, noise_mode)


def minibatch_stddev(x: Tensor, group_size: int = 4, num_channels: int = 1) -> Tensor:
    """StyleGAN's minibatch standard-deviation layer: ``(N, C, H, W) -> (N, C + F, H, W)``.

    Samples form groups of ``G = min(group_size, N)`` (sample n is in group ``n mod (N / G)``,
    as StyleGAN2 reshapes); the channels split into ``F = num_channels`` parts. For each group and
    part: the standard deviation over the group (biased, ``sqrt(var + 1e-8)``) at every channel and
    pixel, averaged to one number, appended as a constant feature map to each member. N must be a
    multiple of G and C of F.
    """
    n, c, h, w = x.shape
    g = min(group_size, n)
    if n % g:
        raise ValueError(f"minibatch_stddev: batch {n} is not a multiple of group size {g}")
    if c % num_channels:
        raise ValueError(f"minibatch_stddev: {c} channels do not split into {num_channels} parts")
    y = x.reshape(g, n // g, num_channels, c // num_channels, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over each group
    y = (y + 1e-8).sqrt().mean(dim=(2, 3, 4))  # (N / G, F)
    y = y.reshape(n // g, num_channels, 1, 1).repeat(g, 1, h, w)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """ResNet down block: two 3x3 equalised convs with leaky ReLU (the second downsamples), plus a
    1x1 downsampling skip, summed and scaled by sqrt(1/2). ``(B, Cin, R, R) -> (B, Cout, R/2,
    R/2)``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, activation="lrelu")
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, activation="lrelu", down=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True)

    def forward(self, x: Tensor) -> Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """StyleGAN2's ResNet discriminator: ``(img (B, img_channels, S, S), c (B,) or None) ->
    logits (B,)``.

    fromRGB (1x1 conv), down-blocks (:class:`DiscriminatorBlock`) to 4x4, then
    :func:`minibatch_stddev`, a 3x3 conv, a linear layer on the flattened 4x4 features and the
    output layer. Conditional
    (``num_classes > 0``): the output layer gives ``cmap_dim`` features that are projected on the
    label's embedding, ``<out, embed(c)> / sqrt(cmap_dim)``.

    Args:
        image_size: S, a power of two >= 4.
        img_channels: 1 or 3.
        num_classes: 0 for unconditional.
        channel_base, channel_max: channels ``min(channel_base // R, channel_max)`` at R x R.
        mbstd_group_size, mbstd_num_channels: the minibatch-stddev layer's G and F; the batch must
            be a multiple of ``min(G, batch)``.
        cmap_dim: projection size (default: the channels at 4x4).
    """

    def __init__(
        self,
        image_size: int = 16,
        img_channels: int = 1,
        num_classes: int = 0,
        channel_base: int = 1024,
        channel_max: int = 128,
        mbstd_group_size: int = 4,
        mbstd_num_channels: int = 1,
        cmap_dim: int | None = None,
    ) -> None:
        super().__init__()
        log2 = _log2_size(image_size, "StyleGAN2Discriminator")
        self.num_classes = num_classes
        self.mbstd_group_size, self.mbstd_num_channels = mbstd_group_size, mbstd_num_channels
        ch = [_channels(2**i, channel_base, channel_max) for i in range(log2, 1, -1)]  # S .. 4
        self.fromrgb = EqualConv2d(img_channels, ch[0], 1, activation="lrelu")
        self.blocks = nn.Sequential(
            *[DiscriminatorBlock(ch[i], ch[i + 1]) for i in range(len(ch) - 1)]
        )
        c4 = ch[-1]
        self.conv = EqualConv2d(c4 + mbstd_num_channels, c4, 3, activation="lrelu")
        self.fc = EqualLinear(c4 * 16, c4, activation="lrelu")
        self.cmap_dim = (cmap_dim or c4) if num_classes else 1
        self.out = EqualLinear(c4, self.cmap_dim)
        self.embed = EqualLinear(num_classes, self.cmap_dim) if num_classes else None

    def forward(self, img: Tensor, c: Tensor | None = None) -> Tensor:
        x = self.blocks(self.fromrgb(img))
        x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_channels)
        x = self.fc(self.conv(x).flatten(1))
        out = self.out(x)
        if self.embed is None:
            return out.squeeze(1)
        if c is None:
            raise ValueError("StyleGAN2Discriminator: a class-conditional model needs labels c")
        cmap = self.embed(F.one_hot(c, self.num_classes).to(out.dtype))
        return (out * cmap).sum(dim=1) / math.sqrt(self.cmap_dim)
