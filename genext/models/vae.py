"""AutoencoderKL: diffusers' KL-regularised image autoencoder (the Stable Diffusion VAE) on genext's
GroupNorm+SiLU and attention kernels.

The classes take diffusers' config and load diffusers' ``state_dict`` with no renaming; outputs
are diffusers' (``encode(x).latent_dist``, ``decode(z).sample``). :class:`Encoder` and
:class:`Decoder` are shared with :mod:`genext.models.vqvae`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import GroupNormSiLU
from ._blocks import (
    DownEncoderBlock2D,
    UNetMidBlock2D,
    UpDecoderBlock2D,
)
from ._config import ModelOutput, PeerConfigMixin

__all__ = [
    "AutoencoderKL",
    "AutoencoderKLOutput",
    "Decoder",
    "DecoderOutput",
    "DiagonalGaussianDistribution",
    "Encoder",
]


class DecoderOutput(ModelOutput):
    """``sample (B, C, H, W)``; ``commit_loss`` (VQModel only)."""

    _fields = ("sample", "commit_loss")


class AutoencoderKLOutput(ModelOutput):
    """``latent_dist``: the :class:`DiagonalGaussianDistribution` of the latents."""

    _fields = ("latent_dist",)


def _check_block_types(kind: str, types: Sequence[str], expected: str, n: int) -> None:
    if len(types) != n:
        raise ValueError(
            f"{kind}_block_types has {len(types)} entries but block_out_channels has {n}"
        )
    bad = sorted({t for t in types if t != expected})
    if bad:
        raise ValueError(f"{kind}_block_types: only {expected!r} is supported, got {bad}")


def _run(module: nn.Module, use_checkpoint: bool, *args: Tensor | None) -> Tensor:
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


class Encoder(nn.Module):
    """diffusers' VAE ``Encoder``: ``conv_in``, down blocks, mid block with attention,
    ``conv_norm_out`` + activation, ``conv_out``. ``(B, in, H, W) -> (B, out * (1 + double_z),
    H / 2^(n-1), W / 2^(n-1))`` for n blocks."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        double_z: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        _check_block_types("down", down_block_types, "DownEncoderBlock2D", len(block_out_channels))
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        blocks = []
        prev = block_out_channels[0]
        for i, ch in enumerate(block_out_channels):
            blocks.append(
                DownEncoderBlock2D(
                    prev,
                    ch,
                    num_layers=layers_per_block,
                    resnet_eps=1e-6,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    add_downsample=i < len(block_out_channels) - 1,
                    downsample_padding=0,
                )
            )
            prev = ch
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UNetMidBlock2D(
            block_out_channels[-1],
            temb_channels=None,
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=block_out_channels[-1],
            add_attention=mid_block_add_attention,
        )
        # SiLU here whatever act_fn says, as diffusers' encoder has it
        self.conv_norm_out = GroupNormSiLU(norm_num_groups, block_out_channels[-1], 1e-6)
        self.conv_out = nn.Conv2d(
            block_out_channels[-1], 2 * out_channels if double_z else out_channels, 3, padding=1
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, self.gradient_checkpointing, x)
        x = _run(self.mid_block, self.gradient_checkpointing, x)
        return self.conv_out(self.conv_norm_out(x))


