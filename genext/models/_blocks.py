"""Blocks that several model families share, with diffusers' module names and ``state_dict`` keys.

Every GroupNorm is a :class:`~genext.nn.GroupNormSiLU`; where diffusers follows a GroupNorm with
SiLU, the two run as one genext kernel. Attention runs through
:func:`genext.nn.functional.scaled_dot_product_attention` (genext's flash-attention kernel where it
serves the shapes, PyTorch's otherwise). The rest is plain PyTorch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import GroupNormSiLU
from ..nn.functional import scaled_dot_product_attention

__all__ = [
    "Attention",
    "DownEncoderBlock2D",
    "Downsample2D",
    "ResnetBlock2D",
    "UNetMidBlock2D",
    "UpDecoderBlock2D",
    "Upsample2D",
    "activation",
]

_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "mish": nn.Mish,
    "relu": nn.ReLU,
}


def _is_silu(name: str) -> bool:
    return name in ("silu", "swish")


def activation(name: str) -> nn.Module:
    """The activation module diffusers names ``name`` (silu/swish, gelu, mish, relu)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


def _norm_act(groups: int, channels: int, eps: float, act: str) -> tuple[nn.Module, nn.Module]:
    """(norm, activation) for diffusers' ``GroupNorm`` + ``act``: the norm fuses SiLU and the
    activation is then the identity."""
    if _is_silu(act):
        return GroupNormSiLU(groups, channels, eps), nn.Identity()
    return GroupNormSiLU(groups, channels, eps, activation=None), activation(act)


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (pre-norm residual block with an optional timestep embedding).

    ``x (B, in_channels, H, W)``, ``temb (B, temb_channels)`` or None ->
    ``(B, out_channels, H, W)``. ``time_embedding_norm``: ``"default"`` adds the projected
    embedding before ``norm2``; ``"scale_shift"`` applies ``norm2(h) * (1 + scale) + shift``.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        non_linearity: str = "silu",
        time_embedding_norm: str = "default",
        output_scale_factor: float = 1.0,
        use_in_shortcut: bool | None = None,
        conv_shortcut_bias: bool = True,
        skip_time_act: bool = False,
        pre_norm: bool = True,
        conv_2d_out_channels: int | None = None,
    ) -> None:
        super().__init__()
        del pre_norm  # diffusers accepts it and always normalises first
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(
                "ResnetBlock2D: time_embedding_norm must be 'default' or 'scale_shift', got "
                f"{time_embedding_norm!r}"
            )
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.skip_time_act = skip_time_act
        self.nonlinearity = activation(non_linearity)  # for the timestep embedding

        self.norm1, self.act1 = _norm_act(groups, in_channels, eps, non_linearity)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            width = out_channels * (2 if time_embedding_norm == "scale_shift" else 1)
            self.time_emb_proj = nn.Linear(temb_channels, width)
        # with scale_shift the modulation sits between the norm and the activation: no fusion
        fuse2 = _is_silu(non_linearity) and time_embedding_norm == "default"
        self.norm2 = GroupNormSiLU(
            groups_out or groups, out_channels, eps, activation="silu" if fuse2 else None
        )
        self.act2 = nn.Identity() if fuse2 else activation(non_linearity)
        self.dropout = nn.Dropout(dropout)
        final = conv_2d_out_channels or out_channels
        self.conv2 = nn.Conv2d(out_channels, final, 3, padding=1)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != final
        self.conv_shortcut = (
            nn.Conv2d(in_channels, final, 1, bias=conv_shortcut_bias) if use_in_shortcut else None
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            if temb is None:
                raise ValueError(
                    "ResnetBlock2D: temb is required with time_embedding_norm 'scale_shift'"
                )
            scale, shift = temb.chunk(2, dim=1)
            h = self.act2(self.norm2(h) * (1 + scale) + shift)
        else:
            if temb is not None:
                h = h + temb
            h = self.act2(self.norm2(h))
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """diffusers' ``Downsample2D``: a stride-2 3x3 conv (``padding=0`` pads right and bottom
    by one first, as the original LDM autoencoder) or 2x2 average pooling.

    Keys: ``conv.*``; with ``name="conv"`` diffusers registers the same conv also as
    ``Conv2d_0``, and so does this module, so both key sets load.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        out_channels: int | None = None,
        padding: int = 1,
        name: str = "conv",
        kernel_size: int = 3,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv, self.padding = use_conv, padding
        if use_conv:
            conv: nn.Module = nn.Conv2d(
                channels, self.out_channels, kernel_size, stride=2, padding=padding, bias=bias
            )
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample2D: pooling keeps the channel count")
            conv = nn.AvgPool2d(2, 2)
        if name == "conv":
            self.Conv2d_0 = conv
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """diffusers' ``Upsample2D``: nearest-neighbour x2 (or to ``output_size``), then an optional
    3x3 conv; or a 4x4 stride-2 transposed conv. Keys ``conv.*``."""

    def __init__(
        self,
        channels: int,
        use_conv: bool = False,
        use_conv_transpose: bool = False,
        out_channels: int | None = None,
        kernel_size: int | None = None,
        padding: int = 1,
        bias: bool = True,
        interpolate: bool = True,
        name: str = "conv",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv, self.use_conv_transpose = use_conv, use_conv_transpose
        self.name = name
        self.interpolate = interpolate
        conv: nn.Module | None = None
        if use_conv_transpose:
            conv = nn.ConvTranspose2d(
                channels, self.out_channels, kernel_size or 4, 2, padding, bias=bias
            )
        elif use_conv:
            conv = nn.Conv2d(
                channels, self.out_channels, kernel_size or 3, padding=padding, bias=bias
            )
        # diffusers' key: conv.* by default, Conv2d_0.* for any other name
        setattr(self, "conv" if name == "conv" else "Conv2d_0", conv)

    def forward(self, x: Tensor, output_size: tuple[int, int] | None = None) -> Tensor:
        conv = self.conv if self.name == "conv" else self.Conv2d_0
        if self.use_conv_transpose:
            return conv(x)
        if self.interpolate:
            if output_size is None:
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            else:
                x = F.interpolate(x, size=output_size, mode="nearest")
        if self.use_conv:
            x = conv(x)
        return x


class Attention(nn.Module):
    """diffusers' ``Attention`` for the configurations the model families here use: multi-head
    self- or cross-attention with ``to_q``/``to_k``/``to_v``/``to_out.0`` projections, an
    optional GroupNorm on the input (``group_norm``), a residual connection and output rescale.

    ``x`` is ``(B, L, query_dim)`` or an image ``(B, query_dim, H, W)`` (attended over its
    ``H * W`` positions and returned in the same layout); ``context (B, Lk, cross_attention_dim)``
    gives cross-attention. Scores use scale ``dim_head ** -0.5``. With ``out_dim`` the inner
    width is ``out_dim`` and the head count ``out_dim // dim_head``, as in diffusers.
    ``attention_mask`` is passed to scaled_dot_product_attention (boolean, True = attend, or
    additive), broadcast from ``(B, Lk)`` or ``(B, Lq, Lk)`` over the heads.
    """

    def __init__(
        self,
        query_dim: int,
        cross_attention_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        out_bias: bool = True,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner = out_dim if out_dim is not None else heads * dim_head
        if out_dim is not None:
            heads = out_dim // dim_head
        self.heads, self.dim_head = heads, dim_head
        context_dim = cross_attention_dim or query_dim
        self.out_dim = out_dim or query_dim
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.group_norm = (
            GroupNormSiLU(norm_num_groups, query_dim, eps, activation=None)
            if norm_num_groups is not None
            else None
        )
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList(
            [nn.Linear(inner, self.out_dim, bias=out_bias), nn.Dropout(dropout)]
        )

    def forward(
        self, x: Tensor, context: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        residual = x
        image = x.dim() == 4
        if self.group_norm is not None:
            # normalising the (B, C, H, W) image before flattening equals diffusers' norm of the
            # transposed (B, C, H*W) sequence, without the two transposes
            x = self.group_norm(x if image else x.transpose(1, 2))
            if not image:
                x = x.transpose(1, 2)
        if image:
            b, c, hgt, wid = x.shape
            x = x.flatten(2).transpose(1, 2)
        ctx = x if context is None else context
        bsz = x.shape[0]
        q = self.to_q(x).view(bsz, -1, self.heads, self.dim_head).transpose(1, 2)
        k = self.to_k(ctx).view(bsz, -1, self.heads, self.dim_head).transpose(1, 2)
        v = self.to_v(ctx).view(bsz, -1, self.heads, self.dim_head).transpose(1, 2)
        if attention_mask is not None and attention_mask.dim() in (2, 3):
            mask = attention_mask
            attention_mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        h = scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        h = h.transpose(1, 2).reshape(bsz, -1, self.heads * self.dim_head)
        h = self.to_out[1](self.to_out[0](h))
        if image:
            h = h.transpose(1, 2).reshape(b, self.out_dim, hgt, wid)
        if self.residual_connection:
            h = h + residual
        if self.rescale_output_factor != 1.0:
            h = h / self.rescale_output_factor
        return h


class UNetMidBlock2D(nn.Module):
    """diffusers' ``UNetMidBlock2D``: a ResNet block, then ``num_layers`` x (attention, ResNet
    block). The attention has ``in_channels // attention_head_dim`` heads (the VAEs pass
    ``attention_head_dim=in_channels``: one head)."""

    def __init__(
        self,
        in_channels: int,
        temb_channels: int | None,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_time_scale_shift: str = "default",
        resnet_act_fn: str = "silu",
        resnet_groups: int | None = 32,
        attn_groups: int | None = None,
        add_attention: bool = True,
        attention_head_dim: int | None = 1,
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if resnet_groups is None:
            resnet_groups = min(in_channels // 4, 32)
        if attn_groups is None and resnet_time_scale_shift == "default":
            attn_groups = resnet_groups
        # diffusers' default is heads of dim 1; None means one head over all channels
        head_dim = in_channels if attention_head_dim is None else attention_head_dim
        self.add_attention = add_attention

        def resnet() -> ResnetBlock2D:
            return ResnetBlock2D(
                in_channels=in_channels,
                out_channels=in_channels,
                temb_channels=temb_channels,
                eps=resnet_eps,
                groups=resnet_groups,
                dropout=dropout,
                time_embedding_norm=resnet_time_scale_shift,
                non_linearity=resnet_act_fn,
                output_scale_factor=output_scale_factor,
            )

        self.resnets = nn.ModuleList([resnet() for _ in range(num_layers + 1)])
        self.attentions = nn.ModuleList(
            [
                Attention(
                    in_channels,
                    heads=in_channels // head_dim,
                    dim_head=head_dim,
                    rescale_output_factor=output_scale_factor,
                    eps=resnet_eps,
                    norm_num_groups=attn_groups,
                    residual_connection=True,
                    bias=True,
                )
                if add_attention
                else nn.Identity()
                for _ in range(num_layers)
            ]
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x), temb)
        return x


def _resnets(
    in_channels: int,
    out_channels: int,
    num_layers: int,
    temb_channels: int | None,
    eps: float,
    groups: int,
    dropout: float,
    act: str,
    output_scale_factor: float,
) -> nn.ModuleList:
    return nn.ModuleList(
        ResnetBlock2D(
            in_channels=in_channels if i == 0 else out_channels,
            out_channels=out_channels,
            temb_channels=temb_channels,
            eps=eps,
            groups=groups,
            dropout=dropout,
            non_linearity=act,
            output_scale_factor=output_scale_factor,
        )
        for i in range(num_layers)
    )


class DownEncoderBlock2D(nn.Module):
    """diffusers' ``DownEncoderBlock2D``: ``num_layers`` ResNet blocks (no timestep), then an
    optional stride-2 conv downsampler."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ) -> None:
        super().__init__()
        self.resnets = _resnets(
            in_channels,
            out_channels,
            num_layers,
            None,
            resnet_eps,
            resnet_groups,
            dropout,
            resnet_act_fn,
            output_scale_factor,
        )
        self.downsamplers = (
            nn.ModuleList(
                [Downsample2D(out_channels, True, out_channels, downsample_padding, name="op")]
            )
            if add_downsample
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """diffusers' ``UpDecoderBlock2D``: ``num_layers`` ResNet blocks, then an optional nearest x2
    upsampler with a 3x3 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        dropout: float = 0.0,
        num_layers: int = 1,
        resnet_eps: float = 1e-6,
        resnet_act_fn: str = "silu",
        resnet_groups: int = 32,
        output_scale_factor: float = 1.0,
        add_upsample: bool = True,
        temb_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.resnets = _resnets(
            in_channels,
            out_channels,
            num_layers,
            temb_channels,
            resnet_eps,
            resnet_groups,
            dropout,
            resnet_act_fn,
            output_scale_factor,
        )
        self.upsamplers = (
            nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])
            if add_upsample
            else None
        )

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, temb)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                x = up(x)
        return x


def attention_key_renames() -> dict[str, str]:
    """Old diffusers attention-block names (``query``/``key``/``value``/``proj_attn``, from
    checkpoints saved before diffusers' ``Attention`` class) to the current ones."""
    return {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with old attention-block key names replaced (see :func:`attention_key_renames`);
    other keys untouched. Old checkpoints stored these projections as 1x1 convs for some models:
    a 4-D weight is reshaped to the Linear's 2-D one."""
    renames = attention_key_renames()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and "attentions" in parts and parts[-2] in renames:
            parts[-2] = renames[parts[-2]]
            key = ".".join(parts)
            if value.dim() == 4 and parts[-1] == "weight":
                value = value[:, :, 0, 0]
        out[key] = value
    return out
