"""The U-Net's down, mid and up blocks and its spatial transformer, with diffusers' module names
and ``state_dict`` keys (``diffusers.models.unets.unet_2d_blocks``,
``diffusers.models.transformers.transformer_2d``).

Each block returns what diffusers' returns: a down block ``(hidden_states, skip states)``, an up
block the hidden states after consuming its share of the skip states. GroupNorms are
:class:`~genext.nn.GroupNormSiLU`, attention runs through genext's SDPA drop-in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import GroupNormSiLU
from ._blocks import Attention, Downsample2D, ResnetBlock2D, UNetMidBlock2D, Upsample2D
from ._config import ModelOutput
from ._transformer import BasicTransformerBlock

__all__ = [
    "AttnDownBlock2D",
    "AttnUpBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnUpBlock2D",
    "DownBlock2D",
    "Transformer2DModel",
    "Transformer2DModelOutput",
    "UNetMidBlock2D",
    "UNetMidBlock2DCrossAttn",
    "UpBlock2D",
    "get_down_block",
    "get_mid_block",
    "get_up_block",
    "key_padding_mask",
]


def key_padding_mask(mask: Tensor) -> Tensor:
    """A boolean key mask (True = attend) equal in effect to diffusers' additive bias
    ``(1 - mask) * -10000`` of a boolean or 0/1 ``mask (B, Lk)``: keys with ``mask == 1`` are kept.
    A row that keeps no key attends to all keys, as the uniform bias does in diffusers. A prefix
    mask (padded text) stays a prefix mask, which genext's attention kernel serves."""
    keep = mask if mask.dtype == torch.bool else mask == 1
    return keep | ~keep.any(dim=-1, keepdim=True)


def _no_dual(dual_cross_attention: bool, where: str) -> None:
    if dual_cross_attention:
        raise NotImplementedError(f"{where}: dual_cross_attention=True is not supported")


def _no_attention_type(attention_type: str, where: str) -> None:
    if attention_type != "default":
        raise NotImplementedError(
            f"{where}: attention_type must be 'default', got {attention_type!r}"
        )


class Transformer2DModelOutput(ModelOutput):
    """``sample (B, C, H, W)``."""

    _fields = ("sample",)


