"""Timestep, label and patch embeddings with diffusers' semantics, module names and
``state_dict`` keys (``diffusers.models.embeddings``), shared by the U-Nets and the DiT.

The sinusoidal timestep embedding is computed in float32 whatever the input dtype, as diffusers
computes it; the models cast it to their own dtype afterwards, so a float64 model sees the same
values as diffusers' float64 model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._blocks import activation

__all__ = [
    "CombinedTimestepLabelEmbeddings",
    "GaussianFourierProjection",
    "LabelEmbedding",
    "PatchEmbed",
    "TimestepEmbedding",
    "Timesteps",
    "get_1d_sincos_pos_embed_from_grid",
    "get_2d_sincos_pos_embed",
    "get_timestep_embedding",
]


def get_timestep_embedding(
    timesteps: Tensor,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> Tensor:
    """Sinusoidal embedding of ``timesteps (N,)`` (fractional values allowed) -> ``(N, dim)``
    float32, as in DDPM and diffusers: frequencies ``exp(-ln(max_period) * i / (dim/2 - shift))``
    for ``i < dim/2``, ``[sin, cos]`` of ``scale * t * freq`` (``[cos, sin]`` with
    ``flip_sin_to_cos``), one zero column appended when ``dim`` is odd."""
    if timesteps.dim() != 1:
        raise ValueError(
            f"get_timestep_embedding: timesteps must be 1-D (N,), got shape {tuple(timesteps.shape)}"
        )
    half = embedding_dim // 2
    idx = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    # the same order of operations as diffusers, so the float32 values agree bit for bit
    freqs = torch.exp((-math.log(max_period) * idx) / (half - downscale_freq_shift))
    args = scale * (timesteps[:, None].float() * freqs[None, :])
    first, second = (torch.cos(args), torch.sin(args))
    if not flip_sin_to_cos:
        first, second = second, first
    emb = torch.cat([first, second], dim=-1)
    if embedding_dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """diffusers' ``Timesteps``: :func:`get_timestep_embedding` as a module (no parameters).
    ``(N,)`` -> ``(N, num_channels)`` float32."""

    def __init__(
        self,
        num_channels: int,
        flip_sin_to_cos: bool,
        downscale_freq_shift: float,
        scale: float = 1,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps: Tensor) -> Tensor:
        return get_timestep_embedding(
            timesteps,
            self.num_channels,
            flip_sin_to_cos=self.flip_sin_to_cos,
            downscale_freq_shift=self.downscale_freq_shift,
            scale=self.scale,
        )


class TimestepEmbedding(nn.Module):
    """diffusers' ``TimestepEmbedding``: ``linear_1``, activation, ``linear_2`` (and an optional
    ``post_act``); with ``cond_proj_dim`` a bias-free ``cond_proj`` of a condition is added to the
    input first. ``(N, in_channels)`` -> ``(N, out_dim or time_embed_dim)``."""

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        act_fn: str = "silu",
        out_dim: int | None = None,
        post_act_fn: str | None = None,
        cond_proj_dim: int | None = None,
        sample_proj_bias: bool = True,
    ) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, bias=sample_proj_bias)
        self.cond_proj = (
            nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        )
        self.act = activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim, bias=sample_proj_bias)
        self.post_act = activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("TimestepEmbedding: condition given but cond_proj_dim was None")
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        if self.post_act is not None:
            sample = self.post_act(sample)
        return sample


class GaussianFourierProjection(nn.Module):
    """diffusers' ``GaussianFourierProjection`` (score-SDE noise-level embedding): fixed random
    frequencies ``weight (embedding_size,)`` (a parameter without gradient, key ``weight``);
    ``x (N,)`` (``log(x)`` first when ``log``) -> ``[sin, cos](2 pi x w)`` ``(N, 2 * size)``
    (``[cos, sin]`` with ``flip_sin_to_cos``)."""

    def __init__(
        self,
        embedding_size: int = 256,
        scale: float = 1.0,
        set_W_to_weight: bool = True,
        log: bool = True,
        flip_sin_to_cos: bool = False,
    ) -> None:
        super().__init__()
        del set_W_to_weight  # diffusers' key is "weight" either way
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log = log
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, x: Tensor) -> Tensor:
        if self.log:
            x = torch.log(x)
        proj = x[:, None] * self.weight[None, :] * 2 * math.pi
        parts = [torch.sin(proj), torch.cos(proj)]
        if self.flip_sin_to_cos:
            parts.reverse()
        return torch.cat(parts, dim=-1)


class LabelEmbedding(nn.Module):
    """diffusers' ``LabelEmbedding``: class labels ``(N,)`` -> ``(N, hidden_size)``. With
    ``dropout_prob > 0`` the table has one extra row (index ``num_classes``): the "no class"
    embedding for classifier-free guidance, which replaces each label with probability
    ``dropout_prob`` in training, or where ``force_drop_ids == 1``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """``labels`` with the dropped ones replaced by ``num_classes``."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = torch.as_tensor(force_drop_ids, device=labels.device) == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class CombinedTimestepLabelEmbeddings(nn.Module):
    """diffusers' ``CombinedTimestepLabelEmbeddings`` (DiT's conditioning): a 256-channel
    sinusoidal timestep embedding (cos first, shift 1) through a :class:`TimestepEmbedding`, plus
    a :class:`LabelEmbedding`. ``timestep (N,)``, ``class_labels (N,)`` -> ``(N, embedding_dim)``."""

    def __init__(
        self, num_classes: int, embedding_dim: int, class_dropout_prob: float = 0.1
    ) -> None:
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.class_embedder = LabelEmbedding(num_classes, embedding_dim, class_dropout_prob)

    def forward(
        self, timestep: Tensor, class_labels: Tensor, hidden_dtype: torch.dtype | None = None
    ) -> Tensor:
        t = self.time_proj(timestep)
        t = self.timestep_embedder(t.to(dtype=hidden_dtype) if hidden_dtype is not None else t)
        return t + self.class_embedder(class_labels)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: Tensor) -> Tensor:
    """Sin-cos embedding of positions ``pos`` (any shape, flattened to ``(M,)``) ->
    ``(M, embed_dim)`` float64: ``[sin, cos](pos * 10000 ** (-2 i / embed_dim))``."""
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / 10000 ** (omega / (embed_dim / 2.0))
    out = torch.outer(pos.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int,
    grid_size: int | tuple[int, int],
    cls_token: bool = False,
    extra_tokens: int = 0,
    interpolation_scale: float = 1.0,
    base_size: int = 16,
    device: torch.device | str | None = None,
) -> Tensor:
    """diffusers' 2-D sin-cos positional embedding of a ``(gh, gw)`` grid -> ``(gh * gw,
    embed_dim)`` float64, row-major over the grid. Coordinates are ``index / (size / base_size) /
    interpolation_scale`` (float32, as diffusers); the first half of the channels embeds the
    column coordinate, the second half the row coordinate. ``extra_tokens`` zero rows are
    prepended when ``cls_token``."""
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    rows = torch.arange(gh, dtype=torch.float32, device=device) / (gh / base_size)
    cols = torch.arange(gw, dtype=torch.float32, device=device) / (gw / base_size)
    rows, cols = rows / interpolation_scale, cols / interpolation_scale
    col_grid = cols[None, :].expand(gh, gw)
    row_grid = rows[:, None].expand(gh, gw)
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    emb = torch.cat(
        [
            get_1d_sincos_pos_embed_from_grid(embed_dim // 2, col_grid),
            get_1d_sincos_pos_embed_from_grid(embed_dim // 2, row_grid),
        ],
        dim=1,
    )
    if cls_token and extra_tokens > 0:
        emb = torch.cat([emb.new_zeros(extra_tokens, embed_dim), emb], dim=0)
    return emb


class PatchEmbed(nn.Module):
    """diffusers' ``PatchEmbed``: a ``patch_size``-strided conv ``proj``, then (with ``flatten``)
    ``(B, C, H, W)`` -> ``(B, H/p * W/p, embed_dim)``, an optional affine-free LayerNorm
    (eps 1e-6) and the 2-D sin-cos positional embedding. The ``pos_embed`` buffer (float32,
    ``(1, N, embed_dim)``) is in the ``state_dict`` only with ``pos_embed_max_size`` (then inputs
    take the centre crop of the larger grid), as in diffusers; inputs of another size than
    ``height x width`` without it get an embedding computed for their grid."""

    def __init__(
        self,
        height: int = 224,
        width: int = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dim: int = 768,
        layer_norm: bool = False,
        flatten: bool = True,
        bias: bool = True,
        interpolation_scale: float = 1,
        pos_embed_type: str | None = "sincos",
        pos_embed_max_size: int | None = None,
    ) -> None:
        super().__init__()
        if pos_embed_type not in (None, "sincos"):
            raise ValueError(
                f"PatchEmbed: pos_embed_type must be None or 'sincos', got {pos_embed_type!r}"
            )
        self.flatten, self.layer_norm = flatten, layer_norm
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.height, self.width = height // patch_size, width // patch_size
        self.base_size = height // patch_size
        self.interpolation_scale = interpolation_scale
        self.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size, bias=bias)
        self.norm = (
            nn.LayerNorm(embed_dim, elementwise_affine=False, eps=1e-6) if layer_norm else None
        )
        if pos_embed_type is None:
            self.pos_embed = None
        else:
            grid = pos_embed_max_size or int((self.height * self.width) ** 0.5)
            pos = get_2d_sincos_pos_embed(
                embed_dim, grid, base_size=self.base_size, interpolation_scale=interpolation_scale
            )
            self.register_buffer(
                "pos_embed", pos.float().unsqueeze(0), persistent=bool(pos_embed_max_size)
            )

    def _cropped_pos_embed(self, gh: int, gw: int) -> Tensor:
        size = self.pos_embed_max_size
        if gh > size or gw > size:
            raise ValueError(
                f"PatchEmbed: a {gh}x{gw} patch grid exceeds pos_embed_max_size {size}"
            )
        top, left = (size - gh) // 2, (size - gw) // 2
        grid = self.pos_embed.reshape(1, size, size, -1)[:, top : top + gh, left : left + gw]
        return grid.reshape(1, gh * gw, -1)

    def forward(self, latent: Tensor) -> Tensor:
        gh, gw = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
        x = self.proj(latent)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        if self.pos_embed is None:
            return x
        if self.pos_embed_max_size:
            pos = self._cropped_pos_embed(gh, gw)
        elif (gh, gw) != (self.height, self.width):
            pos = get_2d_sincos_pos_embed(
                self.pos_embed.shape[-1],
                (gh, gw),
                base_size=self.base_size,
                interpolation_scale=self.interpolation_scale,
                device=x.device,
            )
            pos = pos.float().unsqueeze(0)
        else:
            pos = self.pos_embed
        return (x + pos).to(x.dtype)