class Decoder(nn.Module):
    """diffusers' VAE ``Decoder``: ``conv_in``, mid block with attention, up blocks of
    ``layers_per_block + 1`` ResNet blocks, ``conv_norm_out`` + activation, ``conv_out``."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        act_fn: str = "silu",
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        if norm_type != "group":
            raise ValueError(
                f"Decoder: norm_type {norm_type!r} (MoVQ's spatial norm) is not supported; "
                "only 'group'"
            )
        _check_block_types("up", up_block_types, "UpDecoderBlock2D", len(block_out_channels))
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[-1], 3, padding=1)
        self.mid_block = UNetMidBlock2D(
            block_out_channels[-1],
            temb_channels=None,
            resnet_eps=1e-6,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            attention_head_dim=block_out_channels[-1],
            add_attention=mid_block_add_attention,
        )
        rev = list(reversed(block_out_channels))
        blocks = []
        prev = rev[0]
        for i, ch in enumerate(rev):
            blocks.append(
                UpDecoderBlock2D(
                    prev,
                    ch,
                    num_layers=layers_per_block + 1,
                    resnet_eps=1e-6,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    add_upsample=i < len(rev) - 1,
                )
            )
            prev = ch
        self.up_blocks = nn.ModuleList(blocks)
        # SiLU here whatever act_fn says, as diffusers' decoder has it
        self.conv_norm_out = GroupNormSiLU(norm_num_groups, block_out_channels[0], 1e-6)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        x = _run(self.mid_block, self.gradient_checkpointing, x)
        for block in self.up_blocks:
            x = _run(block, self.gradient_checkpointing, x)
        return self.conv_out(self.conv_norm_out(x))


def _randn(
    shape: torch.Size,
    generator: torch.Generator | list[torch.Generator] | None,
    like: Tensor,
) -> Tensor:
    """Standard normal draws as diffusers' ``randn_tensor`` makes them, so that a seed gives the
    same latents here and there: on the CPU when the generator is a CPU one (then moved), one
    draw per batch entry from a list of generators, and an error for a CUDA generator with a
    tensor elsewhere."""
    device, dtype = like.device, like.dtype
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    first = generator[0] if isinstance(generator, (list, tuple)) else generator
    draw_on = device
    if first is not None and first.device.type != device.type:
        if first.device.type == "cuda":
            raise ValueError(
                f"cannot draw {device.type} noise from a cuda generator: pass a generator on "
                f"{device.type} (or on the CPU)"
            )
        draw_on = first.device
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(
                f"{len(generator)} generators for a batch of {shape[0]}: pass one per entry"
            )
        one = (1, *shape[1:])
        parts = [torch.randn(one, generator=g, device=draw_on, dtype=dtype) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


class DiagonalGaussianDistribution:
    """The posterior ``N(mean, exp(logvar))`` from the encoder's ``(B, 2C, h, w)`` moments (mean
    first), with ``logvar`` clamped to [-30, 20] as diffusers does."""

    def __init__(self, parameters: Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.deterministic = deterministic
        if deterministic:
            self.std = self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``mean + std * eps`` with ``eps`` drawn from ``generator`` (or one generator per batch
        entry), as diffusers draws it."""
        return self.mean + self.std * _randn(self.mean.shape, generator, self.parameters)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL divergence to ``other`` (standard normal when None), summed over C, h, w: ``(B,)``."""
        if self.deterministic:
            return torch.zeros(1, dtype=self.mean.dtype, device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=dims)
        return 0.5 * (
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar
        ).sum(dim=dims)

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """Negative log-likelihood of ``sample``, summed over ``dims``."""
        if self.deterministic:
            return torch.zeros(1, dtype=self.mean.dtype, device=self.mean.device)
        return 0.5 * (
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var
        ).sum(dim=list(dims))


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """Cross-fades the first ``extent`` rows (``dim=2``) or columns (``dim=3``) of ``b`` from the
    last ones of ``a``, weight ``i / extent`` on ``b``, in place, and returns ``b``: as diffusers'
    ``blend_v``/``blend_h``, whose in-place update means a tile's later neighbours blend with
    its already blended edges."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    # diffusers multiplies by Python floats: PyTorch computes such a product in the op's math
    # type (float32 for 16-bit and float32 tensors, float64 for float64) and rounds it to the
    # tensor's dtype, then rounds the sum; the same steps here give the same bits
    math_t = torch.float64 if b.dtype == torch.float64 else torch.float32
    w = torch.arange(extent, dtype=torch.float64, device=b.device) / extent
    shape = [1, 1, 1, 1]
    shape[dim] = extent
    wb, wa = w.view(shape).to(math_t), (1 - w).view(shape).to(math_t)
    head = b.narrow(dim, 0, extent)
    tail = a.narrow(dim, a.shape[dim] - extent, extent)
    head.copy_((tail.to(math_t) * wa).to(b.dtype) + (head.to(math_t) * wb).to(b.dtype))
    return b


