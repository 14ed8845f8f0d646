"""Denoising U-Nets compatible with diffusers: :class:`UNet2DModel` (the pixel-space DDPM U-Net)
and :class:`UNet2DConditionModel` (Stable Diffusion 1.x/2.x's text-conditioned latent U-Net).

Both take diffusers' config (``from_config``), load diffusers' ``state_dict`` with no renaming
(``load_state_dict(strict=True)``) and read and write diffusers' on-disk layout
(``from_pretrained`` / ``save_pretrained``). Every GroupNorm is genext's fused GroupNorm(+SiLU)
and attention runs through genext's SDPA drop-in (its flash-attention kernel where it serves the
shapes; a padded-text mask reaches it as key lengths).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..nn import GroupNormSiLU
from ._blocks import UNetMidBlock2D, activation
from ._config import ModelOutput, PeerConfigMixin
from ._embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from ._unet_blocks import get_down_block, get_mid_block, get_up_block, key_padding_mask

__all__ = ["UNet2DConditionModel", "UNet2DConditionOutput", "UNet2DModel", "UNet2DOutput"]


class UNet2DOutput(ModelOutput):
    """``sample (B, out_channels, H, W)``."""

    _fields = ("sample",)


class UNet2DConditionOutput(ModelOutput):
    """``sample (B, out_channels, H, W)``."""

    _fields = ("sample",)


def _per_block(value: Any, n: int, name: str) -> list:
    """``value`` repeated for ``n`` blocks when it is a scalar, else as a list of length ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per down block ({n}), got {list(value)}")
        return list(value)
    return [value] * n


def _check_block_counts(down: Any, up: Any, channels: Any) -> None:
    if len(down) != len(up):
        raise ValueError(
            f"down_block_types and up_block_types must have the same length, got {len(down)} "
            f"and {len(up)}"
        )
    if len(channels) != len(down):
        raise ValueError(
            f"block_out_channels must have one entry per down block ({len(down)}), got "
            f"{list(channels)}"
        )


class _UNetBase(PeerConfigMixin, nn.Module):
    """What the two U-Nets share: running a block with optional gradient checkpointing."""

    gradient_checkpointing: bool

    def _set_checkpointing(self, on: bool) -> None:
        # whole blocks are checkpointed here; flagging the transformers inside them as well
        # would recompute their forward a second time in the backward
        self.gradient_checkpointing = on

    def _run(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)