class Transformer2DModel(nn.Module):
    """diffusers' ``Transformer2DModel`` for continuous ``(B, C, H, W)`` input (Stable
    Diffusion's spatial transformer): GroupNorm (``norm``, eps 1e-6), ``proj_in`` (1x1 conv, or a
    Linear over the flattened positions with ``use_linear_projection``), ``num_layers``
    :class:`BasicTransformerBlock` (``transformer_blocks``), ``proj_out``, plus the input.

    Discrete (``num_vector_embeds``) and patch (``patch_size``) inputs are not supported: DiT is
    :mod:`genext.models.dit`. ``encoder_attention_mask``: a ``(B, Lk)`` boolean or 0/1 mask (see
    :func:`key_padding_mask`) or an already-formed ``(B, 1, Lk)`` mask or bias.
    """

    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 88,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_layers: int = 1,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = None,
        attention_bias: bool = False,
        sample_size: int | None = None,
        num_vector_embeds: int | None = None,
        patch_size: int | None = None,
        activation_fn: str = "geglu",
        num_embeds_ada_norm: int | None = None,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        double_self_attention: bool = False,
        upcast_attention: bool = False,
        norm_type: str = "layer_norm",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        attention_type: str = "default",
    ) -> None:
        super().__init__()
        del sample_size
        if num_vector_embeds is not None or patch_size is not None:
            raise NotImplementedError(
                "Transformer2DModel: only continuous (B, C, H, W) input is supported "
                "(num_vector_embeds and patch_size must be None; DiT is genext.models.dit)"
            )
        if in_channels is None:
            raise ValueError("Transformer2DModel: in_channels is required")
        if norm_type != "layer_norm" or num_embeds_ada_norm is not None:
            raise NotImplementedError(
                "Transformer2DModel: continuous input supports norm_type 'layer_norm' without "
                f"num_embeds_ada_norm, got norm_type={norm_type!r}, "
                f"num_embeds_ada_norm={num_embeds_ada_norm!r}"
            )
        _no_attention_type(attention_type, "Transformer2DModel")
        inner = num_attention_heads * attention_head_dim
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.use_linear_projection = use_linear_projection
        self.gradient_checkpointing = False
        self.norm = GroupNormSiLU(norm_num_groups, in_channels, 1e-6, activation=None)
        if use_linear_projection:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner)
            self.proj_out: nn.Module = nn.Linear(inner, self.out_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, self.out_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                activation_fn=activation_fn,
                attention_bias=attention_bias,
                only_cross_attention=only_cross_attention,
                double_self_attention=double_self_attention,
                upcast_attention=upcast_attention,
                norm_elementwise_affine=norm_elementwise_affine,
                norm_eps=norm_eps,
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        timestep: Tensor | None = None,
        class_labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        out = self.apply_to(
            hidden_states, encoder_hidden_states, attention_mask, encoder_attention_mask
        )
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def apply_to(
        self,
        x: Tensor,
        context: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The forward as a plain tensor: ``x (B, C, H, W)`` -> ``(B, out_channels, H, W)``."""
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = key_padding_mask(attention_mask)
        if encoder_attention_mask is not None and encoder_attention_mask.dim() == 2:
            encoder_attention_mask = key_padding_mask(encoder_attention_mask)
        b, _, hgt, wid = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(b, hgt * wid, -1))
        else:
            h = self.proj_in(h)
            h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, -1)
        for block in self.transformer_blocks:
            args = (h, attention_mask, context, encoder_attention_mask)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(b, hgt, wid, -1).permute(0, 3, 1, 2).contiguous()
        else:
            h = self.proj_out(h.reshape(b, hgt, wid, -1).permute(0, 3, 1, 2).contiguous())
        return h + x


def _resnet(
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    eps: float,
    groups: int,
    dropout: float,
    time_scale_shift: str,
    act: str,
    output_scale_factor: float,
    groups_out: int | None = None,
) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        eps=eps,
        groups=groups,
        groups_out=groups_out,
        dropout=dropout,
        time_embedding_norm=time_scale_shift,
        non_linearity=act,
        output_scale_factor=output_scale_factor,
    )


def _per_layer(value: int | list[int] | tuple[int, ...], num_layers: int) -> list[int]:
    return [value] * num_layers if isinstance(value, int) else list(value)


def _spatial_attention(
    channels: int,
    num_attention_heads: int,
    layers: int,
    cross_attention_dim: int | None,
    groups: int,
    use_linear_projection: bool,
    only_cross_attention: bool,
    upcast_attention: bool,
) -> Transformer2DModel:
    return Transformer2DModel(
        num_attention_heads,
        channels // num_attention_heads,
        in_channels=channels,
        num_layers=layers,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=groups,
        use_linear_projection=use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast_attention=upcast_attention,
    )


def _image_attention(
    channels: int, head_dim: int | None, eps: float, groups: int, output_scale_factor: float
) -> Attention:
    """The pixel U-Net's self-attention over an image (diffusers' ``Attention`` with a
    GroupNorm, biases and a residual)."""
    head_dim = channels if head_dim is None else head_dim
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        rescale_output_factor=output_scale_factor,
        eps=eps,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
    )


class DownBlock2D(nn.Module):
    """diffusers' ``DownBlock2D``: ``num_layers`` ResNet blocks with the timestep embedding, then
    an optional stride-2 conv (``downsamplers.0``). ``x (B, in, H, W)``, ``temb (B, T)`` ->
    ``(h, skips)``: every ResNet output and the downsampled one."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ) -> None:
        super().__init__()
        del resnet_pre_norm
        self.resnets = nn.ModuleList(
            _resnet(
                in_channels if i == 0 else out_channels,
                out_channels,
                temb_channels,
                resnet_eps,
                resnet_groups,
                dropout,
                resnet_time_scale_shift,
                resnet_act_fn,
                output_scale_factor,
            )
            for i in range(num_layers)
        )
        self.downsamplers = (
            nn.ModuleList(
                [Downsample2D(out_channels, True, out_channels, downsample_padding, name="op")]
            )
            if add_downsample
            else None
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        skips: tuple[Tensor, ...] = ()
        for resnet in self.resnets:
            x = resnet(x, temb)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class AttnDownBlock2D(DownBlock2D):
    """diffusers' ``AttnDownBlock2D`` (pixel U-Net): each ResNet block followed by a
    self-attention over the image with heads of ``attention_head_dim`` channels. Only the conv
    downsampler (``downsample_type="conv"`` or None) is supported."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        downsample_type: str | None = "conv",
    ) -> None:
        if downsample_type not in ("conv", None):
            raise NotImplementedError(
                f"AttnDownBlock2D: downsample_type must be 'conv' or None, got {downsample_type!r}"
            )
        super().__init__(
            in_channels,
            out_channels,
            temb_channels,
            dropout,
            num_layers,
            resnet_eps,
            resnet_time_scale_shift,
            resnet_act_fn,
            resnet_groups,
            resnet_pre_norm,
            output_scale_factor,
            downsample_type == "conv",
            downsample_padding,
        )
        self.attentions = nn.ModuleList(
            _image_attention(
                out_channels, attention_head_dim, resnet_eps, resnet_groups, output_scale_factor
            )
            for _ in range(num_layers)
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
        skips: tuple[Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(x, temb))
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """diffusers' ``CrossAttnDownBlock2D`` (Stable Diffusion): each ResNet block followed by a
    :class:`Transformer2DModel` with ``num_attention_heads`` heads of ``out_channels //
    num_attention_heads`` channels and ``transformer_layers_per_block`` (int or per layer)
    transformer blocks attending to the text. ``forward(x, temb, encoder_hidden_states,
    encoder_attention_mask)`` -> ``(h, skips)``."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        downsample_padding: int = 1,
        add_downsample: bool = True,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        attention_type: str = "default",
    ) -> None:
        _no_dual(dual_cross_attention, "CrossAttnDownBlock2D")
        _no_attention_type(attention_type, "CrossAttnDownBlock2D")
        super().__init__(
            in_channels,
            out_channels,
            temb_channels,
            dropout,
            num_layers,
            resnet_eps,
            resnet_time_scale_shift,
            resnet_act_fn,
            resnet_groups,
            resnet_pre_norm,
            output_scale_factor,
            add_downsample,
            downsample_padding,
        )
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.attentions = nn.ModuleList(
            _spatial_attention(
                out_channels,
                num_attention_heads,
                layers[i],
                cross_attention_dim,
                resnet_groups,
                use_linear_projection,
                only_cross_attention,
                upcast_attention,
            )
            for i in range(num_layers)
        )

    def forward(
        self,
        x: Tensor,
        temb: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        skips: tuple[Tensor, ...] = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(x, temb)
            x = attn.apply_to(x, encoder_hidden_states, None, encoder_attention_mask)
            skips += (x,)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips += (x,)
        return x, skips


class UpBlock2D(nn.Module):
    """diffusers' ``UpBlock2D``: ``num_layers`` ResNet blocks, each on the concatenation of the
    hidden states and the last remaining skip state, then an optional nearest x2 upsampler with
    a conv (to ``upsample_size`` when given). ``forward(x, skips, temb, upsample_size)``."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int | None,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
    ) -> None:
        super().__init__()
        del resolution_idx, resnet_pre_norm
        self.resnets = nn.ModuleList(
            _resnet(
                (prev_output_channel if i == 0 else out_channels)
                + (in_channels if i == num_layers - 1 else out_channels),
                out_channels,
                temb_channels,
                resnet_eps,
                resnet_groups,
                dropout,
                resnet_time_scale_shift,
                resnet_act_fn,
                output_scale_factor,
            )
            for i in range(num_layers)
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )

    def _upsample(self, x: Tensor, upsample_size: tuple[int, int] | None) -> Tensor:
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x

    def forward(
        self,
        x: Tensor,
        res_hidden_states_tuple: tuple[Tensor, ...],
        temb: Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> Tensor:
        skips = list(res_hidden_states_tuple)
        for resnet in self.resnets:
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
        return self._upsample(x, upsample_size)


class AttnUpBlock2D(UpBlock2D):
    """diffusers' ``AttnUpBlock2D`` (pixel U-Net): :class:`UpBlock2D` with a self-attention
    after each ResNet block. Only the conv upsampler (``upsample_type="conv"`` or None) is
    supported; as in diffusers it ignores ``upsample_size``."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channel: int,
        out_channels: int,
        temb_channels: int | None,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
        upsample_type: str | None = "conv",
    ) -> None:
        if upsample_type not in ("conv", None):
            raise NotImplementedError(
                f"AttnUpBlock2D: upsample_type must be 'conv' or None, got {upsample_type!r}"
            )
        super().__init__(
            in_channels,
            prev_output_channel,
            out_channels,
            temb_channels,
            resolution_idx,
            dropout,
            num_layers,
            resnet_eps,
            resnet_time_scale_shift,
            resnet_act_fn,
            resnet_groups,
            resnet_pre_norm,
            output_scale_factor,
            upsample_type == "conv",
        )
        self.attentions = nn.ModuleList(
            _image_attention(
                out_channels, attention_head_dim, resnet_eps, resnet_groups, output_scale_factor
            )
            for _ in range(num_layers)
        )

    def forward(
        self,
        x: Tensor,
        res_hidden_states_tuple: tuple[Tensor, ...],
        temb: Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> Tensor:
        skips = list(res_hidden_states_tuple)
        for resnet, attn in zip(self.resnets, self.attentions):
            x = attn(resnet(torch.cat([x, skips.pop()], dim=1), temb))
        return self._upsample(x, None)


class CrossAttnUpBlock2D(UpBlock2D):
    """diffusers' ``CrossAttnUpBlock2D`` (Stable Diffusion): :class:`UpBlock2D` with a
    :class:`Transformer2DModel` after each ResNet block (see :class:`CrossAttnDownBlock2D`)."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        prev_output_channel: int,
        temb_channels: int | None,
        resolution_idx: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int = 32,
        resnet_pre_norm: bool = True,
        num_attention_heads: int = 1,
        cross_attention_dim: int = 1280,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        only_cross_attention: bool = False,
        upcast_attention: bool = False,
        attention_type: str = "default",
    ) -> None:
        _no_dual(dual_cross_attention, "CrossAttnUpBlock2D")
        _no_attention_type(attention_type, "CrossAttnUpBlock2D")
        super().__init__(
            in_channels,
            prev_output_channel,
            out_channels,
            temb_channels,
            resolution_idx,
            dropout,
            num_layers,
            resnet_eps,
            resnet_time_scale_shift,
            resnet_act_fn,
            resnet_groups,
            resnet_pre_norm,
            output_scale_factor,
            add_upsample,
        )
        layers = _per_layer(transformer_layers_per_block, num_layers)
        self.attentions = nn.ModuleList(
            _spatial_attention(
                out_channels,
                num_attention_heads,
                layers[i],
                cross_attention_dim,
                resnet_groups,
                use_linear_projection,
                only_cross_attention,
                upcast_attention,
            )
            for i in range(num_layers)
        )

    def forward(
        self,
        x: Tensor,
        res_hidden_states_tuple: tuple[Tensor, ...],
        temb: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        upsample_size: tuple[int, int] | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        skips = list(res_hidden_states_tuple)
        for resnet, attn in zip(self.resnets, self.attentions):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            x = attn.apply_to(x, encoder_hidden_states, None, encoder_attention_mask)
        return self._upsample(x, upsample_size)


class UNetMidBlock2DCrossAttn(nn.Module):
    """diffusers' ``UNetMidBlock2DCrossAttn``: a ResNet block, then ``num_layers`` x
    (:class:`Transformer2DModel`, ResNet block). ``forward(x, temb, encoder_hidden_states,
    encoder_attention_mask)``."""

    has_cross_attention = True

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None,
        out_channels: int | None = None,
        dropout: float = 0.0,
        num_layers: int = 1,
        transformer_layers_per_block: int | list[int] = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "swish",
        resnet_groups: int | None = 32,
        resnet_groups_out: int | None = None,
        resnet_pre_norm: bool = True,
        num_attention_heads: int = 1,
        output_scale_factor: float = 1.0,
        cross_attention_dim: int = 1280,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        attention_type: str = "default",
    ) -> None:
        super().__init__()
        del resnet_pre_norm
        _no_dual(dual_cross_attention, "UNetMidBlock2DCrossAttn")
        _no_attention_type(attention_type, "UNetMidBlock2DCrossAttn")
        out_channels = out_channels or in_channels
        groups = resnet_groups if resnet_groups is not None else min(in_channels // 4, 32)
        groups_out = resnet_groups_out or groups
        layers = _per_layer(transformer_layers_per_block, num_layers)

        def resnet(cin: int, g: int, g_out: int | None = None) -> ResnetBlock2D:
            return _resnet(
                cin,
                out_channels,
                temb_channels,
                resnet_eps,
                g,
                dropout,
                resnet_time_scale_shift,
                resnet_act_fn,
                output_scale_factor,
                groups_out=g_out,
            )

        self.resnets = nn.ModuleList(
            [resnet(in_channels, groups, groups_out)]
            + [resnet(out_channels, groups_out) for _ in range(num_layers)]
        )
        self.attentions = nn.ModuleList(
            _spatial_attention(
                out_channels,
                num_attention_heads,
                layers[i],
                cross_attention_dim,
                groups_out,
                use_linear_projection,
                False,
                upcast_attention,
            )
            for i in range(num_layers)
        )

    def forward(
        self,
        x: Tensor,
        temb: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = attn.apply_to(x, encoder_hidden_states, None, encoder_attention_mask)
            x = resnet(x, temb)
        return x


_DOWN = {"DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"}
_UP = {"UpBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D"}


def _block_name(name: str, known: set[str], what: str) -> str:
    name = name[7:] if name.startswith("UNetRes") else name
    if name not in known:
        raise NotImplementedError(f"{what} {name!r} is not supported (supported: {sorted(known)})")
    return name


def get_down_block(
    down_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    temb_channels: int | None,
    add_downsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int,
    downsample_padding: int = 1,
    resnet_time_scale_shift: str = "default",
    dropout: float = 0.0,
    attention_head_dim: int | None = None,
    downsample_type: str | None = "conv",
    transformer_layers_per_block: int | list[int] = 1,
    num_attention_heads: int | None = None,
    cross_attention_dim: int | None = None,
    dual_cross_attention: bool = False,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    upcast_attention: bool = False,
    attention_type: str = "default",
) -> nn.Module:
    """The down block diffusers' ``get_down_block`` builds for ``down_block_type``."""
    name = _block_name(down_block_type, _DOWN, "down_block_types entry")
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        temb_channels=temb_channels,
        dropout=dropout,
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        downsample_padding=downsample_padding,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )
    if name == "DownBlock2D":
        return DownBlock2D(add_downsample=add_downsample, **common)
    if name == "AttnDownBlock2D":
        return AttnDownBlock2D(
            attention_head_dim=attention_head_dim,
            downsample_type=(downsample_type or "conv") if add_downsample else None,
            **common,
        )
    if cross_attention_dim is None:
        raise ValueError("cross_attention_dim must be specified for CrossAttnDownBlock2D")
    return CrossAttnDownBlock2D(
        add_downsample=add_downsample,
        transformer_layers_per_block=transformer_layers_per_block,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim,
        dual_cross_attention=dual_cross_attention,
        use_linear_projection=use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast_attention=upcast_attention,
        attention_type=attention_type,
        **common,
    )


def get_up_block(
    up_block_type: str,
    *,
    num_layers: int,
    in_channels: int,
    out_channels: int,
    prev_output_channel: int,
    temb_channels: int | None,
    add_upsample: bool,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int,
    resolution_idx: int | None = None,
    resnet_time_scale_shift: str = "default",
    dropout: float = 0.0,
    attention_head_dim: int | None = None,
    upsample_type: str | None = "conv",
    transformer_layers_per_block: int | list[int] = 1,
    num_attention_heads: int | None = None,
    cross_attention_dim: int | None = None,
    dual_cross_attention: bool = False,
    use_linear_projection: bool = False,
    only_cross_attention: bool = False,
    upcast_attention: bool = False,
    attention_type: str = "default",
) -> nn.Module:
    """The up block diffusers' ``get_up_block`` builds for ``up_block_type``."""
    name = _block_name(up_block_type, _UP, "up_block_types entry")
    common = dict(
        num_layers=num_layers,
        in_channels=in_channels,
        out_channels=out_channels,
        prev_output_channel=prev_output_channel,
        temb_channels=temb_channels,
        resolution_idx=resolution_idx,
        dropout=dropout,
        resnet_eps=resnet_eps,
        resnet_act_fn=resnet_act_fn,
        resnet_groups=resnet_groups,
        resnet_time_scale_shift=resnet_time_scale_shift,
    )
    if name == "UpBlock2D":
        return UpBlock2D(add_upsample=add_upsample, **common)
    if name == "AttnUpBlock2D":
        return AttnUpBlock2D(
            attention_head_dim=attention_head_dim,
            upsample_type=(upsample_type or "conv") if add_upsample else None,
            **common,
        )
    if cross_attention_dim is None:
        raise ValueError("cross_attention_dim must be specified for CrossAttnUpBlock2D")
    return CrossAttnUpBlock2D(
        add_upsample=add_upsample,
        transformer_layers_per_block=transformer_layers_per_block,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim,
        dual_cross_attention=dual_cross_attention,
        use_linear_projection=use_linear_projection,
        only_cross_attention=only_cross_attention,
        upcast_attention=upcast_attention,
        attention_type=attention_type,
        **common,
    )


def get_mid_block(
    mid_block_type: str | None,
    *,
    in_channels: int,
    temb_channels: int | None,
    resnet_eps: float,
    resnet_act_fn: str,
    resnet_groups: int,
    output_scale_factor: float = 1.0,
    resnet_time_scale_shift: str = "default",
    dropout: float = 0.0,
    transformer_layers_per_block: int | list[int] = 1,
    num_attention_heads: int | None = None,
    cross_attention_dim: int | None = None,
    dual_cross_attention: bool = False,
    use_linear_projection: bool = False,
    upcast_attention: bool = False,
    attention_type: str = "default",
) -> nn.Module | None:
    """The mid block diffusers' ``get_mid_block`` builds (for UNet2DConditionModel):
    ``UNetMidBlock2DCrossAttn``, ``UNetMidBlock2D`` (one ResNet block, no attention) or None."""
    if mid_block_type is None:
        return None
    if mid_block_type == "UNetMidBlock2DCrossAttn":
        return UNetMidBlock2DCrossAttn(
            in_channels,
            temb_channels,
            dropout=dropout,
            transformer_layers_per_block=transformer_layers_per_block,
            resnet_eps=resnet_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_act_fn=resnet_act_fn,
            resnet_groups=resnet_groups,
            num_attention_heads=num_attention_heads,
            output_scale_factor=output_scale_factor,
            cross_attention_dim=cross_attention_dim,
            dual_cross_attention=dual_cross_attention,
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            attention_type=attention_type,
        )
    if mid_block_type == "UNetMidBlock2D":
        return UNetMidBlock2D(
            in_channels,
            temb_channels,
            dropout=dropout,
            num_layers=0,
            resnet_eps=resnet_eps,
            resnet_act_fn=resnet_act_fn,
            output_scale_factor=output_scale_factor,
            resnet_groups=resnet_groups,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=False,
        )
    raise NotImplementedError(
        f"mid_block_type {mid_block_type!r} is not supported (supported: "
        "'UNetMidBlock2DCrossAttn', 'UNetMidBlock2D', None)"
    )
