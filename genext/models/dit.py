"""DiT: the diffusion transformer of Peebles & Xie (diffusers' ``DiTTransformer2DModel``) and a
video variant on spacetime patches, both on genext's attention.

:class:`DiTTransformer2DModel` (also ``genext.models.DiT``) takes diffusers' config and loads
diffusers' ``state_dict`` with no renaming: ``pos_embed.proj`` (the patchify conv),
``transformer_blocks.N`` (adaLN-Zero :class:`BasicTransformerBlock`, each with its own timestep
and class embedding under ``norm1.emb``), ``proj_out_1`` (the final layer's shift and scale) and
``proj_out_2`` (tokens back to patches).

:class:`VideoDiT` has no peer: a ``(B, C, T, H, W)`` latent video is cut into spacetime patches
by a Conv3d of kernel = stride = ``(patch_size_t, patch_size, patch_size)``, given a fixed 3-D
sin-cos position (:func:`get_3d_sincos_pos_embed`), and attended over all of its tokens at once
(full spacetime attention, no split into spatial and temporal layers); blocks, conditioning and
final layer are the image model's, under the same names.

Both denoise with classifier-free guidance through :meth:`forward_with_cfg`; the "no class" label
is ``num_embeds_ada_norm`` (the extra row of every class-embedding table).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ._config import ModelOutput, PeerConfigMixin
from ._embeddings import PatchEmbed, get_1d_sincos_pos_embed_from_grid
from ._transformer import BasicTransformerBlock

__all__ = [
    "DiT",
    "DiTTransformer2DModel",
    "SpacetimePatchEmbed",
    "Transformer2DModelOutput",
    "VideoDiT",
    "get_3d_sincos_pos_embed",
]


class Transformer2DModelOutput(ModelOutput):
    """``sample``: the model's prediction, ``(B, out_channels, H, W)`` (``(B, out_channels, T,
    H, W)`` for :class:`VideoDiT`)."""

    _fields = ("sample",)


def _per_sample(value: int | float | Tensor, batch: int, name: str, device: torch.device) -> Tensor:
    """``value`` as a ``(batch,)`` tensor: a Python number, a 0-d or one-element tensor is
    repeated for every sample; a ``(batch,)`` tensor is kept."""
    value = torch.as_tensor(value, device=device)
    if value.dim() == 0 or value.shape == (1,):
        return value.reshape(1).expand(batch)
    if value.shape != (batch,):
        raise ValueError(
            f"{name} must be a number, a 0-d tensor or a ({batch},) tensor for a batch of "
            f"{batch}, got shape {tuple(value.shape)}"
        )
    return value


class _AdaLNZeroDiT(PeerConfigMixin, nn.Module):
    """What the image and the video DiT share: the adaLN-Zero blocks, the final layer and
    classifier-free guidance. Subclasses build ``pos_embed`` and define ``forward``."""

    gradient_checkpointing: bool

    def _build_transformer(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        num_layers: int,
        dropout: float,
        attention_bias: bool,
        activation_fn: str,
        num_embeds_ada_norm: int | None,
        norm_type: str,
        norm_elementwise_affine: bool,
        norm_eps: float,
        patch_volume: int,
    ) -> None:
        name = type(self).__name__
        if norm_type != "ada_norm_zero":
            raise NotImplementedError(
                f"{name}: norm_type must be 'ada_norm_zero', got {norm_type!r}"
            )
        if num_embeds_ada_norm is None:
            raise ValueError(f"{name}: num_embeds_ada_norm (the class count) must not be None")
        inner = num_attention_heads * attention_head_dim
        self.inner_dim = inner
        self.gradient_checkpointing = False
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                activation_fn=activation_fn,
                num_embeds_ada_norm=num_embeds_ada_norm,
                attention_bias=attention_bias,
                norm_type=norm_type,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(inner, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(inner, 2 * inner)
        self.proj_out_2 = nn.Linear(inner, patch_volume * self.out_channels)

    @property
    def null_class_id(self) -> int:
        """The label of the "no class" embedding (the last row of each class table) that
        classifier-free guidance conditions the unguided half on."""
        return self.config.num_embeds_ada_norm

    def _denoise_tokens(self, x: Tensor, timestep: Tensor, class_labels: Tensor) -> Tensor:
        """Tokens ``(B, L, inner_dim)`` through the blocks and the final layer ->
        ``(B, L, patch_volume * out_channels)``."""
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(
                    block, x, None, None, None, timestep, class_labels, use_reentrant=False
                )
            else:
                x = block(x, timestep=timestep, class_labels=class_labels)
        # the final layer's shift and scale come from the first block's conditioning embedding,
        # recomputed here (diffusers' DiT has no embedding of its own for the final layer)
        emb = self.transformer_blocks[0].norm1.emb(timestep, class_labels, hidden_dtype=x.dtype)
        shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        return self.proj_out_2(x)

    def _conditioning(
        self, hidden_states: Tensor, timestep: int | float | Tensor, class_labels: int | Tensor
    ) -> tuple[Tensor, Tensor]:
        if class_labels is None:
            raise ValueError(f"{type(self).__name__}: class_labels is required")
        b, dev = hidden_states.shape[0], hidden_states.device
        return (
            _per_sample(timestep, b, "timestep", dev),
            _per_sample(class_labels, b, "class_labels", dev),
        )

    def forward_with_cfg(
        self,
        hidden_states: Tensor,
        timestep: int | float | Tensor,
        class_labels: int | Tensor,
        guidance_scale: float,
        guided_channels: int | None = None,
    ) -> Tensor:
        """Classifier-free guidance in one batched call: the model runs on ``hidden_states``
        twice, with ``class_labels`` and with the "no class" label :attr:`null_class_id`, and
        returns ``uncond + guidance_scale * (cond - uncond)`` on the first ``guided_channels``
        output channels (the noise prediction) and the conditional output on the rest (the
        learned variance). ``guided_channels`` defaults to ``in_channels``, as diffusers'
        ``DiTPipeline`` guides; ``guided_channels=3`` reproduces the original DiT sampler
        (facebookresearch/DiT ``forward_with_cfg``), which guides only the first three of the
        four latent channels. Unlike that function, which takes an already doubled batch,
        this one takes the ``B`` samples once.

        ``hidden_states (B, C, H, W)`` (or ``(B, C, T, H, W)``), ``timestep`` as in
        :meth:`forward`, ``class_labels (B,)`` -> ``(B, out_channels, ...)``."""
        k = self.config.in_channels if guided_channels is None else guided_channels
        if not 0 < k <= self.out_channels:
            raise ValueError(
                f"guided_channels must be in 1..{self.out_channels} (out_channels), got {k}"
            )
        timestep, class_labels = self._conditioning(hidden_states, timestep, class_labels)
        null = torch.full_like(class_labels, self.null_class_id)
        out = self(
            torch.cat([hidden_states, hidden_states]),
            torch.cat([timestep, timestep]),
            torch.cat([class_labels, null]),
        ).sample
        cond, uncond = out.chunk(2)
        guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


class DiTTransformer2DModel(_AdaLNZeroDiT):
    """diffusers' ``DiTTransformer2DModel`` (DiT, Peebles & Xie 2023): a class-conditional
    latent denoiser made of a patchify conv with a fixed 2-D sin-cos position, ``num_layers``
    adaLN-Zero transformer blocks and a modulated final layer. Also exported as
    ``genext.models.DiT``.

    Config fields are diffusers': ``out_channels`` defaults to ``in_channels`` (DiT's
    checkpoints learn the variance: ``out_channels = 2 * in_channels``); ``num_embeds_ada_norm``
    is the class count (each table has one more row, the "no class" label);
    ``norm_num_groups`` and ``upcast_attention`` are accepted and have no effect, as in
    diffusers (there is no GroupNorm, and attention accumulates in float32 already);
    ``norm_type`` must be ``"ada_norm_zero"``.

    In training mode every block's class embedding drops labels to the "no class" label with
    probability 0.1 on its own draw, as diffusers' model does.
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self._record_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        del norm_num_groups, upcast_attention
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size = patch_size
        self.pos_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=num_attention_heads * attention_head_dim,
        )
        self._build_transformer(
            num_attention_heads,
            attention_head_dim,
            num_layers,
            dropout,
            attention_bias,
            activation_fn,
            num_embeds_ada_norm,
            norm_type,
            norm_elementwise_affine,
            norm_eps,
            patch_volume=patch_size * patch_size,
        )

    def forward(
        self,
        hidden_states: Tensor,
        timestep: int | float | Tensor,
        class_labels: int | Tensor,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """``hidden_states (B, in_channels, H, W)`` with ``H`` and ``W`` multiples of
        ``patch_size`` (other sizes than ``sample_size`` get a position embedding computed for
        their grid, as diffusers' ``PatchEmbed`` does; non-square inputs are unpatchified on
        their own grid, where diffusers assumes a square one); ``timestep``: a number, a 0-d or
        a ``(B,)`` tensor (integer or fractional); ``class_labels``: a ``(B,)`` integer tensor
        (or one label for all) in ``0..num_embeds_ada_norm``, the last being "no class" ->
        ``.sample (B, out_channels, H, W)`` (a 1-tuple with ``return_dict=False``).
        ``cross_attention_kwargs`` stands where diffusers has it; only None or empty is
        accepted (the DiT has no attention processor options)."""
        if cross_attention_kwargs:
            raise NotImplementedError(
                "DiT: cross_attention_kwargs are not supported, got "
                f"{sorted(cross_attention_kwargs)}"
            )
        if hidden_states.dim() != 4 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be (B, {self.config.in_channels}, H, W), got shape "
                f"{tuple(hidden_states.shape)}"
            )
        p = self.patch_size
        b, _, h, w = hidden_states.shape
        if h % p or w % p:
            raise ValueError(
                f"hidden_states: height and width must be multiples of patch_size {p}, got {h}x{w}"
            )
        timestep, class_labels = self._conditioning(hidden_states, timestep, class_labels)
        tokens = self._denoise_tokens(self.pos_embed(hidden_states), timestep, class_labels)
        # each token holds its patch as (row, column, channel)
        out = tokens.reshape(b, h // p, w // p, p, p, self.out_channels)
        out = out.permute(0, 5, 1, 3, 2, 4).reshape(b, self.out_channels, h, w)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


DiT = DiTTransformer2DModel


def get_3d_sincos_pos_embed(
    embed_dim: int,
    grid_size: tuple[int, int, int],
    spatial_interpolation_scale: float = 1.0,
    temporal_interpolation_scale: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Fixed sin-cos position of each cell of a ``(t, h, w)`` grid of spacetime patches ->
    ``(t * h * w, embed_dim)`` float64, rows in ``(frame, row, column)`` order.

    The channels are split as CogVideoX does (diffusers' ``get_3d_sincos_pos_embed``, whose
    values these equal): the first ``embed_dim / 4`` embed the frame index, the other
    ``3 * embed_dim / 4`` are the 2-D embedding of the image DiT for the patch's place in its
    frame (half of them the column, half the row). Coordinates are the indices divided by the
    interpolation scales. Each 1-D part is ``[sin, cos](pos * 10000 ** (-2 i / d))``, so
    ``embed_dim`` must be a multiple of 16 (every part an even width)."""
    if embed_dim % 16 != 0:
        raise ValueError(f"embed_dim must be a multiple of 16, got {embed_dim}")
    t, h, w = grid_size
    d_t, d_s = embed_dim // 4, 3 * embed_dim // 4
    frames = torch.arange(t, dtype=torch.float32, device=device) / temporal_interpolation_scale
    rows = torch.arange(h, dtype=torch.float32, device=device) / spatial_interpolation_scale
    cols = torch.arange(w, dtype=torch.float32, device=device) / spatial_interpolation_scale
    temporal = get_1d_sincos_pos_embed_from_grid(d_t, frames)  # (t, d_t)
    col = get_1d_sincos_pos_embed_from_grid(d_s // 2, cols)  # (w, d_s / 2)
    row = get_1d_sincos_pos_embed_from_grid(d_s // 2, rows)  # (h, d_s / 2)
    return torch.cat(
        [
            temporal[:, None, None].expand(t, h, w, d_t),
            col[None, None, :].expand(t, h, w, d_s // 2),
            row[None, :, None].expand(t, h, w, d_s // 2),
        ],
        dim=-1,
    ).reshape(t * h * w, embed_dim)


class SpacetimePatchEmbed(nn.Module):
    """Spacetime patches: a Conv3d ``proj`` of kernel = stride = ``(patch_size_t, patch_size,
    patch_size)``, then ``(B, C, T, H, W)`` -> ``(B, T/pt * H/p * W/p, embed_dim)`` tokens in
    ``(frame, row, column)`` order, plus :func:`get_3d_sincos_pos_embed` of the patch grid.
    The embedding of the configured grid is a buffer outside the ``state_dict``; other grids
    get theirs computed per call (positions are patch indices either way)."""

    def __init__(
        self,
        num_frames: int,
        height: int,
        width: int,
        patch_size: int,
        patch_size_t: int,
        in_channels: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.patch = (patch_size_t, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, self.patch, stride=self.patch)
        self.grid = (num_frames // patch_size_t, height // patch_size, width // patch_size)
        pos = get_3d_sincos_pos_embed(embed_dim, self.grid)
        self.register_buffer("pos_embed", pos.float().unsqueeze(0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        grid = tuple(n // k for n, k in zip(x.shape[-3:], self.patch))
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        if grid == self.grid:
            pos = self.pos_embed
        else:
            pos = get_3d_sincos_pos_embed(tokens.shape[-1], grid, device=x.device)
            pos = pos.float().unsqueeze(0)
        return (tokens + pos).to(tokens.dtype)


class VideoDiT(_AdaLNZeroDiT):
    """DiT on spacetime patches (no peer): the image model's adaLN-Zero blocks, timestep and
    class conditioning and final layer, over the tokens of a ``(B, C, T, H, W)`` latent video
    cut into ``patch_size_t x patch_size x patch_size`` patches by a Conv3d
    (:class:`SpacetimePatchEmbed`), every token attending to every other.

    The keys are the image model's, except that ``pos_embed.proj.weight`` is a Conv3d kernel
    ``(D, C, pt, p, p)`` and ``proj_out_2`` outputs ``pt * p * p * out_channels`` per token.
    With ``num_frames = patch_size_t = 1`` the model computes what
    :class:`DiTTransformer2DModel` computes with the same weights (the Conv3d kernel's one frame
    as the Conv2d kernel) except for the position: the 3-D embedding spends a quarter of the
    channels on the frame index (``[0, ..., 0, 1, ..., 1]`` at frame 0) and embeds the 2-D
    position in the other three quarters, so it is not the image model's 2-D embedding.

    ``inner_dim = num_attention_heads * attention_head_dim`` must be a multiple of 16 (the
    split of :func:`get_3d_sincos_pos_embed`); ``num_frames`` and ``sample_size`` are the
    configured latent size, whose position embedding is stored once.
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_size: int = 32,
        num_frames: int = 16,
        patch_size: int = 2,
        patch_size_t: int = 1,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        norm_type: str = "ada_norm_zero",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self._record_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        inner = num_attention_heads * attention_head_dim
        if inner % 16 != 0:
            raise ValueError(
                "VideoDiT: num_attention_heads * attention_head_dim must be a multiple of 16 "
                f"(the 3-D position embedding's split), got {inner}"
            )
        self.out_channels = in_channels if out_channels is None else out_channels
        self.patch_size, self.patch_size_t = patch_size, patch_size_t
        self.pos_embed = SpacetimePatchEmbed(
            num_frames, sample_size, sample_size, patch_size, patch_size_t, in_channels, inner
        )
        self._build_transformer(
            num_attention_heads,
            attention_head_dim,
            num_layers,
            dropout,
            attention_bias,
            activation_fn,
            num_embeds_ada_norm,
            norm_type,
            norm_elementwise_affine,
            norm_eps,
            patch_volume=patch_size_t * patch_size * patch_size,
        )

    def forward(
        self,
        hidden_states: Tensor,
        timestep: int | float | Tensor,
        class_labels: int | Tensor,
        cross_attention_kwargs: dict | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        """``hidden_states (B, in_channels, T, H, W)`` with ``T`` a multiple of
        ``patch_size_t`` and ``H``, ``W`` of ``patch_size``; ``timestep`` and ``class_labels``
        as :meth:`DiTTransformer2DModel.forward` takes them -> ``.sample (B, out_channels, T,
        H, W)`` (a 1-tuple with ``return_dict=False``)."""
        if hidden_states.dim() != 5 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"hidden_states must be (B, {self.config.in_channels}, T, H, W), got shape "
                f"{tuple(hidden_states.shape)}"
            )
        b, _, t, h, w = hidden_states.shape
        pt, p = self.patch_size_t, self.patch_size
        if t % pt or h % p or w % p:
            raise ValueError(
                f"hidden_states: frames must be a multiple of patch_size_t {pt} and height and "
                f"width of patch_size {p}, got {t}x{h}x{w}"
            )
        timestep, class_labels = self._conditioning(hidden_states, timestep, class_labels)
        tokens = self._denoise_tokens(self.pos_embed(hidden_states), timestep, class_labels)
        # each token holds its patch as (frame, row, column, channel)
        out = tokens.reshape(b, t // pt, h // p, w // p, pt, p, p, self.out_channels)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, t, h, w)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    @property
    def num_patches(self) -> int:
        """Tokens of a video of the configured size."""
        return math.prod(self.pos_embed.grid)