class UNet2DModel(_UNetBase):
    """diffusers' ``UNet2DModel``: the DDPM/ADM-style U-Net on pixels (or LDM latents without
    text). ``forward(sample (B, in_channels, H, W), timestep, class_labels=None)`` ->
    :class:`UNet2DOutput` with ``sample (B, out_channels, H, W)`` (a tuple with
    ``return_dict=False``).

    Supported: down blocks ``DownBlock2D``/``AttnDownBlock2D``, up blocks
    ``UpBlock2D``/``AttnUpBlock2D`` (conv down/upsamplers), mid block ``UNetMidBlock2D`` (with
    ``add_attention`` and ``attn_norm_num_groups``) or None; ``time_embedding_type``
    ``"positional"``, ``"fourier"`` (the output is divided by the noise level, as diffusers) or
    ``"learned"``; ``class_embed_type`` None (with ``num_class_embeds``: a class table),
    ``"timestep"`` or ``"identity"``. The skip-connection blocks of the score-SDE models
    (``SkipDownBlock2D``...) and resnet down/upsamplers raise NotImplementedError.

    ``timestep``: a Python number (an int, as diffusers converts it), a 0-d tensor or a ``(B,)``
    tensor, broadcast over the batch.
    """

    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: tuple[str, ...] = (
            "DownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
            "AttnDownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2D",
        up_block_types: tuple[str, ...] = (
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "AttnUpBlock2D",
            "UpBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: int | None = 8,
        norm_num_groups: int | None = 32,
        attn_norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: str | None = None,
        num_class_embeds: int | None = None,
        num_train_timesteps: int | None = None,
    ) -> None:
        super().__init__()
        self._record_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        _check_block_counts(down_block_types, up_block_types, block_out_channels)
        if mid_block_type not in ("UNetMidBlock2D", None):
            raise NotImplementedError(
                f"UNet2DModel: mid_block_type must be 'UNetMidBlock2D' or None, got {mid_block_type!r}"
            )
        self.gradient_checkpointing = False
        c0 = block_out_channels[0]
        time_embed_dim = time_embedding_dim or c0 * 4
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)

        if time_embedding_type == "fourier":
            self.time_proj: nn.Module = GaussianFourierProjection(embedding_size=c0, scale=16)
            t_in = 2 * c0
        elif time_embedding_type == "positional":
            self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
            t_in = c0
        elif time_embedding_type == "learned":
            if num_train_timesteps is None:
                raise ValueError(
                    "UNet2DModel: time_embedding_type 'learned' needs num_train_timesteps"
                )
            self.time_proj = nn.Embedding(num_train_timesteps, c0)
            t_in = c0
        else:
            raise ValueError(
                "UNet2DModel: time_embedding_type must be 'positional', 'fourier' or 'learned', "
                f"got {time_embedding_type!r}"
            )
        self.time_embedding = TimestepEmbedding(t_in, time_embed_dim)

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding: nn.Module | None = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(t_in, time_embed_dim)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise NotImplementedError(
                "UNet2DModel: class_embed_type must be None, 'timestep' or 'identity', got "
                f"{class_embed_type!r}"
            )

        n = len(block_out_channels)
        common = dict(
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            dropout=dropout,
        )
        self.down_blocks = nn.ModuleList()
        out_ch = c0
        for i, name in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    name,
                    num_layers=layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    add_downsample=i < n - 1,
                    attention_head_dim=attention_head_dim or out_ch,
                    downsample_padding=downsample_padding,
                    downsample_type=downsample_type,
                    **common,
                )
            )

        self.mid_block = (
            UNetMidBlock2D(
                block_out_channels[-1],
                time_embed_dim,
                dropout=dropout,
                resnet_eps=norm_eps,
                resnet_act_fn=act_fn,
                output_scale_factor=mid_block_scale_factor,
                resnet_time_scale_shift=resnet_time_scale_shift,
                attention_head_dim=attention_head_dim or block_out_channels[-1],
                resnet_groups=norm_num_groups,
                attn_groups=attn_norm_num_groups,
                add_attention=add_attention,
            )
            if mid_block_type is not None
            else None
        )

        self.up_blocks = nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i, name in enumerate(up_block_types):
            prev, out_ch = out_ch, rev[i]
            self.up_blocks.append(
                get_up_block(
                    name,
                    num_layers=layers_per_block + 1,
                    in_channels=rev[min(i + 1, n - 1)],
                    out_channels=out_ch,
                    prev_output_channel=prev,
                    add_upsample=i < n - 1,
                    resolution_idx=i,
                    attention_head_dim=attention_head_dim or out_ch,
                    upsample_type=upsample_type,
                    **common,
                )
            )

        groups_out = norm_num_groups if norm_num_groups is not None else min(c0 // 4, 32)
        # diffusers' conv_norm_out + conv_act (always SiLU here) as one fused kernel
        self.conv_norm_out = GroupNormSiLU(groups_out, c0, norm_eps)
        self.conv_act = nn.Identity()
        self.conv_out = nn.Conv2d(c0, out_channels, 3, padding=1)

    def _timesteps(self, sample: Tensor, timestep: Tensor | float | int) -> Tensor:
        t = timestep
        if not torch.is_tensor(t):
            t = torch.tensor([t], dtype=torch.long, device=sample.device)
        elif t.dim() == 0:
            t = t[None].to(sample.device)
        return t * torch.ones(sample.shape[0], dtype=t.dtype, device=t.device)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        class_labels: Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[Tensor]:
        cfg = self.config
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        timesteps = self._timesteps(sample, timestep)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=self.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("UNet2DModel: class_labels are required with class conditioning")
            if cfg.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype=self.dtype)
            emb = emb + self.class_embedding(class_labels).to(dtype=self.dtype)
        elif class_labels is not None:
            raise ValueError(
                "UNet2DModel: class_labels given but the model has no class embedding "
                "(set num_class_embeds or class_embed_type)"
            )

        x = self.conv_in(sample)
        skips: tuple[Tensor, ...] = (x,)
        for block in self.down_blocks:
            x, res = self._run(block, x, emb)
            skips += res
        if self.mid_block is not None:
            x = self._run(self.mid_block, x, emb)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            x = self._run(block, x, res, emb)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        if cfg.time_embedding_type == "fourier":
            x = x / timesteps.reshape(x.shape[0], 1, 1, 1)
        return UNet2DOutput(sample=x) if return_dict else (x,)