def tiled_apply(
    x: Tensor,
    fn: Callable[[Tensor], Tensor],
    tile_in: int,
    tile_out: int,
    overlap_factor: float,
) -> Tensor:
    """``fn`` applied to overlapping ``tile_in``-square tiles of ``x`` (stride ``tile_in * (1 -
    overlap_factor)``), whose ``tile_out``-square outputs are cross-faded over
    ``tile_out * overlap_factor`` pixels and cropped to the stride: diffusers' tiled VAE scheme.
    Peak memory is one tile's activations plus the outputs."""
    stride = int(tile_in * (1 - overlap_factor))
    extent = int(tile_out * overlap_factor)
    keep = tile_out - extent
    rows = [
        [fn(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    out_rows = []
    for i, row in enumerate(rows):
        cols = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, extent, 2)
            if j > 0:
                tile = _blend(row[j - 1], tile, extent, 3)
            cols.append(tile[:, :, :keep, :keep])
        out_rows.append(torch.cat(cols, dim=3))
    return torch.cat(out_rows, dim=2)


class AutoencoderKL(PeerConfigMixin, nn.Module):
    """diffusers' ``AutoencoderKL`` (same constructor arguments, config fields and ``state_dict``
    keys) with genext's kernels: every GroupNorm (+SiLU) is one genext kernel and the mid-block
    attention is genext's flash attention (PyTorch's SDPA where genext does not serve the head
    dim: on CUDA one head of dim ``block_out_channels[-1]`` above 256, as in the SD VAE).

    ``encode(x (B, in_channels, H, W)).latent_dist`` is the posterior over latents
    ``(B, latent_channels, H / f, W / f)``, ``f = 2 ** (len(block_out_channels) - 1)``;
    ``decode(z).sample`` the image. Diffusion models work on ``(z - shift_factor) *
    scaling_factor`` (``config.scaling_factor``/``config.shift_factor``).

    Beyond forward passes: ``enable_tiling()`` encodes and decodes large images in overlapping
    tiles (bounded memory; diffusers' blending, so results equal diffusers' tiled ones),
    ``enable_slicing()`` runs a batch one image at a time, ``enable_gradient_checkpointing()``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int | Sequence[int] = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ) -> None:
        super().__init__()
        self._record_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            down_block_types,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            double_z=True,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            up_block_types,
            block_out_channels,
            layers_per_block,
            norm_num_groups,
            act_fn,
            mid_block_add_attention=mid_block_add_attention,
        )
        self.quant_conv = (
            nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        )
        self.post_quant_conv = (
            nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None
        )
        self.use_slicing = False
        self.use_tiling = False
        # a (height, width) sample size tiles by its first entry (square tiles)
        size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
        self.tile_sample_min_size = int(size)
        self.tile_latent_min_size = int(size / 2 ** (len(block_out_channels) - 1))
        self.tile_overlap_factor = 0.25

    # -- switches, as diffusers names them
    def enable_tiling(self, use_tiling: bool = True) -> None:
        """Encode/decode inputs larger than ``tile_sample_min_size`` (``config.sample_size``) in
        overlapping tiles."""
        self.use_tiling = use_tiling

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def enable_slicing(self) -> None:
        """Encode/decode a batch one image at a time (peak memory of one image)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    # -- encoding
    def _moments(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _tiled_moments(self, x: Tensor) -> Tensor:
        return tiled_apply(
            x,
            self._moments,
            self.tile_sample_min_size,
            self.tile_latent_min_size,
            self.tile_overlap_factor,
        )

    def _encode(self, x: Tensor) -> Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return self._tiled_moments(x)
        return self._moments(x)

    def encode(self, x: Tensor, return_dict: bool = True):
        """The posterior over latents: ``AutoencoderKLOutput(latent_dist=...)``, or the tuple
        ``(latent_dist,)`` with ``return_dict=False``."""
        if self.use_slicing and x.shape[0] > 1:
            h = torch.cat([self._encode(s) for s in x.split(1)])
        else:
            h = self._encode(x)
        posterior = DiagonalGaussianDistribution(h)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    # -- decoding
    def _image(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _tiled_image(self, z: Tensor) -> Tensor:
        return tiled_apply(
            z,
            self._image,
            self.tile_latent_min_size,
            self.tile_sample_min_size,
            self.tile_overlap_factor,
        )

    def _decode(self, z: Tensor) -> Tensor:
        if self.use_tiling and max(z.shape[-2:]) > self.tile_latent_min_size:
            return self._tiled_image(z)
        return self._image(z)

    def decode(self, z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        """The image of latents ``z (B, latent_channels, h, w)``: ``DecoderOutput(sample=...)``,
        or ``(sample,)`` with ``return_dict=False``. ``generator`` is unused (diffusers' signature)."""
        if self.use_slicing and z.shape[0] > 1:
            x = torch.cat([self._decode(s) for s in z.split(1)])
        else:
            x = self._decode(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def tiled_encode(self, x: Tensor, return_dict: bool = True):
        """``encode`` in tiles whatever the switches say."""
        moments = self._tiled_moments(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def tiled_decode(self, z: Tensor, return_dict: bool = True):
        """``decode`` in tiles whatever the switches say."""
        x = self._tiled_image(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(
        self,
        sample: Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ):
        """Encode, take the posterior's mode (or a sample), decode."""
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)