class UNet2DConditionModel(_UNetBase):
    """diffusers' ``UNet2DConditionModel`` for Stable Diffusion 1.x/2.x: ``forward(sample (B,
    in_channels, H, W), timestep, encoder_hidden_states (B, L, cross_attention_dim),
    class_labels=None, encoder_attention_mask=None)`` -> :class:`UNet2DConditionOutput` with
    ``sample (B, out_channels, H, W)`` (a tuple with ``return_dict=False``).

    Supported config: down blocks ``CrossAttnDownBlock2D``/``DownBlock2D``/``AttnDownBlock2D``,
    up blocks ``CrossAttnUpBlock2D``/``UpBlock2D``/``AttnUpBlock2D``, mid block
    ``UNetMidBlock2DCrossAttn``/``UNetMidBlock2D``/None; ``layers_per_block``,
    ``attention_head_dim`` (which diffusers uses as the head count), ``cross_attention_dim``,
    ``only_cross_attention`` and ``transformer_layers_per_block`` as one value or one per block
    (``reverse_transformer_layers_per_block`` for the up blocks); ``use_linear_projection``,
    ``upcast_attention`` (no effect: the kernels accumulate in float32),
    ``resnet_time_scale_shift``, ``time_embedding_type`` ``"positional"``/``"fourier"``,
    ``time_embedding_dim``, ``time_embedding_act_fn``, ``timestep_post_act``,
    ``time_cond_proj_dim`` (``timestep_cond``), ``class_embed_type`` None (with
    ``num_class_embeds``)/``"timestep"``/``"identity"``/``"projection"``/``"simple_projection"``,
    ``class_embeddings_concat``, ``encoder_hid_dim`` with ``encoder_hid_dim_type="text_proj"``,
    ``conv_in_kernel``/``conv_out_kernel``, ``center_input_sample``, ControlNet residuals.

    Not supported (NotImplementedError naming the option): ``addition_embed_type`` (SDXL's
    ``text_time`` and the other added conditions) and ``added_cond_kwargs``, image projections
    (``encoder_hid_dim_type`` other than ``"text_proj"``), ``dual_cross_attention``, GLIGEN
    ``attention_type``, the ``SimpleCrossAttn``/``ResnetDownsample`` blocks, T2I-Adapter
    residuals, a self-attention ``attention_mask``. ``num_attention_heads`` must be None, as
    diffusers requires. Options that only the unsupported blocks read
    (``resnet_skip_time_act``, ``resnet_out_scale_factor``, ``cross_attention_norm``,
    ``mid_block_only_cross_attention``, ``addition_embed_type_num_heads``) are accepted and
    unused, as they are unused in diffusers for the supported blocks.

    ``encoder_attention_mask (B, L)``: boolean or 0/1, 1 = attend (padded text). diffusers turns
    it into an additive ``(1 - mask) * -10000`` bias; here it stays a boolean key mask with the
    same result (a prefix mask runs in genext's kernel as key lengths; an entry with no key kept
    attends to all keys, as the uniform bias does). ``timestep``: a Python number (float or
    int), a 0-d tensor or a ``(B,)`` tensor, broadcast over the batch.
    """

    def __init__(
        self,
        sample_size: int | tuple[int, int] | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        only_cross_attention: bool | tuple[bool, ...] = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        dropout: float = 0.0,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int | tuple[int, ...] = 1280,
        transformer_layers_per_block: int | tuple = 1,
        reverse_transformer_layers_per_block: tuple | None = None,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = None,
        attention_type: str = "default",
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
    ) -> None:
        super().__init__()
        self._record_config({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        if num_attention_heads is not None:
            raise ValueError(
                "UNet2DConditionModel: num_attention_heads must be None (diffusers reads the head "
                "count from attention_head_dim for this model)"
            )
        if addition_embed_type is not None:
            raise NotImplementedError(
                f"UNet2DConditionModel: addition_embed_type={addition_embed_type!r} (SDXL and "
                "other added conditions) is not supported"
            )
        if dual_cross_attention:
            raise NotImplementedError("UNet2DConditionModel: dual_cross_attention is not supported")
        if attention_type != "default":
            raise NotImplementedError(
                f"UNet2DConditionModel: attention_type={attention_type!r} is not supported"
            )
        _check_block_counts(down_block_types, up_block_types, block_out_channels)
        n = len(down_block_types)
        self.gradient_checkpointing = False
        c0 = block_out_channels[0]
        self.conv_in = nn.Conv2d(in_channels, c0, conv_in_kernel, padding=(conv_in_kernel - 1) // 2)

        if time_embedding_type == "fourier":
            time_embed_dim = time_embedding_dim or c0 * 2
            if time_embed_dim % 2 != 0:
                raise ValueError(f"time_embed_dim must be even, got {time_embed_dim}")
            self.time_proj: nn.Module = GaussianFourierProjection(
                time_embed_dim // 2, log=False, flip_sin_to_cos=flip_sin_to_cos
            )
            t_in = time_embed_dim
        elif time_embedding_type == "positional":
            time_embed_dim = time_embedding_dim or c0 * 4
            self.time_proj = Timesteps(c0, flip_sin_to_cos, freq_shift)
            t_in = c0
        else:
            raise ValueError(
                "UNet2DConditionModel: time_embedding_type must be 'positional' or 'fourier', got "
                f"{time_embedding_type!r}"
            )
        self.time_embedding = TimestepEmbedding(
            t_in,
            time_embed_dim,
            act_fn=act_fn,
            post_act_fn=timestep_post_act,
            cond_proj_dim=time_cond_proj_dim,
        )

        if encoder_hid_dim_type is None and encoder_hid_dim is not None:
            encoder_hid_dim_type = "text_proj"
            nn.Module.__setattr__(
                self,
                "config",
                type(self.config)({**self.config, "encoder_hid_dim_type": "text_proj"}),
            )
        if encoder_hid_dim_type is None:
            self.encoder_hid_proj = None
        elif encoder_hid_dim_type == "text_proj":
            if encoder_hid_dim is None:
                raise ValueError(
                    "encoder_hid_dim is required with encoder_hid_dim_type 'text_proj'"
                )
            self.encoder_hid_proj = nn.Linear(encoder_hid_dim, cross_attention_dim)
        else:
            raise NotImplementedError(
                f"UNet2DConditionModel: encoder_hid_dim_type={encoder_hid_dim_type!r} is not "
                "supported (only 'text_proj')"
            )

        if class_embed_type is None and num_class_embeds is not None:
            self.class_embedding: nn.Module | None = nn.Embedding(num_class_embeds, time_embed_dim)
        elif class_embed_type == "timestep":
            self.class_embedding = TimestepEmbedding(t_in, time_embed_dim, act_fn=act_fn)
        elif class_embed_type == "identity":
            self.class_embedding = nn.Identity()
        elif class_embed_type in ("projection", "simple_projection"):
            if projection_class_embeddings_input_dim is None:
                raise ValueError(
                    f"class_embed_type {class_embed_type!r} needs projection_class_embeddings_input_dim"
                )
            self.class_embedding = (
                TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
                if class_embed_type == "projection"
                else nn.Linear(projection_class_embeddings_input_dim, time_embed_dim)
            )
        elif class_embed_type is None:
            self.class_embedding = None
        else:
            raise NotImplementedError(
                f"UNet2DConditionModel: class_embed_type={class_embed_type!r} is not supported"
            )
        self.time_embed_act = (
            activation(time_embedding_act_fn) if time_embedding_act_fn is not None else None
        )

        only_cross = _per_block(only_cross_attention, n, "only_cross_attention")
        heads = _per_block(attention_head_dim, n, "attention_head_dim")
        cross_dims = _per_block(cross_attention_dim, n, "cross_attention_dim")
        layers = _per_block(layers_per_block, n, "layers_per_block")
        t_layers = _per_block(transformer_layers_per_block, n, "transformer_layers_per_block")
        if reverse_transformer_layers_per_block is None:
            if any(isinstance(v, (list, tuple)) for v in t_layers):
                raise ValueError(
                    "per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block"
                )
            rev_t_layers = list(reversed(t_layers))
        else:
            rev_t_layers = list(reverse_transformer_layers_per_block)
        temb = time_embed_dim * 2 if class_embeddings_concat else time_embed_dim

        def attn_args(i: int, reverse: bool = False) -> dict:
            j = n - 1 - i if reverse else i
            return dict(
                transformer_layers_per_block=rev_t_layers[i] if reverse else t_layers[i],
                num_attention_heads=heads[j],
                cross_attention_dim=cross_dims[j],
                use_linear_projection=use_linear_projection,
                only_cross_attention=only_cross[j],
                upcast_attention=upcast_attention,
            )

        common = dict(
            temb_channels=temb,
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            dropout=dropout,
        )
        self.down_blocks = nn.ModuleList()
        out_ch = c0
        for i, name in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            self.down_blocks.append(
                get_down_block(
                    name,
                    num_layers=layers[i],
                    in_channels=in_ch,
                    out_channels=out_ch,
                    add_downsample=i < n - 1,
                    downsample_padding=downsample_padding,
                    attention_head_dim=heads[i] if heads[i] is not None else out_ch,
                    **attn_args(i),
                    **common,
                )
            )

        self.mid_block = get_mid_block(
            mid_block_type,
            in_channels=block_out_channels[-1],
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=t_layers[-1],
            num_attention_heads=heads[-1],
            cross_attention_dim=cross_dims[-1],
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            **common,
        )

        self.num_upsamplers = 0
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(block_out_channels))
        out_ch = rev[0]
        for i, name in enumerate(up_block_types):
            prev, out_ch = out_ch, rev[i]
            add_up = i < n - 1
            self.num_upsamplers += int(add_up)
            self.up_blocks.append(
                get_up_block(
                    name,
                    num_layers=layers[n - 1 - i] + 1,
                    in_channels=rev[min(i + 1, n - 1)],
                    out_channels=out_ch,
                    prev_output_channel=prev,
                    add_upsample=add_up,
                    resolution_idx=i,
                    # diffusers indexes the unreversed head dims here
                    attention_head_dim=heads[i] if heads[i] is not None else out_ch,
                    **attn_args(i, reverse=True),
                    **common,
                )
            )

        if norm_num_groups is not None:
            # diffusers' conv_norm_out + conv_act, fused into one kernel for SiLU
            fused = act_fn in ("silu", "swish")
            self.conv_norm_out = GroupNormSiLU(
                norm_num_groups, c0, norm_eps, activation="silu" if fused else None
            )
            self.conv_act = nn.Identity() if fused else activation(act_fn)
        else:
            self.conv_norm_out = self.conv_act = None
        self.conv_out = nn.Conv2d(
            c0, out_channels, conv_out_kernel, padding=(conv_out_kernel - 1) // 2
        )

    def _time_embedding(
        self, sample: Tensor, timestep: Tensor | float | int, timestep_cond: Tensor | None
    ) -> Tensor:
        t = timestep
        if not torch.is_tensor(t):
            dtype = torch.float64 if isinstance(t, float) else torch.int64
            if sample.device.type == "mps" and dtype == torch.float64:
                dtype = torch.float32
            t = torch.tensor([t], dtype=dtype, device=sample.device)
        elif t.dim() == 0:
            t = t[None].to(sample.device)
        t = t.expand(sample.shape[0])
        return self.time_embedding(self.time_proj(t).to(dtype=sample.dtype), timestep_cond)

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor | None = None,
        class_labels: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
        *,
        timestep_cond: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Tensor] | None = None,
        down_block_additional_residuals: tuple[Tensor, ...] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        down_intrablock_additional_residuals: tuple[Tensor, ...] | None = None,
    ) -> UNet2DConditionOutput | tuple[Tensor]:
        """The denoiser's prediction for ``sample`` at ``timestep`` (see the class docstring).
        ``down_block_additional_residuals`` / ``mid_block_additional_residual``: ControlNet's
        outputs, added to the skip states and to the mid block's output."""
        if attention_mask is not None:
            raise NotImplementedError(
                "UNet2DConditionModel: a self-attention attention_mask is not supported "
                "(use encoder_attention_mask for padded text)"
            )
        if cross_attention_kwargs:
            raise NotImplementedError(
                f"UNet2DConditionModel: cross_attention_kwargs {sorted(cross_attention_kwargs)} "
                "are not supported"
            )
        if added_cond_kwargs:
            raise NotImplementedError(
                "UNet2DConditionModel: added_cond_kwargs are not supported (no addition_embed_type)"
            )
        controlnet = (
            down_block_additional_residuals is not None
            and mid_block_additional_residual is not None
        )
        if down_intrablock_additional_residuals is not None or (
            down_block_additional_residuals is not None and not controlnet
        ):
            raise NotImplementedError(
                "UNet2DConditionModel: T2I-Adapter residuals (down_intrablock_additional_residuals) "
                "are not supported"
            )
        cfg = self.config
        up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])
        mask = (
            key_padding_mask(encoder_attention_mask) if encoder_attention_mask is not None else None
        )
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self._time_embedding(sample, timestep, timestep_cond)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    "UNet2DConditionModel: class_labels are required with class conditioning"
                )
            if cfg.class_embed_type == "timestep":
                class_labels = self.time_proj(class_labels).to(dtype=sample.dtype)
            class_emb = self.class_embedding(class_labels).to(dtype=sample.dtype)
            emb = (
                torch.cat([emb, class_emb], dim=-1)
                if cfg.class_embeddings_concat
                else emb + class_emb
            )
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        ctx = encoder_hidden_states
        if self.encoder_hid_proj is not None:
            ctx = self.encoder_hid_proj(ctx)

        x = self.conv_in(sample)
        skips: tuple[Tensor, ...] = (x,)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = self._run(block, x, emb, ctx, mask)
            else:
                x, res = self._run(block, x, emb)
            skips += res
        if controlnet:
            skips = tuple(s + r for s, r in zip(skips, down_block_additional_residuals))
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                x = self._run(self.mid_block, x, emb, ctx, mask)
            else:
                x = self._run(self.mid_block, x, emb)
        if controlnet:
            x = x + mid_block_additional_residual

        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            if i < len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = tuple(skips[-1].shape[2:])
            if getattr(block, "has_cross_attention", False):
                x = self._run(block, x, res, emb, ctx, upsample_size, mask)
            else:
                x = self._run(block, x, res, emb, upsample_size)

        if self.conv_norm_out is not None:
            x = self.conv_act(self.conv_norm_out(x))
        x = self.conv_out(x)
        return UNet2DConditionOutput(sample=x) if return_dict else (x,)
